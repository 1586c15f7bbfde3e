"""Typed wrappers over the compiled ops ``torch.ops.lipfast.*`` and their fake (meta) kernels.

The schemas live in ``csrc/lipfast.cpp``; CPU kernels in ``csrc/cpu``, CUDA kernels in ``csrc/cuda``.
None of these ops is differentiable: every statistic lipfast computes is a measurement of training,
never part of it. An Autograd-key kernel (csrc/lipfast.cpp) runs them below autograd, so their outputs
never require grad, and the wrappers detach their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["subspace_iteration", "hessian_contract", "persample_linear", "gradient_statistics", "update_statistics",
           "hessian_tail", "track_update", "conv2d_projections", "persample_conv2d", "persample_linear_precond",
           "persample_conv2d_precond"]


def _d(t: Tensor) -> Tensor:
    """``t`` cut from autograd (no new tensor when it is not part of a graph: these wrappers run on
    the tracker's hot path, several per layer and step)."""
    return t.detach() if t.requires_grad else t


def subspace_iteration(W: Tensor, V0: Tensor, k: int, max_iters: int, tol: float, right: Tensor | None = None,
                       left: Tensor | None = None):
    """Warm-started block subspace iteration on ``WᵀW`` with Rayleigh–Ritz (MATH.md §5).

    Args:
        W: ``[m, n]`` float32/float64 matrix.
        V0: ``[n, p]`` starting block, ``p <= min(m, n)``; orthonormalised inside.
        k: the leading ``k <= p`` triplets whose residual decides convergence.
        max_iters: at most this many sweeps (each sweep is two GEMMs with ``W``).
        tol: stop once ``max_{j<k} ‖Wᵀu_j − σ_j v_j‖ <= tol·σ1``; ``0`` runs ``max_iters`` sweeps
            without a host synchronisation for the check.
        right: optional ``[n, a]`` probes; ``W·right`` rides along in the first sweep's GEMM.
        left: optional ``[m, b]`` probes; ``Wᵀ·left`` likewise.

    Returns:
        ``(U [m, p], S [p] float64 descending, V [n, p], residual [p] float64, iters [] int64,
        next [n, p], W_right [m, a] float64, Wt_left [n, b] float64)``; ``next = WᵀU`` is one power step
        past ``V``, the warm start of the next call.

    Raises RuntimeError when ``W`` holds NaN/Inf. On CUDA the kernel never waits for the GPU to find out: it
    raises where it reads the convergence test anyway (``tol > 0`` with sweeps to go), and otherwise returns
    NaN singular values (the tracker reads them as a non-finite step).
    """
    return torch.ops.lipfast.subspace_iteration.default(
        _d(W), _d(V0), int(k), int(max_iters), float(tol),
        None if right is None else _d(right), None if left is None else _d(left))


def hessian_contract(a: Tensor, b: Tensor, xnorm2: Tensor, ynorm2: Tensor, S: Tensor, sigma_next: float):
    """``H[E_i, E_i]`` of MATH.md §1 from the projections of each direction onto the top-k triplets.

    Args:
        a: ``[N, k]``, ``a[i, j] = u_jᵀ (E_i v1)``.
        b: ``[N, k]``, ``b[i, j] = v_jᵀ (E_iᵀ u1)``.
        xnorm2: ``[N]``, ``‖E_i v1‖²``.
        ynorm2: ``[N]``, ``‖E_iᵀ u1‖²``.
        S: ``[k]`` singular values, descending.
        sigma_next: ``σ_{k+1}``, or ``0`` when the spectrum is exact.

    Returns:
        ``(value, lo, hi)``, each ``[N]`` float64: the estimate and the truncation bracket. NaN where
        ``σ1 == σ2`` or ``σ1 == 0`` (no finite Hessian there).
    """
    return torch.ops.lipfast.hessian_contract.default(
        _d(a), _d(b), _d(xnorm2), _d(ynorm2), _d(S), float(sigma_next)
    )


def persample_linear(X: Tensor, D: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, sums: bool = False):
    """Fused per-sample statistics of a Linear layer, never forming ``G_i = D_iᵀ X_i`` (MATH.md §4).

    Args:
        X: ``[B, T, n]`` layer inputs (or ``[B, n]``: one position per sample, T = 1).
        D: ``[B, T, m]`` (``[B, m]``) gradients of each sample's own loss w.r.t. the layer output.
        U: ``[m, k]``, S: ``[k]``, V: ``[n, k]``: the top-k triplets of the weight.
        sigma_next: ``σ_{k+1}``, or ``0`` when the spectrum is exact.
        sums: also return ``Σ_i G_i v1 [m]`` and ``Σ_i G_iᵀ u1 [n]`` (the ``.sums`` overload): the batch
            gradient's products with the top pair, formed in the same pass over X and D.

    Returns:
        ``(proj, hess, hess_lo, hess_hi)``, each ``[B]`` float64: ``u1ᵀ G_i v1`` and ``H[G_i, G_i]``;
        with ``sums``, then ``Gv1 [m]`` and ``Gtu1 [n]``, float64.
    """
    op = torch.ops.lipfast.persample_linear.sums if sums else torch.ops.lipfast.persample_linear.default
    return op(_d(X), _d(D), _d(U), _d(S), _d(V), float(sigma_next))


def gradient_statistics(proj: Tensor, hess: Tensor, hess_lo: Tensor, hess_hi: Tensor, G: Tensor, U: Tensor,
                        S: Tensor, V: Tensor, sigma_next: float, scale: float, loss_factor: float,
                        Gv1: Tensor | None = None, Gtu1: Tensor | None = None, known: Tensor | None = None,
                        known_scale: float = 0.0) -> Tensor:
    """The tracker's reductions before a step (MATH.md §3), fused.

    Args:
        proj, hess, hess_lo, hess_hi: ``[N]`` per-sample statistics as the capture produced them.
        G: ``[m, n]`` the weight's gradient (or the gradient in the weight's shape ``[m, ...]``, read as
            ``[m, n]``: a convolution's needs no reshape); ``ḡ = G / loss_factor``.
        U, S, V: the spectrum before the step; sigma_next: ``σ_{k+1}``.
        scale: per-sample scale, ``s_i = scale·proj_i`` and ``H[G_i,G_i] = scale²·hess_i``.
        Gv1, Gtu1: optional ``[m]``, ``[n]`` ``G·v1`` and ``Gᵀ·u1`` formed elsewhere (the tracker sums them
            from the per-sample projections); G is then not read.
        known, known_scale: optional optimizer buffer ``M`` (G's shape) whose multiple ``known_scale·M`` is the
            step's deterministic part (the momentum term, :mod:`lipfast.optim`).

    Returns:
        float64 ``[12]``: ``N, Σ(s−K), Σ(s−K)², ΣH, ΣH_lo, ΣH_hi`` (additive across data-parallel
        ranks), ``K = u1ᵀḡv1`` (the shift that keeps the variance exact), ``H[ḡ,ḡ]`` value/lo/hi, 1.0
        when every reduction is finite, and ``known_scale·u1ᵀMv1`` (0 without ``known``).
    """
    return torch.ops.lipfast.gradient_statistics.default(
        _d(proj), _d(hess), _d(hess_lo), _d(hess_hi), _d(G), _d(U), _d(S),
        _d(V), float(sigma_next), float(scale), float(loss_factor),
        None if Gv1 is None else _d(Gv1), None if Gtu1 is None else _d(Gtu1),
        None if known is None else _d(known), float(known_scale))


def update_statistics(x: Tensor, y: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float) -> Tensor:
    """First- and second-order prediction of a step's change of σ1 (MATH.md §2), fused.

    Args:
        x: ``[m]`` ``ΔW v1`` and y: ``[n]`` ``ΔWᵀ u1`` (float64), U, S, V, sigma_next: the spectrum
        before the step.

    Returns:
        float64 ``[7]``: ``⟨J, ΔW⟩``, ``½H[ΔW,ΔW]`` value/lo/hi, 1.0 when finite, ``‖x‖``, ``‖y‖``.
    """
    return torch.ops.lipfast.update_statistics.default(
        _d(x), _d(y), _d(U), _d(S), _d(V), float(sigma_next))


def hessian_tail(W: Tensor, x: Tensor, y: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float,
                 max_iters: int = 32, tol: float = 1e-3, atol: float = 0.0) -> Tensor:
    """The unknown tail of ``H[E,E]`` (MATH.md §1, "Truncated spectrum") solved by conjugate gradients
    instead of bracketed.

    Args:
        W: ``[m, n]`` the matrix; x: ``[m]`` ``E v1`` and y: ``[n]`` ``Eᵀ u1`` (float64); U, S, V: its top-k
            triplets; sigma_next: an upper bound of the other singular values (``σ_{k+1}``).
        max_iters: conjugate-gradient steps at most (each reads W once); tol, atol: stop when the
            bracket's width is below ``tol`` times its lower end, or below ``atol``.

    Returns:
        float64 ``[5]``: the tail's value, its lower and upper bound, the steps taken, and the unknown
        mass ``R``. With no step taken these are ``R/σ1`` and the truncation bracket ``R/(σ1 ± σ_{k+1})``;
        ``core_k`` plus the value is ``H[E,E]``.
    """
    return torch.ops.lipfast.hessian_tail.default(
        _d(W), _d(x), _d(y), _d(U), _d(S), _d(V), float(sigma_next), int(max_iters), float(tol), float(atol))


def track_update(W: Tensor, basis: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, Wt_u1: Tensor,
                 max_iters: int, tol: float, exact: bool, cluster: int = 1, solve_tail: bool = True):
    """One tracked layer after an optimizer step (MATH.md §2, §5), in one call.

    Args:
        W: ``[m, n]`` the weight after the step.
        basis: ``[n, p]`` warm-start block of the spectrum before the step (ignored when ``exact``).
        U, S, V, sigma_next, Wt_u1: that spectrum (``Wt_u1 = Wᵀu1 [n]`` float64 before the step).
        max_iters, tol: sweeps of the warm-started iteration; exact: the matrix is small enough for the
            exact spectrum (``k >= min(m, n)`` or a full block).
        cluster: pairs ``c`` of the top cluster (clamped to ``[1, k]``): with ``c > 1`` the step's prediction is
            the cluster expansion (MATH.md §2), and its pairs ride along as probes. The returned ``stats[19]``
            is the next step's.
        solve_tail: False leaves ``second_order``'s unknown tail at its truncation estimate (no
            ``hessian_tail`` solve), for a caller that wants the new spectrum only.

    Returns:
        The new spectrum's ``U [m, k], S [k], V [n, k], sigma_next [], residuals [k], basis [n, p],
        Wt_u1 [n]`` and float64 ``stats [20]``: ``first_order``, ``second_order`` value/lo/hi (c = 1:
        ``⟨J, ΔW⟩``, ``½H[ΔW,ΔW]``; c > 1: ``μ − σ1`` and the rotated pair's coupling, MATH.md §2), 1.0 when
        finite, ``‖ΔW v1‖``, ``‖ΔWᵀu1‖``, new ``σ1``, ``σ2`` (``σ_{k+1}`` when k = 1), ``σ_{k+1}``, max
        residual, sweeps, ``‖U_Cᵀu1'‖`` and ``‖V_Cᵀv1'‖`` (the new top pair in the old cluster's span; c = 1:
        ``|u1ᵀu1'|``, ``|v1ᵀv1'|``), the new ``r1``, ``r2`` (``‖Wᵀu_j − σ_j v_j‖`` of the top two pairs; ``r2 = r1``
        when k = 1), ``max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂)``, the cluster's gap ``σ_c − σ_{c+1}``, ``c``, and the next
        step's cluster size.
    """
    return torch.ops.lipfast.track_update.default(
        _d(W), _d(basis), _d(U), _d(S), _d(V), float(sigma_next), _d(Wt_u1),
        int(max_iters), float(tol), bool(exact), int(cluster), bool(solve_tail))


def conv2d_projections(x: Tensor, grad_out: Tensor, u1: Tensor, v1: Tensor, kernel_size, stride, padding, dilation):
    """``G_i v1`` and ``G_iᵀ u1`` of a Conv2d (groups=1, zero padding) for every sample, without forming
    ``G_i`` or unfolding ``x`` (MATH.md §4).

    Args:
        x: ``[B, C_in, H, W]`` layer input (float32/float64).
        grad_out: ``[B, C_out, H', W']`` output-gradients of each sample's own loss, in ``x``'s dtype.
        u1: ``[C_out]``, v1: ``[C_in·kh·kw]``: the top singular pair of ``weight.reshape(C_out, -1)``.
        kernel_size, stride, padding, dilation: pairs of ints, as ``nn.Conv2d`` holds them.

    Returns:
        ``(Gv1 [B, C_out], Gtu1 [B, C_in·kh·kw])``, float64.
    """
    return torch.ops.lipfast.conv2d_projections.default(
        _d(x), _d(grad_out), _d(u1), _d(v1), list(kernel_size), list(stride), list(padding), list(dilation))


def persample_conv2d(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, kernel_size,
                     stride, padding, dilation):
    """Per-sample statistics of a Conv2d (groups=1, zero padding), as :func:`persample_linear` with
    ``sums=True`` gives them for a Linear layer: :func:`conv2d_projections` contracted with the spectrum.

    Args:
        x, grad_out, kernel_size, stride, padding, dilation: as for :func:`conv2d_projections`.
        U: ``[C_out, k]``, S: ``[k]``, V: ``[C_in·kh·kw, k]``, sigma_next: the weight matrix's top-k triplets.

    Returns:
        ``(proj, hess, hess_lo, hess_hi)`` ``[B]`` and ``Gv1 [C_out]``, ``Gtu1 [C_in·kh·kw]`` (sums over the
        samples), float64.
    """
    return torch.ops.lipfast.persample_conv2d.default(
        _d(x), _d(grad_out), _d(U), _d(S), _d(V), float(sigma_next), list(kernel_size), list(stride), list(padding),
        list(dilation))


@torch.library.register_fake("lipfast::persample_conv2d")
def _persample_conv2d_fake(x, grad_out, U, S, V, sigma_next, kernel_size, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"x must have shape [B, C_in, H, W], got {tuple(x.shape)}")
    f64 = dict(dtype=torch.float64, device=x.device)
    B = x.shape[0]
    return (*(torch.empty((B,), **f64) for _ in range(4)), torch.empty((U.shape[0],), **f64),
            torch.empty((V.shape[0],), **f64))


@torch.library.register_fake("lipfast::conv2d_projections")
def _conv2d_projections_fake(x, grad_out, u1, v1, kernel_size, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"x must have shape [B, C_in, H, W], got {tuple(x.shape)}")
    torch._check(grad_out.dim() == 4, lambda: f"grad_out must have shape [B, C_out, H', W'], got {tuple(grad_out.shape)}")
    f64 = dict(dtype=torch.float64, device=x.device)
    return torch.empty((x.shape[0], grad_out.shape[1]), **f64), torch.empty((x.shape[0], v1.shape[0]), **f64)


@torch.library.register_fake("lipfast::track_update")
def _track_update_fake(W, basis, U, S, V, sigma_next, Wt_u1, max_iters, tol, exact, cluster=1, solve_tail=True):
    from .functional import block_size  # functional imports this module
    torch._check(W.dim() == 2, lambda: f"W must have shape [m, n], got {tuple(W.shape)}")
    m, n = W.shape
    k = U.shape[1]
    r = min(m, n)
    kk = min(k, r)
    p = block_size(kk, r) if exact else basis.shape[1]
    f64 = dict(dtype=torch.float64, device=W.device)
    # U, V and basis are column blocks of row-major buffers (the kernels keep blocks as rows).
    return (
        W.new_empty((kk, m)).mT,
        torch.empty((kk,), **f64),
        W.new_empty((kk, n)).mT,
        torch.empty((), **f64),
        torch.empty((kk,), **f64),
        W.new_empty((p, n)).mT,
        torch.empty((n,), **f64),
        torch.empty((20,), **f64),
    )


@torch.library.register_fake("lipfast::gradient_statistics")
def _gradient_statistics_fake(proj, hess, hess_lo, hess_hi, G, U, S, V, sigma_next, scale, loss_factor, Gv1=None,
                              Gtu1=None, known=None, known_scale=0.0):
    torch._check(G.dim() >= 2, lambda: f"G must have shape [m, n] or [m, ...], got {tuple(G.shape)}")
    return torch.empty((12,), dtype=torch.float64, device=G.device)


@torch.library.register_fake("lipfast::hessian_tail")
def _hessian_tail_fake(W, x, y, U, S, V, sigma_next, max_iters, tol, atol=0.0):
    torch._check(W.dim() == 2, lambda: f"W must have shape [m, n], got {tuple(W.shape)}")
    return torch.empty((5,), dtype=torch.float64, device=W.device)


@torch.library.register_fake("lipfast::update_statistics")
def _update_statistics_fake(x, y, U, S, V, sigma_next):
    torch._check(x.dim() == 1 and y.dim() == 1, lambda: "x must have shape [m] and y shape [n]")
    return torch.empty((7,), dtype=torch.float64, device=x.device)


@torch.library.register_fake("lipfast::subspace_iteration")
def _subspace_iteration_fake(W, V0, k, max_iters, tol, right=None, left=None):
    torch._check(W.dim() == 2, lambda: f"W must have shape [m, n], got {tuple(W.shape)}")
    torch._check(V0.dim() == 2, lambda: f"V0 must have shape [n, p], got {tuple(V0.shape)}")
    m, n = W.shape
    p = V0.shape[1]
    torch._check(V0.shape[0] == n, lambda: f"V0.size(0) must equal W.size(1) = {n}")
    f64 = dict(dtype=torch.float64, device=W.device)
    # U, V and next are transposed views of row blocks ([p, m] row-major): the kernels keep blocks as rows.
    return (
        W.new_empty((p, m)).mT,
        torch.empty((p,), **f64),
        W.new_empty((p, n)).mT,
        torch.empty((p,), **f64),
        torch.empty((), dtype=torch.int64, device=W.device),
        W.new_empty((p, n)).mT,
        torch.empty((m, 0 if right is None else right.shape[1]), **f64),
        torch.empty((n, 0 if left is None else left.shape[1]), **f64),
    )


@torch.library.register_fake("lipfast::hessian_contract")
def _hessian_contract_fake(a, b, xnorm2, ynorm2, S, sigma_next):
    torch._check(a.dim() == 2, lambda: f"a must have shape [N, k], got {tuple(a.shape)}")
    torch._check(b.shape == a.shape, lambda: f"b must have a's shape {tuple(a.shape)}")
    N = a.shape[0]
    return tuple(torch.empty((N,), dtype=torch.float64, device=a.device) for _ in range(3))


@torch.library.register_fake("lipfast::persample_linear")
def _persample_linear_fake(X, D, U, S, V, sigma_next):
    torch._check(X.dim() in (2, 3), lambda: f"X must have shape [B, T, n] or [B, n], got {tuple(X.shape)}")
    torch._check(D.dim() == X.dim(), lambda: f"D must have shape [B, T, m] or [B, m] as X, got {tuple(D.shape)}")
    B = X.shape[0]
    return tuple(torch.empty((B,), dtype=torch.float64, device=X.device) for _ in range(4))


@torch.library.register_fake("lipfast::persample_linear.sums")
def _persample_linear_sums_fake(X, D, U, S, V, sigma_next):
    f64 = dict(dtype=torch.float64, device=X.device)
    return (*_persample_linear_fake(X, D, U, S, V, sigma_next), torch.empty((D.shape[-1],), **f64),
            torch.empty((X.shape[-1],), **f64))


def persample_linear_precond(X: Tensor, D: Tensor, P: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float):
    """Per-sample statistics of the preconditioned gradients ``E_i = P ⊙ G_i`` of a Linear layer (MATH.md §7),
    never forming ``G_i = D_iᵀ X_i``: two GEMMs with ``P``, ``Y = (X ⊙ v1) Pᵀ`` and ``Z = (D ⊙ u1) P``.

    Args:
        X: ``[B, T, n]`` layer inputs. D: ``[B, T, m]`` per-sample output-gradients (``[B, n]``, ``[B, m]``: T = 1).
        P: ``[m, n]`` elementwise preconditioner (X's dtype). U: ``[m, k]``, S: ``[k]``, V: ``[n, k]``.
        sigma_next: ``σ_{k+1}``, or ``0`` when the spectrum is exact.

    Returns:
        ``(proj, hess, hess_lo, hess_hi)`` ``[B]`` (``u1ᵀE_i v1`` and ``H[E_i, E_i]``) and ``Σ_i E_i v1 [m]``,
        ``Σ_i E_iᵀ u1 [n]``, all float64.
    """
    return torch.ops.lipfast.persample_linear_precond.default(_d(X), _d(D), _d(P), _d(U), _d(S), _d(V),
                                                              float(sigma_next))


def persample_conv2d_precond(x: Tensor, grad_out: Tensor, P: Tensor, U: Tensor, S: Tensor, V: Tensor,
                             sigma_next: float, kernel_size, stride, padding, dilation):
    """:func:`persample_linear_precond` for a Conv2d (groups=1, zero padding): ``x [B, C_in, H, W]``,
    ``grad_out [B, C_out, H', W']``, ``P [C_out, C_in·kh·kw]`` (the reshaped weight's shape), geometry as pairs.
    Never unfolds the input: one convolution with the filters ``P ⊙ v1ᵀ`` and, per kernel offset, a GEMM with
    that offset's ``[C_out, C_in]`` slice of ``P`` against the shifted input (extra memory: the size of
    ``grad_out`` plus twice ``[B, C_in, H', W']``). Same outputs as :func:`persample_linear_precond`."""
    return torch.ops.lipfast.persample_conv2d_precond.default(
        _d(x), _d(grad_out), _d(P), _d(U), _d(S), _d(V), float(sigma_next), list(kernel_size), list(stride),
        list(padding), list(dilation))


def _precond_fake(B, m, n, like):
    f64 = dict(dtype=torch.float64, device=like.device)
    return tuple(like.new_empty((B,), **f64) for _ in range(4)) + (like.new_empty((m,), **f64),
                                                                  like.new_empty((n,), **f64))


@torch.library.register_fake("lipfast::persample_linear_precond")
def _persample_linear_precond_fake(X, D, P, U, S, V, sigma_next):
    torch._check(X.dim() in (2, 3) and D.dim() == X.dim() and P.dim() == 2,
                 lambda: "persample_linear_precond: X, D [B, T, *] or [B, *], P [m, n]")
    return _precond_fake(X.shape[0], D.shape[-1], X.shape[-1], X)


@torch.library.register_fake("lipfast::persample_conv2d_precond")
def _persample_conv2d_precond_fake(x, grad_out, P, U, S, V, sigma_next, kernel_size, stride, padding, dilation):
    torch._check(x.dim() == 4 and grad_out.dim() == 4 and P.dim() == 2,
                 lambda: "persample_conv2d_precond: x, grad_out 4-d, P [C_out, C_in·kh·kw]")
    return _precond_fake(x.shape[0], P.shape[0], P.shape[1], x)
