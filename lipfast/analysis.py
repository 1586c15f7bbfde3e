"""From a run folder's records to trajectories (MATH.md §6): what ``lipfast simulate`` computes.

For each tracked layer, and for the network's ``log_bound``:

* **SDE band.** Euler–Maruyama paths of ``x_{t+1} = x_t + drift_t + ito_t + sqrt(diffusion_var_t) z_t``
  driven by the coefficients measured along the run (:func:`lipfast.sde.simulate_recorded`),
  started from the observed value; a mean and a quantile band per step, and the *coverage*: the
  fraction of observed values (after the start) that lie inside the band. A step whose
  coefficients are NaN (degenerate spectral gap) advances by its observed increment instead.
* **Unexplained steps.** A layer's step flagged ``crossing`` or ``closure`` (the top singular pair
  changed identity, or the realised second-order expansion missed the observed change) is not explained
  by the forces: the layer's band advances by its observed increment there (fallback), and the
  network's log bound takes that layer's observed log increment in place of its forces (the other
  layers' forces still drive the step). Every such step is counted.
* **Pathwise check.** ``Σ_t delta_pred_t`` against ``Σ_t delta_obs_t`` (= ``σ_T − σ_0`` when every
  step is tracked), the residual and relative residual, over the steps where both are finite, and the
  residual split into the part on explained steps and the part on unexplained ones, with the
  *unexplained share* ``Σ_unexplained min(|δ_obs − δ_pred|, |δ_obs|) / Σ_all |δ_obs|`` (at most 1).
* **Forces.** Cumulative drift (term i), cumulative Itô correction (term iii) and the noise scale
  ``sqrt(Σ_t diffusion_var_t)`` (term ii), their shares, and the fraction of degenerate steps.

Steps tracked every k-th step only: the records then describe steps ``0, k, 2k, ...`` and the
increments of the untracked steps in between are not measured. The simulation is therefore run
over each maximal block of *consecutive* tracked steps separately, each block anchored at the
observed value at its first step (with ``every=k>1`` every block is one step long: the band is
then a one-step-ahead band). The anchors are excluded from the coverage. A step whose
coefficients are non-finite *and* whose observed increment is non-finite too cannot be simulated:
it is left out, which splits its block the same way.

Positions in the outputs: the entry with ``step = s`` is the value *before* optimizer step ``s``
(``sigma`` of that step's record); the last entry of a block, ``step = s_last + 1``, is the value
after the block's last step (``sigma_next``).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import runio

__all__ = ["simulate_run", "write_simulation", "load_simulation", "pathwise_layer",
           "pathwise_network", "noise_model"]  # fmt: skip

METHOD_NOTE = (
    "Euler-Maruyama on x[t+1] = x[t] + drift[t] + ito[t] + sqrt(diffusion_var[t]) z[t] with the "
    "measured coefficients, one simulation per block of consecutive tracked steps, each anchored "
    "at the observed value at the block's first step; steps with NaN coefficients advance by the "
    "observed increment (fallback). Coverage: fraction of observed values after each anchor "
    "inside the [lo, hi] quantile band."
)


NOISE_NOTES = {
    "independent": "Noise model: independent z[t] (batches drawn with replacement, as the SDE assumes).",
    "epoch": "Noise model: each epoch's M batches are a permutation of the data, so the z[t] of one epoch "
             "have correlation rho = -B/(N-B) and the epoch's noise sums to zero (epochs independent).",
}


def noise_model(run: runio.Run, noise: str | None = None) -> dict[str, Any]:
    """The SDE noise model of a run: ``{"noise", "per_epoch", "rho", "note"}``.

    ``noise`` None follows the run's ``sampling`` (a run from before the option existed drew
    permutations): ``"replacement"`` -> ``"independent"``, ``"permutation"`` -> ``"epoch"`` with
    ``M = n_train // batch_size`` batches per epoch and ``rho = -B/(N - B)``. ``"independent"`` or
    ``"epoch"`` force one. Epoch noise needs ``n_train`` (summary.json) and ``M >= 2``; without them
    it falls back to independent and the note says so."""
    from .sde import NOISE_MODELS, epoch_correlation

    if noise is not None and noise not in NOISE_MODELS:
        raise ValueError(f"noise must be None or one of {list(NOISE_MODELS)}, got {noise!r}")
    sampling = (run.config or {}).get("sampling", "permutation")
    chosen = noise or ("independent" if sampling == "replacement" else "epoch")
    if chosen == "independent":
        return {"noise": "independent", "per_epoch": None, "rho": None, "note": NOISE_NOTES["independent"]}
    n_train = (run.summary or {}).get("n_train")
    batch = (run.config or {}).get("batch_size")
    per_epoch = int(n_train) // int(batch) if isinstance(n_train, int) and isinstance(batch, int) and batch else 0
    if per_epoch < 2:
        return {"noise": "independent", "per_epoch": None, "rho": None,
                "note": NOISE_NOTES["independent"] + " (epoch noise was asked for, but the run's summary has no "
                "n_train or an epoch holds fewer than 2 batches)"}
    return {"noise": "epoch", "per_epoch": per_epoch, "rho": epoch_correlation(int(batch), int(n_train)),
            "note": NOISE_NOTES["epoch"] + f" M = {per_epoch}."}


# --------------------------------------------------------------------------------------------
# Series extraction
# --------------------------------------------------------------------------------------------


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


# A layer step with one of these flags is not explained by the forces (the Tracker documents them).
UNEXPLAINED_FLAGS = frozenset({"crossing", "closure"})


def _is_unexplained(row: dict) -> bool:
    return not UNEXPLAINED_FLAGS.isdisjoint(str(row.get("flag_names") or "").split(";"))


def _unexplained(rows: list[dict]) -> np.ndarray:
    return np.array([_is_unexplained(r) for r in rows], dtype=bool)


def _explained_only(rows: list[dict], key: str, unexplained: np.ndarray) -> np.ndarray:
    """Column ``key`` with NaN on unexplained steps (the simulation then uses the observed increment)."""
    return np.where(unexplained, np.nan, _col(rows, key))


def _network_coefficients(net_rows: list[dict], layer_rows: list[dict]) -> tuple:
    """The network's (drift, ito, diffusion_var) per step with every unexplained layer step's log-space
    forces replaced by its observed log increment (deterministic, in the drift), and the number of steps
    so adjusted. A step whose adjustment is not finite falls back as a whole (NaN coefficients)."""
    drift, ito, var = _col(net_rows, "drift"), _col(net_rows, "ito"), _col(net_rows, "diffusion_var")
    index = {int(r["step"]): i for i, r in enumerate(net_rows)}
    adjusted = set()
    for r in layer_rows:
        i = index.get(int(r["step"]))
        if i is None or not _is_unexplained(r):
            continue
        adjusted.add(i)
        s, s_next = float(r["sigma"]), float(r["sigma_next"])
        d, it, v = float(r["drift"]), float(r["ito"]), float(r["diffusion_var"])
        if s > 0 and s_next > 0 and all(map(math.isfinite, (d, it, v))):
            drift[i] += math.log(s_next / s) - d / s
            ito[i] -= it / s - 0.5 * v / s**2
            var[i] = max(var[i] - v / s**2, 0.0)
        else:
            drift[i] = ito[i] = var[i] = math.nan
    return drift, ito, var, len(adjusted)


def _sorted_unique(rows: list[dict]) -> list[dict]:
    """Rows sorted by step; a step recorded twice keeps its last record."""
    by_step: dict[int, dict] = {}
    for r in rows:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def _layer_rows(run: runio.Run) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in run.layers:
        out.setdefault(r["layer"], []).append(r)
    return {name: _sorted_unique(rows) for name, rows in out.items()}


def _segments(steps: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of maximal runs of consecutive steps."""
    if len(steps) == 0:
        return []
    breaks = np.flatnonzero(np.diff(steps) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(steps)]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _finite_sum(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(x[np.isfinite(x)]))


def _share(part: float, total: float) -> float:
    return abs(part) / total if (math.isfinite(total) and total > 0) else math.nan


# --------------------------------------------------------------------------------------------
# SDE bands
# --------------------------------------------------------------------------------------------


def _check_options(n_paths: int, quantiles: Sequence[float]) -> tuple[float, float]:
    try:
        ok = not isinstance(n_paths, bool) and int(n_paths) == n_paths and n_paths >= 2
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"n_paths must be an integer >= 2, got {n_paths!r}")
    try:
        lo, hi = (float(q) for q in quantiles)
    except (TypeError, ValueError):
        raise ValueError(f"quantiles must be a pair (lo, hi), got {quantiles!r}") from None
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"quantiles must satisfy 0 < lo < hi < 1, got {quantiles!r}")
    return lo, hi


def _simulate_series(
    steps: np.ndarray,
    x: np.ndarray,
    x_next: np.ndarray,
    drift: np.ndarray,
    ito: np.ndarray,
    diffusion_var: np.ndarray,
    fallback: np.ndarray,
    *,
    n_paths: int,
    seed: int,
    quantiles: tuple[float, float],
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Band over every block of consecutive steps of one series (see the module docstring)."""
    from .sde import simulate_recorded

    # A step with a non-finite coefficient advances by its observed increment (fallback); a
    # step where that is non-finite too cannot be simulated and is left out, which splits the
    # block there (the next block is anchored at the observed value after the step).
    coef_ok = np.isfinite(drift) & np.isfinite(ito) & np.isfinite(diffusion_var)
    usable = coef_ok | np.isfinite(fallback)
    n_skipped = int((~usable).sum())
    drift = np.where(coef_ok, drift, np.nan)
    ito = np.where(coef_ok, ito, np.nan)
    diffusion_var = np.where(coef_ok, np.maximum(diffusion_var, 0.0), np.nan)
    keep = np.flatnonzero(usable)
    steps, x, x_next = steps[keep], x[keep], x_next[keep]
    drift, ito, diffusion_var, fallback = drift[keep], ito[keep], diffusion_var[keep], fallback[keep]

    pos, obs, mean, std, lo, hi, anchor = [], [], [], [], [], [], []
    n_fallback = 0
    segs = _segments(steps)
    for k, (a, b) in enumerate(segs):
        length = b - a
        seg_pos = np.concatenate([steps[a:b], [steps[b - 1] + 1]]).astype(np.int64)
        seg_obs = np.concatenate([x[a:b], [x_next[b - 1]]])
        x0 = float(x[a])
        if math.isfinite(x0):
            band = simulate_recorded(
                x0,
                drift[a:b],
                ito[a:b],
                diffusion_var[a:b],
                fallback=fallback[a:b],
                n_paths=int(n_paths),
                seed=int(seed) + k,
                quantiles=tuple(quantiles),
                **_noise_kwargs(model, int(steps[a])),
            )
            seg = [np.asarray(getattr(band, f), dtype=np.float64).reshape(-1)
                   for f in ("mean", "std", "lo", "hi")]  # fmt: skip
            n_fallback += int(getattr(band, "n_fallback", 0))
        else:  # no starting value: no band for this block
            seg = [np.full(length + 1, math.nan) for _ in range(4)]
        pos.append(seg_pos)
        obs.append(seg_obs)
        for lst, arr in zip((mean, std, lo, hi), seg):
            lst.append(arr)
        flag = np.zeros(length + 1, dtype=bool)
        flag[0] = True
        anchor.append(flag)

    def cat(parts, dtype=np.float64):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    out = {
        "steps": cat(pos, np.int64),
        "observed": cat(obs),
        "mean": cat(mean),
        "std": cat(std),
        "lo": cat(lo),
        "hi": cat(hi),
        "anchor": cat(anchor, bool),
        "n_fallback": n_fallback,
        "n_skipped": n_skipped,
        "n_segments": len(segs),
        "consecutive": len(segs) <= 1,
    }
    out["coverage"], out["n_points"] = _coverage(out)
    return out


def _noise_kwargs(model: dict[str, Any] | None, first_step: int) -> dict[str, Any]:
    if not model or model["noise"] != "epoch":
        return {}
    M = model["per_epoch"]
    return {"noise": "epoch", "per_epoch": M, "rho": model["rho"], "phase": first_step % M}


def _coverage(series: dict[str, Any]) -> tuple[float, int]:
    """Fraction of non-anchor points with a finite observation inside a finite band."""
    o, lo, hi = series["observed"], series["lo"], series["hi"]
    valid = ~series["anchor"] & np.isfinite(o) & np.isfinite(lo) & np.isfinite(hi)
    n = int(valid.sum())
    if n == 0:
        return math.nan, 0
    inside = (o[valid] >= lo[valid]) & (o[valid] <= hi[valid])
    return float(inside.mean()), n


# --------------------------------------------------------------------------------------------
# Pathwise check and forces
# --------------------------------------------------------------------------------------------


def _forces(drift: np.ndarray, ito: np.ndarray, diffusion_var: np.ndarray) -> dict[str, float]:
    cum_drift = _finite_sum(drift)
    cum_ito = _finite_sum(ito)
    sum_var = _finite_sum(np.where(diffusion_var > 0, diffusion_var, 0.0))
    noise = math.sqrt(sum_var)
    total = abs(cum_drift) + abs(cum_ito) + noise
    return {
        "cum_drift": cum_drift,
        "cum_ito": cum_ito,
        "sum_diffusion_var": sum_var,
        "noise_scale": noise,
        "share_drift": _share(cum_drift, total),
        "share_ito": _share(cum_ito, total),
        "share_noise": _share(noise, total),
    }


def pathwise_layer(rows: list[dict]) -> dict[str, Any]:
    """Pathwise check and force totals of one layer's records (any order; a repeated step keeps
    its last record).

    Returns:
        dict with ``n_steps``, ``first_step``, ``last_step``, ``consecutive``, ``sigma_start``
        (σ before the first step), ``sigma_end`` (σ after the last), ``observed_change``
        (their difference), ``sum_delta_obs``, and over the ``n_valid`` steps where
        ``delta_pred`` and ``delta_obs`` are both finite: ``sum_delta_obs_valid``,
        ``sum_delta_pred``, ``residual`` (obs − pred), ``rel_residual`` (|residual| /
        |Σ obs|); ``step_residual_rms`` and ``step_residual_max_abs`` of the per-step
        ``residual`` column; ``n_unexplained`` (steps flagged ``crossing`` or ``closure``),
        ``residual_explained`` and ``residual_unexplained`` (Σ δ_obs − δ_pred over the other steps and
        over those), ``rel_residual_explained`` (|residual_explained| / Σ |δ_obs|), ``unexplained_share`` (Σ_unexplained min(|δ_obs − δ_pred|, |δ_obs|) / Σ |δ_obs|); the forces
        ``cum_drift``, ``cum_ito``, ``cum_ito_lo``,
        ``cum_ito_hi``, ``sum_diffusion_var``, ``noise_scale`` (its square root) and their
        shares ``share_drift``/``share_ito``/``share_noise`` of |drift| + |ito| + noise;
        ``degenerate_fraction`` and ``nonfinite_fraction``. NaN where undefined.
    """
    rows = _sorted_unique(rows)
    if not rows:
        raise ValueError("pathwise_layer needs at least one record")
    steps = np.array([r["step"] for r in rows], dtype=np.int64)
    obs, pred = _col(rows, "delta_obs"), _col(rows, "delta_pred")
    valid = np.isfinite(obs) & np.isfinite(pred)
    s_obs = float(obs[valid].sum())
    s_pred = float(pred[valid].sum())
    residual = s_obs - s_pred if valid.any() else math.nan
    rel = abs(residual) / abs(s_obs) if (valid.any() and s_obs != 0) else math.nan
    res = _col(rows, "residual")
    res = res[np.isfinite(res)]
    unexplained = _unexplained(rows)
    step_err = np.where(valid, obs - pred, 0.0)
    total_moved = float(np.abs(obs[np.isfinite(obs)]).sum())
    sigma_start = float(rows[0]["sigma"])
    sigma_end = float(rows[-1]["sigma_next"])
    out = {
        "n_steps": len(rows),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "consecutive": bool(np.all(np.diff(steps) == 1)),
        "sigma_start": sigma_start,
        "sigma_end": sigma_end,
        "observed_change": sigma_end - sigma_start,
        "sum_delta_obs": _finite_sum(obs),
        "n_valid": int(valid.sum()),
        "sum_delta_obs_valid": s_obs,
        "sum_delta_pred": s_pred,
        "residual": residual,
        "rel_residual": rel,
        "step_residual_rms": float(np.sqrt(np.mean(res**2))) if res.size else math.nan,
        "step_residual_max_abs": float(np.max(np.abs(res))) if res.size else math.nan,
        "n_unexplained": int(unexplained.sum()),
        "residual_explained": float(step_err[~unexplained].sum()),
        "residual_unexplained": float(step_err[unexplained].sum()),
        # What the forces leave on the steps they are trusted on, against the whole movement.
        "rel_residual_explained": (abs(float(step_err[~unexplained].sum())) / total_moved if total_moved > 0
                                   else math.nan),
        # A step's miss counts at most its own movement: a prediction far off on a flagged step (a crossing,
        # where the expansion is meaningless) cannot leave more than all of that step unexplained.
        "unexplained_share": (float(np.minimum(np.abs(step_err), np.abs(np.nan_to_num(obs)))[unexplained].sum())
                              / total_moved if total_moved > 0
                              else math.nan),
    }
    out.update(_forces(_col(rows, "drift"), _col(rows, "ito"), _col(rows, "diffusion_var")))
    out["cum_ito_lo"] = _finite_sum(_col(rows, "ito_lo"))
    out["cum_ito_hi"] = _finite_sum(_col(rows, "ito_hi"))
    out["degenerate_fraction"] = float(np.mean([bool(r["degenerate"]) for r in rows]))
    out["nonfinite_fraction"] = float(np.mean([bool(r["nonfinite"]) for r in rows]))
    return out


def pathwise_network(rows: list[dict]) -> dict[str, Any]:
    """Totals of the network records: ``log_bound_start``/``log_bound_end``/``observed_change``,
    ``sum_delta_obs`` (Σ log_bound_next − log_bound) and the forces as in
    :func:`pathwise_layer`."""
    rows = _sorted_unique(rows)
    if not rows:
        raise ValueError("pathwise_network needs at least one record")
    steps = np.array([r["step"] for r in rows], dtype=np.int64)
    lb, lbn = _col(rows, "log_bound"), _col(rows, "log_bound_next")
    start, end = float(lb[0]), float(lbn[-1])
    out = {
        "n_steps": len(rows),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "consecutive": bool(np.all(np.diff(steps) == 1)),
        "log_bound_start": start,
        "log_bound_end": end,
        "observed_change": end - start,
        "sum_delta_obs": _finite_sum(lbn - lb),
    }
    out.update(_forces(_col(rows, "drift"), _col(rows, "ito"), _col(rows, "diffusion_var")))
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _as_run(run: runio.Run | str | os.PathLike) -> runio.Run:
    return run if isinstance(run, runio.Run) else runio.load_run(run)


def simulate_run(
    run: runio.Run | str | os.PathLike,
    *,
    n_paths: int = 4096,
    seed: int = 0,
    quantiles: Sequence[float] = (0.05, 0.95),
    noise: str | None = None,
) -> dict[str, Any]:
    """SDE bands, pathwise checks and force totals of a run (see the module docstring).

    Args:
        run: a :class:`lipfast.runio.Run` or a run folder.
        n_paths: simulated paths per block (>= 2).
        seed: base seed; block ``k`` of a series uses ``seed + k`` (every series restarts at
            ``seed``), so results are reproducible.
        quantiles: (lo, hi) of the band, 0 < lo < hi < 1.
        noise: the SDE's noise model (:func:`noise_model`): None follows the run's sampling.

    Returns:
        dict with ``n_paths``, ``seed``, ``quantiles``, ``method`` (sentences, the noise model's
        included), ``noise_model`` (:func:`noise_model`), ``layers``
        (layer name -> series), ``network`` (a series, or None without network records) and
        ``pathwise`` (``{"layers": {name: pathwise_layer(...)}, "network": ... or None}``).
        A series holds numpy arrays ``steps`` [P], ``observed``, ``mean``, ``std``, ``lo``,
        ``hi`` [P], ``anchor`` [P] (True at each block's start), and ``coverage`` (in [0, 1];
        NaN without points), ``n_points`` (points counted in the coverage), ``n_fallback``
        (steps advanced by their observed increment), ``n_skipped`` (steps left out: no usable
        coefficients nor increment), ``n_segments`` (simulated blocks), ``consecutive``.
    """
    run = _as_run(run)
    q = _check_options(n_paths, quantiles)
    model = noise_model(run, noise)
    opts = dict(n_paths=int(n_paths), seed=int(seed), quantiles=q, model=model)
    layers: dict[str, Any] = {}
    pathwise: dict[str, Any] = {"layers": {}, "network": None}
    for name, rows in _layer_rows(run).items():
        steps = np.array([r["step"] for r in rows], dtype=np.int64)
        unexplained = _unexplained(rows)
        layers[name] = _simulate_series(
            steps,
            _col(rows, "sigma"),
            _col(rows, "sigma_next"),
            _explained_only(rows, "drift", unexplained),
            _explained_only(rows, "ito", unexplained),
            _explained_only(rows, "diffusion_var", unexplained),
            _col(rows, "delta_obs"),
            **opts,
        )
        layers[name]["n_unexplained"] = int(unexplained.sum())
        pathwise["layers"][name] = pathwise_layer(rows)
    network = None
    net_rows = _sorted_unique(run.network)
    if net_rows:
        lb, lbn = _col(net_rows, "log_bound"), _col(net_rows, "log_bound_next")
        layer_rows = [r for rows in _layer_rows(run).values() for r in rows]
        drift, ito, var, n_adjusted = _network_coefficients(net_rows, layer_rows)
        network = _simulate_series(np.array([r["step"] for r in net_rows], dtype=np.int64), lb, lbn, drift, ito,
                                   var, lbn - lb, **opts)
        network["n_unexplained"] = n_adjusted
        pathwise["network"] = pathwise_network(net_rows)
    return {
        "n_paths": int(n_paths),
        "seed": int(seed),
        "quantiles": list(q),
        "method": METHOD_NOTE + " " + model["note"],
        "noise_model": model,
        "layers": layers,
        "network": network,
        "pathwise": pathwise,
    }


def _series_summary(series: dict[str, Any]) -> dict[str, Any]:
    last = len(series["steps"]) - 1
    final = (
        {k: float(series[k][last]) for k in ("observed", "mean", "lo", "hi")} if last >= 0 else {}
    )
    if last >= 0:
        final["step"] = int(series["steps"][last])
    return {
        "coverage": series["coverage"],
        "n_points": series["n_points"],
        "n_fallback": series["n_fallback"],
        "n_unexplained": series.get("n_unexplained", 0),
        "n_skipped": series["n_skipped"],
        "n_segments": series["n_segments"],
        "consecutive": series["consecutive"],
        "final": final,
    }


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """CSV text with a header; floats written with repr (they read back bit-identical)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])
    return buf.getvalue()


def write_simulation(
    run_dir: str | os.PathLike,
    *,
    n_paths: int = 4096,
    seed: int = 0,
    quantiles: Sequence[float] = (0.05, 0.95),
    noise: str | None = None,
) -> dict[str, Any]:
    """Run :func:`simulate_run` on a run folder and store the results in it: sde_layers.csv
    (step, layer, observed, mean, lo, hi), sde_network.csv (step, observed, mean, lo, hi), and
    the ``"sde"`` and ``"pathwise"`` keys of summary.json (coverage per layer and for the
    network, n_paths, seed, quantiles, the noise model, residuals, forces). Every file is written
    atomically.

    Returns:
        The :func:`simulate_run` result.
    """
    run = runio.load_run(run_dir)
    sim = simulate_run(run, n_paths=n_paths, seed=seed, quantiles=quantiles, noise=noise)
    path = run.path
    cols = ("steps", "observed", "mean", "lo", "hi")
    layer_rows = []
    for name, s in sim["layers"].items():
        for i in range(len(s["steps"])):
            layer_rows.append([int(s["steps"][i]), name] + [float(s[c][i]) for c in cols[1:]])
    runio.write_text_atomic(
        path / runio.SDE_LAYERS_FILE,
        csv_text(["step", "layer", "observed", "mean", "lo", "hi"], layer_rows),
    )
    net_rows = []
    if sim["network"] is not None:
        s = sim["network"]
        for i in range(len(s["steps"])):
            net_rows.append([int(s["steps"][i])] + [float(s[c][i]) for c in cols[1:]])
    runio.write_text_atomic(
        path / runio.SDE_NETWORK_FILE,
        csv_text(["step", "observed", "mean", "lo", "hi"], net_rows),
    )
    sde = {
        "n_paths": sim["n_paths"],
        "seed": sim["seed"],
        "quantiles": sim["quantiles"],
        "method": sim["method"],
        "noise_model": sim["noise_model"],
        "layers": {name: _series_summary(s) for name, s in sim["layers"].items()},
        "network": _series_summary(sim["network"]) if sim["network"] is not None else None,
    }
    runio.update_summary(path, {"sde": sde, "pathwise": sim["pathwise"]})
    return sim


def load_simulation(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """sde_layers.csv and sde_network.csv read back as ``{"layers": {name: series},
    "network": series or None}`` (series: numpy arrays ``steps``, ``observed``, ``mean``,
    ``lo``, ``hi``), or None when either file is missing or unreadable."""
    path = Path(run_dir)
    try:
        lt = (path / runio.SDE_LAYERS_FILE).read_text(encoding="utf-8")
        nt = (path / runio.SDE_NETWORK_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        lrows = list(csv.reader(io.StringIO(lt)))
        nrows = list(csv.reader(io.StringIO(nt)))
        if lrows[:1] != [["step", "layer", "observed", "mean", "lo", "hi"]] or nrows[:1] != [
            ["step", "observed", "mean", "lo", "hi"]
        ]:
            return None
        grouped: dict[str, list[list[str]]] = {}
        for r in lrows[1:]:
            grouped.setdefault(r[1], []).append(r)

        def series(rows: list[list[str]], off: int) -> dict[str, np.ndarray]:
            out = {"steps": np.array([int(r[0]) for r in rows], dtype=np.int64)}
            for j, c in enumerate(("observed", "mean", "lo", "hi")):
                out[c] = np.array([float(r[off + j]) for r in rows], dtype=np.float64)
            return out

        layers = {name: series(rows, 2) for name, rows in grouped.items()}
        network = series(nrows[1:], 1) if len(nrows) > 1 else None
    except (ValueError, IndexError):
        return None
    return {"layers": layers, "network": network}
