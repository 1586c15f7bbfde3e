"""Ensembles of runs that differ only in their mini-batch sampling: observed mean and variance of
log K and of every layer's σ₁ per step against the SDE's (what ``lipfast ensemble`` writes).

The members (``DIR/members/000``, ``001``, …, ordinary run folders) share the initialisation (``seed``),
the train/test split (``data_seed``) and every other option; member ``i`` has ``sampling_seed = s0 + i``
(``s0`` the base's batch seed). Per step ``t`` of a series ``x`` (``log K``, or a layer's σ₁):

* **observed**: mean and variance (``ddof=1``) of ``x_t`` across the members;
* **predicted from each run's own coefficients**: member ``i``'s recorded drift + Itô give its mean
  path ``x_0 + Σ_{s<t} (drift_s + ito_s)`` and its diffusion_var the variance of the accumulated noise
  (:func:`lipfast.sde.noise_variance`, under the noise model of the runs' sampling); the prediction is the
  average of both over the members;
* **predicted from the ensemble-averaged coefficients**: the same with drift, Itô and diffusion_var
  first averaged over the members.

A step whose coefficients are NaN, or a layer step flagged unexplained (``crossing``/``closure``),
advances by its observed increment, without noise, as in :mod:`lipfast.analysis`.

**Variance ratio.** Over the second half of the run (positions ``t >= T/2``), ``mean(observed var) /
mean(predicted var)``. If the SDE is right, ``(N − 1)·ratio`` is about ``χ²_{N−1}`` (the variances of
nearby steps come from the same N runs, so the second half does not add degrees of freedom), so
``[χ²_{0.025}, χ²_{0.975}]/(N − 1)`` is the 95% range of the ratio under the SDE, and
``ratio·(N − 1)/[χ²_{0.975}, χ²_{0.025}]`` the 95% interval of the true ratio.

Files in ``DIR``: ``ensemble.json`` (spec, noise model, ratios and intervals per series),
``ensemble.csv`` (step, series, observed and predicted means and variances), ``ensemble.png``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import analysis, runio, sweep
from .sde import noise_variance

__all__ = ["run_ensemble", "summarize_ensemble", "ensemble_series", "variance_ratio", "MEMBERS_DIR",
           "ENSEMBLE_FILE", "ENSEMBLE_CSV_FILE", "ENSEMBLE_FIGURE_FILE"]

MEMBERS_DIR = "members"
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_CSV_FILE = "ensemble.csv"
ENSEMBLE_FIGURE_FILE = "ensemble.png"
NETWORK = "log K"


def member_path(out: str | os.PathLike, i: int) -> Path:
    return Path(out) / MEMBERS_DIR / f"{i:03d}"


def run_ensemble(base, out: str | os.PathLike, *, runs: int, jobs: int = 1, report: bool = False,
                 overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train ``runs`` members of ``base`` differing only in ``sampling_seed`` into ``out/members/NNN``,
    then write the comparison (:func:`summarize_ensemble`) and return it.

    A member folder holding a finished run with exactly its planned options is reused; one with other
    options is an error unless ``overwrite``. ``jobs`` members train at once, one process each.

    Raises:
        ValueError: ``runs < 2``, ``jobs < 1``, ``every != 1``, or a member folder of another run.
    """
    from .train import TrainConfig, batch_seed

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ValueError(f"--runs must be an integer >= 2 (a variance needs two runs), got {runs!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    base.validate()
    if base.every != 1:
        raise ValueError(f"every must be 1 in an ensemble (the per-step variance needs every step), got {base.every}")
    out = Path(out)
    s0 = batch_seed(base)
    plan = []
    for i in range(runs):
        cfg = TrainConfig.from_mapping({**base.to_dict(), "sampling_seed": s0 + i})
        path = member_path(out, i)
        if not overwrite and runio.is_run_folder(path):
            if not sweep._same_config(path, cfg):
                raise runio.RunFolderError(f"{path} holds a run with other options than this ensemble plans; pass "
                                           "--overwrite to replace it (or choose another --out)")
            if (runio.read_summary(path) or {}).get("finished") is True:
                continue
        elif not overwrite and path.is_dir() and any(path.iterdir()):
            raise runio.RunFolderError(f"{path} is not a lipfast run folder and not empty; pass --overwrite")
        plan.append((i, cfg))
    say = log or (lambda line: None)
    if runs - len(plan):
        say(f"lipfast ensemble: reusing {runs - len(plan)} finished member(s) in {out}")
    try:
        (out / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise runio.RunWriteError(exc.errno or 5, f"lipfast: cannot create {out}: {exc.strerror or exc}") from exc
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    job_list = [dict(config=cfg.to_dict(), path=str(member_path(out, i)), report=report, overwrite=True,
                     threads=threads, silent=True) for i, cfg in plan]
    started = time.perf_counter()
    done = 0

    def finished(i: int, seconds: float) -> None:
        nonlocal done
        done += 1
        say(f"lipfast ensemble: [{done}/{len(plan)}] member {i:03d} ({seconds:.1f} s)")

    if jobs == 1 or len(plan) <= 1:
        for (i, _), job in zip(plan, job_list):
            finished(i, sweep._train_one(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(max_workers=min(jobs, len(plan)), mp_context=ctx) as pool:
            futures = {pool.submit(sweep._train_one, job): i for (i, _), job in zip(plan, job_list)}
            try:
                for f in as_completed(futures):
                    finished(futures[f], f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return summarize_ensemble(out, runs=runs, wall_seconds=time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------


def _member_series(run: runio.Run) -> dict[str, dict[str, np.ndarray]]:
    """Per series: observed values [T+1], mean increments mu [T] and diffusion_var v [T] (NaN coefficients
    or unexplained steps: the observed increment, no noise)."""
    out = {}
    layer_rows = analysis._layer_rows(run)
    net = analysis._sorted_unique(run.network)
    if net:
        all_layer = [r for rows in layer_rows.values() for r in rows]
        d, it, v, _ = analysis._network_coefficients(net, all_layer)
        x = np.append(analysis._col(net, "log_bound"), net[-1]["log_bound_next"])
        out[NETWORK] = _series(np.array([r["step"] for r in net]), x, d, it, v)
    for name, rows in layer_rows.items():
        un = analysis._unexplained(rows)
        x = np.append(analysis._col(rows, "sigma"), rows[-1]["sigma_next"])
        out[name] = _series(np.array([r["step"] for r in rows]), x, *(analysis._explained_only(rows, k, un)
                                                                      for k in ("drift", "ito", "diffusion_var")))
    return out


def _series(steps, x, drift, ito, var) -> dict[str, np.ndarray]:
    if len(steps) and not np.array_equal(steps, np.arange(steps[0], steps[0] + len(steps))):
        raise ValueError("ensemble members must record every step (every=1) without gaps")
    ok = np.isfinite(drift) & np.isfinite(ito) & np.isfinite(var)
    obs_inc = np.diff(x)
    mu = np.where(ok, drift + ito, obs_inc)
    v = np.where(ok, np.maximum(var, 0.0), 0.0)
    return {"steps": np.append(steps, steps[-1] + 1) if len(steps) else steps, "x": x, "mu": mu, "v": v}


def ensemble_series(runs: list[runio.Run], noise: str | None = None) -> tuple[dict[str, dict], dict]:
    """Observed and predicted mean and variance per step of every series (module docstring), and the
    noise model used (:func:`lipfast.analysis.noise_model` of the first member)."""
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    model = analysis.noise_model(runs[0], noise)
    kw = {} if model["noise"] == "independent" else {"noise": "epoch", "per_epoch": model["per_epoch"],
                                                     "rho": model["rho"]}
    members = [_member_series(r) for r in runs]
    names = [n for n in members[0] if all(n in m for m in members)]
    out = {}
    for name in names:
        length = min(len(m[name]["x"]) for m in members)
        if length < 2:
            continue
        X = np.stack([m[name]["x"][:length] for m in members])
        MU = np.stack([m[name]["mu"][:length - 1] for m in members])
        V = np.stack([m[name]["v"][:length - 1] for m in members])
        x0 = X[:, 0:1]
        own_mean = np.mean(x0 + np.concatenate([np.zeros((len(runs), 1)), np.cumsum(MU, axis=1)], axis=1), axis=0)
        own_var = np.mean([noise_variance(v, **kw) for v in V], axis=0)
        avg_mean = float(np.mean(x0)) + np.concatenate([[0.0], np.cumsum(MU.mean(axis=0))])
        avg_var = noise_variance(V.mean(axis=0), **kw)
        out[name] = {"steps": members[0][name]["steps"][:length], "obs_mean": X.mean(axis=0),
                     "obs_var": X.var(axis=0, ddof=1), "own_mean": own_mean, "own_var": own_var,
                     "avg_mean": avg_mean, "avg_var": avg_var, "runs": X}
    return out, model


def variance_ratio(obs_var: np.ndarray, pred_var: np.ndarray, n_runs: int, level: float = 0.95) -> dict[str, Any]:
    """Second-half variance ratio observed/predicted with its χ² range under the SDE and its interval."""
    from scipy.stats import chi2

    h = len(obs_var) // 2
    o, p = float(np.mean(obs_var[h:])), float(np.mean(pred_var[h:]))
    ratio = o / p if p > 0 else math.nan
    dof = n_runs - 1
    a = (1 - level) / 2
    q_lo, q_hi = float(chi2.ppf(a, dof)), float(chi2.ppf(1 - a, dof))
    range_if_1 = [q_lo / dof, q_hi / dof]
    interval = [ratio * dof / q_hi, ratio * dof / q_lo] if math.isfinite(ratio) else [math.nan, math.nan]
    return {"ratio": ratio, "observed_var": o, "predicted_var": p, "range_if_sde": range_if_1,
            "interval": interval, "within": bool(range_if_1[0] <= ratio <= range_if_1[1]), "level": level,
            "from_position": h}


def summarize_ensemble(out: str | os.PathLike, *, runs: int | None = None, noise: str | None = None,
                       wall_seconds: float | None = None) -> dict[str, Any]:
    """Read the members of ``out`` and write ensemble.json, ensemble.csv and ensemble.png; return the
    ensemble.json content."""
    out = Path(out)
    paths = sorted(p for p in (out / MEMBERS_DIR).iterdir() if runio.is_run_folder(p)) \
        if (out / MEMBERS_DIR).is_dir() else []
    if runs is not None:
        paths = [member_path(out, i) for i in range(runs)]
    members = [runio.load_run(p) for p in paths]
    unfinished = [p.name for p, r in zip(paths, members) if (r.summary or {}).get("finished") is not True]
    if unfinished:
        raise runio.RunFolderError(f"ensemble {out}: members {unfinished} are not finished")
    series, model = ensemble_series(members, noise)
    n = len(members)
    stats = {}
    rows = []
    for name, s in series.items():
        stats[name] = {"own": variance_ratio(s["obs_var"], s["own_var"], n),
                       "averaged": variance_ratio(s["obs_var"], s["avg_var"], n),
                       "final": {k: float(s[k][-1]) for k in ("obs_mean", "obs_var", "own_mean", "own_var",
                                                               "avg_mean", "avg_var")}}
        for t in range(len(s["steps"])):
            rows.append([int(s["steps"][t]), name] + [float(s[k][t]) for k in ("obs_mean", "obs_var", "own_mean",
                                                                                "own_var", "avg_mean", "avg_var")])
    cfg = dict(members[0].config)
    cfg.pop("sampling_seed", None)
    result = {"n_runs": n, "members": [str(p.relative_to(out)) for p in paths], "config": cfg,
              "sampling_seeds": [r.config.get("sampling_seed") for r in members], "noise_model": model,
              "series": stats, "wall_seconds": wall_seconds,
              "files": [ENSEMBLE_CSV_FILE, ENSEMBLE_FIGURE_FILE]}
    runio.write_text_atomic(out / ENSEMBLE_CSV_FILE, analysis.csv_text(
        ["step", "series", "obs_mean", "obs_var", "own_mean", "own_var", "avg_mean", "avg_var"], rows))
    runio.write_bytes_atomic(out / ENSEMBLE_FIGURE_FILE, figure_png(series, stats, model, n))
    runio.write_json_atomic(out / ENSEMBLE_FILE, result)
    return result


def figure_png(series: dict[str, dict], stats: dict, model: dict, n: int) -> bytes:
    """Top row: observed mean ± sd (blue) over the predicted mean ± sd (orange, averaged coefficients);
    bottom row: the variances per step (observed, own-coefficient and averaged-coefficient predictions)."""
    Figure, Canvas = sweep._mpl()
    names = list(series)
    fig = Figure(figsize=(3.2 * len(names), 5.0), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(2, len(names), squeeze=False)
    for j, name in enumerate(names):
        s, st = series[name], stats[name]
        t = s["steps"]
        ax = axes[0][j]
        sd_p, sd_o = np.sqrt(s["avg_var"]), np.sqrt(s["obs_var"])
        ax.fill_between(t, s["avg_mean"] - sd_p, s["avg_mean"] + sd_p, color="tab:orange", alpha=0.35, lw=0,
                        label="SDE mean ± sd")
        ax.fill_between(t, s["obs_mean"] - sd_o, s["obs_mean"] + sd_o, color="tab:blue", alpha=0.45, lw=0,
                        label=f"observed mean ± sd ({n} runs)")
        ax.plot(t, s["obs_mean"], color="tab:blue", lw=0.8)
        ax.plot(t, s["avg_mean"], color="tab:orange", lw=0.8, ls="--")
        ax.set_title(name if name == NETWORK else f"σ₁ layer {name}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax2 = axes[1][j]
        ax2.plot(t, s["obs_var"], color="tab:blue", lw=1.0, label="observed")
        ax2.plot(t, s["own_var"], color="tab:green", lw=0.9, label="SDE, own coefficients")
        ax2.plot(t, s["avg_var"], color="tab:orange", lw=0.9, ls="--", label="SDE, averaged coefficients")
        r = st["averaged"]
        ax2.set_title(f"var ratio {r['ratio']:.2f} (2nd half; 95% if SDE: {r['range_if_sde'][0]:.2f}–"
                      f"{r['range_if_sde'][1]:.2f})", fontsize=7)
        ax2.set_xlabel("step", fontsize=8)
        ax2.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    axes[1][0].set_ylabel("variance across runs", fontsize=8)
    fig.suptitle(f"{n} runs differing only in sampling; SDE noise: {model['noise']}", fontsize=9)
    return sweep._png(fig)
