"""The floor of a tracked step: how close to a plain step any hook-based tracker of this algorithm can get.

A staircase of variants, each on its own copy of the model, timed interleaved in whole ``every``-cycles:
- ``plain``: forward, backward, SGD step;
- ``hooks only``: a skeleton tracker that attaches what every hook-based tracker needs and nothing else:
  a forward hook per layer keeping its input and hooking its output's gradient, the optimizer's pre- and
  post-step hooks (all no-ops beyond that), detached over untracked steps as lipfast's are;
- ``hooks + GEMMs``: the same skeleton doing the algorithm's unavoidable products, each where lipfast does
  it: the per-sample GEMMs ``Vᵀ·Xᵀ``, ``Uᵀ·Dᵀ`` (rank 8, Linear layers) in the gradient hook, and one warm
  subspace sweep's ``W·Zᵀ``, ``Uᵀ·W`` (block + probe columns, every layer lipfast iterates) after the
  step; with ``every > 1`` a second sweep before the step (the spectrum went stale over the untracked
  steps). No Rayleigh–Ritz, no statistics, no records: those are what lipfast adds above this floor;
- ``lipfast``: ``lipfast.Tracker(rank=8)``;
- ``reference``: ``Tracker(implementation="reference")``, the same algorithm in plain torch ops: reference
  over floor is the most any tracker of this algorithm could gain on it over the whole step.
Rows for ``every=1`` and ``every=10``. The skeleton leaves out the per-sample work of Conv2d layers (it
would need the convolutions of ``persample_conv2d``), so for the CNN its floor is lower than the true one.

Usage: python bench/floor_step.py [--cases mlp,wide,cnn] [--threads 2] [--quick]
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_step import LR, make_case, run_cases, sgd_step, time_variants  # noqa: E402

import lipfast  # noqa: E402
from lipfast.functional import block_size, needs_exact  # noqa: E402

RANK = 8


class _Layer:
    """One layer's matrix and the random blocks the skeleton multiplies it with."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.W = module.weight.detach().reshape(module.weight.shape[0], -1)  # a view: sees every update
        m, n = self.W.shape
        k = min(RANK, m, n)
        self.linear = isinstance(module, nn.Linear)
        self.iterated = not needs_exact(m, n, RANK)
        cols = block_size(RANK, min(m, n)) + 1  # the block and the probe of the top pair
        self.Zt, self.Ut = torch.randn(cols, n), torch.randn(cols, m)
        self.Vk, self.Uk = torch.randn(k, n), torch.randn(k, m)


class Skeleton:
    """The least a hook-based tracker of lipfast's algorithm does; ``gemms=False``: its hooks only."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, gemms: bool) -> None:
        self.layers = [_Layer(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.every, self.gemms, self.step = every, gemms, 0
        self.handles: list = []
        optimizer.register_step_pre_hook(self._on_step_pre)
        optimizer.register_step_post_hook(self._on_step_post)
        self._attach(True)

    def _attach(self, on: bool) -> None:
        if on and not self.handles:
            self.handles = [layer.module.register_forward_hook(functools.partial(self._on_forward, layer))
                            for layer in self.layers]
        elif not on:
            for h in self.handles:
                h.remove()
            self.handles = []

    def _on_forward(self, layer: _Layer, module, args, output) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(functools.partial(self._on_grad, layer, args[0].detach()))

    def _on_grad(self, layer: _Layer, x, grad) -> None:
        if self.gemms and layer.linear:
            with torch.no_grad():
                layer.Vk.mm(x.reshape(-1, layer.W.shape[1]).t())
                layer.Uk.mm(grad.reshape(-1, layer.W.shape[0]).t())

    def _sweeps(self) -> None:
        with torch.no_grad():
            for layer in self.layers:
                if layer.iterated:
                    layer.W.mm(layer.Zt.t())
                    layer.Ut.mm(layer.W)

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if self.gemms and self.every > 1 and self.step % self.every == 0:
            self._sweeps()  # the stale spectrum's refresh

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        if self.gemms and self.step % self.every == 0:
            self._sweeps()
        self.step += 1
        self._attach(self.step % self.every == 0)


def run_case(name: str, args, min_run_time: float) -> list[H.Result]:
    model, X, y = make_case(name, args.quick)

    def variant(label: str, note: str = "", every: int = 1, skeleton: bool | None = None, tracker: str | None = None):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        if skeleton is not None:
            Skeleton(m, opt, every=every, gemms=skeleton)
        if tracker is not None:
            lipfast.Tracker(m, opt, rank=RANK, every=every, keep_records=False, implementation=tracker)
        return label, lambda: sgd_step(m, opt, X, y), note

    impls = [variant("plain")]
    for every in (1, 10):
        tag = "" if every == 1 else f" every={every}"
        impls += [variant(f"hooks only{tag}", "capture hooks, no work", every, skeleton=False),
                  variant(f"hooks + GEMMs{tag}", "the algorithm's products", every, skeleton=True),
                  variant(f"lipfast{tag}", "Tracker(rank=8)", every, tracker="compiled")]
    impls.append(variant("reference", "same algorithm, plain torch", tracker="reference"))
    return time_variants(name, X, impls, args, min_run_time)


def main() -> int:
    results = run_cases(__doc__.splitlines()[0], run_case, "floor_step")
    print("Ratios: the median of the per-round ratios, in brackets their quartiles over the rounds.")
    for name in dict.fromkeys(r.config.name for r in results):
        r = {x.impl: x for x in results if x.config.name == name}
        for tag in ("", " every=10"):
            steps = [H.format_ratio(r[f"{v}{tag}"], r["plain"], 3) for v in ("hooks only", "hooks + GEMMs", "lipfast")]
            print(f"{name}{tag or ' every=1'}: hooks only {steps[0]}, + the algorithm's GEMMs {steps[1]} (the floor), "
                  f"lipfast {steps[2]}")
        print(f"{name}: reference/lipfast {H.format_ratio(r['reference'], r['lipfast'])}, reference/floor "
              f"{H.format_ratio(r['reference'], r['hooks + GEMMs'])} (the most any tracker of this algorithm could reach)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
