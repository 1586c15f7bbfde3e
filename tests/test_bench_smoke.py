"""The benchmark scripts run (``--quick``): a smoke test so they do not rot. No timing thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_step.py", "bench_step_adamw.py", "bench_memory.py",
                                    "profile_step.py", "floor_step.py", "sde_orders.py", "truncation_error.py",
                                    pytest.param("accuracy_resnet18.py", marks=pytest.mark.slow),  # a ResNet-18, ~1 min
                                    pytest.param("cluster_prediction.py", marks=pytest.mark.slow),  # LAPACK per step
                                    "bench_integrations.py", "bench_layers.py",
                                    "bench_step_gpu.py"])  # without a GPU: the CPU dry run, tiny shapes
def test_bench_script_runs_quick(script):
    out = subprocess.run([sys.executable, "-W", "error", str(BENCH / script), "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), f"{script} printed nothing"


def _harness():
    sys.path.insert(0, str(BENCH))
    try:
        import _harness as H
    finally:
        sys.path.remove(str(BENCH))
    return H


def test_time_interleaved_blocks_whole_cycles():
    """``block_multiple``: every timed block holds whole cycles, so an ``every=10`` tracker's tracked step
    counts once per ten calls in every block (a block of 7 calls would hold 0 or 1 of them)."""
    H = _harness()
    calls = []
    config = H.Config(name="cycle")
    results = H.time_interleaved(config, [("a", lambda: calls.append(1), "")], min_run_time=1e-4, rounds=3,
                                 warmup=0, block_multiple=10)
    (r,) = results
    assert r.runs > 0 and r.runs % (3 * 10) == 0, r.runs


def test_paired_ratio_is_taken_round_by_round():
    """Ratios are taken within each round (whose blocks ran back to back), and their quartiles show how far
    the ratio moved between rounds; implementations timed in different calls cannot be paired."""
    H = _harness()
    config = H.Config(name="drift")
    load = (1.0, 1.0, 3.0, 3.0, 3.0, 1.0, 3.0)  # the machine's speed moves between rounds
    base = H.Result(config, "base", median_s=3.0, rounds=load)
    slow = H.Result(config, "slow", median_s=3.6, rounds=tuple(1.2 * x for x in load))
    assert H.paired_ratio(slow, base) == pytest.approx((1.2, 1.2, 1.2))
    assert H.format_ratio(slow, base) == "1.20× (1.20–1.20)"
    burst = H.Result(config, "burst", median_s=3.6, rounds=(1.2, 1.2, 3.6, 3.6, 3.6, 6.0, 3.6))  # one round hit
    q1, med, q3 = H.paired_ratio(burst, base)
    assert med == pytest.approx(1.2) and q1 == pytest.approx(1.2) and q3 == pytest.approx(1.2)
    noisy = H.Result(config, "noisy", median_s=3.6, rounds=(1.0, 1.4, 3.0, 3.6, 4.2, 1.2, 3.6))
    q1, med, q3 = H.paired_ratio(noisy, base)
    assert q1 < med < q3 and med == pytest.approx(1.2)
    with pytest.raises(ValueError, match="not timed in the same interleaved rounds"):
        H.paired_ratio(H.Result(config, "other", median_s=1.0, rounds=(1.0,)), base)
