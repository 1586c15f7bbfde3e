"""One adapter per layer kind: how its calls are captured, which per-sample op computes its statistics, and
how its weight is read as the matrix ``W [m, n]`` whose σ1 lipfast tracks. :data:`ADAPTERS` is the one table
the tracker consults; adding a module kind means one class here and one line in the table. MultiheadAttention
is the one structural kind: a module holding four maps (:func:`attention_adapters`), whose calls are
``F.linear`` calls inside its forward (:class:`lipfast.instrument.LayerCapture` listens to them).

Every adapter sees a layer call as ``x`` (its input) and ``d`` (the gradient of its output), both already laid
out with the sample dimension first (:class:`lipfast.instrument.LayerCapture` moves it there). It gives

- ``matrix(t)``: ``t`` (the weight, its gradient or an optimizer buffer, shaped like the Parameter) as ``[m, n]``;
- ``stats(impl, spec, calls, dtype)``: ``(proj, hess, hess_lo, hess_hi [B], Σ_i G_i v1 [m], Σ_i G_iᵀ u1 [n])``;
- ``projections(impl, spec, calls, dtype)``: ``(G_i v1 [B, m], G_iᵀ u1 [B, n])`` float64, which add up over the
  uses of a Parameter shared by several layers (tied weights) before they are contracted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import Spectrum, contract_projections, conv2d_projections

__all__ = ["ADAPTERS", "Adapter", "AttentionAdapter", "Conv2dAdapter", "EmbeddingAdapter", "HFConv1DAdapter",
           "LinearAdapter", "adapter_for", "attention_adapters", "conv_geometry", "is_hf_conv1d", "unsupported_reason"]


def _bare(t: Tensor) -> Tensor:
    """``t`` cut from autograd; a tensor outside any graph (a gradient, an optimizer buffer) as it is (a
    ``detach`` is a dispatched op: the tracked step calls this several times per layer)."""
    return t.detach() if t.requires_grad else t


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (skipping the dispatch of a no-op ``.to`` on the hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _contract(impl, spec: Spectrum, xvec: Tensor, yvec: Tensor) -> tuple:
    """The statistics from summed projections (the tracker applies its own gap tolerances: no NaN mask)."""
    ps = contract_projections(spec, xvec, yvec, impl, mask=False)
    return ps.proj, ps.hess, ps.hess_lo, ps.hess_hi, xvec.sum(0), yvec.sum(0)


def cat_stats(parts):
    """Per-sample statistics of several sample sets, one after the other; their gradient products add
    (None when one part has none: the tracker then reads the gradient)."""
    per_sample = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
    if any(p[4] is None for p in parts):
        return per_sample + (None, None)
    return per_sample + tuple(sum((p[i] for p in parts[1:]), parts[0][i]) for i in (4, 5))


class Adapter:
    """A layer kind. One instance per tracked matrix and use (a tied Parameter has one per module)."""

    kind = ""
    batched_dims = 2  # an input with fewer dims is one unbatched sample

    def __init__(self, module: nn.Module, weight: nn.Parameter | None = None) -> None:
        self.module = module
        self.weight: nn.Parameter = module.weight if weight is None else weight
        self.m, self.n = self.matrix(self.weight).shape
        self.group = -1  # grouped convolutions: the block the matrix is (-1: the whole weight)
        self.rival = 0.0  # grouped convolutions: the largest σ1 of the other blocks
        self._weight_matrix: tuple | None = None

    # ``matrix(t)`` is ``t``'s rows, ``t.reshape(t.shape[0], -1)`` (Linear, Conv2d with groups=1, Embedding):
    # the ops that take a weight-shaped tensor read it so themselves, and the tracker hands it over unviewed.
    as_rows = True

    def matrix(self, t: Tensor) -> Tensor:
        t = _bare(t)
        return t if t.dim() == 2 else t.reshape(t.shape[0], -1)

    def weight_matrix(self) -> Tensor:
        """``matrix(weight)``, made once and reused while the Parameter keeps its storage, layout and the
        part the matrix is: a view of the weight follows its values (and shares its version counter), so the
        tracked step makes none (two dispatched ops, a ``detach`` and a ``view``, per layer and step)."""
        w = self.weight
        key = (w.data_ptr(), w.dtype, w.device, w.shape, w.stride(), w.storage_offset(), self.group)
        if self._weight_matrix is None or self._weight_matrix[0] != key:
            self._weight_matrix = (key, self.matrix(w))
        return self._weight_matrix[1]

    def samples(self, x: Tensor) -> int:
        """The samples of a call's input (sample dimension first; fewer dims than a batch: one sample)."""
        return x.shape[0] if x.dim() >= self.batched_dims else 1

    def overtaken(self, sigma_next: float) -> bool:
        """Whether another part of the weight has a larger σ1 than the matrix's after the step (grouped
        convolutions: another block took the top, a level crossing of the whole weight)."""
        return False

    def select(self) -> bool:
        """Re-choose which part of the weight the matrix is (grouped convolutions); True when it changed."""
        return False

    def after_step(self) -> Tensor | None:
        """What the record and the next step's :meth:`select` need of the weight just stepped, left on the device
        (read back with the step's records, never inside the step): None for most kinds."""
        return None

    def read_after_step(self, values: list[float] | None) -> None:
        """:meth:`after_step`'s values, read back with the step's records (None: those records are built)."""

    def orientation(self) -> str:
        """How ``matrix`` reads the Parameter: the uses of a tied Parameter must agree."""
        return "rows"

    def stats(self, impl, spec: Spectrum, calls: list, dtype) -> tuple:
        return _contract(impl, spec, *self.projections(impl, spec, calls, dtype))

    def projections(self, impl, spec: Spectrum, calls: list, dtype) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # Under an adaptive optimizer (MATH.md §7): the statistics of P ⊙ G_i with P [m, n] in ``matrix``'s layout.
    # A kind without them is tracked with SGD's terms and its records flagged sgd_equivalent.
    supports_precond = False

    def precond_stats(self, impl, spec: Spectrum, calls: list, dtype, P: Tensor) -> tuple:
        raise NotImplementedError(f"lipfast: no preconditioned statistics for layer kind '{self.kind}'")


# -- linear maps on [B, ..., n] inputs ---------------------------------------------------------------------------
class LinearAdapter(Adapter):
    """``nn.Linear`` (and subclasses): ``W = weight [out, in]``; a call's input ``[B, *, in]``, every position a
    row of ``X_i``, so ``G_i = D_iᵀ X_i`` (MATH.md §4)."""

    kind = "linear"

    def _rows(self, calls, dtype):
        xs, ds = [], []
        for c in calls:
            if c.x.dim() == 1:  # an unbatched call: one sample
                xs.append(c.x.reshape(1, 1, -1))
                ds.append(c.d.reshape(1, 1, -1))
            elif c.x.dim() == 2 and len(calls) == 1:  # [B, n]: the ops read it as [B, 1, n] (no view here)
                xs.append(c.x)
                ds.append(c.d)
            elif c.x.dim() == 3:
                xs.append(c.x)
                ds.append(c.d)
            else:
                xs.append(c.x.reshape(c.x.shape[0], -1, self.n))
                ds.append(c.d.reshape(c.d.shape[0], -1, self.m))
        # One call (the usual case) needs no concatenation: cat would copy the batch's activations.
        X = _as(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1), dtype)
        D = _as(ds[0] if len(ds) == 1 else torch.cat(ds, dim=1), dtype)
        return X, D

    def stats(self, impl, spec, calls, dtype):
        B = self.samples(calls[0].x)
        if any(self.samples(c.x) != B for c in calls):  # calls on different sample sets: each its own samples
            return cat_stats([self.stats(impl, spec, [c], dtype) for c in calls])
        X, D = self._rows(calls, dtype)
        # With the statistics, Σ_i G_i v1 = Dᵀ(X v1) and Σ_i G_iᵀ u1 = Xᵀ(D u1): the gradient's two products from
        # the rows of X and D (B·T rows, where G has m), so the step needs no pass over the gradient itself.
        U, V = _as(spec.U, dtype), _as(spec.V, dtype)
        return impl.persample_linear(X, D, U, spec.S, V, spec.host[2], sums=True)

    supports_precond = True

    def precond_stats(self, impl, spec, calls, dtype, P):
        B = self.samples(calls[0].x)
        if any(self.samples(c.x) != B for c in calls):  # calls on different sample sets
            return cat_stats([self.precond_stats(impl, spec, [c], dtype, P) for c in calls])
        X, D = self._rows(calls, dtype)  # several calls on the same samples: positions joined, contributions add
        return impl.persample_linear_precond(X, D, P, _as(spec.U, dtype), spec.S, _as(spec.V, dtype), spec.host[2])

    def projections(self, impl, spec, calls, dtype):
        X, D = (t if t.dim() == 3 else t.unsqueeze(1) for t in self._rows(calls, torch.float64))
        xv = X @ spec.V64[:, 0]  # [B, T]
        du = D @ spec.U64[:, 0]
        return torch.einsum("bt,btm->bm", xv, D), torch.einsum("bt,btn->bn", du, X)


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear maps), known by class and module name so that
    transformers is never imported for the test."""
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)


class HFConv1DAdapter(LinearAdapter):
    """HF ``Conv1D``: a linear map whose weight is stored ``[in, out]``; ``W = weightᵀ``."""

    kind = "hf_conv1d"

    as_rows = False

    def matrix(self, t):
        return _bare(t).t()

    def orientation(self):
        return "columns"


# -- convolutions --------------------------------------------------------------------------------------------------
def conv_geometry(module: nn.Module) -> tuple | None:
    """``(kernel, stride, padding, dilation)`` pairs of a Conv2d (or a Conv1d as a conv2d of unit height)
    lipfast supports, else None."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(module.kernel_size)
        else:  # "same": symmetric only when every dilation·(kernel−1) is even
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    geometry = tuple(module.kernel_size), tuple(module.stride), tuple(padding), tuple(module.dilation)
    if isinstance(module, nn.Conv1d):  # a unit height: kernel 1, stride 1, no padding, dilation 1
        geometry = tuple((first, g[0]) for first, g in zip((1, 1, 0, 1), geometry))
    return geometry


class Conv2dAdapter(Adapter):
    """``nn.Conv2d`` and ``nn.Conv1d`` (as a conv2d of unit height), zero padding. ``groups=1``:
    ``W = weight.reshape(C_out, C_in·k)``. Grouped and depthwise: ``W`` is block-diagonal, one block
    ``[C_out/g, C_in/g·k]`` per group, so σ1 is the largest block σ1 and, the gradients being block-diagonal too,
    the forces on it are those of that block alone (MATH.md §1's Hessian form has no term across blocks). The
    matrix is that top block (``group``), chosen again whenever the weight changed; the per-sample projections
    run on the group's channels only, never on a zero-padded dense matrix."""

    def __init__(self, module, weight=None):
        self.groups = module.groups
        self.kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        self.batched_dims = 3 if self.kind == "conv1d" else 4
        self.geometry = conv_geometry(module)
        self.group = 0 if self.groups > 1 else -1
        super().__init__(module, weight)
        self.group = 0 if self.groups > 1 else -1
        self._version = None

    @property
    def as_rows(self):
        return self.groups == 1

    def matrix(self, t):
        W = _bare(t).reshape(t.shape[0], -1)
        if self.groups == 1:
            return W
        rows = W.shape[0] // self.groups
        return W[self.group * rows:(self.group + 1) * rows]

    def _block_sigmas(self) -> Tensor:
        W = self.weight.detach()
        blocks = W.reshape(self.groups, W.shape[0] // self.groups, -1).double()
        return blocks.norm(dim=(1, 2)) if min(blocks.shape[1:]) == 1 else torch.linalg.matrix_norm(blocks, ord=2)

    # Every block's σ1 after a tracked step, measured on the device (after_step) and read back with the step's
    # records: the record's crossing test and the next step's block choice read them instead of the device,
    # so that a steady-state tracked step makes no host read for them. Kept with the weight version they are of.
    _after: tuple[int, list[float] | None] | None = None
    _recording: list[float] | None = None  # the block σ1s the record being built reads (overtaken)

    def after_step(self):
        if self.groups == 1:
            return None
        self._after = (self.weight._version, None)
        return self._block_sigmas()

    def read_after_step(self, values):
        if values is None:
            self._recording = None
        elif self._after is not None:
            self._after = (self._after[0], list(values))
            self._recording = list(values)

    def _host_block_sigmas(self) -> list[float] | None:
        """The block σ1s of the weight as it is now, when the last step's read-back holds them."""
        if self._after is None or self._after[1] is None or self._after[0] != self.weight._version:
            return None
        return self._after[1]

    def overtaken(self, sigma_next):
        if self.groups == 1:
            return False
        # While the step's record is built, its weight's block σ1s as read back with it (the weight itself may
        # have moved on since); otherwise the weight as it is now.
        sig = list(self._recording) if self._recording is not None else self._block_sigmas().tolist()
        sig[self.group] = 0.0
        return max(sig) > sigma_next

    def select(self):
        if self.groups == 1 or self.weight._version == self._version:
            return False
        self._version = self.weight._version
        host = self._host_block_sigmas()
        sig = host if host is not None else self._block_sigmas().tolist()
        if not all(math.isfinite(s) for s in sig):  # NaN/Inf weights: keep the block (the tracker flags them)
            return False
        # The largest (the first of equals, as topk on the device picked it) and the runner-up.
        top = max(range(len(sig)), key=lambda j: (sig[j], -j))
        old, self.group = self.group, top
        self.rival = max(s for j, s in enumerate(sig) if j != top)
        return old != self.group

    def _slices(self, c, dtype):
        x, d = c.x, c.d
        if x.dim() == self.batched_dims - 1:  # an unbatched call: one sample
            x, d = x.unsqueeze(0), d.unsqueeze(0)
        if self.kind == "conv1d":  # [B, C, L] as [B, C, 1, L]
            x, d = x.unsqueeze(2), d.unsqueeze(2)
        if self.groups > 1:
            cin, cout = x.shape[1] // self.groups, d.shape[1] // self.groups
            j = self.group
            x, d = x[:, j * cin:(j + 1) * cin], d[:, j * cout:(j + 1) * cout]
        return _as(x, dtype), _as(d, dtype)

    def stats(self, impl, spec, calls, dtype):
        B = self.samples(calls[0].x)
        if any(self.samples(c.x) != B for c in calls[1:]):
            return cat_stats([self.stats(impl, spec, [c], dtype) for c in calls])
        if len(calls) == 1:  # the usual case: projections and contraction in one op
            x, d = self._slices(calls[0], dtype)
            return impl.persample_conv2d(x, d, _as(spec.U, dtype), spec.S, _as(spec.V, dtype), spec.host[2],
                                         *self.geometry)
        # A layer called several times on the same samples: the projections add up before the contraction.
        return super().stats(impl, spec, calls, dtype)

    supports_precond = True

    def precond_stats(self, impl, spec, calls, dtype, P):
        B = self.samples(calls[0].x)
        if any(self.samples(c.x) != B for c in calls[1:]):
            return cat_stats([self.precond_stats(impl, spec, [c], dtype, P) for c in calls])
        U, V = _as(spec.U, dtype), _as(spec.V, dtype)
        if len(calls) == 1:  # the op never unfolds the input
            x, d = self._slices(calls[0], dtype)
            return impl.persample_conv2d_precond(x, d, P, U, spec.S, V, spec.host[2], *self.geometry)
        # Several calls on the same samples: their contributions to each G_i add up before the contraction, here
        # through the unfolded input (kh·kw times its memory, for this rare case only).
        k, stride, pad, dil = self.geometry
        xs, ds = [], []
        for c in calls:
            x, d = self._slices(c, dtype)
            xs.append(torch.nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=stride).mT)
            ds.append(d.reshape(d.shape[0], d.shape[1], -1).mT)
        return impl.persample_linear_precond(torch.cat(xs, 1), torch.cat(ds, 1), P, U, spec.S, V, spec.host[2])

    def projections(self, impl, spec, calls, dtype):
        xvec = yvec = None
        for c in calls:
            x, d = self._slices(c, dtype)
            xv, yv = conv2d_projections(spec, x, d, *self.geometry, impl=impl)
            xvec = xv if xvec is None else xvec + xv
            yvec = yv if yvec is None else yvec + yv
        return xvec, yvec


# -- embeddings ----------------------------------------------------------------------------------------------------
class EmbeddingAdapter(Adapter):
    """``nn.Embedding``: the linear map from one-hot tokens, ``W = weight [num_embeddings, dim]`` as stored (σ1
    and the forces do not change under transposition; stored this way it is the same matrix as a tied output
    Linear's). Sample i's gradient has one row per distinct token, ``G_i = Σ_t e_{tok_t} d_tᵀ``; its products
    with the top pair are ``G_i v1 = scatter(tok, d·v1) [B, V]`` and ``G_iᵀ u1 = Σ_t u1[tok_t] d_t [B, dim]``:
    no ``[B, V, dim]`` tensor."""

    kind = "embedding"
    batched_dims = 1  # a 1-D input is a batch of single tokens

    def projections(self, impl, spec, calls, dtype):
        xvec = yvec = None
        for c in calls:
            tok = c.x.reshape(c.x.shape[0], -1)
            D = c.d.reshape(tok.shape[0], tok.shape[1], self.n).double()
            if self.module.padding_idx is not None:  # autograd gives the padding row no gradient
                D = D * (tok != self.module.padding_idx).unsqueeze(-1)
            xv = torch.zeros(tok.shape[0], self.m, dtype=torch.float64, device=D.device)
            xv.scatter_add_(1, tok, D @ spec.V64[:, 0])
            yv = torch.einsum("bt,btd->bd", spec.U64[:, 0][tok], D)
            xvec = xv if xvec is None else xvec + xv
            yvec = yv if yvec is None else yvec + yv
        return xvec, yvec


# -- attention -----------------------------------------------------------------------------------------------------
class AttentionAdapter(LinearAdapter):
    """One linear map inside ``nn.MultiheadAttention``: q, k or v (rows of the packed ``in_proj_weight``, or the
    separate ``q/k/v_proj_weight``) or ``out_proj``. MultiheadAttention calls ``F.linear`` on these weights, so
    the capture listens to those calls during the module's forward (:mod:`lipfast.instrument`); inside it every
    input is laid out ``[L, B, E]`` whatever ``batch_first`` is (``out_proj``'s ``[L·B, E]``, row ``l·B + b``)."""

    kind = "attention"

    def __init__(self, mha: nn.MultiheadAttention, weight: nn.Parameter, rows: tuple[int, int] | None):
        self.rows = rows  # (first, end) rows of ``weight`` that form the matrix; None: all
        super().__init__(mha, weight)

    @property
    def as_rows(self):
        return self.rows is None

    def matrix(self, t):
        t = _bare(t)
        return t if self.rows is None else t[self.rows[0]:self.rows[1]]

    def orientation(self):
        return f"rows{self.rows}"


# -- the table -------------------------------------------------------------------------------------------------
def _conv_reason(module) -> str | None:
    name = type(module).__name__
    if module.padding_mode != "zeros":
        return f"{name} with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if conv_geometry(module) is None:
        return f"{name} with asymmetric padding='same' (even kernel extent)"
    return None


def _embedding_reason(module) -> str | None:
    if module.max_norm is not None:
        return "Embedding with max_norm (its forward rewrites the weight in place)"
    if module.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq (the gradient scale couples the samples of a batch)"
    if module.sparse:
        return "Embedding with sparse=True (sparse gradients)"
    return None


# (predicate, adapter class, why a module it matches cannot be tracked or None). Order matters: the first
# predicate that matches decides.
ADAPTERS: list[tuple] = [
    (lambda m: isinstance(m, nn.Linear), LinearAdapter, lambda m: None),
    (lambda m: isinstance(m, (nn.Conv2d, nn.Conv1d)), Conv2dAdapter, _conv_reason),
    (is_hf_conv1d, HFConv1DAdapter, lambda m: None),
    (lambda m: isinstance(m, nn.Embedding), EmbeddingAdapter, _embedding_reason),
]
SUPPORTED = "Linear, Conv1d, Conv2d, Embedding, MultiheadAttention, HF Conv1D"


def adapter_for(module: nn.Module) -> tuple[type | None, str | None]:
    """``(adapter class, None)`` for a module with a weight lipfast tracks, else ``(None, why not)``."""
    for matches, cls, reason in ADAPTERS:
        if matches(module):
            why = reason(module)
            return (None, why) if why else (cls, None)
    return None, f"{type(module).__name__} is not a supported layer type ({SUPPORTED})"


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with a weight cannot be tracked, or None when it can."""
    return adapter_for(module)[1]


def attention_adapters(name: str, mha: nn.MultiheadAttention) -> list[tuple[str, Adapter]]:
    """The maps of a MultiheadAttention, named ``<module>.q/.k/.v`` and ``<module>.out_proj``."""
    E = mha.embed_dim
    if mha.in_proj_weight is not None:
        parts = [(f"{name}.{p}", AttentionAdapter(mha, mha.in_proj_weight, (i * E, (i + 1) * E)))
                 for i, p in enumerate("qkv")]
    else:
        parts = [(f"{name}.{p}", AttentionAdapter(mha, getattr(mha, f"{p}_proj_weight"), None)) for p in "qkv"]
    out = f"{name}.out_proj" if name else "out_proj"
    return parts + [(out, AttentionAdapter(mha, mha.out_proj.weight, None))]
