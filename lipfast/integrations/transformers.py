"""``LipfastCallback`` for Hugging Face ``transformers.Trainer`` (``pip install "lipfast[hf]"``)."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ._common import TrackedRun, check_callback_options, log_due, require, run_config, run_folder, scalars

_transformers = require("transformers", "hf", "lipfast.integrations.transformers")

__all__ = ["LipfastCallback"]


class LipfastCallback(_transformers.TrainerCallback):
    """Tracks every supported layer of a ``transformers.Trainer`` run.

    At train begin it attaches a :class:`lipfast.Tracker` to the Trainer's model and its torch optimizer
    (inside accelerate's ``AcceleratedOptimizer``; under DDP, to the DDP-wrapped model, with records on
    rank 0); at train end it closes it. Every tracked step is appended to a run folder, ``<output_dir>/lipfast``
    (``lipfast report`` reads it), and its scalars go to the Trainer's logs (``lipfast/sigma/<layer>``,
    ``lipfast/drift/<layer>``, ``lipfast/diffusion_var/<layer>``, ``lipfast/ito/<layer>``,
    ``lipfast/network/log_bound`` and the network's forces) and so to every ``report_to`` logger.

    Args:
        out: the run folder (default ``<output_dir>/lipfast``). A new training run replaces lipfast's files
            there; one resumed from a checkpoint continues them from the checkpoint's step.
        log_every: send scalars to the Trainer's logs every this many optimizer steps (0: never; default
            None: whenever the Trainer logs, i.e. ``logging_steps``).
        **tracker_kwargs: :class:`lipfast.Tracker` arguments (``rank``, ``every``, ``layers``, ``on_record``,
            ...). ``keep_records`` defaults to False here: the run folder holds every record.

    Attributes:
        tracker: the live :class:`lipfast.Tracker` during training, else None.
        run_dir: the run folder of the current or last training run (None on ranks that do not write it).

    Records are numbered by optimizer step from 0 (the Trainer's ``global_step`` − 1); scalars are logged at
    the Trainer's ``global_step`` (on CUDA a step's records arrive with the next step, as the tracker never
    waits for the GPU: the scalars logged at a step are then the previous step's). The network records' ``loss`` is each step's training loss as the Trainer
    counts it (the sum of its micro-batch losses; under DDP rank 0's). ``loss_reduction="mean"`` takes the loss
    to be a mean over the step's samples, as it is for one label per sample; a token-level loss normalised by
    the number of tokens weighs samples by their token counts, which the noise terms do not account for.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, log_every: int | None = None, **tracker_kwargs):
        check_callback_options(out, log_every, "LipfastCallback")
        self.out = out
        self.log_every = log_every
        self._run = TrackedRun(tracker_kwargs, "LipfastCallback")
        self._trainer = None
        self._pending_logs: dict[str, float] | None = None
        self._loss_start = None
        self.run_dir: str | None = None

    @property
    def tracker(self):
        return self._run.tracker

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LipfastCallback: the Trainer passed no model or optimizer to on_train_begin")
        self._trainer = _calling_trainer()
        # The Trainer hands callbacks its unwrapped model; under DDP the tracker needs the wrapper (it reduces
        # the per-sample statistics over ranks), which only the Trainer holds.
        wrapped = getattr(self._trainer, "model_wrapped", None)
        ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is model
        tracked = wrapped if ddp else model
        run_dir = run_folder(self.out, args.output_dir)
        write_here = state.is_world_process_zero
        config = run_config("transformers.Trainer", self._run.kwargs, model=type(model).__name__,
                            optimizer=type(optimizer).__name__, learning_rate=args.learning_rate,
                            per_device_train_batch_size=args.per_device_train_batch_size,
                            gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed)
        self._run.start(tracked, optimizer, run_dir, first_step=state.global_step, write_here=write_here,
                        config=config)
        self.run_dir = run_dir if write_here else None

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer sums each micro-batch's (accumulation-scaled) loss into _tr_loss, reset only after logging:
        # the step's loss is its growth from here to the optimizer step. Private, so used only when present.
        running = getattr(self._trainer, "_tr_loss", None)
        self._loss_start = running.detach().clone() if isinstance(running, torch.Tensor) else None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        running = getattr(self._trainer, "_tr_loss", None)
        if self._run.tracker is not None and self._loss_start is not None and isinstance(running, torch.Tensor):
            self._run.tracker.log(loss=running.detach() - self._loss_start)

    def on_step_end(self, args, state, control, **kwargs):
        latest = self._run.take_latest()
        if latest is None or not log_due(state.global_step, self.log_every, lambda: control.should_log):
            return
        logs = scalars(*latest, prefix="lipfast/")
        if self._trainer is not None:
            # trainer.log reaches every report_to logger and the log history; it also clears should_log,
            # which the Trainer still needs for its own log of this step.
            should_log = control.should_log
            self._trainer.log(logs)
            control.should_log = should_log
        else:  # no Trainer found on the stack: add them to the Trainer's next log call
            self._pending_logs = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs is not None and logs is not None:
            logs.update(self._pending_logs)
            self._pending_logs = None

    def on_train_end(self, args, state, control, **kwargs):
        self._run.close({"finished": True, "source": "transformers.Trainer", "global_step": state.global_step})
        self._trainer = None


def _calling_trainer():
    """The ``transformers.Trainer`` whose training loop is calling the callback, found on the call stack (the
    Trainer passes callbacks neither itself nor its DDP-wrapped model); None when there is none."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, _transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None
