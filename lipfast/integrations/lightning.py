"""``LipfastCallback`` for Lightning (``pip install "lipfast[lightning]"``; ``pytorch_lightning`` works too)."""

from __future__ import annotations

import importlib
import os

from torch import nn

from ._common import TrackedRun, check_callback_options, log_due, run_config, run_folder, scalars, unwrap_optimizer

__all__ = ["LipfastCallback"]


def _lightning():
    """``lightning.pytorch``, else ``pytorch_lightning`` (the same API under its older name)."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("lipfast.integrations.lightning needs the package 'lightning' (or 'pytorch_lightning'): "
                      "pip install \"lipfast[lightning]\"")


_pl = _lightning()


class LipfastCallback(_pl.Callback):
    """Tracks every supported layer of a Lightning ``fit``.

    When training starts (``on_train_start``, after a checkpoint's loop state is restored) it attaches a
    :class:`lipfast.Tracker` to the LightningModule (under ``strategy="ddp"`` to its DDP wrapper, with records on
    rank 0) and the first optimizer; when training ends it closes it. Every tracked step
    is appended to a run folder (``lipfast report`` reads it) and its scalars go to the trainer's loggers:
    ``lipfast/sigma/<layer>``, ``lipfast/drift/<layer>``, ``lipfast/diffusion_var/<layer>``, ``lipfast/ito/<layer>``,
    ``lipfast/network/log_bound`` and the network's forces. The loss Lightning backpropagates goes into the
    network records. Works with ``accumulate_grad_batches``, ``gradient_clip_val`` and manual optimization
    (the step of the first optimizer is tracked).

    Args:
        out: the run folder (default ``<default_root_dir>/lipfast``). A new fit replaces lipfast's files there;
            a fit resumed from a checkpoint continues them from its ``global_step``.
        log_every: send scalars to the loggers every this many optimizer steps (0: never; default None: every
            ``log_every_n_steps``, as Lightning logs).
        **tracker_kwargs: :class:`lipfast.Tracker` arguments (``rank``, ``every``, ``layers``, ``on_record``,
            ...). ``keep_records`` defaults to False here: the run folder holds every record.

    Attributes:
        tracker: the live :class:`lipfast.Tracker` while training, else None.
        run_dir: the run folder of the current or last fit (None on ranks that do not write it).
    """

    def __init__(self, out: str | os.PathLike | None = None, *, log_every: int | None = None, **tracker_kwargs):
        check_callback_options(out, log_every, "LipfastCallback")
        self.out = out
        self.log_every = log_every
        self._run = TrackedRun(tracker_kwargs, "LipfastCallback")
        self._loss = None
        self._loss_step = -1
        self.run_dir: str | None = None

    @property
    def tracker(self):
        return self._run.tracker

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise RuntimeError("LipfastCallback: the LightningModule configured no optimizer; expected one from "
                               "configure_optimizers()")
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        wrapped = trainer.strategy.model
        tracked = wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else pl_module
        run_dir = run_folder(self.out, trainer.default_root_dir)
        write_here = trainer.is_global_zero
        config = run_config("lightning", self._run.kwargs, model=type(pl_module).__name__,
                            optimizer=type(optimizer).__name__, accumulate_grad_batches=trainer.accumulate_grad_batches,
                            gradient_clip_val=trainer.gradient_clip_val, world_size=trainer.world_size)
        tracker = self._run.start(tracked, optimizer, run_dir, first_step=trainer.global_step, write_here=write_here,
                                  config=config)
        # Lightning runs forward and backward inside optimizer.step(closure), after torch's step pre-hooks: the
        # tracker's pre-step work (which needs the backward done) moves to on_before_optimizer_step, which
        # Lightning calls after the closure and before the update. Its post-step hook stays.
        tracker._step_pre_handle.remove()
        self.run_dir = run_dir if write_here else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        tracker = self._run.tracker
        if tracker is not None:
            # A new forward pass: the tracker counts them from the module's forward pre-hook, which does not fire
            # when Lightning calls training_step directly (single device).
            # The batch's first tensor is what the layers' sample dimension is checked against.
            args = tuple(batch.values()) if isinstance(batch, dict) else (
                tuple(batch) if isinstance(batch, (list, tuple)) else (batch,))
            tracker._on_root_forward(pl_module, args, {})

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        tracker = self._run.tracker
        if tracker is None:
            return
        if self._loss_step != tracker.step:  # the first micro-batch of a step
            self._loss, self._loss_step = None, tracker.step
        # Lightning's loss is already divided by accumulate_grad_batches: the step's loss is their sum.
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss
        tracker.log(loss=self._loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        tracker = self._run.tracker
        if tracker is not None and unwrap_optimizer(optimizer) is tracker.optimizer:
            tracker._on_step_pre(tracker.optimizer, (), {})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        latest = self._run.take_latest()
        if latest is None:
            return
        step = int(latest[1]["step"])
        every = trainer.log_every_n_steps
        if log_due(step + 1, self.log_every, lambda: every > 0 and (step + 1) % every == 0):
            metrics = scalars(*latest, prefix="lipfast/")
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run.close({"finished": True, "source": "lightning", "global_step": trainer.global_step})

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._run.close({"finished": False, "source": "lightning", "global_step": trainer.global_step,
                         "error": f"{type(exception).__name__}: {exception}"})
