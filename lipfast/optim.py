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
Other optimizers (Adam, RMSprop, ...) precondition the gradient; lipfast then reports the terms as if
the step were plain SGD with the group's learning rate (``c = η``, no decay or momentum part), while
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


def find_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def step_coefficients(optimizer: torch.optim.Optimizer, param: Tensor) -> StepCoefficients:
    """Coefficients of the coming step for ``param`` (call before ``optimizer.step()`` runs)."""
    group = find_group(optimizer, param)
    lr = float(group["lr"])
    if not isinstance(optimizer, torch.optim.SGD):
        return StepCoefficients(lr=lr, fresh=lr, decay=0.0, known=None, exact=False)
    mu = float(group.get("momentum", 0.0))
    damp = float(group.get("dampening", 0.0))
    nesterov = bool(group.get("nesterov", False))
    wd = float(group.get("weight_decay", 0.0))
    sign = -1.0 if group.get("maximize", False) else 1.0
    buf = optimizer.state.get(param, {}).get("momentum_buffer") if mu != 0 else None
    known, scale = (buf.detach(), 0.0) if buf is not None else (None, 0.0)
    if mu == 0:
        c = lr
    elif buf is None:
        c = lr * (1 + mu) if nesterov else lr
    elif nesterov:
        c, scale = lr * (1 + mu * (1 - damp)), -lr * mu * mu
    else:
        c, scale = lr * (1 - damp), -lr * mu
    return StepCoefficients(lr=lr, fresh=sign * c, decay=c * wd, known=known, exact=True, known_scale=scale)
