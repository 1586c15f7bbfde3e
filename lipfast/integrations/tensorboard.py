"""``TensorBoardWriter``: a Tracker's records as TensorBoard scalars and histograms.

Needs ``pip install "lipfast[tensorboard]"``.
"""

from __future__ import annotations

import math
import os

from ._common import LAYER_SCALARS, NETWORK_SCALARS, require

_tb = require("torch.utils.tensorboard", "tensorboard", "lipfast.integrations.tensorboard", package="tensorboard")

__all__ = ["TensorBoardWriter"]


class TensorBoardWriter:
    """An ``on_record`` sink that writes each tracked step to TensorBoard event files.

    Tags (the step is the record's ``step``): ``sigma/<layer>``, ``drift/<layer>``, ``diffusion_var/<layer>``,
    ``ito/<layer>``; ``network/log_bound``, ``network/drift``, ``network/diffusion_var``, ``network/ito`` (and
    ``network/loss`` when the tracker was given one); the histogram ``sigma`` of σ₁ across layers.
    Non-finite values are not written.

    Args:
        log_dir: the event-file folder (``SummaryWriter``'s ``log_dir``), or an existing
            ``torch.utils.tensorboard.SummaryWriter`` to write into (it is then not closed by :meth:`close`).
        every: write every ``every``-th tracked step (1: all).

    Example::

        with TensorBoardWriter("runs/lipfast") as tb:
            tracker = lipfast.Tracker(model, optimizer, on_record=tb)
            ...
    """

    def __init__(self, log_dir, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"TensorBoardWriter: every must be an int >= 1, got {every!r}")
        if isinstance(log_dir, _tb.SummaryWriter):
            self.writer, self._owned = log_dir, False
        elif isinstance(log_dir, (str, os.PathLike)):
            self.writer, self._owned = _tb.SummaryWriter(log_dir=os.fspath(log_dir)), True
        else:
            raise TypeError("TensorBoardWriter: log_dir must be a path or a SummaryWriter, "
                            f"got {type(log_dir).__name__}")
        self.every = every

    def __call__(self, rows: list[dict], net: dict) -> None:
        step = int(net["step"])
        if step % self.every:
            return
        add = self.writer.add_scalar
        for row in rows:
            for field in LAYER_SCALARS:
                v = row[field]
                if _finite(v):
                    add(f"{field}/{row['layer']}", v, step)
        for field in NETWORK_SCALARS + ("loss",):
            if _finite(net.get(field)):
                add(f"network/{field}", net[field], step)
        sigmas = [r["sigma"] for r in rows if _finite(r["sigma"])]
        if sigmas:
            import numpy as np  # a dependency of lipfast

            self.writer.add_histogram("sigma", np.asarray(sigmas, dtype=np.float64), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the SummaryWriter when this writer made it. Idempotent."""
        self.writer.flush()
        if self._owned:
            self.writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)
