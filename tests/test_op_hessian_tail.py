"""lipfast::hessian_tail: the second-order term's unknown tail solved by conjugate gradients. Against the
full-SVD Hessian (the tail it replaces the truncation bracket of), the bracket it reports, its zero-step
case (the truncation bracket of MATH.md §1), the reference twin, the composite kernel (what CUDA runs),
opcheck, and bad input."""

from __future__ import annotations

import pytest
import torch

import lipfast
from lipfast import ops, reference

from conftest import DEVICES, DTYPES, TOL, gapped_matrix, matrix_with_spectrum

F64 = torch.float64
_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _flat_matrix(m, n, dtype=F64):
    """A random-initialisation-like spectrum: σ2..σ_{k+1} within 3% of σ1, the rest spread below."""
    r = min(m, n)
    rest = torch.linspace(0.97, 0.2, r - 1, dtype=F64)
    return matrix_with_spectrum(torch.cat([torch.ones(1, dtype=F64), rest]), m, n, dtype)


def _case(W, k, seed=0):
    """(x, y, U, S, V, sigma_next) of a random direction E, and H[E,E]'s exact tail beyond k pairs."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(W.shape, generator=g, dtype=F64)
    m, n = W.shape
    full = lipfast.spectrum(W.to(F64), k=min(m, n))
    Uf, Sf, Vf = full.U64, full.S.to(F64), full.V64
    x, y = E @ Vf[:, 0], E.mT @ Uf[:, 0]
    a, b = Uf.mT @ x, Vf.mT @ y
    s1 = Sf[0]
    terms = (s1 * (a[1:] ** 2 + b[1:] ** 2) + 2 * Sf[1:] * a[1:] * b[1:]) / (s1 ** 2 - Sf[1:] ** 2)
    null = (x @ x - a @ a + y @ y - b @ b) / s1
    tail = float(terms[k - 1:].sum() + null)
    return (x, y, Uf[:, :k], Sf[:k], Vf[:, :k], float(Sf[k])), tail


@pytest.mark.parametrize("shape", [(40, 30), (30, 50), (64, 64)])
@pytest.mark.parametrize("make", [gapped_matrix, _flat_matrix])
def test_solves_the_exact_tail(shape, make):
    W = make(*shape)
    (x, y, U, S, V, sn), tail = _case(W, 4)
    out = ops.hessian_tail(W, x, y, U, S, V, sn, max_iters=400, tol=1e-13)
    assert out.shape == (5,) and out.dtype == F64
    assert float(out[0]) == pytest.approx(tail, rel=1e-9)
    assert float(out[1]) <= tail * (1 + 1e-12) and tail <= float(out[2]) * (1 + 1e-12)
    # The default tolerance: a bracket within 1e-3 of its lower end that holds the exact tail.
    out = ops.hessian_tail(W, x, y, U, S, V, sn)
    lo, hi = float(out[1]), float(out[2])
    assert hi - lo <= 1e-3 * lo and lo <= tail * (1 + 1e-12) <= hi * (1 + 2e-12)
    assert 0 < float(out[3]) <= 32


def test_flat_spectrum_is_where_the_truncated_estimate_is_far_off():
    """What the solve is for: on a flat spectrum R/σ1 misses the tail by a large factor."""
    W = _flat_matrix(60, 80)
    (x, y, U, S, V, sn), tail = _case(W, 8)
    out = ops.hessian_tail(W, x, y, U, S, V, sn, max_iters=0)
    assert float(out[0]) < 0.6 * tail                       # the truncated estimate R/σ1
    assert float(out[1]) <= tail <= float(out[2])            # inside its (wide) bracket
    solved = ops.hessian_tail(W, x, y, U, S, V, sn)
    assert abs(float(solved[0]) - tail) <= 1e-3 * tail


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_steps_is_the_truncation_bracket(dtype):
    """No step (max_iters=0, or a bracket that already meets tol): value and bracket are MATH.md §1's
    R/σ1 and R/(σ1 ± σ_{k+1}), as hessian_form reports them beside its core."""
    W = gapped_matrix(50, 40, dtype)
    (x, y, U, S, V, sn), _ = _case(W, 3)
    out = ops.hessian_tail(W, x, y, U, S, V, sn, max_iters=0)
    s1, R = float(S[0]), float(out[4])
    torch.testing.assert_close(out[:4], torch.tensor([R / s1, R / (s1 + sn), R / (s1 - sn), 0.0], dtype=F64),
                               rtol=1e-14, atol=0)
    assert float(ops.hessian_tail(W, x, y, U, S, V, sn, max_iters=50, tol=1e6)[3]) == 0.0
    # The mass is hessian_form's: its value is core + R/σ1.
    a, b = U.mT.to(F64) @ x, V.mT.to(F64) @ y
    assert R == pytest.approx(float(x @ x - a @ a + y @ y - b @ b), rel=1e-9)


def test_atol_stops_at_an_absolute_width():
    """track_update asks for the tail only to 1e-3 of the step's prediction: atol ends the solve there."""
    W = _flat_matrix(60, 80)
    (x, y, U, S, V, sn), tail = _case(W, 8)
    strict = ops.hessian_tail(W, x, y, U, S, V, sn, tol=1e-10, max_iters=200)
    width = 0.05 * tail
    loose = ops.hessian_tail(W, x, y, U, S, V, sn, tol=1e-10, atol=width, max_iters=200)
    assert 0 < float(loose[3]) < float(strict[3])
    assert float(loose[2] - loose[1]) <= width and float(loose[1]) <= tail <= float(loose[2]) * (1 + 1e-12)
    assert float(ops.hessian_tail(W, x, y, U, S, V, sn, atol=1e6)[3]) == 0.0


def test_nothing_unknown_takes_no_step():
    W = gapped_matrix(12, 5)
    g = torch.Generator().manual_seed(1)
    E = torch.randn(W.shape, generator=g, dtype=F64)
    spec = lipfast.spectrum(W, k=5)
    x, y = E @ spec.V64[:, 0], E.mT @ spec.U64[:, 0]
    out = ops.hessian_tail(W, x, y, spec.U, spec.S, spec.V, 0.0)
    assert float(out[3]) == 0.0 and float(out[4]) == pytest.approx(float(out[0]) * float(spec.S[0]), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [gapped_matrix, _flat_matrix])
def test_matches_reference_and_composite(dtype, make):
    W = make(48, 36).to(dtype)
    (x, y, U, S, V, sn), _ = _case(W.to(F64), 3)
    U, V = U.to(dtype), V.to(dtype)
    args = (W, x, y, U, S, V, sn, 32, 1e-3)
    got = ops.hessian_tail(*args)
    want = reference.hessian_tail(*args)
    composite = torch.ops.lipfast.hessian_tail.default.redispatch(_COMPOSITE, *args)
    tol = TOL["parity"][dtype]
    torch.testing.assert_close(got, want, **tol)
    # The composite kernel (what CUDA runs) takes the same steps.
    torch.testing.assert_close(composite, got, **tol)
    assert float(composite[3]) == float(got[3])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in DTYPES:
        W = gapped_matrix(20, 14, dtype, device)
        (x, y, U, S, V, sn), _ = _case(W.cpu().to(F64), 3)
        args = (W, x.to(device), y.to(device), U.to(device, dtype), S.to(device), V.to(device, dtype), sn, 8, 1e-3)
        torch.library.opcheck(torch.ops.lipfast.hessian_tail.default, args)


@pytest.mark.parametrize("which, match", [
    ("x", r"x must have shape \[m=20\]"),
    ("y", r"y must have shape \[n=14\]"),
    ("V", r"V must have shape \[n=14, k=3\]"),
    ("iters", "max_iters must be >= 0, got -1"),
    ("tol", "tol must be >= 0"),
    ("atol", "atol must be >= 0, got -1"),
    ("W", r"W must have shape \[m, n\] \(2 dims\), got \[14\]"),
])
def test_bad_input_names_the_argument(which, match):
    W = gapped_matrix(20, 14)
    (x, y, U, S, V, sn), _ = _case(W, 3)
    args = dict(W=W, x=x, y=y, U=U, S=S, V=V, sigma_next=sn, max_iters=8, tol=1e-3, atol=0.0)
    bad = {"x": ("x", x[:-1]), "y": ("y", y[:-2]), "V": ("V", V[:, :2]), "iters": ("max_iters", -1),
           "tol": ("tol", -1.0), "atol": ("atol", -1.0), "W": ("W", W[0])}[which]
    args[bad[0]] = bad[1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lipfast.hessian_tail(*args.values())
