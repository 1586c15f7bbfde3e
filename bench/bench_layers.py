"""The cost of tracking per layer kind: one small model per kind (lipfast.adapters), a plain SGD step vs the
same step with a Tracker that tracks only the layers of that kind (``layers=``), timed interleaved
(bench/_harness.py). Correctness of every kind is in tests/test_layers.py; here each tracked step must give a
finite record of the kind before anything is timed.

Usage: python bench/bench_layers.py [--quick] [--threads 2] [--cases linear,conv2d,...]
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lipfast  # noqa: E402

LR = 0.01
CASES = ("linear", "conv2d", "conv1d", "depthwise", "embedding", "tied", "attention", "hf_conv1d")


class Pool(nn.Module):
    """The mean over every dim between the sample and the feature dim (or the channel dim of a conv)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(dim=self.dims)


class TiedLM(nn.Module):
    def __init__(self, V, d):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens))).mean(dim=1)


class Attention(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 4, batch_first=True)
        self.head = nn.Linear(E, 10)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def make_case(name: str, quick: bool):
    """(model, input, labels, layers predicate, what the tracked part is)."""
    g = torch.Generator().manual_seed(0)
    B = 16 if quick else 64
    torch.manual_seed(0)
    if name == "linear":
        model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        x, keep, what = torch.randn(B, 256, generator=g), ("0",), "256x256"
    elif name == "conv2d":
        model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), Pool((2, 3)), nn.Linear(32, 10))
        x, keep, what = torch.randn(B, 32, 16, 16, generator=g), ("0",), "32→32, 3x3, 16x16"
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(64, 64, 5, padding=2), Pool((2,)), nn.Linear(64, 10))
        x, keep, what = torch.randn(B, 64, 128, generator=g), ("0",), "64→64, k=5, L=128"
    elif name == "depthwise":
        model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), Pool((2, 3)), nn.Linear(64, 10))
        x, keep, what = torch.randn(B, 64, 16, 16, generator=g), ("0",), "64 groups, 3x3, 16x16"
    elif name == "embedding":
        model = nn.Sequential(nn.Embedding(1000, 64), Pool((1,)), nn.Linear(64, 10))
        x, keep, what = torch.randint(0, 1000, (B, 32), generator=g), ("0",), "V=1000, d=64, T=32"
    elif name == "tied":
        model = TiedLM(1000, 64)
        x, keep, what = torch.randint(0, 1000, (B, 32), generator=g), ("emb",), "V=1000, d=64, T=32, 2 uses"
    elif name == "attention":
        model = Attention(64)
        x, keep, what = torch.randn(B, 32, 64, generator=g), ("attn",), "E=64, T=32: q, k, v, out_proj"
    elif name == "hf_conv1d":
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:
            return None
        model = nn.Sequential(Conv1D(256, 64), nn.Tanh(), Pool((1,)), nn.Linear(256, 10))
        x, keep, what = torch.randn(B, 32, 64, generator=g), ("0",), "64→256, T=32"
    else:
        raise SystemExit(f"bench_layers: unknown case {name!r} ({', '.join(CASES)})")
    y = torch.randint(0, 10 if name != "tied" else 1000, (B,), generator=g)
    return model, x, y, (lambda n, m: n in keep), what


def sgd_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def run_case(name: str, args, min_run_time: float) -> list[H.Result]:
    made = make_case(name, args.quick)
    if made is None:
        return [H.skipped(H.Config(name), "tracked", "transformers is not installed")]
    model, x, y, keep, what = made
    plain, tracked = model, copy.deepcopy(model)
    opt_p = torch.optim.SGD(plain.parameters(), lr=LR)
    opt_t = torch.optim.SGD(tracked.parameters(), lr=LR)
    tracker = lipfast.Tracker(tracked, opt_t, rank=8, layers=keep, keep_records=False,
                              on_record=lambda rows, net: check(rows, name))
    config = H.Config(name, dict(B=x.shape[0], tracked=what, matrices=len(tracker.captures)))
    sgd_step(tracked, opt_t, x, y)  # the first step's cold spectra are not the steady cost
    impls = [("plain", lambda: sgd_step(plain, opt_p, x, y), ""),
             ("tracked", lambda: sgd_step(tracked, opt_t, x, y), f"{len(tracker.captures)} matrices")]
    out = H.time_interleaved(config, impls, min_run_time=min_run_time, rounds=3 if args.quick else 7, warmup=3)
    tracker.close()
    return out


def check(rows, name):
    if not rows or not all(math.isfinite(r["sigma"]) and math.isfinite(r["drift"]) for r in rows):
        raise AssertionError(f"bench_layers: case {name}: a tracked step gave no finite record: {rows}")


def main(argv=None) -> int:
    p = H.make_parser(__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = p.parse_args(argv)
    device, _, min_run_time = H.setup(args)
    if device != "cpu":
        raise SystemExit("bench_layers: CPU only for now")
    results = []
    for name in args.cases.split(","):
        results += run_case(name, args, min_run_time)
    print("\n".join(H.environment_lines(device)))
    print()
    print(H.format_table(results, baseline="plain", columns=("case", "impl", "median", "IQR", "× base", "note")))
    print()
    print("cases: " + "; ".join(f"{r.config.name}: {r.config.describe()}" for r in results if r.impl == "tracked"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
