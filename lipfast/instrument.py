"""Capture of layer inputs and output-gradients with forward hooks and tensor hooks.

Per forward call of a tracked layer the input is kept (autograd keeps it for the weight gradient
anyway) and a hook on the output tensor receives the output-gradient during backward. As soon as every
call of one forward pass has its gradient, the per-sample statistics are computed and both tensors are
dropped: what survives until ``optimizer.step()`` is four float64 numbers per sample. Under an adaptive
optimizer (Adam, AdamW, RMSprop, Adagrad: ``LayerCapture.defer``) the statistics need the step's
preconditioner P, which depends on the whole mini-batch gradient: the completed groups' inputs and
output-gradients are held until the pre-step hook reduces them with P (about one more copy of the tracked
layers' activations, plus their output-gradients, for every micro-batch of the step; MATH.md §7).

Sample grouping: dim 0 of a layer's input is the sample dimension. Calls of a layer inside one forward
pass of the root model act on the same samples (a layer called twice, weight sharing): their
contributions to each per-sample gradient add up. Calls from different forward passes (gradient
accumulation) bring new samples.

What is held when. Beyond what autograd keeps at the same moment, only the tensors of a layer called several
times in one forward pass, from its backward until that of its first call:

- Plain autograd: a call's input from its forward until its group completes (autograd saves the same storage
  for the weight gradient until the layer's backward); an output-gradient from its arrival until then (at once
  for a layer called once per forward pass, inside the hook).
- Non-reentrant activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``): inside a
  segment autograd saves through the checkpoint's saved-tensor hooks, which keep a placeholder and recompute
  the segment during backward. The capture saves its input the same way: :class:`Call` holds the placeholder,
  and unpacks it when the output-gradient arrives, in backward, where the checkpoint hands over the recomputed
  input that autograd holds then too. The recomputation runs the layer's forward again inside backward; that
  call only re-saves the input into the checkpoint's slot (the same saves in the same order as the forward's),
  it is no new call.
- Other saved-tensor hooks (``torch.autograd.graph.save_on_cpu``): what the pack hook returned, as autograd.
- Reentrant checkpointing (``use_reentrant=True``): nothing in the forward, which runs under ``no_grad``; the
  recomputation in backward is an ordinary forward with grad, whose own backward follows at once, and is
  captured as one (held as in plain autograd). A layer whose calls of one forward pass it splits is refused
  (:meth:`LayerCapture._refuse_split`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .functional import Spectrum, conv2d_projections, contract_projections

# ``_saved_tensors_hooks(False)``: the saved-tensor hooks autograd applies right now, (pack, unpack) or None. A
# private function; where a torch lacks it, a checkpointed segment's inputs are held from the forward on.
_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda *_: None)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


COMPILE_ADVICE = "Attach the tracker to the uncompiled model (train it eagerly while tracking)."


def _raise_compiled(where: str) -> None:
    raise RuntimeError(
        f"lipfast: {where} ran under torch.compile while a Tracker is attached; expected an eager forward "
        "(lipfast's hooks cannot run inside a compiled graph: Dynamo would recompile them every step). "
        f"{COMPILE_ADVICE} To compile the model, tracker.close() first.")


_refuse_compiled = None  # _raise_compiled, made opaque to Dynamo by prepare_compile_refusal


def refuse_compiled(where: str) -> None:
    """Raise :func:`_raise_compiled`'s error from inside a compiled region. A plain ``raise`` there never reaches
    the user: Dynamo takes it for a graph break and runs the frame eagerly, where ``is_compiling()`` is False and
    the hook goes on. A function Dynamo must not trace runs eagerly mid-frame, and its exception propagates."""
    _refuse_compiled(where)


def prepare_compile_refusal() -> None:
    """Make :func:`refuse_compiled` work, once, at attach (outside any compiled region; it needs Dynamo, which
    the tracker's attach-time check has imported already)."""
    global _refuse_compiled
    if _refuse_compiled is None:
        try:  # under torch.compile(fullgraph=True), Dynamo's own error shows the reason
            _refuse_compiled = torch.compiler.disable(_raise_compiled, reason="a lipfast Tracker is attached. "
                                                      + COMPILE_ADVICE)
        except TypeError:  # a torch without disable(reason=...)
            _refuse_compiled = torch.compiler.disable(_raise_compiled)


try:  # torch.func transforms wrap tensors; a tensor hook on such an output would misfire.
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
except ImportError:  # pragma: no cover - older torch
    def _is_functorch_wrapped(t: Tensor) -> bool:
        return False


class Hook:
    """A hook callable that ``copy.deepcopy`` turns into a no-op: a deep copy of a tracked model (a
    best-model snapshot, an EMA copy) is an untracked model, not a second tracker of copied objects."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo) -> "Hook":
        return Hook(_noop)


def _noop(*args, **kwargs) -> None:
    return None


@dataclass
class Call:
    """One forward call of a layer: its input, and the output-gradient once backward reaches it. Inside a
    non-reentrant checkpoint the input is not held: ``saved`` is (unpack, what the checkpoint's pack hook
    returned), unpacked into ``x`` when the gradient arrives."""

    x: Tensor | None
    d: Tensor | None = None
    saved: tuple | None = None


@dataclass
class ForwardGroup:
    """The calls of one layer within one forward pass of the root model (the same samples)."""

    calls: list[Call] = field(default_factory=list)

    def complete(self) -> bool:
        return all(c.d is not None for c in self.calls)


def conv_geometry(module: nn.Conv2d) -> tuple | None:
    """``(kernel, stride, padding, dilation)`` pairs of a Conv2d lipfast supports, else None."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": symmetric only when every dilation·(kernel−1) is even
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    return tuple(module.kernel_size), tuple(module.stride), tuple(padding), tuple(module.dilation)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with a weight cannot be tracked, or None when it can."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if conv_geometry(module) is None:
            return "Conv2d with asymmetric padding='same' (even kernel extent)"
        return None
    return f"{type(module).__name__} is not a supported layer type (Linear, Conv2d)"


class LayerCapture:
    """Hooks and per-step buffers of one tracked layer."""

    def __init__(self, name: str, module: nn.Module, owner) -> None:
        self.name = name
        self.module = module
        self.kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        self.geometry = conv_geometry(module) if self.kind == "conv2d" else None
        self.weight: nn.Parameter = module.weight
        self.m = self.weight.shape[0]
        self.n = self.weight[0].numel()
        self.owner = owner
        self.groups: dict[int, ForwardGroup] = {}
        self.reduced: set[int] = set()  # forward ids whose group was reduced since the last step (_refuse_split)
        # per micro-batch: proj, hess, hess_lo, hess_hi [B] and Σ_i G_i v1 [m], Σ_i G_iᵀ u1 [n] (or None)
        self.stats: list[tuple] = []
        # Adaptive optimizers (MATH.md §7): the statistics need the step's preconditioner P, known only at the
        # step, so complete groups are held (inputs and output-gradients) until flush(precond) instead of reduced.
        self.defer = False
        self.held: list[list[Call]] = []
        self.dropped_calls = 0
        self.handle = None
        self.hook(True)

    def hook(self, on: bool) -> None:
        """Attach or detach the forward hook (the tracker detaches it over steps it does not track)."""
        if on and self.handle is None:
            self.handle = self.module.register_forward_hook(Hook(self._on_forward))
        elif not on and self.handle is not None:
            self.handle.remove()
            self.handle = None

    # -- hooks -------------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args, output) -> None:
        if torch.compiler.is_compiling():
            refuse_compiled(f"the forward of layer '{self.name}'")
        owner = self.owner
        if not owner.capturing or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad or _is_functorch_wrapped(output):
            return
        if not args or not isinstance(args[0], Tensor):
            return
        x = args[0].detach()
        hooks = _saved_tensors_hooks(False)
        if hooks is None:  # the usual case: autograd saves x for the weight gradient; holding it costs nothing
            if owner.forward_id in self.reduced and in_backward():
                self._refuse_split()
            call = Call(x=x)
        elif in_backward():
            # A non-reentrant checkpoint recomputing this segment: the call was captured in the forward; save x
            # into the checkpoint's slot for it (the same order of saves as then), unpacked by _on_grad.
            hooks[0](x)
            return
        else:  # saved-tensor hooks (a checkpoint, save_on_cpu): keep x only as autograd keeps its saved tensors
            call = Call(x=None, saved=(hooks[1], hooks[0](x)))
        self.groups.setdefault(owner.forward_id, ForwardGroup()).calls.append(call)
        output.register_hook(functools.partial(self._on_grad, owner.forward_id, call))

    def _on_grad(self, forward_id: int, call: Call, grad: Tensor) -> None:
        group = self.groups.get(forward_id)
        if group is None:  # reduced already (a second backward through a retained graph) or dropped
            return
        call.d = grad.detach()
        if call.saved is not None:  # unpacked inside backward, where a checkpoint hands over its recomputation
            unpack, packed = call.saved
            call.x, call.saved = unpack(packed), None
        if group.complete():
            del self.groups[forward_id]
            self.reduced.add(forward_id)
            if self.defer:
                self.held.append(group.calls)
            else:
                self._reduce(group.calls)

    def _refuse_split(self) -> None:
        """A forward with grad inside backward and no saved-tensor hooks is a reentrant checkpoint's recomputation.
        Reaching a forward pass whose group this layer has reduced already, it would count the calls as new
        samples: right for another forward pass run before the same backward, wrong for a layer shared with
        another checkpoint or the rest of the model (their contributions to each sample's gradient add up)."""
        raise RuntimeError(
            f"lipfast: layer '{self.name}' is called in a reentrant activation checkpoint (use_reentrant=True) for "
            "a forward pass whose other calls of it are already reduced; expected a layer's calls of one forward pass "
            "inside one reentrant checkpoint. A reentrant checkpoint's forward runs without grad, so the tracker meets "
            "those calls only as backward recomputes them and cannot tell the same samples (a layer shared across "
            "checkpoints) from new ones (several forward passes before one backward). Use "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), which the tracker supports in full.")

    # -- statistics --------------------------------------------------------------------------
    def flush(self, precond: Tensor | None = None) -> None:
        """Before the step: finish groups whose calls got only part of their gradients (an output
        unused by the loss has zero gradient) and drop forward passes that had no backward. With ``defer``,
        reduce the held groups too, with the step's preconditioner ``precond`` [m, n] (None: no gradient,
        nothing to reduce)."""
        held, self.held = self.held, []
        for group in self.groups.values():
            calls = [c for c in group.calls if c.d is not None]
            self.dropped_calls += len(group.calls) - len(calls)
            if calls:
                held.append(calls)
        for calls in held:
            if not self.defer or precond is not None:
                self._reduce(calls, precond)
            for c in calls:
                c.x = c.d = None
        self._drop_groups()
        self.reduced.clear()

    def _reduce(self, calls: list[Call], precond: Tensor | None = None) -> None:
        with torch.no_grad():
            spec = self.owner.spectrum_before(self)
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
            if spec is None:  # NaN/Inf weights: nothing is measurable, keep the sample count
                B = calls[0].x.shape[0] if calls[0].x.dim() > 1 else 1
                self.stats.append(tuple(torch.full((B,), float("nan"), dtype=torch.float64, device=self.weight.device)
                                        for _ in range(4)) + (None, None))
            elif precond is not None:
                self.stats.append(self._preconditioned_stats(spec, calls, dtype, _as(precond, dtype)))
            elif self.kind == "linear":
                self.stats.append(self._linear_stats(spec, calls, dtype))
            else:
                self.stats.append(self._conv_stats(spec, calls, dtype))
        for c in calls:  # the output tensors' hooks still reference the calls: let go of the tensors now
            c.x = c.d = None

    def _linear_stats(self, spec: Spectrum, calls: list[Call], dtype):
        B = calls[0].x.shape[0] if calls[0].x.dim() > 1 else 1
        xs, ds = [], []
        for c in calls:
            if c.x.dim() == 1:  # an unbatched call: one sample
                xs.append(c.x.reshape(1, 1, -1))
                ds.append(c.d.reshape(1, 1, -1))
            else:
                xs.append(c.x.reshape(c.x.shape[0], -1, self.n))
                ds.append(c.d.reshape(c.d.shape[0], -1, self.m))
        if any(x.shape[0] != B for x in xs):  # calls on different sample sets: treat them as such
            return _cat_stats([self._linear_stats(spec, [c], dtype) for c in calls])
        # One call (the usual case) needs no concatenation: cat would copy the batch's activations.
        X = _as(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1), dtype)
        D = _as(ds[0] if len(ds) == 1 else torch.cat(ds, dim=1), dtype)
        U, V = _as(spec.U, dtype), _as(spec.V, dtype)
        # With the statistics, Σ_i G_i v1 = Dᵀ(X v1) and Σ_i G_iᵀ u1 = Xᵀ(D u1): the gradient's two products from
        # the rows of X and D (B·T rows, where G has m), so the step needs no pass over the gradient itself.
        return self.owner.impl.persample_linear(X, D, U, spec.S, V, spec.host[2], sums=True)

    def _conv_stats(self, spec: Spectrum, calls: list[Call], dtype):
        B = calls[0].x.shape[0]
        if any(c.x.shape[0] != B or c.x.dim() != 4 for c in calls[1:]):
            return _cat_stats([self._conv_stats(spec, [c], dtype) for c in calls])
        if len(calls) == 1 and calls[0].x.dim() == 4:  # the usual case: projections and contraction in one op
            x, d = calls[0].x, calls[0].d
            return self.owner.impl.persample_conv2d(_as(x, dtype), _as(d, dtype), _as(spec.U, dtype), spec.S,
                                                    _as(spec.V, dtype), spec.host[2], *self.geometry)
        # A layer called several times on the same samples: the projections add up before the contraction.
        xvec = yvec = None
        for c in calls:
            x = c.x if c.x.dim() == 4 else c.x.unsqueeze(0)
            d = c.d if c.d.dim() == 4 else c.d.unsqueeze(0)
            xv, yv = conv2d_projections(spec, x.to(dtype), d.to(dtype), *self.geometry, impl=self.owner.impl)
            xvec = xv if xvec is None else xvec + xv
            yvec = yv if yvec is None else yvec + yv
        # The tracker flags degenerate steps with its own tolerances (gap_tol, step_tol), as for Linear.
        ps = contract_projections(spec, xvec, yvec, self.owner.impl, mask=False)
        return ps.proj, ps.hess, ps.hess_lo, ps.hess_hi, xvec.sum(0), yvec.sum(0)

    def _preconditioned_stats(self, spec: Spectrum, calls: list[Call], dtype, P: Tensor):
        """The statistics of the preconditioned per-sample gradients P ⊙ G_i (MATH.md §7), same layout as
        :meth:`_linear_stats`. Calls on different sample sets are reduced one by one; several calls on the same
        samples join along the position axis (their contributions to each G_i add up)."""
        B = calls[0].x.shape[0] if calls[0].x.dim() > 1 else 1
        if len(calls) > 1 and any((c.x.shape[0] if c.x.dim() > 1 else 1) != B for c in calls):
            return _cat_stats([self._preconditioned_stats(spec, [c], dtype, P) for c in calls])
        U, V, impl = _as(spec.U, dtype), _as(spec.V, dtype), self.owner.impl
        if self.kind == "conv2d" and len(calls) == 1 and calls[0].x.dim() == 4:
            return impl.persample_conv2d_precond(_as(calls[0].x, dtype), _as(calls[0].d, dtype), P, U, spec.S, V,
                                                 spec.host[2], *self.geometry)
        xs, ds = zip(*(self._rows(c) for c in calls))
        X = _as(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1), dtype)
        D = _as(ds[0] if len(ds) == 1 else torch.cat(ds, dim=1), dtype)
        return impl.persample_linear_precond(X, D, P, U, spec.S, V, spec.host[2])

    def _rows(self, c: Call) -> tuple[Tensor, Tensor]:
        """A call's ``(X [B, T, n], D [B, T, m])``: a Linear's leading dims flattened into positions, a Conv2d's
        input unfolded: only for a Conv2d called several times on the same samples, whose contributions must add
        up before the contraction (kh·kw times the input's memory; one call goes to the conv op, which never
        unfolds)."""
        if self.kind == "linear":
            if c.x.dim() == 1:
                return c.x.reshape(1, 1, -1), c.d.reshape(1, 1, -1)
            return c.x.reshape(c.x.shape[0], -1, self.n), c.d.reshape(c.d.shape[0], -1, self.m)
        x = c.x if c.x.dim() == 4 else c.x.unsqueeze(0)
        d = c.d if c.d.dim() == 4 else c.d.unsqueeze(0)
        k, s, p, dil = self.geometry
        cols = torch.nn.functional.unfold(x, k, dilation=dil, padding=p, stride=s)  # [B, n, T]
        return cols.mT, d.reshape(d.shape[0], self.m, -1).mT

    def take_stats(self):
        """All per-sample statistics since the last step, concatenated, and reset."""
        stats, self.stats = self.stats, []
        if not stats:
            return None
        return stats[0] if len(stats) == 1 else _cat_stats(stats)

    def _drop_groups(self) -> None:
        for group in self.groups.values():
            for c in group.calls:
                c.x = c.d = c.saved = None
        self.groups.clear()
        for calls in self.held:
            for c in calls:
                c.x = c.d = None
        self.held = []

    def reset(self) -> None:
        self._drop_groups()
        self.reduced.clear()
        self.stats = []

    def remove(self) -> None:
        self.hook(False)
        self.reset()



def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (skipping the dispatch of a no-op ``.to`` on the hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cat_stats(parts):
    """Per-sample statistics of several sample sets, one after the other; their gradient products add
    (None when one part has none: the tracker then reads the gradient)."""
    per_sample = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
    if any(p[4] is None for p in parts):
        return per_sample + (None, None)
    return per_sample + tuple(sum((p[i] for p in parts[1:]), parts[0][i]) for i in (4, 5))
