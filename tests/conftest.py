"""Shared parameters, tolerances, seeding and small input builders for lipfast's tests.

Test modules import the constants and helpers from here (``from conftest import ...``); pytest puts
this folder on ``sys.path`` itself (rootdir-relative ``prepend`` import mode), so no path edits exist.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import lipfast

# ----------------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------------
# CUDA is tested only where the extension carries CUDA kernels: a CUDA tensor reaching a CPU-only
# build fails in the dispatcher, which is the documented behaviour, not something to test per op.
CUDA_OK = torch.cuda.is_available() and bool(lipfast._C.with_cuda)
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])
DTYPES = [torch.float32, torch.float64]

# ----------------------------------------------------------------------------------------------------
# Tolerances: the one table. TOL[kind][dtype] -> dict(rtol, atol) for ``assert_close`` below, where
# ``atol`` is taken relative to the largest |expected| entry (the outputs' natural scale: Hessian
# forms grow with ‖G‖², and a fixed absolute floor would be meaningless at one scale and
# too strict at another). A ``kind`` says what is compared with what.
# ----------------------------------------------------------------------------------------------------
_EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
TOL = {
    # Compiled op vs its reference.py twin, same inputs.
    "parity": {
        # Widened from assert_close's float32 default (rtol 1.3e-6): the kernels run the skinny GEMMs
        # X·V and D·U in float32 and accumulate in float64, while the twin upcasts to float64 first;
        # their difference is float32 GEMM rounding (~eps32·sqrt(n) of the scale, measured <= 4e-7),
        # which elementwise can reach 3e-5 on near-zero projections: hence atol relative to scale.
        # subspace_iteration orthonormalises with CholeskyQR2 where the twin uses Householder QR:
        # same subspace, rounding-level differences amplified by at most a few units.
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        # assert_close's float64 defaults; measured differences are 1e-13 or below.
        torch.float64: dict(rtol=1e-7, atol=1e-7),
    },
    # lipfast (float64 inputs) vs an independent dense ground truth: the autograd Hessian of
    # matrix_norm(W, 2), LAPACK SVD, per-sample gradients from torch.func. Different algorithms,
    # both backward stable: the difference is eps64 times the conditioning σ1/(σ1−σ2) of the Hessian
    # (<= ~100 on the seeded test matrices), i.e. ~1e-13; 1e-9 leaves room and still fails any
    # formula error (those are O(1)).
    "truth": {
        # float32 inputs vs the float64 ground truth of the same (float64-rounded) matrix. The error is
        # float32 rounding of the spectrum and of the GEMMs, amplified by the Hessian's conditioning:
        # eps32 · σ1/(σ1−σ2) · sqrt(accumulation length) ≈ 1.2e-7 · 10 · 10 ≈ 1e-5 on the gapped
        # (σ1/σ2 >= 1.25) float32 test matrices (``gapped_matrix``); measured <= 2e-6. Random
        # matrices with small gaps are tested in float64 only.
        torch.float32: dict(rtol=5e-5, atol=5e-5),
        torch.float64: dict(rtol=1e-9, atol=1e-9),
    },
}

# Stopping tolerance lipfast.spectrum uses by default (relative to σ1), to check the residual against.
SPECTRUM_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
# Orthonormality of returned singular vectors: a few hundred units of roundoff of the dtype.
ORTHO_TOL = {torch.float32: 200 * _EPS32, torch.float64: 1e-12}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with ``tol['atol']`` scaled by the largest |expected| entry and
    the comparison done in float64 (outputs of lipfast are float64; a float32 twin is upcast)."""
    expected = torch.as_tensor(expected).to(torch.float64)
    actual = torch.as_tensor(actual).to(device=expected.device, dtype=torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    scale = max(scale, 1e-300)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=True, msg=msg)


# ----------------------------------------------------------------------------------------------------
# Seeding: every test gets its own reproducible seed (derived from its node id), so inputs are fresh
# per test yet a failure reproduces on rerun.
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if not lipfast._C.with_cuda:
        return ("lipfast was built without CUDA kernels (a CPU torch, no nvcc, or LIPFAST_CUDA=OFF); "
                "rebuild on a GPU machine: pip install --no-build-isolation --no-deps .")
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


# LIPFAST_REQUIRE_CUDA=1 (bench/gpu_check.sh) makes the CUDA tests run, and fail, without a GPU: a GPU check
# can never pass by skipping everything.
REQUIRE_CUDA = os.environ.get("LIPFAST_REQUIRE_CUDA", "") not in ("", "0")
_CUDA_NOT_RUN: list[int] = []


def pytest_collection_modifyitems(config, items):
    """Tests parametrised on device="cuda" carry the ``cuda`` marker (declared in pyproject). Without a GPU
    they are left out of a default run and summarised in one line (one skip reason per test location would
    print the same long reason dozens of times); ``-m cuda`` still collects them, to skip each with it."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
    markexpr = config.getoption("markexpr", "") or ""
    if cuda_unavailable_reason() is None or REQUIRE_CUDA or ("cuda" in markexpr and "not cuda" not in markexpr):
        return
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]
        _CUDA_NOT_RUN.append(len(cuda))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _CUDA_NOT_RUN:
        terminalreporter.write_line(f"lipfast: {sum(_CUDA_NOT_RUN)} CUDA tests not run (deselected): "
                                    f"{cuda_unavailable_reason()}")


# ----------------------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------------------
def matrix_with_spectrum(S: torch.Tensor, m: int, n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """``U diag(S) Vᵀ`` with Haar-like random orthonormal ``U [m, r]``, ``V [n, r]``, r = len(S)."""
    r = S.numel()
    U = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0]
    return ((U * S.to(torch.float64)) @ V.mT).to(device=device, dtype=dtype)


def decaying_matrix(m: int, n: int, dtype=torch.float64, device="cpu", rate: float = 0.8,
                    top: float = 10.0) -> torch.Tensor:
    """A matrix whose singular values decay geometrically, ``top · rate^j``: every gap is a fixed
    fraction of its value, so subspace iteration converges fast and vectors are well determined."""
    r = min(m, n)
    return matrix_with_spectrum(top * rate ** torch.arange(r, dtype=torch.float64), m, n, dtype, device)


def gapped_matrix(m: int, n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Random-like spectrum with a clear top gap (σ1/σ2 = 1.25), for float32 accuracy tests."""
    r = min(m, n)
    rest = torch.sort(torch.rand(max(r - 1, 0), dtype=torch.float64) * 0.8 + 0.1, descending=True)[0]
    S = torch.cat([torch.tensor([1.0], dtype=torch.float64), rest / rest[0] * 0.8 if r > 1 else rest])
    return matrix_with_spectrum(S * 3.0, m, n, dtype, device)


def align_signs(A: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Flips each column of ``A`` to agree in sign with the same column of ``ref`` (singular vectors
    are defined up to a joint sign of (u_j, v_j))."""
    s = torch.sign((A.to(torch.float64) * ref.to(torch.float64)).sum(0))
    s[s == 0] = 1
    return s


def spectrum_of(W: torch.Tensor, k: int):
    """Float64 LAPACK reference ``(U [m,k], S [k], V [n,k], sigma_next)`` (lipfast.reference)."""
    return lipfast.reference.spectrum_exact(W, k)


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------
def profile_memory(run) -> tuple[list[dict], list[dict]]:
    """``run()`` inside one torch.profiler window with ``profile_memory=True``: (every trace event, the
    ``[memory]`` events in allocation order). Each memory event carries the CPU allocator's running "Total
    Allocated", so that total minus its value at the window's start is the live tensor memory of the run."""
    import gc
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # nothing of an earlier run may be freed inside this window (it would offset the total)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["args"]["Ev Idx"])
    assert mem, "the profiler recorded no memory events"
    return events, mem
