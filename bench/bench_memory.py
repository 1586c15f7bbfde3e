"""Peak tensor memory of one training step: plain vs lipfast-tracked vs materialised per-sample gradients.

Measured with ``torch.profiler(profile_memory=True)``, which sees every CPU allocation, C++ kernels
included, and stamps it with the allocator's running total: everything of a run (model, data, optimizer,
tracker, steps) is allocated inside one profiling window, so that total minus its value at the window's
start is the exact live tensor memory at every moment. The peak of the last (steady-state) step counts.

Usage: python bench/bench_memory.py [--quick] [--batch 512] [--no-vmap]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lipfast  # noqa: E402
from lipfast import models  # noqa: E402


def peak_of_run(variant: str, batch: int, steps: int) -> int:
    def run():
        model = models.build_model("mlp", (784,), 10, widths=(512, 512), seed=0)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if variant.endswith("adamw")
               else torch.optim.SGD(model.parameters(), lr=0.01))
        tracker = None
        if variant.startswith("tracked"):
            impl = "reference" if variant == "tracked (reference)" else "compiled"
            tracker = lipfast.Tracker(model, opt, rank=8, keep_records=False, implementation=impl)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss1(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        loss = None
        for i in range(steps):
            with record_function(f"bench_step_{i}"):
                opt.zero_grad(set_to_none=True)
                if variant == "per-sample grads (vmap)":
                    per_sample = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)  # noqa: F841
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                per_sample = None  # noqa: F841
        if tracker is not None:
            tracker.close()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["args"]["Ev Idx"])
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    a, b = next((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == f"bench_step_{steps - 1}")
    return max(e["args"]["Total Allocated"] - start for e in mem if a <= e["ts"] <= b)


def main() -> int:
    p = H.make_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--no-vmap", action="store_true", help="skip the materialised per-sample gradients (slow)")
    args = p.parse_args()
    device, _, _ = H.setup(args)
    if device != "cpu":
        raise SystemExit("bench_memory: CPU only (on a GPU use torch.cuda.max_memory_allocated)")
    batch = 64 if args.quick else args.batch
    # AdamW: the tracker holds every layer's inputs and output-gradients until the step (MATH.md §7).
    variants = (["plain", "tracked", "tracked (reference)", "plain adamw", "tracked adamw"]
                + ([] if args.quick or args.no_vmap else ["per-sample grads (vmap)"]))
    peaks = {v: peak_of_run(v, batch, steps=3) for v in variants}
    print("\n".join(H.environment_lines(device, {"model": f"MLP 784-512-512-10, float32, batch {batch}"})))
    print()
    print("| variant | peak tensor memory of a step | × plain |")
    print("|---|---|---|")
    for v, b in peaks.items():
        print(f"| {v} | {b / 2**20:.2f} MiB | {b / peaks['plain']:.2f}× |")
    ratio = peaks["tracked"] / peaks["plain"]
    print(f"\ntracked/plain peak: {ratio:.3f}× (target <= 1.10×); AdamW: tracked/plain peak "
          f"{peaks['tracked adamw'] / peaks['plain adamw']:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
