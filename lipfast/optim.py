"""How an optimizer's step uses the fresh mini-batch gradient: the coefficients the SDE terms need.

For ``torch.optim.SGD`` (PyTorch's update, ``g = ±∇L_B + λW``, buffer ``b``):

- plain SGD:        ``ΔW = −η g``                         → fresh coefficient ``c = η``
- heavy ball:       ``b ← μ b + (1−τ) g``, ``ΔW = −η b``   → ``c = η(1−τ)``, known part ``−ημ b_prev``
- Nesterov:         ``ΔW = −η (g + μ b_new)``              → ``c = η(1 + μ(1−τ))``, known part ``−ημ² b_prev``
- first momentum step (PyTorch sets ``b = g``, no dampening): ``c = η`` heavy ball, ``η(1+μ)`` Nesterov.

So, with ``J = u1 v1ᵀ``, ``ḡ`` the mini-batch mean of per-sample gradients and ``s`` the loss scale
(1 for ``mean``, B for ``sum``): the first-order expected change given the state is

    drift = −c·s·⟨J, ḡ⟩  −  c·λ·σ  +  ⟨J, known part⟩

and the noise enters with coefficient ``c·s``, so diffusion and Itô terms scale with ``(c·s)²``
(MATH.md §3). The known (momentum) part is deterministic given the past, so it belongs to the drift.
Adam, AdamW (± amsgrad), RMSprop (± momentum, ± centered) and Adagrad precondition the gradient
elementwise (MATH.md §7). With the step's preconditioner P frozen (the denominator this very step divides
by, formed here from the optimizer state before the step and ``p.grad``, exactly as the step will form it),
the step is linear in the fresh gradient:

    ΔW = known − sign·(Peff ⊙ ḡ) − η_d·λ·W

with ``Peff = η·c̃·P`` (``precond``; η·c̃ is folded into it so that a capturable optimizer's device-side step
count never has to reach the host), ``known`` the momentum part (and Adam's/RMSprop's/Adagrad's coupled
decay λ·Peff⊙W), and η_d·λ AdamW's decoupled decay:

- Adam/AdamW: ``P = 1/(√(v_t/(1−β₂ᵗ)) + ε)`` (``v_t`` → ``max(v̂_{t−1}, v_t)`` under amsgrad),
  ``c̃ = (1−β₁)/(1−β₁ᵗ)``, known ``−η·β₁/(1−β₁ᵗ)·m_{t−1} ⊙ P``;
- RMSprop: ``P = 1/(√(s_t − [centered] ḡa_t²) + ε)``, ``c̃ = 1``, known ``−η·μ·b_{t−1}`` with momentum μ;
- Adagrad: ``P = 1/(√(Σ_t) + ε)``, η → ``η/(1 + (t−1)·lr_decay)``, ``c̃ = 1``, no momentum.

Other optimizers (Adamax, NAdam, Lion, Adafactor, a user's own, a subclass of the above that may change
the step) are reported as if the step were plain SGD with the group's learning rate (``c = η``, no decay or
momentum part, ``exact=False``: the records are flagged ``sgd_equivalent``), while
``first_order``/``second_order``/``delta_pred`` always use the update actually applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepCoefficients:
    lr: float
    fresh: float          # c: coefficient of the fresh loss gradient in −ΔW (sign included: maximize flips it)
    decay: float          # c·λ: coefficient of W in −ΔW
    known: Tensor | None  # the momentum buffer whose multiple known_scale·buffer is the deterministic part of ΔW
    exact: bool           # False for optimizers lipfast models as plain SGD
    known_scale: float = 0.0  # (kept apart so that only the buffer's projection, not a scaled copy, is formed)
    # Adaptive optimizers: Peff = η·c̃·P (param's shape); the fresh part of −ΔW is fresh·Peff⊙ḡ.
    precond: Tensor | None = None


ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


def is_modelled(optimizer: torch.optim.Optimizer) -> bool:
    """Whether lipfast models ``optimizer``'s step exactly (SGD and its subclasses, the adaptive optimizers by
    exact class: a subclass may change the step)."""
    return isinstance(optimizer, torch.optim.SGD) or type(optimizer) in ADAPTIVE


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step divides by a gradient-dependent preconditioner lipfast models (the per-sample
    reduction must then wait for the step: P needs the whole mini-batch gradient)."""
    return type(optimizer) in ADAPTIVE


def find_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def sgd_equivalent(lr: float) -> StepCoefficients:
    """The terms of a plain SGD step with learning rate ``lr``: what a step lipfast does not model is reported
    as (the records are flagged ``sgd_equivalent``)."""
    return StepCoefficients(lr=lr, fresh=lr, decay=0.0, known=None, exact=False)


def step_coefficients(optimizer: torch.optim.Optimizer, param: Tensor) -> StepCoefficients:
    """Coefficients of the coming step for ``param`` (call before ``optimizer.step()`` runs)."""
    group = find_group(optimizer, param)
    lr = float(group["lr"])
    if is_adaptive(optimizer):
        return _adaptive_coefficients(optimizer, group, param, lr)
    if not isinstance(optimizer, torch.optim.SGD):
        return sgd_equivalent(lr)
    mu = float(group.get("momentum", 0.0))
    damp = float(group.get("dampening", 0.0))
    nesterov = bool(group.get("nesterov", False))
    wd = float(group.get("weight_decay", 0.0))
    sign = -1.0 if group.get("maximize", False) else 1.0
    buf = optimizer.state.get(param, {}).get("momentum_buffer") if mu != 0 else None
    known, scale = (buf.detach() if buf.requires_grad else buf, 0.0) if buf is not None else (None, 0.0)
    if mu == 0:
        c = lr
    elif buf is None:
        c = lr * (1 + mu) if nesterov else lr
    elif nesterov:
        c, scale = lr * (1 + mu * (1 - damp)), -lr * mu * mu
    else:
        c, scale = lr * (1 - damp), -lr * mu
    return StepCoefficients(lr=lr, fresh=sign * c, decay=c * wd, known=known, exact=True, known_scale=scale)


def _step_count(state: dict, key: str = "step"):
    """The coming step's count ``t``: a device tensor for a capturable optimizer (no host sync), else a float."""
    step = state.get(key)
    if step is None:
        return 1.0
    if isinstance(step, Tensor) and step.device.type != "cpu":
        return step + 1
    # (a CPU tensor's tolist reads its value without a dispatched op, as float() would)
    return float(step.tolist() if isinstance(step, Tensor) else step) + 1


def _value(x):
    """A group hyperparameter as torch's step uses it (a CPU tensor becomes a float; a device tensor stays)."""
    return float(x) if isinstance(x, Tensor) and x.device.type == "cpu" else x


def _adaptive_coefficients(optimizer, group: dict, param: Tensor, lr: float) -> StepCoefficients:
    """``precond``/``known``/``decay`` of the coming step of Adam, AdamW, RMSprop or Adagrad (module docs),
    from the state before the step and ``param.grad``, as torch's step will form them."""
    grad = param.grad
    if grad is None:
        return StepCoefficients(lr=lr, fresh=1.0, decay=0.0, known=None, exact=True)
    with torch.no_grad():
        g = grad.detach() if grad.requires_grad else grad
        state = optimizer.state.get(param, {})
        sign = -1.0 if group.get("maximize", False) else 1.0
        wd = float(group.get("weight_decay", 0.0))
        decoupled = isinstance(optimizer, torch.optim.Adam) and bool(group.get("decoupled_weight_decay", False))
        W = param.detach() if wd != 0 and not decoupled else None  # (read only by a coupled decay)
        g = -g if sign < 0 else g
        if wd != 0 and not decoupled:  # coupled decay: λW joins the gradient before the moments see it
            g = g.add(W, alpha=wd)
        known_scale = 1.0
        if isinstance(optimizer, torch.optim.Adam):
            peff, known, known_scale = _adam(group, state, g, _value(group["lr"]))
        elif isinstance(optimizer, torch.optim.RMSprop):
            peff, known = _rmsprop(group, state, g, _value(group["lr"]))
        else:
            peff, known = _adagrad(group, state, g, _value(group["lr"]))
        if wd != 0 and not decoupled:  # the coupled decay's share of the fresh term: known given W
            known = -wd * peff * W if known is None else known * known_scale - wd * peff * W
            known_scale = 1.0
        decay = lr * wd if decoupled else 0.0
    return StepCoefficients(lr=lr, fresh=sign, decay=decay, known=known, exact=True, known_scale=known_scale,
                            precond=peff)


def _adam(group: dict, state: dict, g: Tensor, lr):
    beta1, beta2 = (_value(b) for b in group["betas"])
    t = _step_count(state)
    exp_avg_sq = state.get("exp_avg_sq")
    v = (g * g * (1 - beta2) if exp_avg_sq is None
         else exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2))
    if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    # In place on v, a temporary: the pre-step hook's peak holds few weight-sized tensors at a time.
    P = v.sqrt_().div_(bc2 ** 0.5).add_(group["eps"]).reciprocal_()
    m = state.get("exp_avg")
    # known = scale·(m ⊙ P): the scale rides to the op as a number (one weight-sized op less), unless the step
    # count is a device tensor (a capturable optimizer), whose value the host must not read.
    scale = -(lr * beta1 / bc1)
    if isinstance(scale, Tensor):
        known, scale = (m * P * scale if m is not None else None), 1.0
    else:
        known = m * P if m is not None else None
    return P.mul_(lr * (1 - beta1) / bc1), known, scale


def _rmsprop(group: dict, state: dict, g: Tensor, lr):
    alpha = group["alpha"]
    sq = state.get("square_avg")
    s = g * g * (1 - alpha) if sq is None else sq.mul(alpha).addcmul_(g, g, value=1 - alpha)
    if group.get("centered", False):
        ga = state.get("grad_avg")
        ga = g * (1 - alpha) if ga is None else ga.lerp(g, 1 - alpha)
        s = s.addcmul(ga, ga, value=-1)
    P = s.sqrt_().add_(group["eps"]).reciprocal_()
    mu = group.get("momentum", 0.0)
    buf = state.get("momentum_buffer")
    known = -(lr * mu) * buf if mu > 0 and buf is not None else None
    return P.mul_(lr), known


def _adagrad(group: dict, state: dict, g: Tensor, lr):
    t = _step_count(state)
    clr = lr / (1 + (t - 1) * group["lr_decay"])
    acc = state.get("sum")
    acc = g * g + group["initial_accumulator_value"] if acc is None else acc.addcmul(g, g)
    return acc.sqrt_().add_(group["eps"]).reciprocal_().mul_(clr), None
