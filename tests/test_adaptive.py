"""Issue 19: the three forces under Adam, AdamW, RMSprop and Adagrad with a frozen per-step preconditioner.

Ground truth: per-sample gradients from ``torch.func`` (vmap of grad), the full SVD, and P read from the
optimizer state *after* the step (the denominator the step divided by), with the definitions of MATH.md §7:

    drift         = ⟨J, ΔW⟩                                (the realised step; = first_order)
    diffusion_var = c² · Var̂_i[u1ᵀ(P ⊙ G_i)v1] / B · fpc
    ito           = c² / (2B(B−1)) · fpc · Σ_i H[P ⊙ (G_i − ḡ)]

The ops' parity with their twins and the dense definition is checked here too.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lipfast import LipfastWarning, Tracker, ops, reference

EXACT = dict(rank=8, gap_tol=1e-6, step_tol=1e6)
RTOL = 1e-6
FORCES = ("drift", "diffusion_var", "ito")


# ----------------------------------------------------------------------------------------------------
# Tiny float64 models: an MLP, a CNN (strided, padded, rectangular kernel) and a sequence Linear
# ----------------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 5, (3, 2), stride=(1, 2), padding=(0, 1)), nn.Tanh(),
                         nn.Flatten(), nn.Linear(30, 3)).double()


class SequenceNet(nn.Module):
    """A Linear on [B, T, n] inputs (leading dims folded into positions), mean over T, a Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


class SharedNet(nn.Module):
    """A Linear and a Conv2d each called twice in one forward (weight sharing: the calls' contributions to a
    sample's gradient add up, the multi-call route of the deferred reduction)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(8, 8)  # min(m, n) <= rank 8: exact spectra, as the ground truth
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(h)))))


class KindsNet(nn.Module):
    """The layer kinds beyond Linear and Conv2d that have preconditioned statistics: a grouped Conv2d (its record
    follows the top block) and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(6, 4, 3, stride=2)
        self.head = nn.Linear(4 * 12, 3)

    def forward(self, x):
        h = torch.tanh(self.grouped(x)).flatten(2)  # [B, 6, 25]
        return self.head(torch.tanh(self.conv1d(h)).flatten(1))


ARCHS = {"mlp": (mlp, (5,)), "cnn": (cnn, (2, 7, 7)), "seq": (lambda: SequenceNet().double(), (5, 4)),
         "shared": (lambda: SharedNet().double(), (2, 5, 5)), "kinds": (lambda: KindsNet().double(), (4, 5, 5))}


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = ARCHS[arch]
    return factory(), shape


def batch(shape, B: int):
    return torch.randn(B, *shape, dtype=torch.float64), torch.randint(0, 3, (B,))


def train_step(model, opt, x, y, reduction="mean"):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    opt.step()


def tracked_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def _frozen_block(module: nn.Module):
    """A function restricting ``[..., C_out, n]`` tensors (the reshaped weight, its per-sample gradients, P) to the
    block a grouped convolution's record follows: the group whose block of the weight has the largest σ1 now."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return lambda t: t
    rows = module.weight.shape[0] // groups
    j = int(torch.linalg.matrix_norm(module.weight.detach().reshape(groups, rows, -1), ord=2).argmax())
    return lambda t: t[..., j * rows:(j + 1) * rows, :]


def persample_grads(model, x, y, names):
    """``G_i`` [B, m, n] of every named layer (a Conv2d's weight reshaped to [C_out, C_in·kh·kw])."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g[f"{n}.weight"].reshape(x.shape[0], g[f"{n}.weight"].shape[1], -1) for n in names}


# ----------------------------------------------------------------------------------------------------
# The step's P and fresh coefficient c, read from the state after the step (independent of lipfast.optim)
# ----------------------------------------------------------------------------------------------------
def preconditioner_after(opt, p):
    """``(P, c)`` of the step just taken: P the elementwise 1/denominator it divided by, c the coefficient
    of P ⊙ ḡ in −ΔW (sign of ``maximize`` left out: the noise terms use c²; the drift is the realised step)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    st, lr = opt.state[p], group["lr"]
    if isinstance(opt, torch.optim.Adam):
        b1, b2 = group["betas"]
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        return 1 / (v.sqrt() / math.sqrt(1 - b2**t) + group["eps"]), lr * (1 - b1) / (1 - b1**t)
    if isinstance(opt, torch.optim.RMSprop):
        s = st["square_avg"] - (st["grad_avg"] ** 2 if group["centered"] else 0)
        return 1 / (s.sqrt() + group["eps"]), lr
    t = float(st["step"])
    return 1 / (st["sum"].sqrt() + group["eps"]), lr / (1 + (t - 1) * group["lr_decay"])


def expected(model, opt, x, y, names, reduction="mean", dataset_size=None):
    """Take the step; return ``{layer: {drift, diffusion_var, ito}}`` from the definitions."""
    B = x.shape[0]
    G = persample_grads(model, x, y, names)
    mods = dict(model.named_modules())
    blocks = {n: _frozen_block(mods[n]) for n in names}  # the block chosen before the step, as the tracker does
    G = {n: blocks[n](G[n]) for n in names}
    before = {n: blocks[n](mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1)).clone() for n in names}
    train_step(model, opt, x, y, reduction)
    fpc = 1.0 if dataset_size is None else (dataset_size - B) / (dataset_size - 1)
    out = {}
    for n in names:
        W = before[n]
        P, c = preconditioner_after(opt, mods[n].weight)
        P = blocks[n](P.reshape(P.shape[0], -1))
        c = c * (B if reduction == "sum" else 1.0)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        E = P * G[n]
        s = torch.einsum("m,bmn,n->b", U[:, 0], E, Vh[0])
        dW = blocks[n](mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1)) - W
        out[n] = dict(drift=float(U[:, 0] @ dW @ Vh[0]),
                      diffusion_var=c * c * float(s.var(unbiased=True)) / B * fpc,
                      ito=c * c / (2 * B * (B - 1)) * fpc * float(reference.hessian_form_dense(W, E - E.mean(0)).sum()))
    return out


def assert_forces(record, want):
    for f in FORCES:
        got, ref = record[f], want[f]
        assert math.isclose(got, ref, rel_tol=RTOL, abs_tol=1e-14), f"{record['layer']} {f}: {got!r} vs {ref!r}"


OPTIMIZERS = {
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam_wd": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad_wd": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05, betas=(0.8, 0.9))),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    "adam_maximize": (torch.optim.Adam, dict(lr=0.01, maximize=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.003)),
    "rmsprop_momentum_centered_wd": (torch.optim.RMSprop, dict(lr=0.003, momentum=0.9, centered=True,
                                                               weight_decay=0.05)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.03, lr_decay=0.1, weight_decay=0.05,
                                          initial_accumulator_value=0.1)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_forces_match_per_sample_ground_truth(arch, opt_name):
    model, shape = make(arch)
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    names = tracked_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LipfastWarning)  # a modelled optimizer warns of nothing
        tracker = Tracker(model, opt, **EXACT)
        for step in range(3):  # the first step (empty state) and two with moments and step counts
            x, y = batch(shape, 7)
            want = expected(model, opt, x, y, names)
            for r in (r for r in tracker.records if r["step"] == step):
                assert "sgd_equivalent" not in r["flag_names"]
                assert_forces(r, want[r["layer"]])
                # The known step and the fresh part together are the realised first order.
                assert math.isclose(r["drift"], r["first_order"], rel_tol=1e-9, abs_tol=1e-15)
    tracker.close()


def test_held_inputs_are_released_at_the_step():
    model, shape = make("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = Tracker(model, opt, **EXACT)
    x, y = batch(shape, 4)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    held = {name: cap.held for name, cap in tracker.captures.items()}
    # held until the step: one forward pass's calls (with the batch size then) per layer
    assert all(len(h) == 1 and h[0][0][0].x is not None for h in held.values())
    opt.step()
    assert all(not cap.held and not cap.groups for cap in tracker.captures.values())
    assert all(c.x is None and c.d is None for h in held.values() for c in h[0][0])
    tracker.close()


@pytest.mark.parametrize("implementation", ["compiled", "reference"])
def test_sum_reduction_and_dataset_size(implementation):
    model, shape = make("cnn", seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tracker = Tracker(model, opt, loss_reduction="sum", dataset_size=40, implementation=implementation, **EXACT)
    names = tracked_names(model)
    for step in range(2):
        x, y = batch(shape, 6)
        want = expected(model, opt, x, y, names, reduction="sum", dataset_size=40)
        for r in (r for r in tracker.records if r["step"] == step):
            assert_forces(r, want[r["layer"]])
    tracker.close()


def test_gradient_accumulation_holds_every_micro_batch():
    """Two micro-batches before one step: both are held until P is known, then reduced as one batch."""
    model, shape = make("mlp", seed=1)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=0.01)
    t1, t2 = Tracker(model, opt, **EXACT), Tracker(twin, opt_twin, **EXACT)
    for _ in range(2):
        x, y = batch(shape, 8)
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
        opt.step()
        train_step(twin, opt_twin, x, y)
    for a, b in zip(t1.records, t2.records):
        assert a["batch"] == b["batch"] == 8
        for f in FORCES:
            assert math.isclose(a[f], b[f], rel_tol=1e-9, abs_tol=1e-15), (a["layer"], f, a[f], b[f])
    t1.close(), t2.close()


@pytest.mark.parametrize("cls,kw", [(torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True)),
                                    (torch.optim.Adam, dict(weight_decay=0.1)),
                                    (torch.optim.RMSprop, dict(momentum=0.5, centered=True)),
                                    (torch.optim.Adagrad, dict(lr_decay=0.01))])
def test_foreach_and_fused_give_the_same_records(cls, kw):
    variants = [dict(foreach=False), dict(foreach=True)]
    if cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad):
        variants.append(dict(fused=True))
    runs = []
    for v in variants:
        model, shape = make("cnn", seed=2)
        opt = cls(model.parameters(), lr=0.01, **kw, **v)
        tracker = Tracker(model, opt, **EXACT)
        torch.manual_seed(5)
        for _ in range(3):
            train_step(model, opt, *batch(shape, 5))
        runs.append(tracker.records)
        tracker.close()
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for f in FORCES + ("first_order", "sigma"):
                assert math.isclose(a[f], b[f], rel_tol=1e-9, abs_tol=1e-15), (a["step"], a["layer"], f, a[f], b[f])


def _residuals(make_opt, lrs):
    out = {}
    for lr in lrs:
        model, shape = make("mlp", seed=4)
        opt = make_opt(model.parameters(), lr)
        torch.manual_seed(9)
        with Tracker(model, opt, rank=8, gap_tol=0.0, step_tol=math.inf) as tracker:
            train_step(model, opt, *batch(shape, 9))
        for r in tracker.records:
            out.setdefault(r["layer"], []).append(abs(r["delta_obs"] - r["delta_pred"]))
    return out


@pytest.mark.parametrize("cls,lr0", [(torch.optim.AdamW, 0.02), (torch.optim.RMSprop, 0.002)])
def test_one_step_identity_shrinks_cubically_in_lr(cls, lr0):
    """|delta_obs − delta_pred| shrinks as lr³ (RMSprop's first step is ~10× its lr: smaller rates)."""
    lrs = [lr0, lr0 / 2, lr0 / 4, lr0 / 8]
    log_lr = torch.tensor(lrs, dtype=torch.float64).log()
    for name, res in _residuals(lambda p, lr: cls(p, lr=lr), lrs).items():
        ys, xc = torch.tensor(res, dtype=torch.float64).log(), log_lr - log_lr.mean()
        slope = float((xc * (ys - ys.mean())).sum() / (xc * xc).sum())
        ratios = [a / b for a, b in zip(res[:-1], res[1:])]
        assert 2.5 <= slope <= 3.5 and all(r > 4 for r in ratios), f"{name}: slope {slope:.2f}, ratios {ratios}"


class Sign(torch.optim.Optimizer):
    """A user's own optimizer (signSGD): not modelled, reported as SGD-equivalent."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adamax(p, lr=0.01), lambda p: Sign(p, lr=0.01)],
                         ids=["Adamax", "Sign"])
def test_unsupported_optimizer_warns_once_naming_it(make_opt):
    model, shape = make("mlp")
    opt = make_opt(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(model, opt, **EXACT)
        for _ in range(3):
            train_step(model, opt, *batch(shape, 4))
        tracker.close()
    name = type(opt).__name__
    ours = [w for w in caught if issubclass(w.category, LipfastWarning) and "sgd_equivalent" in str(w.message)]
    assert len(ours) == 1 and name in str(ours[0].message)
    assert all("sgd_equivalent" in r["flag_names"].split(";") for r in tracker.records)


def test_adam_subclass_is_not_taken_for_adam():
    class MyAdam(torch.optim.Adam):
        pass
    model, shape = make("mlp")
    with pytest.warns(LipfastWarning, match="MyAdam"):
        Tracker(model, MyAdam(model.parameters(), lr=0.01), **EXACT).close()


# ----------------------------------------------------------------------------------------------------
# The ops against their twins and the dense definition
# ----------------------------------------------------------------------------------------------------
def _spectrum(m, n, k, dtype):
    U, S, Vh = torch.linalg.svd(torch.randn(m, n, dtype=torch.float64), full_matrices=False)
    sn = float(S[k]) if k < S.numel() else 0.0
    return U[:, :k].to(dtype), S[:k], Vh.mT[:, :k].to(dtype), sn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,m,n,k", [(0, 1, 3, 4, 2), (1, 1, 1, 1, 1), (7, 1, 13, 5, 3), (5, 4, 6, 9, 6),
                                       (33, 3, 64, 29, 8)])
def test_persample_linear_precond_matches_twin_and_dense(dtype, B, T, m, n, k):
    torch.manual_seed(B * 31 + T)
    X, D = torch.randn(B, T, n, dtype=dtype), torch.randn(B, T, m, dtype=dtype)
    P = torch.rand(m, n, dtype=dtype) + 0.1
    U, S, V, sn = _spectrum(m, n, k, dtype)
    got = ops.persample_linear_precond(X, D, P, U, S, V, sn)
    ref = reference.persample_linear_precond(X, D, P, U, S, V, sn)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, **tol)
    if B and dtype == torch.float64:
        E = P * torch.einsum("btm,btn->bmn", D, X)
        torch.testing.assert_close(got[0], torch.einsum("m,bmn,n->b", U[:, 0], E, V[:, 0]))
        if k == min(m, n):
            W = (U * S) @ V.mT
            torch.testing.assert_close(got[1], reference.hessian_form_dense(W, E))


_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T", [(0, 2), (1, 1), (6, 1), (5, 3)])
def test_persample_linear_precond_composite_matches_cpu_kernel(dtype, B, T):
    """The composite kernel (what CUDA runs) against the CPU kernel, on the CPU."""
    torch.manual_seed(7 + B)
    X, D, P = torch.randn(B, T, 9, dtype=dtype), torch.randn(B, T, 6, dtype=dtype), torch.rand(6, 9, dtype=dtype)
    U, S, V, sn = _spectrum(6, 9, 4, dtype)
    op = torch.ops.lipfast.persample_linear_precond.default
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(op.redispatch(_COMPOSITE, X, D, P, U, S, V, sn), op(X, D, P, U, S, V, sn)):
        torch.testing.assert_close(a, b, **tol)


def test_persample_linear_precond_takes_noncontiguous_inputs():
    X, D = torch.randn(4, 3, 10, dtype=torch.float64)[..., ::2], torch.randn(3, 4, 6, dtype=torch.float64).transpose(0, 1)
    P = torch.rand(5, 6, dtype=torch.float64).mT
    U, S, V, sn = _spectrum(6, 5, 3, torch.float64)
    for a, b in zip(ops.persample_linear_precond(X, D, P, U, S, V, sn),
                    reference.persample_linear_precond(X, D, P, U, S, V, sn)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 2), (1, 2), (0, 1), (2, 1))])
def test_persample_conv2d_precond_matches_twin(geometry):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 9, 8, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, geometry[0], stride=geometry[1], padding=geometry[2], dilation=geometry[3]).double()
    d = torch.randn_like(conv(x))
    n = 3 * geometry[0][0] * geometry[0][1]
    P = torch.rand(4, n, dtype=torch.float64)
    U, S, V, sn = _spectrum(4, n, 3, torch.float64)
    for a, b in zip(ops.persample_conv2d_precond(x, d, P, U, S, V, sn, *geometry),
                    reference.persample_conv2d_precond(x, d, P, U, S, V, sn, *geometry)):
        torch.testing.assert_close(a, b)


def test_precond_ops_pass_opcheck():
    X, D = torch.randn(3, 2, 5), torch.randn(3, 2, 4)
    U, S, V, sn = _spectrum(4, 5, 2, torch.float32)
    torch.library.opcheck(torch.ops.lipfast.persample_linear_precond.default, (X, D, torch.rand(4, 5), U, S, V, sn))
    x, d = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)
    U, S, V, sn = _spectrum(4, 18, 2, torch.float32)
    torch.library.opcheck(torch.ops.lipfast.persample_conv2d_precond.default,
                          (x, d, torch.rand(4, 18), U, S, V, sn, [3, 3], [1, 1], [1, 1], [1, 1]))


def test_precond_ops_name_the_bad_argument():
    X, D = torch.randn(3, 2, 5), torch.randn(3, 2, 4)
    U, S, V, sn = _spectrum(4, 5, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"persample_linear_precond: P must have the weight's shape \[m, n\] = \[4, 5\]"):
        ops.persample_linear_precond(X, D, torch.rand(5, 4), U, S, V, sn)
    with pytest.raises(RuntimeError, match=r"P must have X's dtype"):
        ops.persample_linear_precond(X, D, torch.rand(4, 5, dtype=torch.float64), U, S, V, sn)
    x, d = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)
    U, S, V, sn = _spectrum(4, 18, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"persample_conv2d_precond: P must have the reshaped weight's shape"):
        ops.persample_conv2d_precond(x, d, torch.rand(4, 17), U, S, V, sn, (3, 3), (1, 1), (1, 1), (1, 1))


def test_a_kind_without_preconditioned_statistics_is_flagged_not_silently_wrong():
    """An Embedding (and a tied Parameter) under AdamW: SGD's terms, every record flagged sgd_equivalent and one
    warning naming the layer; the Linear beside it is modelled exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6), nn.Flatten(), nn.Linear(18, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.warns(LipfastWarning, match=r"layer '0' \(embedding\) has no preconditioned statistics under AdamW"):
        with Tracker(model, opt, **EXACT) as tracker:
            for _ in range(2):
                ids, y = torch.randint(0, 12, (5, 3)), torch.randint(0, 3, (5,))
                train_step(model, opt, ids, y)
    by_layer = {}
    for r in tracker.records:
        by_layer.setdefault(r["layer"], []).append(r)
    assert all("sgd_equivalent" in r["flag_names"].split(";") for r in by_layer["0"])
    assert all("sgd_equivalent" not in r["flag_names"] for r in by_layer["2"])
