"""The four functional operations of lipfast (API.md): spectra, the operator-norm Hessian form, and
per-sample statistics of Linear and Conv2d layers without per-sample gradients (MATH.md §1, §4, §5)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from . import _validate as check
from . import ops

__all__ = ["Spectrum", "HessianForm", "PerSample", "spectrum", "hessian_form", "persample", "persample_conv2d"]

# Matrices this small get a full LAPACK SVD: cheaper than iterating, and exact (MATH.md §5).
_SMALL_MATRIX = 64 * 64
_COLD_ITERS = 100
_WARM_ITERS = 10
_DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}


@dataclass(frozen=True)
class Spectrum:
    """Top-k singular triplets of an ``[m, n]`` matrix, and what a warm start needs.

    Attributes:
        U: ``[m, k]`` left singular vectors.
        S: ``[k]`` singular values, descending, float64.
        V: ``[n, k]`` right singular vectors.
        sigma_next: ``[]`` float64, ``σ_{k+1}`` (an upper estimate: Ritz value plus its residual), or 0
            when the spectrum is exact (``k = min(m, n)``); it sets the truncation bracket.
        residuals: ``[k]`` float64, ``‖Wᵀu_j − σ_j v_j‖`` per triplet (``W v_j = σ_j u_j`` holds by
            construction of the Ritz pairs, so this is the informative half).
        exact: the full thin SVD (``k >= min(m, n)``).
        shape: ``(m, n)``.
        basis: ``[n, p]`` the iterated block one power step past ``V`` (``p >= k + 1``; not orthonormal),
            the warm start of the next call.
        iters: subspace sweeps done (0 for a LAPACK SVD).
        Wt_u1: ``[n]`` float64 ``Wᵀu1`` as the last sweep computed it (``W v1 = σ1 u1`` holds by
            construction): with the probes of lipfast::track_update, the tracker reads ΔW from these.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    sigma_next: Tensor
    residuals: Tensor
    exact: bool
    shape: tuple[int, int]
    basis: Tensor | None = None
    iters: int = 0
    Wt_u1: Tensor | None = None

    @cached_property
    def U64(self) -> Tensor:
        """``U`` in float64 (the Hessian contractions run in float64; converted once per spectrum)."""
        return self.U.to(torch.float64)

    @cached_property
    def V64(self) -> Tensor:
        return self.V.to(torch.float64)

    @cached_property
    def host(self) -> tuple[float, float, float]:
        """``(σ1, σ2, σ_{k+1})`` as Python floats, read from the device once (σ2 is ``sigma_next`` when k = 1)."""
        top = self.S[:2].tolist()
        nxt = float(self.sigma_next)
        return top[0], (top + [nxt])[1], nxt

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def sigma(self) -> Tensor:
        """``σ1 = ‖W‖₂`` (a 0-dim float64 tensor)."""
        return self.S[0]

    @cached_property
    def residual(self) -> float:
        """``max_j ‖Wᵀu_j − σ_j v_j‖`` over the k triplets."""
        return float(self.residuals.max()) if self.residuals.numel() else 0.0

    @property
    def gap(self) -> float:
        """Relative spectral gap ``(σ1 − σ2)/σ1`` (``σ2`` is ``sigma_next`` when k = 1). An iterated spectrum
        takes ``σ2`` as ``sigma_next`` takes ``σ_{k+1}``, Ritz value plus its residual: an unconverged iteration
        cannot tell σ1 and σ2 apart closer than that (without it, a tie σ1 = σ2 read off a few warm sweeps looked
        like a gap of 1e-10 and gave finite, meaningless Hessian forms)."""
        s1 = float(self.S[0])
        if self.k == 1:
            s2 = float(self.sigma_next)
        elif self.iters > 0:
            s2 = min(float(self.S[1] + self.residuals[1]), s1)
        else:
            s2 = float(self.S[1])
        return (s1 - s2) / s1 if s1 > 0 else 0.0

    @property
    def degenerate(self) -> bool:
        """σ1 and σ2 are numerically equal (or W = 0): the operator norm is not differentiable there,
        and Hessian forms are NaN by design."""
        eps = torch.finfo(self.U.dtype).eps
        return self.gap <= 8 * eps


@dataclass(frozen=True)
class HessianForm:
    """``H[E,E]`` (MATH.md §1): the estimate and the truncation bracket, float64, ``[]`` or ``[N]``.
    ``value == lo == hi`` for an exact spectrum; all NaN when ``degenerate``."""

    value: Tensor
    lo: Tensor
    hi: Tensor
    degenerate: bool = False


@dataclass(frozen=True)
class PerSample:
    """Per-sample statistics of one layer, float64 ``[B]`` each: ``proj = s_i = u1ᵀ G_i v1`` and
    ``hess = H[G_i, G_i]`` with its truncation bracket ``[hess_lo, hess_hi]``."""

    proj: Tensor
    hess: Tensor
    hess_lo: Tensor
    hess_hi: Tensor
    degenerate: bool = False


def spectrum(W: Tensor, k: int = 8, state: Spectrum | None = None, iters: int | None = None,
             tol: float | None = None, *, oversample: int | None = None, seed: int = 0) -> Spectrum:
    """Top-k singular triplets of ``W`` (MATH.md §5).

    A cold start sketches the range with a seeded Gaussian block of ``k + 1 + oversample`` columns
    (Halko–Martinsson–Tropp) and refines it by block subspace iteration; ``state`` (the previous
    Spectrum of a matrix of the same shape) warm-starts the iteration, which then needs a sweep or two.
    Each sweep ends with a Rayleigh–Ritz step, so the triplets are always the best in the block.

    Args:
        W: ``[m, n]`` float32/float64, finite.
        k: triplets wanted; ``k >= min(m, n)`` gives the exact full thin SVD (LAPACK).
        state: a previous Spectrum of an ``[m, n]`` matrix, or None for a cold start.
        iters: most sweeps (default 100 cold, 10 warm).
        tol: stop when ``max_j ‖Wᵀu_j − σ_j v_j‖ <= tol·σ1`` (default 1e-4 float32, 1e-8 float64);
            ``0`` always runs ``iters`` sweeps.
        oversample: extra block columns beyond ``k + 1`` (default ``max(4, k // 2)``).
        seed: seed of the cold-start sketch.

    Returns:
        A :class:`Spectrum`.
    """
    fn = "lipfast.spectrum"
    check.tensor(fn, "W", W, (2,), "[m, n]")
    k = check.positive_int(fn, "k", k)
    m, n = W.shape
    if m == 0 or n == 0:
        raise ValueError(f"{fn}: W must have at least one row and one column, got shape {tuple(W.shape)}")
    check.finite(fn, "W", W)
    if iters is not None:
        check.positive_int(fn, "iters", iters)
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"{fn}: tol must be a number >= 0, got {tol!r}")
    if oversample is not None:
        check.positive_int(fn, "oversample", oversample, minimum=0)
    check.positive_int(fn, "seed", seed, minimum=0)
    if seed >= 2**63:  # torch.Generator.manual_seed takes a signed 64-bit seed
        raise ValueError(f"{fn}: seed must be < 2**63, got {seed}")
    if state is not None:
        if not isinstance(state, Spectrum):
            raise TypeError(f"{fn}: state must be a Spectrum from a previous call, got {type(state).__name__}")
        if state.shape != (m, n):
            raise ValueError(f"{fn}: state describes a {state.shape[0]}x{state.shape[1]} matrix, "
                             f"but W has shape {m}x{n}")

    basis = state.basis if state is not None else None
    return compute_spectrum(W.detach(), k, basis, iters, tol, oversample, seed)


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual at which a subspace iteration stops by default (MATH.md §5)."""
    return _DEFAULT_TOL[dtype]


def tracked_pairs(k: int) -> int:
    """Singular pairs whose residuals end a tracker's warm sweeps (``lipfast::track_update``): σ1 and σ2, that
    the records' σ1, its accuracy and the gap come from (csrc/block_size.h says why not all k)."""
    return min(2, k + 1)


def block_size(k: int, r: int, oversample: int | None = None) -> int:
    """Columns of the iterated block for k triplets of a matrix of rank <= r (MATH.md §5)."""
    return min(r, k + 1 + (max(4, k // 2) if oversample is None else oversample))


def needs_exact(m: int, n: int, k: int) -> bool:
    """Whether an ``[m, n]`` matrix gets the exact spectrum instead of a subspace iteration."""
    r = min(m, n)
    return k >= r or block_size(k, r) >= r or m * n <= _SMALL_MATRIX


def with_host_values(spec: Spectrum, sigma: float, sigma2: float, sigma_next: float, residual: float) -> Spectrum:
    """``spec`` with its host-side numbers filled in from values the caller already read (no device reads)."""
    spec.__dict__["host"] = (sigma, sigma2, sigma_next)
    spec.__dict__["residual"] = residual
    return spec


def compute_spectrum(W: Tensor, k: int, basis: Tensor | None = None, iters: int | None = None,
                     tol: float | None = None, oversample: int | None = None, seed: int = 0,
                     impl=ops, small: str = "lapack") -> Spectrum:
    """:func:`spectrum` without argument checks, warm-started from a bare ``basis [n, p]``.

    For callers that validated already (the tracker): no finiteness pass, no host sync beyond the
    iteration's own convergence checks.
    """
    m, n = W.shape
    r = min(m, n)
    p = block_size(k, r, oversample)
    if k >= r or p >= r or m * n <= _SMALL_MATRIX:
        return _gram_spectrum(W, k, impl) if small == "gram" else _lapack_spectrum(W, k)

    if basis is not None:
        if basis.dtype != W.dtype or basis.device != W.device:
            basis = basis.to(W.device, W.dtype)
        V0 = basis if basis.shape[1] == p else resize_block(basis, p, seed)
        max_iters = iters or _WARM_ITERS
    else:
        gen = torch.Generator(device=W.device).manual_seed(seed)
        V0 = torch.randn(n, p, generator=gen, device=W.device, dtype=W.dtype)
        max_iters = iters or _COLD_ITERS
    tol = default_tol(W.dtype) if tol is None else float(tol)
    U, S, V, res, it, advanced, _, _ = impl.subspace_iteration(W, V0, k + 1, max_iters, tol)
    # The Ritz value of σ_{k+1} lies below the true one; adding its residual keeps the truncation
    # bracket honest (a singular value lies within the residual of every Ritz value). Read on the host
    # once (the iteration synchronised already), instead of a chain of 0-dim tensor ops.
    s_k, s_km1, r_k = float(S[k]), float(S[k - 1]), float(res[k])
    sigma_next = torch.tensor(min(s_k + r_k, s_km1), dtype=torch.float64, device=S.device)
    return Spectrum(U=U[:, :k], S=S[:k], V=V[:, :k], sigma_next=sigma_next, residuals=res[:k],
                    exact=False, shape=(m, n), basis=advanced, iters=int(it), Wt_u1=advanced[:, 0].to(torch.float64))


def _lapack_spectrum(W: Tensor, k: int) -> Spectrum:
    m, n = W.shape
    r = min(m, n)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.mT
    S64 = S.to(torch.float64)
    res = (W.mT @ U - V * S).norm(dim=0).to(torch.float64)
    kk = min(k, r)
    exact = k >= r
    sigma_next = S64.new_zeros(()) if exact else S64[kk]
    basis = V[:, : block_size(kk, r)]
    return Spectrum(U=U[:, :kk], S=S64[:kk], V=V[:, :kk], sigma_next=sigma_next, residuals=res[:kk],
                    exact=exact, shape=(m, n), basis=basis, iters=0, Wt_u1=S64[0] * V[:, 0].to(torch.float64))


def _gram_spectrum(W: Tensor, k: int, impl=ops) -> Spectrum:
    """Exact spectrum from the eigendecomposition of the smaller Gram matrix, in float64.

    One subspace sweep whose block is the identity on the smaller side spans the whole row (or column)
    space, so its Rayleigh–Ritz step is the exact SVD (lipfast::track_update takes the same route)."""
    m, n = W.shape
    r = min(m, n)
    tall = m >= n  # iterate on the tall orientation, whose right side is the small one
    A = W if tall else W.mT
    eye = torch.eye(r, dtype=W.dtype, device=W.device)
    U, S, V, res, _, _, _, _ = impl.subspace_iteration(A, eye, r, 1, 0.0)
    # For A = Wᵀ: W = V_A S U_Aᵀ, and the op's residuals ‖Aᵀu − σv‖ = ‖W v_W − σ u_W‖ are the other half.
    U, V = (U, V) if tall else (V, U)
    kk = min(k, r)
    exact = k >= r
    sigma_next = S.new_zeros(()) if exact else S[kk]
    return Spectrum(U=U[:, :kk], S=S[:kk], V=V[:, :kk], sigma_next=sigma_next, residuals=res[:kk], exact=exact,
                    shape=(m, n), basis=V[:, : block_size(kk, r)], iters=0, Wt_u1=S[0] * V[:, 0].to(torch.float64))


def resize_block(block: Tensor, p: int, seed: int) -> Tensor:
    """A warm-start block of ``p`` columns from a previous one (the rank may have changed)."""
    if block.shape[1] >= p:
        return block[:, :p]
    gen = torch.Generator(device=block.device).manual_seed(seed)
    extra = torch.randn(block.shape[0], p - block.shape[1], generator=gen, device=block.device, dtype=block.dtype)
    return torch.cat([block, extra], dim=1)


def _check_spectrum(fn: str, spec) -> None:
    if not isinstance(spec, Spectrum):
        raise TypeError(f"{fn}: spec must be a Spectrum from lipfast.spectrum, got {type(spec).__name__}")


def _contract(spec: Spectrum, x: Tensor, y: Tensor, impl=ops) -> tuple[Tensor, Tensor, Tensor]:
    """Hessian form from ``x = E v1 [N, m]`` and ``y = Eᵀ u1 [N, n]``, in float64."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    a = x @ spec.U64
    b = y @ spec.V64
    # (σ_{k+1} from the host values: the tracker's spectra hold them already, read with a step's records)
    return impl.hessian_contract(a, b, (x * x).sum(-1), (y * y).sum(-1), spec.S, spec.host[2])


def _nan_if(degenerate: bool, *values: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.full_like(v, float("nan")) for v in values) if degenerate else values


def hessian_form(spec: Spectrum, E: Tensor) -> HessianForm:
    """``H[E,E] = vec(E)ᵀ ∇²σ1(W) vec(E)`` at the matrix ``spec`` describes (MATH.md §1).

    Args:
        spec: Spectrum of ``W [m, n]``.
        E: ``[m, n]`` or ``[N, m, n]`` directions.

    Returns:
        A :class:`HessianForm` with float64 ``value``, ``lo``, ``hi`` of shape ``[]`` or ``[N]``.
    """
    fn = "lipfast.hessian_form"
    _check_spectrum(fn, spec)
    check.tensor(fn, "E", E, (2, 3), "[m, n] or [N, m, n]")
    if tuple(E.shape[-2:]) != spec.shape:
        raise ValueError(f"{fn}: E must have the matrix shape {list(spec.shape)} of spec, got {tuple(E.shape)}")
    if E.dim() == 3 and E.shape[0] == 0:
        raise ValueError(f"{fn}: E must hold at least one direction, got an empty batch {tuple(E.shape)}")
    check.finite(fn, "E", E)
    E3 = E.detach().to(torch.float64).reshape(-1, *spec.shape)
    x = E3 @ spec.V64[:, 0]
    y = E3.mT @ spec.U64[:, 0]
    value, lo, hi = _nan_if(spec.degenerate, *_contract(spec, x, y))
    if E.dim() == 2:
        value, lo, hi = value[0], lo[0], hi[0]
    return HessianForm(value=value, lo=lo, hi=hi, degenerate=spec.degenerate)


def persample(spec: Spectrum, X: Tensor, D: Tensor, *, check_finite: bool = True) -> PerSample:
    """Per-sample statistics of a Linear layer without per-sample gradients (MATH.md §4).

    Args:
        spec: Spectrum of the layer's weight ``[m, n]``.
        X: ``[B, n]`` or ``[B, T, n]`` layer inputs.
        D: ``[B, m]`` or ``[B, T, m]`` gradients of each sample's own loss w.r.t. the layer output,
            so that ``G_i = D_iᵀ X_i``.
        check_finite: raise on NaN/Inf in ``X`` or ``D`` (costs a pass and a sync; the tracker
            checks the outputs instead).

    Returns:
        A :class:`PerSample`, float64 ``[B]`` fields.
    """
    fn = "lipfast.persample"
    _check_spectrum(fn, spec)
    check.tensor(fn, "X", X, (2, 3), "[B, n] or [B, T, n]")
    check.tensor(fn, "D", D, (2, 3), "[B, m] or [B, T, m]")
    m, n = spec.shape
    if X.dim() != D.dim():
        raise ValueError(f"{fn}: X and D must both be [B, .] or both [B, T, .], got X {tuple(X.shape)} and D {tuple(D.shape)}")
    if X.shape[-1] != n:
        raise ValueError(f"{fn}: X must have n = {n} features (the weight is {m}x{n}), got shape {tuple(X.shape)}")
    if D.shape[-1] != m:
        raise ValueError(f"{fn}: D must have m = {m} features (the weight is {m}x{n}), got shape {tuple(D.shape)}")
    if X.shape[:-1] != D.shape[:-1]:
        raise ValueError(f"{fn}: X and D must agree on [B, T], got X {tuple(X.shape)} and D {tuple(D.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{fn}: X must hold at least one sample, got an empty batch {tuple(X.shape)}")
    if D.dtype != X.dtype:
        raise TypeError(f"{fn}: D must have X's dtype {X.dtype}, got {D.dtype}")
    if check_finite:
        check.finite(fn, "X", X)
        check.finite(fn, "D", D)
    X3 = X if X.dim() == 3 else X.unsqueeze(1)
    D3 = D if D.dim() == 3 else D.unsqueeze(1)
    U = spec.U.to(X.dtype)
    V = spec.V.to(X.dtype)
    proj, *hess = ops.persample_linear(X3, D3, U, spec.S, V, float(spec.sigma_next))
    hess = _nan_if(spec.degenerate, *hess)
    return PerSample(proj, *hess, degenerate=spec.degenerate)


def persample_conv2d(spec: Spectrum, x: Tensor, grad_out: Tensor, kernel_size, stride=1, padding=0,
                     dilation=1, *, check_finite: bool = True) -> PerSample:
    """Per-sample statistics of a Conv2d (groups=1) without per-sample gradients (MATH.md §4).

    ``G_i v1`` needs the input convolved with ``v1`` as the filter, and ``G_iᵀ u1`` a correlation of the
    input with the sample's own map ``D_iᵀ u1``; ``lipfast::persample_conv2d`` forms both one sample at a
    time and contracts them with the spectrum: the unfolded ``[B, C_in·kh·kw, H'·W']`` patches never exist.

    Args:
        spec: Spectrum of ``weight.reshape(C_out, C_in·kh·kw)``.
        x: ``[B, C_in, H, W]`` layer input.
        grad_out: ``[B, C_out, H', W']`` gradients of each sample's own loss w.r.t. the layer output.
        kernel_size, stride, padding, dilation: an int or a pair, as ``nn.Conv2d`` takes them
            (padding as numbers; zero padding).
        check_finite: raise on NaN/Inf in the inputs.

    Returns:
        A :class:`PerSample`, float64 ``[B]`` fields.
    """
    fn = "lipfast.persample_conv2d"
    _check_spectrum(fn, spec)
    check.tensor(fn, "x", x, (4,), "[B, C_in, H, W]")
    check.tensor(fn, "grad_out", grad_out, (4,), "[B, C_out, H', W']")
    kh, kw = check.pair(fn, "kernel_size", kernel_size, 1)
    sh, sw = check.pair(fn, "stride", stride, 1)
    ph, pw = check.pair(fn, "padding", padding, 0)
    dh, dw = check.pair(fn, "dilation", dilation, 1)
    B, C, H, Wd = x.shape
    m, n = spec.shape
    if C * kh * kw != n:
        raise ValueError(f"{fn}: x has C_in = {C} channels, so with a {kh}x{kw} kernel the weight matrix has "
                         f"{C * kh * kw} columns, but spec describes a {m}x{n} matrix")
    if grad_out.shape[0] != B or grad_out.shape[1] != m:
        raise ValueError(f"{fn}: grad_out must have shape [B={B}, C_out={m}, H', W'], got {tuple(grad_out.shape)}")
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{fn}: kernel_size {kh}x{kw} with dilation {(dh, dw)} spans more than x's padded size "
                         f"{H + 2 * ph}x{Wd + 2 * pw} (padding {(ph, pw)}); the convolution has no output")
    if tuple(grad_out.shape[2:]) != (Ho, Wo):
        raise ValueError(f"{fn}: grad_out must have spatial size [{Ho}, {Wo}] for this input, kernel, stride, "
                         f"padding and dilation, got {list(grad_out.shape[2:])}")
    if B == 0:
        raise ValueError(f"{fn}: x must hold at least one sample, got an empty batch {tuple(x.shape)}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{fn}: grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    if check_finite:
        check.finite(fn, "x", x)
        check.finite(fn, "grad_out", grad_out)
    proj, *hess, _, _ = ops.persample_conv2d(x, grad_out, spec.U.to(x.dtype), spec.S, spec.V.to(x.dtype),
                                             float(spec.sigma_next), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    hess = _nan_if(spec.degenerate, *hess)
    return PerSample(proj, *hess, degenerate=spec.degenerate)


def conv2d_projections(spec: Spectrum, x: Tensor, grad_out: Tensor, kernel_size: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                       impl=ops) -> tuple[Tensor, Tensor]:
    """``x_i = G_i v1 [B, C_out]`` and ``y_i = G_iᵀ u1 [B, C_in·kh·kw]`` of a Conv2d, float64, unchecked
    (``lipfast::conv2d_projections``). Linear in ``grad_out``, so the projections of a layer called
    several times on the same samples add up."""
    return impl.conv2d_projections(x, grad_out, spec.U[:, 0], spec.V[:, 0], kernel_size, stride, padding, dilation)


def contract_projections(spec: Spectrum, xvec: Tensor, yvec: Tensor, impl=ops, mask: bool = True) -> PerSample:
    """Per-sample statistics from ``x_i = G_i v1 [B, m]`` and ``y_i = G_iᵀ u1 [B, n]``. ``mask=False``
    skips the NaN masking of a degenerate spectrum (the tracker applies its own gap tolerance) and the test
    for it (which reads σ1, σ2 off the device): ``degenerate`` is then False."""
    value, lo, hi = _contract(spec, xvec, yvec, impl)
    degenerate = spec.degenerate if mask else False
    if degenerate:
        value, lo, hi = _nan_if(True, value, lo, hi)
    proj = xvec.to(torch.float64) @ spec.U64[:, 0]
    return PerSample(proj, value, lo, hi, degenerate=degenerate)
