"""How many top-level ATen (and lipfast) ops a steady-state tracked step dispatches, against a plain step (issue
#20): on a GPU a tracked step's cost is mostly the launch of many small per-layer ops, so the count is the
CPU-checkable proxy of that cost.

Counted with a ``TorchDispatchMode`` around one ``zero_grad(); loss.backward(); optimizer.step()`` after three
warm-up steps (the forward, where lipfast only keeps a reference to each layer's input, is outside), CPU
float32. The budget per tracked layer is five ops: the three lipfast ops that do the work (``persample_*`` in
the backward, ``gradient_statistics`` before the step, ``track_update`` after it) and two to spare; one ``cat``
per step joins every layer's numbers for the read-back.

The ops of ``_top_pair_overlap`` and ``_top_residuals`` (lipfast/tracker.py) are moving into
``track_update``'s statistics on another branch; until they have, the real target is xfailed while the budget
without them is asserted.
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
from lipfast import tracker as tracker_module
from lipfast.models import ResNet18

BUDGET_PER_LAYER = 5
# AdamW: the step's preconditioner P must be formed before the step (the optimizer forms it only inside its own
# step): the second-moment update, square root, bias correction, eps, reciprocal and scale, seven elementwise
# ops on the weight's shape (lipfast.optim._adam), besides the SGD budget. (It also forms the known part m ⊙ P
# and reads the CPU step count: both fit in the SGD budget's two spare ops.)
ADAMW_BUDGET_PER_LAYER = BUDGET_PER_LAYER + 7
# The functions whose ops are moving into track_update (counted apart while they exist).
MOVING = ("_top_pair_overlap", "_top_residuals")


class _Count(TorchDispatchMode):
    """Counts every op dispatched while active, by name; ``moving`` those issued inside :data:`MOVING`."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.moving: collections.Counter = collections.Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if self.inside:
            self.moving[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _attribute_moving(mode: _Count):
    """Wrap the moving functions (those that still exist) so that their ops are counted apart."""
    saved = {}
    for name in MOVING:
        fn = getattr(tracker_module, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, **kwargs):
            mode.inside += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                mode.inside -= 1

        saved[name] = fn
        setattr(tracker_module, name, wrapper)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tracker_module, name, fn)


def _mlp():
    return (nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10)), (64, 1, 28, 28))


def _resnet18():
    return ResNet18(), (16, 3, 32, 32)


MODELS = {"mlp": _mlp, "resnet18": _resnet18}
OPTIMIZERS = {"sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
              "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3)}


def count_step_ops(model_name: str, optimizer: str, tracked: bool, warmup: int = 3):
    """(ops of one steady-state step by name, those of them from the moving functions, tracked layers)."""
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
            with _attribute_moving(mode), (mode if i == warmup else contextlib.nullcontext()):
                opt.zero_grad()
                loss.backward()
                opt.step()
        layers = len(tracker.captures) if tracker else 0
        if tracker is not None:
            assert len(tracker.records) == layers * (warmup + 1), "every step tracked, every layer recorded"
    finally:
        if tracker is not None:
            tracker.close()
    return mode.ops, mode.moving, layers


def _report(plain, tracked, moving, layers, budget) -> str:
    extra = tracked - plain
    return (f"tracked step {sum(tracked.values())} ops, plain {sum(plain.values())}, {layers} tracked layers: "
            f"{sum(extra.values())} extra ({sum(extra.values()) / max(layers, 1):.1f} a layer, budget {budget}); "
            f"extra ops: {', '.join(f'{k} ×{v}' for k, v in extra.most_common())}"
            + (f"; of them from {'/'.join(MOVING)}: {', '.join(f'{k} ×{v}' for k, v in moving.most_common())}"
               if moving else ""))


_CASES = [("mlp", "sgd_momentum", BUDGET_PER_LAYER), ("resnet18", "sgd_momentum", BUDGET_PER_LAYER),
          ("mlp", "adamw", ADAMW_BUDGET_PER_LAYER)]


@functools.lru_cache(maxsize=None)
def _counts(model_name, optimizer):
    plain, _, _ = count_step_ops(model_name, optimizer, tracked=False)
    tracked, moving, layers = count_step_ops(model_name, optimizer, tracked=True)
    return plain, tracked, moving, layers


@pytest.mark.parametrize("model_name, optimizer, budget", _CASES)
def test_tracked_step_ops_within_budget_besides_the_moving_ones(model_name, optimizer, budget):
    """Everything but the moving functions' ops fits the budget, and each tracked layer makes each of the
    three lipfast ops exactly once."""
    plain, tracked, moving, layers = _counts(model_name, optimizer)
    assert layers == {"mlp": 3, "resnet18": 21}[model_name]
    extra = sum((tracked - plain).values()) - sum(moving.values())
    assert extra <= budget * layers, _report(plain, tracked, moving, layers, budget)
    core = {k: v for k, v in tracked.items() if k.startswith("lipfast.")}
    assert core.get("lipfast.gradient_statistics") == layers and core.get("lipfast.track_update") == layers, core
    assert sum(v for k, v in core.items() if k.startswith("lipfast.persample")) == layers, core


@pytest.mark.parametrize("model_name, optimizer, budget", _CASES)
def test_tracked_step_ops_within_budget(model_name, optimizer, budget):
    """The issue's target: at most plain + budget·layers ops in a tracked step."""
    plain, tracked, moving, layers = _counts(model_name, optimizer)
    extra = sum((tracked - plain).values())
    if extra <= budget * layers:
        return
    message = _report(plain, tracked, moving, layers, budget)
    if moving and extra - sum(moving.values()) <= budget * layers:
        pytest.xfail(f"over budget by the ops of {'/'.join(MOVING)} only, which move into track_update on another "
                     f"branch: {message}")
    pytest.fail(message)
