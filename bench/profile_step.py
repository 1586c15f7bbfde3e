"""Where a tracked step's extra time goes: the tracker's hooks and the ops inside them, timed in place,
and how many ops a tracked step dispatches against a plain one (each a launch on a GPU).

Every hook of the tracker and every compiled op it calls is wrapped with a wall-clock timer while a model
trains (after warm-up steps), so the times are those of the real step: after the training step's large
GEMMs, with the caches they left (the ops run 1.5–2.5× slower there than alone in a loop). The wrappers
add a few µs per call; "python" is a hook's time minus the ops inside it.

The floor under all of it, what any hook-based tracker of this algorithm costs, is bench/floor_step.py.

Usage: python bench/profile_step.py [--case mlp|wide|cnn] [--steps 200] [--threads 2] [--quick]
"""

from __future__ import annotations

import collections
import copy
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
    with lipfast.Tracker(model, opt, rank=8, keep_records=False) as tr:
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
        # The ops each step dispatches (forward included), counted after the timing: the count, not the time,
        # is what carries over to a GPU, where each op is a launch.
        plain_ops, tracked_ops = H.count_ops(plain), H.count_ops(tracked)
        layers = len(tr.captures)
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
          f"the hooks account for {hooks:.0f} µs of the {tracked_us - plain_us:.0f} µs difference "
          "(bench/floor_step.py: how much of it any tracker of this algorithm must spend)")
    print(H.format_op_counts(plain_ops, tracked_ops, layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
