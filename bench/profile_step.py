"""Where a tracked step's extra time goes: the tracker's hooks and the ops inside them, timed in place.

Every hook of the tracker and every compiled op it calls is wrapped with a wall-clock timer while a model
trains (after warm-up steps), so the times are those of the real step: after the training step's large
GEMMs, with the caches they left (the ops run 1.5–2.5× slower there than alone in a loop). The wrappers
add a few µs per call; "python" is a hook's time minus the ops inside it.

Usage: python bench/profile_step.py [--case mlp|wide|cnn] [--steps 200] [--threads 2] [--quick]
"""

from __future__ import annotations

import collections
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_step import make_case  # noqa: E402

import lipfast  # noqa: E402
from lipfast import instrument, ops, tracker  # noqa: E402

# (owner, attribute, label, parent label): hooks first, then what runs inside them.
HOOKS = [
    (instrument.LayerCapture, "_on_forward", "forward hook", None),
    (instrument.LayerCapture, "_on_grad", "backward hook", None),
    (tracker.Tracker, "_on_step_pre", "optimizer pre-step hook", None),
    (tracker.Tracker, "_on_step_post", "optimizer post-step hook", None),
]
OPS = [
    ("persample_linear", "backward hook"),
    ("persample_conv2d", "backward hook"),
    ("gradient_statistics", "optimizer pre-step hook"),
    ("track_update", "optimizer post-step hook"),
]


def _wrap(owner, name: str, label: str, totals: dict) -> None:
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t

    setattr(owner, name, timed)


def _gemm_floor(model, plain, steps: int) -> tuple[float, float, int]:
    """Median µs of a plain step and of a plain step followed by the two sweep GEMMs of every layer the
    tracker iterates (rank 8: a block of block_size + 1 probe column), interleaved in rounds."""
    from lipfast.functional import block_size, needs_exact
    mats = [mod.weight.detach().reshape(mod.weight.shape[0], -1) for mod in model.modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    mats = [W for W in mats if not needs_exact(*W.shape, 8)]
    cols = block_size(8, min(mats[0].shape)) + 1 if mats else 0
    blocks = [(torch.randn(cols, W.shape[1]), torch.randn(cols, W.shape[0])) for W in mats]

    def with_gemms():
        plain()
        for W, (Z, U) in zip(mats, blocks):
            W.mm(Z.t())
            U.mm(W)

    rounds = {"plain": [], "floor": []}
    per_round = max(1, steps // 10)
    for _ in range(10):
        for label, fn in (("plain", plain), ("floor", with_gemms)):
            t = time.perf_counter()
            for _ in range(per_round):
                fn()
            rounds[label].append((time.perf_counter() - t) / per_round * 1e6)
    return statistics.median(rounds["plain"]), statistics.median(rounds["floor"]), cols


def main() -> int:
    p = H.make_parser(__doc__.splitlines()[0])
    p.add_argument("--case", default="mlp", choices=["mlp", "wide", "cnn"])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    H.setup(args)
    steps = 5 if args.quick else args.steps
    model, X, y = make_case(args.case, args.quick)

    def stepper(m, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(X), y).backward()
            opt.step()
        return step

    plain_model = copy.deepcopy(model)
    plain = stepper(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.01))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracked = stepper(model, opt)
    totals: dict[str, float] = collections.defaultdict(float)
    for owner, name, label, _ in HOOKS:
        _wrap(owner, name, label, totals)
    for name, _ in OPS:
        _wrap(ops, name, name, totals)
    floor = _gemm_floor(plain_model, plain, steps)
    with lipfast.Tracker(model, opt, rank=8, keep_records=False):
        for _ in range(3 if args.quick else 20):   # warm-up: the cold spectra, the allocator
            tracked()
            plain()
        totals.clear()
        wall = {"plain": 0.0, "tracked": 0.0}
        for _ in range(steps):  # interleaved, so that machine drift hits both alike
            for label, fn in (("plain", plain), ("tracked", tracked)):
                t = time.perf_counter()
                fn()
                wall[label] += time.perf_counter() - t
    us = {k: v / steps * 1e6 for k, v in totals.items()}
    print("\n".join(H.environment_lines("cpu")))
    print(f"case: {args.case} (batch {X.shape[0]}), {steps} steps, rank 8, every step\n")
    print("| where | µs per step | of which in lipfast ops | python and small tensor ops |")
    print("|---|---|---|---|")
    for _, _, label, _ in HOOKS:
        inside = sum(us.get(op, 0.0) for op, parent in OPS if parent == label)
        print(f"| {label} | {us.get(label, 0.0):.0f} | {inside:.0f} | {us.get(label, 0.0) - inside:.0f} |")
    for name, parent in OPS:
        if name in us:
            print(f"| … {name} (in the {parent}) | {us[name]:.0f} | | |")
    hooks = sum(us.get(label, 0.0) for _, _, label, _ in HOOKS)
    plain_us, tracked_us = (wall[k] / steps * 1e6 for k in ("plain", "tracked"))
    print(f"\nplain step {plain_us:.0f} µs, tracked step {tracked_us:.0f} µs ({tracked_us / plain_us:.2f}×); "
          f"the hooks account for {hooks:.0f} µs of the {tracked_us - plain_us:.0f} µs difference")
    print(f"floor: a plain step followed by only the subspace sweep's two GEMMs per layer (W·Zᵀ and Uᵀ·W, "
          f"{floor[2]} columns, the layers the tracker iterates) takes {floor[1]:.0f} µs against {floor[0]:.0f} µs "
          f"({floor[1] / floor[0]:.2f}×): what one warm sweep per layer and step costs before anything else")
    return 0


if __name__ == "__main__":
    sys.exit(main())
