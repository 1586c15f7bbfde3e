"""How many top-level ATen (and lipfast) ops a steady-state tracked step dispatches, against a plain step (issue
#20): on a GPU a tracked step's cost is mostly the launch of many small per-layer ops, so the count is the
CPU-checkable proxy of that cost.

Counted with a ``TorchDispatchMode`` around one ``zero_grad(); loss.backward(); optimizer.step()`` after three
warm-up steps (the forward, where lipfast only keeps a reference to each layer's input, is outside), CPU
float32. The budget per tracked layer is five ops: the three lipfast ops that do the work (``persample_*`` in
the backward, ``gradient_statistics`` before the step, ``track_update`` after it) and two to spare; one ``cat``
per step joins every layer's numbers for the read-back.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lipfast
from lipfast.models import ResNet18

BUDGET_PER_LAYER = 5
# AdamW: the step's preconditioner P must be formed before the step (the optimizer forms it only inside its own
# step): the second-moment update, square root, bias correction, eps, reciprocal and scale, seven elementwise
# ops on the weight's shape (lipfast.optim._adam), besides the SGD budget. (It also forms the known part m ⊙ P
# and reads the CPU step count: both fit in the SGD budget's two spare ops.)
ADAMW_BUDGET_PER_LAYER = BUDGET_PER_LAYER + 7


class _Count(TorchDispatchMode):
    """Counts every op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _mlp():
    return (nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10)), (64, 1, 28, 28))


def _resnet18():
    return ResNet18(), (16, 3, 32, 32)


MODELS = {"mlp": _mlp, "resnet18": _resnet18}
OPTIMIZERS = {"sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
              "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3)}


def count_step_ops(model_name: str, optimizer: str, tracked: bool, warmup: int = 3):
    """(ops of one steady-state step by name, tracked layers)."""
    torch.manual_seed(0)
    model, shape = MODELS[model_name]()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    opt = OPTIMIZERS[optimizer](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm's coupling warning
        tracker = lipfast.Tracker(model, opt) if tracked else None
    loss_fn = nn.CrossEntropyLoss()
    mode = _Count()
    try:
        for i in range(warmup + 1):
            loss = loss_fn(model(x), y)
            with mode if i == warmup else contextlib.nullcontext():
                opt.zero_grad()
                loss.backward()
                opt.step()
        layers = len(tracker.captures) if tracker else 0
        if tracker is not None:
            assert len(tracker.records) == layers * (warmup + 1), "every step tracked, every layer recorded"
    finally:
        if tracker is not None:
            tracker.close()
    return mode.ops, layers


def _report(plain, tracked, layers, budget) -> str:
    extra = tracked - plain
    return (f"tracked step {sum(tracked.values())} ops, plain {sum(plain.values())}, {layers} tracked layers: "
            f"{sum(extra.values())} extra ({sum(extra.values()) / max(layers, 1):.1f} a layer, budget {budget}); "
            f"extra ops: {', '.join(f'{k} ×{v}' for k, v in extra.most_common())}")


_CASES = [("mlp", "sgd_momentum", BUDGET_PER_LAYER), ("resnet18", "sgd_momentum", BUDGET_PER_LAYER),
          ("mlp", "adamw", ADAMW_BUDGET_PER_LAYER)]


@functools.lru_cache(maxsize=None)
def _counts(model_name, optimizer):
    plain, _ = count_step_ops(model_name, optimizer, tracked=False)
    tracked, layers = count_step_ops(model_name, optimizer, tracked=True)
    return plain, tracked, layers


@pytest.mark.parametrize("model_name, optimizer, budget", _CASES)
def test_tracked_step_ops_within_budget(model_name, optimizer, budget):
    """The issue's target, at most plain + budget·layers ops in a tracked step, and each tracked layer makes
    each of the three lipfast ops exactly once."""
    plain, tracked, layers = _counts(model_name, optimizer)
    assert layers == {"mlp": 3, "resnet18": 21}[model_name]
    extra = sum((tracked - plain).values())
    assert extra <= budget * layers, _report(plain, tracked, layers, budget)
    core = {k: v for k, v in tracked.items() if k.startswith("lipfast.")}
    assert core.get("lipfast.gradient_statistics") == layers and core.get("lipfast.track_update") == layers, core
    assert sum(v for k, v in core.items() if k.startswith("lipfast.persample")) == layers, core
