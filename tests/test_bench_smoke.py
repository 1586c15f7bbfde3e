"""The benchmark scripts run (``--quick``): a smoke test so they do not rot. No timing thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_step.py", "bench_memory.py", "profile_step.py",
                                    "sde_orders.py", "truncation_error.py"])
def test_bench_script_runs_quick(script):
    out = subprocess.run([sys.executable, "-W", "error", str(BENCH / script), "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), f"{script} printed nothing"
