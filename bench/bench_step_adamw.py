"""A tracked AdamW step beside a plain one (and SGD's pair, for scale), MLP and CNN (issue 19).

Variants, each on its own copy of the same model (same initialisation), timed interleaved
(bench/_harness.py):
- ``plain sgd`` / ``tracked sgd``: forward, backward, SGD step, without / with ``lipfast.Tracker`` (rank 8);
- ``plain adamw`` / ``tracked adamw``: the same with ``torch.optim.AdamW(weight_decay=0.01)``: the tracked
  step holds every layer's inputs and output-gradients until the step, forms P from the optimizer state and
  reduces them with ``persample_linear_precond`` / ``persample_conv2d_precond`` (MATH.md §7);
- ``reference adamw``: the tracked AdamW step with ``implementation="reference"`` (the twins in plain torch).
Correctness first: the compiled AdamW records of a step must match the reference tracker's.

Usage: python bench/bench_step_adamw.py [--quick] [--threads 2] [--cases mlp,cnn] [--min-run-time S]
(each measurement lasts 4·S, default S = 0.5; ``--min-run-time 0.1`` keeps the script near two minutes)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_step import make_case, run_cases, sgd_step  # noqa: E402

import lipfast  # noqa: E402

LR = {"sgd": 0.01, "adamw": 1e-3}


def make_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR["sgd"])
    return torch.optim.AdamW(params, lr=LR["adamw"], weight_decay=0.01)


def check_correctness(model, X, y) -> None:
    """One AdamW step (after one untracked, so the moments are non-zero) tracked by the compiled ops and by
    the reference: the same records."""
    records = []
    for impl in ("compiled", "reference"):
        m = copy.deepcopy(model)
        opt = make_opt("adamw", m.parameters())
        sgd_step(m, opt, X, y)
        tracker = lipfast.Tracker(m, opt, rank=8, implementation=impl)
        sgd_step(m, opt, X, y)
        records.append(tracker.records)
        tracker.close()
    for r, ref in zip(*records):
        assert "sgd_equivalent" not in r["flag_names"], r["flag_names"]
        for f in ("drift", "diffusion_var", "ito"):
            H.assert_close(torch.tensor(r[f]), torch.tensor(ref[f]), rtol=1e-3, atol=1e-9,
                           what=f"{r['layer']}.{f} vs reference")


def run_case(name: str, args, min_run_time: float) -> list[H.Result]:
    model, X, y = make_case(name, args.quick)
    check_correctness(model, X, y)

    def variant(label, kind, note="", **tracker_kw):
        m = copy.deepcopy(model)
        opt = make_opt(kind, m.parameters())
        if tracker_kw:
            lipfast.Tracker(m, opt, keep_records=False, **tracker_kw)
        return (label, lambda: sgd_step(m, opt, X, y), note)

    impls = [variant("plain sgd", "sgd"), variant("tracked sgd", "sgd", "rank 8, every step", rank=8),
             variant("plain adamw", "adamw"), variant("tracked adamw", "adamw", "rank 8, every step", rank=8),
             variant("reference adamw", "adamw", "same algorithm, plain torch", rank=8, implementation="reference")]
    # No every=10 variant here: plain rounds (block_multiple 1), five of them, so that the whole script stays
    # within about two minutes on the shared 2-core machine.
    config = H.Config(name=f"{name} B={X.shape[0]}", params={"batch": X.shape[0]})
    return H.time_interleaved(config, impls, min_run_time=min_run_time, rounds=3 if args.quick else 5, warmup=3)


def main() -> int:
    results = run_cases(__doc__.splitlines()[0], run_case, "bench_step_adamw")
    print("Ratios: the median of the per-round ratios, in brackets their quartiles over the rounds.")
    for name in dict.fromkeys(r.config.name for r in results):
        r = {x.impl: x for x in results if x.config.name == name}
        print(f"{name}: tracked/plain sgd {H.format_ratio(r['tracked sgd'], r['plain sgd'])}  "
              f"tracked/plain adamw {H.format_ratio(r['tracked adamw'], r['plain adamw'])}  "
              f"reference/tracked adamw {H.format_ratio(r['reference adamw'], r['tracked adamw'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
