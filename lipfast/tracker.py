"""``lipfast.Tracker``: the three forces on every layer's operator norm, measured while a model trains.

Attach it to an unmodified model and optimizer; it captures what it needs during forward/backward
(:mod:`lipfast.instrument`) and around ``optimizer.step()`` (step pre/post hooks), and appends one
record per tracked layer and one network record per tracked step (API.md, MATH.md §2–§3).

What the per-sample numbers mean:
- ``loss_reduction="mean"``: the gradient the optimizer sees is taken to be the mean of the per-sample
  loss gradients over every sample whose forward/backward ran since the last step (with gradient
  accumulation, divide each micro-batch loss by the number of micro-batches, as is usual).
  ``"sum"``: it is their sum.
- The noise terms are the spread of the per-sample gradients around their own mean, which the tracker
  forms from the captured samples: gradient clipping or an extra loss term (an L2 penalty) change the step
  (``first_order``, ``second_order``) but not that spread. Under DDP the mean is ``weight.grad``, the
  global batch's after DDP's all-reduce.
- Under ``DistributedDataParallel`` every rank captures its own samples and ONE all-reduce per tracked
  step sums the statistics of all layers: the records are those of the global batch (unequal local
  batches are weighted as DDP weights them); :mod:`lipfast.distributed` derives and documents it.
- BatchNorm in training mode couples the samples of a batch: ``D_iᵀX_i`` is then sample i's share of the
  batch gradient, not the gradient of its own loss. The decomposition stays exact for the realised step
  (first/second order), while the noise terms describe the spread of those shares. A warning says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import distributed, ops, reference
from .functional import (Spectrum, block_size, compute_spectrum, default_tol, needs_exact, resize_block,
                         with_host_values)
from .adapters import SUPPORTED, adapter_for, attention_adapters
from .instrument import COMPILE_ADVICE, Hook, LayerCapture, in_backward, prepare_compile_refusal, refuse_compiled
from .optim import StepCoefficients, find_group, is_adaptive, is_modelled, sgd_equivalent, step_coefficients

__all__ = ["Tracker", "LipfastWarning", "LAYER_FIELDS", "NETWORK_FIELDS", "TRUST_FLAGS"]

logger = logging.getLogger("lipfast")

LAYER_FIELDS = ("step", "layer", "kind", "m", "n", "batch", "lr", "sigma", "sigma2", "sigma_next",
                "delta_obs", "first_order", "second_order", "delta_pred", "drift", "diffusion_var",
                "ito", "ito_lo", "ito_hi", "gap", "degenerate", "residual", "sigma_err", "nonfinite", "flag_names",
                "group", "shared_with")
NETWORK_FIELDS = ("step", "log_bound", "log_bound_next", "drift", "diffusion_var", "ito", "loss", "train_acc")
# Flags that say a step's expansion is not to be trusted; ``degenerate`` is true when any is set (Tracker docs).
TRUST_FLAGS = ("unconverged", "small_gap", "large_step", "crossing", "closure")
# ``sigma_err`` above this share of σ1 flags a record ``unconverged``: its σ1 may be that far off.
SIGMA_RTOL = 1e-3
# The closure test's absolute floor, relative to σ1: below it |delta_obs − delta_pred| is rounding of a
# float32 spectrum (eps32·√(m+n)-level), not a failed expansion.
CLOSURE_FLOOR = 1e-6
_FORCE_FIELDS = ("first_order", "second_order", "delta_pred", "drift", "diffusion_var", "ito", "ito_lo", "ito_hi")
_STATE_FORMAT = 1
NAN = float("nan")


class LipfastWarning(UserWarning):
    """Something about the tracked run the user should know (the numbers' meaning, skipped data)."""


@dataclass
class _Cached:
    """The spectrum of a weight and which weight it belongs to (autograd's in-place version counter,
    or after a restore, a fingerprint of the values)."""

    spec: Spectrum
    version: int | None
    fingerprint: tuple[float, float] | None = None


_DEFER_ON_CPU = False  # tests switch the lazy read-back on for CPU runs, to check it without a GPU
# lipfast::track_update's statistics: update_statistics' seven (the first four the cluster expansion's when the
# step took a cluster), σ1, σ2, σ_{k+1}, residual, sweeps, the overlaps ‖U_Cᵀu1'‖, ‖V_Cᵀv1'‖ of the new top pair
# with the old cluster, the new r1, r2, the step on the cluster and the cluster's gap, the cluster size used and
# the next step's.
_N_TRACK_STATS = 20


class _StepReadback:
    """A tracked step's numbers on their way to the host: every layer's vector (the parts
    :meth:`Tracker._measure` hands over) and the logged tensors in one tensor, made by one ``cat`` and
    copied by one asynchronous device-to-host copy into pinned memory as soon as they are queued;
    :meth:`read` waits for that copy alone (on the CPU: no copy)."""

    def __init__(self, step: int, logged: dict, entries: list[tuple]):
        self.step = step
        self.entries, layers = [], []
        for cap, p, spec, vector_parts in entries:
            self.entries.append((cap, p, spec, None if vector_parts is None else len(layers)))
            if vector_parts is not None:
                layers.append(vector_parts)
        self._logged = dict(logged)
        self._tensor_keys = [k for k, v in logged.items() if isinstance(v, Tensor)]
        # What adapters keep of the step (a grouped convolution's block σ1s), after the logged values.
        self._after = [(cap.adapter, p["after_step"]) for cap, p, _, _ in entries if p.get("after_step") is not None]
        parts = ([t for layer in layers for t in layer] + [logged[k].reshape(1) for k in self._tensor_keys]
                 + [t for _, t in self._after])
        device = parts[0].device if parts else torch.device("cpu")
        flat = (torch.cat([_float64_on(t, device) for t in parts]) if parts
                else torch.empty(0, dtype=torch.float64))
        self._width = sum(t.numel() for t in layers[0]) if layers else 0
        self._layers = len(layers)
        self.deferred = flat.is_cuda or _DEFER_ON_CPU
        self._event = None
        if flat.is_cuda:
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flat

    def done(self) -> None:
        """The step's records are built: the adapters let go of what they read for them."""
        for adapter, _ in self._after:
            adapter.read_after_step(None)

    def read(self) -> tuple[list[list[float]], dict[str, float]]:
        """(one list of floats per layer that has a vector, the logged values as floats)."""
        if self._event is not None and not self._event.query():  # query(): no wait when it has landed
            self._event.synchronize()
        flat = self._host.tolist()
        w, n = self._width, self._layers
        logged = {k: (float(v) if not isinstance(v, Tensor) else NAN) for k, v in self._logged.items()}
        at = n * w + len(self._tensor_keys)
        logged.update(zip(self._tensor_keys, flat[n * w:at]))
        for adapter, t in self._after:
            adapter.read_after_step(flat[at:at + t.numel()])
            at += t.numel()
        return [flat[i * w:(i + 1) * w] for i in range(n)], logged


def _float64_on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` as float64 on ``device``; the ops' statistics already are, and skip a dispatched no-op ``.to``."""
    return t if t.dtype == torch.float64 and t.device == device else t.to(device, torch.float64)


def _top_residuals(spec: Spectrum) -> tuple[float, float]:
    """``(r1, r2)``: the residuals of the top two singular pairs (r2 = r1 when only one is kept), from the
    ``track_update`` that made ``spec`` (:meth:`Tracker._fill_host`), else read off the device once."""
    if "top_residuals" not in spec.__dict__:
        res = spec.residuals[:2].tolist()
        spec.__dict__["top_residuals"] = (res[0], res[-1])
    return spec.__dict__["top_residuals"]


def _sigma_error(theta1: float, theta2: float, r1: float, r2: float) -> float:
    """How far the Ritz value θ1 can be from its singular value, from what the iteration has.

    ``W v1 = θ1 u1`` exactly and ``‖Wᵀu1 − θ1 v1‖ = r1``: [u1; v1]/√2 is a Ritz vector of [[0, W], [Wᵀ, 0]]
    with residual r1/√2, so a singular value lies within r1 of θ1, and (Kato–Temple) within
    r1²/(2δ) when no other one is within δ of θ1. With the second pair's interval, δ ≥ θ1 − θ2 − r2.
    """
    delta = theta1 - theta2 - r2
    return min(r1, r1 * r1 / (2 * delta)) if delta > r1 else r1


def _unresolved_gap(spec: Spectrum, sigma: float, sigma2: float, r2: float) -> bool:
    """``spec.degenerate`` from values already on the host (it would read S and the residuals off the device):
    σ1 and σ2 within 8 eps, σ2 of an iterated spectrum taken as its Ritz value plus residual."""
    s2 = min(sigma2 + r2, sigma) if spec.iters > 0 and spec.k > 1 else sigma2
    gap = (sigma - s2) / sigma if sigma > 0 else 0.0
    return gap <= 8 * torch.finfo(spec.U.dtype).eps


def _fingerprint(W: Tensor) -> tuple[float, float]:
    Wd = W.detach().to(torch.float64)
    return float(Wd.sum()), float(Wd.norm())


class Tracker:
    """Tracks σ1 of every supported layer and the three forces that move it (API.md).

    Args:
        model: the ``nn.Module`` being trained (a ``DistributedDataParallel`` wrapper is unwrapped;
            names are those of the inner module).
        optimizer: the optimizer that trains it.
        rank: top-k singular triplets kept per layer (warm-started between steps); at or above a
            layer's ``min(m, n)`` its spectrum is exact.
        every: track every ``every``-th optimizer step; the others cost a counter increment.
        layers: None (every supported layer), an iterable of qualified names, or a predicate
            ``(name, module) -> bool``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss the optimizer differentiates combines
            per-sample losses (sets the per-sample scaling).
        dataset_size: when given, batches are taken as sampled without replacement from this many
            samples, and the noise terms get the factor ``(N − B)/(N − 1)`` (MATH.md §3).
        gap_tol: relative gap ``(σ1 − σ2)/σ1`` below which a step is flagged ``small_gap``.
        step_tol: a step is flagged ``large_step`` when ``max(‖ΔW v1‖, ‖ΔWᵀu1‖)/(σ1 − σ2)`` exceeds this: the
            part of the step that rotates the top singular pair, against the gap (MATH.md §1). It is a
            lower bound of ‖ΔW‖₂ that needs no extra pass over W (the Frobenius norm, MATH.md's cheap upper
            bound, overstates a mini-batch step's ‖ΔW‖₂ by up to √B and flags most early steps); what it
            misses, the ``closure`` and ``crossing`` flags measure.
        closure_tol: a step is flagged ``closure`` when ``|delta_obs − delta_pred|`` exceeds
            ``closure_tol·|delta_obs| + 1e-6·σ1``: the second-order expansion did not explain the step.
        cluster: expand each step on the top *cluster* (MATH.md §2, RELIABILITY.md §3.5): the pairs whose σ_j
            lie within 4 times the last step's ``max(‖ΔW v1‖, ‖ΔWᵀu1‖)`` of σ1. Where it has more than one
            pair, ``first_order`` is ``μ − σ1`` (μ the top singular value of ``U_Cᵀ W' V_C``, exact on the
            cluster), ``second_order`` the rotated pair's coupling to the rest, ``large_step`` compares
            ``max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂)`` with the gap below the cluster, and ``crossing`` the new top pair
            with the old cluster's span. Off (the default), every step takes the pair expansion at σ1.
        iters: the sweep budget of a spectrum update: at most this many warm-started subspace sweeps (each
            two GEMMs with W, one power step of the block), fewer once the top two singular pairs'
            residuals are below ``tol``·σ1. A spectrum still short of that after ``iters`` sweeps shows in
            ``sigma_err`` and, past 1e-3·σ1, in the ``unconverged`` flag. The default 16 keeps σ1 of a
            ResNet-18 trained from its random initialisation within 1e-3 of LAPACK's on every record
            (``bench/accuracy_resnet18.py``); 1, the old default, let σ1 lag by up to 65% there.
            The first update is cold (up to 100 sweeps, until ``tol``).
        tol: relative residual of the top two pairs that ends the sweeps early (default: 1e-4 for float32
            weights, 1e-8 for float64; 0: always ``iters`` sweeps, no host read of the residuals).
        on_nonfinite: ``"flag"`` (record the step as non-finite, keep training) or ``"raise"``.
        on_record: optional callback ``(layer_records, network_record) -> None`` for each tracked step, or a
            list of them (each gets every step, in list order: a run folder, TensorBoard, ...). On the
            CPU it runs inside that step's ``optimizer.step()``; on CUDA the step's numbers stay on the GPU
            until the next ``optimizer.step()`` (or until ``records``, ``network``, ``state_dict()`` or
            ``close()`` reads them), so that tracking never makes the host wait for the GPU; ``on_record``
            runs then, with the step's own ``step`` index. ``on_nonfinite="raise"`` reads every step at once.
        keep_records: keep records in ``tracker.records``/``tracker.network`` (turn off for very
            long runs that stream records through ``on_record``).
        implementation: ``"compiled"`` (the C++ ops) or ``"reference"`` (their pure-PyTorch twins in
            :mod:`lipfast.reference`: the same algorithm, for cross-checks and benchmarks).
        records_on: under DDP, ``"rank0"`` (records and ``on_record`` on rank 0 of the process group
            only) or ``"all"`` (every rank keeps the same global records). Every rank computes them.
        batch_dim: which dim of a layer's input holds the samples, where lipfast cannot know it: an int for
            every layer and the model's input, or ``{module name: int}`` per layer (a MultiheadAttention's
            maps ignore it: they know their layout). Without it: dim 0, checked against the batch size of the
            model's first tensor argument, and inside a torch Transformer module its ``batch_first``; a layer
            whose dim 0 does not hold that many samples while another dim does is refused at its first call,
            with a message naming this argument; so is a layer whose calls of one forward pass hold neither the
            batch's samples nor sample sets adding up to it (a flattened ``[B·T, n]`` input).

    Accuracy: ``W v1 = σ1 u1`` holds by construction, so ``σ1 = ‖W v1‖`` is never above the true largest
    singular value; ``sigma_err`` is a Kato–Temple bound from the top two pairs' residuals
    ``‖Wᵀu_j − σ_j v_j‖`` (:func:`_sigma_error`): a singular value of W lies within it of σ1, the largest
    unless the warm-started block has lost the top direction altogether (a singular direction outside the
    block overtaking the top one; then ``crossing`` usually fires on the step it happens).

    Flags (the ``flag_names`` column, ``;``-separated; ``degenerate`` is true when any of the first five is set):

    - ``unconverged``: ``sigma_err > 1e-3·σ1``: the sweep budget (``iters``) ran out before the top pairs
      converged; σ1 may be that far off, and the step's terms are read along an inaccurate pair.
    - ``small_gap``: ``(σ1 − σ2)/σ1 < gap_tol``: the top pair is nearly tied; derivatives are large.
    - ``large_step``: the step's rotating part is large against the gap (``step_tol``).
    - ``crossing``: the top singular pair after the step is nearly orthogonal to the one before
      (``min(|u1ᵀu1'|, |v1ᵀv1'|)² < ½``; with ``cluster``, to the old cluster's span): another pair took the
      top, a level crossing that no expansion at the old W describes.
    - ``closure``: the realised expansion failed (``closure_tol``).
    - ``unresolved_gap``: σ1 and σ2 cannot be told apart: equal to working precision (8 eps of the spectrum's
      dtype), or, for an iterated spectrum, closer than σ2's Ritz residual (more sweeps, ``iters``, resolve
      it). The operator norm is not differentiable at a tie, so the forces are NaN. Everywhere else the
      forces (``drift``, ``diffusion_var``, ``ito``) and ``delta_pred`` are reported, flagged or not: they
      are derivatives at the current W.
    - ``nonfinite``: NaN/Inf in the gradient or the weights after the step (forces NaN).
    - ``single_sample``: one sample in the step: no noise terms (NaN).
    - ``sgd_equivalent``: the optimizer is none lipfast models (SGD, Adam, AdamW, RMSprop, Adagrad, by exact
      class): the forces are those of an SGD step with its learning rate (``first_order``/``second_order`` use
      the real update). For the adaptive ones the forces are those of the step with its preconditioner P frozen
      (MATH.md §7; :mod:`lipfast.optim`), and each tracked layer's inputs and output-gradients are held from
      its backward until ``optimizer.step()`` (P needs the whole mini-batch gradient).

    Attributes:
        captures: the tracked layers, ``{qualified name: LayerCapture}`` in module order.
        skipped: every weight matrix of the model that is not tracked, ``{name: reason}`` in module order
            (logged at attach, one line per reason). A module with a ``weight`` that is not tracked (excluded
            by ``layers``, an unsupported type or configuration, a frozen weight, a weight the optimizer
            does not own) is listed under the module's name; any other parameter with 2+ dimensions (LSTM/GRU
            weights, a bare ``nn.Parameter`` used by the module's own code) under the parameter's name. A
            Parameter shared under several names (tied weights) counts once, at its first name; biases and
            other 1-D parameters are not listed. A layer whose input turns out to be shared by every sample
            (a position embedding called on ``[1, T]``) moves here at its first backward, with a warning.

    Layer kinds (:mod:`lipfast.adapters`, the README's table): Linear, Conv1d/Conv2d (grouped and depthwise:
    the record follows the block with the largest σ1, ``group``), HF Conv1D, Embedding, MultiheadAttention's
    q/k/v and out_proj (``<module>.q`` ...). A Parameter used by several supported modules (tied weights) has
    one record, named after the first, its per-sample statistics adding every use; ``shared_with`` names
    the others.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 8, every: int = 1,
                 layers: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                 loss_reduction: str = "mean", dataset_size: int | None = None, *,
                 gap_tol: float = 1e-3, step_tol: float = 2.0, closure_tol: float = 0.1, cluster: bool = False,
                 iters: int = 16,
                 tol: float | None = None,
                 on_nonfinite: str = "flag", on_record: Callable | None = None, keep_records: bool = True,
                 implementation: str = "compiled", records_on: str = "rank0",
                 batch_dim: int | dict[str, int] | None = None):
        self._check_args(model, optimizer, rank, every, loss_reduction, dataset_size, gap_tol, step_tol,
                         closure_tol, iters, on_nonfinite)
        on_record = _sinks(on_record)  # before the process group's collectives: a bad value fails on every rank
        self.batch_dim = _check_batch_dim(model, batch_dim)
        self.batch_size: int | None = None  # samples in the model's current input (the root's forward)
        self._group = distributed.attach(model, records_on)  # None unless DDP-wrapped
        self._records_here = self._group is None or self._group.records_here
        self._inflight: distributed.StepBucket | None = None
        if implementation not in ("compiled", "reference"):
            raise ValueError(f"Tracker: implementation must be 'compiled' or 'reference', got {implementation!r}")
        self.impl = ops if implementation == "compiled" else reference
        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.every = every
        self.loss_reduction = loss_reduction
        self.dataset_size = dataset_size
        self.gap_tol = float(gap_tol)
        self.step_tol = float(step_tol)
        self.closure_tol = float(closure_tol)
        if not isinstance(cluster, bool):
            raise ValueError(f"Tracker: cluster must be True or False, got {cluster!r}")
        self.cluster = cluster
        self.iters = iters
        self.tol = tol
        self.on_nonfinite = on_nonfinite
        self.on_record = on_record
        self.keep_records = keep_records
        self._records: list[dict] = []
        self._network: list[dict] = []
        self._unread: _StepReadback | None = None
        self._undelivered: list[tuple[list[dict], dict]] = []  # read back, not yet handed to on_record
        self.step = 0
        self.forward_id = 0
        self.skipped: dict[str, str] = {}
        self._logged: dict[str, float | Tensor] = {}
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, dict] = {}
        self._warned: set[str] = set()
        self._closed = False

        root = self._unwrap(model)
        self.captures: dict[str, LayerCapture] = {}
        try:
            chosen = self._select(root, layers)
        except (TypeError, ValueError):
            if self._group is not None:  # take part in the others' check, so that they fail rather than wait
                self._group.check_same_model(None)
            raise
        if self._group is not None:
            self._group.check_same_model(distributed.describe_tracker([(n, u[0][1]) for n, u in chosen], dict(
                rank=rank, every=every, loss_reduction=loss_reduction, iters=iters, tol=tol,
                implementation=implementation, cluster=cluster)))
        adaptive = is_adaptive(optimizer)
        for name, uses in chosen:
            cap = self.captures[name] = LayerCapture(name, uses, self, [self._batch_fact(root, n) for n, _ in uses])
            # Adaptive optimizers: per-sample statistics wait for the step's preconditioner (MATH.md §7); a kind
            # without preconditioned statistics (and a tied Parameter) is reported with SGD's terms, flagged.
            cap.defer = adaptive and len(cap.uses) == 1 and cap.adapter.supports_precond
        self._root = root
        self._root_dim = self._root_batch_dim(root)
        prepare_compile_refusal()  # a forward compiled after attach is refused by the hooks
        self._root_handle = root.register_forward_pre_hook(Hook(self._on_root_forward), with_kwargs=True)
        # A torch Transformer module knows its layout (batch_first): the batch size its input holds replaces
        # the guess from the model's input (dim 0) for the layers that run after it starts.
        self._handles = [module.register_forward_pre_hook(Hook(functools.partial(self._on_layout, dim)))
                         for module, dim in _outer_layouts(root) if module is not root]
        # (kept by name: an integration whose framework runs backward inside optimizer.step() moves it)
        self._step_pre_handle = optimizer.register_step_pre_hook(Hook(self._on_step_pre))
        self._handles += [self._step_pre_handle, optimizer.register_step_post_hook(Hook(self._on_step_post))]
        self._announce(root, optimizer)

    # -- attach ----------------------------------------------------------------------------------
    @staticmethod
    def _check_args(model, optimizer, rank, every, loss_reduction, dataset_size, gap_tol, step_tol, closure_tol,
                    iters, on_nonfinite) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Tracker: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(model, "_compiled_call_impl", None):
            raise TypeError("Tracker: model is torch.compile'd; lipfast's tensor hooks would be traced away and "
                            f"record nothing. {COMPILE_ADVICE}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Tracker: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for name, value, minimum in (("rank", rank, 1), ("every", every, 1), ("iters", iters, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Tracker: {name} must be an int >= {minimum}, got {value!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Tracker: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if dataset_size is not None and (isinstance(dataset_size, bool) or not isinstance(dataset_size, int)
                                         or dataset_size < 2):
            raise ValueError(f"Tracker: dataset_size must be None or an int >= 2, got {dataset_size!r}")
        for name, value in (("gap_tol", gap_tol), ("step_tol", step_tol), ("closure_tol", closure_tol)):
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Tracker: {name} must be a number >= 0, got {value!r}")
        if on_nonfinite not in ("flag", "raise"):
            raise ValueError(f"Tracker: on_nonfinite must be 'flag' or 'raise', got {on_nonfinite!r}")

    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.module
        return model

    def _select(self, root: nn.Module, layers):
        if layers is not None and not callable(layers):
            wanted = list(layers)
            if not all(isinstance(w, str) for w in wanted):
                raise TypeError(f"Tracker: layers must be names (str) or a predicate, got {wanted!r}")
            known = dict(root.named_modules())
            missing = [w for w in wanted if w not in known]
            if missing:
                raise ValueError(f"Tracker: layers {missing} are not modules of the model; "
                                 f"its modules with weights are {[n for n, m in known.items() if _has_weight(m)]}")
            wanted = set(wanted)
            keep = lambda name, module: name in wanted  # noqa: E731
        else:
            keep = layers or (lambda name, module: True)
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        chosen: dict[str, list] = {}  # capture name -> [(module name, adapter)], one per use of the Parameter
        tracked: dict[int, str] = {}  # id(Parameter) -> the capture it joins (tied weights)
        broken: dict[str, str] = {}  # captures with a use lipfast cannot capture: skipped, not half-measured
        # Every parameter counts once, at its first name in module order: a later module using it (a tied
        # output head) adds its calls to that record, or is listed there when it cannot.
        seen: set[int] = set()
        for name, module in root.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                for mname, adapter in attention_adapters(name, module):
                    # q/k/v are kept with the MultiheadAttention's name; out_proj with its own or that one
                    out = mname.endswith("out_proj")
                    kept = keep(name, module) or (out and keep(mname, module.out_proj))
                    reason = _use_reason(name, module, adapter.weight, lambda *_: kept, owned)
                    if id(adapter.weight) in seen:
                        reason = "MultiheadAttention with a weight shared with another module: not supported"
                    if reason is None:
                        chosen[mname] = [(mname, adapter)]
                    else:
                        self.skipped[mname] = reason
                seen.update(id(p) for p in module.parameters())
            elif _has_weight(module):
                key = id(module.weight)
                cls, reason = adapter_for(module)
                if key in tracked:  # a tied Parameter: this module's calls add to the first one's record
                    first = chosen[tracked[key]][0][1]
                    use = cls(module) if cls is not None else None
                    if use is None or use.orientation() != first.orientation():
                        why = reason or "it reads the Parameter as another matrix"
                        broken[tracked[key]] = (f"its Parameter is also used by '{name}' ({why}), whose calls "
                                                "lipfast cannot add to the record")
                    else:
                        chosen[tracked[key]].append((name, use))
                elif key not in seen:
                    reason = reason or _use_reason(name, module, module.weight, keep, owned)
                    if reason is None:
                        chosen[name] = [(name, cls(module))]
                        tracked[key] = name
                    else:
                        self.skipped[name] = reason
                seen.add(key)
            # The module's other matrices (LSTM, a bare Parameter of custom code): no layer call lipfast can
            # capture, so they are listed rather than left out silently. 1-D ones (biases, norm scales) are no
            # operator norm.
            for pname, param in module.named_parameters(prefix=name, recurse=False):
                if id(param) not in seen and param.dim() >= 2:
                    self.skipped[pname] = _parameter_reason(module, pname.rpartition(".")[2])
                seen.add(id(param))
        for name, reason in broken.items():
            del chosen[name]
            self.skipped[name] = reason
        if not chosen:
            detail = ("not tracked, by reason:\n  " + "\n  ".join(_by_reason(self.skipped)) if self.skipped
                      else "it has no modules with weights and no parameters with 2+ dimensions")
            if any("not among the optimizer" in r for r in self.skipped.values()):
                raise ValueError("Tracker: the optimizer does not own the weights of the model's layers; pass the "
                                 f"optimizer that trains this model; {detail}")
            raise ValueError(f"Tracker: the model has no layer lipfast can track ({SUPPORTED}); {detail}")
        return list(chosen.items())

    def _batch_fact(self, root: nn.Module, name: str) -> tuple | None:
        """What is known of the sample dimension of a module's inputs: ``("explicit", dim)`` from ``batch_dim``,
        ``("transformer", dim)`` inside a torch Transformer layer (its ``batch_first``), else None (dim 0)."""
        if isinstance(self.batch_dim, dict) and name in self.batch_dim:
            return ("explicit", self.batch_dim[name])
        if isinstance(self.batch_dim, int):
            return ("explicit", self.batch_dim)
        fact = None
        module = root
        for part in [""] + (name.split(".") if name else []):
            module = getattr(module, part, None) if part else module
            first = _batch_first(module) if isinstance(module, nn.Module) else None
            if first is not None:
                fact = ("transformer", 0 if first else 1)
        return fact

    def _on_layout(self, dim: int, module, args) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() == 3 and not in_backward():
            self.batch_size = int(args[0].shape[dim])

    def _root_batch_dim(self, root: nn.Module) -> int:
        if isinstance(self.batch_dim, int):
            return self.batch_dim
        first = _batch_first(root)
        return 1 if first is False else 0

    def drop_capture(self, cap: LayerCapture, reason: str) -> None:
        """Stop tracking a layer whose calls turn out to carry no per-sample information: it moves to
        ``skipped``, with a warning."""
        cap.remove()
        self.captures.pop(cap.name, None)
        self._cache.pop(cap.name, None)
        self.skipped[cap.name] = reason
        warnings.warn(f"lipfast: not tracking '{cap.name}': {reason}; it is now in tracker.skipped",
                      LipfastWarning, stacklevel=2)

    def _announce(self, root: nn.Module, optimizer) -> None:
        if self.skipped:  # one line per reason: a ResNet's 20 BatchNorms make one short line
            logger.warning("lipfast: not tracking %d module(s) or parameter(s) (see tracker.skipped), by reason:"
                           "\n  %s", len(self.skipped), "\n  ".join(_by_reason(self.skipped)))
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in root.modules()):
            warnings.warn(
                "lipfast: the model has BatchNorm layers; in training mode they couple the samples of a batch, "
                "so each per-sample 'gradient' D_iᵀX_i is sample i's share of the batch gradient rather than the "
                "gradient of its own loss. first/second_order and delta_pred stay exact; drift, diffusion_var and "
                "ito then describe the spread of those shares (see the Tracker docs).", LipfastWarning, stacklevel=3)
        if not is_modelled(optimizer):
            self._warn_once("sgd_equivalent", f"lipfast: {type(optimizer).__name__} is not an optimizer lipfast models "
                            "(SGD, Adam, AdamW, RMSprop, Adagrad); drift/diffusion_var/ito are reported as for plain SGD "
                            "with the group's learning rate and flagged sgd_equivalent; first/second_order use the "
                            "real update")

    # -- hooks -----------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return not self._closed and self.step % self.every == 0

    def _on_root_forward(self, module, args, kwargs) -> None:
        if torch.compiler.is_compiling():  # torch.compile(model) after attach, or a compiled training step
            refuse_compiled("the tracked model's forward")
        if in_backward():  # a checkpoint recomputing the model's forward: the forward it repeats was counted
            return
        self.forward_id += 1
        # The batch size every layer's sample dimension is checked against: the first tensor argument's.
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        dim = self._root_dim
        self.batch_size = int(first.shape[dim]) if first is not None and first.dim() > dim else None
        # The backward hooks pass σ_{k+1} of the last step's spectra to the ops as a host number: read the
        # last step back now (on CUDA its copy is queued behind that step's work, so this waits for at most
        # that tail), not once per layer in the middle of the backward pass.
        self._read_back(deliver=False)

    def _sync_hooks(self) -> None:
        """Forward hooks only over steps that are tracked: with ``every=N`` the other steps run the model
        without any lipfast code in its forward (the optimizer's two step hooks count them)."""
        on = self.capturing
        if on == (self._root_handle is not None):
            return
        for cap in self.captures.values():
            cap.hook(on)
        if on:
            self._root_handle = self._root.register_forward_pre_hook(Hook(self._on_root_forward), with_kwargs=True)
        else:
            self._root_handle.remove()
            self._root_handle = None

    def spectrum_before(self, cap: LayerCapture) -> Spectrum | None:
        """The spectrum of ``cap``'s weight as it is now, from the cache when the weight is unchanged;
        None when the weight holds NaN/Inf (after a non-finite step)."""
        if cap.adapter.select():  # a grouped convolution whose top block changed: another matrix
            self._cache.pop(cap.name, None)
        cached = self._cache.get(cap.name)
        if cached is not None and cached.version == cap.weight._version:
            return cached.spec
        W = cap.adapter.matrix(cap.weight)
        if cached is not None:
            if cached.fingerprint is not None and cached.fingerprint == _fingerprint(W):
                cached.version, cached.fingerprint = cap.weight._version, None
                return cached.spec
        if cached is not None and cached.spec.k == min(self.rank, *cached.spec.shape) and cached.spec.shape == tuple(W.shape):
            # Stale after untracked steps (every > 1): the same warm sweep as after a tracked step, one op call.
            spec, stats = self._advance(cap, cached.spec, prediction=False)
            if spec is not None:
                self._fill_host(spec, stats.tolist())
        else:
            spec = self._spectrum(W, cached.spec.basis if cached is not None else None)
        if spec is not None:
            self._cache[cap.name] = _Cached(spec, cap.weight._version)
        return spec

    def _spectrum(self, W: Tensor, basis: Tensor | None) -> Spectrum | None:
        W = W if W.dtype in (torch.float32, torch.float64) else W.float()
        try:
            # Small matrices: the exact spectrum by the same route as track_update's, so that a step that
            # leaves W unchanged reads exactly delta_obs = 0.
            return compute_spectrum(W, self.rank, basis, self.iters if basis is not None else None, self.tol,
                                    impl=self.impl, small="gram")
        except RuntimeError:  # NaN/Inf in W (LAPACK and the subspace iteration both refuse it)
            if bool(torch.isfinite(W).all()):
                raise
            return None

    def _advance(self, cap: LayerCapture, spec: Spectrum,
                 prediction: bool = True) -> tuple[Spectrum | None, Tensor | None]:
        """The spectrum after the optimizer step, warm-started from ``spec``, and ``track_update``'s twenty
        statistics (on the weight's device, unread: :func:`_fill_host` completes the spectrum from them), in
        one op call; ``(None, None)`` when the step left NaN/Inf in the weight. ΔW is read through the old
        top pair riding along in the new spectrum's GEMMs. Without ``prediction`` (a stale spectrum refreshed,
        its statistics unused but the spectrum's) the second-order tail is not solved."""
        W = cap.adapter.weight_matrix()
        W = W if W.dtype in (torch.float32, torch.float64) else W.float()
        m, n = W.shape
        exact = needs_exact(m, n, self.rank)
        basis = spec.basis
        if not exact:
            p = block_size(self.rank, min(m, n))
            basis = basis if basis.shape[1] == p else resize_block(basis, p, 0)
        tol = default_tol(W.dtype) if self.tol is None else float(self.tol)
        try:
            # The top cluster the last track_update chose for this step (1 for a fresh spectrum, or without
            # `cluster`: the pair).
            U, S, V, sigma_next, res, basis, Wt_u1, stats = self.impl.track_update(
                W, basis, spec.U, spec.S, spec.V, spec.host[2], spec.Wt_u1, self.iters, tol, exact,
                spec.__dict__.get("cluster", 1) if self.cluster else 1, prediction)
        except RuntimeError:  # NaN/Inf in W (the subspace iteration refuses it)
            if bool(torch.isfinite(W).all()):
                raise
            return None, None
        new = Spectrum(U=U, S=S, V=V, sigma_next=sigma_next, residuals=res, exact=exact and self.rank >= min(m, n),
                       shape=(m, n), basis=basis, iters=0, Wt_u1=Wt_u1)
        return new, stats

    def _fill_host(self, spec: Spectrum, stats: list[float]) -> None:
        """Complete a spectrum from its ``track_update`` statistics, read back: σ1, σ2, σ_{k+1}, the
        residual, the top two residuals and (iterated spectra) the sweep count."""
        with_host_values(spec, stats[7], stats[8], stats[9], stats[10])
        spec.__dict__["top_residuals"] = (stats[14], stats[15])
        spec.__dict__["cluster"] = int(stats[19]) if stats[19] >= 1 else 1  # (NaN: a step that left NaN in W)
        if not needs_exact(*spec.shape, self.rank):
            object.__setattr__(spec, "iters", int(stats[11]))  # a frozen dataclass, completed once here

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        # The last tracked step's numbers, long computed; its on_record waits for the post-step hook, where
        # an exception it raises comes after this step's update, as on the CPU.
        self._read_back(deliver=False)
        if not self.capturing:
            for cap in self.captures.values():
                # Left over from a tracked step whose optimizer step never came:
                if cap.groups or cap.stats or cap.held:
                    cap.reset()
            return
        with torch.no_grad():
            for name, cap in self.captures.items():
                # The coming step's coefficients first: an adaptive optimizer's P completes the deferred reduction.
                coef = step_coefficients(self.optimizer, cap.weight)
                if coef.precond is not None and not cap.defer:
                    # A kind with no preconditioned statistics (an embedding) or a tied Parameter: SGD's terms at
                    # the group's learning rate, flagged sgd_equivalent (first/second_order use the real update).
                    coef = sgd_equivalent(coef.lr)
                    self._warn_once(f"precond:{name}", f"lipfast: layer '{name}' ({cap.kind}"
                                    f"{', a tied Parameter' if len(cap.uses) > 1 else ''}) has no preconditioned "
                                    f"statistics under {type(self.optimizer).__name__}: its forces are reported as for "
                                    "plain SGD and flagged sgd_equivalent")
                if coef.precond is not None:
                    # The matrix first (a grouped convolution re-chooses its block when the weight changed), then P
                    # read in its layout: the deferred reduction runs on that block.
                    self.spectrum_before(cap)
                cap.flush(None if coef.precond is None else cap.adapter.matrix(coef.precond))
                if cap.dropped_calls:
                    self._warn_once("no_backward", f"lipfast: {cap.dropped_calls} forward call(s) of '{name}' had no "
                                    "backward before optimizer.step(); their inputs were discarded (wrap evaluation "
                                    "passes in torch.no_grad() to avoid capturing them)")
                    cap.dropped_calls = 0
                stats = cap.take_stats()
                grad = cap.weight.grad
                if stats is None or grad is None:
                    self._warn_once("no_stats", f"lipfast: no forward/backward of '{name}' was captured before "
                                    f"optimizer.step() at step {self.step}; that layer has no record for this step")
                    continue
                spec = self.spectrum_before(cap)
                if spec is None:
                    self._pending[name] = dict(nonfinite_weights=True, N=int(stats[0].shape[0]))
                    continue
                self._pending[name] = self._prepare(cap, spec, stats, grad, coef)
            if self._group is not None:  # every rank, every tracked step, even with nothing pending here
                self._inflight = self._group.launch(list(self.captures), self._pending, self._logged)

    def _prepare(self, cap: LayerCapture, spec: Spectrum, stats, grad: Tensor, coef: StepCoefficients) -> dict:
        """Everything that needs the state before the step: the gradient's reductions, the momentum
        buffer's projection, and float64 projections of W that the step's ΔW will be read from. For an
        adaptive optimizer every gradient is the preconditioned P ⊙ G (the statistics are already)."""
        proj, hess, hess_lo, hess_hi, gv, gtu = stats
        N = int(proj.shape[0])
        loss_factor = float(N) if self.loss_reduction == "sum" else 1.0
        scale = 1.0 if self.loss_reduction == "sum" else float(N)
        # The op reads a weight-shaped gradient (and momentum buffer) as its matrix itself: where the matrix is
        # the weight's rows (Linear, Conv2d), no view is made here (one dispatched op less per tensor and step).
        G = grad if cap.adapter.as_rows else cap.adapter.matrix(grad)
        known = None if coef.known is None else coef.known if cap.adapter.as_rows else cap.adapter.matrix(coef.known)
        # ḡ·v1 and ḡᵀ·u1 from the per-sample sums, so that ḡ is exactly the mean of the G_i whose spread the
        # noise terms measure (gradient clipping or an extra loss term change weight.grad, not the G_i). Under
        # DDP ḡ must be the global batch's, which weight.grad is after DDP's all-reduce.
        products = (gv, gtu) if self._group is None and gv is not None else (None, None)
        if coef.precond is None and products[0] is not None and not cap.uses_checked:
            cap.uses_checked = True  # (under an adaptive optimizer gv is Σ (P ⊙ G_i) v1, not weight.grad's)
            self._check_uses(cap, spec, cap.adapter.matrix(grad), gv)
        if coef.precond is not None and products[0] is None:
            G = cap.adapter.matrix(coef.precond).to(G.dtype) * cap.adapter.matrix(grad)
        # With the momentum (known) term u1ᵀ(known_scale·M)v1 as the result's last entry: no ops of its own.
        sums = self.impl.gradient_statistics(proj, hess, hess_lo, hess_hi, G, spec.U, spec.S, spec.V,
                                             spec.host[2], scale, loss_factor, *products, known, coef.known_scale)
        # ΔW will be read through W·v1 and Wᵀ·u1 (all MATH.md §2 needs of it): before the step they come
        # free with the spectrum (W v1 = σ1 u1 for a Ritz pair; Wᵀu1 from its last sweep), after it they
        # ride along in the next spectrum's GEMMs. No copy of W is kept.
        # The record needs coef's scalars only: let go of its weight-sized tensors (P, the known step) before
        # the step, rather than hold them until the records are read.
        coef = dataclasses.replace(coef, known=None, precond=None)
        return dict(spec=spec, sums=sums, coef=coef, c=coef.fresh * loss_factor)

    def _check_uses(self, cap: LayerCapture, spec: Spectrum, G: Tensor, gv: Tensor) -> None:
        """Once per layer (its first tracked step, one GEMV and a host read): ``weight.grad·v1`` must be the
        captured calls' ``Σ_i G_i v1``, up to a scale (gradient clipping, the loss reduction) and a multiple of
        ``u1`` (an L2 penalty adds ``λ W v1 = λσ1 u1``). A part neither explains is a use of the weight lipfast
        does not see (custom code such as ``x @ weight.T``): warn, since the noise terms cover captured calls only."""
        g = G.double() @ spec.V64[:, 0]
        A = torch.stack((gv.double(), spec.U64[:, 0]), dim=1)
        if g.shape[0] <= 2 or not bool(torch.isfinite(g).all() and torch.isfinite(A).all()):
            return
        fit = torch.linalg.lstsq(A, g.unsqueeze(1)).solution
        left, norm = float((g - (A @ fit).squeeze(1)).norm()), float(g.norm())
        # Rounding: ~1e-6 of the norm in float32; bfloat16/float16 activations or weights leave ~1e-3.
        if left > (0.05 if cap.low_precision else 1e-3) * norm:
            self._warn_once(f"uses:{cap.name}", (
                f"lipfast: layer '{cap.name}': {left / norm:.1%} of weight.grad·v1 is not explained by the calls the "
                "tracker captured (nor by a rescaling such as gradient clipping, or an L2 penalty): the weight is also "
                "used by code lipfast does not see (x @ weight.T, F.linear on it), a loss term on the weight itself "
                "(other than L2) or a hook changed its gradient. The record's noise terms cover the captured calls "
                "only; first_order and second_order use the real update."))

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        try:
            if self._inflight is not None:
                self._reduce_all()
            if self._pending:
                self._read_back(deliver=False)  # (normally read already, by the pre-step hook)
                with torch.no_grad():
                    entries = [self._measure(self.captures[name], p) for name, p in self._pending.items()]
                self._unread = _StepReadback(self.step, self._logged, entries)
                if not self._unread.deferred or self.on_nonfinite == "raise":
                    self._read_back(deliver=False)
            self._deliver()
        finally:
            # The optimizer step happened whatever an on_record callback (or on_nonfinite="raise") raised:
            # count it, so the next step is numbered on instead of repeating this one's step index.
            self._pending.clear()
            self._logged = {}
            self.step += 1
            self._sync_hooks()

    def _read_back(self, deliver: bool = True) -> None:
        """Turn the last tracked step's device results into its records (and, with ``deliver``, hand them
        to ``on_record``). On CUDA that happens lazily, at the next optimizer step or when records are
        read, so that a tracked step never waits for the GPU; on the CPU, at once."""
        unread, self._unread = self._unread, None
        if unread is not None:
            vectors, logged = unread.read()
            try:
                rows = [self._record(cap, p, spec_after, vectors[i] if i is not None else None, unread.step)
                        for cap, p, spec_after, i in unread.entries]
            finally:
                unread.done()
            if self._records_here:
                net = self._network_record(rows, unread.step, logged)
                if self.keep_records:
                    self._records.extend(rows)
                    self._network.append(net)
                if self.on_record is not None:
                    self._undelivered.append((rows, net))
        if deliver:
            self._deliver()

    def _deliver(self) -> None:
        """``on_record`` for every step read back since the last call, oldest first."""
        while self._undelivered:
            rows, net = self._undelivered.pop(0)
            self.on_record(rows, net)

    @property
    def records(self) -> list[dict]:
        """One dict per tracked (step, layer), API.md's schema."""
        self._read_back()
        return self._records

    @property
    def network(self) -> list[dict]:
        """One dict per tracked step, API.md's schema."""
        self._read_back()
        return self._network

    # -- records ---------------------------------------------------------------------------------
    def _measure(self, cap: LayerCapture, p: dict) -> tuple:
        """The device half of a layer's record: the spectrum after the step (cached for the next step) and
        every number the record needs, unread, as the parts of its vector (``track_update``'s statistics,
        the gradient's sums, the momentum term): ``(cap, p, spectrum, parts)``. :class:`_StepReadback` joins
        every layer's parts in one ``cat`` (a ``cat``, a ``zeros`` and three ``.to`` per layer took ~25 µs a layer)."""
        if p.get("nonfinite_weights"):
            return cap, p, None, None
        spec_after, stats = self._advance(cap, p["spec"])
        if spec_after is not None:
            self._cache[cap.name] = _Cached(spec_after, cap.weight._version)
            # (a grouped convolution's block σ1s after the step: read back with the vector, not now)
            p["after_step"] = cap.adapter.after_step()
        sums = self._reduce(p["sums"])
        stats = stats if stats is not None else torch.full((_N_TRACK_STATS,), NAN, dtype=torch.float64, device=sums.device)
        # (sums: gradient_statistics' 11 values and, last, the momentum term known_scale·u1ᵀMv1)
        return cap, p, spec_after, (stats, sums)

    def _record(self, cap: LayerCapture, p: dict, spec_after: Spectrum | None, values: list[float] | None,
                step: int) -> dict:
        """The host half: a layer's record from :meth:`_measure`'s vector, read back."""
        if p.get("nonfinite_weights"):
            return self._nonfinite_row(cap, p["N"], step)
        spec: Spectrum = p["spec"]
        coef: StepCoefficients = p["coef"]
        c = p["c"]
        update, sums, known = (values[:_N_TRACK_STATS], values[_N_TRACK_STATS:-1], values[-1])
        r1, r2 = _top_residuals(spec)  # ‖Wᵀu_j − σ_j v_j‖ of the top two pairs the record's σ1, σ2 come from
        overlap = min(update[12:14])  # |u1ᵀu1'| and |v1ᵀv1'| of the old and the new top pair (NaN: no new pair)
        if spec_after is not None and not update[7] > 0:
            # σ1 after the step NaN: the step left NaN/Inf in W (the CUDA kernel says so with NaN, the CPU
            # kernel raised: _advance gave None). σ1 = 0: W is zero, and so is the warm block it leaves. Either
            # way the next step starts the spectrum afresh.
            if self._cache.get(cap.name) is not None and self._cache[cap.name].spec is spec_after:
                del self._cache[cap.name]
            if not math.isfinite(update[7]):
                spec_after = None
        if spec_after is not None:
            self._fill_host(spec_after, update)
            first, second, _, _, finite_after, x_norm, y_norm = update[:7]
            # How far the step rotates the top singular pair, against the gap (MATH.md §1 degenerate gap); a
            # step that took a cluster of c > 1 pairs: ‖ΔW on the cluster‖₂ against the gap below the cluster.
            dw_norm = max(x_norm, y_norm)
            cluster_step, cluster_gap, cluster = update[16:19]
            sigma_next = spec_after.host[0]
        else:  # the step left NaN/Inf in W
            first = second = dw_norm = sigma_next = cluster_step = cluster_gap = NAN
            cluster = 1
            finite_after = 0.0
        N, sum_s, sum_ss, h, h_lo, h_hi, K, hg, hg_lo, hg_hi, finite_grad = sums
        N = int(N)
        sigma, sigma2, _ = spec.host
        # A grouped convolution's matrix is its top block: the next singular value of the whole block-diagonal
        # weight may be another block's σ1.
        sigma2 = max(sigma2, cap.adapter.rival)
        sigma_err = _sigma_error(sigma, sigma2, r1, r2)
        flags = []

        # The SDE terms of MATH.md §3 from one mini-batch; sums are shifted by K ≈ mean(s) so the
        # variance keeps its digits.
        # w2 = Σ w_i², set under DDP when local batches differ (the step weighs sample i by w_i = 1/(R·N_r)):
        # weighted mean, W₂-scaled noise terms, effective batch 1/W₂ (lipfast.distributed derives them).
        w2 = p.get("w2")
        mean_s = K + (sum_s / N if w2 is None else p["wshift"])
        fpc = 1.0
        if self.dataset_size is not None:
            fpc = max(self.dataset_size - (N if w2 is None else 1.0 / w2), 0) / (self.dataset_size - 1)
        drift = -c * mean_s - coef.decay * sigma + known
        if N > 1:
            var_s = max(sum_ss - sum_s * sum_s / N, 0.0) / (N - 1)
            if w2 is None:
                k_ito = c * c / (2 * N) * fpc / (N - 1)
                diffusion = c * c * var_s / N * fpc
            else:
                k_ito = c * c * w2 * fpc / (2 * N * (1 - w2))
                diffusion = c * c * var_s * w2 * fpc
            ito, ito_lo, ito_hi = k_ito * (h - N * hg), k_ito * (h_lo - N * hg_hi), k_ito * (h_hi - N * hg_lo)
        else:
            diffusion = ito = ito_lo = ito_hi = NAN
        gap = (sigma - sigma2) / sigma if sigma > 0 else 0.0
        if cluster > 1:
            step_ratio = cluster_step / cluster_gap if cluster_gap > 0 else math.inf
        else:
            step_ratio = dw_norm / (sigma - sigma2) if sigma > sigma2 else math.inf
        delta_obs, delta_pred = sigma_next - sigma, first + second
        nonfinite = not (finite_after and finite_grad)
        # Why the step's expansion is not to be trusted, each flag from a measurement (the Tracker docs).
        if sigma_err > SIGMA_RTOL * sigma:
            flags.append("unconverged")
        if gap < self.gap_tol:
            flags.append("small_gap")
        if step_ratio > self.step_tol:
            flags.append("large_step")
        # The new top pair is closer to the complement of the old top pair (of the old cluster's span, when the
        # step took a cluster) than to it, or (grouped convolutions) another block of the weight overtook the one
        # the record follows.
        if overlap * overlap < 0.5 or (spec_after is not None and cap.adapter.overtaken(sigma_next)):
            flags.append("crossing")
        if abs(delta_obs - delta_pred) > self.closure_tol * abs(delta_obs) + CLOSURE_FLOOR * sigma:
            flags.append("closure")
        degenerate = bool(flags)
        row = dict(step=step, layer=cap.name, kind=cap.kind, m=cap.m, n=cap.n, batch=N, lr=coef.lr,
                   sigma=sigma, sigma2=sigma2, sigma_next=sigma_next, delta_obs=delta_obs,
                   first_order=first, second_order=second, delta_pred=delta_pred, drift=drift,
                   diffusion_var=diffusion, ito=ito, ito_lo=ito_lo, ito_hi=ito_hi, gap=gap, degenerate=degenerate,
                   residual=spec.residual / sigma if sigma > 0 else 0.0, sigma_err=sigma_err, nonfinite=nonfinite,
                   flag_names="", group=cap.adapter.group, shared_with=";".join(cap.shared_with))
        if nonfinite:
            flags.append("nonfinite")
            if self.on_nonfinite == "raise":
                raise FloatingPointError(f"lipfast: non-finite gradient or weights in layer '{cap.name}' at step "
                                         f"{step} (on_nonfinite='raise')")
        # The forces are derivatives at the current W: defined wherever σ1 > σ2, whatever the step did.
        tied = _unresolved_gap(spec, sigma, sigma2, r2)
        if tied or nonfinite:
            if tied:
                flags.append("unresolved_gap")
            row.update({f: NAN for f in _FORCE_FIELDS})
        if N == 1:
            flags.append("single_sample")
        if not coef.exact:
            flags.append("sgd_equivalent")
        row["flag_names"] = ";".join(flags)
        return row

    def _nonfinite_row(self, cap: LayerCapture, N: int, step: int) -> dict:
        """A step taken from weights that already hold NaN/Inf: nothing is measurable."""
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"lipfast: non-finite weights in layer '{cap.name}' at step {step} "
                                     "(on_nonfinite='raise')")
        row = {f: NAN for f in LAYER_FIELDS}
        row.update(step=step, layer=cap.name, kind=cap.kind, m=cap.m, n=cap.n, batch=N,
                   lr=float(find_group(self.optimizer, cap.weight)["lr"]), degenerate=False, nonfinite=True,
                   flag_names="nonfinite", group=cap.adapter.group, shared_with=";".join(cap.shared_with))
        return row

    def _reduce_all(self) -> None:
        """Data parallelism: wait for the step's all-reduce (launched at the end of the pre-step hook) and
        replace every pending layer's sums with the global batch's (:mod:`lipfast.distributed`)."""
        inflight, self._inflight = self._inflight, None
        self._logged = inflight.finish(self._pending, self.loss_reduction, self.step)

    def _reduce(self, sums: Tensor) -> Tensor:
        """The sums of every sample of the step (under DDP already all-reduced by :meth:`_reduce_all`)."""
        return sums

    @staticmethod
    def _network_record(rows: list[dict], step: int, logged: dict[str, float]) -> dict:
        """Log-space aggregation over layers (MATH.md §3, Itô on log σ)."""
        def total(f):
            return sum((f(r) for r in rows), 0.0)
        return dict(
            step=step,
            log_bound=total(lambda r: _log(r["sigma"])),
            log_bound_next=total(lambda r: _log(r["sigma_next"])),
            drift=total(lambda r: r["drift"] / r["sigma"]),
            diffusion_var=total(lambda r: r["diffusion_var"] / r["sigma"] ** 2),
            ito=total(lambda r: r["ito"] / r["sigma"] - 0.5 * r["diffusion_var"] / r["sigma"] ** 2),
            loss=float(logged.get("loss", NAN)),
            train_acc=float(logged.get("train_acc", NAN)),
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LipfastWarning, stacklevel=4)

    # -- public API ------------------------------------------------------------------------------
    def log(self, loss: float | Tensor | None = None, train_acc: float | Tensor | None = None) -> None:
        """Attach the current step's loss / training accuracy to its network record (call before
        ``optimizer.step()``). Optional: without it those fields are NaN."""
        # A tensor is kept (detached) and read back with the step's records: no wait for the GPU here.
        for key, value in (("loss", loss), ("train_acc", train_acc)):
            if value is not None:
                self._logged[key] = value.detach().reshape(()) if isinstance(value, Tensor) else float(value)

    def to_pandas(self):
        """``(layer_frame, network_frame)`` as pandas DataFrames (pandas: the ``run`` extra). The network
        frame has ``loss``/``train_acc`` only when :meth:`log` was given them."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError('Tracker.to_pandas needs pandas: pip install "lipfast[run]" (or pandas)') from exc
        network = pd.DataFrame(self.network, columns=list(NETWORK_FIELDS))
        # A column the loop never logged (tracker.log) would be NaN on every step: leave it out instead.
        unlogged = [c for c in ("loss", "train_acc") if network[c].isna().all()]
        return (pd.DataFrame(self.records, columns=list(LAYER_FIELDS)), network.drop(columns=unlogged))

    def state_dict(self) -> dict:
        """Step counter and warm-start spectra; loads with ``torch.load(weights_only=True)``."""
        self._read_back()
        layers = {}
        for name, cached in self._cache.items():
            s = cached.spec
            W = self.captures[name].adapter.matrix(self.captures[name].weight)
            layers[name] = dict(U=s.U, S=s.S, V=s.V, sigma_next=s.sigma_next, residuals=s.residuals,
                                exact=s.exact, shape=list(s.shape), basis=s.basis, iters=s.iters, Wt_u1=s.Wt_u1,
                                fingerprint=list(_fingerprint(W)) if cached.version == self.captures[name].weight._version
                                else None)
        return {"format": _STATE_FORMAT, "step": self.step, "rank": self.rank, "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Continue step numbering and warm starts from :meth:`state_dict` (load the model first)."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Tracker.load_state_dict: expected a lipfast tracker state of format {_STATE_FORMAT}, "
                             f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
        unknown = set(state["layers"]) - set(self.captures)
        if unknown:
            raise ValueError(f"Tracker.load_state_dict: the state has layers {sorted(unknown)} this tracker does not "
                             f"track ({sorted(self.captures)})")
        self._read_back()
        self.step = int(state["step"])
        self._cache.clear()
        for name, s in state["layers"].items():
            spec = Spectrum(U=s["U"], S=s["S"], V=s["V"], sigma_next=s["sigma_next"], residuals=s["residuals"],
                            exact=bool(s["exact"]), shape=tuple(s["shape"]), basis=s["basis"], iters=int(s["iters"]),
                            Wt_u1=s["Wt_u1"])
            fp = tuple(s["fingerprint"]) if s.get("fingerprint") is not None else None
            self._cache[name] = _Cached(spec, version=None, fingerprint=fp)
        self._sync_hooks()

    def close(self) -> None:
        """Read back the last step's records, remove every hook and drop buffered tensors. Idempotent."""
        try:
            self._read_back()
        finally:
            self._detach()

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._closed = True
        self._sync_hooks()
        for cap in self.captures.values():
            cap.remove()
        self._pending.clear()
        if self._inflight is not None:  # a step's all-reduce left in flight (closed between its hooks)
            self._group.retire(self._inflight.work)
        self._inflight = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Tracker(layers={list(self.captures)}, rank={self.rank}, every={self.every}, step={self.step}, "
                f"records={len(self._records)})")


class _FanOut:
    """Several ``on_record`` sinks as one: each gets every step, in list order."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def __call__(self, rows: list[dict], net: dict) -> None:
        for sink in self.sinks:
            sink(rows, net)

    def __repr__(self) -> str:
        return f"_FanOut({self.sinks!r})"


def _sinks(on_record):
    """``on_record`` as one callable (or None); a list or tuple of callables fans out to each."""
    if on_record is None or (callable(on_record) and not isinstance(on_record, (list, tuple))):
        return on_record
    if isinstance(on_record, (list, tuple)):
        bad = [s for s in on_record if not callable(s)]
        if bad:
            raise TypeError(f"Tracker: on_record must be a callable or a list of callables, got a list holding "
                            f"{type(bad[0]).__name__} {bad[0]!r}")
        return _FanOut(list(on_record)) if len(on_record) != 1 else on_record[0]
    raise TypeError(f"Tracker: on_record must be a callable (rows, network) -> None, a list of them, or None, "
                    f"got {type(on_record).__name__}")


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), Tensor)


def _use_reason(name: str, module: nn.Module, weight: Tensor, keep, owned: set[int]) -> str | None:
    """Why a supported module's matrix is not tracked, or None when it is."""
    if not keep(name, module):
        return "excluded by the layers argument"
    if id(weight) not in owned:
        return "its weight is not among the optimizer's parameters"
    if not weight.requires_grad:
        return "its weight does not require grad (frozen)"
    return None


def _batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of a torch Transformer module (None for any other module)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _batch_first(module.layers[0])
    if isinstance(module, nn.Transformer):
        return module.batch_first
    return None


def _outer_layouts(root: nn.Module) -> list[tuple[nn.Module, int]]:
    """The outermost torch Transformer modules and the dim of their input that holds the samples."""
    found, inside = [], ()
    for name, module in root.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
            continue
        first = _batch_first(module)
        if first is not None:
            found.append((module, 0 if first else 1))
            inside += (name,)
    return found


def _check_batch_dim(model: nn.Module, batch_dim) -> int | dict[str, int] | None:
    if batch_dim is None:
        return None
    if isinstance(batch_dim, int) and not isinstance(batch_dim, bool):
        if batch_dim < 0:
            raise ValueError("Tracker: batch_dim must be an int >= 0 or a dict {layer name: int >= 0}, "
                             f"got {batch_dim!r}")
        return batch_dim
    if isinstance(batch_dim, dict):
        names = dict(model.named_modules())
        for k, v in batch_dim.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Tracker: batch_dim must map layer names to ints >= 0, got {{{k!r}: {v!r}}}")
            if k not in names:
                raise ValueError(f"Tracker: batch_dim names {k!r}, which is not a module of the model")
        return dict(batch_dim)
    raise TypeError("Tracker: batch_dim must be None, an int or a dict {layer name: int}, "
                    f"got {type(batch_dim).__name__}")


def _parameter_reason(module: nn.Module, pname: str) -> str:
    """Why a parameter with 2+ dimensions that is not a module's ``weight`` is not tracked."""
    if isinstance(module, nn.RNNBase):
        return f"a recurrent layer's weight ({type(module).__name__}): not supported"
    if isinstance(module, nn.MultiheadAttention):
        part = {"in_proj_weight": "packed q/k/v projection", "q_proj_weight": "separate q/k/v projections",
                "k_proj_weight": "separate q/k/v projections", "v_proj_weight": "separate q/k/v projections"}
        return f"MultiheadAttention's {part.get(pname, pname)}: not supported yet"
    if isinstance(module, parametrize.ParametrizationList):
        return "the original of a parametrized weight (torch.nn.utils.parametrize): not supported"
    return "a bare Parameter used by the module's own code: lipfast sees no layer call to capture"


def _by_reason(skipped: dict[str, str]) -> list[str]:
    """One line per reason, in order of first appearance: the reason, the count and the names (the first 3
    and how many more, when there are more than 4)."""
    groups: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        groups.setdefault(reason, []).append(name or "<root>")
    lines = []
    for reason, names in groups.items():
        shown = ", ".join(names) if len(names) <= 4 else ", ".join(names[:3]) + f" … and {len(names) - 3} more"
        lines.append(f"{reason} — {len(names)}: {shown}")
    return lines


def _log(x: float) -> float:
    return math.log(x) if x > 0 else NAN
