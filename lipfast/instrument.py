"""Capture of layer inputs and output-gradients with forward hooks and tensor hooks.

Per forward call of a tracked layer the input is kept (autograd keeps it for the weight gradient
anyway) and a hook on the output tensor receives the output-gradient during backward. As soon as every
call of one forward pass has its gradient, the per-sample statistics are computed and both tensors are
dropped: what survives until ``optimizer.step()`` is four float64 numbers per sample. Under an adaptive
optimizer (Adam, AdamW, RMSprop, Adagrad: ``LayerCapture.defer``) the statistics need the step's
preconditioner P, which depends on the whole mini-batch gradient: the completed groups' inputs and
output-gradients are held until the pre-step hook reduces them with P (about one more copy of the tracked
layers' activations, plus their output-gradients, for every micro-batch of the step; MATH.md §7).

Sample dimension (:meth:`LayerCapture._sample_dim`): dim 0 of a layer's input, checked against the batch size of
the model's input, unless the Tracker's ``batch_dim`` names another or the layer sits in a torch Transformer layer
whose ``batch_first`` is False (dim 1); MultiheadAttention's maps know their layout. A dim that cannot be told
apart is refused with a message that says how to name it. Sample grouping: calls of a layer inside one forward
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
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import Adapter, AttentionAdapter, cat_stats
from .adapters import _contract as contract_stats
from .adapters import _as

# ``_saved_tensors_hooks(False)``: the saved-tensor hooks autograd applies right now, (pack, unpack) or None. A
# private function; where a torch lacks it, a checkpointed segment's inputs are held from the forward on.
_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda *_: None)


_HALF = (torch.float16, torch.bfloat16)


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
    use: int = 0  # which of the capture's modules made the call (tied weights)
    layout: object = None  # x -> x with the sample dimension first (None: it is already)
    dlayout: object = None  # the output-gradient -> the same, and the matrix's part of it


@dataclass
class ForwardGroup:
    """The calls of one layer within one forward pass of the root model (the same samples)."""

    calls: list[Call] = field(default_factory=list)
    batch: int | None = None  # samples in the model's input of that forward pass

    def complete(self) -> bool:
        return all(c.d is not None for c in self.calls)


class _LinearListener:
    """MultiheadAttention calls ``F.linear`` on its projection weights instead of calling modules. While a
    tracked MultiheadAttention runs its forward, ``torch.nn.functional.linear`` (the name its code looks up) is
    wrapped so that listeners see each call; it is restored when the last such forward returns. A call whose
    weight no listener tracks costs one loop over the listeners. F.linear is process-wide: another thread's
    calls meanwhile pass through the wrapper too, and are ignored (a listener checks the weight's identity).
    MultiheadAttention's fused fast path makes no F.linear call; it runs only in eval mode with no grad to its
    weights, where nothing is captured anyway."""

    def __init__(self) -> None:
        self.original = F.linear  # what F.linear was when the first listener came (restored after the last)
        self.listeners: list = []

    def _linear(self, input, weight, bias=None):
        out = self.original(input, weight, bias)
        for fn in tuple(self.listeners):
            fn(input, weight, out)
        return out

    def push(self, fn) -> None:
        if not self.listeners:
            self.original = F.linear
            F.linear = self._linear
        self.listeners.append(fn)

    def pop(self, fn) -> None:
        self.listeners.remove(fn)
        if not self.listeners:
            F.linear = self.original


_LINEAR = _LinearListener()


def _seq_first(t: Tensor) -> Tensor:  # [L, B, *] -> [B, L, *]
    return t.movedim(1, 0)


def _unfold_rows(t: Tensor, batch: int) -> Tensor:  # [L·B, *], row l·B + b -> [B, L, *]
    return t.reshape(-1, batch, t.shape[-1]).movedim(1, 0)


class LayerCapture:
    """Hooks and per-step buffers of one tracked matrix. ``uses`` holds one adapter per module that uses its
    Parameter (tied weights: an embedding and an output head); ``uses[0]`` defines the matrix and the name."""

    def __init__(self, name: str, uses: list[tuple[str, Adapter]], owner, batch_dims: list | None = None) -> None:
        self.name = name
        self.use_names = [n for n, _ in uses]
        self.uses: list[Adapter] = [a for _, a in uses]
        self.adapter = self.uses[0]
        self.module = self.adapter.module
        self.kind = self.adapter.kind
        self.weight: nn.Parameter = self.adapter.weight
        self.m, self.n = self.adapter.m, self.adapter.n
        # Per use: ("explicit", dim) from batch_dim=, ("transformer", dim) from an enclosing torch Transformer
        # layer's batch_first, or None (dim 0, checked against the model input's batch size).
        self.batch_dims = batch_dims or [None] * len(self.uses)
        self.owner = owner
        self.groups: dict[int, ForwardGroup] = {}
        self.reduced: set[int] = set()  # forward ids whose group was reduced since the last step (_refuse_split)
        # per micro-batch: proj, hess, hess_lo, hess_hi [B] and Σ_i G_i v1 [m], Σ_i G_iᵀ u1 [n] (or None)
        self.stats: list[tuple] = []
        # Adaptive optimizers (MATH.md §7): the statistics need the step's preconditioner P, known only at the
        # step, so complete groups are held (inputs and output-gradients) until flush(precond) instead of reduced.
        self.defer = False
        self.held: list[tuple[list[Call], int | None]] = []  # (a forward pass's calls, the batch size then)
        self.dropped_calls = 0
        self.uses_checked = False  # Tracker._check_uses ran (once)
        self.low_precision = self.weight.dtype in _HALF  # a 16-bit weight or captured call (its tolerance)
        self.handles: list | None = None
        self._listening: list = []
        self.hook(True)

    @property
    def shared_with(self) -> list[str]:
        """The other modules using this Parameter (tied weights)."""
        return self.use_names[1:]

    def hook(self, on: bool) -> None:
        """Attach or detach the forward hooks (the tracker detaches them over steps it does not track)."""
        if on and self.handles is None:
            self.handles = []
            for i, adapter in enumerate(self.uses):
                if isinstance(adapter, AttentionAdapter):
                    self.handles += [
                        adapter.module.register_forward_pre_hook(Hook(functools.partial(self._on_attention, i)),
                                                                 with_kwargs=True),
                        adapter.module.register_forward_hook(Hook(self._after_attention), always_call=True)]
                else:
                    self.handles.append(adapter.module.register_forward_hook(
                        Hook(functools.partial(self._on_forward, i))))
        elif not on and self.handles is not None:
            for h in self.handles:
                h.remove()
            self.handles = None
            while self._listening:
                _LINEAR.pop(self._listening.pop())

    # -- hooks -------------------------------------------------------------------------------
    def _on_forward(self, use: int, module: nn.Module, args, output) -> None:
        if torch.compiler.is_compiling():
            refuse_compiled(f"the forward of layer '{self.name}'")
        if not self.owner.capturing or not torch.is_grad_enabled():
            return
        if not args or not isinstance(args[0], Tensor):
            return
        dim = self._sample_dim(use, args[0])
        layout = None if dim == 0 else functools.partial(torch.movedim, source=dim, destination=0)
        self._capture(use, args[0], output, layout, layout)

    def _on_attention(self, use: int, module: nn.MultiheadAttention, args, kwargs) -> None:
        """Before a MultiheadAttention's forward: listen to its F.linear calls (:class:`_LinearListener`)."""
        if torch.compiler.is_compiling():
            refuse_compiled(f"the forward of layer '{self.name}'")
        if not self.owner.capturing or not torch.is_grad_enabled():
            return
        query = args[0] if args else kwargs.get("query")
        batch = 1 if query.dim() == 2 else query.shape[0 if module.batch_first else 1]
        self._check_attention_batch(module, query, batch)
        listener = functools.partial(self._on_linear, use, batch)
        self._listening.append(listener)
        _LINEAR.push(listener)

    def _after_attention(self, module, args, output) -> None:
        if self._listening:
            _LINEAR.pop(self._listening.pop())

    def _check_attention_batch(self, module, query: Tensor, batch: int) -> None:
        B = self.owner.batch_size
        if query.dim() == 3 and B is not None and batch != B and B in query.shape[:2]:
            raise ValueError(
                f"lipfast: MultiheadAttention '{self.use_names[0].rpartition('.')[0]}' has batch_first="
                f"{module.batch_first}, so its query {tuple(query.shape)} holds {batch} samples, but the model's "
                f"input holds {B}; build it with batch_first={not module.batch_first} to match the data it gets")

    def _on_linear(self, use: int, batch: int, x: Tensor, weight: Tensor, out: Tensor) -> None:
        """An F.linear call inside a tracked MultiheadAttention: capture it when its weight holds this map."""
        adapter = self.uses[use]
        param = adapter.weight
        if weight is not param and weight._base is not param:
            return
        first = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
        if adapter.rows is None:
            if weight is not param:
                return
            lo, hi = 0, param.shape[0]
        else:
            lo, hi = adapter.rows[0] - first, adapter.rows[1] - first
            if lo < 0 or hi > weight.shape[0]:
                return
        if x.dim() == 2:  # out_proj: [L·B, E], row l·B + b
            layout = functools.partial(_unfold_rows, batch=batch)
        else:
            layout = _seq_first
        dlayout = layout if (lo, hi) == (0, weight.shape[0]) else (lambda t: layout(t[..., lo:hi]))
        self._capture(use, x, out, layout, dlayout)

    def _sample_dim(self, use: int, x: Tensor) -> int:
        """Which dim of a call's input holds the samples (refused when another dim would fit as well)."""
        adapter = self.uses[use]
        if x.dim() < adapter.batched_dims:
            return 0  # an unbatched call: one sample
        fact = self.batch_dims[use]
        if fact is not None and fact[0] == "explicit":
            if fact[1] >= x.dim():
                raise ValueError(f"lipfast: batch_dim {fact[1]} for layer '{self.name}', but its input has shape "
                                 f"{tuple(x.shape)}")
            return fact[1]
        dim = fact[1] if fact is not None and x.dim() == 3 else 0
        B = self.owner.batch_size
        if B is None or x.shape[dim] == B:
            return dim
        if x.shape[dim] == 1:
            # One row for the whole batch (position ids [1, T] broadcast over it): shared by every sample, even when
            # another dim happens to equal B (T == B); _covers moves the layer to skipped with a warning.
            return dim
        others = [j for j in range(x.dim()) if j != dim and x.shape[j] == B]
        if others:
            raise ValueError(
                f"lipfast: cannot tell which dim of layer '{self.name}''s input {tuple(x.shape)} holds the samples: "
                f"dim {dim} has {x.shape[dim]} entries, but the model's input holds {B} samples, as dim {others[0]} "
                f"does. Pass Tracker(..., batch_dim={{'{self.name}': {others[0]}}}) (or batch_dim={others[0]} for "
                "every layer) to say which")
        return dim  # a call on part of the batch, or shared by all: _covers decides once the group is complete

    def _capture(self, use: int, x: Tensor, output, layout, dlayout) -> None:
        owner = self.owner
        if not isinstance(output, Tensor) or not output.requires_grad or _is_functorch_wrapped(output):
            return
        x = x.detach()
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
        call.use, call.layout, call.dlayout = use, layout, dlayout
        self.low_precision = self.low_precision or output.dtype in _HALF
        self.groups.setdefault(owner.forward_id, ForwardGroup(batch=owner.batch_size)).calls.append(call)
        output.register_hook(functools.partial(self._on_grad, owner.forward_id, call))

    def _on_grad(self, forward_id: int, call: Call, grad: Tensor) -> None:
        group = self.groups.get(forward_id)
        if group is None:  # reduced already (a second backward through a retained graph) or dropped
            return
        call.d = grad.detach() if grad.requires_grad else grad  # (a graph only under create_graph=True)
        if call.saved is not None:  # unpacked inside backward, where a checkpoint hands over its recomputation
            unpack, packed = call.saved
            call.x, call.saved = unpack(packed), None
        if group.complete():
            del self.groups[forward_id]
            self.reduced.add(forward_id)
            if self.defer:  # an adaptive optimizer: reduced at the step, with its preconditioner
                self.held.append((group.calls, group.batch))
            else:
                self._reduce(group.calls, group.batch)

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
                held.append((calls, None))
        for calls, batch in held:
            if not self.defer or precond is not None:
                self._reduce(calls, batch, precond)
            for c in calls:
                c.x = c.d = None
        self._drop_groups()
        self.reduced.clear()

    def _covers(self, calls: list[Call], batch: int | None) -> bool:
        """Whether the calls of one forward pass hold the batch's samples along their sample dimension: the same
        samples in every call, or sample sets adding up to the batch. A layer whose calls hold one row while the
        batch holds more (an input shared by every sample: a position embedding on [1, T]) has no per-sample
        gradients: it is dropped, with a warning (False). Any other count is refused."""
        sizes = [self.uses[c.use].samples(c.x) for c in calls]
        covered = sizes[0] if len(set(sizes)) == 1 else sum(sizes)
        explicit = any(self.batch_dims[c.use] is not None and self.batch_dims[c.use][0] == "explicit" for c in calls)
        if batch is None or covered == batch or explicit:
            return True
        if covered == 1:
            self.owner.drop_capture(self, f"its input holds 1 row where the batch holds {batch} samples: an input "
                                    "shared by every sample (a position embedding on [1, T]), whose output-gradient "
                                    "arrives summed over the samples, so their own gradients cannot be formed")
            return False
        raise ValueError(
            f"lipfast: layer '{self.name}''s calls in one forward pass hold {sizes} rows along their sample "
            f"dimension, where the batch holds {batch} samples; lipfast cannot tell which sample each row belongs to "
            "(a flattened [B·T, n] input, tokens routed to an expert). Give the layer its input as [B, ..., n], name "
            "the dim that holds the samples with Tracker(..., batch_dim={'" + self.name + "': dim}), or leave it "
            "out with layers=")

    def _reduce(self, calls: list[Call], batch: int | None = None, precond: Tensor | None = None) -> None:
        with torch.no_grad():
            for c in calls:  # the sample dimension first (views)
                if c.layout is not None:
                    c.x, c.d, c.layout = c.layout(c.x), c.dlayout(c.d), None
            if not self._covers(calls, batch):
                for c in calls:
                    c.x = c.d = None
                return
            spec = self.owner.spectrum_before(self)
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
            impl = self.owner.impl
            uses = {c.use for c in calls}
            if spec is None:  # NaN/Inf weights: nothing is measurable, keep the sample count
                B = self.uses[calls[0].use].samples(calls[0].x)
                self.stats.append(tuple(torch.full((B,), float("nan"), dtype=torch.float64, device=self.weight.device)
                                        for _ in range(4)) + (None, None))
            elif precond is not None:  # an adaptive optimizer: the statistics of P ⊙ G_i (MATH.md §7)
                self.stats.append(self.uses[calls[0].use].precond_stats(impl, spec, calls, dtype, _as(precond, dtype)))
            elif len(uses) == 1:
                self.stats.append(self.uses[calls[0].use].stats(impl, spec, calls, dtype))
            elif len({self.uses[c.use].samples(c.x) for c in calls}) > 1:  # uses on different sample sets
                self.stats.append(cat_stats([self.uses[c.use].stats(impl, spec, [c], dtype) for c in calls]))
            else:  # a tied Parameter: every use's projections add up before the contraction
                xvec = yvec = None
                for u in sorted(uses):
                    xv, yv = self.uses[u].projections(impl, spec, [c for c in calls if c.use == u], dtype)
                    xvec = xv if xvec is None else xvec + xv
                    yvec = yv if yvec is None else yvec + yv
                self.stats.append(contract_stats(impl, spec, xvec, yvec))
        for c in calls:  # the output tensors' hooks still reference the calls: let go of the tensors now
            c.x = c.d = None

    def take_stats(self):
        """All per-sample statistics since the last step, concatenated, and reset."""
        stats, self.stats = self.stats, []
        if not stats:
            return None
        return stats[0] if len(stats) == 1 else cat_stats(stats)

    def _drop_groups(self) -> None:
        for group in self.groups.values():
            for c in group.calls:
                c.x = c.d = c.saved = None
        self.groups.clear()
        for calls, _ in self.held:
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


