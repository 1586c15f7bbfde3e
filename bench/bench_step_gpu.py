"""A whole training step on the GPU: plain vs lipfast-tracked (rank 8, every step and every 10th step).

Cases (issue 7): the MLP 784-512-512-10 and a ResNet-18-like network (CIFAR layout: 3x3 stem, four
stages of two BasicBlocks with 64/128/256/512 channels, BatchNorm, global average pool; 21 tracked
Conv2d/Linear layers) on 3x32x32 inputs, batch 256, SGD with momentum; and (issue 20) ``gpt``, a GPT-2-small
scale decoder of nn.Linear blocks (12 blocks, d = 768, 12 heads, causal attention, sequence 256, vocabulary
50257, untied head; 50 tracked layers: the token embedding, each block's qkv/proj/fc1/fc2, the head; the
learned positions are a bare Parameter, listed in ``tracker.skipped``), batch ``--gpt-batch``. Each variant
trains its own copy of the same model (same initialisation, same batch); the variants are timed interleaved
with ``torch.utils.benchmark`` (which synchronises CUDA around every measurement, bench/_harness.py), in
blocks of whole 10-step cycles, so that ``every=10`` counts its one tracked step in ten in every block.
Besides time: peak GPU memory, and the ops each step dispatches (plain vs tracked: each at least one launch on
a GPU; counted with a TorchDispatchMode, bench/_harness.py ``count_ops``).

Correctness first: one tracked step with the compiled ops and one with ``implementation="reference"``
(the same algorithm in plain torch ops) must give the same records. Peak GPU memory of a step is
reported next to the time. The BatchNorm layers are not tracked, and with them the per-sample
statistics are each sample's share of the batch gradient (the tracker warns; silenced here).

Usage:
    python bench/bench_step_gpu.py [--device cuda] [--quick] [--cases mlp,resnet18,gpt] [--batch 256]
                                   [--gpt-batch 32] [--out DIR]
``--device cpu --quick`` (the default without a GPU) is a dry run of the same code on the CPU: tiny batches
(8; 2 sequences for ``gpt``), a ResNet-18 of 1/8 the width, one timing round,
and a tiny decoder (2 blocks, d = 32, sequence 16, vocabulary 64) for ``gpt``. ``--out`` (default:
``$OUT`` when set) saves the printed report as ``bench_step_gpu.md`` and the rows as JSON there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lipfast  # noqa: E402
from lipfast import models  # noqa: E402

LR = 0.01
RANK = 8
CASES = ("mlp", "resnet18", "gpt")
# GPT-2 small's shape (the vocabulary, sequence and depth of the case); --quick: a tiny one on the CPU.
GPT = dict(layers=12, d=768, heads=12, seq=256, vocab=50257)
GPT_QUICK = dict(layers=2, d=32, heads=4, seq=16, vocab=64)


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR-sized inputs from lipfast.models.BasicBlock: [B, 3, 32, 32] -> [B, classes]."""

    def __init__(self, n_classes: int = 10, widths=(64, 128, 256, 512), blocks_per_stage: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(models.BasicBlock(channels, width, stride, batchnorm=True))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class DecoderBlock(nn.Module):
    """A pre-LayerNorm GPT block of nn.Linear maps: causal self-attention (qkv in one map, then proj), and a
    4×-wide GELU MLP (fc1, fc2). Input and output [B, T, d]."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style decoder: token embedding plus learned positions (a bare Parameter [T, d], not a layer
    lipfast tracks), ``layers`` DecoderBlocks, a final LayerNorm and an untied Linear head: [B, T] tokens ->
    [B, T, vocab] logits."""

    def __init__(self, layers: int, d: int, heads: int, seq: int, vocab: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.Sequential(*[DecoderBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        return self.head(self.ln(self.blocks(self.tok(tokens) + self.pos[: tokens.shape[1]])))


def loss_fn(logits, y):
    """Cross-entropy over classes, or over every position of a sequence's logits [B, T, V]."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten()) if logits.dim() == 3 else F.cross_entropy(logits, y)


def make_case(name: str, batch: int, device: str, quick: bool = False):
    """(model, X, y) on ``device``; inputs drawn on the CPU with a fixed seed."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        shape = GPT_QUICK if quick else GPT
        torch.manual_seed(0)
        model = GPT(**shape)
        X = torch.randint(0, shape["vocab"], (batch, shape["seq"]), generator=g)
        y = torch.randint(0, shape["vocab"], (batch, shape["seq"]), generator=g)
        return model.to(device), X.to(device), y.to(device)
    if name == "mlp":
        model, shape = models.build_model("mlp", (784,), 10, widths=(512, 512), seed=0), (784,)
    elif name == "resnet18":
        torch.manual_seed(0)  # --quick: the same network at 1/8 of the width
        model, shape = ResNet18(widths=(8, 16, 32, 64) if quick else (64, 128, 256, 512)), (3, 32, 32)
    else:
        raise SystemExit(f"bench_step_gpu: unknown case {name!r} (choose from {', '.join(CASES)})")
    X = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.to(device), X.to(device), y.to(device)


def sgd_step(model, opt, X, y):
    opt.zero_grad(set_to_none=True)
    loss_fn(model(X), y).backward()
    opt.step()


def check_correctness(model, X, y) -> int:
    """The compiled tracker's step-0 records equal the reference tracker's; returns the layer count. TF32 is
    off meanwhile: a convolution or GEMM on TF32 tensor cores rounds to ~1e-3, which the reference's
    convolutions would and a kernel summing in float64 would not."""
    with _full_float32():
        return _compare_implementations(model, X, y)


@contextlib.contextmanager
def _full_float32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _compare_implementations(model, X, y) -> int:
    recs = {}
    for impl in ("compiled", "reference"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
        with lipfast.Tracker(m, opt, rank=RANK, implementation=impl, gap_tol=0, step_tol=math.inf) as tr:
            sgd_step(m, opt, X, y)
            _check_tracked(m, tr)
        recs[impl] = {r["layer"]: r for r in tr.records}
    assert recs["compiled"].keys() == recs["reference"].keys() and recs["compiled"], "no tracked layers"
    for layer, r in recs["compiled"].items():
        ref = recs["reference"][layer]
        for f in ("sigma", "drift", "diffusion_var", "ito"):
            # float32 GEMMs in a different order (and cuDNN's convolution algorithms): rounding-level.
            H.assert_close(torch.tensor(r[f]), torch.tensor(ref[f]), rtol=1e-3, atol=1e-5,
                           what=f"{layer}.{f} compiled vs reference")
    return len(recs["compiled"])


def _check_tracked(model, tracker) -> None:
    """Every nn.Linear, nn.Conv2d and nn.Embedding of the model is tracked: what is skipped is BatchNorm and
    LayerNorm (a scale vector, no matrix) and bare Parameters (the decoder's positions), nothing a case means
    to measure."""
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))}
    missing = layers - set(tracker.captures)
    assert not missing, f"not tracked: {sorted(missing)} ({tracker.skipped})"
    assert all(why.startswith(("BatchNorm", "LayerNorm")) or "bare Parameter" in why
               for why in tracker.skipped.values()), tracker.skipped


def peak_memory(step, device: str, calls: int = 3) -> float:
    """Peak allocated GPU memory over ``calls`` steps, MiB (NaN on the CPU)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def run_case(name: str, args, device: str, min_run_time: float):
    batch = args.gpt_batch if name == "gpt" else args.batch
    batch = batch if not args.quick else min(batch, 2 if name == "gpt" else 8)
    model, X, y = make_case(name, batch, device, args.quick)
    t0 = time.perf_counter()
    layers = check_correctness(model, X, y)
    check_s = time.perf_counter() - t0

    def variant(label, note, **tracker_kw):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
        if tracker_kw:
            lipfast.Tracker(m, opt, keep_records=False, **tracker_kw)
        return (label, lambda: sgd_step(m, opt, X, y), note)

    impls = [variant("plain", ""), variant("tracked", f"rank {RANK}, every step, {layers} layers", rank=RANK, every=1),
             variant("tracked every 10", f"rank {RANK}, every 10th step", rank=RANK, every=10)]
    for label, fn, _ in impls:  # warm: the tracker's first spectra are cold (up to 100 sweeps); whole cycles
        for _ in range(3 if args.quick else 10):
            fn()
    # The ops a tracked step dispatches against a plain one (every=1: each step is tracked).
    ops = {label: H.count_ops(fn) for label, fn, _ in impls[:2]}
    memory = {label: peak_memory(fn, device, calls=10) for label, fn, _ in impls}
    impls = [(label, fn, note + (f"; peak {memory[label]:.0f} MiB" if device == "cuda" else ""))
             for label, fn, note in impls]
    config = H.Config(name=f"{name} B={batch}", params={"batch": batch}, device=device)
    rounds = 1 if args.quick else 7
    results = H.time_interleaved(config, impls, min_run_time=min_run_time, rounds=rounds,
                                 warmup=0 if args.quick else 10, block_multiple=10)
    return results, {"case": name, "batch": batch, "layers": layers, "correctness_check_s": round(check_s, 2),
                     "peak_mib": memory, "ops_per_step": {k: sum(v.values()) for k, v in ops.items()},
                     "ops_line": f"{config.name}: " + H.format_op_counts(ops["plain"], ops["tracked"], layers)}


def main() -> int:
    p = H.make_parser(__doc__.splitlines()[0])
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256; 8 with --quick)")
    p.add_argument("--gpt-batch", type=int, default=32,
                   help="the gpt case's batch of sequences (default 32, a guess for an 80 GB card, not measured; "
                        "2 with --quick)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for bench_step_gpu.md and .json (default: $OUT when set)")
    args = p.parse_args()
    device, dtype, min_run_time = H.setup(args)
    if dtype != torch.float32:
        raise SystemExit("bench_step_gpu: the step benchmark runs float32 models (--dtype float32)")
    # BatchNorm layers are not tracked (logged once per tracker) and make the per-sample statistics
    # shares of the batch gradient (a LipfastWarning): true, and beside the point of a cost benchmark.
    logging.getLogger("lipfast").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*BatchNorm.*", category=lipfast.LipfastWarning)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as a training script would; the warm-up steps absorb it
    start = time.perf_counter()
    results, extra = [], []
    for name in args.cases.split(","):
        rows, info = run_case(name.strip(), args, device, min_run_time * (1 if args.quick else 2))
        results += rows
        extra.append(info)
    env = H.environment_lines(device, {
        "dtype": f"float32 (torch.get_float32_matmul_precision() = {torch.get_float32_matmul_precision()!r}; "
                 "torch defaults otherwise, so cuDNN convolutions may use TF32)" if device == "cuda" else "float32",
        "timing": f"{1 if args.quick else 7} interleaved rounds of torch.utils.benchmark.Timer.timeit"
                  + (" (synchronises CUDA)" if device == "cuda" else "") + "; median and IQR over the rounds",
        "wall time": f"{time.perf_counter() - start:.0f} s"})
    lines = env + ["", H.format_table(results, baseline="plain"), ""]
    lines.append("Ratios: the median of the per-round ratios, in brackets their quartiles over the rounds.")
    for name in dict.fromkeys(r.config.name for r in results):
        r = {x.impl: x for x in results if x.config.name == name}
        lines.append(f"{name}: tracked/plain {H.format_ratio(r['tracked'], r['plain'])}, every 10 "
                     f"{H.format_ratio(r['tracked every 10'], r['plain'])}")
    lines += ["", "Ops dispatched per step (top level; a lipfast op's inner launches not counted):"]
    lines += [info["ops_line"] for info in extra]
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_step_gpu.md").write_text(report + "\n")
        rows = [{"case": r.config.name, "impl": r.impl, "median_s": r.median_s, "iqr_s": r.iqr_s, "runs": r.runs,
                 "note": r.note} for r in results]
        (out / "bench_step_gpu.json").write_text(json.dumps({"environment": env, "rows": rows, "cases": extra},
                                                            indent=2, default=str) + "\n")
        print(f"\nsaved {out / 'bench_step_gpu.md'} and bench_step_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
