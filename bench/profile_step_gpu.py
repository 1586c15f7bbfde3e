"""Where a tracked step's extra GPU time goes: torch.profiler over a few plain and tracked steps.

For each case of bench_step_gpu.py (same models, batch and optimizer), after warm-up steps, profiles
``--steps`` plain steps and ``--steps`` tracked steps (rank 8, every step) with CPU and CUDA activities.
The tracker's hooks run inside ``record_function`` labels, so their host time (Python plus kernel
launches) shows up by name. Printed per step: wall time, summed kernel time, host-device
synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / device-to-host copies / ``.item()``),
kernel launches; then the tracked step's top kernels and the hooks' host time. A tracked step whose wall
time exceeds its kernel time by far is bound by launches and Python, one with syncs stalls the queue.

Usage: python bench/profile_step_gpu.py [--cases mlp,resnet18] [--batch 256] [--steps 5] [--out DIR]
(``--device cpu --quick`` dry-runs it on the CPU: the kernel columns are then empty).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_step_gpu import CASES, LR, RANK, make_case, sgd_step  # noqa: E402

import lipfast  # noqa: E402
from lipfast import instrument, tracker  # noqa: E402

HOOKS = [
    (instrument.LayerCapture, "_on_forward", "lipfast: forward hook"),
    (instrument.LayerCapture, "_on_grad", "lipfast: backward hook"),
    (tracker.Tracker, "_on_step_pre", "lipfast: optimizer pre-step hook"),
    (tracker.Tracker, "_on_step_post", "lipfast: optimizer post-step hook"),
]
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def label_hooks() -> None:
    """Run every tracker hook inside a profiler label (the wrapper costs a few µs per call)."""
    for owner, name, label in HOOKS:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def labelled(*args, _fn=fn, _label=label, **kwargs):
            with record_function(_label):
                return _fn(*args, **kwargs)

        setattr(owner, name, labelled)


def profile_steps(step, steps: int, device: str):
    """(profiler, wall seconds per step) over ``steps`` calls of ``step`` after synchronising."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - t)
    return prof, statistics.median(walls)


def summarise(prof, steps: int) -> dict:
    # Device activity (kernels, copies, memsets): not the record_function labels' GPU-side spans.
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events()
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / steps
    events = prof.key_averages()
    counts = {name: 0 for name in SYNC_EVENTS}
    copies = launches = 0
    for e in events:
        if e.key in counts:
            counts[e.key] += e.count
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            launches += e.count
        if e.key == "cudaMemcpyAsync":
            copies += e.count  # every copy the host issues (a device-to-host one into pageable memory blocks)
    return {"kernel_us": kernel_us, "launches": launches / steps, "memcpy": copies / steps,
            **{k: v / steps for k, v in counts.items()}}


def run_case(name: str, args, device: str) -> list[str]:
    batch = args.batch if not args.quick else min(args.batch, 8)
    model, X, y = make_case(name, batch, device)
    steppers = {}
    for label in ("plain", "tracked"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
        if label == "tracked":
            lipfast.Tracker(m, opt, rank=RANK, every=1, keep_records=False)
        steppers[label] = functools.partial(sgd_step, m, opt, X, y)
        for _ in range(5):  # warm: cold spectra, cuDNN autotuning, allocator
            steppers[label]()
    out = [f"## {name}, batch {batch}, {args.steps} profiled steps each", "",
           "| variant | wall ms/step | kernel ms/step | launches/step | cudaMemcpyAsync/step | "
           + " | ".join(f"{k}/step" for k in SYNC_EVENTS) + " |",
           "|---" * (5 + len(SYNC_EVENTS)) + "|"]
    profs = {}
    for label, step in steppers.items():
        prof, wall = profile_steps(step, args.steps, device)
        profs[label] = prof
        s = summarise(prof, args.steps)
        out.append(f"| {label} | {wall * 1e3:.2f} | {s['kernel_us'] / 1e3:.2f} | {s['launches']:.0f} | "
                   f"{s['memcpy']:.0f} | " + " | ".join(f"{s[k]:.1f}" for k in SYNC_EVENTS) + " |")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    out += ["", f"tracked step, top ops by {sort} (all {args.steps} steps):", "```",
            profs["tracked"].key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), "```",
            "", "tracked step, the tracker's hooks (host time includes the launches inside them):", "```"]
    for e in profs["tracked"].key_averages():
        if e.key.startswith("lipfast:") and e.cpu_time_total > 0:  # host spans (not their GPU-side twins)
            out.append(f"{e.key:40s} calls/step {e.count / args.steps:5.1f}  host ms/step "
                       f"{e.cpu_time_total / args.steps / 1e3:7.3f}")
    out += ["```", ""]
    return out


def main() -> int:
    p = H.make_parser(__doc__.splitlines()[0])
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant (default 5)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for profile_step_gpu.md")
    args = p.parse_args()
    device, _, _ = H.setup(args)
    logging.getLogger("lipfast").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*BatchNorm.*", category=lipfast.LipfastWarning)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    label_hooks()
    lines = H.environment_lines(device, {}) + [""]
    for name in args.cases.split(","):
        lines += run_case(name.strip(), args, device)
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_step_gpu.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
