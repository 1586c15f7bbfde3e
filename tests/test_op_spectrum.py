"""lipfast.spectrum and the compiled lipfast::subspace_iteration: against LAPACK (torch.linalg.svd),
against the reference twin, opcheck, and bad input."""

from __future__ import annotations

import pytest
import torch

import lipfast
from lipfast import ops, reference

from conftest import (DEVICES, DTYPES, ORTHO_TOL, SPECTRUM_TOL, TOL, align_signs, assert_close,
                      decaying_matrix, matrix_with_spectrum)

F64 = torch.float64

# Sizes above functional._SMALL_MATRIX (64·64 entries) so that spectrum() iterates instead of calling
# LAPACK; each test asserts ``spec.iters > 0`` to make sure of it.
ITERATED_SHAPES = [(96, 64), (64, 96), (131, 37)]


def _svd64(W):
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return U, S, Vh.mT


def _assert_orthonormal(Q: torch.Tensor, dtype):
    k = Q.shape[1]
    eye = torch.eye(k, dtype=torch.float64, device=Q.device)
    err = float((Q.to(torch.float64).mT @ Q.to(torch.float64) - eye).abs().max())
    assert err <= ORTHO_TOL[dtype], f"columns not orthonormal: max |QᵀQ − I| = {err:.2e}"


def _assert_descending(S: torch.Tensor):
    assert bool((S[:-1] >= S[1:]).all()), f"S not descending: {S.tolist()}"


def _assert_vectors_match(spec, U_ref, V_ref, k, tol):
    sgn = align_signs(spec.U[:, :k], U_ref[:, :k])
    assert_close(spec.U[:, :k] * sgn, U_ref[:, :k], tol)
    assert_close(spec.V[:, :k] * sgn, V_ref[:, :k], tol)


# ----------------------------------------------------------------------------------------------------
# Exact path: k >= min(m, n)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (7, 4), (4, 7), (9, 9)])
@pytest.mark.parametrize("extra", [0, 3])
def test_exact_when_k_covers_the_rank(device, dtype, shape, extra):
    m, n = shape
    r = min(m, n)
    W = torch.randn(m, n, dtype=dtype, device=device)
    spec = lipfast.spectrum(W, k=r + extra)
    U_ref, S_ref, V_ref = _svd64(W)
    assert spec.exact is True
    assert spec.shape == (m, n)
    assert spec.k == r
    assert spec.U.shape == (m, r) and spec.V.shape == (n, r) and spec.S.shape == (r,)
    assert spec.S.dtype == torch.float64 and spec.U.dtype == dtype and spec.V.dtype == dtype
    assert float(spec.sigma_next) == 0.0
    _assert_descending(spec.S)
    _assert_orthonormal(spec.U, dtype)
    _assert_orthonormal(spec.V, dtype)
    assert_close(spec.S, S_ref, TOL["truth"][dtype])
    assert_close(spec.sigma, torch.linalg.matrix_norm(W.to(torch.float64), 2), TOL["truth"][dtype])
    # W = U diag(S) Vᵀ: the factors rebuild the matrix.
    assert_close((spec.U.to(torch.float64) * spec.S) @ spec.V.to(torch.float64).mT, W, TOL["truth"][dtype])
    assert spec.residual <= SPECTRUM_TOL[dtype] * float(spec.sigma)


def test_truncated_lapack_path_reports_the_next_singular_value():
    W = torch.randn(12, 9, dtype=torch.float64)
    S_ref = torch.linalg.svdvals(W)
    spec = lipfast.spectrum(W, k=3)
    assert spec.exact is False and spec.k == 3
    assert_close(spec.S, S_ref[:3], TOL["truth"][torch.float64])
    assert_close(spec.sigma_next, S_ref[3], TOL["truth"][torch.float64])


# ----------------------------------------------------------------------------------------------------
# Iterative path: cold start, warm start
# ----------------------------------------------------------------------------------------------------
def _gram_rounding(S_ref, dtype):
    """Rounding bound on Ritz values from Gram matrices: 10·eps·σ1²/σ_j (10·eps·σ1 for σ1 itself)."""
    return 10 * torch.finfo(dtype).eps * S_ref[0] * (S_ref[0] / S_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ITERATED_SHAPES)
def test_cold_start_decaying_spectrum_matches_lapack(device, dtype, shape):
    m, n = shape
    k = 6
    W = decaying_matrix(m, n, dtype, device)
    U_ref, S_ref, V_ref = _svd64(W)
    spec = lipfast.spectrum(W, k=k)
    assert spec.iters > 0 and spec.exact is False
    assert spec.U.shape == (m, k) and spec.V.shape == (n, k) and spec.S.shape == (k,)
    assert spec.residual <= SPECTRUM_TOL[dtype] * float(spec.sigma)
    assert float(spec.residuals.max()) == spec.residual
    _assert_descending(spec.S)
    _assert_orthonormal(spec.U, dtype)
    _assert_orthonormal(spec.V, dtype)
    # Every Ritz value lies within its residual of a true singular value (here: the matching one), up to the
    # rounding of the Gram matrices the Rayleigh–Ritz step forms: eps·σ1² on σ_j², i.e. eps·σ1²/σ_j on σ_j.
    err = (spec.S - S_ref[:k]).abs()
    assert bool((err <= spec.residuals + _gram_rounding(S_ref[:k], dtype)).all()), err
    # The geometric decay keeps gaps at 20% of the values: the vectors are determined to ~tol/gap.
    vec_tol = dict(rtol=0.0, atol=50 * SPECTRUM_TOL[dtype])
    _assert_vectors_match(spec, U_ref, V_ref, k, vec_tol)
    # σ_{k+1} is reported as an upper estimate, capped by σ_k (it sets the truncation bracket).
    assert float(S_ref[k]) <= float(spec.sigma_next) * (1 + 1e-12) + 1e-12
    assert float(spec.sigma_next) <= float(spec.S[k - 1])
    assert_close(spec.sigma_next, S_ref[k], dict(rtol=0.0, atol=10 * SPECTRUM_TOL[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(80, 60), (60, 80)])
def test_cold_start_gaussian_matches_lapack(dtype, shape):
    """Gaussian matrices have small relative gaps at the top (slow convergence): give it room."""
    m, n = shape
    k = 4
    W = torch.randn(m, n, dtype=dtype)
    S_ref = torch.linalg.svdvals(W.to(torch.float64))
    spec = lipfast.spectrum(W, k=k, iters=500)
    assert 0 < spec.iters < 500, "did not reach the tolerance"
    assert spec.residual <= SPECTRUM_TOL[dtype] * float(spec.sigma)
    _assert_descending(spec.S)
    _assert_orthonormal(spec.U, dtype)
    _assert_orthonormal(spec.V, dtype)
    err = (spec.S - S_ref[:k]).abs()
    assert bool((err <= spec.residuals + 10 * torch.finfo(dtype).eps * S_ref[0]).all()), err


def test_residual_field_is_the_backward_residual():
    """``residuals[j] = ‖Wᵀu_j − σ_j v_j‖``, recomputed here in float64; ``W v_j = σ_j u_j`` holds."""
    W = decaying_matrix(96, 64, rate=0.9)
    spec = lipfast.spectrum(W, k=5, iters=3, tol=0)  # few sweeps: residuals well above roundoff
    assert spec.iters == 3
    back = (W.mT @ spec.U - spec.V * spec.S).norm(dim=0)
    fwd = (W @ spec.V - spec.U * spec.S).norm(dim=0)
    assert float(back.max()) > 1e-6
    assert_close(spec.residuals, back, dict(rtol=1e-8, atol=1e-12))
    assert float(fwd.max()) <= 1e-12 * float(spec.sigma)
    assert spec.residual == pytest.approx(float(back.max()), rel=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ITERATED_SHAPES[:2])
def test_warm_start_converges_in_fewer_sweeps(device, dtype, shape):
    m, n = shape
    k = 6
    W0 = decaying_matrix(m, n, dtype, device)
    # One small "SGD step" later, drawn on the CPU: the same W1 on every device (sweep counts depend on it).
    W1 = W0 + 1e-4 * torch.randn(W0.shape, dtype=torch.float64).to(W0)
    prev = lipfast.spectrum(W0, k=k)
    warm = lipfast.spectrum(W1, k=k, state=prev)
    cold = lipfast.spectrum(W1, k=k)
    assert warm.iters < cold.iters, (warm.iters, cold.iters)
    assert warm.iters <= 4
    assert warm.residual <= SPECTRUM_TOL[dtype] * float(warm.sigma)
    U_ref, S_ref, V_ref = _svd64(W1)
    err = (warm.S - S_ref[:k]).abs()
    assert bool((err <= warm.residuals + _gram_rounding(S_ref[:k], dtype)).all()), err
    _assert_vectors_match(warm, U_ref, V_ref, k, dict(rtol=0.0, atol=50 * SPECTRUM_TOL[dtype]))


def test_warm_start_on_the_same_matrix_needs_one_sweep():
    W = decaying_matrix(96, 64)
    spec = lipfast.spectrum(W, k=4)
    again = lipfast.spectrum(W, k=4, state=spec)
    assert again.iters == 1
    assert_close(again.S, spec.S, TOL["truth"][torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input(dtype, layout):
    m, n = 80, 70
    if layout == "transposed":
        W = torch.randn(n, m, dtype=dtype).mT
    elif layout == "sliced":
        W = torch.randn(m, 2 * n, dtype=dtype)[:, ::2]
    else:  # rank one, stride 0 along the rows
        W = torch.randn(1, n, dtype=dtype).expand(m, n)
    assert not W.is_contiguous()
    spec = lipfast.spectrum(W, k=4)
    dense = lipfast.spectrum(W.contiguous(), k=4)
    assert spec.iters > 0
    assert_close(spec.S, dense.S, TOL["parity"][dtype])
    S_ref = torch.linalg.svdvals(W.to(torch.float64))
    assert abs(float(spec.S[0]) - float(S_ref[0])) <= spec.residuals[0] + 10 * torch.finfo(dtype).eps * S_ref[0]


# ----------------------------------------------------------------------------------------------------
# Degenerate top singular value
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_degenerate_top_singular_value_small(dtype, k):
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=dtype))
    spec = lipfast.spectrum(W, k=k)
    assert spec.degenerate is True
    assert spec.gap == 0.0
    assert float(spec.sigma) == pytest.approx(2.0)
    h = lipfast.hessian_form(spec, torch.randn(4, 3, 3, dtype=dtype))
    assert h.degenerate is True
    for t in (h.value, h.lo, h.hi):
        assert bool(torch.isnan(t).all()) and not bool(torch.isinf(t).any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_top_singular_value_iterated(dtype):
    S = torch.cat([torch.tensor([5.0, 5.0, 3.0]), torch.linspace(2.0, 0.1, 61)]).to(torch.float64)
    W = matrix_with_spectrum(S, 96, 64, dtype)
    spec = lipfast.spectrum(W, k=4)
    assert spec.iters > 0
    assert spec.degenerate is True
    h = lipfast.hessian_form(spec, torch.randn(96, 64, dtype=dtype))
    assert bool(torch.isnan(h.value)) and bool(torch.isnan(h.lo)) and bool(torch.isnan(h.hi))


def test_well_separated_is_not_degenerate():
    spec = lipfast.spectrum(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)), k=3)
    assert spec.degenerate is False
    assert spec.gap == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------
# Compiled op vs reference twin
# ----------------------------------------------------------------------------------------------------
# (m, n, p, k): size one, odd and non-square both ways, a full block (p = min(m, n)), larger.
SUBSPACE_SHAPES = [(1, 1, 1, 1), (7, 13, 3, 2), (13, 7, 5, 3), (40, 30, 30, 5), (129, 65, 9, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SUBSPACE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_subspace_iteration_matches_reference(device, dtype, shape, layout):
    m, n, p, k = shape
    W = decaying_matrix(m, n, dtype, device, rate=0.7)
    if layout == "transposed":
        W = W.mT.contiguous().mT
    V0 = torch.randn(n, p, dtype=dtype, device=device)
    iters = 4
    U, S, V, res, it, nxt, _, _ = ops.subspace_iteration(W, V0, k, iters, 0.0)  # tol 0: exactly `iters` sweeps
    U_r, S_r, V_r, res_r, it_r, nxt_r, _, _ = reference.subspace_iteration(W, V0, k, iters, 0.0)
    assert U.shape == (m, p) and V.shape == (n, p) and S.shape == (p,) and res.shape == (p,)
    assert U.dtype == dtype and V.dtype == dtype
    assert S.dtype == torch.float64 and res.dtype == torch.float64
    assert it.dtype == torch.int64 and it.dim() == 0 and int(it) == iters == int(it_r)
    tol = TOL["parity"][dtype]
    assert_close(S, S_r, tol)
    # residuals: absolute differences on the scale of σ1 (they are themselves small numbers)
    torch.testing.assert_close(res, res_r, rtol=0.0, atol=tol["atol"] * float(S_r[0]))
    sgn = align_signs(U[:, :k], U_r[:, :k])
    assert_close(U[:, :k] * sgn, U_r[:, :k], tol)
    assert_close(V[:, :k] * sgn, V_r[:, :k], tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subspace_iteration_stops_at_tolerance_like_reference(dtype):
    W = decaying_matrix(65, 129, dtype)
    V0 = torch.randn(129, 9, dtype=dtype)
    tol = SPECTRUM_TOL[dtype]
    U, S, V, res, it, *_ = ops.subspace_iteration(W, V0, 8, 200, tol)
    U_r, S_r, V_r, res_r, it_r, *_ = reference.subspace_iteration(W, V0, 8, 200, tol)
    assert 1 < int(it) < 200
    assert abs(int(it) - int(it_r)) <= 1        # the stopping test may flip on rounding at the edge
    assert float(res[:8].max()) <= tol * float(S[0])
    assert_close(S[:8], S_r[:8], dict(rtol=0.0, atol=10 * tol))


def test_subspace_iteration_rank_deficient_block():
    """A rank-one W collapses the block: CholeskyQR fails and the Householder fallback must carry on,
    with σ_j = 0 columns given u_j = 0."""
    W = torch.randn(1, 50, dtype=torch.float64).expand(40, 50)
    V0 = torch.randn(50, 4, dtype=torch.float64)
    U, S, V, res, it, *_ = ops.subspace_iteration(W, V0, 1, 6, 0.0)
    assert bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all())
    assert float(S[0]) == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-12)
    assert float(S[1:].max()) <= 1e-10 * float(S[0])


# ----------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------
def _subspace_samples(device, requires_grad):
    out = []
    for dtype in DTYPES:
        for (m, n, p, k) in [(7, 5, 3, 2), (5, 9, 4, 4), (1, 1, 1, 1)]:
            W = torch.randn(m, n, dtype=dtype, device=device, requires_grad=requires_grad)
            V0 = torch.randn(n, p, dtype=dtype, device=device)
            out.append((W, V0, k, 3, 0.0))
            out.append((W, V0, k, 50, 1e-3))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_subspace_iteration_opcheck(device, requires_grad):
    for args in _subspace_samples(device, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.lipfast.subspace_iteration.default, args)


def test_subspace_iteration_outputs_are_not_differentiable():
    """A measurement op: inputs that require grad give outputs that do not (and nothing to backprop)."""
    W = torch.randn(7, 5, dtype=F64, requires_grad=True)
    V0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    outs = torch.ops.lipfast.subspace_iteration(W, V0, 2, 3, 0.0)
    assert not any(t.requires_grad for t in outs)


# ----------------------------------------------------------------------------------------------------
# Bad input: public messages
# ----------------------------------------------------------------------------------------------------
def _W():
    return torch.randn(6, 4, dtype=torch.float64)


@pytest.mark.parametrize("W, exc, match", [
    (torch.randn(3), ValueError, r"lipfast\.spectrum: W must have shape \[m, n\], got \(3,\)"),
    (torch.randn(2, 3, 4), ValueError, r"W must have shape \[m, n\], got \(2, 3, 4\)"),
    (torch.ones(3, 3, dtype=torch.int64), TypeError, r"W must be float32 or float64, got torch\.int64"),
    (torch.ones(3, 3, dtype=torch.int32), TypeError, r"W must be float32 or float64, got torch\.int32"),
    (torch.zeros(0, 6), ValueError, r"W must have at least one row and one column, got shape \(0, 6\)"),
    ([[1.0, 2.0]], TypeError, r"W must be a torch\.Tensor of shape \[m, n\], got list"),
])
def test_bad_matrix(W, exc, match):
    with pytest.raises(exc, match=match):
        lipfast.spectrum(W, k=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix(bad):
    W = _W()
    W[2, 1] = bad
    with pytest.raises(ValueError, match=r"lipfast\.spectrum: W must be finite, got 1 NaN/Inf entries \(shape \(6, 4\)\)"):
        lipfast.spectrum(W, k=2)


@pytest.mark.parametrize("k, exc, match", [
    (0, ValueError, r"lipfast\.spectrum: k must be >= 1, got 0"),
    (-3, ValueError, r"k must be >= 1, got -3"),
    (True, TypeError, r"k must be an int >= 1, got True"),
    (2.0, TypeError, r"k must be an int >= 1, got 2\.0"),
    (None, TypeError, r"k must be an int >= 1, got None"),
])
def test_bad_k(k, exc, match):
    with pytest.raises(exc, match=match):
        lipfast.spectrum(_W(), k=k)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(iters=0), ValueError, r"iters must be >= 1, got 0"),
    (dict(iters=2.5), TypeError, r"iters must be an int >= 1, got 2\.5"),
    (dict(tol=-1.0), ValueError, r"tol must be a number >= 0, got -1\.0"),
    (dict(state="prev"), TypeError, r"state must be a Spectrum from a previous call, got str"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lipfast.spectrum(_W(), k=2, **kwargs)


@pytest.mark.parametrize("other", [(5, 6), (4, 6), (6, 5)])
def test_state_of_another_matrix_size(other):
    state = lipfast.spectrum(torch.randn(*other, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match=rf"state describes a {other[0]}x{other[1]} matrix, but W has shape 6x4"):
        lipfast.spectrum(_W(), k=2, state=state)


# ----------------------------------------------------------------------------------------------------
# Bad input: the C++ op's own messages
# ----------------------------------------------------------------------------------------------------
_op = torch.ops.lipfast.subspace_iteration


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(3), torch.randn(3, 2), 1, 5, 0.0),
     r"lipfast::subspace_iteration: W must have shape \[m, n\] \(2 dims\), got \[3\]"),
    (lambda: (torch.randn(5, 3), torch.randn(3), 1, 5, 0.0),
     r"V0 must have shape \[n, p\] \(2 dims\), got \[3\]"),
    (lambda: (torch.randn(5, 3), torch.randn(4, 2), 1, 5, 0.0),
     r"V0\.size\(0\) must equal W\.size\(1\) \(3\), got 4 \(V0 has shape \[4, 2\]\)"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 4), 1, 5, 0.0),
     r"V0 must have between 1 and min\(m, n\) = 3 columns, got 4"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 2), 0, 5, 0.0),
     r"k must be in \[1, V0\.size\(1\) = 2\], got 0"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 2), 3, 5, 0.0),
     r"k must be in \[1, V0\.size\(1\) = 2\], got 3"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 2), 1, 0, 0.0), r"max_iters must be >= 1, got 0"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 2), 1, 5, -1.0), r"tol must be >= 0, got -1"),
    (lambda: (torch.ones(5, 3, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32), 1, 5, 0.0),
     r"W must be float32 or float64, got Int"),
    (lambda: (torch.randn(5, 3), torch.randn(3, 2, dtype=torch.float64), 1, 5, 0.0),
     r"V0 must have W's dtype Float, got Double"),
    (lambda: (torch.full((5, 3), float("nan")), torch.randn(3, 2), 1, 5, 0.0),
     r"W must be finite, got a matrix with NaN or Inf entries \(shape \[5, 3\]\)"),
])
def test_cpp_messages(make, match):
    with pytest.raises(RuntimeError, match=match):
        _op(*make())
