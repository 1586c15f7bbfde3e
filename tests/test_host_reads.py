"""A steady-state tracked step reads nothing back to the host (issue #20): on CUDA every such read waits for the
GPU to drain, and a step with none is what CUDA-graph capture needs.

With the deferred read-back on (``_DEFER_ON_CPU``: the CPU takes CUDA's path, the step's numbers read at the
next step), every host read the hooks issue during forward, backward and ``optimizer.step()`` of a step after
warm-up is counted: ``aten._local_scalar_dense`` (``float()``, ``int()``, ``bool()``, ``.item()`` of a tensor)
and ``Tensor.tolist``. The read of the last step's numbers (``_StepReadback.read``, and the records built from
them) is not counted: it reads a copy queued a step earlier, outside the step's work.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lipfast
from lipfast import tracker as tracker_module
from lipfast.models import ResNet18


class _Reads(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counter.add("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


class _Counter:
    """Host reads by where in lipfast they were issued, outside ``_StepReadback.read``."""

    def __init__(self):
        self.reads: collections.Counter = collections.Counter()
        self.reading = 0
        self.active = False

    def add(self, what: str) -> None:
        if not self.active or self.reading:
            return
        frames = [f for f in traceback.extract_stack() if "/lipfast/" in f.filename.replace("\\", "/")]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.reads[f"{what} at {where}"] += 1


@contextlib.contextmanager
def _counting(monkeypatch, counter: _Counter):
    tolist, read = torch.Tensor.tolist, tracker_module._StepReadback.read

    def counted_tolist(self):
        counter.add("tolist")
        return tolist(self)

    def uncounted_read(self):
        counter.reading += 1
        try:
            return read(self)
        finally:
            counter.reading -= 1

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(tracker_module._StepReadback, "read", uncounted_read)
    with _Reads(counter):
        yield


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 10)), (16, 1, 8, 8)


def _resnet18():
    return ResNet18(), (8, 3, 32, 32)


def _grouped():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)), (8, 3, 8, 8)


def _embedding():
    """Token embedding (the generic projections-and-contraction path) and a Linear head over 6 positions."""
    return nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(16 * 6, 10)), None


@pytest.mark.parametrize("make", [_mlp, _resnet18, _grouped, _embedding],
                         ids=["mlp", "resnet18", "grouped_conv", "embedding"])
def test_steady_state_tracked_step_reads_nothing_back(monkeypatch, make):
    monkeypatch.setattr(tracker_module, "_DEFER_ON_CPU", True)
    torch.manual_seed(0)
    model, shape = make()
    x = torch.randint(0, 50, (8, 6)) if shape is None else torch.randn(*shape)
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm's coupling warning
        tracker = lipfast.Tracker(model, opt)
    counter = _Counter()
    with _counting(monkeypatch, counter):
        for i in range(6):
            counter.active = i >= 3  # warm-up: the cold spectra, the first checks (they read, once)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            counter.active = False
    assert not counter.reads, f"host reads inside steady-state tracked steps: {dict(counter.reads)}"
    records = tracker.records
    tracker.close()
    assert len(records) == 6 * len(tracker.captures)
    assert all(r["step"] == s for s in range(6) for r in records[s * len(tracker.captures):(s + 1) * len(tracker.captures)])
