"""One tracked training run into a run folder: data, model, optimizer (SGD, Adam, AdamW), the tracker, checkpoints, resume.

Plain functions, no framework: :func:`train` drives :class:`lipfast.Tracker` and streams its records
into :class:`lipfast.runio.RunWriter` as each step completes, so an interrupted run keeps every
completed step, and ``resume=True`` continues from the last checkpoint to the records an uninterrupted
run gives (the batch of a step depends only on ``(sampling, sampling_seed, step)``; model, optimizer,
tracker state and RNG come from the checkpoint).

Sampling (``sampling``): ``"permutation"`` draws each epoch as a shuffle of the training set (the
tracker's noise terms get the finite-population factor), ``"replacement"`` draws every batch
independently, which is what the SDE of MATH.md §3 assumes. ``sampling_seed`` seeds the batches
only; ``data_seed`` seeds the train/test split (and, when ``sampling_seed`` is unset, the batches too,
as before the two were separate).

Regularisers: ``mixup`` ALPHA > 0 trains on ``λx_i + (1−λ)x_π(i)`` with the loss ``λ·CE(y_i) + (1−λ)·CE(y_π(i))``,
``λ ~ Beta(α, α)`` and the partner permutation ``π`` drawn per step from ``(sampling_seed, step)``; each
sample's loss still depends on its own (mixed) input only, so the tracker's per-sample gradients stay exact.
``label_smoothing`` is cross-entropy's. With BatchNorm, ``batchnorm.csv`` records after every step the log
of each BatchNorm's running scale ``max_c |γ_c|/√(running_var_c + ε)`` (its operator norm in eval mode):
``log K`` (the product over Linear/Conv weights, as the paper defines it) plus their sum is the bound with
the BatchNorms folded in (summary.json ``"batchnorm"``).

Data parallelism (``nproc`` > 1, or each rank of ``torchrun --nproc_per_node N -m lipfast train ...``):
every rank builds the same model, wraps it in ``DistributedDataParallel`` and takes its contiguous slice
``batch_size/N`` of each global batch, so the tracker's global-batch records equal the single-process
run's (to rounding). Rank 0 alone writes the run folder (whole lines, as always) and the checkpoints
(of the unwrapped model: a run resumes with any number of ranks); a failing rank ends the run with an
error naming it, and the folder keeps every step completed before.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import data as datasets
from . import distributed, models, runio
from .tracker import Tracker

__all__ = ["TrainConfig", "train", "load_config_file", "ConfigError"]


class ConfigError(ValueError):
    """A training option has a wrong name, type or value (the message names it)."""


@dataclass
class TrainConfig:
    """Every option of a tracked run. ``lipfast train --help`` lists them with the same names."""

    dataset: str = "digits"
    n_samples: int | None = None
    test_fraction: float = 0.2
    data_root: str | None = None
    model: str = "mlp"
    widths: tuple[int, ...] = (128, 128)
    init_scale: float = 1.0
    batchnorm: bool = False
    label_noise: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    steps: int | None = 300
    epochs: int | None = None
    seed: int = 0
    data_seed: int = 0
    noise_seed: int = 0
    sampling: str = "permutation"
    sampling_seed: int | None = None
    rank: int = 8
    every: int = 1
    iters: int = 16
    gap_tol: float = 1e-3
    step_tol: float = 2.0
    closure_tol: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every: int = 50
    eval_every: int = 50
    sde_paths: int = 4096
    sde_seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            close = {u: [n for n in names if _similar(u, n)] for u in unknown}
            hint = "; ".join(f"'{u}'" + (f" (did you mean '{close[u][0]}'?)" if close[u] else "") for u in unknown)
            raise ConfigError(f"{where}: unknown option {hint}")
        values = dict(values)
        if values.get("epochs") is not None and "steps" not in values:
            values["steps"] = None  # epochs given, steps not: the default step count must not win
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        if isinstance(self.widths, (list, tuple)):
            self.widths = tuple(self.widths)
        _check(self.dataset in datasets.DATASETS, "dataset", self.dataset, f"one of {list(datasets.DATASETS)}")
        _check(self.model in models.MODELS, "model", self.model, f"one of {list(models.MODELS)}")
        _check(isinstance(self.widths, tuple) and len(self.widths) > 0 and all(_is_int(w) and w > 0 for w in self.widths),
               "widths", self.widths, "a non-empty list of positive ints")
        for name in ("batch_size", "rank", "every", "iters", "checkpoint_every", "eval_every", "sde_paths"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("seed", "data_seed", "noise_seed", "sde_seed"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        _check(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _check(_is_num(self.init_scale) and self.init_scale > 0, "init_scale", self.init_scale, "a number > 0")
        _check(_is_num(self.label_noise) and 0 <= self.label_noise < 1, "label_noise", self.label_noise, "a number in [0, 1)")
        _check(_is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing",
               self.label_smoothing, "a number in [0, 1)")
        _check(_is_num(self.mixup) and self.mixup >= 0, "mixup", self.mixup, "a number >= 0 (0: off)")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}")
        _check(_is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.optimizer == "sgd" or self.momentum == 0, "momentum", self.momentum,
               f"0 with optimizer '{self.optimizer}' (Adam's β₁ is its momentum)")
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(_is_num(self.test_fraction) and 0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")
        _check(_is_num(self.gap_tol) and self.gap_tol >= 0, "gap_tol", self.gap_tol, "a number >= 0")
        _check(_is_num(self.step_tol) and self.step_tol > 0, "step_tol", self.step_tol, "a number > 0")
        _check(_is_num(self.closure_tol) and self.closure_tol >= 0, "closure_tol", self.closure_tol, "a number >= 0")
        _check(self.n_samples is None or (_is_int(self.n_samples) and self.n_samples >= 2), "n_samples", self.n_samples, "an int >= 2")
        _check(self.steps is None or (_is_int(self.steps) and self.steps >= 1), "steps", self.steps, "an int >= 1")
        _check(self.epochs is None or (_is_int(self.epochs) and self.epochs >= 1), "epochs", self.epochs, "an int >= 1")
        _check(self.steps is not None or self.epochs is not None, "steps", self.steps, "set when epochs is not")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"steps and epochs exclude each other, got steps={self.steps!r} and "
                              f"epochs={self.epochs!r}; give one of them")
        _check(self.sampling in datasets.SAMPLING, "sampling", self.sampling, f"one of {list(datasets.SAMPLING)}")
        _check(self.sampling_seed is None or (_is_int(self.sampling_seed) and self.sampling_seed >= 0),
               "sampling_seed", self.sampling_seed, "an int >= 0 (or unset: data_seed)")
        _check(self.dtype in ("float32", "float64"), "dtype", self.dtype, "'float32' or 'float64'")
        _check(isinstance(self.nesterov, bool), "nesterov", self.nesterov, "true or false")
        _check(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov, "used with momentum > 0")
        _check(isinstance(self.batchnorm, bool), "batchnorm", self.batchnorm, "true or false")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _check(False, "device", self.device, "a torch device such as 'cpu' or 'cuda'")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: '{self.device}' was asked for but torch sees no CUDA device")


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The run's optimizer: SGD (momentum, Nesterov, weight decay), Adam (coupled weight decay) or AdamW
    (decoupled), PyTorch's defaults otherwise (betas 0.9/0.999, eps 1e-8)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _similar(a: str, b: str) -> bool:
    import difflib
    return difflib.SequenceMatcher(None, a, b).ratio() > 0.75


def batch_seed(config: TrainConfig) -> int:
    """The seed of the mini-batches: ``sampling_seed``, or ``data_seed`` when it is unset."""
    return config.data_seed if config.sampling_seed is None else config.sampling_seed


def load_config_file(path: str | os.PathLike) -> dict:
    """Options from a TOML file (a flat table of TrainConfig names; parsed as data, never executed)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ConfigError("--config needs Python 3.11+ or the 'tomli' package (pip install tomli)") from exc
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        with p.open("rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {p}: tables are not supported, got [{nested[0]}]; write options at the top level")
    return values


# -- the run --------------------------------------------------------------------------------------
@dataclass
class _Progress:
    step: int = 0
    loss: float = math.nan
    log_bound: float = math.nan


def train(config: TrainConfig, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
          quiet: bool = False, report: bool = True, max_steps: int | None = None, nproc: int = 1) -> Path:
    """Run one tracked training into the run folder ``out`` and return its path.

    Args:
        config: the options (validated here).
        out: run folder; an existing run needs ``overwrite`` or ``resume``.
        overwrite: replace lipfast's files in ``out``.
        resume: continue the run in ``out`` from its last checkpoint.
        quiet: no progress bar (log lines only).
        report: simulate the SDE bands and write figures + report.html at the end.
        max_steps: stop after this many steps of this invocation (to interrupt a run on purpose,
            e.g. in tests of resume); the run folder then stays resumable.
        nproc: data-parallel ranks, spawned here as local processes (gloo on CPU, nccl on CUDA with
            rank r on ``cuda:r``); ``batch_size`` is the global batch and must be a multiple of it.
            Inside a process group (``torchrun``) every rank calls ``train`` with ``nproc=1``.
    """
    if overwrite and resume:
        raise ValueError("train: overwrite and resume are mutually exclusive")
    config.validate()
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be an int >= 1, got {nproc!r}")
    if nproc > 1:
        return _train_spawned(config, out, nproc, overwrite=overwrite, resume=resume, quiet=quiet, report=report,
                              max_steps=max_steps)
    ctx = distributed.run_context(config.device)  # a rank of torchrun or of _train_spawned; else None
    try:
        return _train(config, Path(out), ctx, overwrite=overwrite, resume=resume, quiet=quiet, report=report,
                      max_steps=max_steps)
    except BaseException as exc:
        if ctx is not None and ctx.owns_group:  # torchrun: say what failed before the teardown, which may abort
            distributed.log_rank_failure(ctx, exc)
        raise
    finally:
        distributed.shutdown(ctx)


def _train(config: TrainConfig, out: Path, ctx: distributed.RunContext | None, *, overwrite: bool, resume: bool,
           quiet: bool, report: bool, max_steps: int | None) -> Path:
    main = ctx is None or ctx.main
    device = ctx.device if ctx is not None else torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    checkpoint = out / runio.CHECKPOINT_FILE
    state = writer = error = None
    try:  # under data parallelism every rank learns whether all could start (else they would wait)
        if ctx is not None:
            _check_parallel(config, ctx.world)
        if resume:
            if not runio.is_run_folder(out):
                raise runio.RunFolderError(f"cannot resume {out}: it is not a lipfast run folder")
            if main:
                _check_resume_config(config, runio.load_run(out).config, out)
            if checkpoint.is_file():
                state = _load_checkpoint(checkpoint, device)
        # Data (and the options that depend on it) before the run folder is touched: a bad dataset or
        # batch size must not leave a half-made run behind that a corrected rerun then trips over.
        ds, y_train = _load_data(config)
        if main:
            writer = runio.RunWriter(out, config.to_dict(), overwrite=overwrite, resume=resume,
                                     resume_from_step=int(state["step"]) if state else (0 if resume else None))
    except Exception as exc:  # noqa: BLE001 - re-raised below
        error = exc
    if ctx is not None and not distributed.all_ok(error is None, ctx) and error is None:
        raise distributed.DistributedRunError(f"rank {ctx.rank}: another rank could not start the run (see its error)")
    if error is not None:
        raise error
    try:
        return _run(config, out, writer, state, device, dtype, ds, y_train, quiet=quiet, report=report,
                    max_steps=max_steps, ctx=ctx)
    finally:
        if writer is not None:
            writer.close()


def _check_parallel(config: TrainConfig, nproc: int) -> None:
    if config.batch_size % nproc:
        raise ConfigError(f"batch_size must be a multiple of the {nproc} data-parallel ranks (each rank takes "
                          f"batch_size/{nproc} samples of every global batch), got {config.batch_size}")


def _train_spawned(config: TrainConfig, out, nproc: int, **kwargs) -> Path:
    """``train(..., nproc=N)``: N local ranks, each running :func:`train` in one process group."""
    _check_parallel(config, nproc)
    if distributed.in_process_group():
        raise ConfigError("nproc > 1 inside a process group that is already running (torchrun?): launch the ranks "
                          "one way only")
    if torch.device(config.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"nproc {nproc} needs {nproc} CUDA devices, torch sees {torch.cuda.device_count()}")
    distributed.spawn(train, nproc, config, str(out), device=config.device, kwargs=kwargs,
                      passthrough=(ConfigError, runio.RunFolderError, runio.RunWriteError,
                                   datasets.DatasetUnavailable, FileNotFoundError))
    return Path(out)


# Options a resumed run may change: they do not alter the records of the steps to come.
RESUME_MAY_CHANGE = frozenset({"steps", "epochs", "eval_every", "checkpoint_every", "sde_paths", "sde_seed",
                               "data_root", "device"})


def _check_resume_config(config: TrainConfig, stored: Mapping[str, Any], out: Path) -> None:
    """Refuse to resume a run with options that would change its trajectory (a checkpoint of another
    model cannot be loaded, and a changed lr/seed/... would silently mix two runs)."""
    given = config.to_dict()
    changed = [k for k in given if k in stored and k not in RESUME_MAY_CHANGE and stored[k] != given[k]]
    if changed:
        diffs = ", ".join(f"{k} {stored[k]!r} -> {given[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume {out} with other options than it was started with ({diffs}); only "
                          f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume")


def _load_data(config: TrainConfig):
    """(dataset, train labels with the label noise applied); checks batch_size against the data."""
    ds = datasets.load_dataset(config.dataset, root=config.data_root, test_fraction=config.test_fraction,
                               seed=config.data_seed, n_samples=config.n_samples)
    y_train = ds.y_train
    if config.label_noise > 0:
        y_train, _ = datasets.add_label_noise(y_train, config.label_noise, ds.n_classes, seed=config.noise_seed)
    n_train = ds.x_train.shape[0]
    if config.batch_size > n_train:
        raise ConfigError(f"batch_size must be <= the {n_train} training samples of {config.dataset}, got {config.batch_size}")
    return ds, y_train


def _run(config: TrainConfig, out: Path, writer: runio.RunWriter | None, state, device, dtype, ds, y_train, *,
         quiet: bool, report: bool, max_steps: int | None, ctx: distributed.RunContext | None = None) -> Path:
    x_train, y_train = ds.x_train.to(device, dtype), y_train.to(device)
    x_test, y_test = ds.x_test.to(device, dtype), ds.y_test.to(device)
    n_train = x_train.shape[0]
    model = models.build_model(config.model, ds.input_shape, ds.n_classes, widths=config.widths,
                               init_scale=config.init_scale, seed=config.seed, batchnorm=config.batchnorm)
    model = model.to(device, dtype)
    net = model  # what the loop calls: the model, or its DDP wrapper (one slice of each batch per rank)
    main = ctx is None or ctx.main
    if ctx is not None:
        if config.batchnorm and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # global-batch statistics, as one process
        elif config.batchnorm and main:
            print("lipfast: batchnorm under data parallelism on CPU normalises each rank's slice (SyncBatchNorm "
                  "needs CUDA): the records differ from a single process's", file=sys.stderr, flush=True)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(config, model.parameters())
    per_epoch = n_train // config.batch_size
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    progress = _Progress()

    def on_record(rows, net):
        with distributed.termination_deferred(ctx is not None):  # a step's rows land whole, or not at all
            writer.write_layers(rows)
            writer.write_network(net)
        progress.log_bound = net["log_bound_next"]

    # Batches drawn independently with replacement: Σ_B = Σ_1/B, no finite-population factor (MATH.md §3).
    tracker = Tracker(net, opt, rank=config.rank, every=config.every,
                      dataset_size=n_train if config.sampling == "permutation" else None,
                      gap_tol=config.gap_tol, step_tol=config.step_tol, closure_tol=config.closure_tol,
                      iters=config.iters,
                      on_record=on_record, keep_records=False)
    step = 0
    started = time.perf_counter()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
    bar = _progress_bar(total, step, quiet or not main)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    bn = _bn_layers(model)
    bn_rows = _bn_rows_before(out, step) if (bn and main) else []
    done_here = 0
    try:
        while step < total:
            batch = datasets.batch_at(n_train, config.batch_size, step=step, seed=batch_seed(config),
                                      sampling=config.sampling)
            if ctx is not None:
                per = config.batch_size // ctx.world
                batch = batch[ctx.rank * per:(ctx.rank + 1) * per]
            batch = batch.to(device)
            model.train()
            opt.zero_grad(set_to_none=True)
            if config.mixup > 0:
                lam, partner = _mixup_draw(config, step, batch.shape[0], device)
                logits = net(lam * x_train[batch] + (1 - lam) * x_train[batch[partner]])
                loss = lam * loss_fn(logits, y_train[batch]) + (1 - lam) * loss_fn(logits, y_train[batch[partner]])
            else:
                logits = net(x_train[batch])
                loss = loss_fn(logits, y_train[batch])
            loss.backward()
            tracker.log(loss=loss, train_acc=(logits.argmax(1) == y_train[batch]).float().mean())
            opt.step()
            if bn and main:
                bn_rows.append([step] + _bn_log_scales(bn))
            step += 1
            done_here += 1
            progress.loss = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{progress.loss:.4f}", log_bound=f"{progress.log_bound:.4f}")
            if main and (step % config.checkpoint_every == 0 or step == total):
                if bn:  # with the checkpoint: a resumed run continues these rows
                    _write_bn_rows(out, bn, bn_rows)
                _save_checkpoint(out, model, opt, tracker, step)
            if main and quiet and (step % config.eval_every == 0 or step == total):
                print(f"lipfast: step {step}/{total} loss {progress.loss:.4f} log_bound {progress.log_bound:.4f}",
                      file=sys.stderr, flush=True)
            if max_steps is not None and done_here >= max_steps:
                return out
    finally:
        if bar is not None:
            bar.close()
        tracker.close()
    if not main:
        return out
    test_acc, test_loss = _evaluate(model, x_test, y_test)
    train_acc, train_loss = _evaluate(model, x_train, y_train)
    writer.write_summary({
        "finished": True, "steps": step, "dataset": ds.describe(), "n_train": n_train,
        "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
        "sampling": {"scheme": config.sampling, "seed": batch_seed(config), "batch_size": config.batch_size,
                     "steps_per_epoch": per_epoch},
        "wall_seconds_this_session": time.perf_counter() - started, "layers": list(tracker.captures),
        "skipped_layers": tracker.skipped,
        **({"batchnorm": _bn_summary(bn, bn_rows, progress.log_bound)} if bn else {}),
    })
    writer.flush()
    if report:
        from . import analysis
        from . import report as reporting
        analysis.write_simulation(out, n_paths=config.sde_paths, seed=config.sde_seed)
        reporting.make_report(out)
    return out


def _mixup_draw(config: TrainConfig, step: int, n: int, device) -> tuple[float, torch.Tensor]:
    """λ ~ Beta(α, α) and the partner permutation of one step, from (sampling seed, step) alone (resumable)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([batch_seed(config), step, 2]))
    lam = float(rng.beta(config.mixup, config.mixup))
    return lam, torch.as_tensor(rng.permutation(n), device=device)


# -- BatchNorm's running scale (the part of the eval-mode network K leaves out) -------------------
def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def _bn_log_scales(bn) -> list[float]:
    """log max_c |γ_c|/√(running_var_c + ε) per BatchNorm: the log operator norm of its eval-mode map."""
    out = []
    with torch.no_grad():
        for _, m in bn:
            scale = (m.running_var.double() + m.eps).rsqrt()
            if m.weight is not None:
                scale = scale * m.weight.detach().double().abs()
            out.append(float(scale.max().log()))
    return out


def _write_bn_rows(out: Path, bn, rows) -> None:
    from .analysis import csv_text

    header = ["step", "log_scale"] + [f"log_scale:{n}" for n, _ in bn]
    runio.write_text_atomic(out / runio.BATCHNORM_FILE, csv_text(header, [[r[0], sum(r[1:])] + r[1:] for r in rows]))


def _bn_rows_before(out: Path, step: int) -> list[list]:
    """Rows of batchnorm.csv before ``step`` (a resumed run continues them; a fresh run has none)."""
    import csv

    path = out / runio.BATCHNORM_FILE
    if step == 0 or not path.is_file():
        return []
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))[1:]
    return [[int(r[0])] + [float(v) for v in r[2:]] for r in rows if r and int(r[0]) < step]


def _bn_summary(bn, rows, log_bound: float) -> dict:
    last = rows[-1][1:] if rows else [math.nan] * len(bn)
    return {"layers": [n for n, _ in bn], "log_scale": dict(zip((n for n, _ in bn), last)),
            "log_bound": log_bound, "log_bound_folded": log_bound + sum(last),
            "note": "log_bound: the product over Linear/Conv weights (the paper's K); log_bound_folded adds each "
                    "BatchNorm's eval-mode operator norm max_c |gamma_c|/sqrt(running_var_c + eps) (batchnorm.csv "
                    "per step)"}


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 1024]) for i in range(0, x.shape[0], 1024)])
        loss = float(nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    return acc, loss


_CHECKPOINT_KEYS = ("step", "model", "optimizer", "tracker", "rng")


def _load_checkpoint(path: Path, device) -> dict:
    """The checkpoint as :func:`_save_checkpoint` wrote it, loaded with ``weights_only=True`` (tensors and plain
    containers only: a pickle that would run code is refused, never executed). Anything else, whether refused,
    corrupt or of another shape, is a :class:`runio.RunFolderError` naming the file."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" of a foreign file: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise runio.RunFolderError(f"cannot resume from {path}: it holds objects other than tensors and plain "
                                   "containers, which lipfast refuses to unpickle (torch.load weights_only=True); "
                                   "it is not a lipfast checkpoint and may be malicious") from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError (not a zip archive), EOFError, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise runio.RunFolderError(f"cannot resume from {path}: it does not load as a lipfast checkpoint "
                                   f"({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise runio.RunFolderError(f"cannot resume from {path}: not a lipfast checkpoint (expected the keys "
                                   f"{list(_CHECKPOINT_KEYS)}, got {got})")
    return state


def _save_checkpoint(out: Path, model, opt, tracker: Tracker, step: int) -> None:
    """Everything resume needs, written atomically; tensors and plain containers only, so it loads
    with ``torch.load(weights_only=True)``."""
    import io
    buf = io.BytesIO()
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "tracker": tracker.state_dict(), "rng": torch.get_rng_state()}, buf)
    runio.write_bytes_atomic(out / runio.CHECKPOINT_FILE, buf.getvalue())


def _progress_bar(total: int, start: int, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
