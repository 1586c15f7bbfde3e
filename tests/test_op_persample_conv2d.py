"""lipfast.persample_conv2d: against per-sample gradients of a real nn.Conv2d from torch.func
(vmap(grad)), against the materialised-unfold reference, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lipfast
from lipfast import ops, reference

from conftest import DEVICES, DTYPES, TOL, assert_close, gapped_matrix, spectrum_of

F64 = torch.float64


def _conv_case(B, C_in, C_out, hw, kernel_size, stride, padding, dilation, dtype=F64, device="cpu",
               weight=None):
    """A real nn.Conv2d with a per-sample loss. Returns ``(W [C_out, C_in·kh·kw], x, grad_out, G)``,
    G ``[B, C_out, C_in·kh·kw]`` the per-sample weight gradients from ``vmap(grad(...))``."""
    conv = nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation)
    conv = conv.to(device=device, dtype=dtype)
    if weight is not None:
        with torch.no_grad():
            conv.weight.copy_(weight.reshape(conv.weight.shape))
    x = torch.randn(B, C_in, *hw, dtype=dtype, device=device)
    with torch.no_grad():
        target = torch.randn_like(conv(x))
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def sample_loss(p, xi, ti):
        out = functional_call(conv, p, (xi.unsqueeze(0),))
        return ((torch.tanh(out) - ti.unsqueeze(0)) ** 2).sum()

    G = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)["weight"]
    out = conv(x)
    (grad_out,) = torch.autograd.grad(((torch.tanh(out) - target) ** 2).sum(), out)
    return conv.weight.detach().reshape(C_out, -1), x, grad_out, G.reshape(B, C_out, -1)


# (B, C_in, C_out, (H, W), kernel_size, stride, padding, dilation): ints and pairs, non-square
# kernels and inputs, 1×1, a wide matrix (C_out < C_in·kh·kw) and a tall one (C_out > C_in·kh·kw).
CONV_CASES = [
    (3, 2, 4, (7, 6), 3, 1, 0, 1),
    (2, 3, 5, (9, 8), (2, 3), (2, 1), (1, 2), (2, 1)),
    (2, 3, 4, (8, 8), (3, 1), 2, 1, 2),
    (1, 2, 3, (5, 5), 2, 3, 2, 1),
    (2, 1, 1, (1, 1), 1, 1, 0, 1),
    (3, 1, 9, (6, 5), (1, 2), 1, (0, 1), 1),
    (2, 4, 3, (4, 7), 1, (1, 2), 0, 1),
]


def _prod(v):
    return v[0] * v[1] if isinstance(v, tuple) else v * v


def _case_id(c):
    return "B{}-cin{}-cout{}-hw{}x{}-k{}-s{}-p{}-d{}".format(c[0], c[1], c[2], *c[3], *map(_short, c[4:]))


def _short(v):
    return f"{v[0]}{v[1]}" if isinstance(v, tuple) else str(v)


def _conv_kwargs(case):
    return dict(kernel_size=case[4], stride=case[5], padding=case[6], dilation=case[7])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_matches_torch_func_exact(device, case):
    W, x, g, G = _conv_case(*case, device=device)
    m, n = W.shape
    spec = lipfast.spectrum(W, k=min(m, n))
    ps = lipfast.persample_conv2d(spec, x, g, **_conv_kwargs(case))
    proj, hess = reference.persample_dense(W, G)
    B = case[0]
    for t in (ps.proj, ps.hess, ps.hess_lo, ps.hess_hi):
        assert t.shape == (B,) and t.dtype == F64 and t.device.type == device
    assert_close(ps.proj, proj, TOL["truth"][F64])
    assert_close(ps.hess, hess, TOL["truth"][F64])
    assert torch.equal(ps.hess_lo, ps.hess) and torch.equal(ps.hess_hi, ps.hess)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if min(c[2], c[1] * _prod(c[4])) > 2], ids=_case_id)
def test_truncated_bracket_and_unfold_reference(case):
    W, x, g, G = _conv_case(*case)
    k = 2
    kw = _conv_kwargs(case)
    exact_proj, exact = reference.persample_dense(W, G)
    spec = lipfast.spectrum(W, k=k)
    assert spec.exact is False
    ps = lipfast.persample_conv2d(spec, x, g, **kw)
    assert_close(ps.proj, exact_proj, TOL["truth"][F64])
    slack = 1e-10 * exact.abs().max()
    assert bool((ps.hess_lo <= exact + slack).all()) and bool((exact <= ps.hess_hi + slack).all())
    # Same spectrum through the materialised unfold: the convolution route must agree with it.
    U, S, V, sn = spec.U, spec.S, spec.V, float(spec.sigma_next)
    ref = reference.persample_conv2d_unfold(x, g, U, S, V, sn, **kw)
    for a, b in zip((ps.proj, ps.hess, ps.hess_lo, ps.hess_hi), ref):
        assert_close(a, b, TOL["parity"][F64])


@pytest.mark.parametrize("case", [(3, 2, 6, (7, 6), 3, 1, 1, 1), (2, 3, 5, (9, 8), (2, 3), (2, 1), (1, 2), (2, 1))],
                         ids=_case_id)
def test_float32_within_tolerance_of_float64(case):
    C_in, C_out, ks = case[1], case[2], case[4]
    W64 = gapped_matrix(C_out, C_in * _prod(ks))
    W, x, g, G = _conv_case(*case, dtype=torch.float32, weight=W64.float())
    kw = _conv_kwargs(case)
    truth_proj, truth_hess = reference.persample_dense(W, G.to(F64))
    for k in (min(W.shape), 2):
        ps32 = lipfast.persample_conv2d(lipfast.spectrum(W, k=k), x, g, **kw)
        ps64 = lipfast.persample_conv2d(lipfast.spectrum(W.to(F64), k=k), x.to(F64), g.to(F64), **kw)
        for a, b in zip((ps32.proj, ps32.hess, ps32.hess_lo, ps32.hess_hi),
                        (ps64.proj, ps64.hess, ps64.hess_lo, ps64.hess_hi)):
            assert a.dtype == F64
            assert_close(a, b, TOL["truth"][torch.float32])
    ps = lipfast.persample_conv2d(lipfast.spectrum(W, k=min(W.shape)), x, g, **kw)
    assert_close(ps.proj, truth_proj, TOL["truth"][torch.float32])
    assert_close(ps.hess, truth_hess, TOL["truth"][torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced", "expanded"])
def test_non_contiguous_inputs(dtype, layout):
    B, C, H, Wd, C_out, ks = 3, 2, 6, 7, 4, (2, 3)
    kw = dict(kernel_size=ks, stride=1, padding=(1, 0), dilation=1)
    Wm = gapped_matrix(C_out, C * 6, dtype)
    Ho, Wo = H + 2 - 2 + 1, Wd - 3 + 1
    if layout == "channels_last":
        x = torch.randn(B, C, H, Wd, dtype=dtype).to(memory_format=torch.channels_last)
        g = torch.randn(B, C_out, Ho, Wo, dtype=dtype).to(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = torch.randn(B, H, Wd, C, dtype=dtype).permute(0, 3, 1, 2)
        g = torch.randn(C_out, B, Ho, Wo, dtype=dtype).transpose(0, 1)
    elif layout == "sliced":
        x = torch.randn(B, C, H, 2 * Wd, dtype=dtype)[..., ::2]
        g = torch.randn(B, 2 * C_out, Ho, Wo, dtype=dtype)[:, 1::2]
    else:
        x = torch.randn(1, C, H, Wd, dtype=dtype).expand(B, C, H, Wd)
        g = torch.randn(B, C_out, 1, Wo, dtype=dtype).expand(B, C_out, Ho, Wo)
    assert not x.is_contiguous() and not g.is_contiguous()
    spec = lipfast.spectrum(Wm, k=3)
    ps = lipfast.persample_conv2d(spec, x, g, **kw)
    pc = lipfast.persample_conv2d(spec, x.contiguous(), g.contiguous(), **kw)
    for a, b in zip((ps.proj, ps.hess, ps.hess_lo, ps.hess_hi), (pc.proj, pc.hess, pc.hess_lo, pc.hess_hi)):
        assert_close(a, b, TOL["parity"][dtype])
    U, S, V, sn = spectrum_of(Wm, 3)
    ref = reference.persample_conv2d_unfold(x, g, U, S, V, sn, **kw)
    assert_close(ps.hess, ref[1], TOL["truth"][dtype])


def test_degenerate_gives_nan_hessian():
    # weight of a 1x1 conv with 3 -> 3 channels: diag(2, 2, 1)
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    spec = lipfast.spectrum(W, k=3)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    g = torch.randn(2, 3, 4, 4, dtype=F64)
    ps = lipfast.persample_conv2d(spec, x, g, 1)
    assert ps.degenerate is True
    assert bool(torch.isfinite(ps.proj).all())
    for t in (ps.hess, ps.hess_lo, ps.hess_hi):
        assert bool(torch.isnan(t).all()) and not bool(torch.isinf(t).any())


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def _spec():
    return lipfast.spectrum(torch.randn(4, 3 * 2 * 2, dtype=F64), k=2)   # C_out 4, C_in 3, 2x2 kernel


def _x(B=2):
    return torch.randn(B, 3, 5, 5, dtype=F64)


def _g(B=2, hw=(4, 4), C=4):
    return torch.randn(B, C, *hw, dtype=F64)


@pytest.mark.parametrize("x, g, kwargs, exc, match", [
    (_x()[0], _g(), {}, ValueError, r"lipfast\.persample_conv2d: x must have shape \[B, C_in, H, W\], got \(3, 5, 5\)"),
    (_x(), _g()[0], {}, ValueError, r"grad_out must have shape \[B, C_out, H', W'\], got \(4, 4, 4\)"),
    (_x(), _g(B=1), {}, ValueError, r"grad_out must have shape \[B=2, C_out=4, H', W'\], got \(1, 4, 4, 4\)"),
    (_x(), _g(C=5), {}, ValueError, r"grad_out must have shape \[B=2, C_out=4, H', W'\], got \(2, 5, 4, 4\)"),
    (_x(), _g(hw=(3, 4)), {}, ValueError,
     r"grad_out must have spatial size \[4, 4\] for this input, kernel, stride, padding and dilation, got \[3, 4\]"),
    (_x(), _g(), dict(stride=2), ValueError, r"grad_out must have spatial size \[2, 2\] .*got \[4, 4\]"),
    (torch.randn(2, 2, 5, 5, dtype=F64), _g(), {}, ValueError,
     r"x has C_in = 2 channels, so with a 2x2 kernel the weight matrix has 8 columns, but spec describes a 4x12 matrix"),
    (_x(), _g(), dict(kernel_size=3), ValueError,
     r"with a 3x3 kernel the weight matrix has 27 columns, but spec describes a 4x12 matrix"),
    (_x(), _g(), dict(kernel_size=(2, 2, 2)), TypeError, r"kernel_size must be an int or a pair of ints, got \(2, 2, 2\)"),
    (_x(), _g(), dict(kernel_size=2.0), TypeError, r"kernel_size must be an int or a pair of ints, got 2\.0"),
    (_x(), _g(), dict(kernel_size=True), TypeError, r"kernel_size must be an int or a pair of ints, got True"),
    (_x(), _g(), dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (_x(), _g(), dict(stride=(1, 0)), ValueError, r"stride must be >= 1, got \(1, 0\)"),
    (_x(), _g(), dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (_x(), _g(), dict(padding="same"), TypeError, r"padding must be an int or a pair of ints, got 'same'"),
    (_x(), _g(), dict(dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    (_x(0), _g(0), {}, ValueError, r"x must hold at least one sample, got an empty batch \(0, 3, 5, 5\)"),
    (_x().float(), _g(), {}, TypeError, r"grad_out must have x's dtype torch\.float32, got torch\.float64"),
    (_x().int(), _g().int(), {}, TypeError, r"x must be float32 or float64, got torch\.int32"),
    (_x(), _g().long(), {}, TypeError, r"grad_out must be float32 or float64, got torch\.int64"),
])
def test_bad_inputs(x, g, kwargs, exc, match):
    kw = dict(kernel_size=2)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        lipfast.persample_conv2d(_spec(), x, g, **kw)


@pytest.mark.parametrize("which", ["x", "grad_out"])
@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_non_finite(which, bad):
    x, g = _x(), _g()
    (x if which == "x" else g)[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match=rf"lipfast\.persample_conv2d: {which} must be finite, got 1 NaN/Inf entries"):
        lipfast.persample_conv2d(_spec(), x, g, 2)


def test_spec_must_be_a_spectrum():
    with pytest.raises(TypeError, match=r"lipfast\.persample_conv2d: spec must be a Spectrum from lipfast\.spectrum"):
        lipfast.persample_conv2d(None, _x(), _g(), 2)


# ----------------------------------------------------------------------------------------------------
# The op lipfast::conv2d_projections itself: its CPU kernel (a strided and a stride-1 path), its composite
# kernel (what CUDA runs) and its reference twin, against G_i v1 and G_iᵀ u1 of torch.func's gradients.
_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
_OP = torch.ops.lipfast.conv2d_projections.default


def _pairs(case):
    return [tuple(v) if isinstance(v, tuple) else (v, v) for v in case[4:]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES + [(4, 3, 6, (9, 7), 3, 1, 1, 1), (2, 2, 3, (8, 9), (3, 5), 1, (2, 0), (2, 1))],
                         ids=_case_id)
def test_op_kernels_match_per_sample_gradients(dtype, case):
    W, x, grad_out, G = _conv_case(*case, dtype=dtype)
    u1, v1 = torch.randn(W.shape[0], dtype=F64), torch.randn(W.shape[1], dtype=F64)
    truth = (G.to(F64) @ v1, G.to(F64).mT @ u1)
    geometry = _pairs(case)
    for name, got in [("cpu", _OP(x, grad_out, u1, v1, *geometry)),
                      ("composite", _OP.redispatch(_COMPOSITE, x, grad_out, u1, v1, *geometry)),
                      ("reference", reference.conv2d_projections(x, grad_out, u1, v1, *geometry))]:
        for out, want in zip(got, truth):
            assert out.dtype == F64 and out.shape == want.shape, name
            assert_close(out, want, TOL["parity"][dtype], msg=name)


def test_op_non_contiguous_inputs_and_empty_batch():
    W, x, grad_out, G = _conv_case(3, 4, 5, (6, 6), 3, 1, 1, 1)
    u1, v1 = torch.randn(5, dtype=F64), torch.randn(36, dtype=F64)
    geometry = [(3, 3), (1, 1), (1, 1), (1, 1)]
    want = _OP(x, grad_out, u1, v1, *geometry)
    got = _OP(x.to(memory_format=torch.channels_last), grad_out.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
              u1.float(), v1[::1], *geometry)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    empty = _OP(x[:0], grad_out[:0], u1, v1, *geometry)
    assert [tuple(t.shape) for t in empty] == [(0, 5), (0, 36)]
    empty = _OP.redispatch(_COMPOSITE, x[:0], grad_out[:0], u1, v1, *geometry)
    assert [tuple(t.shape) for t in empty] == [(0, 5), (0, 36)]
    empty = reference.conv2d_projections(x[:0], grad_out[:0], u1, v1, *geometry)
    assert [tuple(t.shape) for t in empty] == [(0, 5), (0, 36)]


def test_op_random_geometries_all_kernels_agree():
    """80 random geometries (stride 1 and strided, padding up to 3, dilation up to 3, kernels up to 4×4,
    inputs down to 1×1, batches down to 0): the CPU kernel's two paths, the composite kernel and the twin of
    persample_conv2d agree to float64 rounding."""
    import random
    rng = random.Random(7)
    done = 0
    while done < 80:
        B, C, Co = rng.randint(0, 3), rng.randint(1, 4), rng.randint(1, 5)
        kh, kw, ph, pw, dh, dw = (rng.randint(1, 4), rng.randint(1, 4), rng.randint(0, 3), rng.randint(0, 3),
                                  rng.randint(1, 3), rng.randint(1, 3))
        sh, sw = (1, 1) if rng.random() < 0.5 else (rng.randint(1, 3), rng.randint(1, 3))
        H, Wd = rng.randint(1, 9), rng.randint(1, 9)
        if dh * (kh - 1) + 1 > H + 2 * ph or dw * (kw - 1) + 1 > Wd + 2 * pw:
            continue
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x, g = torch.randn(B, C, H, Wd, dtype=F64), torch.randn(B, Co, Ho, Wo, dtype=F64)
        k = min(3, Co, C * kh * kw)
        U, S, V = spectrum_of(torch.randn(Co, C * kh * kw, dtype=F64), k)[:3]
        args = (x, g, U, S, V, 0.1, [kh, kw], [sh, sw], [ph, pw], [dh, dw])
        want = reference.persample_conv2d(*args)
        for got in (_PERSAMPLE(*args), _PERSAMPLE.redispatch(_COMPOSITE, *args)):
            for a, b in zip(got, want):
                assert_close(a, b, TOL["parity"][F64], msg=f"geometry {(B, C, Co, H, Wd, kh, kw, sh, sw, ph, pw, dh, dw)}")
        done += 1


@pytest.mark.parametrize("device", DEVICES)
def test_op_opcheck(device):
    for dtype in DTYPES:
        for case in [(2, 3, 4, (6, 5), 3, 1, 1, 1), (2, 2, 3, (7, 7), (2, 3), 2, (1, 0), (1, 2))]:
            _, x, grad_out, _ = _conv_case(*case, dtype=dtype, device=device)
            u1 = torch.randn(case[2], dtype=dtype, device=device)
            v1 = torch.randn(case[1] * _prod(case[4]), dtype=dtype, device=device)
            for requires_grad in (False, True):
                torch.library.opcheck(_OP, (x.requires_grad_(requires_grad), grad_out, u1, v1, *map(list, _pairs(case))))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 3, 5)), r"lipfast::conv2d_projections: x must have shape \[B, C_in, H, W\] \(4 dims\)"),
    (dict(grad_out=torch.randn(2, 4, 5, 5, dtype=F64)), r"grad_out must have x's dtype Float, got Double"),
    (dict(grad_out=torch.randn(3, 4, 5, 5)), r"grad_out must have x's batch size B = 2"),
    (dict(grad_out=torch.randn(2, 4, 4, 5)), r"grad_out must have spatial size \[5, 5\]"),
    (dict(u1=torch.randn(3)), r"u1.size\(0\) must equal grad_out.size\(1\) = C_out \(4\), got 3"),
    (dict(v1=torch.randn(26)), r"v1 must have C_in·kh·kw = 3·3·3 = 27 entries, got 26"),
    (dict(stride=[0, 1]), r"stride must be two ints >= 1, got \[0, 1\]"),
    (dict(padding=[1]), r"padding must be two ints >= 0"),
    (dict(kernel_size=[3, 3], dilation=[4, 1]), r"the kernel spans 9 pixels along dim 2 .* but x is only 7 pixels"),
    (dict(x=torch.ones(2, 3, 5, 5, dtype=torch.int64), grad_out=torch.ones(2, 4, 5, 5, dtype=torch.int64)),
     r"x must be float32 or float64, got Long"),
])
def test_op_bad_input_messages(change, match):
    args = dict(x=torch.randn(2, 3, 5, 5), grad_out=torch.randn(2, 4, 5, 5), u1=torch.randn(4), v1=torch.randn(27),
                kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1])
    args.update(change)
    for run in (_OP, lambda *a: _OP.redispatch(_COMPOSITE, *a)):
        with pytest.raises(RuntimeError, match=match):
            run(*args.values())


_PERSAMPLE = torch.ops.lipfast.persample_conv2d.default


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CONV_CASES if min(c[2], c[1] * _prod(c[4])) > 2]
                         + [(4, 3, 6, (9, 7), 3, 1, 1, 1)], ids=_case_id)
def test_persample_conv2d_op_matches_unfold_and_the_gradient(dtype, case):
    """lipfast::persample_conv2d (CPU kernel, composite kernel, twin) against the materialised unfold route
    with the same spectrum, its bracket around the exact H[G_i, G_i], and its sums against G v1, Gᵀ u1."""
    W, x, g, G = _conv_case(*case, dtype=dtype)
    spec = lipfast.spectrum(W.to(F64), k=2)
    U, S, V, sn = spec.U, spec.S, spec.V, float(spec.sigma_next)
    geometry = _pairs(case)
    want = reference.persample_conv2d_unfold(x, g, U, S, V, sn, **_conv_kwargs(case))
    sums = (G.to(F64).sum(0) @ V[:, 0], G.to(F64).sum(0).mT @ U[:, 0])
    _, exact = reference.persample_dense(W.to(F64), G.to(F64))
    args = (x, g, U.to(dtype), S, V.to(dtype), sn, *geometry)
    runs = {"kernel": ops.persample_conv2d(*args), "composite": _PERSAMPLE.redispatch(_COMPOSITE, *args),
            "reference": reference.persample_conv2d(*args)}
    for name, out in runs.items():
        assert len(out) == 6 and all(t.dtype == F64 for t in out), name
        for got, ref in zip(out[:4], want):
            assert_close(got, ref, TOL["parity"][dtype], msg=lambda m, name=name: f"{name}: {m}")
        for got, ref in zip(out[4:], sums):
            assert_close(got, ref, TOL["parity"][dtype], msg=lambda m, name=name: f"{name}: {m}")
        slack = (1e-10 if dtype == F64 else 1e-4) * float(exact.abs().max())
        assert bool((out[2] <= exact + slack).all()) and bool((exact <= out[3] + slack).all()), name


@pytest.mark.parametrize("device", DEVICES)
def test_persample_conv2d_opcheck(device):
    for dtype in DTYPES:
        _, x, g, _ = _conv_case(2, 3, 4, (6, 5), 3, 1, 1, 1, dtype=dtype, device=device)
        U, S, V, sn = spectrum_of(gapped_matrix(4, 27), 2)
        args = (x, g, U.to(device=device, dtype=dtype), S.to(device), V.to(device=device, dtype=dtype), sn,
                [3, 3], [1, 1], [1, 1], [1, 1])
        torch.library.opcheck(_PERSAMPLE, args)
        empty = _PERSAMPLE(x[:0], g[:0], *args[2:])
        assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0,), (0,), (4,), (27,)]


@pytest.mark.parametrize("change, match", [
    (dict(U=torch.randn(4)), r"lipfast::persample_conv2d: U must have shape \[C_out, k\] \(2 dims\)"),
    (dict(V=torch.randn(27, 3)), r"lipfast::persample_conv2d: V.size\(1\) must equal U.size\(1\) = k \(2\), got 3"),
    (dict(S=torch.randn(3, dtype=F64)), r"S.size\(0\) must equal U.size\(1\) = k \(2\), got 3"),
    (dict(U=torch.randn(5, 2)), r"lipfast::conv2d_projections: u1.size\(0\) must equal grad_out.size\(1\) = C_out \(4\)"),
    (dict(V=torch.randn(26, 2)), r"v1 must have C_in·kh·kw = 3·3·3 = 27 entries, got 26"),
])
def test_persample_conv2d_bad_input_messages(change, match):
    args = dict(x=torch.randn(2, 3, 5, 5), grad_out=torch.randn(2, 4, 5, 5), U=torch.randn(4, 2),
                S=torch.tensor([2.0, 1.0], dtype=F64), V=torch.randn(27, 2), sigma_next=0.5, kernel_size=[3, 3],
                stride=[1, 1], padding=[1, 1], dilation=[1, 1])
    args.update(change)
    for run in (_PERSAMPLE, lambda *a: _PERSAMPLE.redispatch(_COMPOSITE, *a)):
        with pytest.raises(RuntimeError, match=match):
            run(*args.values())
