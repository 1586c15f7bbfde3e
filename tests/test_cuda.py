"""The CUDA kernels (csrc/cuda): parity with the CPU kernels and lipfast.reference in float32/float64,
float16/bfloat16 inputs against a float64 reference by flash-attn's rule, opcheck on CUDA, no host
synchronisation inside the ops, and a tracked CUDA training run matching the CPU run record by record.

Every test is marked ``cuda`` and skips, with the reason, where there is no GPU or lipfast was built
without CUDA kernels. On a GPU machine: rebuild in place, then ``pytest -m cuda`` (bench/gpu_check.sh).
With ``LIPFAST_REQUIRE_CUDA=1`` in the environment (gpu_check.sh sets it) a missing GPU or a build
without CUDA kernels fails instead of skipping, so a GPU check can never pass by skipping everything.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import lipfast
from lipfast import models, ops, reference

from conftest import REQUIRE_CUDA, TOL, assert_close, cuda_unavailable_reason, gapped_matrix, spectrum_of

F64 = torch.float64


_WHY = cuda_unavailable_reason()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(_WHY is not None and not REQUIRE_CUDA, reason=_WHY or "")]


@pytest.fixture(autouse=True)
def _cuda_ready():
    """Fails (LIPFAST_REQUIRE_CUDA=1) rather than erroring obscurely; pins full-precision float32 GEMMs
    and convolutions (TF32 would make float32 CUDA results differ from the CPU's by ~1e-3)."""
    if _WHY is not None:
        pytest.fail(f"LIPFAST_REQUIRE_CUDA is set but {_WHY}")
    with warnings.catch_warnings():  # some torch versions warn about these flags' successor API
        warnings.simplefilter("ignore")
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


DTYPES = [torch.float32, F64]
LOW = [torch.bfloat16, torch.float16]
OUT_NAMES = ("proj", "hess", "hess_lo", "hess_hi")


def _inputs(B, T, n, m, k, dtype=F64, device="cuda", d_scale=0.1):
    """Seeded inputs of persample_linear, drawn on the CPU in float64 (so CPU and CUDA see the same
    numbers) then cast: X [B,T,n], D [B,T,m], U [m,k], S [k] float64, V [n,k], sigma_next."""
    W = gapped_matrix(m, n)
    U, S, V, sigma_next = spectrum_of(W, k)
    X = torch.randn(B, T, n, dtype=F64)
    D = d_scale * torch.randn(B, T, m, dtype=F64)
    cast = dict(device=device, dtype=dtype)
    return X.to(**cast), D.to(**cast), U.to(**cast), S.to(device), V.to(**cast), sigma_next


def _to_cpu(args):
    return [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------
def test_cuda_kernels_are_registered():
    for op in ("persample_linear", "hessian_contract", "subspace_iteration", "gradient_statistics",
               "update_statistics"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lipfast::{op}", "CUDA"), op
    for op in ("subspace_iteration", "gradient_statistics", "update_statistics", "track_update",
               "persample_linear_precond", "persample_conv2d_precond"):  # composite
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lipfast::{op}", "CompositeExplicitAutograd"), op


# ----------------------------------------------------------------------------------------------------
# subspace_iteration's CUDA kernel: the CPU kernel's p×p code on the device, no host reads in a warm sweep
# ----------------------------------------------------------------------------------------------------
def _rank_deficient(m, n, rank, dtype):
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["gapped", "rank2", "zero", "wide_block"])
def test_subspace_iteration_kernel_matches_cpu(dtype, case):
    m, n, p, k = 50, 36, 7, 4
    if case == "gapped":
        W = gapped_matrix(m, n, dtype)
    elif case == "rank2":  # the block collapses: CPU by Householder QR, CUDA through the Gram eigenpairs
        W = _rank_deficient(m, n, 2, dtype)
    elif case == "zero":
        W = torch.zeros(m, n, dtype=dtype)
    else:  # p > 32: the composite kernel serves the CUDA call
        m, n, p, k = 80, 60, 40, 30
        W = gapped_matrix(m, n, dtype)
    V0 = torch.randn(n, p, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    R, L = torch.randn(n, 2, dtype=dtype), torch.randn(m, 3, dtype=dtype)
    for iters, tol in [(1, 0.0), (40, 1e-5 if dtype == torch.float32 else 1e-11)]:
        cpu = ops.subspace_iteration(W, V0, k, iters, tol, R, L)
        got = ops.subspace_iteration(W.cuda(), V0.cuda(), k, iters, tol, R.cuda(), L.cuda())
        scale = max(float(cpu[1][0]), 1.0)
        tol_ = TOL["truth"][dtype]
        top = k if case != "rank2" else 2
        assert_close(got[1][:top].cpu() / scale, cpu[1][:top] / scale, tol_)       # singular values
        if case in ("rank2", "zero"):
            assert float(got[1][top:].abs().max()) <= 1e-5 * scale                   # σ_j = 0 beyond the rank
        assert_close(got[6].cpu(), cpu[6], tol_)                                     # W·right
        assert_close(got[7].cpu(), cpu[7], tol_)                                     # Wᵀ·left
        for i in (0, 2, 5):  # U, V, next block: the fake kernel's layout (transposed row blocks)
            assert got[i].shape == cpu[i].shape and got[i].stride() == cpu[i].stride(), i
        assert int(got[4]) == int(cpu[4]) or tol > 0  # sweeps (the CUDA kernel tests convergence alike)
        if case == "gapped" and tol > 0:  # converged Ritz vectors, up to sign: residual/gap apart at most
            vec_tol = dict(rtol=0.0, atol=1e-3 if dtype == torch.float32 else 1e-8)
            for i in (0, 2):
                sign = torch.sign((got[i][:, :k].cpu().to(F64) * cpu[i][:, :k].to(F64)).sum(0))
                assert_close(got[i][:, :k].cpu().to(F64) * sign, cpu[i][:, :k].to(F64), vec_tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_blocks"])
def test_statistics_kernels_match_cpu(dtype, layout):
    """gradient_statistics / update_statistics: one-block CUDA kernels vs the CPU kernels, with the tracker's
    per-sample sums given or the gradient's GEMVs, U and V as contiguous matrices or as the transposed row
    blocks subspace_iteration returns, N = 0, and NaN (the finite flag)."""
    m, n, k = 37, 29, 5
    U, S, V, sn = spectrum_of(gapped_matrix(m, n), k)
    if layout == "row_blocks":
        U, V = U.mT.contiguous().mT, V.mT.contiguous().mT
    U, V = U.to(dtype), V.to(dtype)
    G = torch.randn(m, n, dtype=dtype)
    for N in (0, 1, 300):
        p = [torch.randn(N, dtype=F64) for _ in range(4)]
        Gv1, Gtu1 = torch.randn(m, dtype=F64), torch.randn(n, dtype=F64)
        for sums in [(None, None), (Gv1, Gtu1)]:
            args = (*p, G, U, S, V, float(sn), 3.0, 2.0, *sums)
            want = ops.gradient_statistics(*args)
            got = ops.gradient_statistics(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
            assert got.device.type == "cuda" and got.shape == (11,)
            assert_close(got.cpu(), want, TOL["parity"][dtype])
    x, y = torch.randn(m, dtype=F64), torch.randn(n, dtype=F64)
    want = ops.update_statistics(x, y, U, S, V, float(sn))
    got = ops.update_statistics(x.cuda(), y.cuda(), U.cuda(), S.cuda(), V.cuda(), float(sn))
    assert got.shape == (7,)
    assert_close(got.cpu(), want, TOL["parity"][dtype])
    x[3] = float("nan")
    got = ops.update_statistics(x.cuda(), y.cuda(), U.cuda(), S.cuda(), V.cuda(), float(sn))
    assert float(got[4]) == 0.0 and float(ops.update_statistics(x, y, U, S, V, float(sn))[4]) == 0.0


def test_subspace_iteration_kernel_with_nonfinite_w():
    W = gapped_matrix(20, 16)
    W[3, 4] = float("nan")
    V0 = torch.randn(16, 6, dtype=F64)
    with pytest.raises(RuntimeError, match=r"subspace_iteration: W must be finite"):  # CPU: always raises
        ops.subspace_iteration(W, V0, 3, 1, 0.0)
    # CUDA, one sweep and no tolerance (the tracker's warm step): nothing read back, NaN singular values.
    out = ops.subspace_iteration(W.cuda(), V0.cuda(), 3, 1, 0.0)
    assert bool(torch.isnan(out[1]).all())
    # CUDA with sweeps to go: the convergence read checks σ1 and raises as the CPU kernel does.
    with pytest.raises(RuntimeError, match=r"subspace_iteration: W must be finite"):
        ops.subspace_iteration(W.cuda(), V0.cuda(), 3, 10, 1e-10)


# ----------------------------------------------------------------------------------------------------
# persample_linear: parity with the CPU kernel and the reference twin
# ----------------------------------------------------------------------------------------------------
# (B, T, n, m, k): empty batch, all ones, odd, T = 1 (rank-one path) and T > 1 (sequence path), more
# samples than a block has threads, rows wider than a block, T longer than a warp, k = min(m, n) (exact
# spectrum, sigma_next = 0), and k = 1.
PERSAMPLE_CASES = [
    (0, 1, 5, 4, 2), (0, 3, 5, 4, 2), (1, 1, 1, 1, 1), (7, 1, 13, 5, 3), (300, 1, 17, 3, 2),
    (33, 1, 129, 64, 8), (3, 6, 5, 8, 4), (2, 70, 300, 129, 9), (5, 1, 40, 40, 40), (4, 5, 24, 24, 24),
    (1, 3, 1, 6, 1), (6, 2, 7, 9, 1),
]


def _case_id(c):
    return "B{}-T{}-n{}-m{}-k{}".format(*c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PERSAMPLE_CASES, ids=_case_id)
def test_persample_linear_matches_cpu_and_reference(dtype, case):
    args = _inputs(*case, dtype=dtype)
    out = ops.persample_linear(*args)
    cpu = ops.persample_linear(*_to_cpu(args))
    ref = reference.persample_linear(*_to_cpu(args))
    B = case[0]
    for name, o, c, r in zip(OUT_NAMES, out, cpu, ref):
        assert o.shape == (B,) and o.dtype == F64 and o.device.type == "cuda", name
        assert_close(o.cpu(), c, TOL["parity"][dtype], msg=f"{name}: CUDA vs CPU kernel")
        assert_close(o.cpu(), r, TOL["parity"][dtype], msg=f"{name}: CUDA vs reference")


@pytest.mark.parametrize("dtype", DTYPES + LOW)
def test_persample_linear_kernel_with_no_positions(dtype):
    """T = 0 straight into the kernel (lipfast.ops maps it to one zero position first): every G_i is an
    empty sum, so every output is 0."""
    X, D, U, S, V, sn = _inputs(3, 0, 5, 4, 2, dtype=dtype)
    out = torch.ops.lipfast.persample_linear.default(X, D, U, S, V, sn)
    for t in out:
        assert t.shape == (3,) and t.dtype == F64 and bool((t == 0).all()), out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "sequence-permuted"])
def test_persample_linear_non_contiguous(dtype, layout):
    B, n, m, k = 6, 7, 5, 3
    _, _, U, S, V, sn = _inputs(1, 1, n, m, k, dtype=dtype)
    cuda = dict(dtype=dtype, device="cuda")
    if layout == "transposed":
        X, D = torch.randn(n, B, **cuda).mT.unsqueeze(1), torch.randn(m, B, **cuda).mT.unsqueeze(1)
    elif layout == "sliced":
        X, D = torch.randn(B, 1, 2 * n, **cuda)[..., 1::2], torch.randn(2 * B, 1, m, **cuda)[::2]
    elif layout == "expanded":
        X = torch.randn(1, 1, n, **cuda).expand(B, 3, n)
        D = torch.randn(B, 1, m, **cuda).expand(B, 3, m)
    else:
        X, D = torch.randn(4, B, n, **cuda).transpose(0, 1), torch.randn(B, m, 4, **cuda).mT
    assert not X.is_contiguous() and not D.is_contiguous()
    got = ops.persample_linear(X, D, U, S, V, sn)
    want = ops.persample_linear(X.contiguous(), D.contiguous(), U, S, V, sn)
    cpu = ops.persample_linear(X.cpu(), D.cpu(), U.cpu(), S.cpu(), V.cpu(), sn)
    for name, g, w, c in zip(OUT_NAMES, got, want, cpu):
        assert_close(g, w, TOL["parity"][dtype], msg=name)
        assert_close(g.cpu(), c, TOL["parity"][dtype], msg=f"{name} vs CPU")


@pytest.mark.parametrize("T", [1, 4])
def test_persample_linear_degenerate_spectrum_is_nan_like_cpu(T):
    """σ1 == σ2: NaN Hessian terms, finite projections, as on the CPU."""
    Wd = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    U, S, V, sn = spectrum_of(Wd, 3)
    X, D = torch.randn(5, T, 3, dtype=F64), torch.randn(5, T, 3, dtype=F64)
    got = ops.persample_linear(X.cuda(), D.cuda(), U.cuda(), S.cuda(), V.cuda(), sn)
    cpu = ops.persample_linear(X, D, U, S, V, sn)
    assert bool(torch.isfinite(got[0]).all())
    for g, c in zip(got, cpu):
        torch.testing.assert_close(g.cpu(), c, equal_nan=True, rtol=1e-12, atol=1e-12)
    for g in got[1:]:
        assert bool(torch.isnan(g).all())


def test_persample_linear_cuda_error_messages():
    X, D, U, S, V, sn = _inputs(4, 1, 6, 5, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"persample_linear: D must have X's dtype"):
        ops.persample_linear(X, D.double(), U, S, V, sn)
    with pytest.raises(RuntimeError, match=r"persample_linear: D must have X's dtype"):
        ops.persample_linear(X.bfloat16(), D, U.bfloat16(), S, V.bfloat16(), sn)
    with pytest.raises(RuntimeError, match=r"persample_linear: .*must be on"):
        ops.persample_linear(X, D.cpu(), U, S, V, sn)
    with pytest.raises(RuntimeError, match=r"persample_linear: V.size\(0\) must equal X.size\(2\) = n"):
        ops.persample_linear(X.half(), D.half(), U.half(), S, V[:-1].half(), sn)
    with pytest.raises(RuntimeError, match=r"persample_linear: X must be float32, float64, float16 or bfloat16"):
        ops.persample_linear(X.int(), D.int(), U.int(), S, V.int(), sn)
    with pytest.raises(RuntimeError, match=r"persample_linear: X must be float32 or float64"):  # CPU: no half
        ops.persample_linear(*_to_cpu([X.bfloat16(), D.bfloat16(), U.bfloat16(), S, V.bfloat16(), sn]))


# ----------------------------------------------------------------------------------------------------
# persample_linear: float16 / bfloat16 inputs, flash-attn's rule
# ----------------------------------------------------------------------------------------------------
def _persample_linear_low_precision(X, D, U, S, V, sigma_next):
    """The reference twin's algorithm with every product and sum in the inputs' own (low) precision;
    the final contraction in float64 as everywhere. Its error is the yardstick of the kernel's."""
    XV, DU = X @ V, D @ U
    x = torch.einsum("btm,bt->bm", D, XV[..., 0])
    y = torch.einsum("btn,bt->bn", X, DU[..., 0])
    a, b = x @ U, y @ V
    hess = reference.hessian_contract(a, b, (x * x).sum(-1), (y * y).sum(-1), S, sigma_next)
    return (a[:, 0].to(F64), *hess)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", [(128, 1, 256, 96, 8), (64, 12, 64, 48, 6), (96, 1, 33, 20, 20)], ids=_case_id)
def test_persample_linear_reduced_precision(dtype, case):
    """Kernel error vs a float64 reference on the same (rounded) inputs <= 2 × the error of the
    reference algorithm run in that precision (flash-attn tests/test_flash_attn.py)."""
    X, D, U, S, V, sn = _inputs(*case, dtype=dtype)
    out = ops.persample_linear(X, D, U, S, V, sn)
    exact = reference.persample_linear(X.to(F64), D.to(F64), U.to(F64), S, V.to(F64), sn)
    low = _persample_linear_low_precision(X, D, U, S, V, sn)
    for name, o, e, lo in zip(OUT_NAMES, out, exact, low):
        assert o.dtype == F64 and o.shape == (case[0],)
        assert bool(torch.isfinite(o).all()), name
        err, err_low = float((o - e).abs().max()), float((lo - e).abs().max())
        floor = 1e-12 * float(e.abs().max())
        assert err <= 2 * err_low + floor, (
            f"{dtype} {name}: kernel error {err:.3e} > 2 × low-precision reference error {err_low:.3e}")


# ----------------------------------------------------------------------------------------------------
# hessian_contract
# ----------------------------------------------------------------------------------------------------
def _contract_inputs(N, k, dtype, device="cuda", tie=False, exact=False):
    r = max(k + (0 if exact else 1), 2)
    S_all = torch.sort(torch.rand(r, dtype=F64) * 2 + 0.5, descending=True)[0]
    if tie:
        S_all[1] = S_all[0]
    S, sn = S_all[:k], (0.0 if exact else float(S_all[k]))
    a, b = torch.randn(N, k, dtype=F64), torch.randn(N, k, dtype=F64)
    rest = torch.rand(N, dtype=F64)
    xn = (a * a).sum(-1) + rest
    yn = (b * b).sum(-1) + torch.rand(N, dtype=F64)
    cast = dict(device=device, dtype=dtype)
    return a.to(**cast), b.to(**cast), xn.to(**cast), yn.to(**cast), S.to(**cast), sn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,exact", [(0, 2, False), (1, 1, False), (7, 3, False), (300, 9, False),
                                       (1000, 4, True), (257, 1, True)])
def test_hessian_contract_matches_cpu_and_reference(dtype, N, k, exact):
    args = _contract_inputs(N, k, dtype, exact=exact)
    out = ops.hessian_contract(*args)
    cpu = ops.hessian_contract(*_to_cpu(args))
    ref = reference.hessian_contract(*_to_cpu(args))
    for o, c, r in zip(out, cpu, ref):
        assert o.shape == (N,) and o.dtype == F64 and o.device.type == "cuda"
        # Same float64 arithmetic (math.h) on both backends: only FMA contraction may differ.
        assert_close(o.cpu(), c, TOL["parity"][F64])
        assert_close(o.cpu(), r, TOL["parity"][F64])


def test_hessian_contract_degenerate_and_non_contiguous():
    a, b, xn, yn, S, sn = _contract_inputs(9, 3, F64, tie=True)
    for t in ops.hessian_contract(a, b, xn, yn, S, sn):
        assert bool(torch.isnan(t).all())
    a, b, xn, yn, S, sn = _contract_inputs(9, 3, F64)
    at, bt = a.mT.contiguous().mT, b.mT.contiguous().mT  # column-major copies
    assert not at.is_contiguous()
    for g, w in zip(ops.hessian_contract(at, bt, xn, yn, S, sn), ops.hessian_contract(a, b, xn, yn, S, sn)):
        assert_close(g, w, TOL["parity"][F64])
    bad_sn = float(S[0]) * 1.5  # sigma_next above σ1: no valid bracket
    for t in ops.hessian_contract(a, b, xn, yn, S, bad_sn):
        assert bool(torch.isnan(t).all())


# ----------------------------------------------------------------------------------------------------
# Composite ops on CUDA (ATen only): parity with their CPU runs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_composite_ops_match_cpu(dtype):
    m, n, k, N = 40, 30, 5, 16
    W = gapped_matrix(m, n, dtype)
    V0 = torch.randn(n, k + 3, dtype=dtype)
    R, L = torch.randn(n, 2, dtype=dtype), torch.randn(m, 3, dtype=dtype)
    cpu = ops.subspace_iteration(W, V0, k, 50, 1e-6 if dtype == torch.float32 else 1e-12, R, L)
    out = ops.subspace_iteration(W.cuda(), V0.cuda(), k, 50, 1e-6 if dtype == torch.float32 else 1e-12,
                                 R.cuda(), L.cuda())
    assert out[4].device.type == "cuda" and out[4].dtype == torch.int64  # iters, on W's device
    tol = TOL["truth"][dtype]
    assert_close(out[1][:k].cpu(), cpu[1][:k], tol)                       # singular values
    assert_close(out[6].cpu(), cpu[6], tol)                               # W·right
    assert_close(out[7].cpu(), cpu[7], tol)                               # Wᵀ·left
    U, S, V = spectrum_of(W, k)[:3]
    U, V = U.to(dtype), V.to(dtype)
    proj, hess, lo, hi = (torch.randn(N, dtype=F64) for _ in range(4))
    G = torch.randn(m, n, dtype=dtype)
    gs = dict(sigma_next=0.5, scale=float(N), loss_factor=1.0)
    g_cpu = ops.gradient_statistics(proj, hess, lo, hi, G, U, S, V, **gs)
    g_cuda = ops.gradient_statistics(*(t.cuda() for t in (proj, hess, lo, hi, G, U, S, V)), **gs)
    assert_close(g_cuda.cpu(), g_cpu, TOL["parity"][dtype])
    x, y = torch.randn(m, dtype=F64), torch.randn(n, dtype=F64)
    u_cpu = ops.update_statistics(x, y, U, S, V, 0.5)
    u_cuda = ops.update_statistics(*(t.cuda() for t in (x, y, U, S, V)), 0.5)
    assert_close(u_cuda.cpu(), u_cpu, TOL["parity"][dtype])
    # track_update: the tracker's post-step call, iterated and exact
    for (mm, nn, exact) in [(m, n, False), (12, 40, True)]:
        Wt = gapped_matrix(mm, nn, dtype)
        U64, St, V64 = spectrum_of(Wt, 4)[:3]
        Ut, Vt = U64.to(dtype), V64.to(dtype)
        basis = torch.randn(nn, 9, dtype=dtype)
        Wt_u1 = Wt.to(F64).mT @ U64[:, 0]
        W2 = Wt + 1e-3 * torch.randn(mm, nn, dtype=dtype)
        args = (W2, basis, Ut, St, Vt, 0.5 * float(St[-1]), Wt_u1, 30, 0.0, exact)
        t_cpu = ops.track_update(*args)
        t_cuda = ops.track_update(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        assert_close(t_cuda[1].cpu(), t_cpu[1], TOL["truth"][dtype])        # new singular values
        assert_close(t_cuda[7][:8].cpu(), t_cpu[7][:8], TOL["parity"][dtype])  # update statistics, σ1
    # persample_linear.sums: the CUDA persample_linear kernel plus four GEMVs (composite)
    for (B, T) in [(33, 1), (7, 5)]:
        args = (torch.randn(B, T, n, dtype=dtype), torch.randn(B, T, m, dtype=dtype), U, S, V, 0.5)
        s_cpu = ops.persample_linear(*args, sums=True)
        s_cuda = ops.persample_linear(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), sums=True)
        for got, want in zip(s_cuda, s_cpu):
            assert got.device.type == "cuda" and got.dtype == F64
            assert_close(got.cpu(), want, TOL["parity"][dtype])
    # conv2d_projections: strided and stride-1 geometries (the CPU kernel has a path for each)
    for (B, C, Co, H, Wd, geometry) in [(5, 3, 4, 9, 7, ([3, 2], [2, 1], [1, 0], [1, 2])),
                                       (4, 6, 8, 10, 10, ([3, 3], [1, 1], [1, 1], [1, 1]))]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        args = (torch.randn(B, C, H, Wd, dtype=dtype), torch.randn(B, Co, Ho, Wo, dtype=dtype),
                torch.randn(Co, dtype=dtype), torch.randn(C * kh * kw, dtype=dtype))
        c_cpu = ops.conv2d_projections(*args, *geometry)
        c_cuda = ops.conv2d_projections(*(a.cuda() for a in args), *geometry)
        for got, want in zip(c_cuda, c_cpu):
            assert got.device.type == "cuda" and got.dtype == F64
            assert_close(got.cpu(), want, TOL["parity"][dtype])
        Uc, Sc, Vc, snc = spectrum_of(gapped_matrix(Co, C * kh * kw), 2)
        spec_args = (Uc.to(dtype), Sc, Vc.to(dtype), snc)
        p_cpu = ops.persample_conv2d(args[0], args[1], *spec_args, *geometry)
        p_cuda = ops.persample_conv2d(args[0].cuda(), args[1].cuda(), *(t.cuda() for t in spec_args[:3]), snc,
                                      *geometry)
        for got, want in zip(p_cuda, p_cpu):
            assert got.device.type == "cuda" and got.dtype == F64
            assert_close(got.cpu(), want, TOL["parity"][dtype])


# ----------------------------------------------------------------------------------------------------
# opcheck on CUDA (schema, fake kernel, AOT dispatch, autograd registration), with and without grad
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cuda(requires_grad):
    samples = []
    for dtype in DTYPES + LOW:
        for shape in [(0, 1, 5, 4, 2), (1, 1, 1, 1, 1), (5, 1, 6, 4, 2), (5, 3, 6, 4, 2)]:
            X, D, U, S, V, sn = _inputs(*shape, dtype=dtype)
            samples.append((torch.ops.lipfast.persample_linear.default,
                            (X.requires_grad_(requires_grad and dtype in DTYPES), D, U, S, V, sn)))
    for dtype in DTYPES:
        for N, k in [(0, 2), (1, 1), (6, 3)]:
            a, b, xn, yn, S, sn = _contract_inputs(N, k, dtype)
            samples.append((torch.ops.lipfast.hessian_contract.default,
                            (a.requires_grad_(requires_grad), b, xn, yn, S, sn)))
        W = torch.randn(7, 5, dtype=dtype, device="cuda", requires_grad=requires_grad)
        samples.append((torch.ops.lipfast.subspace_iteration.default,
                        (W, torch.randn(5, 3, dtype=dtype, device="cuda"), 2, 3, 0.0)))
        U, S, V = (t.to(device="cuda") for t in spectrum_of(gapped_matrix(6, 4), 2)[:3])
        G = torch.randn(6, 4, dtype=dtype, device="cuda", requires_grad=requires_grad)
        p = [torch.randn(5, dtype=F64, device="cuda") for _ in range(4)]
        samples.append((torch.ops.lipfast.gradient_statistics.default,
                        (*p, G, U.to(dtype), S, V.to(dtype), 0.1, 5.0, 1.0)))
        samples.append((torch.ops.lipfast.update_statistics.default,
                        (torch.randn(6, dtype=F64, device="cuda"), torch.randn(4, dtype=F64, device="cuda"),
                         U, S, V, 0.1)))
    for op, args in samples:
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------------
# No host synchronisation inside the kernels' ops (STYLE §8.8); the tracker's reductions stay on device
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_synchronisation():
    """Any host-device synchronisation inside raises (torch.cuda.set_sync_debug_mode). Setting the mode warns
    that it is a prototype, which the suite's warnings-as-errors would turn into an exception that left the
    mode on for every later test: the warning is silenced and the mode always reset."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("default")


def test_ops_do_not_synchronise():
    X, D, U, S, V, sn = _inputs(64, 1, 48, 32, 8, dtype=torch.float32)
    Xs, Ds = X.expand(64, 5, 48).contiguous(), D.expand(64, 5, 32).contiguous()
    a, b, xn, yn, S2, sn2 = _contract_inputs(100, 5, F64)
    G = torch.randn(32, 48, device="cuda")
    x, y = torch.randn(32, dtype=F64, device="cuda"), torch.randn(48, dtype=F64, device="cuda")
    half = [t.bfloat16() for t in (X, D, U, V)]

    W = G + 0.0
    basis = torch.randn(48, 13, device="cuda")
    Wt_u1 = W.double().mT @ U[:, 0].double()

    def calls():
        stats = ops.persample_linear(X, D, U, S, V, sn)
        ops.persample_linear(Xs, Ds, U, S, V, sn)
        ops.persample_linear(half[0], half[1], half[2], S, half[3], sn)
        ops.hessian_contract(a, b, xn, yn, S2, sn2)
        ops.gradient_statistics(*stats, G, U, S, V, sn, 64.0, 1.0)
        ops.update_statistics(x, y, U, S, V, sn)
        ops.subspace_iteration(W, basis, 9, 1, 0.0, V[:, :1], U[:, :1])
        ops.track_update(W, basis, U, S, V, sn, Wt_u1, 1, 1e-6, False)  # the tracker's warm step

    calls()  # first: cuBLAS handles, workspaces and the caching allocator warm up (those may sync)
    torch.cuda.synchronize()
    with _no_synchronisation():
        calls()
    torch.cuda.synchronize()


def test_ops_run_on_the_current_stream_and_device():
    X, D, U, S, V, sn = _inputs(32, 3, 20, 12, 4)
    want = [t.cpu() for t in ops.persample_linear(X, D, U, S, V, sn)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.persample_linear(X, D, U, S, V, sn)
    torch.cuda.current_stream().wait_stream(side)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, TOL["parity"][F64])
    if torch.cuda.device_count() > 1:  # tensors on a device that is not the current one
        args = [t.to("cuda:1") if isinstance(t, torch.Tensor) else t for t in (X, D, U, S, V, sn)]
        got = ops.persample_linear(*args)
        assert got[0].device == torch.device("cuda:1")
        for g, w in zip(got, want):
            assert_close(g.cpu(), w, TOL["parity"][F64])


# ----------------------------------------------------------------------------------------------------
# A tracked training run on CUDA matches the same run on the CPU, record by record
# ----------------------------------------------------------------------------------------------------
RECORD_FIELDS = ("sigma", "sigma2", "sigma_next", "drift", "diffusion_var", "ito", "ito_lo", "ito_hi",
                 "first_order", "second_order", "delta_pred", "delta_obs")


def _train(model, device, steps, batch, seed=0, **tracker_kw):
    model = copy.deepcopy(model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    with lipfast.Tracker(model, opt, **tracker_kw) as tracker:
        for _ in range(steps):
            x = torch.randn(batch, *model.input_shape, generator=g, dtype=F64).to(device=device, dtype=dtype)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            tracker.log(loss=loss)
            opt.step()
    return tracker.records


def _small_model(arch, dtype):
    """Layers small enough (m·n <= 64·64) for exact spectra: the runs differ only by rounding."""
    if arch == "mlp":
        model, shape = models.build_model("mlp", (20,), 10, widths=(32, 32), seed=0), (20,)
    else:
        model, shape = models.build_model("cnn", (1, 8, 8), 10, widths=(4, 8), seed=0), (1, 8, 8)
    model = model.to(dtype)
    model.input_shape = shape
    return model


# float64: the runs agree to float64 rounding amplified over a few steps; float32: to float32 rounding
# (different GEMM/convolution kernels, no TF32) amplified by the cancellations in ito and the variance.
RUN_TOL = {F64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=2e-3, atol=2e-4)}
# Read off the realised step (W before vs after, through the weight's own precision): both runs are
# accurate to ~eps·σ1 there whatever the dtype (the floor bench/bench_step.py uses too).
STEP_FIELDS = ("first_order", "second_order", "delta_pred", "delta_obs")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_tracked_training_run_matches_cpu(arch, dtype):
    model = _small_model(arch, dtype)
    kw = dict(rank=8, gap_tol=1e-6, step_tol=1e6)
    cpu = _train(model, "cpu", steps=6, batch=32, **kw)
    gpu = _train(model, "cuda", steps=6, batch=32, **kw)
    assert len(gpu) == len(cpu) > 0
    tol = RUN_TOL[dtype]
    sigma_max = max(abs(r["sigma"]) for r in cpu)
    floor = 64 * torch.finfo(dtype).eps * sigma_max
    for field in RECORD_FIELDS:
        c = torch.tensor([r[field] for r in cpu], dtype=F64)
        g = torch.tensor([r[field] for r in gpu], dtype=F64)
        scale = float(c.abs().max()) if c.numel() else 1.0
        atol = tol["atol"] * max(scale, 1e-300) + (floor if field in STEP_FIELDS else 0.0)
        torch.testing.assert_close(g, c, rtol=tol["rtol"], atol=atol, equal_nan=True,
                                   msg=lambda m, f=field: f"{arch} {dtype} {f}: {m}")
    for rc, rg in zip(cpu, gpu):
        assert (rc["step"], rc["layer"], rc["batch"]) == (rg["step"], rg["layer"], rg["batch"])
        assert (rc["degenerate"], rc["nonfinite"]) == (rg["degenerate"], rg["nonfinite"])
        assert math.isfinite(rg["sigma"])


# ----------------------------------------------------------------------------------------------------
# A whole tracked training step on CUDA never waits for the GPU: records are read back lazily
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_tracked_step_does_not_synchronise(arch):
    torch.manual_seed(0)
    if arch == "mlp":  # an iterated spectrum (64×100) and exact ones (32×64, 10×32)
        # (An exact spectrum with both sides above 32, e.g. 64×64, takes the composite kernel: it syncs.)
        model, shape = models.build_model("mlp", (100,), 10, widths=(64, 32), seed=0), (100,)
    else:  # conv layers whose per-sample statistics come from persample_conv2d, and a linear head
        model, shape = models.build_model("cnn", (3, 12, 12), 10, widths=(16, 32), seed=0), (3, 12, 12)
    model = model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, *shape, generator=g).cuda()
    y = torch.randint(0, 10, (32,), generator=g).cuda()
    tracker = lipfast.Tracker(model, opt, rank=4, gap_tol=0, step_tol=math.inf)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        tracker.log(loss=loss)
        opt.step()

    for _ in range(3):  # the first spectra are cold (their sweeps test convergence on the host)
        step()
    torch.cuda.synchronize()  # the last step's copy has landed: reading it back needs no wait
    with _no_synchronisation():
        step()  # reads back the previous step's numbers (at the forward) and queues its own
    layers = len(tracker.captures)
    assert len(tracker._records) == 3 * layers  # the last step is still on its way
    records = tracker.records  # reading them reads it back
    assert len(records) == 4 * layers and [n["step"] for n in tracker.network] == [0, 1, 2, 3]
    assert all(math.isfinite(r["sigma"]) and math.isfinite(r["ito"]) for r in records)
    assert all(math.isfinite(n["loss"]) for n in tracker.network)
    tracker.close()


# ----------------------------------------------------------------------------------------------------
# Adaptive optimizers (issue 19): the preconditioned ops on CUDA, and a tracked AdamW step without a sync
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_precond_ops_match_cpu(dtype):
    torch.manual_seed(0)
    X, D, P = torch.randn(9, 3, 12, dtype=dtype), torch.randn(9, 3, 7, dtype=dtype), torch.rand(7, 12, dtype=dtype)
    U, S, Vh = torch.linalg.svd(torch.randn(7, 12, dtype=F64), full_matrices=False)
    U, V = U[:, :5].to(dtype), Vh.mT[:, :5].to(dtype)
    cpu = ops.persample_linear_precond(X, D, P, U, S[:5], V, float(S[5]))
    gpu = ops.persample_linear_precond(X.cuda(), D.cuda(), P.cuda(), U.cuda(), S[:5].cuda(), V.cuda(), float(S[5]))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)
    x, d, Pc = torch.randn(4, 3, 8, 8, dtype=dtype), torch.randn(4, 5, 4, 4, dtype=dtype), torch.rand(5, 27, dtype=dtype)
    U, S, Vh = torch.linalg.svd(torch.randn(5, 27, dtype=F64), full_matrices=False)
    geo = ((3, 3), (2, 2), (1, 1), (1, 1))
    cpu = ops.persample_conv2d_precond(x, d, Pc, U.to(dtype), S, Vh.mT.to(dtype), 0.0, *geo)
    gpu = ops.persample_conv2d_precond(x.cuda(), d.cuda(), Pc.cuda(), U.to(dtype).cuda(), S.cuda(),
                                       Vh.mT.to(dtype).cuda(), 0.0, *geo)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(capturable=True), dict(fused=True)],
                         ids=["default", "capturable", "fused"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_tracked_adamw_step_does_not_synchronise(arch, variant):
    """P, the known step and the preconditioned statistics are formed from the optimizer state on the device;
    a capturable or fused AdamW keeps its step count there, and the tracker reads it as a tensor."""
    torch.manual_seed(0)
    if arch == "mlp":
        model, shape = models.build_model("mlp", (100,), 10, widths=(64, 32), seed=0), (100,)
    else:
        model, shape = models.build_model("cnn", (3, 12, 12), 10, widths=(16, 32), seed=0), (3, 12, 12)
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, *shape, generator=g).cuda()
    y = torch.randint(0, 10, (32,), generator=g).cuda()
    tracker = lipfast.Tracker(model, opt, rank=4, gap_tol=0, step_tol=math.inf)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with _no_synchronisation():
        step()
    records = tracker.records
    assert all("sgd_equivalent" not in r["flag_names"] and math.isfinite(r["ito"]) for r in records)
    for r in records:  # the frozen P is the step's own: the known step plus the fresh part is the first order
        assert math.isclose(r["drift"], r["first_order"], rel_tol=1e-2, abs_tol=1e-6), r
    tracker.close()
