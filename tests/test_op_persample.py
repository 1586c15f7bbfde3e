"""lipfast.persample and the compiled lipfast::persample_linear: against per-sample gradients of a
real nn.Linear from torch.func (vmap(grad)), the reference twin, opcheck, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lipfast
from lipfast import ops, reference

from conftest import DEVICES, DTYPES, TOL, assert_close, gapped_matrix, spectrum_of

F64 = torch.float64


def _linear_case(B, T, n, m, dtype=F64, device="cpu", weight=None):
    """A real nn.Linear(n, m) with a per-sample loss. Returns ``(W, X, D, G)``:
    X the layer input (``[B, n]`` when T is None, else ``[B, T, n]``), D the gradient of each
    sample's own loss w.r.t. the layer output (the shape of the output), and G ``[B, m, n]`` the
    per-sample weight gradients from ``vmap(grad(...))``."""
    lin = nn.Linear(n, m).to(device=device, dtype=dtype)
    if weight is not None:
        with torch.no_grad():
            lin.weight.copy_(weight)
    lead = (B,) if T is None else (B, T)
    X = torch.randn(*lead, n, dtype=dtype, device=device)
    target = torch.randn(*lead, m, dtype=dtype, device=device)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def sample_loss(p, x, t):
        out = functional_call(lin, p, (x.unsqueeze(0),))
        return ((torch.tanh(out) - t.unsqueeze(0)) ** 2).sum()

    G = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, target)["weight"]
    out = lin(X)
    (D,) = torch.autograd.grad(((torch.tanh(out) - target) ** 2).sum(), out)
    return lin.weight.detach(), X, D, G


# (B, T, n, m): T None is the plain [B, n] batch; non-square both ways, size one, odd, sequences.
LINEAR_CASES = [
    (5, None, 7, 4), (5, None, 4, 7), (1, None, 1, 1), (3, None, 1, 6), (4, None, 6, 1),
    (3, 6, 5, 8), (4, 3, 9, 2), (2, 1, 6, 6), (1, 5, 3, 3),
]


def _case_id(c):
    B, T, n, m = c
    return f"B{B}-T{T}-n{n}-m{m}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=_case_id)
def test_matches_torch_func_exact(device, case):
    B, T, n, m = case
    W, X, D, G = _linear_case(B, T, n, m, device=device)
    spec = lipfast.spectrum(W, k=min(m, n))
    ps = lipfast.persample(spec, X, D)
    proj, hess = reference.persample_dense(W, G)
    for t in (ps.proj, ps.hess, ps.hess_lo, ps.hess_hi):
        assert t.shape == (B,) and t.dtype == F64 and t.device.type == device
    assert ps.degenerate is False
    assert_close(ps.proj, proj, TOL["truth"][F64])
    assert_close(ps.hess, hess, TOL["truth"][F64])
    assert torch.equal(ps.hess_lo, ps.hess) and torch.equal(ps.hess_hi, ps.hess)
    # The same through the dense Hessian form on the materialised gradients.
    assert_close(lipfast.hessian_form(spec, G).value, ps.hess, TOL["truth"][F64])


@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if min(c[2], c[3]) > 2], ids=_case_id)
@pytest.mark.parametrize("k", [1, 2])
def test_truncated_bracket_contains_exact(case, k):
    B, T, n, m = case
    W, X, D, G = _linear_case(B, T, n, m)
    exact_proj, exact = reference.persample_dense(W, G)
    spec = lipfast.spectrum(W, k=k)
    assert spec.exact is False
    ps = lipfast.persample(spec, X, D)
    assert_close(ps.proj, exact_proj, TOL["truth"][F64])        # s_i needs only the top triplet
    slack = 1e-10 * exact.abs().max()
    assert bool((ps.hess_lo <= exact + slack).all()) and bool((exact <= ps.hess_hi + slack).all())
    assert bool((ps.hess_lo <= ps.hess).all()) and bool((ps.hess <= ps.hess_hi).all())


@pytest.mark.parametrize("case", [(6, None, 12, 9), (6, None, 9, 12), (3, 5, 10, 7)], ids=_case_id)
def test_float32_within_tolerance_of_float64(case):
    B, T, n, m = case
    W64 = gapped_matrix(m, n)
    W, X, D, G = _linear_case(B, T, n, m, dtype=torch.float32, weight=W64.float())
    truth_proj, truth_hess = reference.persample_dense(W, G.to(F64))
    for k in (min(m, n), 3):
        ps32 = lipfast.persample(lipfast.spectrum(W, k=k), X, D)
        ps64 = lipfast.persample(lipfast.spectrum(W.to(F64), k=k), X.to(F64), D.to(F64))
        for a, b in zip((ps32.proj, ps32.hess, ps32.hess_lo, ps32.hess_hi),
                        (ps64.proj, ps64.hess, ps64.hess_lo, ps64.hess_hi)):
            assert a.dtype == F64
            assert_close(a, b, TOL["truth"][torch.float32])
    ps = lipfast.persample(lipfast.spectrum(W, k=min(m, n)), X, D)
    assert_close(ps.proj, truth_proj, TOL["truth"][torch.float32])
    assert_close(ps.hess, truth_hess, TOL["truth"][torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "sequence-permuted"])
def test_non_contiguous_inputs(dtype, layout):
    B, n, m = 6, 7, 5
    W = gapped_matrix(m, n, dtype)
    if layout == "transposed":
        X, D = torch.randn(n, B, dtype=dtype).mT, torch.randn(m, B, dtype=dtype).mT
    elif layout == "sliced":
        X, D = torch.randn(B, 2 * n, dtype=dtype)[:, 1::2], torch.randn(2 * B, m, dtype=dtype)[::2]
    elif layout == "expanded":
        X, D = torch.randn(1, n, dtype=dtype).expand(B, n), torch.randn(B, 1, m, dtype=dtype).expand(B, 3, m)
        X = X.unsqueeze(1).expand(B, 3, n)
    else:
        X, D = torch.randn(4, B, n, dtype=dtype).transpose(0, 1), torch.randn(B, m, 4, dtype=dtype).mT
    assert not X.is_contiguous() and not D.is_contiguous()
    spec = lipfast.spectrum(W, k=3)
    ps = lipfast.persample(spec, X, D)
    pc = lipfast.persample(spec, X.contiguous(), D.contiguous())
    for a, b in zip((ps.proj, ps.hess, ps.hess_lo, ps.hess_hi), (pc.proj, pc.hess, pc.hess_lo, pc.hess_hi)):
        assert_close(a, b, TOL["parity"][dtype])
    # and against the materialised G_i = D_iᵀ X_i
    X3 = X if X.dim() == 3 else X.unsqueeze(1)
    D3 = D if D.dim() == 3 else D.unsqueeze(1)
    G = torch.einsum("btm,btn->bmn", D3.to(F64), X3.to(F64))
    full = lipfast.persample(lipfast.spectrum(W, k=min(m, n)), X, D)
    proj, hess = reference.persample_dense(W, G)
    assert_close(full.proj, proj, TOL["truth"][dtype])
    assert_close(full.hess, hess, TOL["truth"][dtype])


def test_per_sample_hessian_is_non_negative():
    W, X, D, _ = _linear_case(64, None, 10, 8)
    ps = lipfast.persample(lipfast.spectrum(W, k=3), X, D)
    assert float(ps.hess_lo.min()) >= -1e-12 * float(ps.hess.abs().max())


def test_degenerate_gives_nan_hessian_finite_projection():
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    spec = lipfast.spectrum(W, k=3)
    ps = lipfast.persample(spec, torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64))
    assert spec.degenerate and ps.degenerate
    assert bool(torch.isfinite(ps.proj).all())
    for t in (ps.hess, ps.hess_lo, ps.hess_hi):
        assert bool(torch.isnan(t).all()) and not bool(torch.isinf(t).any())


# ----------------------------------------------------------------------------------------------------
# Compiled op vs reference twin
# ----------------------------------------------------------------------------------------------------
# (B, T, n, m, k): zero-size batch, size one, odd, exact (k = min(m, n)), and B above the kernel's
# grain (65536 / (T·(m + n + 2k)) samples per chunk: 214 and 182 for the last two), plain and sequence.
PERSAMPLE_SHAPES = [
    (0, 1, 5, 4, 2), (0, 3, 5, 4, 2), (1, 1, 1, 1, 1), (7, 1, 13, 5, 3), (7, 4, 13, 5, 3),
    (9, 2, 6, 4, 4), (5, 3, 4, 9, 4), (257, 1, 129, 160, 8), (257, 3, 64, 48, 4),
]


def _raw_inputs(B, T, n, m, k, dtype, device):
    W = torch.randn(m, n, dtype=F64)
    U, S, V, sigma_next = spectrum_of(W, k)
    to = dict(dtype=dtype, device=device)
    X = torch.randn(B, T, n, **to)
    D = torch.randn(B, T, m, **to)
    return X, D, U.to(**to), S.to(device=device), V.to(**to), sigma_next


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PERSAMPLE_SHAPES, ids=lambda s: "B{}-T{}-n{}-m{}-k{}".format(*s))
def test_persample_linear_matches_reference(device, dtype, shape):
    B, T, n, m, k = shape
    args = _raw_inputs(B, T, n, m, k, dtype, device)
    out = ops.persample_linear(*args)
    ref = reference.persample_linear(*args)
    assert len(out) == 4
    # One scale for the four outputs: an exact spectrum of a 1×1 W has a Hessian of exactly 0, which the
    # kernels' rounding leaves at ~1e-16 (the unknown mass ‖x‖² + ‖y‖² − Σ(a² + b²) of MATH.md §1).
    scale = max([float(r.abs().max()) for r in ref if r.numel()] + [1e-300])
    tol = TOL["parity"][dtype]
    for o, r in zip(out, ref):
        assert o.shape == (B,) and o.dtype == F64 and o.device.type == device
        torch.testing.assert_close(o, r.to(o.device), rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True)
    if k >= min(m, n):
        assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])


_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PERSAMPLE_SHAPES + [(0, 1, 5, 4, 2), (3, 0, 5, 4, 2), (300, 1, 40, 30, 8)],
                         ids=lambda s: "B{}-T{}-n{}-m{}-k{}".format(*s))
def test_persample_linear_sums_match_the_gradient(device, dtype, shape):
    """The .sums overload: .default's four statistics, and Σ_i G_i v1, Σ_i G_iᵀ u1 equal to the batch
    gradient G = Σ_i D_iᵀ X_i times v1 and u1; from the CPU kernel, the composite kernel (what other
    backends run) and the twin."""
    B, T, n, m, k = shape
    args = _raw_inputs(B, T, n, m, k, dtype, device)
    X, D, U, S, V, sn = args
    G = torch.einsum("btm,btn->mn", D.to(F64), X.to(F64))
    truth = (G @ V[:, 0].to(F64), G.mT @ U[:, 0].to(F64))
    default = {"kernel": ops.persample_linear(*args), "reference": reference.persample_linear(*args)}
    runs = {"kernel": ops.persample_linear(*args, sums=True),
            "composite": torch.ops.lipfast.persample_linear.sums.redispatch(_COMPOSITE, *args),
            "reference": reference.persample_linear(*args, sums=True)}
    for name, out in runs.items():
        assert len(out) == 6, name
        # the four statistics are .default's own (whose parity with the twin is tested above)
        for o, r in zip(out[:4], default["reference" if name == "reference" else "kernel"]):
            assert torch.equal(o, r), name
        for o, r in zip(out[4:], truth):
            assert o.dtype == F64 and o.shape == r.shape and o.device.type == device, name
            assert_close(o, r, TOL["parity"][dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_persample_linear_takes_rows(device, dtype):
    """X [B, n], D [B, m] (an MLP's layer, one position per sample) are read as [B, 1, n], [B, 1, m]: the
    tracker hands them over without a view. The kernel, the composite .sums and the twin, .default and .sums,
    and the preconditioned op, give the same numbers as for the [B, 1, *] inputs."""
    args = _raw_inputs(9, 1, 7, 5, 3, dtype, device)
    X, D, U, S, V, sn = args
    rows = (X[:, 0], D[:, 0], U, S, V, sn)
    P = torch.rand(5, 7, dtype=dtype, device=device)
    for got, want in [(ops.persample_linear(*rows), ops.persample_linear(*args)),
                      (ops.persample_linear(*rows, sums=True), ops.persample_linear(*args, sums=True)),
                      (torch.ops.lipfast.persample_linear.sums.redispatch(_COMPOSITE, *rows),
                       torch.ops.lipfast.persample_linear.sums.redispatch(_COMPOSITE, *args)),
                      (reference.persample_linear(*rows, sums=True), reference.persample_linear(*args, sums=True)),
                      (ops.persample_linear_precond(X[:, 0], D[:, 0], P, U, S, V, sn),
                       ops.persample_linear_precond(X, D, P, U, S, V, sn)),
                      (torch.ops.lipfast.persample_linear_precond.default.redispatch(
                          _COMPOSITE, X[:, 0], D[:, 0], P, U, S, V, sn),
                       torch.ops.lipfast.persample_linear_precond.default(X, D, P, U, S, V, sn)),
                      (reference.persample_linear_precond(X[:, 0], D[:, 0], P, U, S, V, sn),
                       reference.persample_linear_precond(X, D, P, U, S, V, sn))]:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, TOL["parity"][dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_persample_linear_non_contiguous(dtype, layout):
    B, T, n, m, k = 11, 3, 7, 6, 3
    X, D, U, S, V, sn = _raw_inputs(B, T, n, m, k, dtype, "cpu")
    if layout == "transposed":
        X2, D2 = X.transpose(0, 1).contiguous().transpose(0, 1), D.mT.contiguous().mT
        U2, V2 = U.mT.contiguous().mT, V.mT.contiguous().mT
    elif layout == "sliced":
        X2 = torch.stack([X, torch.randn_like(X)], -1)[..., 0]
        D2 = torch.stack([D, torch.randn_like(D)], 1)[:, 0]
        U2, V2 = torch.cat([U, U], 1)[:, :k], torch.cat([V, V], 1)[:, :k]
    else:
        X2, D2 = X[:1].expand_as(X), D[:, :1].expand_as(D)
        X, D = X2.contiguous(), D2.contiguous()
        U2, V2 = U, V
    assert not X2.is_contiguous() and not D2.is_contiguous()
    out = ops.persample_linear(X2, D2, U2, S, V2, sn)
    ref = reference.persample_linear(X, D, U, S, V, sn)
    for o, r in zip(out, ref):
        assert_close(o, r, TOL["parity"][dtype])


# ----------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------
def _persample_samples(device, requires_grad):
    out = []
    for dtype in DTYPES:
        for shape in [(0, 1, 5, 4, 2), (1, 1, 1, 1, 1), (5, 3, 6, 4, 2)]:
            X, D, U, S, V, sn = _raw_inputs(*shape, dtype, device)
            out.append((X.requires_grad_(requires_grad), D, U, S, V, sn))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_persample_linear_opcheck(device, requires_grad):
    for args in _persample_samples(device, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.lipfast.persample_linear.default, args)
        torch.library.opcheck(torch.ops.lipfast.persample_linear.sums, args)


def test_persample_linear_outputs_are_not_differentiable():
    """A measurement op: inputs that require grad give outputs that do not."""
    args = list(_persample_samples("cpu", requires_grad=False)[-1])
    args = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.numel() else a for a in args]
    outs = torch.ops.lipfast.persample_linear(*args)
    assert not any(t.requires_grad for t in outs)


# ----------------------------------------------------------------------------------------------------
# Bad input: public messages
# ----------------------------------------------------------------------------------------------------
def _spec():
    return lipfast.spectrum(torch.randn(6, 4, dtype=F64), k=2)   # m = 6, n = 4


def _X(*lead):
    return torch.randn(*(lead or (3,)), 4, dtype=F64)


def _D(*lead):
    return torch.randn(*(lead or (3,)), 6, dtype=F64)


@pytest.mark.parametrize("X, D, exc, match", [
    (torch.randn(4, dtype=F64), _D(), ValueError, r"lipfast\.persample: X must have shape \[B, n\] or \[B, T, n\], got \(4,\)"),
    (torch.randn(2, 2, 2, 4, dtype=F64), _D(), ValueError, r"X must have shape \[B, n\] or \[B, T, n\], got \(2, 2, 2, 4\)"),
    (_X(), torch.randn(6, dtype=F64), ValueError, r"D must have shape \[B, m\] or \[B, T, m\], got \(6,\)"),
    (_X(3, 1), _D(), ValueError, r"X and D must both be \[B, \.\] or both \[B, T, \.\], got X \(3, 1, 4\) and D \(3, 6\)"),
    (torch.randn(3, 5, dtype=F64), _D(), ValueError, r"X must have n = 4 features \(the weight is 6x4\), got shape \(3, 5\)"),
    (_X(), torch.randn(3, 5, dtype=F64), ValueError, r"D must have m = 6 features \(the weight is 6x4\), got shape \(3, 5\)"),
    (_X(3), _D(2), ValueError, r"X and D must agree on \[B, T\], got X \(3, 4\) and D \(2, 6\)"),
    (_X(3, 2), _D(3, 5), ValueError, r"X and D must agree on \[B, T\], got X \(3, 2, 4\) and D \(3, 5, 6\)"),
    (_X(0), _D(0), ValueError, r"X must hold at least one sample, got an empty batch \(0, 4\)"),
    (_X(0, 2), _D(0, 2), ValueError, r"X must hold at least one sample, got an empty batch \(0, 2, 4\)"),
    (_X().float(), _D(), TypeError, r"D must have X's dtype torch\.float32, got torch\.float64"),
    (_X().long(), _D().long(), TypeError, r"X must be float32 or float64, got torch\.int64"),
    (_X(), _D().int(), TypeError, r"D must be float32 or float64, got torch\.int32"),
    ("X", _D(), TypeError, r"X must be a torch\.Tensor of shape \[B, n\] or \[B, T, n\], got str"),
])
def test_bad_inputs(X, D, exc, match):
    with pytest.raises(exc, match=match):
        lipfast.persample(_spec(), X, D)


@pytest.mark.parametrize("which", ["X", "D"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(which, bad):
    X, D = _X(3, 2), _D(3, 2)
    (X if which == "X" else D)[1, 1, 0] = bad
    with pytest.raises(ValueError, match=rf"lipfast\.persample: {which} must be finite, got 1 NaN/Inf entries"):
        lipfast.persample(_spec(), X, D)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_among_huge_entries(bad):
    """The finiteness check clears a tensor by its sum: entries whose sum overflows are finite and pass,
    and a NaN/Inf among them is still found and counted."""
    X, D = _X(3, 2), _D(3, 2)
    X[0, 0, :2] = torch.finfo(X.dtype).max
    lipfast.persample(_spec(), X, D)  # finite: no error
    X[2, 1, 1] = bad
    with pytest.raises(ValueError, match=r"lipfast\.persample: X must be finite, got 1 NaN/Inf entries"):
        lipfast.persample(_spec(), X, D)


def test_spectrum_of_another_matrix_size():
    spec = lipfast.spectrum(torch.randn(4, 6, dtype=F64), k=2)  # transposed weight: m = 4, n = 6
    with pytest.raises(ValueError, match=r"X must have n = 6 features \(the weight is 4x6\), got shape \(3, 4\)"):
        lipfast.persample(spec, _X(), _D())


def test_spec_must_be_a_spectrum():
    with pytest.raises(TypeError, match=r"lipfast\.persample: spec must be a Spectrum from lipfast\.spectrum, got tuple"):
        lipfast.persample(spectrum_of(torch.randn(6, 4), 2), _X(), _D())


# ----------------------------------------------------------------------------------------------------
# Bad input: the C++ op's own messages
# ----------------------------------------------------------------------------------------------------
_op = torch.ops.lipfast.persample_linear


def _good():
    X, D, U, S, V, sn = _raw_inputs(3, 2, 4, 6, 2, torch.float32, "cpu")
    return [X, D, U, S, V, sn]


def _with(i, fn):
    args = _good()
    args[i] = fn(args[i])
    return args


@pytest.mark.parametrize("args, match", [
    (_with(0, lambda t: t[0, 0]), r"lipfast::persample_linear: X must have shape \[B, T, n\] \(3 dims\), got \[4\]"),
    (_with(0, lambda t: t[0]), r"lipfast::persample_linear: D must have shape \[B, m\] \(2 dims\) to match X \[2, 4\], got \[3, 2, 6\]"),
    (_with(1, lambda t: t[0]), r"D must have shape \[B, T, m\] \(3 dims\), got \[2, 6\]"),
    (_with(1, lambda t: t[:2]), r"D must have shape \[B, T, m\] = \[3, 2, m\] to match X \[3, 2, 4\], got \[2, 2, 6\]"),
    (_with(1, lambda t: t[:, :1]), r"D must have shape \[B, T, m\] = \[3, 2, m\] to match X \[3, 2, 4\], got \[3, 1, 6\]"),
    (_with(2, lambda t: t[:5]), r"U\.size\(0\) must equal D\.size\(2\) = m \(6\), got 5 \(U has shape \[5, 2\]\)"),
    (_with(2, lambda t: t[0]), r"U must have shape \[m, k\] \(2 dims\), got \[2\]"),
    (_with(4, lambda t: t[:3]), r"V\.size\(0\) must equal X\.size\(2\) = n \(4\), got 3 \(V has shape \[3, 2\]\)"),
    (_with(4, lambda t: t[:, :1]), r"V\.size\(1\) must equal U\.size\(1\) = k \(2\), got 1 \(V has shape \[4, 1\]\)"),
    (_with(3, lambda t: t[:1]), r"S\.size\(0\) must equal U\.size\(1\) = k \(2\), got 1 \(S has shape \[1\]\)"),
    (_with(3, lambda t: t[None]), r"S must have shape \[k\] \(1 dims\), got \[1, 2\]"),
    (_with(1, lambda t: t.double()), r"D must have X's dtype Float, got Double"),
    (_with(2, lambda t: t.double()), r"U must have X's dtype Float, got Double"),
    (_with(4, lambda t: t.double()), r"V must have X's dtype Float, got Double"),
    (_with(0, lambda t: t.int()), r"X must be float32 or float64, got Int"),
    (_with(3, lambda t: t.int()), r"S must be float32 or float64, got Int"),
])
def test_cpp_messages(args, match):
    with pytest.raises(RuntimeError, match=match):
        _op(*args)


def test_cpp_message_zero_rank():
    X, D, U, S, V, sn = _good()
    with pytest.raises(RuntimeError, match=r"U must have at least one column \(k >= 1\), got shape \[6, 0\]"):
        _op(X, D, U[:, :0], S[:0], V[:, :0], sn)
