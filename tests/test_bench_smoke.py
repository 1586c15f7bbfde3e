"""The benchmark scripts run (``--quick``): a smoke test so they do not rot. No timing thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_step.py", "bench_memory.py", "profile_step.py",
                                    "floor_step.py", "sde_orders.py", "truncation_error.py"])
def test_bench_script_runs_quick(script):
    out = subprocess.run([sys.executable, "-W", "error", str(BENCH / script), "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), f"{script} printed nothing"


def test_time_interleaved_blocks_whole_cycles():
    """``block_multiple``: every timed block holds whole cycles, so an ``every=10`` tracker's tracked step
    counts once per ten calls in every block (a block of 7 calls would hold 0 or 1 of them)."""
    sys.path.insert(0, str(BENCH))
    try:
        import _harness as H
    finally:
        sys.path.remove(str(BENCH))
    calls = []
    config = H.Config(name="cycle")
    results = H.time_interleaved(config, [("a", lambda: calls.append(1), "")], min_run_time=1e-4, rounds=3,
                                 warmup=0, block_multiple=10)
    (r,) = results
    assert r.runs > 0 and r.runs % (3 * 10) == 0, r.runs
