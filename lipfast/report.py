"""Figures and a one-page report from a run folder: what ``lipfast report RUN_DIR`` produces.

``make_report(run_dir)`` writes ``figures/*.png`` and a self-contained ``report.html`` (images
embedded as base64 data URIs, no scripts, every string from the run HTML-escaped).
``summary_table(run)`` is the plain-text table the command line prints.

matplotlib is imported lazily, and only its object-oriented API with the Agg canvas is used
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no pyplot, no global backend switch, never
a GUI window.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import analysis, runio
from .analysis import UNEXPLAINED_FLAGS
from .tracker import TRUST_FLAGS

__all__ = ["make_report", "make_figures", "summary_table", "trust_warnings", "FIGURES"]

# file name -> caption (HTML-safe: fixed text)
FIGURES = {
    "sigma.png": "σ₁ of each layer (observed) with the SDE mean and quantile band simulated from "
    "the measured coefficients. Panel titles: module path · kind and matrix shape m×n.",
    "forces.png": "The three forces per step and layer, in σ₁ units per step: drift (i), the noise scale "
    "√diffusion_var (ii) and the Itô drift (iii); right, their sums over the run. Red ticks at the bottom: "
    "steps with a trust flag (their forces are still derivatives at the current W); black ticks at the top: "
    "steps whose forces are NaN (σ₁ and σ₂ unresolved, or values not finite), which break the lines.",
    "pathwise.png": "Pathwise check: cumulative predicted change Σ δ_pred against the observed "
    "change σ_t − σ_0. Red ticks: steps flagged crossing or closure, which the forces do not explain.",
    "log_bound.png": "Network Lipschitz bound log K = Σ log σ_ℓ with its SDE band.",
    "gap.png": "Relative spectral gap (σ₁ − σ₂)/σ₁ per layer (log scale) against gap_tol, below which a step "
    "is flagged small_gap. Ticks under the curve: the steps carrying each trust flag (one row per flag); a "
    "flag other than small_gap can be set at any gap.",
    "loss.png": "Training loss (and accuracy when logged) per batch, faint, with its moving average; the "
    "held-out test accuracy at the end of the run.",
}
FIGURE_DPI = 150
# Readable at the report's width: larger text than matplotlib's defaults for figures this size.
_STYLE = {"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 8.5,
          "xtick.labelsize": 9, "ytick.labelsize": 9}
_TRUST = frozenset(TRUST_FLAGS)
_UNEXPLAINED = frozenset(UNEXPLAINED_FLAGS)
# One color per trust flag in gap.png, in TRUST_FLAGS order.
_FLAG_COLORS = dict(zip(TRUST_FLAGS, ("tab:gray", "tab:red", "tab:orange", "black", "tab:brown")))

_TITLE_MAX = 48


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 4) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def _pct(x: Any, digits: int = 1) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{100 * x:.{digits}f}%" if math.isfinite(x) else "n/a"


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _mtext(s: str) -> str:
    """A run string made safe for a matplotlib text: no mathtext, bounded length."""
    s = s if len(s) <= _TITLE_MAX else s[: _TITLE_MAX - 1] + "…"
    return s.replace("$", r"\$")


_SDE_KEYS = ("coverage", "n_fallback", "n_unexplained")
# Thresholds of the warnings printed with the table and shown as banners in the report.
UNEXPLAINED_WARN = 0.10
COVERAGE_WARN = 0.50


def _sde_info(run: runio.Run, sim: dict | None) -> tuple[dict[str, dict], dict]:
    """Per-layer and network band coverage, fallback and unexplained step counts (NaN where unknown) from a
    simulate_run result or summary.json."""
    def pick(series) -> dict:
        return {k: _as_float((series or {}).get(k)) for k in _SDE_KEYS}

    if sim is None:
        summary = run.summary or {}
        if "sde" not in summary:  # the Run may predate `lipfast simulate`: look at the folder now
            summary = runio.read_summary(run.path) or {}
        sim = summary.get("sde") or {}
    return {k: pick(v) for k, v in (sim.get("layers") or {}).items()}, pick(sim.get("network"))


def trust_warnings(run: runio.Run | str | os.PathLike, sim: dict | None = None) -> list[str]:
    """One sentence per layer whose movement the forces leave more than 10% unexplained, or whose observed
    σ₁ lies less than half of the time inside its SDE band, with the likely cause."""
    run = run if isinstance(run, runio.Run) else runio.load_run(run)
    return _trust_lines(_pathwise(run)[0], _sde_info(run, sim)[0])


def _trust_lines(pw_layers: dict[str, dict], info: dict[str, dict]) -> list[str]:
    """:func:`trust_warnings` from the pathwise checks and SDE summaries the caller already has."""
    large = ("its steps are large against the spectral gap σ₁ − σ₂ (level crossings, or a second-order expansion "
             "that misses): a lower learning rate or tracking from a later step would explain more")
    # The band can miss where the realised expansion holds: the SDE's drift has no term for the mean step's own
    # curvature ½η²H[ḡ,ḡ], and its Itô term is an estimate inside a truncation bracket.
    model = ("its steps are explained by the realised expansion (first_order + second_order) but not by the SDE's "
             "forces, which leave out the mean step's own curvature ½η²H[ḡ,ḡ] (compare the sums of second_order "
             "and ito) and estimate the Itô term inside its truncation bracket (ito_lo..ito_hi; a higher rank "
             "narrows it)")
    out = []
    for name, pw in pw_layers.items():
        share, cov = pw["unexplained_share"], info.get(name, {}).get("coverage", math.nan)
        fallback = info.get(name, {}).get("n_fallback", math.nan)
        if share > UNEXPLAINED_WARN:
            out.append(f"layer '{name}': {_pct(share)} of its movement is not explained by the forces "
                       f"({pw['n_unexplained']} of {pw['n_steps']} steps flagged crossing or closure); {large}")
        if cov < COVERAGE_WARN:
            out.append(f"layer '{name}': only {_pct(cov)} of its observed σ₁ lies inside the SDE band "
                       f"({_count(fallback)} step(s) advanced by the observed increment); "
                       f"{large if share > UNEXPLAINED_WARN else model}")
    return out


def _count(x: float) -> str:
    return str(int(x)) if math.isfinite(x) else "n/a"


def _pathwise(run: runio.Run) -> tuple[dict[str, dict], dict | None]:
    groups: dict[str, list[dict]] = {}
    for r in run.layers:
        groups.setdefault(r["layer"], []).append(r)
    layers = {name: analysis.pathwise_layer(rows) for name, rows in groups.items()}
    net = analysis.pathwise_network(run.network) if run.network else None
    return layers, net


# --------------------------------------------------------------------------------------------
# Plain-text summary
# --------------------------------------------------------------------------------------------


def summary_table(run: runio.Run | str | os.PathLike, sim: dict | None = None) -> str:
    """A plain-text table, one line per layer: σ start -> end, the share of each force
    (drift / Itô / noise scale), the pathwise relative residual and the SDE band coverage,
    then a line for the network's log bound.

    Args:
        run: a Run or a run folder.
        sim: a :func:`lipfast.analysis.simulate_run` result to take coverages from; by default
            they come from summary.json (``lipfast simulate``), "n/a" when absent.
    """
    run = run if isinstance(run, runio.Run) else runio.load_run(run)
    pw_layers, pw_net = _pathwise(run)
    info, net_info = _sde_info(run, sim)
    header = ["layer", "sigma start -> end", "drift", "ito", "noise", "explained resid", "unexplained (steps)",
              "coverage", "fallback"]
    rows = []
    for name, pw in pw_layers.items():
        rows.append([
            name,
            f"{_num(pw['sigma_start'])} -> {_num(pw['sigma_end'])}",
            _pct(pw["share_drift"]),
            _pct(pw["share_ito"]),
            _pct(pw["share_noise"]),
            _pct(pw["rel_residual_explained"], 2),
            f"{_pct(pw['unexplained_share'], 1)} ({pw['n_unexplained']})",
            _pct(info.get(name, {}).get("coverage", math.nan)),
            _count(info.get(name, {}).get("n_fallback", math.nan)),
        ])  # fmt: skip
    if pw_net is not None:
        rows.append([
            "(network log bound)",
            f"{_num(pw_net['log_bound_start'])} -> {_num(pw_net['log_bound_end'])}",
            _pct(pw_net["share_drift"]),
            _pct(pw_net["share_ito"]),
            _pct(pw_net["share_noise"]),
            "",
            f"({_count(net_info['n_unexplained'])})",
            _pct(net_info["coverage"]),
            _count(net_info["n_fallback"]),
        ])  # fmt: skip
    if not rows:
        return f"{run.path}: no records"
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append("shares of |cum drift| + |cum ito| + sqrt(sum diffusion_var); explained resid = "
               "|sum (obs - pred)| over the steps not flagged crossing or closure / sum |obs|; unexplained = sum min(|obs - pred|, |obs|) on steps flagged "
               "crossing or closure / sum |obs| (their count; network: steps with such a layer); coverage = "
               "observed inside the SDE band; fallback = steps advanced by the observed increment")  # fmt: skip
    out += [f"warning: {w}" for w in _trust_lines(pw_layers, info)]
    bn = (run.summary or {}).get("batchnorm")
    if isinstance(bn, dict) and "log_bound_folded" in bn:  # the paper's K leaves BatchNorm out: show both
        out.append(f"batchnorm: log K {_num(bn['log_bound'])} over the Linear/Conv weights; "
                   f"{_num(bn['log_bound_folded'])} with each BatchNorm's running scale folded in "
                   f"(max|gamma|/sqrt(running_var+eps), batchnorm.csv)")
    if run.dropped_lines:
        out.append(f"note: {run.dropped_lines} partial CSV line(s) from an interrupted write "
                   "were ignored")  # fmt: skip
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "lipfast report needs matplotlib: pip install matplotlib (or pip install 'lipfast[run]')"
        ) from exc
    return Figure, FigureCanvasAgg


def _grid(n: int, ncols_max: int = 3) -> tuple[int, int]:
    ncols = max(1, min(ncols_max, n))
    return max(1, math.ceil(n / ncols)), ncols


def _layer_figure(n: int, *, width: float = 4.4, height: float = 3.0):
    Figure, Canvas = _mpl()
    nrows, ncols = _grid(n)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.4), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A layer name with characters the default font lacks must not break the report.
        warnings.filterwarnings("ignore", message=r"Glyph .*missing from", category=UserWarning)
        fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def _with_breaks(steps: np.ndarray, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """Insert NaN between blocks of consecutive steps so lines and bands break there."""
    steps = np.asarray(steps, dtype=np.float64)
    if steps.size < 2:
        return (steps,) + tuple(np.asarray(c, dtype=np.float64) for c in cols)
    cut = np.flatnonzero(np.diff(steps) != 1) + 1
    ins = lambda a: np.insert(np.asarray(a, dtype=np.float64), cut, np.nan)  # noqa: E731
    return (ins(steps),) + tuple(ins(c) for c in cols)


def _rows_by_layer(run: runio.Run) -> dict[str, dict[str, np.ndarray]]:
    """Numeric columns per layer as arrays in step order; ``"flags"`` holds each step's set of flag names
    and ``"label"`` the layer's figure title."""
    groups: dict[str, dict[int, dict]] = {}
    for r in run.layers:
        groups.setdefault(r["layer"], {})[int(r["step"])] = r
    out = {}
    for name, by_step in groups.items():
        rows = [by_step[s] for s in sorted(by_step)]
        d = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in runio.LAYER_COLUMNS
             if c not in runio.STR_COLUMNS}  # fmt: skip
        d["flags"] = [set(filter(None, str(r.get("flag_names") or "").split(";"))) for r in rows]
        d["label"] = layer_label(name, rows[-1])
        out[name] = d
    return out


_KIND_NAMES = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "hf_conv1d": "Conv1D (HF)",
               "embedding": "Embedding", "attention": "attention"}


def layer_label(name: str, record: dict) -> str:
    """A layer's name for a figure or a table: its module path, kind and matrix shape (``1 · Linear 128×64``)."""
    kind = str(record.get("kind") or "")
    kind = _KIND_NAMES.get(kind, kind)
    try:
        shape = f" {int(record['m'])}×{int(record['n'])}"
    except (KeyError, TypeError, ValueError):
        shape = ""
    return f"{name} · {kind}{shape}" if kind else name


def _band_plot(ax, series: dict | None, obs_steps, obs, q: Sequence[float], label_obs: str):
    if series is not None and len(series["steps"]):
        st, mean, lo, hi, ob = _with_breaks(
            series["steps"], series["mean"], series["lo"], series["hi"], series["observed"]
        )
        ax.fill_between(st, lo, hi, color="tab:orange", alpha=0.3, linewidth=0,
                        label=f"SDE {q[0]:.0%}–{q[1]:.0%} band")  # fmt: skip
        ax.plot(st, mean, color="tab:orange", linestyle="--", linewidth=1.2, label="SDE mean")
        ax.plot(st, ob, color="tab:blue", linewidth=1.3, label=label_obs)
    else:
        ax.plot(obs_steps, obs, color="tab:blue", linewidth=1.3, label=label_obs)


def _mark_steps(ax, steps: np.ndarray, *, color: str, y: float, label: str | None) -> None:
    """Short ticks at the given steps along a fixed height of the axes (``y`` in axes units), so that marked
    steps never sit on, or hide, the plotted data."""
    if len(steps):
        ax.plot(steps, np.full(len(steps), y), linestyle="none", marker="|", markersize=7, color=color,
                transform=ax.get_xaxis_transform(), label=label, clip_on=False)


def _figure_legend(fig, axes) -> None:
    """One legend above all panels with every distinct label of ``axes`` (a flag may mark only some layers)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside upper center", ncols=min(len(seen), 6))


def _moving_average(a: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average ignoring NaN (the smoothed curve of a noisy per-batch series)."""
    a = np.asarray(a, dtype=np.float64)
    if width <= 1 or a.size < 3:
        return a
    ok = np.isfinite(a)
    kernel = np.ones(width)
    num = np.convolve(np.where(ok, a, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def make_figures(
    run: runio.Run, sim: dict | None, *, quantiles: Sequence[float] = (0.05, 0.95)
) -> dict[str, bytes]:
    """Render the report's figures. Returns {file name: PNG bytes} (keys as in FIGURES).

    Args:
        run: the run.
        sim: ``{"layers": {name: series}, "network": series or None}`` as from
            :func:`lipfast.analysis.load_simulation` or ``simulate_run``; None plots the
            observations without bands.
        quantiles: the band's quantiles, for the legend.
    """
    _mpl()
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        return _make_figures(run, sim, quantiles)


def _make_figures(run: runio.Run, sim: dict | None, quantiles: Sequence[float]) -> dict[str, bytes]:
    layers = _rows_by_layer(run)
    names = list(layers)
    sim_layers = (sim or {}).get("layers") or {}
    sim_net = (sim or {}).get("network")
    figs: dict[str, bytes] = {}
    n = max(1, len(names))

    # 1. sigma with the SDE band
    fig, axes = _layer_figure(n)
    for ax, name in zip(axes, names):
        d = layers[name]
        _band_plot(ax, sim_layers.get(name), d["step"], d["sigma"], quantiles, "observed σ₁")
        ax.set_title(_mtext(d["label"]))
        ax.set_xlabel("step")
        ax.set_ylabel("σ₁ (operator norm)")
    if names:
        axes[0].legend()
    figs["sigma.png"] = _png(fig)

    # 2. forces: per step (left) and cumulative (right), one row per layer, in the order (i), (ii), (iii)
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(11.0, 3.0 * n + 0.4), layout="constrained")
    Canvas(fig)
    grid = fig.subplots(n, 2, squeeze=False)
    for (ax, cax), name in zip(grid, names):
        d = layers[name]
        st, dr, it, dv = _with_breaks(d["step"], d["drift"], d["ito"], d["diffusion_var"])
        noise = np.sqrt(np.where(dv > 0, dv, np.where(np.isnan(dv), np.nan, 0.0)))
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.plot(st, dr, color="tab:blue", linewidth=1.0, label="drift (i)")
        ax.plot(st, noise, color="tab:green", linewidth=1.0, label="√diffusion_var (ii)")
        ax.plot(st, it, color="tab:orange", linewidth=1.0, label="Itô (iii)")
        nan_steps = d["step"][~np.isfinite(d["drift"])]
        flagged = d["step"][np.array([bool(f & _TRUST) for f in d["flags"]], dtype=bool)]
        _mark_steps(ax, flagged, color="tab:red", y=0.03, label="flagged step")
        _mark_steps(ax, nan_steps, color="black", y=0.97, label="forces NaN")
        ax.set_title(f"{_mtext(d['label'])}: per step")
        ax.set_xlabel("step")
        ax.set_ylabel("Δσ₁ per step")
        after = d["step"] + 1
        fin = lambda a: np.where(np.isfinite(a), a, 0.0)  # noqa: E731
        cax.axhline(0.0, color="0.6", linewidth=0.8)
        cax.plot(after, np.cumsum(fin(d["drift"])), color="tab:blue", linewidth=1.3, label="Σ drift (i)")
        cax.plot(after, np.sqrt(np.cumsum(np.maximum(fin(d["diffusion_var"]), 0.0))),
                 color="tab:green", linewidth=1.3, label="√Σ diffusion_var (ii)")  # fmt: skip
        cax.plot(after, np.cumsum(fin(d["ito"])), color="tab:orange", linewidth=1.3, label="Σ Itô (iii)")
        cax.set_title(f"{_mtext(d['label'])}: cumulative")
        cax.set_xlabel("step")
        cax.set_ylabel("σ₁ units, summed over steps")
    if names:  # one legend above the panels (inside, it would hide the per-step lines), from every panel
        _figure_legend(fig, [a for row in grid for a in row[:1]])
    figs["forces.png"] = _png(fig)

    # 3. pathwise: cumulative predicted vs observed
    fig, axes = _layer_figure(n)
    for ax, name in zip(axes, names):
        d = layers[name]
        after = d["step"] + 1
        pred = np.where(np.isfinite(d["delta_pred"]), d["delta_pred"], 0.0)
        ax.plot(after, np.cumsum(pred), color="tab:red", linestyle="--", linewidth=1.3,
                label=r"predicted $\sum\,\delta_{\mathrm{pred}}$")  # fmt: skip
        ax.plot(after, d["sigma_next"] - d["sigma"][0], color="tab:blue", linewidth=1.3,
                label=r"observed $\sigma_t - \sigma_0$")  # fmt: skip
        if len(d["step"]) > 1 and np.any(np.diff(d["step"]) != 1):
            obs = np.where(np.isfinite(d["delta_obs"]), d["delta_obs"], 0.0)
            ax.plot(after, np.cumsum(obs), color="tab:green", linestyle=":", linewidth=1.3,
                    label=r"$\sum\,\delta_{\mathrm{obs}}$ (tracked steps)")  # fmt: skip
        unexplained = np.array([bool(f & _UNEXPLAINED) for f in d["flags"]], dtype=bool)
        _mark_steps(ax, after[unexplained], color="tab:red", y=0.03, label="crossing or closure")
        ax.set_title(_mtext(d["label"]))
        ax.set_xlabel("step")
        ax.set_ylabel("change of σ₁ since step 0")
    if names:
        _figure_legend(fig, axes)
    figs["pathwise.png"] = _png(fig)

    # 4. log bound
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    net = _sorted_net(run.network)
    if net:
        st = np.array([r["step"] for r in net], dtype=np.float64)
        lb = np.array([r["log_bound"] for r in net], dtype=np.float64)
        _band_plot(ax, sim_net, st, lb, quantiles, "observed log K")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no network records", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("network bound log K = Σ log σ₁ over the layers")
    ax.set_xlabel("step")
    ax.set_ylabel("log K")
    figs["log_bound.png"] = _png(fig)

    # 5. spectral gap, with the small_gap threshold and each step's flags as ticks under the curve
    gap_tol = float((run.config or {}).get("gap_tol", math.nan))
    fig, axes = _layer_figure(n, height=3.3)
    for ax, name in zip(axes, names):
        d = layers[name]
        st, gap = _with_breaks(d["step"], d["gap"])
        ax.plot(st, np.where(gap > 0, gap, np.nan), color="tab:purple", linewidth=1.0, label="gap")
        if math.isfinite(gap_tol) and gap_tol > 0:
            ax.axhline(gap_tol, color="tab:red", linestyle="--", linewidth=0.9, label=f"gap_tol = {gap_tol:g}")
        ax.set_yscale("log")
        for i, (flag, color) in enumerate(_FLAG_COLORS.items()):
            hit = np.array([flag in f for f in d["flags"]], dtype=bool)
            _mark_steps(ax, d["step"][hit], color=color, y=0.04 + 0.06 * i, label=flag if hit.any() else None)
        ax.set_title(_mtext(d["label"]))
        ax.set_xlabel("step")
        ax.set_ylabel("(σ₁ − σ₂)/σ₁")
    if names:
        _figure_legend(fig, axes)
    figs["gap.png"] = _png(fig)

    # 6. loss and accuracy: per-batch values faint, their moving average, the held-out accuracy at the end
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    summary = run.summary or {}
    if net:
        st = np.array([r["step"] for r in net], dtype=np.float64)
        loss = np.array([r["loss"] for r in net], dtype=np.float64)
        acc = np.array([r["train_acc"] for r in net], dtype=np.float64)
        width = max(1, len(st) // 20)
        ax.plot(st, loss, color="tab:blue", linewidth=0.6, alpha=0.35)
        handles = ax.plot(st, _moving_average(loss, width), color="tab:blue", linewidth=1.4,
                          label=f"training loss (batch, {width}-step mean)")
        ax.set_ylabel("loss")
        ok = np.isfinite(acc)
        test_acc = summary.get("test_acc")
        if ok.any() or isinstance(test_acc, (int, float)):
            ax2 = ax.twinx()
            if ok.any():
                ax2.plot(st[ok], acc[ok], color="tab:green", linewidth=0.6, alpha=0.35)
                handles += ax2.plot(st[ok], _moving_average(acc[ok], width), color="tab:green", linewidth=1.4,
                                    label="training accuracy (batch)")
            if isinstance(test_acc, (int, float)) and math.isfinite(test_acc):
                handles += ax2.plot([st[-1] + 1], [test_acc], linestyle="none", marker="D", color="black",
                                    label=f"test accuracy {test_acc:.1%} (end)")
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(0.0, 1.02)
        ax.legend(handles=handles, loc="center right")
    else:
        ax.text(0.5, 0.5, "no network records", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    figs["loss.png"] = _png(fig)
    return figs


def _sorted_net(rows: list[dict]) -> list[dict]:
    """Network rows sorted by step, a repeated step keeping its last record."""
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1180px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}code{font-size:.95em}
.meta{color:#555}.warn{background:#fff4d6;border:1px solid #e8c15a;padding:.4em .7em}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [(prefix, "{}")]
    if isinstance(obj, str):
        return [(prefix, obj)]
    if isinstance(obj, float):  # four significant digits: 0.1694, not 0.1694464087486267
        return [(prefix, format(obj, ".4g"))]
    return [(prefix, json.dumps(obj, allow_nan=True, default=str))]


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells must be escaped already; the first ``left`` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(run: runio.Run, figs: dict[str, bytes], summary: dict) -> str:
    pw_layers, pw_net = _pathwise(run)
    info, net_info = _sde_info(run, None)
    sde = summary.get("sde") or {}
    q = sde.get("quantiles") or [0.05, 0.95]
    steps = sorted({r["step"] for r in run.layers})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lipfast report: {_e(run.path.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>lipfast report: <code>{_e(run.path.name)}</code></h1>",
        f'<p class="meta">created {_e(run.meta.get("created", "?"))} with lipfast '
        f'{_e(run.meta.get("lipfast_version", "?"))}; {len(pw_layers)} tracked layer(s); '
        f"{len(steps)} tracked step(s)"
        + (f" ({_e(steps[0])} to {_e(steps[-1])})" if steps else "")
        + "</p>",
    ]
    if run.dropped_lines:
        parts.append(
            f'<p class="warn">{run.dropped_lines} partial CSV line(s) left by an interrupted '
            "write were ignored.</p>"
        )
    parts += [f'<p class="warn">{_e(w)}</p>' for w in _trust_lines(pw_layers, info)]

    # per-layer table
    rows = []
    for name, pw in pw_layers.items():
        rows.append([
            f"<code>{_e(name)}</code>",
            f"{_num(pw['sigma_start'])} → {_num(pw['sigma_end'])}",
            f"{_num(pw['cum_drift'])} ({_pct(pw['share_drift'])})",
            f"{_num(pw['cum_ito'])} ({_pct(pw['share_ito'])})",
            f"{_num(pw['noise_scale'])} ({_pct(pw['share_noise'])})",
            f"{_num(pw['sum_delta_pred'])} / {_num(pw['sum_delta_obs_valid'])}",
            _pct(pw["rel_residual"], 2),
            _pct(pw["rel_residual_explained"], 2),
            f"{_pct(pw['unexplained_share'], 1)} ({pw['n_unexplained']})",
            _pct(info.get(name, {}).get("coverage", math.nan)),
            _count(info.get(name, {}).get("n_fallback", math.nan)),
            _pct(pw["degenerate_fraction"]),
        ])  # fmt: skip
    parts.append("<h2>Per layer</h2>")
    parts.append(_table(
        ["layer", "σ₁ start → end", "Σ drift (share)", "Σ Itô (share)",
         "noise scale √Σvar (share)", "Σ δ_pred / Σ δ_obs", "pathwise residual", "explained residual",
         "unexplained (steps)",
         f"band coverage ({_e(_pct(q[0], 0))}–{_e(_pct(q[1], 0))})", "SDE fallback steps", "flagged steps"],
        rows,
    ))  # fmt: skip
    parts.append(
        '<p class="meta">Shares are of |Σ drift| + |Σ Itô| + √Σ diffusion_var. The pathwise '
        "residual is |Σ δ_obs − Σ δ_pred| / |Σ δ_obs| over the steps where both are finite (every step "
        "but those with σ₁ = σ₂ or non-finite values); the explained residual is |Σ (δ_obs − δ_pred)| over the "
        "steps not flagged <code>crossing</code> or <code>closure</code>, over Σ |δ_obs|. Unexplained: "
        "Σ min(|δ_obs − δ_pred|, |δ_obs|) over the flagged steps, over Σ |δ_obs|, with their count; the "
        "band advances by the observed increment there (SDE fallback steps). Flagged steps: any of "
        "<code>unconverged</code>, <code>small_gap</code>, <code>large_step</code>, <code>crossing</code>, <code>closure</code>. "
        "Band coverage is the fraction of observed values inside the simulated band (block "
        "starts excluded).</p>"
    )
    if pw_net is not None:
        parts.append("<h2>Network</h2>")
        parts.append(_table(
            ["quantity", "log bound start → end", "Σ drift (share)", "Σ Itô (share)",
             "noise scale (share)", "steps with an unexplained layer", "band coverage", "SDE fallback steps"],
            [["Σ<sub>ℓ</sub> log σ<sub>ℓ</sub>",
              f"{_num(pw_net['log_bound_start'])} → {_num(pw_net['log_bound_end'])}",
              f"{_num(pw_net['cum_drift'])} ({_pct(pw_net['share_drift'])})",
              f"{_num(pw_net['cum_ito'])} ({_pct(pw_net['share_ito'])})",
              f"{_num(pw_net['noise_scale'])} ({_pct(pw_net['share_noise'])})",
              _count(net_info["n_unexplained"]), _pct(net_info["coverage"]), _count(net_info["n_fallback"])]],
        ))  # fmt: skip

    parts.append("<h2>Figures</h2>")
    for name, png in figs.items():
        b64 = base64.b64encode(png).decode("ascii")
        caption = FIGURES.get(name, "")
        parts.append(
            f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(name)}">'
            f"<figcaption><code>figures/{_e(name)}</code>: {_e(caption)}</figcaption></figure>"
        )

    if sde:
        parts.append("<h2>SDE simulation</h2>")
        parts.append(
            f"<p>{_e(sde.get('method', ''))} Paths: {_e(sde.get('n_paths', '?'))}, seed "
            f"{_e(sde.get('seed', '?'))}, quantiles {_e(q)}.</p>"
        )

    parts.append("<h2>Configuration</h2>")
    cfg = _flatten(run.config)
    if cfg:
        parts.append(_table(["option", "value"], [[_e(k), _e(v)] for k, v in cfg], left=2))
    else:
        parts.append("<p>(empty)</p>")

    extra = {k: v for k, v in summary.items() if k not in ("sde", "pathwise")}
    if extra:
        parts.append("<h2>Run summary</h2>")
        parts.append(
            _table(["field", "value"], [[_e(k), _e(v)] for k, v in _flatten(extra)], left=2)
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _needs_simulation(path: Path, summary: dict | None) -> bool:
    sde_files = [path / runio.SDE_LAYERS_FILE, path / runio.SDE_NETWORK_FILE]
    if not all(p.is_file() for p in sde_files):
        return True
    if not summary or "sde" not in summary or "pathwise" not in summary:
        return True
    newest_record = max(
        (p.stat().st_mtime for p in (path / runio.LAYERS_FILE, path / runio.NETWORK_FILE)
         if p.is_file()),
        default=0.0,
    )  # fmt: skip
    return min(p.stat().st_mtime for p in sde_files) < newest_record


def make_report(
    run_dir: str | os.PathLike,
    *,
    n_paths: int = 4096,
    seed: int = 0,
    quantiles: Sequence[float] = (0.05, 0.95),
    resimulate: bool = False,
) -> Path:
    """Write ``figures/*.png`` and ``report.html`` into a run folder.

    The SDE simulation (:func:`lipfast.analysis.write_simulation`, with ``n_paths``, ``seed``
    and ``quantiles``) is run first when sde_*.csv are missing, older than the records, or
    absent from summary.json, or when ``resimulate`` is set.

    Returns:
        The path of report.html.

    Raises:
        RunFolderError: the folder is not a readable run, or it has no layer records yet.
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    _mpl()
    run = runio.load_run(run_dir)
    if not run.layers:
        raise runio.RunFolderError(f"{run.path} has no layer records yet: nothing to report")
    path = run.path
    if resimulate or _needs_simulation(path, run.summary):
        analysis.write_simulation(path, n_paths=n_paths, seed=seed, quantiles=quantiles)
        run = runio.load_run(path)
    summary = run.summary or {}
    sim = analysis.load_simulation(path)
    q = (summary.get("sde") or {}).get("quantiles") or list(quantiles)
    figs = make_figures(run, sim, quantiles=q)
    figdir = path / runio.FIGURES_DIR
    try:
        figdir.mkdir(exist_ok=True)
    except OSError as exc:
        raise runio.RunWriteError(exc.errno or 5, f"lipfast: cannot create {figdir}: "
                                  f"{exc.strerror or exc}") from exc  # fmt: skip
    for name, png in figs.items():
        runio.write_bytes_atomic(figdir / name, png)
    out = path / runio.REPORT_FILE
    runio.write_text_atomic(out, _html(run, figs, summary))
    return out
