"""SDE integration for lipfast: a small torchsde-style solver API and the coefficient-driven
simulator of MATH.md §6.

Two layers live here.

1. **Generic Itô solvers** for ``dX = f(t, X) dt + g(t, X) dW`` on tensors ``X`` of shape
   ``[P, d]`` (``P`` independent paths, ``d`` dimensions). Each solver class declares its contract
   (``strong_order``, ``weak_order``, ``sde_type``, ``noise_types``) and implements only
   :meth:`Solver.step`; :func:`select` maps a method name to its class; :func:`check_contract`
   validates everything up front and :func:`sdeint` integrates on a time grid with seedable
   Brownian increments. This copies torchsde's habits (``_core/methods``, ``_core/sdeint.py``).

2. **The recorded-coefficient simulator** :func:`simulate_recorded`: Euler–Maruyama on
   ``x_{t+1} = x_t + drift_t + ito_t + sqrt(diffusion_var_t) · z_t`` with the per-step terms
   (i), (iii), (ii) measured along a training run (MATH.md §3, §6), giving a mean and a band.
   :func:`pathwise_residual` is the pathwise check of §6.

   Its noise model (:data:`NOISE_MODELS`) follows the run's batch sampling. ``"independent"``: the
   ``z_t`` are independent, as the SDE assumes (batches drawn with replacement). ``"epoch"``: each
   epoch of ``M`` batches is a permutation of the data, so at fixed weights two batch noises of one
   epoch have correlation ``rho = −B/(N−B)`` (``−1/(M−1)`` when the epoch covers the data exactly)
   and an epoch's noise sums to zero; epochs are independent. :func:`noise_variance` is the
   variance of the accumulated noise under either model, in closed form.

Noise types (shapes for ``x`` of shape ``[P, d]``):

* ``"diagonal"``: ``g(t, x)`` is ``[P, d]``, ``dW`` is ``[P, d]``; component ``i`` of the noise
  only drives ``x_i``. Milstein additionally assumes ``g_i`` depends on ``x_i`` only (torchsde's
  diagonal-noise assumption).
* ``"scalar"``: ``g(t, x)`` is ``[P, d]``, ``dW`` is ``[P, 1]``: one Brownian motion per path,
  shared by all ``d`` components.
* ``"general"``: ``g(t, x)`` is ``[P, d, m]``, ``dW`` is ``[P, m]`` (Euler–Maruyama only: a
  strong order-1 scheme would need Lévy areas).

Only torch and numpy are imported; nothing runs at import.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Solver",
    "EulerMaruyama",
    "Milstein",
    "NOISE_TYPES",
    "select",
    "check_contract",
    "sdeint",
    "SDEBand",
    "simulate_recorded",
    "pathwise_residual",
    "NOISE_MODELS",
    "epoch_correlation",
    "noise_variance",
]

NOISE_MODELS = ("independent", "epoch")

NOISE_TYPES = ("diagonal", "scalar", "general")

Drift = Callable[[float, Tensor], Tensor]
Diffusion = Callable[[float, Tensor], Tensor]

# simulate_recorded keeps at most this many bytes of path values per chunk of time steps
# (the chunk buffer plus its float64 copy and the quantile workspace, counted as 3 float64 copies).
_CHUNK_BYTES = 256 * 2**20
# Relative size below which a negative recorded diffusion variance is rounding, clamped to 0.
_NEG_VAR_RTOL = 1e-12


# --------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------


class Solver:
    """Base class of the fixed-step Itô solvers: declare the contract, implement :meth:`step`.

    Class attributes:
        strong_order: strong (pathwise, L1) convergence order in ``dt``.
        weak_order: weak (moments) convergence order in ``dt``.
        sde_type: always ``"ito"``.
        noise_types: the noise types (:data:`NOISE_TYPES`) the scheme supports.

    Args:
        f: drift ``f(t, x) -> [P, d]`` for ``t: float`` and ``x: [P, d]``.
        g: diffusion ``g(t, x) -> [P, d]`` (diagonal, scalar noise) or ``[P, d, m]`` (general).
        noise_type: one of ``noise_types``.

    Raises:
        ValueError: ``noise_type`` is not supported by this solver.
    """

    name: str = ""
    strong_order: float = float("nan")
    weak_order: float = float("nan")
    sde_type: str = "ito"
    noise_types: tuple[str, ...] = ()

    def __init__(self, f: Drift, g: Diffusion, noise_type: str = "diagonal") -> None:
        if noise_type not in self.noise_types:
            raise ValueError(
                f"{type(self).__name__}: noise_type {noise_type!r} is not supported; "
                f"this solver supports {list(self.noise_types)}"
            )
        self.f = f
        self.g = g
        self.noise_type = noise_type

    def step(self, t: float, dt: float, x: Tensor, dW: Tensor) -> Tensor:
        """Advances the state by one step.

        Args:
            t: time at the start of the step.
            dt: step size (> 0).
            x: ``[P, d]`` state at ``t``.
            dW: Brownian increment over ``[t, t + dt]``: ``[P, d]`` (diagonal), ``[P, 1]``
                (scalar) or ``[P, m]`` (general), distributed as ``N(0, dt)`` entrywise.

        Returns:
            ``[P, d]`` state at ``t + dt``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_type={self.noise_type!r})"


def _noise(g: Tensor, dW: Tensor, noise_type: str) -> Tensor:
    """``g dW`` for each noise type: ``[P, d]`` from g ``[P, d]``/``[P, d, m]`` and dW."""
    if noise_type == "general":
        return torch.einsum("pdm,pm->pd", g, dW)
    return g * dW  # diagonal: [P, d] * [P, d]; scalar: [P, d] * [P, 1]


class EulerMaruyama(Solver):
    """Euler–Maruyama: ``x + f dt + g dW``. Strong order 0.5, weak order 1 (strong order 1 for
    additive noise). Supports every noise type."""

    name = "euler"
    strong_order = 0.5
    weak_order = 1.0
    noise_types = NOISE_TYPES

    def step(self, t: float, dt: float, x: Tensor, dW: Tensor) -> Tensor:
        """One Euler–Maruyama step; shapes as in :meth:`Solver.step`."""
        return x + self.f(t, x) * dt + _noise(self.g(t, x), dW, self.noise_type)


class Milstein(Solver):
    """Milstein (Itô): ``x + f dt + g dW + ½ (g ∂g/∂x)(dW² − dt)``. Strong order 1, weak order 1.

    ``(g ∂g/∂x)`` is the Jacobian-vector product ``J_g(x) · g(x)``, computed with forward-mode
    :func:`torch.func.jvp` on ``g`` (so ``g`` must be built from torch operations with
    forward-mode AD support, and must not call ``.item()``/numpy). Paths are independent, so
    the Jacobian of ``g`` over the whole ``[P, d]`` batch is block diagonal and one jvp gives
    every path's product.

    * Diagonal noise: ``g_i`` must depend on ``x_i`` only (torchsde's assumption); then
      ``(J_g g)_i = g_i ∂g_i/∂x_i`` as the scheme needs. This is not checked.
    * Scalar noise: ``J_g g`` is exactly the Milstein correction for one shared Brownian motion.
    """

    name = "milstein"
    strong_order = 1.0
    weak_order = 1.0
    noise_types = ("diagonal", "scalar")

    def step(self, t: float, dt: float, x: Tensor, dW: Tensor) -> Tensor:
        """One Milstein step; shapes as in :meth:`Solver.step`."""
        gx = self.g(t, x)
        g_dg = _jvp(lambda y: self.g(t, y), x, gx)
        return x + self.f(t, x) * dt + gx * dW + 0.5 * g_dg * (dW * dW - dt)


_forward_ad_loaded = False


def _jvp(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """``J_fn(x) · v`` by forward-mode AD (:func:`torch.func.jvp`); ``x``, ``v`` and the result ``[P, d]``.

    On its first forward-AD call torch loads its jvp decompositions with ``torch.jit.script``, which
    recent torch versions flag with a ``DeprecationWarning`` (torch's internals, not the caller's
    code); that one warning is silenced, once, for the first call only.
    """
    global _forward_ad_loaded
    if _forward_ad_loaded:
        return torch.func.jvp(fn, (x,), (v,))[1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        out = torch.func.jvp(fn, (x,), (v,))[1]
    _forward_ad_loaded = True
    return out


_SOLVERS: dict[str, type[Solver]] = {"euler": EulerMaruyama, "milstein": Milstein}


def select(method: str) -> type[Solver]:
    """Returns the solver class for a method name.

    Args:
        method: ``"euler"`` or ``"milstein"``.

    Returns:
        The :class:`Solver` subclass (not an instance).

    Raises:
        ValueError: unknown ``method``; the message lists the valid names.
    """
    try:
        return _SOLVERS[method]
    except (KeyError, TypeError):
        raise ValueError(f"sde: unknown method {method!r}; valid methods: {sorted(_SOLVERS)}") from None


# --------------------------------------------------------------------------------------------------
# sdeint
# --------------------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_contract(
    f: Drift,
    g: Diffusion,
    x0: Tensor,
    ts,
    *,
    method: str = "euler",
    dt: float | None = None,
    noise_type: str = "diagonal",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[type[Solver], list[float], tuple[int, int]]:
    """Validates the arguments of :func:`sdeint` before any step is taken.

    Calls ``f`` and ``g`` once, at ``(ts[0], x0)``, to check the shapes they return.

    Args:
        f: drift, ``f(t, x) -> [P, d]``.
        g: diffusion, ``g(t, x) -> [P, d]`` (diagonal, scalar) or ``[P, d, m]`` (general).
        x0: ``[P, d]`` floating-point initial state, finite.
        ts: ``[T]`` output times (tensor or sequence), finite, strictly increasing, ``T >= 1``.
        method: a name accepted by :func:`select`.
        dt: maximal internal step (> 0), or None to step exactly from one output time to the next.
        noise_type: one of :data:`NOISE_TYPES`, supported by the method.
        generator: a ``torch.Generator`` on ``x0``'s device, or None.
        seed: an int seed, or None; at most one of ``generator`` and ``seed``.

    Returns:
        ``(solver_class, times, brownian_shape)``: the solver class, ``ts`` as a list of floats, and
        the shape of one Brownian increment (``(P, d)``, ``(P, 1)`` or ``(P, m)``).

    Raises:
        ValueError: naming the offending value and what was expected.
    """
    solver_cls = select(method)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"sde: unknown noise_type {noise_type!r}; valid noise types: {list(NOISE_TYPES)}")
    if noise_type not in solver_cls.noise_types:
        raise ValueError(
            f"sde: method {method!r} does not support noise_type {noise_type!r}; "
            f"it supports {list(solver_cls.noise_types)}"
        )

    if not isinstance(x0, Tensor):
        raise ValueError(f"sde: x0 must be a torch.Tensor of shape [P, d], got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise ValueError(f"sde: x0 must have a floating-point dtype, got {x0.dtype}")
    if x0.dim() != 2:
        raise ValueError(f"sde: x0 must have shape [P, d] (2-D), got shape {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        bad = int((~torch.isfinite(x0)).sum())
        raise ValueError(f"sde: x0 must be finite, got {bad} NaN/Inf entries")

    if isinstance(ts, Tensor):
        ts_t = ts.detach().to("cpu", torch.float64)
    else:
        try:
            ts_t = torch.as_tensor(ts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"sde: ts must be a 1-D sequence of times, got {ts!r}") from exc
    if ts_t.dim() != 1 or ts_t.numel() < 1:
        raise ValueError(f"sde: ts must be 1-D with at least one time, got shape {tuple(ts_t.shape)}")
    if not bool(torch.isfinite(ts_t).all()):
        raise ValueError(f"sde: ts must be finite, got {ts_t.tolist()}")
    diffs = ts_t[1:] - ts_t[:-1]
    if bool((diffs <= 0).any()):
        i = int(torch.nonzero(diffs <= 0)[0])
        raise ValueError(
            f"sde: ts must be strictly increasing, got ts[{i}]={ts_t[i].item()!r} "
            f"followed by ts[{i + 1}]={ts_t[i + 1].item()!r}"
        )
    times = ts_t.tolist()

    if dt is not None:
        if not _is_real(dt) or not math.isfinite(float(dt)) or float(dt) <= 0:
            raise ValueError(f"sde: dt must be None or a finite number > 0, got {dt!r}")

    if generator is not None and seed is not None:
        raise ValueError("sde: pass either generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"sde: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x0.device.type:
            raise ValueError(f"sde: generator is on {generator.device} but x0 is on {x0.device}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"sde: seed must be an int, got {seed!r}")

    P, d = x0.shape
    f0 = f(times[0], x0)
    if not isinstance(f0, Tensor) or tuple(f0.shape) != (P, d):
        got = tuple(f0.shape) if isinstance(f0, Tensor) else type(f0).__name__
        raise ValueError(f"sde: f(t, x) must return a tensor of shape [P, d] = {[P, d]}, got {got}")
    g0 = g(times[0], x0)
    if noise_type == "general":
        ok = isinstance(g0, Tensor) and g0.dim() == 3 and tuple(g0.shape[:2]) == (P, d) and g0.shape[2] >= 1
        expected = f"[P, d, m] = [{P}, {d}, m] with m >= 1"
    else:
        ok = isinstance(g0, Tensor) and tuple(g0.shape) == (P, d)
        expected = f"[P, d] = {[P, d]}"
    if not ok:
        got = tuple(g0.shape) if isinstance(g0, Tensor) else type(g0).__name__
        raise ValueError(f"sde: g(t, x) must return a tensor of shape {expected} for {noise_type} noise, got {got}")
    bshape = {"diagonal": (P, d), "scalar": (P, 1), "general": (P, int(g0.shape[-1]))}[noise_type]
    return solver_cls, times, bshape


def _n_substeps(t0: float, t1: float, dt: float | None) -> int:
    """Equal substeps of size at most ``dt`` covering ``[t0, t1]`` (1 when ``dt`` is None)."""
    if dt is None:
        return 1
    return max(1, math.ceil((t1 - t0) / float(dt) - 1e-9))


def sdeint(
    f: Drift,
    g: Diffusion,
    x0: Tensor,
    ts,
    *,
    method: str = "euler",
    dt: float | None = None,
    noise_type: str = "diagonal",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    **unknown,
) -> Tensor:
    """Integrates the Itô SDE ``dX = f(t, X) dt + g(t, X) dW`` from ``x0`` at ``ts[0]``.

    Each interval ``[ts[k], ts[k+1]]`` is split into ``ceil((ts[k+1] - ts[k]) / dt)`` equal steps
    (so every step is at most ``dt`` and the output times are hit exactly); with ``dt=None`` each
    interval is one step. Brownian increments are drawn, in step order, as
    ``sqrt(h) * torch.randn(brownian_shape, generator=...)``: the same ``seed`` (or a generator in
    the same state) gives bit-identical output. With neither, torch's global RNG is used.

    Args:
        f: drift, ``f(t: float, x: [P, d]) -> [P, d]``.
        g: diffusion, ``g(t, x) -> [P, d]`` (diagonal, scalar noise) or ``[P, d, m]`` (general).
        x0: ``[P, d]`` initial state (floating point, finite).
        ts: ``[T]`` strictly increasing output times; ``ts[0]`` is the time of ``x0``.
        method: ``"euler"`` or ``"milstein"`` (see :func:`select`).
        dt: maximal internal step, or None.
        noise_type: ``"diagonal"``, ``"scalar"`` or ``"general"`` (module docstring).
        generator: ``torch.Generator`` for the Brownian increments.
        seed: int seed for a fresh generator on ``x0``'s device (exclusive with ``generator``).
        **unknown: rejected.

    Returns:
        ``[T, P, d]`` tensor, ``out[k]`` the state at ``ts[k]`` (``out[0]`` equals ``x0``),
        with ``x0``'s dtype and device.

    Raises:
        TypeError: unknown keyword arguments, named.
        ValueError: any contract violation (:func:`check_contract`).
    """
    if unknown:
        raise TypeError(
            f"sdeint: unexpected keyword argument(s) {sorted(unknown)}; "
            "accepted: method, dt, noise_type, generator, seed"
        )
    solver_cls, times, bshape = check_contract(
        f, g, x0, ts, method=method, dt=dt, noise_type=noise_type, generator=generator, seed=seed
    )
    if seed is not None:
        generator = torch.Generator(device=x0.device)
        generator.manual_seed(int(seed))
    solver = solver_cls(f, g, noise_type)

    x = x0
    out = [x0]
    for t0, t1 in zip(times[:-1], times[1:]):
        n = _n_substeps(t0, t1, dt)
        h = (t1 - t0) / n
        sqrt_h = math.sqrt(h)
        for j in range(n):
            dW = torch.randn(bshape, generator=generator, dtype=x0.dtype, device=x0.device) * sqrt_h
            x = solver.step(t0 + j * h, h, x, dW)
        out.append(x)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# Recorded coefficients (MATH.md §6)
# --------------------------------------------------------------------------------------------------


def _series(fn: str, name: str, value) -> np.ndarray:
    """A 1-D float64 numpy copy of a sequence / array / tensor."""
    if isinstance(value, Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{fn}: {name} must be a 1-D sequence of numbers, got {value!r}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {arr.shape}")
    return np.array(arr, dtype=np.float64)  # own copy


def _steps(mask: np.ndarray, limit: int = 10) -> str:
    idx = np.flatnonzero(mask).tolist()
    text = str(idx[:limit])
    return text if len(idx) <= limit else f"{text[:-1]}, ...] ({len(idx)} steps)"


@dataclass(frozen=True, eq=False)
class SDEBand:
    """Mean and quantile band of simulated trajectories (:func:`simulate_recorded`).

    Attributes:
        mean: ``[T+1]`` float64 mean across paths; ``mean[0]`` is ``x0``.
        std: ``[T+1]`` float64 sample standard deviation across paths (``ddof=1``); ``std[0] = 0``.
        lo: ``[T+1]`` float64 lower quantile ``quantiles[0]`` across paths.
        hi: ``[T+1]`` float64 upper quantile ``quantiles[1]`` across paths.
        n_paths: number of simulated paths.
        quantiles: ``(q_lo, q_hi)``.
        n_fallback: number of NaN steps replaced by the deterministic ``fallback``.

    The arrays are read-only.
    """

    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_paths: int
    quantiles: tuple[float, float]
    n_fallback: int

    def coverage(self, observed) -> float:
        """Fraction of observed points inside the band.

        Args:
            observed: ``[T+1]`` observed trajectory (sequence, array or tensor), finite.

        Returns:
            Fraction of indices ``t`` with ``lo[t] <= observed[t] <= hi[t]``, in ``[0, 1]``.

        Raises:
            ValueError: wrong length or non-finite entries.
        """
        obs = _series("SDEBand.coverage", "observed", observed)
        if obs.shape != self.mean.shape:
            raise ValueError(
                f"SDEBand.coverage: observed must have length T+1 = {self.mean.shape[0]}, got {obs.shape[0]}"
            )
        if not np.isfinite(obs).all():
            raise ValueError(f"SDEBand.coverage: observed must be finite, got NaN/Inf at {_steps(~np.isfinite(obs))}")
        return float(np.mean((obs >= self.lo) & (obs <= self.hi)))

    def to_dict(self) -> dict:
        """JSON-safe dict: the four arrays as lists of floats, plus the scalars."""
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "n_paths": int(self.n_paths),
            "quantiles": [float(q) for q in self.quantiles],
            "n_fallback": int(self.n_fallback),
        }


def simulate_recorded(
    x0,
    drift,
    ito,
    diffusion_var,
    *,
    fallback=None,
    n_paths: int = 4096,
    seed: int = 0,
    quantiles: tuple[float, float] = (0.05, 0.95),
    dtype: torch.dtype = torch.float64,
    noise: str = "independent",
    per_epoch: int | None = None,
    rho: float | None = None,
    phase: int = 0,
) -> SDEBand:
    """Euler–Maruyama with coefficients recorded along a run (MATH.md §6), many paths.

    Per step ``t`` (``0 <= t < T``), for every path independently::

        x_{t+1} = x_t + drift_t + ito_t + sqrt(diffusion_var_t) * z_t,    z_t ~ N(0, 1)

    The coefficients do not depend on ``x``, so the deterministic part ``cumsum(drift + ito)`` is
    accumulated once in float64 and only the noise ``N_t = cumsum(sqrt(v) z)`` is simulated, in
    ``dtype``, for all paths at once (numpy cumsum over a chunk of steps; no loop over paths).
    A step whose ``drift``, ``ito`` or ``diffusion_var`` is NaN (the tracker's degenerate steps)
    adds ``fallback_t`` to every path, without noise.

    Randomness and memory: ``z_t`` is drawn as ``torch.randn(n_paths, generator=gen)`` with one
    ``torch.Generator`` seeded with ``seed``, one call per step in step order (NaN steps draw too,
    so step ``t`` always uses the ``t``-th draw). Steps are processed in chunks of
    ``~256 MiB / (24 · n_paths)`` steps (a time chunk holds every path, so the quantiles are exact);
    each step's arithmetic and statistics are per row, so the result is bit-identical for any chunk
    size given ``seed``. Memory is ``O(n_paths · chunk + T)``, never ``[n_paths, T]``.

    Args:
        x0: observed starting value (e.g. ``σ`` or ``log K`` at step 0), a finite float.
        drift: ``[T]`` term (i) per step.
        ito: ``[T]`` term (iii) per step.
        diffusion_var: ``[T]`` term (ii) per step, ``>= 0`` (negatives above ``-1e-12 · max|v|``
            are rounding and clamped to 0).
        fallback: ``[T]`` increments used at NaN steps (e.g. the observed increments), or None.
        n_paths: number of paths, ``>= 2``.
        seed: int seed (``>= 0``) of the normal draws.
        quantiles: ``(q_lo, q_hi)`` with ``0 < q_lo < q_hi < 1``.
        dtype: ``torch.float64`` or ``torch.float32``, the precision of the simulated noise.
        noise: ``"independent"`` or ``"epoch"`` (module docstring). With ``"epoch"`` the draws are
            made per whole epoch (``per_epoch`` of them, the first ``phase`` belonging to steps before
            ``t = 0``) and given the within-epoch correlation ``rho``: ``z̃ = (z − c·z̄)/√(1 − s)``
            with ``s = −rho/(1 − rho)`` and ``c = 1 − √(1 − M·s)``.
        per_epoch: batches per epoch ``M >= 2`` (``"epoch"`` only).
        rho: within-epoch correlation in ``[−1/(M−1), 0]``; default ``−1/(M−1)`` (exact cover).
        phase: position of step 0 in its epoch, ``0 <= phase < M``.

    Returns:
        :class:`SDEBand` with ``[T+1]`` float64 arrays (index 0 is ``x0``).

    Raises:
        ValueError: length mismatch (naming the arrays and lengths), NaN steps without
            ``fallback``, Inf coefficients, non-finite ``fallback`` at a NaN step, negative
            ``diffusion_var`` (naming the step), bad ``n_paths``, ``quantiles``, ``seed``, ``dtype``
            or ``x0``.
        TypeError: ``n_paths`` or ``seed`` is not an int.
    """
    fn = "simulate_recorded"
    if not _is_real(x0) and not (isinstance(x0, Tensor) and x0.numel() == 1):
        raise ValueError(f"{fn}: x0 must be a finite float, got {x0!r}")
    x0 = float(x0)
    if not math.isfinite(x0):
        raise ValueError(f"{fn}: x0 must be finite, got {x0!r}")
    if not _is_int(n_paths):
        raise TypeError(f"{fn}: n_paths must be an int >= 2, got {n_paths!r}")
    if n_paths < 2:
        raise ValueError(f"{fn}: n_paths must be >= 2 (a band needs several paths), got {n_paths}")
    if not _is_int(seed):
        raise TypeError(f"{fn}: seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"{fn}: seed must be >= 0, got {seed}")
    try:
        q_lo, q_hi = (float(q) for q in quantiles)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: quantiles must be a pair (q_lo, q_hi), got {quantiles!r}") from None
    if not (0.0 < q_lo < q_hi < 1.0):
        raise ValueError(f"{fn}: quantiles must satisfy 0 < q_lo < q_hi < 1, got {quantiles!r}")
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"{fn}: dtype must be torch.float64 or torch.float32, got {dtype!r}")
    epoch = _check_noise(fn, noise, per_epoch, rho, phase)

    arrays = {"drift": drift, "ito": ito, "diffusion_var": diffusion_var}
    if fallback is not None:
        arrays["fallback"] = fallback
    series = {name: _series(fn, name, value) for name, value in arrays.items()}
    lengths = {name: a.shape[0] for name, a in series.items()}
    if len(set(lengths.values())) != 1:
        got = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"{fn}: {', '.join(lengths)} must all have the same length T, got {got}")
    mu_d, mu_i, var = series["drift"], series["ito"], series["diffusion_var"]
    T = mu_d.shape[0]

    nan = np.isnan(mu_d) | np.isnan(mu_i) | np.isnan(var)
    for name, a in (("drift", mu_d), ("ito", mu_i), ("diffusion_var", var)):
        if np.isinf(a).any():
            raise ValueError(f"{fn}: {name} is infinite at steps {_steps(np.isinf(a))}")
    n_fallback = int(nan.sum())
    mu = mu_d + mu_i
    if n_fallback:
        if fallback is None:
            raise ValueError(
                f"{fn}: steps {_steps(nan)} have NaN coefficients (degenerate steps); "
                "pass fallback= (a [T] array, e.g. the observed increments) to use at those steps"
            )
        fb = series["fallback"]
        bad = nan & ~np.isfinite(fb)
        if bad.any():
            raise ValueError(f"{fn}: fallback must be finite at the NaN steps, got NaN/Inf at steps {_steps(bad)}")
        mu[nan] = fb[nan]
        var[nan] = 0.0

    if (var < 0).any():
        scale = float(np.max(np.abs(var))) if T else 0.0
        neg = var < -_NEG_VAR_RTOL * scale
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            raise ValueError(
                f"{fn}: diffusion_var must be >= 0, got {float(var[i])!r} at step {i} "
                f"(negative at steps {_steps(neg)})"
            )
        var = np.maximum(var, 0.0)
    sd = np.sqrt(var).astype(np_dtype)

    # Deterministic part, float64: D[t] = sum_{s < t} mu_s, D[0] = 0.
    det = np.concatenate(([0.0], np.cumsum(mu)))
    noise_mean = np.zeros(T + 1)
    noise_std = np.zeros(T + 1)
    noise_lo = np.zeros(T + 1)
    noise_hi = np.zeros(T + 1)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    rows = max(1, _CHUNK_BYTES // (24 * n_paths))
    carry = np.zeros(n_paths, dtype=np_dtype)
    for start, stop, buf in _draws(T, n_paths, gen, dtype, np_dtype, rows, epoch):
        buf *= sd[start:stop, None]
        buf[0] += carry
        np.cumsum(buf, axis=0, out=buf)  # sequential along steps: chunking does not change it
        carry = buf[-1].copy()
        b64 = np.asarray(buf, dtype=np.float64)
        noise_mean[start + 1 : stop + 1] = b64.mean(axis=1)
        noise_std[start + 1 : stop + 1] = b64.std(axis=1, ddof=1)
        noise_lo[start + 1 : stop + 1] = np.quantile(b64, q_lo, axis=1)
        noise_hi[start + 1 : stop + 1] = np.quantile(b64, q_hi, axis=1)
        del buf, b64

    base = x0 + det

    def frozen(a: np.ndarray) -> np.ndarray:
        a.setflags(write=False)
        return a

    return SDEBand(
        mean=frozen(base + noise_mean),
        std=frozen(noise_std),
        lo=frozen(base + noise_lo),
        hi=frozen(base + noise_hi),
        n_paths=int(n_paths),
        quantiles=(q_lo, q_hi),
        n_fallback=n_fallback,
    )


def _check_noise(fn: str, noise, per_epoch, rho, phase) -> tuple[int, float, int] | None:
    """None for independent noise; ``(M, rho, phase)`` for epoch noise (validated)."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"{fn}: noise must be one of {list(NOISE_MODELS)}, got {noise!r}")
    if noise == "independent":
        return None
    if not _is_int(per_epoch) or per_epoch < 2:
        raise ValueError(f"{fn}: per_epoch must be an int >= 2 with noise='epoch', got {per_epoch!r}")
    lo = -1.0 / (per_epoch - 1)
    rho = lo if rho is None else rho
    if not _is_real(rho) or not (lo - 1e-12 <= rho <= 0):
        raise ValueError(f"{fn}: rho must be in [-1/(per_epoch-1), 0] = [{lo:.6g}, 0], got {rho!r}")
    if not _is_int(phase) or not 0 <= phase < per_epoch:
        raise ValueError(f"{fn}: phase must be an int in [0, per_epoch), got {phase!r}")
    return int(per_epoch), max(float(rho), lo), int(phase)


def epoch_correlation(batch_size: int, n: int) -> float:
    """Correlation of two batch-mean noises of one permutation epoch: ``−B/(N − B)``.

    Two disjoint batches of ``B`` of ``N`` samples drawn without replacement have covariance
    ``−Σ_1/(N−1)`` against each one's variance ``Σ_1 (N−B)/(B(N−1))`` (MATH.md §3)."""
    if not _is_int(batch_size) or not _is_int(n) or not 1 <= batch_size < n:
        raise ValueError(f"epoch_correlation: need ints 1 <= batch_size < n, got batch_size={batch_size!r}, n={n!r}")
    return -batch_size / (n - batch_size)


def _epoch_transform(z: np.ndarray, M: int, rho: float) -> np.ndarray:
    """``[E·M, P]`` independent normals -> unit-variance normals with correlation ``rho`` within each
    block of ``M`` rows (centring by a fraction ``c`` of the block mean)."""
    s = -rho / (1.0 - rho)
    c = 1.0 - math.sqrt(max(1.0 - M * s, 0.0))
    blocks = z.reshape(-1, M, z.shape[1])
    blocks -= c * blocks.mean(axis=1, keepdims=True)
    blocks /= math.sqrt(1.0 - s)
    return z


def _draws(T: int, n_paths: int, gen, dtype, np_dtype, rows: int, epoch):
    """Yield ``(start, stop, z)`` chunks of the ``[T, n_paths]`` standard normal draws, step by step
    from ``gen`` (one ``randn(n_paths)`` per row, so chunking never changes them); with ``epoch``
    (``(M, rho, phase)``) the chunks hold whole epochs, correlated by :func:`_epoch_transform`."""

    def fill(n_rows: int) -> np.ndarray:
        buf = np.empty((n_rows, n_paths), dtype=np_dtype)
        tbuf = torch.from_numpy(buf)
        for r in range(n_rows):
            torch.randn(n_paths, generator=gen, dtype=dtype, out=tbuf[r])
        return buf

    if epoch is None:
        for start in range(0, T, rows):
            stop = min(T, start + rows)
            yield start, stop, fill(stop - start)
        return
    M, rho, phase = epoch
    per_chunk = max(1, rows // M) * M
    total = -(-(phase + T) // M) * M  # draws up to the end of the last epoch touched
    for d0 in range(0, total, per_chunk):
        d1 = min(total, d0 + per_chunk)
        z = _epoch_transform(fill(d1 - d0), M, rho)
        start, stop = max(d0 - phase, 0), min(d1 - phase, T)
        if stop > start:
            yield start, stop, np.ascontiguousarray(z[start + phase - d0: stop + phase - d0])


def noise_variance(diffusion_var, *, noise: str = "independent", per_epoch: int | None = None,
                   rho: float | None = None, phase: int = 0) -> np.ndarray:
    """``[T+1]`` variance of the accumulated noise ``Σ_{s<t} sqrt(v_s) z_s`` of :func:`simulate_recorded`
    in closed form (NaN entries of ``diffusion_var`` count as 0, like its fallback steps).

    Independent: ``Σ_{s<t} v_s``. Epoch: per epoch, with ``S1 = Σ sqrt(v_s)`` and ``S2 = Σ v_s`` over its
    steps so far, ``S2 + rho (S1² − S2)``; completed epochs add theirs (epochs are independent). With
    constant ``v`` and ``rho = −1/(M−1)`` this is ``v·k(M−k)/(M−1)`` after ``k`` steps of an epoch."""
    fn = "noise_variance"
    v = _series(fn, "diffusion_var", diffusion_var)
    v = np.where(np.isfinite(v), np.maximum(v, 0.0), 0.0)
    epoch = _check_noise(fn, noise, per_epoch, rho, phase)
    out = np.zeros(v.shape[0] + 1)
    if epoch is None:
        out[1:] = np.cumsum(v)
        return out
    M, rho, phase = epoch
    done = s1 = s2 = 0.0
    for t, vt in enumerate(v):
        if t > 0 and (t + phase) % M == 0:  # a new epoch starts at this step
            done += s2 + rho * (s1 * s1 - s2)
            s1 = s2 = 0.0
        s1 += math.sqrt(vt)
        s2 += vt
        out[t + 1] = done + s2 + rho * (s1 * s1 - s2)
    return out


def pathwise_residual(delta_pred, delta_obs) -> dict:
    """Pathwise check of MATH.md §6: summed predicted increments against summed observed ones.

    Steps where either entry is NaN (the tracker's degenerate steps) are left out of *both* sums.

    Args:
        delta_pred: ``[T]`` predicted per-step increments (e.g. ``⟨J,ΔW⟩ + ½H[ΔW,ΔW]``).
        delta_obs: ``[T]`` observed per-step increments (e.g. ``σ_{t+1} − σ_t``).

    Returns:
        ``{"sum_pred", "sum_obs", "residual", "relative_residual", "n_ignored", "n_used"}`` with
        ``residual = sum_pred − sum_obs`` (signed), ``relative_residual =
        |residual| / max(|sum_obs|, tiny)`` (``tiny`` the smallest normal float64), ``n_ignored``
        the number of steps left out and ``n_used`` the number summed. Python floats and ints.

    Raises:
        ValueError: length mismatch or infinite entries.
    """
    fn = "pathwise_residual"
    pred = _series(fn, "delta_pred", delta_pred)
    obs = _series(fn, "delta_obs", delta_obs)
    if pred.shape != obs.shape:
        raise ValueError(
            f"{fn}: delta_pred and delta_obs must have the same length, got {pred.shape[0]} and {obs.shape[0]}"
        )
    for name, a in (("delta_pred", pred), ("delta_obs", obs)):
        if np.isinf(a).any():
            raise ValueError(f"{fn}: {name} is infinite at steps {_steps(np.isinf(a))}")
    ignored = np.isnan(pred) | np.isnan(obs)
    sum_pred = float(np.sum(pred[~ignored]))
    sum_obs = float(np.sum(obs[~ignored]))
    residual = sum_pred - sum_obs
    return {
        "sum_pred": sum_pred,
        "sum_obs": sum_obs,
        "residual": residual,
        "relative_residual": abs(residual) / max(abs(sum_obs), float(np.finfo(np.float64).tiny)),
        "n_ignored": int(ignored.sum()),
        "n_used": int((~ignored).sum()),
    }
