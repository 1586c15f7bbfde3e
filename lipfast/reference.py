"""Pure-PyTorch twins of every compiled op and of the functional layer, written to be obviously right.

Tests, benchmarks and the reference tracker call these. Two kinds live here:
- the same algorithm in plain torch ops (``subspace_iteration``, ``hessian_contract``,
  ``persample_linear``): the compiled ops must match them to rounding;
- dense, materialising definitions (``hessian_form_dense``, ``persample_dense``,
  ``persample_conv2d_unfold``): slow, memory-hungry, and the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import block_size, tracked_pairs


def subspace_iteration(W: Tensor, V0: Tensor, k: int, max_iters: int, tol: float, right: Tensor | None = None,
                       left: Tensor | None = None):
    """Twin of ``lipfast::subspace_iteration`` with Householder QR for the orthonormalisation."""
    m, n = W.shape
    right = W.new_empty(n, 0) if right is None else right.to(W.dtype)
    left = W.new_empty(m, 0) if left is None else left.to(W.dtype)
    W_right, Wt_left = (W @ right).to(torch.float64), (W.mT @ left).to(torch.float64)
    V = torch.linalg.qr(V0)[0]
    it = 0  # Householder QR where the compiled op uses Cholesky QR in float64: same span, same Ritz pairs
    while True:
        it += 1
        Y = W @ V
        Yd = Y.to(torch.float64)
        theta, Q = torch.linalg.eigh(Yd.mT @ Yd)
        theta, Q = theta.flip(0).clamp_min(0), Q.flip(1)
        S = theta.sqrt()
        inv = torch.where(S > 0, 1 / S, torch.zeros_like(S))
        V = V @ Q.to(W.dtype)
        U = ((Yd @ Q) * inv).to(W.dtype)
        Z = W.mT @ U
        res = (Z.to(torch.float64) - V.to(torch.float64) * S).norm(dim=0)
        if it >= max_iters or (tol > 0 and float(res[:k].max()) <= tol * float(S[0])):
            return U, S, V, res, torch.tensor(it), Z, W_right, Wt_left
        V = torch.linalg.qr(Z)[0]


def hessian_contract(a: Tensor, b: Tensor, xnorm2: Tensor, ynorm2: Tensor, S: Tensor, sigma_next: float):
    """Twin of ``lipfast::hessian_contract`` (MATH.md §1), vectorised over N, float64."""
    a, b, xnorm2, ynorm2, S = (t.to(torch.float64) for t in (a, b, xnorm2, ynorm2, S))
    s1 = S[0]
    sj = S[1:]
    core = ((s1 * (a[:, 1:] ** 2 + b[:, 1:] ** 2) + 2 * sj * a[:, 1:] * b[:, 1:]) / (s1**2 - sj**2)).sum(-1)
    rest = (xnorm2 + ynorm2 - (a**2).sum(-1) - (b**2).sum(-1)).clamp_min(0)
    value, lo, hi = core + rest / s1, core + rest / (s1 + sigma_next), core + rest / (s1 - sigma_next)
    bad = not (float(s1) > 0) or (S.numel() > 1 and not float(S[1]) < float(s1)) or not sigma_next < float(s1)
    if bad:
        value, lo, hi = (torch.full_like(t, float("nan")) for t in (value, lo, hi))
    return value, lo, hi


def persample_linear(X: Tensor, D: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, sums: bool = False):
    """Twin of ``lipfast::persample_linear``: X [B,T,n], D [B,T,m] -> proj, hess, hess_lo, hess_hi [B]
    (and with ``sums`` ``Σ_i G_i v1 [m]``, ``Σ_i G_iᵀ u1 [n]``, the ``.sums`` overload). X [B, n], D [B, m]: T = 1."""
    X, D, U, V = (t.to(torch.float64) for t in (X, D, U, V))
    if X.dim() == 2:
        X, D = X.unsqueeze(1), D.unsqueeze(1)
    XV = X @ V                                    # [B, T, k]
    DU = D @ U                                    # [B, T, k]
    x = torch.einsum("btm,bt->bm", D, XV[..., 0])  # G_i v1
    y = torch.einsum("btn,bt->bn", X, DU[..., 0])  # G_iᵀ u1
    a = x @ U
    b = y @ V
    hess = hessian_contract(a, b, (x * x).sum(-1), (y * y).sum(-1), S, sigma_next)
    return (a[:, 0], *hess, x.sum(0), y.sum(0)) if sums else (a[:, 0], *hess)


def persample_linear_precond(X: Tensor, D: Tensor, P: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float):
    """Twin of ``lipfast::persample_linear_precond`` (MATH.md §7): the statistics of ``E_i = P ⊙ G_i`` from
    ``Y = (X ⊙ v1) Pᵀ`` and ``Z = (D ⊙ u1) P``, then ``x_i = Σ_t D_it ⊙ Y_it``, ``y_i = Σ_t X_it ⊙ Z_it``."""
    X, D, P, U, V = (t.to(torch.float64) for t in (X, D, P, U, V))
    if X.dim() == 2:  # [B, n]: T = 1
        X, D = X.unsqueeze(1), D.unsqueeze(1)
    Y = (X * V[:, 0]) @ P.mT                      # [B, T, m]
    Z = (D * U[:, 0]) @ P                         # [B, T, n]
    x = (D * Y).sum(1)                            # E_i v1
    y = (X * Z).sum(1)                            # E_iᵀ u1
    a, b = x @ U, y @ V
    hess = hessian_contract(a, b, (x * x).sum(-1), (y * y).sum(-1), S, sigma_next)
    return (a[:, 0], *hess, x.sum(0), y.sum(0))


def persample_conv2d_precond(x: Tensor, grad_out: Tensor, P: Tensor, U: Tensor, S: Tensor, V: Tensor,
                             sigma_next: float, kernel_size, stride, padding, dilation):
    """Twin of ``lipfast::persample_conv2d_precond``: the Linear twin on the unfolded input."""
    B = x.shape[0]
    cols = F.unfold(x.to(torch.float64), kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, n, T]
    D = grad_out.to(torch.float64).reshape(B, grad_out.shape[1], -1)                                       # [B, m, T]
    return persample_linear_precond(cols.mT, D.mT, P, U, S, V, sigma_next)


def spectrum_exact(W: Tensor, k: int):
    """LAPACK truncated SVD in float64: ``(U [m,k], S [k], V [n,k], sigma_next)``."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    r = S.numel()
    sigma_next = float(S[k]) if k < r else 0.0
    return U[:, :k], S[:k], Vh.mT[:, :k], sigma_next


def hessian_form_dense(W: Tensor, E: Tensor) -> Tensor:
    """``H[E,E]`` from the full SVD, term by term as MATH.md §1 writes it (float64). E [m,n] or [N,m,n]."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=True)
    m, n = W.shape
    r = min(m, n)
    E3 = E.to(torch.float64).reshape(-1, m, n)
    out = []
    for Ei in E3:
        x = Ei @ Vh[0]
        y = Ei.mT @ U[:, 0]
        a = U.mT @ x          # all m left vectors
        b = Vh @ y            # all n right vectors
        h = 0.0
        for j in range(1, r):
            h = h + (S[0] * (a[j] ** 2 + b[j] ** 2) + 2 * S[j] * a[j] * b[j]) / (S[0] ** 2 - S[j] ** 2)
        h = h + ((x @ x) - (a[:r] ** 2).sum() + (y @ y) - (b[:r] ** 2).sum()) / S[0]
        out.append(h)
    res = torch.stack([torch.as_tensor(h, dtype=torch.float64) for h in out])
    return res[0] if E.dim() == 2 else res


def persample_dense(W: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """From materialised per-sample gradients ``G [B, m, n]``: ``(proj [B], hess [B])`` exactly."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    G = G.to(torch.float64)
    proj = torch.einsum("m,bmn,n->b", U[:, 0], G, Vh[0])
    return proj, hessian_form_dense(W, G)


def persample_conv2d_unfold(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float,
                            kernel_size, stride=1, padding=0, dilation=1):
    """Conv2d per-sample statistics through the materialised unfold (the memory-hungry route)."""
    B = x.shape[0]
    cols = F.unfold(x.to(torch.float64), kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, K, T]
    D = grad_out.to(torch.float64).reshape(B, grad_out.shape[1], -1)                                       # [B, m, T]
    return persample_linear(cols.mT, D.mT, U, S, V, sigma_next)


def conv2d_projections(x: Tensor, grad_out: Tensor, u1: Tensor, v1: Tensor, kernel_size, stride, padding, dilation):
    """Twin of ``lipfast::conv2d_projections``: ``X_iᵀv1`` is a convolution with v1 as the filter, and
    ``G_iᵀu1`` a correlation of each sample's input with its own map ``D_iᵀu1``, which one grouped
    convolution does for the whole batch (samples as groups, channels as the batch: stride and dilation
    swap roles)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, C = x.shape[:2]
    m, (Ho, Wo) = grad_out.shape[1], grad_out.shape[2:]
    if B == 0:  # no groups to convolve
        return x.new_zeros((0, m), dtype=torch.float64), x.new_zeros((0, C * kh * kw), dtype=torch.float64)
    g = grad_out.reshape(B, m, Ho * Wo)
    xv = F.conv2d(x, v1.to(x.dtype).reshape(1, C, kh, kw), stride=(sh, sw), padding=(ph, pw),
                  dilation=(dh, dw)).reshape(B, Ho * Wo)
    du = (u1.to(x.dtype) @ g).reshape(B, 1, Ho, Wo)
    Gv1 = (g @ xv.unsqueeze(2)).squeeze(2)
    xp = F.pad(x.transpose(0, 1), (pw, pw, ph, ph))
    yc = F.conv2d(xp, du, stride=(dh, dw), dilation=(sh, sw), groups=B)[:, :, :kh, :kw]
    return Gv1.to(torch.float64), yc.permute(1, 0, 2, 3).reshape(B, C * kh * kw).to(torch.float64)


def persample_conv2d(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, kernel_size,
                     stride, padding, dilation):
    """Twin of ``lipfast::persample_conv2d``: the projections' twin, contracted by the contraction's twin."""
    xv, yv = conv2d_projections(x, grad_out, U[:, 0], V[:, 0], kernel_size, stride, padding, dilation)
    a, b = xv @ U.to(torch.float64), yv @ V.to(torch.float64)
    hess = hessian_contract(a, b, (xv * xv).sum(-1), (yv * yv).sum(-1), S, sigma_next)
    return (a[:, 0], *hess, xv.sum(0), yv.sum(0))


def _hessian_of_direction(x: Tensor, y: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float) -> Tensor:
    U64, V64 = U.to(torch.float64), V.to(torch.float64)
    value, lo, hi = hessian_contract((x @ U64)[None], (y @ V64)[None], (x @ x)[None], (y @ y)[None], S, sigma_next)
    return torch.cat([value, lo, hi])


def gradient_statistics(proj, hess, hess_lo, hess_hi, G, U, S, V, sigma_next: float, scale: float,
                        loss_factor: float, Gv1: Tensor | None = None, Gtu1: Tensor | None = None,
                        known: Tensor | None = None, known_scale: float = 0.0) -> Tensor:
    """Twin of ``lipfast::gradient_statistics`` (see lipfast/ops.py for the layout of the result)."""
    G = G if G.dim() == 2 else G.reshape(G.shape[0], -1)
    u1, v1 = U[:, 0].to(G.dtype), V[:, 0].to(G.dtype)
    x = (G @ v1 if Gv1 is None else Gv1).to(torch.float64) / loss_factor
    y = (G.mT @ u1 if Gtu1 is None else Gtu1).to(torch.float64) / loss_factor
    K = U[:, 0].to(torch.float64) @ x
    hg = _hessian_of_direction(x, y, U, S, V, sigma_next)
    s = proj.to(torch.float64) * scale - K
    sums = torch.stack([s.sum(), (s * s).sum()] + [t.to(torch.float64).sum() * scale**2 for t in (hess, hess_lo, hess_hi)])
    finite = torch.isfinite(torch.cat([x, y, sums])).all().to(torch.float64)
    n = torch.tensor([float(proj.shape[0])], dtype=torch.float64, device=G.device)
    if known is None:
        kn = torch.zeros(1, dtype=torch.float64, device=G.device)
    else:
        M = known.reshape(known.shape[0], -1)
        kn = (known_scale * (U[:, 0].to(torch.float64) @ (M @ V[:, 0].to(M.dtype)).to(torch.float64)))[None]
    return torch.cat([n, sums, K[None], hg, finite[None], kn])


def update_statistics(x: Tensor, y: Tensor, U, S, V, sigma_next: float) -> Tensor:
    """Twin of ``lipfast::update_statistics``: x = ΔW v1 [m], y = ΔWᵀ u1 [n]."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    first = U[:, 0].to(torch.float64) @ x
    second = 0.5 * _hessian_of_direction(x, y, U, S, V, sigma_next)
    finite = torch.isfinite(torch.cat([x, y])).all().to(torch.float64)
    return torch.cat([first[None], second, finite[None], x.norm()[None], y.norm()[None]])


def hessian_tail(W: Tensor, x: Tensor, y: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float,
                 max_iters: int = 32, tol: float = 1e-3, atol: float = 0.0) -> Tensor:
    """Twin of ``lipfast::hessian_tail``: conjugate gradients on ``σ1 I − [[0, W], [Wᵀ, 0]]`` off the known pairs."""
    U64, V64, s1 = U.to(torch.float64), V.to(torch.float64), float(S[0])

    def project(z1, z2):
        return z1 - U64 @ (U64.mT @ z1), z2 - V64 @ (V64.mT @ z2)

    def apply(p1, p2):
        return project(s1 * p1 - (W @ p2.to(W.dtype)).double(), s1 * p2 - (W.mT @ p1.to(W.dtype)).double())

    r1, r2 = project(x.double(), y.double())
    p1, p2 = r1.clone(), r2.clone()
    rr = float(r1 @ r1 + r2 @ r2)
    mass, inv_hi, inv_lo = rr, 1.0 / (s1 - sigma_next), 1.0 / (s1 + sigma_next)
    T, steps = 0.0, 0

    def meets_tol():
        return rr * (inv_hi - inv_lo) <= max(tol * (T + rr * inv_lo), atol)

    broke = False
    if s1 > sigma_next and not meets_tol():
        for _ in range(max_iters):
            q1, q2 = apply(p1, p2)
            pq = float(p1 @ q1 + p2 @ q2)
            if not pq > 0:
                broke = True
                break
            alpha = rr / pq
            T += alpha * rr
            r1, r2 = r1 - alpha * q1, r2 - alpha * q2
            rr_new = float(r1 @ r1 + r2 @ r2)
            beta, rr = rr_new / rr, rr_new
            steps += 1
            if meets_tol():
                break
            p1, p2 = r1 + beta * p1, r2 + beta * p2
    # Intersected with the truncation bracket, which holds the tail at W before the step whatever the step;
    # a breakdown or an empty intersection gives the truncation estimate back (csrc/math.h, tail_result).
    truncated = [mass / s1, mass * inv_lo, mass * inv_hi, 0, mass]
    out = truncated
    if not broke and s1 > sigma_next:
        lo, hi = max(T + rr * inv_lo, truncated[1]), min(T + rr * inv_hi, truncated[2])
        if lo <= hi:
            out = [min(max(T + rr / s1, lo), hi), lo, hi, steps, mass]
    return torch.tensor(out, dtype=torch.float64, device=W.device)


CLUSTER_TAU = 4.0  # csrc/op_interfaces.h's kClusterTau


def cluster_statistics(W_VC: Tensor, Wt_UC: Tensor, basis: Tensor, Wt_u1: Tensor, exact: bool, U: Tensor, S: Tensor,
                       V: Tensor, sigma_next: float) -> Tensor:
    """Twin of track_update's cluster expansion (csrc/op_interfaces.h): ``[μ − σ1, ½H value, lo, hi,
    max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂), σ_c − σ_{c+1}]`` from the probes ``W' V_C``, ``W'ᵀ U_C`` (float64) after the step."""
    c, k = W_VC.shape[1], U.shape[1]
    U64, V64, S64 = U.to(torch.float64), V.to(torch.float64), S.to(torch.float64)
    UC, VC = U64[:, :c], V64[:, :c]
    DV = W_VC - UC * S64[:c]
    WtU = V64[:, 1:c] * S64[1:c] if exact else basis[:, 1:c].to(torch.float64)
    DU = Wt_UC - torch.cat([Wt_u1.to(torch.float64)[:, None], WtU], 1)
    M = torch.diag(S64[:c]) + UC.mT @ DV
    evals, evecs = torch.linalg.eigh(M.mT @ M)
    b, mu = evecs[:, -1], evals[-1].clamp_min(0).sqrt()
    a = M @ b / mu
    x, y = DV @ b, DU @ a
    x, y = x - UC @ (UC.mT @ x), y - VC @ (VC.mT @ y)
    Uo, Vo = torch.cat([U64[:, :1], U64[:, c:]], 1), torch.cat([V64[:, :1], V64[:, c:]], 1)
    upd = update_statistics(x, y, Uo, torch.cat([S64[:1], S64[c:]]), Vo, sigma_next)
    step = torch.maximum(torch.linalg.eigvalsh(DV.mT @ DV)[-1], torch.linalg.eigvalsh(DU.mT @ DU)[-1]).clamp_min(0).sqrt()
    below = S64[c] if c < k else S64.new_tensor(sigma_next)
    return torch.cat([(mu - S64[0]).reshape(1), upd[1:4], step.reshape(1), (S64[c - 1] - below).reshape(1)])


def track_update(W: Tensor, basis: Tensor, U: Tensor, S: Tensor, V: Tensor, sigma_next: float, Wt_u1: Tensor,
                 max_iters: int, tol: float, exact: bool, cluster: int = 1, solve_tail: bool = True):
    """Twin of ``lipfast::track_update``: the new spectrum and the step's update statistics."""
    m, n = W.shape
    k, r = U.shape[1], min(m, n)
    c = min(max(int(cluster), 1), k)
    v1, u1 = V[:, :c].to(W.dtype), U[:, :c].to(W.dtype)
    if exact:
        tall = m >= n
        A = W if tall else W.mT
        Ua, Sa, Va, res, it, _, A_right, At_left = subspace_iteration(
            A, torch.eye(r, dtype=W.dtype, device=W.device), r, 1, 0.0, v1 if tall else u1, u1 if tall else v1)
        kk = min(k, r)
        Uf, Vf = (Ua, Va) if tall else (Va, Ua)
        W_v1, Wt_u1_new_probe = (A_right, At_left) if tall else (At_left, A_right)
        sigma_next_new = Sa.new_zeros(()) if k >= r else Sa[kk].clone()
        basis_new = Vf[:, : block_size(kk, r)].clone()
        Wt_u1_new = Sa[0] * Vf[:, 0].to(torch.float64)
        Un, Sn, Vn, res = Uf[:, :kk], Sa[:kk], Vf[:, :kk], res[:kk]
    else:
        Ui, Si, Vi, resi, it, nexti, W_v1, Wt_u1_new_probe = subspace_iteration(
            W, basis.to(W.dtype), tracked_pairs(k), max_iters, tol, v1, u1)
        kk = k
        sigma_next_new = torch.minimum(Si[k] + resi[k], Si[k - 1])
        basis_new, Wt_u1_new = nexti, nexti[:, 0].to(torch.float64).clone()
        Un, Sn, Vn, res = Ui[:, :k], Si[:k], Vi[:, :k], resi[:k]
    S64 = S.to(torch.float64)
    x = W_v1[:, 0] - U[:, 0].to(torch.float64) * S64[0]
    y = Wt_u1_new_probe[:, 0] - Wt_u1.to(torch.float64)
    upd = update_statistics(x, y, U, S64, V, sigma_next)
    if c > 1:
        cs = cluster_statistics(W_v1, Wt_u1_new_probe, basis, Wt_u1, exact, U, S64, V, sigma_next)
        upd = torch.cat([cs[:4], upd[4:]])
        step_gap = cs[4:6]
    else:
        if solve_tail:
            # the kernels' kTailMaxSteps, kTailTol and tail_atol (csrc/math.h)
            tail = hessian_tail(W, x, y, U, S64, V, sigma_next, 32, 1e-3,
                                2e-3 * (abs(float(upd[0])) + abs(float(upd[1]))))
            s1, mass = float(S64[0]), tail[4]
            truncated = torch.stack([mass / s1, mass / (s1 + sigma_next), mass / (s1 - sigma_next)])
            upd = torch.cat([upd[:1], upd[1:4] + 0.5 * (tail[:3] - truncated), upd[4:]])
        below = S64[1] if k > 1 else S64.new_tensor(sigma_next)
        step_gap = torch.stack([torch.maximum(upd[5], upd[6]), S64[0] - below])
    s2 = Sn[1] if kk > 1 else sigma_next_new
    overlap = torch.stack(((U[:, :c].to(torch.float64).mT @ Un[:, 0].to(torch.float64)).norm(),
                           (V[:, :c].to(torch.float64).mT @ Vn[:, 0].to(torch.float64)).norm()))
    r12 = res[:2].to(torch.float64) if kk > 1 else res[:1].to(torch.float64).repeat(2)
    Sn64 = Sn.to(torch.float64)
    c_next = (Sn64[0] - Sn64 <= torch.maximum(upd[5], upd[6]) * CLUSTER_TAU).sum().to(torch.float64).clamp_min(1)
    counts = torch.stack([Sn64.new_tensor(float(c)), c_next])
    stats = torch.cat([upd, Sn[:1], s2.reshape(1), sigma_next_new.reshape(1), res.max().reshape(1),
                       torch.as_tensor(it, dtype=torch.float64, device=Sn.device).reshape(1), overlap, r12, step_gap,
                       counts])
    return Un, Sn, Vn, sigma_next_new, res, basis_new, Wt_u1_new, stats
