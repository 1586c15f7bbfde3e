"""A whole training step: plain vs lipfast-tracked vs the same algorithm in pure PyTorch vs naive.

Variants, each on its own copy of the same model (same initialisation), timed interleaved so machine
drift hits all alike (bench/_harness.py):
- ``plain``: forward, backward, SGD step;
- ``tracked``: the same with ``lipfast.Tracker`` (compiled ops), every step, rank 8;
- ``tracked every=10``: tracking every tenth step (the mean cost per step);
- ``reference-tracked``: ``Tracker(implementation="reference")``, the same algorithm in plain torch ops;
- ``naive``: per-sample gradients with ``torch.func.vmap(grad)`` plus a full SVD per layer, then the
  same three terms (what one writes without lipfast);
- BackPACK / Opacus per-sample gradients when those packages are installed.
Correctness first: the compiled tracker's step-0 records must match the reference tracker's, and the
naive terms (exact) must match its drift/diffusion and fall in its Itô bracket.

Usage: python bench/bench_step.py [--quick] [--threads 2] [--cases mlp,wide,cnn]
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lipfast  # noqa: E402
from lipfast import models  # noqa: E402

LR = 0.01


def make_case(name: str, quick: bool):
    """(model, X, y) of a case; batch sizes follow issue 6."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model, shape, B = models.build_model("mlp", (784,), 10, widths=(512, 512), seed=0), (784,), 128
    elif name == "wide":
        model, shape, B = models.build_model("mlp", (784,), 10, widths=(2048, 2048), seed=0), (784,), 256
    elif name == "cnn":
        model, shape, B = models.build_model("cnn", (1, 28, 28), 10, widths=(32, 64), seed=0), (1, 28, 28), 128
    else:
        raise SystemExit(f"bench_step: unknown case {name!r} (mlp, wide, cnn)")
    if quick:
        B = min(B, 32)
    X = torch.randn(B, *shape, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    return model, X, y


def sgd_step(model, opt, X, y, tracker=None):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    opt.step()


def naive_terms(model, X, y, lr: float) -> dict[str, tuple[float, float, float]]:
    """drift, diffusion_var, ito per layer from materialised per-sample gradients and full SVDs."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss1(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    G = vmap(grad(loss1), in_dims=(None, 0, 0))(params, X, y)
    out = {}
    B = X.shape[0]
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        W = module.weight.detach().reshape(module.weight.shape[0], -1).double()
        Gs = G[f"{name}.weight"].reshape(B, *W.shape).double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        u1, v1 = U[:, 0], Vh[0]
        s = torch.einsum("m,bmn,n->b", u1, Gs, v1)
        x, yv = Gs @ v1, Gs.mT @ u1                                    # [B, m], [B, n]

        def hess(x, yv):
            a, b = x @ U, yv @ Vh.mT
            core = ((S[0] * (a[:, 1:] ** 2 + b[:, 1:] ** 2) + 2 * S[1:] * a[:, 1:] * b[:, 1:]) / (S[0] ** 2 - S[1:] ** 2)).sum(-1)
            rest = (x * x).sum(-1) - (a * a).sum(-1) + (yv * yv).sum(-1) - (b * b).sum(-1)
            return core + rest / S[0]

        gbar = Gs.mean(0)
        h_i, h_g = hess(x, yv), hess((gbar @ v1)[None], (gbar.mT @ u1)[None])[0]
        out[name] = (float(-lr * s.mean()), float(lr**2 * s.var() / B),
                     float(lr**2 / (2 * B) * (h_i.sum() - B * h_g) / (B - 1)))
    return out


def naive_step(model, opt, X, y):
    naive_terms(model, X, y, LR)
    sgd_step(model, opt, X, y)


def check_correctness(model, X, y, naive: bool = True) -> None:
    """Compiled tracker == reference tracker on one step; naive (exact) terms agree with it."""
    recs = {}
    for impl in ("compiled", "reference"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        with lipfast.Tracker(m, opt, rank=8, implementation=impl, gap_tol=0, step_tol=math.inf) as tr:
            sgd_step(m, opt, X, y)
        recs[impl] = {r["layer"]: r for r in tr.records}
    exact = naive_terms(model, X, y, LR) if naive else {}
    for layer, r in recs["compiled"].items():
        ref = recs["reference"][layer]
        for f in ("sigma", "drift", "diffusion_var", "ito"):
            H.assert_close(torch.tensor(r[f]), torch.tensor(ref[f]), rtol=1e-4, atol=1e-6, what=f"{layer}.{f} vs reference")
        # ΔW is read from float32 projections of W before and after the step: both implementations
        # are accurate to ~eps32·σ1 there (the floor of the realised float32 update itself).
        floor = 64 * torch.finfo(torch.float32).eps * r["sigma"]
        for f in ("first_order", "second_order"):
            assert abs(r[f] - ref[f]) <= floor, f"{layer}.{f}: {r[f]} vs reference {ref[f]} (floor {floor:.1e})"
        if layer not in exact:
            continue
        drift, diff, ito = exact[layer]
        H.assert_close(torch.tensor(r["drift"]), torch.tensor(drift), rtol=5e-3, atol=1e-5, what=f"{layer}.drift vs naive")
        H.assert_close(torch.tensor(r["diffusion_var"]), torch.tensor(diff), rtol=5e-2, atol=1e-5,
                       what=f"{layer}.diffusion_var vs naive")
        slack = 0.05 * abs(ito) + 1e-12
        assert r["ito_lo"] - slack <= ito <= r["ito_hi"] + slack, (
            f"{layer}: naive Itô term {ito:.4g} outside the tracker's bracket [{r['ito_lo']:.4g}, {r['ito_hi']:.4g}]")


def peer_routes(model, X, y):
    """BackPACK / Opacus per-sample gradient steps, when installed (none is a dependency)."""
    routes = []
    try:
        import backpack  # noqa: F401
        from backpack import backpack as bp_ctx, extend
        from backpack.extensions import BatchGrad

        m = extend(copy.deepcopy(model))
        loss_fn = extend(nn.CrossEntropyLoss())
        opt = torch.optim.SGD(m.parameters(), lr=LR)

        def bp_step():
            opt.zero_grad(set_to_none=True)
            with bp_ctx(BatchGrad()):
                loss_fn(m(X), y).backward()
            opt.step()
        routes.append(("backpack BatchGrad", bp_step, "per-sample grads only"))
    except ImportError:
        pass
    try:
        from opacus import GradSampleModule

        m = GradSampleModule(copy.deepcopy(model))
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        routes.append(("opacus GradSampleModule", lambda: sgd_step(m, opt, X, y), "per-sample grads only"))
    except ImportError:
        pass
    return routes


def run_case(name: str, args, min_run_time: float) -> list[H.Result]:
    model, X, y = make_case(name, args.quick)
    check_correctness(model, X, y, naive=name != "wide")
    impls = []

    def variant(label, note="", naive=False, **tracker_kw):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        if naive:
            return (label, lambda: naive_step(m, opt, X, y), note)
        if tracker_kw:
            lipfast.Tracker(m, opt, keep_records=False, **tracker_kw)
        return (label, lambda: sgd_step(m, opt, X, y), note)

    impls.append(variant("plain"))
    impls.append(variant("tracked", "rank 8, every step", rank=8))
    impls.append(variant("tracked iters=1", "one sweep a step (the old default)", rank=8, iters=1))
    impls.append(variant("tracked every=10", "mean over steps", rank=8, every=10))
    impls.append(variant("reference-tracked", "same algorithm, plain torch", rank=8, implementation="reference"))
    per_sample_bytes = X.shape[0] * sum(p.numel() for p in model.parameters()) * 8  # float64 copies
    if not args.quick and per_sample_bytes < 2**31:  # the wide MLP's would need ~12 GB
        impls.append(variant("naive", "vmap(grad) + full SVD", naive=True))
    impls += peer_routes(model, X, y)
    return time_variants(name, X, impls, args, min_run_time)


def time_variants(name: str, X, impls, args, min_run_time: float) -> list[H.Result]:
    """The variants of one case interleaved, in blocks of whole every=10 cycles: each block holds the same
    number of tracked steps, whatever its phase."""
    config = H.Config(name=f"{name} B={X.shape[0]}", params={"batch": X.shape[0]})
    return H.time_interleaved(config, impls, min_run_time=min_run_time, rounds=3 if args.quick else 9, warmup=10,
                              block_multiple=10)


def run_cases(description: str, run_case, script: str) -> list[H.Result]:
    """The command line the whole-step scripts share (``--cases``, CPU float32 only): every case through
    ``run_case(name, args, min_run_time)``, then the environment and the table printed; the results back."""
    p = H.make_parser(description)
    p.add_argument("--cases", default="mlp,wide,cnn", help="comma-separated: mlp, wide, cnn")
    args = p.parse_args()
    device, dtype, min_run_time = H.setup(args)
    if device != "cpu" or dtype != torch.float32:
        raise SystemExit(f"{script}: the step benchmarks run on --device cpu --dtype float32 (GPU: bench/gpu_check.sh)")
    cases = ["mlp"] if args.quick else args.cases.split(",")
    results = []
    for name in cases:
        results += run_case(name, args, min_run_time * (4 if not args.quick else 1))
    print("\n".join(H.environment_lines(device)))
    print()
    print(H.format_table(results, baseline="plain"))
    print()
    return results


def main() -> int:
    results = run_cases(__doc__.splitlines()[0], run_case, "bench_step")
    print("Ratios: the median of the per-round ratios, in brackets their quartiles over the rounds.")
    for name in dict.fromkeys(r.config.name for r in results):
        r = {x.impl: x for x in results if x.config.name == name}
        line = [f"{name}: tracked/plain {H.format_ratio(r['tracked'], r['plain'])}",
                f"every=10 {H.format_ratio(r['tracked every=10'], r['plain'])}",
                f"reference/tracked {H.format_ratio(r['reference-tracked'], r['tracked'])}"]
        if "naive" in r:
            line.append(f"naive/tracked {H.format_ratio(r['naive'], r['tracked'], 1)}")
        print("  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
