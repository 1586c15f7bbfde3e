"""csrc/small_linalg.h runs on the CPU with one worker and in the CUDA kernels with a thread block: the
C++ check tests/cpp/small_linalg_team.cpp runs it with a team of threads and compares with the serial
team bit for bit (no GPU needed). Skips where no C++20 compiler is found."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_small_linalg_gives_the_same_bits_on_a_team_of_threads(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH (set CXX)")
    exe = tmp_path / "small_linalg_team"
    build = subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", f"-I{ROOT / 'csrc'}",
                            str(ROOT / "tests" / "cpp" / "small_linalg_team.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "c++20" in build.stderr:
        pytest.skip(f"{cxx} has no C++20 (std::barrier): {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "0 of 36 cases differ" in run.stdout
