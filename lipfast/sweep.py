"""Several tracked runs over one factor and their comparison: what ``lipfast sweep`` does.

A sweep varies one option of :class:`lipfast.train.TrainConfig` (one of :data:`FACTORS`) over a list of
values, repeats each value over ``seeds`` replicates, trains every run into a normal run folder, and
compares them::

    DIR/sweep.json                          what was run: factor, values, seeds, base options, runs, wall time
    DIR/<factor>=<value>/seed=<seed>/       one run folder per (value, replicate), as `lipfast train` writes
    DIR/sweep_runs.csv                      one row per (run, quantity, layer): the numbers of each run
    DIR/sweep_table.csv                     one row per (value, quantity, layer): n, mean, std, min, max
    DIR/sweep_table.md                      the same as Markdown tables (mean ± std over seeds)
    DIR/figures/*.png                       one comparison figure per quantity (:data:`FIGURES`)

Replicates. For every factor but ``data_seed``, replicate ``r`` (``0 <= r < seeds``) is an independent
repetition: ``seed``, ``data_seed`` and ``noise_seed`` are the base options plus ``r`` (the same at every
value, so values are compared on paired seeds). For ``data_seed`` the values *are* the data-order seeds and
the initialisation (``seed``) and label noise (``noise_seed``) stay fixed: the runs differ only in their
sampling trajectory (note that ``data_seed`` also seeds the train/test split; with a small
``test_fraction`` the training sets of different data seeds nearly coincide). Without values,
``data_seed`` runs ``seeds`` data seeds ``base.data_seed + r``.

Quantities (per run; the network row uses the log-space terms of MATH.md §3, a layer row its σ₁):
:data:`NETWORK_QUANTITIES` and :data:`LAYER_QUANTITIES`. A data-seed sweep also compares the spread of
the runs with the SDE band simulated from the first run's coefficients (:func:`spread_analysis`).

Plain functions: :func:`parse_values`, :func:`plan_sweep`, :func:`run_sweep`, :func:`summarize_sweep`,
:func:`run_quantities`, :func:`spread_analysis`, :func:`loglog_slope`.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import analysis, runio

__all__ = [
    "FACTORS",
    "NETWORK_QUANTITIES",
    "LAYER_QUANTITIES",
    "FIGURES",
    "PlannedRun",
    "parse_values",
    "plan_sweep",
    "run_sweep",
    "summarize_sweep",
    "load_sweep",
    "run_quantities",
    "run_trajectories",
    "spread_analysis",
    "loglog_slope",
]

FACTORS: tuple[str, ...] = ("label_noise", "batch_size", "init_scale", "data_seed", "weight_decay", "optimizer")
"""The options a sweep can vary."""

SWEEP_FILE = "sweep.json"
RUNS_FILE = "sweep_runs.csv"
TABLE_FILE = "sweep_table.csv"
TABLE_MD_FILE = "sweep_table.md"
FIGURES_DIR = "figures"
NETWORK = "network"  # the `layer` of the network's quantities

# quantity -> description (Markdown-safe)
NETWORK_QUANTITIES: dict[str, str] = {
    "initial_log_bound": "log K = Σ log σ_ℓ before the first step",
    "final_log_bound": "log K after the last step",
    "peak_log_bound": "largest log K along the run",
    "log_bound_change": "final − initial log K",
    "cum_drift": "Σ_t drift of log K (Σ_ℓ (i)/σ_ℓ)",
    "cum_ito": "Σ_t Itô term of log K (Σ_ℓ (iii)/σ_ℓ − ½(ii)/σ_ℓ²)",
    "sum_diffusion_var": "Σ_t diffusion variance of log K (Σ_ℓ (ii)/σ_ℓ²)",
    "mean_ito": "mean per-step Itô term of log K",
    "mean_diffusion_var": "mean per-step diffusion variance of log K",
    "coverage": "fraction of the observed log K inside the run's own SDE 5–95% band",
    "train_loss": "final training loss (full train set, noisy labels)",
    "train_acc": "final training accuracy (noisy labels)",
    "test_acc": "final test accuracy",
}
LAYER_QUANTITIES: dict[str, str] = {
    "sigma_initial": "σ₁ before the first step",
    "sigma_final": "σ₁ after the last step",
    "sigma_peak": "largest σ₁ along the run",
    "cum_drift": "Σ_t drift (i) (gradient flow, plus −ηλσ with weight decay)",
    "cum_ito": "Σ_t Itô term (iii)",
    "sum_diffusion_var": "Σ_t diffusion variance (ii)",
    "mean_ito": "mean per-step Itô term (iii)",
    "mean_diffusion_var": "mean per-step diffusion variance (ii)",
    "pathwise_rel_residual": "|Σ δ_obs − Σ δ_pred| / |Σ δ_obs| over the non-degenerate steps",
    "coverage": "fraction of the observed σ₁ inside the run's own SDE 5–95% band",
    "degenerate_fraction": "fraction of steps flagged degenerate (gap or step too large)",
    "reliable_from": "first step after the last degenerate one (0: none flagged)",
}

# file name -> (trajectory key, y label, title)
_TRAJECTORY_FIGURES = {
    "log_bound.png": ("value", "log K", "network bound log K = Σ log σ_ℓ"),
    "sigma.png": ("value", "σ₁", "σ₁ per layer"),
    "cum_drift.png": ("cum_drift", "Σ drift", "cumulative drift (i)"),
    "cum_ito.png": ("cum_ito", "Σ Itô", "cumulative Itô term (iii)"),
    "cum_diffusion.png": ("cum_diffusion_var", "Σ diffusion var", "cumulative diffusion variance (ii)"),
}
FIGURES: tuple[str, ...] = tuple(_TRAJECTORY_FIGURES) + ("final_log_bound.png", "pathwise.png", "coverage.png")
"""Figures every sweep writes (a data-seed sweep adds ``spread.png``)."""

_INT_FACTORS = frozenset({"batch_size", "data_seed"})
_FACTOR_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "label_noise": (lambda v: 0 <= v < 1, "numbers in [0, 1)"),
    "batch_size": (lambda v: v >= 2, "integers >= 2 (the noise terms need two samples)"),
    "init_scale": (lambda v: v > 0, "numbers > 0"),
    "data_seed": (lambda v: v >= 0, "integers >= 0"),
    "weight_decay": (lambda v: v >= 0, "numbers >= 0"),
}


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def _check_factor(factor: str) -> None:
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; expected one of {', '.join(FACTORS)}")


def parse_values(factor: str, values: Sequence[Any] | None, *, seeds: int = 1,
                 base_data_seed: int = 0) -> list:
    """The factor's values, typed and checked.

    Args:
        factor: one of :data:`FACTORS`.
        values: numbers, or strings as typed on the command line; ``None`` only for ``data_seed``,
            whose values are then ``base_data_seed + r`` for ``r < seeds``.
        seeds: replicates per value (>= 1). For ``data_seed`` the values are the replicates: give
            values or ``seeds``, not both.
        base_data_seed: first data seed when ``data_seed`` values are omitted.

    Returns:
        A list of ints (``batch_size``, ``data_seed``) or floats, in the order given.

    Raises:
        ValueError: unknown factor, a value of the wrong type or range, duplicates, missing values,
            ``seeds < 1`` (every message names the offending value).
    """
    _check_factor(factor)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if factor == "data_seed":
        if values is None or len(values) == 0:
            return [base_data_seed + r for r in range(seeds)]
        if seeds > 1:
            raise ValueError("with --factor data_seed the values are the data-order seeds (the "
                             f"initialisation is fixed): give --values or --seeds, not both (got --seeds {seeds})")
    elif values is None or len(values) == 0:
        raise ValueError(f"--values is required for --factor {factor}")
    if factor == "optimizer":  # categorical: names, compared on the same seeds
        return _parse_names(values)
    ok, expected = _FACTOR_RULES[factor]
    out: list = []
    for raw in values:
        v = _parse_number(raw, integer=factor in _INT_FACTORS)
        if v is None or not ok(v):
            raise ValueError(f"--values for {factor} must be {expected}, got {raw!r}")
        if v in out:
            raise ValueError(f"--values for {factor} has {raw!r} twice")
        out.append(v)
    return out


def _parse_names(values: Sequence[Any]) -> list[str]:
    from .train import OPTIMIZERS

    out: list[str] = []
    for raw in values:
        if raw not in OPTIMIZERS:
            raise ValueError(f"--values for optimizer must be names among {', '.join(OPTIMIZERS)}, got {raw!r}")
        if raw in out:
            raise ValueError(f"--values for optimizer has {raw!r} twice")
        out.append(raw)
    return out


def _parse_number(raw: Any, *, integer: bool) -> int | float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float, np.integer, np.floating)):
        v = raw
    else:
        try:
            v = float(str(raw).strip())
        except ValueError:
            return None
    v = float(v)
    if not math.isfinite(v):
        return None
    if integer:
        return int(v) if v == int(v) else None
    return v


def _fmt_value(v: int | float | str) -> str:
    return str(v) if isinstance(v, (int, str)) else format(v, "g")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep.

    Attributes:
        value: the factor's value.
        replicate: index of the replicate, ``0 <= replicate < seeds`` (0 for data-seed sweeps).
        config: the run's complete options.
        rel_path: the run folder relative to the sweep folder (``<factor>=<value>/seed=<seed>``).
    """

    value: int | float
    replicate: int
    config: Any  # TrainConfig
    rel_path: str


def plan_sweep(factor: str, values: Sequence, base, seeds: int = 1) -> list[PlannedRun]:
    """The runs of a sweep, values outermost, each config validated.

    Args:
        factor: one of :data:`FACTORS`.
        values: as returned by :func:`parse_values`.
        base: the :class:`lipfast.train.TrainConfig` every run starts from.
        seeds: replicates per value (ignored for ``data_seed``: one run per value).

    Raises:
        ValueError: a run's options are invalid (the message names the option).
    """
    from .train import TrainConfig

    _check_factor(factor)
    base_d = base.to_dict()
    runs = []
    reps = 1 if factor == "data_seed" else seeds
    for v in values:
        for r in range(reps):
            d = dict(base_d)
            d[factor] = v
            if factor != "data_seed":
                d["seed"] = base.seed + r
                d["data_seed"] = base.data_seed + r
                d["noise_seed"] = base.noise_seed + r
            cfg = TrainConfig.from_mapping(d, where=f"{factor}={_fmt_value(v)}")
            runs.append(PlannedRun(v, r, cfg, f"{factor}={_fmt_value(v)}/seed={cfg.seed}"))
    return runs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _config_json(cfg) -> dict:
    return json.loads(json.dumps(runio._jsonable(cfg.to_dict(), "config")))


def _train_one(job: dict) -> float:
    """Train one run of a sweep (in this process or a worker); returns its wall time in seconds."""
    from .train import TrainConfig, train

    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    started = time.perf_counter()
    cfg = TrainConfig.from_mapping(job["config"], where=job["path"])
    path = Path(job["path"])
    if job.get("silent"):  # train's own log lines (every eval_every steps) would interleave across runs
        import contextlib

        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            train(cfg, path, overwrite=job["overwrite"], quiet=True, report=False)
    else:
        train(cfg, path, overwrite=job["overwrite"], quiet=True, report=False)
    analysis.write_simulation(path, n_paths=cfg.sde_paths, seed=cfg.sde_seed)
    if job["report"]:
        from . import report as reporting

        reporting.make_report(path, n_paths=cfg.sde_paths, seed=cfg.sde_seed)
    return time.perf_counter() - started


def _check_data(plan: list[PlannedRun]) -> None:
    """Fail before any run if the dataset cannot be loaded or a batch is larger than the train set."""
    from . import data as datasets

    cfg = plan[0].config
    ds = datasets.load_dataset(cfg.dataset, root=cfg.data_root, test_fraction=cfg.test_fraction,
                               seed=cfg.data_seed, n_samples=cfg.n_samples)
    biggest = max(plan, key=lambda p: p.config.batch_size).config.batch_size
    if biggest > ds.n_train:
        raise ValueError(f"batch_size must be <= the {ds.n_train} training samples of {cfg.dataset}, "
                         f"got {biggest}")


def run_sweep(factor: str, values: Sequence | None, base, out: str | os.PathLike, *, seeds: int = 1,
              jobs: int = 1, report: bool = True, overwrite: bool = False,
              log: Callable[[str], None] | None = None) -> dict:
    """Train every run of the grid into ``out`` and write the comparison (:func:`summarize_sweep`).

    A run folder that already holds a finished run with exactly the planned options is reused (so an
    interrupted sweep continues where it stopped); one holding a run with other options is an error
    unless ``overwrite``, which retrains every run.

    Args:
        factor: one of :data:`FACTORS`.
        values: the values (strings or numbers; see :func:`parse_values`), or None for ``data_seed``.
        base: the :class:`lipfast.train.TrainConfig` every run starts from.
        out: the sweep folder (created).
        seeds: replicates per value (see the module docstring for ``data_seed``).
        jobs: runs trained at once, each in its own process (``torch`` threads split between them).
        report: also write each run's figures and report.html.
        overwrite: retrain runs that are already there.
        log: called with one line per finished run (e.g. ``print``); None: silent.

    Returns:
        The summary dict of :func:`summarize_sweep`.

    Raises:
        ValueError: bad factor, values, seeds or jobs; a run folder with other options.
        RunFolderError, RunWriteError, DatasetUnavailable: as ``lipfast train``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    values = parse_values(factor, values, seeds=seeds, base_data_seed=base.data_seed)
    plan = plan_sweep(factor, values, base, seeds)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise runio.RunFolderError(f"sweep folder {out} exists and is not a folder")
    todo = []
    for p in plan:
        path = out / p.rel_path
        if overwrite:
            todo.append(p)
        elif runio.is_run_folder(path):
            if not _same_config(path, p.config):
                raise runio.RunFolderError(
                    f"{path} holds a run with other options than this sweep plans; pass --overwrite to "
                    "replace it (or choose another --out)")
            if (runio.read_summary(path) or {}).get("finished") is not True:
                todo.append(p)  # an interrupted run of the same options: train it again
        elif path.is_dir() and any(path.iterdir()):
            raise runio.RunFolderError(f"{path} is not a lipfast run folder and not empty; pass --overwrite to "
                                       "write the run there anyway (lipfast's own files only are replaced)")
        else:
            todo.append(p)
    if todo:
        _check_data(todo)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise runio.RunWriteError(exc.errno or 5, f"lipfast: cannot create {out}: {exc.strerror or exc}") from exc
    spec = _spec(factor, values, seeds, base, plan)
    runio.write_json_atomic(out / SWEEP_FILE, {**spec, "finished": False})
    say = log or (lambda line: None)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    reused = len(plan) - len(todo)
    if reused:
        say(f"lipfast sweep: reusing {reused} finished run(s) in {out}")
    n = len(todo)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    job_list = [dict(config=p.config.to_dict(), path=str(out / p.rel_path), report=report,
                     overwrite=True, threads=threads, silent=log is None or jobs > 1) for p in todo]
    if jobs == 1 or n <= 1:
        for i, (p, job) in enumerate(zip(todo, job_list), 1):
            seconds[p.rel_path] = _train_one(job)
            say(_done_line(i, n, p, out, seconds[p.rel_path]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(max_workers=min(jobs, n), mp_context=ctx) as pool:
            futures = {pool.submit(_train_one, job): p for p, job in zip(todo, job_list)}
            try:
                for i, f in enumerate(as_completed(futures), 1):
                    p = futures[f]
                    seconds[p.rel_path] = f.result()  # re-raises a run's error
                    say(_done_line(i, n, p, out, seconds[p.rel_path]))
            except BaseException:
                for f in futures:
                    f.cancel()  # runs not started yet; the running ones finish (their folders stay resumable)
                raise
    wall = time.perf_counter() - started
    runio.write_json_atomic(out / SWEEP_FILE, {**spec, "finished": True, "wall_seconds": wall,
                                               "jobs": jobs, "run_seconds": seconds})
    return summarize_sweep(out)


def _same_config(path: Path, cfg) -> bool:
    """Whether the run in ``path`` was started with ``cfg``'s options. An option the stored config lacks
    (a run from a lipfast that did not have it yet) counts as equal when ``cfg`` has its default value."""
    from .train import TrainConfig

    try:
        stored = json.loads((path / runio.CONFIG_FILE).read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(stored, dict):
        return False
    planned = _config_json(cfg)
    defaults = _config_json(TrainConfig())
    return all(stored[k] == v if k in stored else v == defaults.get(k) for k, v in planned.items())


def _done_line(i: int, n: int, p: PlannedRun, out: Path, seconds: float) -> str:
    summary = runio.read_summary(out / p.rel_path) or {}
    pw = (summary.get("pathwise") or {}).get("network") or {}
    lb = pw.get("log_bound_end")
    tail = f", final log K {lb:.4g}" if isinstance(lb, (int, float)) else ""
    return f"lipfast sweep: [{i}/{n}] {p.rel_path} done in {seconds:.1f} s{tail}"


def _spec(factor: str, values: list, seeds: int, base, plan: list[PlannedRun]) -> dict:
    return {
        "schema_version": 1,
        "factor": factor,
        "values": list(values),
        "seeds": 1 if factor == "data_seed" else seeds,
        "base_config": base.to_dict(),
        "runs": [{"value": p.value, "replicate": p.replicate, "seed": p.config.seed,
                  "data_seed": p.config.data_seed, "noise_seed": p.config.noise_seed, "path": p.rel_path}
                 for p in plan],
        "lipfast_version": runio._lipfast_version(),
        "created": runio._now(),
    }


def load_sweep(out: str | os.PathLike) -> dict:
    """sweep.json of a sweep folder.

    Raises:
        RunFolderError: no readable sweep.json there.
    """
    path = Path(out) / SWEEP_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise runio.RunFolderError(f"{Path(out)} is not a lipfast sweep folder (no readable {SWEEP_FILE}: "
                                   f"{getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(spec, dict) or spec.get("factor") not in FACTORS or not isinstance(spec.get("runs"), list):
        raise runio.RunFolderError(f"{path} is not a sweep description")
    return spec


# --------------------------------------------------------------------------------------------
# Per-run numbers and trajectories
# --------------------------------------------------------------------------------------------


def _sorted_rows(rows: list[dict]) -> list[dict]:
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


def _fin(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


def _finite_mean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _layer_groups(run: runio.Run) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in run.layers:
        groups.setdefault(r["layer"], []).append(r)
    return {name: _sorted_rows(rows) for name, rows in groups.items()}


def run_quantities(run: runio.Run | str | os.PathLike) -> dict[tuple[str, str], float]:
    """The numbers a sweep compares, for one run folder.

    Returns:
        ``{(quantity, layer): value}`` with ``layer == "network"`` for :data:`NETWORK_QUANTITIES` and a
        layer name for :data:`LAYER_QUANTITIES`; NaN where undefined. The forces, residuals and
        coverages are those of :func:`lipfast.analysis.pathwise_layer` / ``pathwise_network`` and of
        the run's ``summary.json`` (``lipfast simulate``).
    """
    run = run if isinstance(run, runio.Run) else runio.load_run(run)
    summary = run.summary or {}
    sde = summary.get("sde") or {}
    out: dict[tuple[str, str], float] = {}
    net = _sorted_rows(run.network)
    if net:
        lb, lbn = _col(net, "log_bound"), _col(net, "log_bound_next")
        traj = np.concatenate([lb, lbn[-1:]])
        pw = analysis.pathwise_network(net)
        n_cov = (sde.get("network") or {}).get("coverage")
        values = {
            "initial_log_bound": float(lb[0]),
            "final_log_bound": float(lbn[-1]),
            "peak_log_bound": float(np.nanmax(traj)) if np.isfinite(traj).any() else math.nan,
            "log_bound_change": float(lbn[-1] - lb[0]),
            "cum_drift": pw["cum_drift"],
            "cum_ito": pw["cum_ito"],
            "sum_diffusion_var": pw["sum_diffusion_var"],
            "mean_ito": _finite_mean(_col(net, "ito")),
            "mean_diffusion_var": _finite_mean(_col(net, "diffusion_var")),
            "coverage": _num(n_cov),
        }
    else:
        values = {q: math.nan for q in NETWORK_QUANTITIES}
    for key in ("train_loss", "train_acc", "test_acc"):
        values[key] = _num(summary.get(key))
    for q in NETWORK_QUANTITIES:
        out[(q, NETWORK)] = values.get(q, math.nan)
    for name, rows in _layer_groups(run).items():
        pw = analysis.pathwise_layer(rows)
        sig = np.concatenate([_col(rows, "sigma"), _col(rows, "sigma_next")[-1:]])
        deg = np.array([bool(r["degenerate"]) for r in rows])
        steps = np.array([r["step"] for r in rows])
        cov = ((sde.get("layers") or {}).get(name) or {}).get("coverage")
        lv = {
            "sigma_initial": pw["sigma_start"],
            "sigma_final": pw["sigma_end"],
            "sigma_peak": float(np.nanmax(sig)) if np.isfinite(sig).any() else math.nan,
            "cum_drift": pw["cum_drift"],
            "cum_ito": pw["cum_ito"],
            "sum_diffusion_var": pw["sum_diffusion_var"],
            "mean_ito": _finite_mean(_col(rows, "ito")),
            "mean_diffusion_var": _finite_mean(_col(rows, "diffusion_var")),
            "pathwise_rel_residual": pw["rel_residual"],
            "coverage": _num(cov),
            "degenerate_fraction": pw["degenerate_fraction"],
            "reliable_from": float(steps[deg].max() + 1) if deg.any() else 0.0,
        }
        for q in LAYER_QUANTITIES:
            out[(q, name)] = lv[q]
    return out


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def run_trajectories(run: runio.Run | str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Per-step trajectories of one run: ``{"network" or layer: {"steps", "value", "cum_drift",
    "cum_ito", "cum_diffusion_var"}}``, each ``[T+1]`` (index 0 before the first step; ``value`` is
    log K for the network and σ₁ for a layer; the sums treat degenerate steps as 0)."""
    run = run if isinstance(run, runio.Run) else runio.load_run(run)
    out: dict[str, dict[str, np.ndarray]] = {}

    def build(rows, x, x_next) -> dict[str, np.ndarray]:
        steps = np.array([r["step"] for r in rows], dtype=np.float64)
        z = np.zeros(1)
        return {
            "steps": np.concatenate([steps, steps[-1:] + 1]),
            "value": np.concatenate([_col(rows, x), _col(rows, x_next)[-1:]]),
            "cum_drift": np.concatenate([z, np.cumsum(_fin(_col(rows, "drift")))]),
            "cum_ito": np.concatenate([z, np.cumsum(_fin(_col(rows, "ito")))]),
            "cum_diffusion_var": np.concatenate([z, np.cumsum(np.maximum(_fin(_col(rows, "diffusion_var")), 0))]),
        }

    net = _sorted_rows(run.network)
    if net:
        out[NETWORK] = build(net, "log_bound", "log_bound_next")
    for name, rows in _layer_groups(run).items():
        out[name] = build(rows, "sigma", "sigma_next")
    return out


# --------------------------------------------------------------------------------------------
# Statistics across runs
# --------------------------------------------------------------------------------------------


def _stats(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": n, "mean": float(a.mean()), "std": float(a.std(ddof=1)) if n > 1 else math.nan,
            "min": float(a.min()), "max": float(a.max())}


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares fit ``log y = a + b log x`` over the pairs with finite positive x and y.

    Returns:
        ``{"exponent": b, "stderr": standard error of b, "r2": coefficient of determination,
        "n": points used}`` (NaN with fewer than 2 points; stderr NaN with fewer than 3).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = int(ok.sum())
    if n < 2 or np.ptp(lx) == 0:
        return {"exponent": math.nan, "stderr": math.nan, "r2": math.nan, "n": n}
    b, a = np.polyfit(lx, ly, 1)
    resid = ly - (a + b * lx)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    se = math.sqrt(float((resid**2).sum()) / (n - 2) / float(((lx - lx.mean()) ** 2).sum())) if n > 2 else math.nan
    return {"exponent": float(b), "stderr": se, "r2": r2, "n": n}


def spread_analysis(run_dirs: Sequence[str | os.PathLike], *, n_paths: int = 4096, seed: int = 0,
                    quantiles: Sequence[float] = (0.05, 0.95)) -> dict[str, Any]:
    """Runs that differ only in their data order, against the SDE band of the first run (MATH.md §6).

    The band is simulated from the first run's recorded coefficients and anchored at its start (the
    runs share the initialisation). For the network's log K and each layer's σ₁:

    * ``coverage_others``: fraction of the other runs' values (all steps after the start) inside the
      band. The band's centre is the first run's own path, which already carries one realisation of
      the noise, so if the SDE is right another run deviates from it by √2 times the SDE's spread:
      the expected coverage of a 5–95% band is then ``P(|Z| < 1.645/√2) ≈ 0.755``
      (``expected_coverage_others``);
    * ``coverage_centred``: the same band shape moved onto the across-run mean at each step, all runs
      counted (about the band's nominal mass if the spread is right);
    * ``std_observed`` / ``std_sde``: across-run standard deviation and the SDE's at the last step, and
      their ``ratio``; ``ratio_median`` over the second half of the run;
    * ``std_epochs`` / ``ratio_epochs``: the SDE's independent increments assume batches drawn with
      replacement, but the runs draw each epoch as a permutation, so at fixed weights the batch noises of
      an epoch sum to zero (pairwise covariance −v/(M−1) for M batches per epoch) and after k batches of
      an epoch the accumulated noise has variance v·k(M−k)/(M−1) instead of k·v. ``std_epochs`` is that
      prediction (v = the first run's (ii) averaged over each epoch) at the last step, and
      ``ratio_epochs`` the RMS of the observed across-run standard deviation over the second half of the
      run divided by the RMS of this prediction (``ratio_rms`` the same against the plain SDE).

    Args:
        run_dirs: two or more run folders with the same steps (every step tracked).
        n_paths, seed, quantiles: of the SDE simulation.

    Returns:
        ``{"reference": first run, "n_runs", "quantiles", "expected_coverage_others",
        "series": {name: {...}}, "paths": {name: {"steps", "runs" [R, P], "mean", "lo", "hi",
        "std"}}}`` (``paths`` holds numpy arrays for plotting).
    """
    from statistics import NormalDist

    if len(run_dirs) < 2:
        raise ValueError(f"spread_analysis needs at least 2 runs, got {len(run_dirs)}")
    runs = [runio.load_run(d) for d in run_dirs]
    # The band is the SDE's with independent batches; std_epochs below is the epoch-sampling model.
    sim = analysis.simulate_run(runs[0], n_paths=n_paths, seed=seed, quantiles=quantiles, noise="independent")
    trajs = [run_trajectories(r) for r in runs]
    n_train = (runs[0].summary or {}).get("n_train")
    batch = runs[0].config.get("batch_size")
    per_epoch = int(n_train) // int(batch) if n_train and batch else 0
    q_lo, q_hi = sim["quantiles"]
    z = NormalDist().inv_cdf(q_hi)
    mass = q_hi - q_lo
    expected = 2 * NormalDist().cdf(z / math.sqrt(2)) - 1 if abs(q_lo - (1 - q_hi)) < 1e-12 else math.nan
    series_out: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    names = [NETWORK] + [n for n in sim["layers"]]
    for name in names:
        band = sim["network"] if name == NETWORK else sim["layers"].get(name)
        if band is None or not band["consecutive"] or any(name not in t for t in trajs):
            continue
        length = min(len(band["steps"]), *(len(t[name]["value"]) for t in trajs))
        obs = np.stack([t[name]["value"][:length] for t in trajs])  # [R, P]
        lo, hi, mean, std = (np.asarray(band[k][:length]) for k in ("lo", "hi", "mean", "std"))
        after = np.arange(length) > 0
        others = obs[1:, after]
        inside = (others >= lo[after]) & (others <= hi[after])
        ens = obs.mean(axis=0)
        c_lo, c_hi = ens + (lo - mean), ens + (hi - mean)
        inside_c = (obs[:, after] >= c_lo[after]) & (obs[:, after] <= c_hi[after])
        sd_obs = obs.std(axis=0, ddof=1)
        half = slice(length // 2, length)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_t = np.where(std > 0, sd_obs / std, np.nan)
        var = np.maximum(np.nan_to_num(_diffusion_series(runs[0], name)[: length - 1]), 0.0)
        std_ep = _epoch_std(var, per_epoch) if per_epoch >= 2 else np.full(length, math.nan)
        rms = lambda a: float(np.sqrt(np.nanmean(a[half] ** 2)))  # noqa: E731
        series_out[name] = {
            "coverage_others": float(inside.mean()) if inside.size else math.nan,
            "coverage_centred": float(inside_c.mean()) if inside_c.size else math.nan,
            "std_observed": float(sd_obs[-1]),
            "std_sde": float(std[-1]),
            "ratio": float(sd_obs[-1] / std[-1]) if std[-1] > 0 else math.nan,
            "ratio_median": float(np.nanmedian(ratio_t[half])) if np.isfinite(ratio_t[half]).any() else math.nan,
            "ratio_rms": rms(sd_obs) / rms(std) if rms(std) > 0 else math.nan,
            "std_epochs": float(std_ep[-1]),
            "ratio_epochs": rms(sd_obs) / rms(std_ep) if rms(std_ep) > 0 else math.nan,
            "steps_per_epoch": per_epoch,
            "n_points": int(inside.size),
        }
        paths[name] = {"steps": trajs[0][name]["steps"][:length], "runs": obs, "mean": mean, "lo": lo,
                       "hi": hi, "std": std, "std_observed": sd_obs, "std_epochs": std_ep}
    return {"reference": str(runs[0].path), "n_runs": len(runs), "quantiles": [q_lo, q_hi],
            "band_mass": mass, "expected_coverage_others": expected, "series": series_out, "paths": paths}


def _diffusion_series(run: runio.Run, name: str) -> np.ndarray:
    rows = _sorted_rows(run.network) if name == NETWORK else _layer_groups(run)[name]
    return _col(rows, "diffusion_var")


def _epoch_std(var: np.ndarray, per_epoch: int) -> np.ndarray:
    """[T+1] standard deviation of the noise accumulated since the start when each epoch's M batches are a
    permutation of the data: v̄_e·k(M−k)/(M−1) after k batches of epoch e (earlier epochs sum to zero)."""
    T = len(var)
    out = np.zeros(T + 1)
    M = per_epoch
    for t in range(1, T + 1):
        e, k = divmod(t, M)
        seg = var[e * M: min((e + 1) * M, T)] if k else var[(e - 1) * M: e * M]
        vbar = float(seg.mean()) if seg.size else 0.0
        out[t] = math.sqrt(vbar * k * (M - k) / (M - 1)) if k else 0.0
    return out


# --------------------------------------------------------------------------------------------
# The comparison: tables and figures
# --------------------------------------------------------------------------------------------


def summarize_sweep(out: str | os.PathLike) -> dict[str, Any]:
    """Read every run of the sweep in ``out`` and write sweep_runs.csv, sweep_table.csv,
    sweep_table.md and figures/*.png (see the module docstring).

    Returns:
        ``{"spec": sweep.json, "per_run": [{"value", "replicate", "path", "quantities"}],
        "table": {(value, quantity, layer): stats}, "layers": [names], "fits": {...},
        "spread": spread_analysis result without paths, or None}``.

    Raises:
        RunFolderError: not a sweep folder, or a planned run is missing or unreadable.
    """
    out = Path(out)
    spec = load_sweep(out)
    factor = spec["factor"]
    per_run = []
    for r in spec["runs"]:
        path = out / r["path"]
        run = runio.load_run(path)
        if not run.layers:
            raise runio.RunFolderError(f"{path} has no layer records: the sweep did not finish (rerun it)")
        per_run.append({"value": r["value"], "replicate": r["replicate"], "path": r["path"], "run": run,
                        "quantities": run_quantities(run)})
    values = list(spec["values"])
    layers = list(dict.fromkeys(name for p in per_run for (q, name) in p["quantities"] if name != NETWORK))
    keys = [(q, NETWORK) for q in NETWORK_QUANTITIES] + [(q, name) for name in layers for q in LAYER_QUANTITIES]
    table: dict[tuple, dict[str, float]] = {}
    groups = [(v, [p for p in per_run if p["value"] == v]) for v in values]
    if factor == "data_seed":
        groups.append(("all", per_run))
    for v, members in groups:
        for key in keys:
            table[(v, *key)] = _stats([p["quantities"].get(key, math.nan) for p in members])
    fits = _fits(factor, per_run, layers) if factor in ("batch_size", "init_scale", "weight_decay") else {}
    spread = None
    if factor == "data_seed" and len(per_run) >= 2:
        cfg = per_run[0]["run"].config
        spread = spread_analysis([out / p["path"] for p in per_run], n_paths=int(cfg.get("sde_paths", 4096)),
                                 seed=int(cfg.get("sde_seed", 0)))
    _write_runs_csv(out, factor, per_run, keys)
    _write_table_csv(out, factor, groups, keys, table)
    runio.write_text_atomic(out / TABLE_MD_FILE, _markdown(spec, groups, layers, table, fits, spread))
    _write_figures(out, spec, per_run, groups, layers, table, spread)
    result = {"spec": spec, "per_run": [{k: v for k, v in p.items() if k != "run"} for p in per_run],
              "table": table, "layers": layers, "fits": fits,
              "spread": None if spread is None else {k: v for k, v in spread.items() if k != "paths"}}
    runio.write_json_atomic(out / SWEEP_FILE, {**spec, "fits": fits, "spread": result["spread"]})
    return result


def _fits(factor: str, per_run: list[dict], layers: list[str]) -> dict:
    """Log-log exponents of the per-step noise terms against the factor (over every run)."""
    x = [p["value"] for p in per_run]
    fits = {}
    for name in [NETWORK] + layers:
        for q in ("mean_ito", "mean_diffusion_var"):
            y = [p["quantities"].get((q, name), math.nan) for p in per_run]
            fits[f"{q}:{name}"] = loglog_slope(x, y)
    return fits


def _write_runs_csv(out: Path, factor: str, per_run: list[dict], keys: list) -> None:
    rows = []
    for p in per_run:
        cfg = p["run"].config
        for (q, layer) in keys:
            rows.append([p["value"], p["replicate"], cfg.get("seed"), cfg.get("data_seed"), p["path"], q, layer,
                         float(p["quantities"].get((q, layer), math.nan))])
    runio.write_text_atomic(out / RUNS_FILE, analysis.csv_text(
        [factor, "replicate", "seed", "data_seed", "run", "quantity", "layer", "result"], rows))


def _write_table_csv(out: Path, factor: str, groups: list, keys: list, table: dict) -> None:
    rows = []
    for v, _ in groups:
        for (q, layer) in keys:
            s = table[(v, q, layer)]
            rows.append([v, q, layer, s["n"], s["mean"], s["std"], s["min"], s["max"]])
    runio.write_text_atomic(out / TABLE_FILE, analysis.csv_text([factor, "quantity", "layer", "n", "mean", "std", "min", "max"],
                                                   rows))


def _pm(s: dict, digits: int = 4, pct: bool = False) -> str:
    m, sd = s["mean"], s["std"]
    if not math.isfinite(m):
        return "n/a"
    f = 100.0 if pct else 1.0
    text = f"{m * f:.{digits}g}"
    if math.isfinite(sd):
        text += f" ± {sd * f:.2g}"
    return text + ("%" if pct else "")


_NET_COLUMNS = ["final_log_bound", "peak_log_bound", "log_bound_change", "cum_drift", "cum_ito",
                "sum_diffusion_var", "coverage", "train_acc", "test_acc"]
_LAYER_COLUMNS = ["sigma_final", "cum_drift", "cum_ito", "sum_diffusion_var", "mean_ito", "mean_diffusion_var",
                  "pathwise_rel_residual", "coverage", "reliable_from"]
_PCT = {"coverage", "pathwise_rel_residual", "train_acc", "test_acc", "degenerate_fraction"}


def _markdown(spec: dict, groups: list, layers: list[str], table: dict, fits: dict, spread: dict | None) -> str:
    factor = spec["factor"]
    base = spec["base_config"]
    seeds = spec["seeds"]
    lines = [f"# lipfast sweep: {factor}", ""]
    varied = ("the data-order seed (initialisation fixed)" if factor == "data_seed"
              else f"{factor}, {seeds} replicate(s) per value (seed, data_seed, noise_seed + r)")
    lines.append(f"Varied: {varied}. Base options: dataset {base['dataset']}, model {base['model']} "
                 f"{list(base['widths'])}, lr {base['lr']}, batch {base['batch_size']}, "
                 f"steps {base['steps'] if base['steps'] is not None else str(base['epochs']) + ' epochs'}, "
                 f"label noise {base['label_noise']}, init scale {base['init_scale']}, "
                 f"weight decay {base['weight_decay']}, optimizer {base.get('optimizer', 'sgd')}, rank {base['rank']}.")
    lines += ["", "Cells: mean ± std over the runs of a value (std with n−1; none for a single run).", ""]
    lines += ["## Network (log K = Σ log σ_ℓ; forces in log space)", ""]
    lines.append("| " + " | ".join([factor, "n"] + _NET_COLUMNS) + " |")
    lines.append("|" + "---|" * (len(_NET_COLUMNS) + 2))
    for v, _ in groups:
        cells = [_pm(table[(v, q, NETWORK)], pct=q in _PCT) for q in _NET_COLUMNS]
        lines.append(f"| {v} | {table[(v, 'final_log_bound', NETWORK)]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Layers (σ₁ and the forces on it)", ""]
    lines.append("| " + " | ".join([factor, "layer"] + _LAYER_COLUMNS) + " |")
    lines.append("|" + "---|" * (len(_LAYER_COLUMNS) + 2))
    for v, _ in groups:
        for name in layers:
            cells = [_pm(table[(v, q, name)], pct=q in _PCT) for q in _LAYER_COLUMNS]
            lines.append(f"| {v} | `{name}` | " + " | ".join(cells) + " |")
    if fits:
        lines += ["", f"## Log-log exponents of the per-step noise terms against {factor}", "",
                  "| term | layer | exponent | stderr | R² | points |", "|---|---|---|---|---|---|"]
        for key, f in fits.items():
            q, name = key.split(":", 1)
            lines.append(f"| {q} | `{name}` | {f['exponent']:.3f} | {f['stderr']:.2g} | {f['r2']:.3f} | {f['n']} |")
    if spread is not None:
        lines += ["", "## Spread across data orders vs the SDE band of the first run", "",
                  f"Band: {spread['quantiles'][0]:.0%}–{spread['quantiles'][1]:.0%} of the SDE simulated from "
                  f"`{Path(spread['reference']).parent.name}/{Path(spread['reference']).name}`'s coefficients; "
                  f"{spread['n_runs']} runs. Expected coverage of the other runs if the SDE is right: "
                  f"{spread['expected_coverage_others']:.3f} (the band's centre carries the first run's noise).", "",
                  "| series | coverage (others) | coverage (centred on mean) | std observed (end) | "
                  "std SDE (end) | ratio | median ratio (2nd half) | std SDE, epoch sampling (end) | "
                  "RMS ratio vs epoch sampling (2nd half) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in spread["series"].items():
            lines.append(f"| `{name}` | {s['coverage_others']:.3f} | {s['coverage_centred']:.3f} | "
                         f"{s['std_observed']:.3g} | {s['std_sde']:.3g} | {s['ratio']:.2f} | {s['ratio_median']:.2f} | "
                         f"{s['std_epochs']:.3g} | {s['ratio_epochs']:.2f} |")
    lines += ["", "Quantities:", ""]
    for q, d in NETWORK_QUANTITIES.items():
        lines.append(f"- network `{q}`: {d}")
    for q, d in LAYER_QUANTITIES.items():
        lines.append(f"- layer `{q}`: {d}")
    return "\n".join(lines) + "\n"


# -- figures ----------------------------------------------------------------------------------


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("lipfast sweep needs matplotlib for its figures: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


def _figure(n_panels: int, *, width: float = 4.0, height: float = 2.8, ncols_max: int = 3):
    Figure, Canvas = _mpl()
    ncols = max(1, min(ncols_max, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows + 0.3), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _layer_labels(per_run: list[dict]) -> dict[str, str]:
    """Each layer's figure title (module path · kind and shape) from the first run that recorded it."""
    from .report import layer_label

    labels: dict[str, str] = {}
    for p in per_run:
        for r in p["run"].layers:
            labels.setdefault(r["layer"], layer_label(r["layer"], r))
    return labels


def _png(fig, dpi: int = 150) -> bytes:
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .*missing from", category=UserWarning)
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.05 + 0.8 * i / max(1, n - 1)) for i in range(n)]


def _stack(per_run: list[dict], trajs: dict, name: str, key: str):
    arrs = [trajs[p["path"]][name][key] for p in per_run if name in trajs[p["path"]]]
    if not arrs:
        return None, None
    length = min(len(a) for a in arrs)
    steps = trajs[per_run[0]["path"]][name]["steps"][:length]
    return steps, np.stack([a[:length] for a in arrs])


def _write_figures(out: Path, spec: dict, per_run: list[dict], groups: list, layers: list[str], table: dict,
                   spread: dict | None) -> None:
    factor = spec["factor"]
    figdir = out / FIGURES_DIR
    figdir.mkdir(exist_ok=True)
    trajs = {p["path"]: run_trajectories(p["run"]) for p in per_run}
    labels = _layer_labels(per_run)
    value_groups = [(v, m) for v, m in groups if v != "all"]
    colors = _colors(len(value_groups))
    figs: dict[str, bytes] = {}
    for fname, (key, ylabel, title) in _TRAJECTORY_FIGURES.items():
        names = [NETWORK] if fname == "log_bound.png" else (
            layers if fname == "sigma.png" else [NETWORK] + layers)
        fig, axes = _figure(len(names))
        for ax, name in zip(axes, names):
            for (v, members), c in zip(value_groups, colors):
                steps, stack = _stack(members, trajs, name, key)
                if stack is None:
                    continue
                mean = stack.mean(axis=0)
                ax.plot(steps, mean, color=c, linewidth=1.2, label=f"{factor}={v}")
                if stack.shape[0] > 1:
                    sd = stack.std(axis=0, ddof=1)
                    ax.fill_between(steps, mean - sd, mean + sd, color=c, alpha=0.2, linewidth=0)
            ax.set_title(f"{title}: {labels.get(name, name)}" if name != NETWORK or fname != "log_bound.png" else title,
                         fontsize=9.5)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel if name != NETWORK or key == "value" else ylabel + " (log K)")
        axes[0].legend(fontsize=8)
        figs[fname] = _png(fig)

    # final and peak log K against the value: one panel each (on one axis the peak, often equal to the final
    # value, hid it)
    fig, axes = _figure(2, width=4.6, height=3.2)
    xs, numeric = _x_positions(factor, [v for v, _ in value_groups])
    for ax, q, marker, color in zip(axes, ("final_log_bound", "peak_log_bound"), ("o", "s"), ("tab:blue", "tab:red")):
        m = [table[(v, q, NETWORK)]["mean"] for v, _ in value_groups]
        s = [table[(v, q, NETWORK)]["std"] for v, _ in value_groups]
        ax.errorbar(xs, m, yerr=[x if math.isfinite(x) else 0 for x in s], marker=marker, capsize=3, color=color)
        _set_x(ax, factor, [v for v, _ in value_groups], xs, numeric)
        ax.set_title(("final" if q.startswith("final") else "peak") + " log K (mean ± sd over seeds)", fontsize=9)
        ax.set_ylabel("log K")
    figs["final_log_bound.png"] = _png(fig)

    # pathwise residual and coverage: grouped bars per layer
    for fname, q, ylabel, names in (("pathwise.png", "pathwise_rel_residual", "pathwise |resid| / |Σ δ_obs| (%)",
                                     layers),
                                    ("coverage.png", "coverage", "SDE 5–95% band coverage (%)", [NETWORK] + layers)):
        fig, (ax,) = _figure(1, width=max(5.0, 1.2 * len(names) * max(1, len(value_groups)) ** 0.5), height=3.2)
        width = 0.8 / max(1, len(value_groups))
        for j, ((v, _), c) in enumerate(zip(value_groups, colors)):
            m = [100 * table[(v, q, name)]["mean"] for name in names]
            s = [100 * table[(v, q, name)]["std"] for name in names]
            ax.bar(np.arange(len(names)) + (j - (len(value_groups) - 1) / 2) * width, m, width,
                   yerr=[x if math.isfinite(x) else 0 for x in s], color=c, capsize=2, label=f"{factor}={v}")
        ax.set_xticks(np.arange(len(names)), names, fontsize=8)
        ax.set_ylabel(ylabel)
        if q == "coverage":
            ax.axhline(90.0, color="0.4", linestyle=":", linewidth=1)
        ax.legend(fontsize=8)
        figs[fname] = _png(fig)

    if spread is not None and spread["paths"]:
        names = list(spread["paths"])
        fig, axes = _figure(len(names))
        for ax, name in zip(axes, names):
            p = spread["paths"][name]
            ax.fill_between(p["steps"], p["lo"], p["hi"], color="tab:orange", alpha=0.3, linewidth=0,
                            label="SDE band (first run)")
            for i, row in enumerate(p["runs"]):
                ax.plot(p["steps"], row, color="tab:blue" if i else "black", linewidth=0.8 if i else 1.2,
                        alpha=0.6 if i else 1.0, label=("first run" if i == 0 else ("other data orders" if i == 1
                                                                                   else None)))
            ax.set_title(labels.get(name, name), fontsize=9.5)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        figs["spread.png"] = _png(fig)
    for fname, png in figs.items():
        runio.write_bytes_atomic(figdir / fname, png)


def _x_positions(factor: str, values: list) -> tuple[list[float], bool]:
    if factor in ("data_seed", "optimizer"):  # labels, not a scale
        return list(range(len(values))), False
    return [float(v) for v in values], True


def _set_x(ax, factor: str, values: list, xs: list[float], numeric: bool) -> None:
    ax.set_xlabel(factor)
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
        return
    pos = [x for x in xs if x > 0]
    if len(pos) == len(xs) and len(xs) > 1 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log")
    ax.set_xticks(xs, [str(v) for v in values])
    ax.minorticks_off()
