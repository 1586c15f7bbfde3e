"""lipfast.hessian_form and the compiled lipfast::hessian_contract: against the autograd Hessian of
``matrix_norm(W, 2)``, the structural facts of MATH.md §1, the truncation bracket, the reference
twin, opcheck, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lipfast
from lipfast import ops, reference

from conftest import (DEVICES, DTYPES, TOL, assert_close, decaying_matrix, gapped_matrix,
                      spectrum_of)

# torch.func.hessian = jacfwd(jacrev): the first forward-mode call loads torch's JVP decompositions,
# which go through torch.jit.script and emit a DeprecationWarning from inside torch. Not ours to fix,
# and pyproject turns warnings into errors; ignore exactly that one where the dense Hessian is built.
_ignore_jit_deprecation = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64


def _dense_hessian(W: torch.Tensor) -> torch.Tensor:
    """∇²σ1(W) as an ``[mn, mn]`` matrix, by autograd (keep mn <= ~200)."""
    m, n = W.shape
    H = torch.func.hessian(lambda A: torch.linalg.matrix_norm(A, 2))(W.to(F64))
    return H.reshape(m * n, m * n)


def _quad(H: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """``vec(E_i)ᵀ H vec(E_i)`` for E ``[N, m, n]``."""
    e = E.reshape(E.shape[0], -1).to(F64)
    return torch.einsum("bi,ij,bj->b", e, H, e)


# ----------------------------------------------------------------------------------------------------
# Against the autograd Hessian
# ----------------------------------------------------------------------------------------------------
@_ignore_jit_deprecation
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (7, 7), (1, 6), (6, 1), (13, 5)])
def test_matches_autograd_hessian(device, shape):
    m, n = shape
    W = torch.randn(m, n, dtype=F64, device=device)
    Hd = _dense_hessian(W)
    E = torch.randn(5, m, n, dtype=F64, device=device)
    spec = lipfast.spectrum(W, k=min(m, n))
    assert spec.exact
    h = lipfast.hessian_form(spec, E)
    expected = _quad(Hd, E)
    assert h.value.shape == (5,) and h.value.dtype == F64 and h.degenerate is False
    assert_close(h.value, expected, TOL["truth"][F64])
    # Exact spectrum: the bracket has collapsed onto the value, bit for bit.
    assert torch.equal(h.lo, h.value) and torch.equal(h.hi, h.value)
    # A single [m, n] direction gives 0-dim results equal to the batched ones.
    h1 = lipfast.hessian_form(spec, E[2])
    assert h1.value.shape == () and h1.lo.shape == () and h1.hi.shape == ()
    assert_close(h1.value, h.value[2], TOL["truth"][F64])


@_ignore_jit_deprecation
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (9, 9)])
def test_dense_hessian_structure(shape):
    """On the autograd Hessian itself: H ⪰ 0 and ‖H‖₂ = 1/(σ1 − σ2), with σ1, σ2 from
    lipfast.spectrum (and LAPACK agreeing)."""
    m, n = shape
    W = torch.randn(m, n, dtype=F64)
    Hd = _dense_hessian(W)
    S = torch.linalg.svdvals(W)
    spec2 = lipfast.spectrum(W, k=2)
    ev = torch.linalg.eigvalsh((Hd + Hd.mT) / 2)
    top = float(1 / (spec2.S[0] - spec2.S[1]))
    assert top == pytest.approx(float(1 / (S[0] - S[1])), rel=1e-9)
    assert float(ev.min()) >= -1e-10 * top
    assert float(ev.max()) == pytest.approx(top, rel=1e-9)
    # ... and lipfast attains that norm on the top eigen-direction (u1 v2ᵀ + u2 v1ᵀ)/√2, and gives
    # 1/(σ1 + σ2) on (u1 v2ᵀ − u2 v1ᵀ)/√2 (the 2×2 block of pair (1, 2) in MATH.md §1).
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    sym = (torch.outer(U[:, 0], Vh[1]) + torch.outer(U[:, 1], Vh[0])) / math.sqrt(2)
    anti = (torch.outer(U[:, 0], Vh[1]) - torch.outer(U[:, 1], Vh[0])) / math.sqrt(2)
    spec = lipfast.spectrum(W, k=min(m, n))
    h = lipfast.hessian_form(spec, torch.stack([sym, anti]))
    assert_close(h.value, torch.stack([1 / (S[0] - S[1]), 1 / (S[0] + S[1])]), TOL["truth"][F64])
    assert_close(h.value, _quad(Hd, torch.stack([sym, anti])), TOL["truth"][F64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (20, 20), (1, 9), (9, 1)])
def test_positive_semidefinite(device, shape):
    m, n = shape
    W = torch.randn(m, n, dtype=F64, device=device)
    spec = lipfast.spectrum(W, k=min(m, n))
    E = torch.randn(256, m, n, dtype=F64, device=device)
    h = lipfast.hessian_form(spec, E)
    scale = float((E.reshape(256, -1) ** 2).sum(1).max()) / float(spec.sigma - (spec.S[1] if spec.k > 1 else 0))
    assert float(h.value.min()) >= -1e-12 * scale
    # The upper bound ‖H‖₂‖E‖² holds too.
    assert bool((h.value <= (E.reshape(256, -1) ** 2).sum(1) * 1.000001 /
                 float(spec.sigma - (spec.S[1] if spec.k > 1 else 0))).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (5, 5)])
def test_null_directions(dtype, shape):
    """``H[W, W] = 0`` (σ is 1-homogeneous) and ``H[J, J] = 0`` with ``J = u1 v1ᵀ`` from LAPACK."""
    m, n = shape
    W = gapped_matrix(m, n, dtype)
    U, S, Vh = torch.linalg.svd(W.to(F64), full_matrices=False)
    J = torch.outer(U[:, 0], Vh[0]).to(dtype)
    spec = lipfast.spectrum(W, k=min(m, n))
    h = lipfast.hessian_form(spec, torch.stack([W, J]))
    # Compare with the size of a generic direction of the same norm, 1/σ1 · ‖E‖².
    eps = torch.finfo(dtype).eps
    generic = torch.stack([(W.to(F64) ** 2).sum(), torch.tensor(1.0, dtype=F64)]) / S[0]
    assert bool((h.value.abs() <= 1e3 * eps * generic).all()), h.value


# ----------------------------------------------------------------------------------------------------
# Truncated spectrum: the bracket
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(14, 10), (10, 14)])
@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_bracket_contains_exact_value(shape, k):
    m, n = shape
    W = torch.randn(m, n, dtype=F64)
    E = torch.randn(64, m, n, dtype=F64)
    exact = reference.hessian_form_dense(W, E)
    full = lipfast.hessian_form(lipfast.spectrum(W, k=min(m, n)), E)
    assert_close(full.value, exact, TOL["truth"][F64])
    spec = lipfast.spectrum(W, k=k)
    assert spec.exact is False
    h = lipfast.hessian_form(spec, E)
    slack = 1e-10 * exact.abs().max()
    assert bool((h.lo <= exact + slack).all()) and bool((exact <= h.hi + slack).all())
    assert bool((h.lo <= h.value).all()) and bool((h.value <= h.hi).all())
    assert float((h.hi - h.lo).min()) > 0           # it really is a bracket at k < r


def test_bracket_narrows_as_k_grows_and_collapses_at_full_rank():
    W = torch.randn(14, 10, dtype=F64)
    E = torch.randn(32, 14, 10, dtype=F64)
    widths = []
    for k in range(1, 11):
        h = lipfast.hessian_form(lipfast.spectrum(W, k=k), E)
        widths.append(h.hi - h.lo)
    for wide, narrow in zip(widths, widths[1:]):
        assert bool((narrow <= wide * (1 + 1e-12)).all())
    assert torch.equal(widths[-1], torch.zeros_like(widths[-1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bracket_on_iterated_spectrum(dtype):
    """The iterative path reports σ_{k+1} as an upper estimate: the bracket stays honest."""
    W = decaying_matrix(96, 64, dtype, rate=0.9)
    E = torch.randn(6, 96, 64, dtype=dtype)
    spec = lipfast.spectrum(W, k=4)
    assert spec.iters > 0
    h = lipfast.hessian_form(spec, E)
    exact = reference.hessian_form_dense(W, E)
    slack = TOL["truth"][dtype]["atol"] * exact.abs().max()
    assert bool((h.lo <= exact + slack).all()) and bool((exact <= h.hi + slack).all())


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_float32_within_tolerance_of_float64(shape):
    m, n = shape
    W = gapped_matrix(m, n)
    E = torch.randn(8, m, n, dtype=F64)
    truth = lipfast.hessian_form(lipfast.spectrum(W, k=min(m, n)), E).value
    for k in (min(m, n), 3):
        h32 = lipfast.hessian_form(lipfast.spectrum(W.float(), k=k), E.float())
        h64 = lipfast.hessian_form(lipfast.spectrum(W, k=k), E)
        assert h32.value.dtype == F64                  # accumulated in float64 whatever the input
        for a, b in ((h32.value, h64.value), (h32.lo, h64.lo), (h32.hi, h64.hi)):
            assert_close(a, b, TOL["truth"][torch.float32])
    assert_close(lipfast.hessian_form(lipfast.spectrum(W.float(), k=min(m, n)), E.float()).value, truth,
                 TOL["truth"][torch.float32])


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_directions(layout):
    m, n = 9, 7
    W = torch.randn(m, n, dtype=F64)
    if layout == "transposed":
        E = torch.randn(4, n, m, dtype=F64).mT
    elif layout == "sliced":
        E = torch.randn(8, m, 2 * n, dtype=F64)[::2, :, ::2]
    else:
        E = torch.randn(1, m, n, dtype=F64).expand(4, m, n)
    assert not E.is_contiguous()
    spec = lipfast.spectrum(W, k=3)
    h = lipfast.hessian_form(spec, E)
    hc = lipfast.hessian_form(spec, E.contiguous())
    assert_close(h.value, hc.value, TOL["parity"][F64])
    assert_close(h.hi, hc.hi, TOL["parity"][F64])
    spec_full = lipfast.spectrum(W, k=7)
    assert_close(lipfast.hessian_form(spec_full, E).value, reference.hessian_form_dense(W, E), TOL["truth"][F64])


# ----------------------------------------------------------------------------------------------------
# Degenerate
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [
    torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64)),
    torch.zeros(4, 3, dtype=F64),
])
def test_degenerate_gives_nan_never_inf(W):
    spec = lipfast.spectrum(W, k=3)
    h = lipfast.hessian_form(spec, torch.randn(5, *W.shape, dtype=F64))
    assert spec.degenerate is True and h.degenerate is True
    for t in (h.value, h.lo, h.hi):
        assert bool(torch.isnan(t).all()), t


# ----------------------------------------------------------------------------------------------------
# Compiled op vs reference twin
# ----------------------------------------------------------------------------------------------------
def _contract_inputs(N, k, m, n, dtype, device, exact):
    """Projections of N random directions onto the top-k triplets of a random m×n matrix."""
    W = torch.randn(m, n, dtype=F64)
    U, S, V, sigma_next = spectrum_of(W, k)
    E = torch.randn(N, m, n, dtype=F64)
    x = E @ V[:, 0]
    y = E.mT @ U[:, 0]
    a, b = x @ U, y @ V
    xn, yn = (x * x).sum(-1), (y * y).sum(-1)
    to = dict(dtype=dtype, device=device)
    return a.to(**to), b.to(**to), xn.to(**to), yn.to(**to), S.to(device=device), (0.0 if exact else sigma_next)


# (N, k, m, n): empty batch, size one, odd, and N above the kernel's grain (4096 // k rows).
CONTRACT_SHAPES = [(0, 3, 6, 5), (1, 1, 1, 1), (1, 2, 3, 5), (7, 4, 9, 5), (257, 5, 11, 8), (5000, 1, 4, 3)]


# Each shape with an exact spectrum (sigma_next = 0) and, where k < min(m, n), a truncated one.
CONTRACT_CASES = [(shape, True) for shape in CONTRACT_SHAPES] + [
    (shape, False) for shape in CONTRACT_SHAPES if shape[1] < min(shape[2:])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, exact", CONTRACT_CASES)
def test_hessian_contract_matches_reference(device, dtype, shape, exact):
    N, k, m, n = shape
    args = _contract_inputs(N, k, m, n, dtype, device, exact=exact)
    out = ops.hessian_contract(*args)
    ref = reference.hessian_contract(*args)
    for o, r in zip(out, ref):
        assert o.shape == (N,) and o.dtype == F64 and o.device.type == device
        assert_close(o, r, TOL["parity"][dtype])
    if exact:
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_hessian_contract_non_contiguous(layout):
    a, b, xn, yn, S, sn = _contract_inputs(33, 4, 8, 6, F64, "cpu", exact=False)
    if layout == "transposed":
        a2, b2 = a.mT.contiguous().mT, b.mT.contiguous().mT
    elif layout == "sliced":
        a2 = torch.stack([a, torch.randn_like(a)], dim=-1)[..., 0]
        b2 = torch.stack([b, torch.randn_like(b)], dim=-1)[..., 0]
    else:
        a2, b2 = a[:1].expand_as(a), b[:1].expand_as(b)
        a, b = a2.contiguous(), b2.contiguous()
        xn, yn = xn[:1].expand_as(xn), yn[:1].expand_as(yn)
    assert not a2.is_contiguous()
    out = ops.hessian_contract(a2, b2, xn, yn, S, sn)
    ref = reference.hessian_contract(a, b, xn.contiguous(), yn.contiguous(), S, sn)
    for o, r in zip(out, ref):
        assert_close(o, r, TOL["parity"][F64])


@pytest.mark.parametrize("S", [[2.0, 2.0, 1.0], [0.0, 0.0], [1.0]])
def test_hessian_contract_degenerate_is_nan(S):
    S = torch.tensor(S, dtype=F64)
    k = S.numel()
    a, b = torch.randn(4, k, dtype=F64), torch.randn(4, k, dtype=F64)
    xn, yn = (a * a).sum(1) + 1, (b * b).sum(1) + 1
    sigma_next = float(S[0]) if k == 1 else 0.0        # k = 1: σ2 = σ1 reported through sigma_next
    out = ops.hessian_contract(a, b, xn, yn, S, sigma_next)
    ref = reference.hessian_contract(a, b, xn, yn, S, sigma_next)
    for o, r in zip(out, ref):
        assert bool(torch.isnan(o).all()) and bool(torch.isnan(r).all())


# ----------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------
def _contract_samples(device, requires_grad):
    out = []
    for dtype in DTYPES:
        for N, k, m, n in [(0, 2, 4, 3), (1, 1, 2, 2), (6, 3, 5, 4)]:
            a, b, xn, yn, S, sn = _contract_inputs(N, k, m, n, dtype, device, exact=False)
            out.append((a.requires_grad_(requires_grad), b, xn, yn, S, sn))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_hessian_contract_opcheck(device, requires_grad):
    for args in _contract_samples(device, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.lipfast.hessian_contract.default, args)


def test_hessian_contract_outputs_are_not_differentiable():
    """A measurement op: inputs that require grad give outputs that do not."""
    args = list(_contract_samples("cpu", requires_grad=False)[-1])
    args = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.numel() else a for a in args]
    outs = torch.ops.lipfast.hessian_contract(*args)
    assert not any(t.requires_grad for t in outs)


# ----------------------------------------------------------------------------------------------------
# Bad input: public messages
# ----------------------------------------------------------------------------------------------------
def _spec():
    return lipfast.spectrum(torch.randn(6, 4, dtype=F64), k=2)


@pytest.mark.parametrize("E, exc, match", [
    (torch.randn(4, 6, dtype=F64), ValueError,
     r"lipfast\.hessian_form: E must have the matrix shape \[6, 4\] of spec, got \(4, 6\)"),
    (torch.randn(3, 5, 4, dtype=F64), ValueError, r"E must have the matrix shape \[6, 4\] of spec, got \(3, 5, 4\)"),
    (torch.randn(6, dtype=F64), ValueError, r"E must have shape \[m, n\] or \[N, m, n\], got \(6,\)"),
    (torch.randn(2, 2, 6, 4, dtype=F64), ValueError, r"E must have shape \[m, n\] or \[N, m, n\], got \(2, 2, 6, 4\)"),
    (torch.ones(6, 4, dtype=torch.int32), TypeError, r"E must be float32 or float64, got torch\.int32"),
    (torch.ones(6, 4, dtype=torch.int64), TypeError, r"E must be float32 or float64, got torch\.int64"),
    ("E", TypeError, r"E must be a torch\.Tensor of shape \[m, n\] or \[N, m, n\], got str"),
])
def test_bad_direction(E, exc, match):
    with pytest.raises(exc, match=match):
        lipfast.hessian_form(_spec(), E)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("batched", [False, True])
def test_non_finite_direction(bad, batched):
    E = torch.randn(3, 6, 4, dtype=F64) if batched else torch.randn(6, 4, dtype=F64)
    E[(1, 2, 3) if batched else (2, 3)] = bad
    with pytest.raises(ValueError, match=r"lipfast\.hessian_form: E must be finite, got 1 NaN/Inf entries"):
        lipfast.hessian_form(_spec(), E)


def test_spectrum_of_another_matrix_size():
    spec = lipfast.spectrum(torch.randn(5, 4, dtype=F64), k=2)
    with pytest.raises(ValueError, match=r"E must have the matrix shape \[5, 4\] of spec, got \(6, 4\)"):
        lipfast.hessian_form(spec, torch.randn(6, 4, dtype=F64))


def test_spec_must_be_a_spectrum():
    with pytest.raises(TypeError, match=r"lipfast\.hessian_form: spec must be a Spectrum from lipfast\.spectrum, got Tensor"):
        lipfast.hessian_form(torch.randn(6, 4), torch.randn(6, 4))


def test_empty_batch_rejected():
    with pytest.raises(ValueError, match=r"lipfast\.hessian_form: E must hold at least one direction, got an empty batch \(0, 6, 4\)"):
        lipfast.hessian_form(_spec(), torch.randn(0, 6, 4, dtype=F64))


# ----------------------------------------------------------------------------------------------------
# Bad input: the C++ op's own messages
# ----------------------------------------------------------------------------------------------------
_op = torch.ops.lipfast.hessian_contract
_S2 = torch.tensor([3.0, 2.0], dtype=F64)


def _good():
    a = torch.randn(4, 2, dtype=F64)
    return [a, a.clone(), torch.rand(4, dtype=F64) + 5, torch.rand(4, dtype=F64) + 5, _S2.clone(), 0.5]


def _with(i, value):
    args = _good()
    args[i] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize("args, match", [
    (_with(0, lambda a: a[0][0]), r"lipfast::hessian_contract: a must have shape \[N, k\] \(2 dims\), got \[2\]"),
    (_with(1, lambda a: a[1][:3]), r"b must have a's shape \[4, 2\], got \[3, 2\]"),
    (_with(1, lambda a: a[1][0]), r"b must have shape \[N, k\] \(2 dims\), got \[2\]"),
    (_with(2, lambda a: a[2][:3]), r"xnorm2\.size\(0\) must equal a\.size\(0\) \(4\), got 3 \(xnorm2 has shape \[3\]\)"),
    (_with(3, lambda a: a[3][:2]), r"ynorm2\.size\(0\) must equal a\.size\(0\) \(4\), got 2 \(ynorm2 has shape \[2\]\)"),
    (_with(2, lambda a: a[2][:, None]), r"xnorm2 must have shape \[N\] \(1 dims\), got \[4, 1\]"),
    (_with(4, lambda a: a[4][:1]), r"S\.size\(0\) must equal a\.size\(1\) \(2\), got 1 \(S has shape \[1\]\)"),
    (_with(4, lambda a: a[4][None]), r"S must have shape \[k\] \(1 dims\), got \[1, 2\]"),
])
def test_cpp_messages(args, match):
    with pytest.raises(RuntimeError, match=match):
        _op(*args)


def test_cpp_message_zero_columns():
    with pytest.raises(RuntimeError, match=r"a must have at least one column \(k >= 1\), got shape \[4, 0\]"):
        _op(torch.randn(4, 0), torch.randn(4, 0), torch.rand(4), torch.rand(4), torch.randn(0), 0.0)


@pytest.mark.parametrize("i, name", [(0, "a"), (1, "b"), (2, "xnorm2"), (3, "ynorm2"), (4, "S")])
def test_cpp_message_dtype_names_the_argument(i, name):
    args = _with(i, lambda a: a[i].to(torch.int32))
    with pytest.raises(RuntimeError, match=rf"lipfast::hessian_contract: {name} must be float32 or float64, got Int"):
        _op(*args)
