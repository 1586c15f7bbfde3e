"""What the integrations share: lazy imports, the scalars they log, and a tracker with its run folder."""

from __future__ import annotations

import importlib
import inspect
import math
import os
from typing import Any, Callable

import torch

from ..runio import RunWriter, is_run_folder
from ..tracker import Tracker

# Tracker arguments a callback passes on; checked when the callback is made, not when training starts.
TRACKER_ARGS = frozenset(inspect.signature(Tracker).parameters) - {"model", "optimizer"}
# fsync the run folder's CSVs every this many writes. Every row reaches the OS at once, so a killed process loses
# nothing; fsync guards only against a machine crash, and cost 5 ms a call (45 ms under load) on the 2-core
# test machine's disk, more than a small model's tracked step (bench/RESULTS.md, "Integrations"). At most the
# last 25 steps are at risk, and only from a machine crash.
FSYNC_EVERY = 50
# Per-layer fields logged as scalars, and the network record's.
LAYER_SCALARS = ("sigma", "drift", "diffusion_var", "ito")
NETWORK_SCALARS = ("log_bound", "drift", "diffusion_var", "ito")


def require(module: str, extra: str, who: str, package: str | None = None):
    """Import ``module``, or fail with one line naming the package and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split(".")[0]
        raise ImportError(f"{who} needs the package {package!r}: pip install \"lipfast[{extra}]\"") from None


def scalars(rows: list[dict], net: dict, prefix: str = "") -> dict[str, float]:
    """A step's loggable numbers: ``sigma/<layer>``, ``drift/<layer>``, ``diffusion_var/<layer>``, ``ito/<layer>``
    and ``network/<log_bound|drift|diffusion_var|ito>``; non-finite values are left out (loggers plot gaps
    badly; the run folder keeps them)."""
    out = {}
    for row in rows:
        for field in LAYER_SCALARS:
            v = row[field]
            if v is not None and math.isfinite(v):
                out[f"{prefix}{field}/{row['layer']}"] = float(v)
    for field in NETWORK_SCALARS:
        v = net[field]
        if v is not None and math.isfinite(v):
            out[f"{prefix}network/{field}"] = float(v)
    return out


RUN_SUBDIR = "lipfast"  # the run folder inside the framework's output folder (output_dir, default_root_dir)


def check_callback_options(out, log_every, who: str) -> None:
    """A callback's own arguments: ``out`` None or a path, ``log_every`` None or an int >= 0 (0: never)."""
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"{who}: out must be a path or None, got {type(out).__name__}")
    if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0):
        raise ValueError(f"{who}: log_every must be None or an int >= 0, got {log_every!r}")


def run_folder(out, framework_dir: str) -> str:
    """Where a callback writes its run folder: ``out``, else ``RUN_SUBDIR`` inside the framework's folder."""
    return os.fspath(out) if out is not None else os.path.join(framework_dir, RUN_SUBDIR)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the tracker's step hooks must sit on the optimizer whose ``step`` really runs,
    and a wrapper's own ``step`` does not run torch's step hooks."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(optimizer, "optimizer", None)
        inner = inner if isinstance(inner, torch.optim.Optimizer) else getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class TrackedRun:
    """A tracker attached to a model and optimizer, streaming its records into a run folder (on the rank that
    keeps records) and remembering the last step for the framework's loggers.

    Args:
        tracker_kwargs: the Tracker's keyword arguments; ``on_record`` (one sink or a list) runs after the
            run folder's; ``keep_records`` defaults to False (the run folder has every record).
        who: the callback's name, for errors.
    """

    def __init__(self, tracker_kwargs: dict[str, Any], who: str):
        unknown = sorted(set(tracker_kwargs) - TRACKER_ARGS)
        if unknown:
            raise TypeError(f"{who}: unknown Tracker argument(s) {unknown}; expected some of {sorted(TRACKER_ARGS)}")
        self.kwargs = dict(tracker_kwargs)
        self.kwargs.setdefault("keep_records", False)
        self.who = who
        self.tracker: Tracker | None = None
        self.writer: RunWriter | None = None
        self.latest: tuple[list[dict], dict] | None = None  # the last step delivered

    def start(self, model, optimizer, run_dir: str | os.PathLike, *, first_step: int, write_here: bool,
              config: dict) -> Tracker:
        """Attach (closing an earlier attachment first). ``first_step`` > 0 continues a run resumed from a
        checkpoint: records are numbered on from there and the run folder's later rows are dropped."""
        self.close({"finished": False})
        user = self.kwargs.get("on_record")
        user = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
        if write_here:
            resume = first_step > 0 and is_run_folder(run_dir)
            self.writer = RunWriter(run_dir, config, overwrite=not resume, resume=resume,
                                    resume_from_step=first_step if resume else None, fsync_every=FSYNC_EVERY)
        sinks = ([self.writer] if self.writer is not None else []) + [self._remember] + user
        kwargs = dict(self.kwargs, on_record=sinks)
        try:
            self.tracker = Tracker(model, unwrap_optimizer(optimizer), **kwargs)
        except BaseException:
            self._close_writer()
            raise
        self.tracker.step = first_step  # records carry the framework's step count on a resumed run
        return self.tracker

    def _remember(self, rows: list[dict], net: dict) -> None:
        self.latest = (rows, net)

    def take_latest(self) -> tuple[list[dict], dict] | None:
        """The last step delivered since the last call, or None."""
        latest, self.latest = self.latest, None
        return latest

    def close(self, summary: dict | None = None) -> None:
        """Detach the tracker (delivering its last step), write summary.json and close the run folder."""
        tracker, self.tracker = self.tracker, None
        try:
            if tracker is not None:
                tracker.close()
                if self.writer is not None:
                    self.writer.write_summary(dict(summary or {}, steps=tracker.step, layers=list(tracker.captures),
                                                   skipped_layers=tracker.skipped))
        finally:
            self._close_writer()

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


def run_config(source: str, kwargs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """config.json's ``config`` for a framework run: where it came from and the tracker's arguments (a value
    that is not plain data, such as a ``layers`` predicate or a sink, by its repr)."""
    plain = (type(None), bool, int, float, str)

    def value(v):
        if isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v):
            return list(v)
        return v if isinstance(v, plain) else repr(v)
    return dict(source=source, tracker={k: value(v) for k, v in kwargs.items()}, **extra)


def log_due(step: int, log_every: int | None, default: Callable[[], bool]) -> bool:
    """Whether a step's scalars go to the framework's loggers: every ``log_every`` steps (0: never), or when
    the framework logs its own (``log_every=None``)."""
    if log_every is None:
        return default()
    return log_every > 0 and step % log_every == 0
