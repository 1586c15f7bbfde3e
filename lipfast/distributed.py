"""Data parallelism: the tracker under ``torch.distributed`` (DDP), and launching local process groups.

**What is all-reduced.** Every rank captures the per-sample statistics of its own samples. After
backward, DDP has averaged the gradient, so ``K = u1ᵀḡv1`` and ``H[ḡ,ḡ]`` (computed from it) are the
same on every rank; what differs per rank are the additive sums of MATH.md §3: ``N, Σ(s−K), Σ(s−K)²,
ΣH, ΣH_lo, ΣH_hi``. At each tracked step the tracker packs those sums of *every* tracked layer, a
non-finite count, σ1 (to check that the ranks agree), the weighting terms below and the logged
loss/accuracy into ONE float64 vector and launches ONE asynchronous ``all_reduce(SUM)`` right after
its pre-step reductions (:meth:`StepBucket.launch`); the post-step hook waits for it
(:meth:`StepBucket.finish`) and builds the records from the global sums. Untracked steps
(``every``) communicate nothing. The vector has ``17·layers + 4`` numbers.

**Spectra** are not communicated: every rank computes them from its replica of the weights, which DDP
keeps identical (the same initial broadcast, the same all-reduced gradient, the same optimizer), and
the spectrum code is deterministic for identical inputs (same warm-start basis, same sweeps); so each
rank uses exactly the ``u1, v1`` the others use. The bucket carries ``Σσ1`` and ``Σσ1²`` per layer: a
spread across ranks above ``SPREAD_RTOL·σ1`` means a rank sees a different model (weights changed
outside DDP on one rank, different models built per rank), and every rank raises the same error.

**Per-sample weights.** With ``loss_reduction="mean"`` rank ``r`` differentiates the mean loss of its
``N_r`` samples and DDP averages over the ``R`` ranks, so the step uses

    ḡ = (1/R) Σ_r (1/N_r) Σ_{i∈r} G_i = Σ_i w_i G_i,    w_i = 1/(R·N_r),   Σ_i w_i = 1.

Each rank scales its per-sample statistics by its own ``N_r`` (so ``s_i = ⟨J, G_i⟩`` is sample i's own
gradient's projection) and the records mean, with ``N = Σ_r N_r`` and ``W₂ = Σ_i w_i² = Σ_r 1/(R²N_r)``:

- ``drift = −c·Σ_i w_i s_i`` (= −c⟨J, ḡ⟩, the expected first-order change of the step taken);
- ``diffusion_var = c²·W₂·Var̂(s)``: for i.i.d. samples ``Var[Σ w_i s_i] = W₂·Var(s)``, and ``Var̂`` is
  the ordinary unbiased sample variance of all ``N`` values of ``s_i`` (unbiased whatever the weights);
- ``ito = (c²/2)·W₂·tr(HΣ̂₁)`` with ``tr(HΣ̂₁) = [Σ_i H[G_i,G_i] − N·H[ḡ,ḡ]] / (N(1 − W₂))``, unbiased
  because ``E[H[ḡ,ḡ]] = H[g,g] + W₂·tr(HΣ₁)`` and ``E[Σ_i H[G_i,G_i]] = N(H[g,g] + tr(HΣ₁))``;
- with ``dataset_size = D`` the finite-population factor is ``(D − B_eff)/(D − 1)``, ``B_eff = 1/W₂``.

``1/W₂ = R·harmonic_mean(N_r) <= N`` is the effective batch size. With equal local batches
``w_i = 1/N``, ``W₂ = 1/N`` and every formula is the single-process one: the records equal those of
one process fed the global batch (to rounding). With ``loss_reduction="sum"`` DDP's average makes the
step ``−η(1/R)Σ_i G_i``: equal weights ``1/N`` and ``c = η·N/R``; when local batches differ, each rank's
shift ``K_r`` (computed with its own ``N_r``) is moved to the common one after the reduction (exact
algebra on three extra sums). The network record's ``loss``/``train_acc`` are the mean over ranks of
the values each rank logged (DDP's objective; the global batch's mean with equal local batches).

Every rank must run forward/backward through every tracked layer at every tracked step (DDP needs that
too, unless ``find_unused_parameters``), create the tracker with the same arguments, and step and close
it at the same steps.

**FSDP is not supported yet** (a clear error at attach): each rank holds only a shard of every weight,
while the spectra need whole matrices. Supporting it would cost either an all-gather of every tracked
weight per tracked step (``m·n`` numbers per layer, one FSDP forward's worth of traffic, done outside
FSDP's prefetch schedule) or a sharded subspace iteration (two all-reduces of ``[m,k]``/``[n,k]``
blocks per sweep per layer), plus ΔW projections on the shards. Tensor parallelism (DTensor weights)
is refused for the same reason.

**Launching.** :func:`spawn` runs a function in ``nproc`` local processes joined in a process group
(gloo on CPU, nccl on CUDA, rendezvous through a file), with a deadline and the failing rank's error
reported in the parent (:class:`DistributedRunError`). :func:`run_context` joins the group ``torchrun``
describes through its environment variables.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["DistributedRunError", "StepBucket", "TrackerGroup", "attach", "run_context", "spawn",
           "unsupported_parallelism", "SPREAD_RTOL"]

# Relative spread of σ1 across ranks above which the ranks are taken to see different models: far
# above float64 summation rounding (~1e-16·R) and float32 kernel nondeterminism (~1e-7), far below any
# real difference between models.
SPREAD_RTOL = 1e-6
# Collectives (and the rendezvous) of the process groups lipfast creates give up after this long; the
# environment variable LIPFAST_PG_TIMEOUT (seconds) overrides it, e.g. for tests that must never hang.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
FAILURE_GRACE = 5.0  # seconds the other ranks get to end on their own after one failed

# Columns of one layer's row in the step bucket.
(_N, _S1, _S2, _H, _HLO, _HHI, _NONFINITE, _HAS_N, _SIG_CNT, _SIG, _SIG2, _INV_N, _S1_INV_N, _NK, _NKK,
 _KS1, _NN) = range(17)
_COLS = 17
_TAIL = 4  # loss sum, loss count, train_acc sum, train_acc count


class DistributedRunError(RuntimeError):
    """A rank of a data-parallel run failed (the message names the rank and its error)."""


def _dist():
    import torch.distributed as dist
    return dist


# -- what the tracker supports ------------------------------------------------------------------------
def unsupported_parallelism(model: nn.Module) -> str | None:
    """Why the tracker cannot measure ``model``'s layers (sharded weights), or None."""
    kinds = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(path, fromlist=["FSDPModule"])
            kinds.append(module.FSDPModule)
        except (ImportError, AttributeError):
            pass
    kinds = tuple(kinds)
    for name, module in model.named_modules():
        if kinds and isinstance(module, kinds):
            where = f" ('{name}')" if name else ""
            return (f"the model{where} is sharded with FSDP ({type(module).__name__}); FSDP is not supported yet: each "
                    "rank holds only a shard of every weight and the spectra need whole weight matrices (supporting "
                    "it means all-gathering every tracked weight per tracked step, or a sharded subspace "
                    "iteration). Wrap the model with DistributedDataParallel instead, or track an unsharded copy")
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return (f"parameter '{name}' is a DTensor (tensor parallel or FSDP2 sharding); sharded weights are not "
                    "supported yet: the spectra need whole weight matrices. Use DistributedDataParallel")
    return None


def attach(model: nn.Module, records_on: str) -> "TrackerGroup | None":
    """The process group a tracker of ``model`` reduces over: None unless ``model`` is DDP-wrapped.

    A model that is not wrapped is tracked on its own samples only, even inside an initialised process
    group (each rank then has its own, independent tracker).
    """
    if records_on not in ("rank0", "all"):
        raise ValueError(f"Tracker: records_on must be 'rank0' or 'all', got {records_on!r}")
    reason = unsupported_parallelism(model)
    if reason is not None:
        raise TypeError(f"Tracker: {reason}")
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "Tracker: the model is wrapped in DistributedDataParallel but no torch.distributed process group is "
            "initialised (was destroy_process_group() called, or the model built in another process?); "
            "call torch.distributed.init_process_group(...) on every rank before attaching the tracker")
    group = getattr(model, "process_group", None)
    return TrackerGroup(group, records_on)


class TrackerGroup:
    """The tracker's view of a DDP process group: its rank, size, and the device collectives use."""

    def __init__(self, group, records_on: str):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                       else torch.device("cpu"))
        self.records_here = records_on == "all" or self.rank == 0
        self._retired = None

    def retire(self, work) -> None:
        """Keep the last step's collective (finished, or abandoned at close) referenced until the next one.
        Dropped at once, its last reference can be gloo's worker thread's, whose release of the bucket tensor
        then takes the GIL; if the interpreter is exiting by then, that aborts a run that finished (SIGABRT,
        ``terminate called without an active exception``; pytorch/pytorch#190489). A two-rank loop of five
        steps and a normal exit aborted in 9 of 30 runs; holding it here, in 0 of 60."""
        self._retired = work

    # -- attach: the same model on every rank -------------------------------------------------------
    def check_same_model(self, description: list | None) -> None:
        """One all-reduce of a fingerprint of ``description`` (tracked names, shapes, arguments); a
        mismatch raises the same error on every rank. ``description=None`` (this rank failed to attach)
        takes part in the collective so the others do not wait for it, and counts as a mismatch."""
        dist = _dist()
        if description is None:
            h = -1
        else:
            digest = hashlib.sha256(repr(description).encode()).digest()
            h = int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) == -int(t[1]):
            return
        detail = ""
        try:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, description, group=self.group)
            detail = "; ".join(f"rank {r}: {_describe(d)}" for r, d in enumerate(gathered))
        except Exception:  # noqa: BLE001 - the message is best effort, the error is not
            detail = f"this rank ({self.rank}): {_describe(description)}"
        raise RuntimeError(
            "Tracker: a rank sees a different model: the tracked layers (names, shapes) or the tracker's "
            f"arguments differ across the {self.world} ranks of the DDP process group ({detail}). Build the same "
            "model and create the Tracker with the same arguments on every rank")

    # -- every tracked step ----------------------------------------------------------------------
    def launch(self, names: list[str], pending: dict[str, dict], logged: dict) -> "StepBucket":
        """Pack this rank's sums of every tracked layer (zeros for a layer without samples here) and
        start the all-reduce; :meth:`StepBucket.finish` waits for it in the post-step hook."""
        dist = _dist()
        dev = self.device
        rows, sig, has_spec = [], [], []
        for name in names:
            p = pending.get(name)
            if p is not None and not p.get("nonfinite_weights"):
                rows.append(p["sums"].to(dev, torch.float64))
                sig.append(p["spec"].S[:1].to(dev, torch.float64))
                has_spec.append(1.0)
            else:  # no samples here (zeros, finite), or NaN/Inf weights (the count, non-finite)
                n = 0.0 if p is None else float(p["N"])
                rows.append(torch.tensor([n] + [0.0] * 9 + [1.0 if p is None else 0.0, 0.0], dtype=torch.float64).to(dev))
                sig.append(torch.zeros(1, dtype=torch.float64).to(dev))
                has_spec.append(0.0)
        S = torch.stack(rows)                                     # [L, 12]: gradient_statistics' layout
        sigma = torch.cat(sig)                                    # [L]
        N, S1, K = S[:, 0], S[:, 1], S[:, 6]
        inv_n = torch.where(N > 0, 1.0 / N.clamp(min=1.0), torch.zeros_like(N))
        M = torch.stack([N, S1, S[:, 2], S[:, 3], S[:, 4], S[:, 5], 1.0 - S[:, 10], (N > 0).double(),
                         torch.tensor(has_spec, dtype=torch.float64).to(dev), sigma, sigma * sigma,
                         inv_n, S1 * inv_n, N * K, N * K * K, K * S1, N * N], dim=1)
        tail = torch.tensor(_logged_tail(logged), dtype=torch.float64).to(dev)
        bucket = torch.cat([M.reshape(-1), tail])
        work = dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return StepBucket(self, list(names), bucket, work)


def _logged_tail(logged: dict) -> list[float]:
    out = []
    for key in ("loss", "train_acc"):
        v = float(logged.get(key, math.nan))
        out += [v, 1.0] if math.isfinite(v) else [0.0, 0.0]
    return out


def _describe(description) -> str:
    if description is None:
        return "no tracker (attaching failed on that rank)"
    layers, args = description
    return f"layers {[(n, tuple(s)) for n, _, s in layers]}, {args}"


class StepBucket:
    """One tracked step's all-reduce in flight."""

    def __init__(self, owner: TrackerGroup, names: list[str], bucket: Tensor, work):
        self.owner = owner
        self.names = names
        self.bucket = bucket
        self.work = work

    def finish(self, pending: dict[str, dict], loss_reduction: str, step: int) -> dict:
        """Wait for the all-reduce and turn each pending layer's local sums into the global ones (in place:
        ``p["sums"]``, and for unequal local batches ``p["w2"]``/``p["wshift"]``, or ``p["c"]`` in sum mode).
        Returns the step's logged ``loss``/``train_acc``, averaged over the ranks that logged them.

        Raises RuntimeError on every rank when the ranks' σ1 disagree (a rank sees a different model)."""
        if self.work is not None:
            self.work.wait()
            self.owner.retire(self.work)
        R = self.owner.world
        flat = self.bucket.to("cpu").tolist()
        L = len(self.names)
        table = [flat[i * _COLS:(i + 1) * _COLS] for i in range(L)]
        tail = flat[L * _COLS:]
        # The agreement check runs over every layer, pending here or not: all ranks decide alike.
        for name, col in zip(self.names, table):
            cnt = col[_SIG_CNT]
            if cnt < 2:
                continue
            mean = col[_SIG] / cnt
            spread2 = max(col[_SIG2] - col[_SIG] * col[_SIG] / cnt, 0.0) / cnt
            if not (spread2 <= (SPREAD_RTOL * abs(mean)) ** 2):
                raise RuntimeError(
                    f"lipfast: a rank sees a different model: σ1 of layer '{name}' differs across the {R} ranks at "
                    f"step {step} (mean {mean:.9g}, spread {math.sqrt(spread2) if math.isfinite(spread2) else spread2:.3g}); "
                    "DDP keeps the replicas identical, so a rank's weights were changed outside DDP or the ranks "
                    "built different models")
        for name, col in zip(self.names, table):
            p = pending.get(name)
            if p is None:
                continue
            N = col[_N]
            if p.get("nonfinite_weights"):
                p["N"] = int(N)
                continue
            local = p["sums"].tolist()
            n_r, k_r, hg = local[0], local[6], local[7:10]
            equal = col[_HAS_N] == R and R * col[_NN] == N * N  # every rank had the same number of samples
            K, s1, s2 = k_r, col[_S1], col[_S2]
            if loss_reduction == "mean":
                if not equal:
                    p["w2"] = col[_INV_N] / (R * R)
                    p["wshift"] = col[_S1_INV_N] / R
            elif not equal and n_r > 0:
                # Each rank shifted by its own K_r = u1ᵀGv1/N_r; move the sums to the common K = u1ᵀGv1·R/N.
                ratio = n_r * R / N
                K = k_r * ratio
                hg = [h * ratio * ratio for h in hg]
                A, B, C = col[_NK], col[_NKK], col[_KS1]
                s1 = col[_S1] + A - K * N
                s2 = col[_S2] + 2 * C - 2 * K * col[_S1] + B - 2 * K * A + K * K * N
                p["c"] = p["c"] * N / (R * n_r)
            finite = 1.0 if col[_NONFINITE] == 0 else 0.0
            # (the last entry, the momentum term, is the same on every rank: DDP keeps the buffers identical)
            p["sums"] = torch.tensor([N, s1, s2, col[_H], col[_HLO], col[_HHI], K, *hg, finite, local[11]],
                                     dtype=torch.float64)
        logged = {}
        if tail[1] > 0:
            logged["loss"] = tail[0] / tail[1]
        if tail[3] > 0:
            logged["train_acc"] = tail[2] / tail[3]
        return logged


def describe_tracker(chosen: list, args: dict) -> list:
    """What must match across ranks: the tracked ``(name, module type, weight shape)`` (``chosen``: names and
    their adapters, :mod:`lipfast.adapters`) and the tracker's arguments."""
    layers = [(name, type(a.module).__name__, list(a.weight.shape)) for name, a in chosen]
    return [layers, sorted(args.items())]


# -- launching -----------------------------------------------------------------------------------
@dataclass
class RunContext:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def _pg_timeout(seconds: float | None = None) -> datetime.timedelta:
    if seconds is None and os.environ.get("LIPFAST_PG_TIMEOUT"):
        seconds = float(os.environ["LIPFAST_PG_TIMEOUT"])
    return DEFAULT_TIMEOUT if seconds is None else datetime.timedelta(seconds=seconds)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def in_process_group() -> bool:
    """Whether this process is a rank of a process group, running or described by torchrun's environment."""
    dist = _dist()
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_context(device: str | torch.device) -> RunContext | None:
    """None in a plain single process; otherwise this rank's context, joining the process group that
    ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) when none is initialised yet.
    ``device`` ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    dist = _dist()
    if not dist.is_available():
        return None
    device = torch.device(device)
    owns = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(_backend(device), init_method="env://", timeout=_pg_timeout())
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                               "device(s) are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return RunContext(rank, world, local_rank, device, owns)


def all_ok(ok: bool, ctx: RunContext) -> bool:
    """True on every rank when ``ok`` is true on every rank (one small all-reduce)."""
    dist = _dist()
    t = torch.tensor([0.0 if ok else 1.0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) == 0.0


@contextlib.contextmanager
def termination_deferred(active: bool = True):
    """Block SIGTERM/SIGINT in this thread for the duration (where the platform allows): the launcher
    stops the surviving ranks with SIGTERM when one fails, and rank 0 must not die between the layer
    rows and the network row of one step."""
    if not active or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def shutdown(ctx: RunContext | None) -> None:
    """Destroy the process group when this process created it."""
    if ctx is not None and ctx.owns_group:
        dist = _dist()
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args, device: str | torch.device = "cpu", kwargs: dict | None = None,
          timeout: float | None = None, passthrough: tuple = (), pg_timeout: float | None = None) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` local processes joined in one process group and return
    rank 0's result.

    The group uses gloo (CPU) or nccl (``device`` on CUDA: rank r on ``cuda:r``) and rendezvous through a
    file in a temporary folder (no port). ``fn`` must be picklable by reference (a module-level function).
    ``timeout``: seconds for the whole run (None: no limit); ``pg_timeout``: seconds after which a
    collective gives up (default: ``LIPFAST_PG_TIMEOUT`` from the environment, else 10 minutes).

    Raises:
        DistributedRunError: a rank failed (the message names the first failing rank and its error; the
            other ranks are stopped), or ``timeout`` seconds passed.
        An exception of a type in ``passthrough`` raised by the first failing rank is re-raised as is.
    """
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    device = torch.device(device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc {nproc} needs {nproc} CUDA devices, {torch.cuda.device_count()} visible")
    tmp = Path(tempfile.mkdtemp(prefix="lipfast-dist-"))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        ctx = mp.start_processes(_entry, args=(nproc, str(tmp), str(device), pg_timeout, fn, args, kwargs or {}),
                                 nprocs=nproc, join=False, start_method="spawn")
        try:
            # When a rank fails, the others usually fail soon after on their own (a closed connection, the
            # start-up agreement) and close their files; those still running after FAILURE_GRACE seconds
            # are stopped (SIGTERM) by ProcessContext.join.
            failed_at = None
            while not all(p.exitcode is not None for p in ctx.processes):
                now = time.monotonic()
                if failed_at is None and any(p.exitcode not in (None, 0) for p in ctx.processes):
                    failed_at = now
                if failed_at is not None and now - failed_at > FAILURE_GRACE:
                    break
                if deadline is not None and now > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    for p in ctx.processes:
                        p.join(5)
                    raise DistributedRunError(f"the {nproc} ranks did not finish within {timeout:g} s; stopped them")
                time.sleep(0.05)
            while not ctx.join(timeout=1.0):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise _root_cause(tmp, nproc, exc, passthrough) from None
        result = tmp / "result.pkl"
        return pickle.loads(result.read_bytes()) if result.is_file() else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entry(rank: int, nproc: int, tmp: str, device: str, pg_timeout, fn, args, kwargs) -> None:
    """One spawned rank: run ``fn``, deliver its result (rank 0) or its formatted exception (any rank) to
    the parent, and only then leave, with ``os._exit``.

    Why ``os._exit``: once the process group exists, a normal interpreter exit finalises gloo's (or NCCL's)
    C++ objects in no fixed order, and about one exit in fifty on two busy cores ended in
    ``terminate called without an active exception`` (a joinable ``std::thread`` destroyed), a SIGABRT
    that replaced the rank's own error or failed a rank that had finished. Leaving with ``os._exit`` after
    the delivery runs no destructor at all, so nothing can abort. What the run wrote is safe by then: the
    run folder's files are closed by ``fn`` itself (``train``'s ``finally`` blocks), the result and error
    files are written whole and renamed into place, and standard output and error are flushed here.
    The sockets of the process group are closed by the kernel as at any exit."""
    dist = _dist()
    code = 1
    try:
        device = torch.device(device)
        os.environ["LOCAL_RANK"] = str(rank)
        os.environ["RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(nproc)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
        if device.type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(_backend(device), init_method=Path(tmp, "rendezvous").resolve().as_uri(),
                                rank=rank, world_size=nproc, timeout=_pg_timeout(pg_timeout))
        result = fn(*args, **kwargs)
        if rank == 0:
            _write_whole(Path(tmp, "result.pkl"), pickle.dumps(result))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - delivered to the parent, which raises it there
        _deliver_error(Path(tmp), rank, exc)
    finally:
        flush_stdio()
        os._exit(code)


def _deliver_error(tmp: Path, rank: int, exc: BaseException) -> None:
    """Write ``error-<rank>.pkl`` (the rank's exception, formatted and pickled where it can be) whole."""
    try:
        blob = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an unpicklable exception still delivers its text
        blob = None
    info = dict(rank=rank, time=time.time(), type=type(exc).__name__, message=str(exc),
                traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), exc=blob,
                secondary=_secondary(exc))
    try:
        _write_whole(tmp / f"error-{rank}.pkl", pickle.dumps(info))
    except OSError as err:  # the parent then reports the exit code; say here what was lost
        print(f"lipfast: rank {rank} could not deliver its error ({err}): {info['traceback']}", file=sys.stderr)


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or no file (a rank may die any time)."""
    part = path.with_name(path.name + f".{os.getpid()}.part")
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
    os.replace(part, path)


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not keep the rank from leaving
            pass


def log_rank_failure(ctx: "RunContext", exc: BaseException) -> None:
    """A rank of a ``torchrun`` launch that raises: write its exception to standard error (flushed) before
    any teardown, which could abort in C++ destructors and lose it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(f"lipfast: rank {ctx.rank} of {ctx.world} failed: {type(exc).__name__}: {exc}\n{text}", file=sys.stderr,
          end="")
    flush_stdio()


def _secondary(exc: BaseException) -> bool:
    """An error that only reports another rank's failure (a broken connection, a peer's flag)."""
    dist = _dist()
    if isinstance(exc, (DistributedRunError, KeyboardInterrupt, SystemExit)):
        return True
    base = getattr(dist, "DistError", None)
    if base is not None and isinstance(exc, base):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl",
                                   "timed out", "peer"))


def _root_cause(tmp: Path, nproc: int, exc: BaseException, passthrough: tuple) -> BaseException:
    infos = []
    for f in tmp.glob("error-*.pkl"):
        try:
            infos.append(pickle.loads(f.read_bytes()))
        except Exception:  # noqa: BLE001
            pass
    if not infos:
        rank = getattr(exc, "error_index", "?")
        return DistributedRunError(f"rank {rank} of {nproc} died ({' '.join(str(exc).split())[:300]}); the other "
                                   "ranks were stopped")
    infos.sort(key=lambda i: (i["secondary"], i["time"]))
    first = infos[0]
    if first["exc"] is not None and passthrough:
        try:
            original = pickle.loads(first["exc"])
        except Exception:  # noqa: BLE001
            original = None
        if isinstance(original, passthrough):
            return original
    err = DistributedRunError(f"rank {first['rank']} of {nproc} failed: {first['type']}: {first['message']}; the "
                              "other ranks were stopped")
    err.rank = first["rank"]
    err.remote_traceback = first["traceback"]
    return err
