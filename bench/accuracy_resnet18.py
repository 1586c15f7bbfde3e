"""How far the tracker's σ1 is from the exact largest singular value on a real convnet, and what accuracy costs.

ResNet-18 (torchvision's layout, lipfast.models.ResNet18), random initialisation, SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 16 of 3x32x32 random data, float32, 30 steps; every tracked layer's exact σ1
(LAPACK, float64) before every ``--check-every``-th step. For each ``--iters`` budget: the tracked step's median
time next to an untracked step's (interleaved in one process), the worst relative error of σ1, the errors of
the records that carry no ``unconverged`` flag, the share of records with finite forces, and the flags.

Usage: python bench/accuracy_resnet18.py [--iters 1,4,default] [--steps 30] [--check-every 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import lipfast
from lipfast.models import ResNet18


def run(iters: int | None, steps: int, check_every: int) -> dict:
    torch.manual_seed(0)
    model, plain = ResNet18(), ResNet18()
    plain.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    kwargs = {} if iters is None else {"iters": iters}
    with warnings.catch_warnings():  # the BatchNorm notice: expected here, said once in the docstring
        warnings.simplefilter("ignore", lipfast.LipfastWarning)
        tracker = lipfast.Tracker(model, opt, **kwargs)
    g = torch.Generator().manual_seed(1)
    exact, t_tracked, t_plain = {}, [], []
    weights = {name: cap.weight for name, cap in tracker.captures.items()}
    for step in range(steps):
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        for m, o, times in ((plain, opt_plain, t_plain), (model, opt, t_tracked)):
            t0 = time.perf_counter()
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if m is model and step % check_every == 0:
                t_check = time.perf_counter()
                with torch.no_grad():
                    for name, w in weights.items():
                        exact[(step, name)] = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), 2))
                t0 += time.perf_counter() - t_check  # the check is not the tracker's cost
            o.step()
            times.append(time.perf_counter() - t0)
    records = tracker.records
    tracker.close()
    errors = [((exact[(r["step"], r["layer"])] - r["sigma"]) / exact[(r["step"], r["layer"])], r)
              for r in records if (r["step"], r["layer"]) in exact]
    unflagged = [e for e, r in errors if "unconverged" not in r["flag_names"]]
    warm = slice(1, None)  # step 0 is the cold start
    return dict(
        ratio=statistics.median(t_tracked[warm]) / statistics.median(t_plain[warm]),
        worst=max(e for e, _ in errors),
        worst_unflagged=max(unflagged, default=0.0),
        off_unflagged=sum(e > 1e-3 for e in unflagged),
        checked=len(errors),
        finite=sum(all(math.isfinite(r[f]) for f in ("drift", "diffusion_var", "ito")) for r in records) / len(records),
        flags=collections.Counter(f for r in records for f in r["flag_names"].split(";") if f),
        n=len(records),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", default="1,default", help="comma-separated sweep budgets ('default': the Tracker's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--check-every", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 steps, every step checked (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.check_every = 3, 1
    torch.set_num_threads(args.threads)
    print(f"lipfast {lipfast.__version__}, torch {torch.__version__}, {args.threads} threads, {args.steps} steps")
    print("iters    tracked/plain  worst σ1 error  worst unflagged  unflagged >1e-3  finite forces  flags")
    for it in args.iters.split(","):
        iters = None if it == "default" else int(it)
        r = run(iters, args.steps, args.check_every)
        print(f"{it:8} {r['ratio']:12.2f}x  {r['worst']:14.2e}  {r['worst_unflagged']:15.2e}  "
              f"{r['off_unflagged']:6d} of {r['checked']:4d}  {r['finite']:12.1%}  {dict(r['flags'])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
