"""Numerical limits of the tracker on a trained network (issue 9; numbers in docs/RELIABILITY.md).

1. **Truncation error of the Itô term vs rank.** A small MLP (digits, 64-128-128-10, plain SGD) is trained
   for ``--train-steps`` steps; from there it trains ``--track-steps`` more, each copy under a tracker of
   rank k in 1, 2, 4, 8, 16 and full (``rank >= min(m, n)``: exact LAPACK spectra, the reference). The
   tracker does not touch training, so every copy takes bit-identical steps and the records compare step by
   step. Per layer and rank: the relative error ``|ito_k − ito_full| / |ito_full|`` of the estimate (median
   and max over the steps), the bracket width ``(ito_hi − ito_lo) / |ito_full|``, and the fraction of steps
   whose bracket holds the exact value (with a 1e-9 relative slack). The tracker runs with its defaults
   (warm-started spectra, one sweep per step), so the numbers include the iteration's own error, as in use.
2. **float32 vs float64.** (a) *Measurement precision*: the trained float64 weights, cast to float32, and the
   same batch: one tracked step in each dtype (exact spectra), the relative differences of σ1 and ito. (b)
   *Trajectories*: the same initialisation and batches trained ``--dtype-steps`` steps in float32 and in
   float64, each tracked: the relative differences of σ1 and ito per step (both rounding in training and in
   measurement, accumulated).
3. **As the gap closes.** A Linear(16, 12) layer whose weight has ``σ2 = σ1(1 − δ)`` takes one SGD step on a
   fixed batch, for δ from 0.3 down to 0, float64: the tracker's ``gap`` and ``degenerate`` flag with its
   defaults (``gap_tol`` 1e-3, ``step_tol`` 0.5), ``‖ΔW‖₂/(σ1 − σ2)``, and, from a tracker with both tolerances
   off, what the unflagged numbers would have been: the second-order prediction's error
   ``|δ_obs − δ_pred|/|δ_obs|`` and the Itô term (which grows like 1/(σ1 − σ2)).

    python bench/truncation_error.py            # ~1 min on 2 CPU cores
    python bench/truncation_error.py --quick    # a few seconds, smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import lipfast
from lipfast import data, models
from lipfast.tracker import Tracker

RANKS = (1, 2, 4, 8, 16, "full")


def _setup(seed: int, dtype: torch.dtype, widths=(128, 128)):
    ds = data.load_dataset("digits", seed=seed)
    model = models.build_model("mlp", ds.input_shape, ds.n_classes, widths=widths, seed=seed).to(dtype)
    return ds, model


def _batch_iter(n: int, batch_size: int, seed: int, start_epoch: int = 0):
    epoch = start_epoch
    while True:
        for b in data.batches(n, batch_size, seed=seed, epoch=epoch, drop_last=True):
            yield b
        epoch += 1


def _train(model, x, y, batches, steps: int, lr: float, tracker_kwargs: dict | None = None):
    """``steps`` plain SGD steps; with ``tracker_kwargs``, under a Tracker whose records are returned."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = Tracker(model, opt, **tracker_kwargs) if tracker_kwargs is not None else None
    for _ in range(steps):
        b = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[b]), y[b])
        loss.backward()
        opt.step()
    if tracker is None:
        return None
    tracker.close()
    return tracker.records


def truncation_table(args) -> list[str]:
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    ds, model = _setup(args.seed, dtype)
    x, y = ds.x_train.to(dtype), ds.y_train
    n = x.shape[0]
    per_epoch = n // args.batch_size
    _train(model, x, y, _batch_iter(n, args.batch_size, args.seed), args.train_steps, args.lr)
    trained = copy.deepcopy(model.state_dict())
    start_epoch = args.train_steps // per_epoch + 1

    records = {}
    for k in RANKS:
        model.load_state_dict(trained)
        rank = 10**6 if k == "full" else k
        records[k] = _train(model, x, y, _batch_iter(n, args.batch_size, args.seed, start_epoch), args.track_steps,
                            args.lr, dict(rank=rank))
    exact = {(r["step"], r["layer"]): r for r in records["full"]}
    shapes = {r["layer"]: (r["m"], r["n"]) for r in records["full"]}
    lines = ["rank | layer (m x n) | steps used | flagged | ito rel. err median | max | "
             "bracket width / |ito| median | max | bracket holds exact"]
    lines.append("|".join(["---"] * 9))
    for k in RANKS[:-1]:
        for layer, (m, nn_) in shapes.items():
            errs, widths, holds, used, flagged = [], [], 0, 0, 0
            for r in records[k]:
                if r["layer"] != layer:
                    continue
                e = exact[(r["step"], layer)]
                if r["degenerate"] or e["degenerate"] or not math.isfinite(e["ito"]) or e["ito"] == 0:
                    flagged += 1
                    continue
                used += 1
                scale = abs(e["ito"])
                errs.append(abs(r["ito"] - e["ito"]) / scale)
                widths.append((r["ito_hi"] - r["ito_lo"]) / scale)
                slack = 1e-9 * scale
                holds += r["ito_lo"] - slack <= e["ito"] <= r["ito_hi"] + slack
            exact_rank = k >= min(m, nn_)
            if not used:
                lines.append(f"{k} | {layer} ({m}x{nn_}) | 0 | {flagged} | - | - | - | - | -")
                continue
            lines.append(
                f"{k}{' (exact)' if exact_rank else ''} | {layer} ({m}x{nn_}) | {used} | {flagged} | "
                f"{statistics.median(errs):.2e} | {max(errs):.2e} | {statistics.median(widths):.2e} | "
                f"{max(widths):.2e} | {holds}/{used}")
    return lines


def _rel(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return abs(a - b) / max(abs(b), 1e-300)


def dtype_tables(args) -> list[str]:
    torch.manual_seed(args.seed)
    ds, model64 = _setup(args.seed, torch.float64)
    x64, y = ds.x_train.to(torch.float64), ds.y_train
    n = x64.shape[0]
    _train(model64, x64, y, _batch_iter(n, args.batch_size, args.seed), args.train_steps, args.lr)
    state = copy.deepcopy(model64.state_dict())
    out = ["(a) one tracked step from the same (trained) weights and batch, exact spectra:", "",
           "layer | sigma float64 | sigma rel. diff f32 vs f64 | ito float64 | ito rel. diff | "
           "first_order rel. diff", "|".join(["---"] * 6)]
    recs = {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(model64).to(dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        recs[dtype] = _train(m, x64.to(dtype), y, _batch_iter(n, args.batch_size, args.seed + 1), 1, args.lr,
                             dict(rank=10**6))
    for a, b in zip(recs[torch.float32], recs[torch.float64]):
        out.append(f"{b['layer']} | {b['sigma']:.6g} | {_rel(a['sigma'], b['sigma']):.1e} | {b['ito']:.3e} | "
                   f"{_rel(a['ito'], b['ito']):.1e} | {_rel(a['first_order'], b['first_order']):.1e}")

    out += ["", f"(b) the same initialisation and batches trained {args.dtype_steps} steps in each dtype, tracked "
            "(rank 8, defaults):", "",
            "layer | sigma rel. diff at step 0 | at the last step | ito rel. diff median | max | "
            "steps flagged (f32 / f64)", "|".join(["---"] * 6)]
    traj = {}
    for dtype in (torch.float64, torch.float32):
        _, m = _setup(args.seed, dtype)
        traj[dtype] = _train(m, x64.to(dtype), y, _batch_iter(n, args.batch_size, args.seed), args.dtype_steps,
                             args.lr, dict(rank=8))
    layers = list(dict.fromkeys(r["layer"] for r in traj[torch.float64]))
    for layer in layers:
        a = [r for r in traj[torch.float32] if r["layer"] == layer]
        b = [r for r in traj[torch.float64] if r["layer"] == layer]
        ito = [_rel(ra["ito"], rb["ito"]) for ra, rb in zip(a, b)]
        ito = [v for v in ito if math.isfinite(v)]
        fa, fb = sum(r["degenerate"] for r in a), sum(r["degenerate"] for r in b)
        out.append(f"{layer} | {_rel(a[0]['sigma'], b[0]['sigma']):.1e} | {_rel(a[-1]['sigma'], b[-1]['sigma']):.1e} | "
                   f"{statistics.median(ito) if ito else math.nan:.1e} | {max(ito) if ito else math.nan:.1e} | "
                   f"{fa} / {fb}")
    return out


def gap_table(args) -> list[str]:
    g = torch.Generator().manual_seed(args.seed)
    f64 = torch.float64
    U = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=f64))[0]
    V = torch.linalg.qr(torch.randn(16, 12, generator=g, dtype=f64))[0]
    x = torch.randn(16, 16, generator=g, dtype=f64)
    y = torch.randint(4, (16,), generator=g)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).to(f64)
    lines = ["delta | gap | ||dW||_2/(s1-s2) | degenerate (defaults) | flags | raw |d_obs - d_pred|/|d_obs| | "
             "raw ito | raw ito_hi - ito_lo", "|".join(["---"] * 8)]
    for delta in (0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-6, 0.0):
        S = torch.cat([torch.tensor([1.0, 1.0 - delta], dtype=f64), torch.linspace(0.6, 0.1, 10, dtype=f64)])
        rows = {}
        for name, kw in (("defaults", {}), ("raw", dict(gap_tol=0.0, step_tol=math.inf))):
            model = copy.deepcopy(base)
            with torch.no_grad():
                model[0].weight.copy_((U * S) @ V.mT)
            W0 = model[0].weight.detach().clone()
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            with Tracker(model, opt, rank=12, **kw) as tracker:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            rows[name] = next(r for r in tracker.records if r["layer"] == "0")
            dw = float(torch.linalg.matrix_norm(model[0].weight.detach() - W0, 2))
        d, r = rows["defaults"], rows["raw"]
        s1, s2 = r["sigma"], r["sigma2"]
        ratio = dw / (s1 - s2) if s1 > s2 else math.inf
        pred_err = _rel(r["delta_pred"], r["delta_obs"])
        lines.append(f"{delta:.0e} | {d['gap']:.2e} | {ratio:.2e} | {d['degenerate']} | {d['flag_names'] or '-'} | "
                     f"{pred_err:.1e} | {r['ito']:.3e} | {r['ito_hi'] - r['ito_lo']:.1e}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--track-steps", type=int, default=60)
    p.add_argument("--dtype-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of part 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.track_steps, args.dtype_steps = 20, 5, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"lipfast {lipfast.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} threads; digits MLP 64-128-128-10, SGD lr {args.lr}, batch {args.batch_size}, "
          f"seed {args.seed}")
    print(f"\n## Itô term vs rank ({args.dtype}; trained {args.train_steps} steps, then {args.track_steps} tracked "
          "steps per rank; reference: rank = full)\n")
    print("\n".join(truncation_table(args)))
    print("\n## float32 vs float64\n")
    print("\n".join(dtype_tables(args)))
    print(f"\n## As the gap closes (float64, Linear(16, 12), one SGD step, lr {args.lr}, batch 16)\n")
    print("\n".join(gap_table(args)))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
