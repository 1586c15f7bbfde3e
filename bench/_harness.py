"""Shared pieces of lipfast's benchmark scripts: a common command line, frozen
``Config``/``Result`` records, a ``torch.utils.benchmark`` timing helper, a guarded ``torch.compile``,
and a Markdown table printer.

A script builds its ``Config`` list (``get_configs``), runs each (``run_experiment``) into ``Result``
rows, asserting correctness *before* timing, and prints ``environment_lines()`` and ``format_table()``.
Nothing here knows about any particular op.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.utils.benchmark as benchmark

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One benchmark case: a name for the table and free-form parameters (shapes, k, ...)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class Result:
    """One implementation timed on one case. ``median_s``/``iqr_s`` are per call, in seconds;
    ``median_s`` is NaN for an implementation that could not run (``note`` says why)."""

    config: Config
    impl: str
    median_s: float
    iqr_s: float = float("nan")
    runs: int = 0
    note: str = ""
    rounds: tuple[float, ...] = ()  # per-call time of each interleaved round (time_interleaved)

    @property
    def ok(self) -> bool:
        return self.median_s == self.median_s  # not NaN


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q = torch.tensor(list(values), dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def paired_ratio(num: Result, den: Result) -> tuple[float, float, float]:
    """Quartiles (q1, median, q3) of ``num``/``den`` taken round by round, for two implementations timed
    by one :func:`time_interleaved` call: a round's blocks ran back to back, so a drift in machine load
    cancels inside each ratio, and the quartiles show how far the ratio itself moved between rounds."""
    if len(num.rounds) != len(den.rounds) or not num.rounds:
        raise ValueError(f"paired_ratio: {num.impl!r} and {den.impl!r} were not timed in the same interleaved rounds")
    return _quartiles([a / b for a, b in zip(num.rounds, den.rounds)])


def format_ratio(num: Result, den: Result, digits: int = 2) -> str:
    """``"1.24× (1.20–1.27)"``: the median per-round ratio and its quartiles (:func:`paired_ratio`)."""
    q1, med, q3 = paired_ratio(num, den)
    return f"{med:.{digits}f}× ({q1:.{digits}f}–{q3:.{digits}f})"


def skipped(config: Config, impl: str, why: str) -> Result:
    return Result(config=config, impl=impl, median_s=float("nan"), note=why)


# ----------------------------------------------------------------------------------------------------
# Command line and environment
# ----------------------------------------------------------------------------------------------------
def make_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script shares; a script may add its own before parsing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test mode: short timing windows, no torch.compile; finishes in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per measurement (default 0.5, or 0.05 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd references")
    return p


def setup(args: argparse.Namespace) -> tuple[str, torch.dtype, float]:
    """Applies ``--threads``, checks the device; returns ``(device, dtype, min_run_time)``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda requested but torch.cuda.is_available() is False")
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.5)
    # Dynamo's graph-break and recompile warnings go to logging; they would drown the table.
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    return args.device, DTYPES[args.dtype], min_run_time


def environment_lines(device: str, extra: Mapping[str, Any] | None = None) -> list[str]:
    """What a reader needs to judge the numbers: device, threads, versions, date."""
    if device == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name()})"
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    try:
        import lipfast

        lip = f"lipfast {lipfast.__version__} (CUDA kernels: {lipfast._C.with_cuda})"
    except ImportError as exc:  # pragma: no cover - a broken install
        lip = f"lipfast not importable: {exc}"
    lines = [
        f"device: {dev}",
        f"torch.get_num_threads(): {torch.get_num_threads()}",
        f"torch {torch.__version__}; {lip}; python {platform.python_version()}",
        f"date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    if hasattr(os, "getloadavg"):
        # Other processes on a 2-core machine make OpenMP threads wait for time slices at every
        # parallel region; a load near the core count at start means the timings are suspect.
        lines.append("load average (1/5/15 min) at start: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return lines


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _timer(config: Config, impl: str, fn: Callable[[], Any]) -> benchmark.Timer:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=config.name, sub_label=impl,
                           description=config.describe(), num_threads=torch.get_num_threads())


def time_fn(config: Config, impl: str, fn: Callable[[], Any], *, min_run_time: float, note: str = "",
            warmup: int = 2) -> Result:
    """Median and IQR of ``fn()`` with ``torch.utils.benchmark.Timer.blocked_autorange`` (it
    synchronises CUDA and runs with the current thread count). ``warmup`` calls come first."""
    for _ in range(warmup):
        fn()
    m = _timer(config, impl, fn).blocked_autorange(min_run_time=min_run_time)
    return Result(config=config, impl=impl, median_s=m.median, iqr_s=m.iqr, runs=len(m.times), note=note)


def time_interleaved(config: Config, impls: Sequence[tuple[str, Callable[[], Any], str]], *,
                     min_run_time: float, rounds: int = 7, warmup: int = 2, block_multiple: int = 1) -> list[Result]:
    """Times several implementations of one case *interleaved*: ``rounds`` rounds, each timing a
    block of every implementation in turn with ``torch.utils.benchmark.Timer.timeit``; the median
    and IQR are over the rounds. A drift in machine load then hits every implementation alike, so
    the ratios stay meaningful on a shared machine. ``impls`` holds ``(name, fn, note)``;
    ``min_run_time`` is the timing budget per implementation (at least one call per round).
    ``block_multiple``: calls per block are a multiple of it, so that a variant whose calls differ in a
    cycle (a tracker with ``every=10``) has whole cycles in every block, not 0 or 1 costly calls."""
    timers, numbers = [], []
    for name, fn, _ in impls:
        for _ in range(warmup):
            fn()
        t = _timer(config, name, fn)
        one = t.timeit(1).median
        number = max(1, int(min_run_time / rounds / max(one, 1e-9)))
        numbers.append(-(-number // block_multiple) * block_multiple)
        timers.append(t)
    samples: list[list[float]] = [[] for _ in impls]
    for _ in range(rounds):
        for i, t in enumerate(timers):
            samples[i].append(t.timeit(numbers[i]).median)
    out = []
    for (name, _, note), times, number in zip(impls, samples, numbers):
        q1, med, q3 = _quartiles(times)
        out.append(Result(config=config, impl=name, median_s=med, iqr_s=q3 - q1, runs=rounds * number, note=note,
                          rounds=tuple(times)))
    return out


def try_compile(fn: Callable, *example_args, **compile_kwargs) -> tuple[Callable | None, str]:
    """``torch.compile(fn)`` run once on ``example_args``; ``(None, why)`` if compiling fails here
    (no C++ toolchain, an unsupported op, ...), so a script can skip that row with a note."""
    try:
        with warnings.catch_warnings():
            # Inductor's first import goes through torch.jit.script*, which warns of its own deprecation;
            # under ``-W error`` that alone would make compiling "fail".
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated",
                                    category=DeprecationWarning)
            compiled = torch.compile(fn, **compile_kwargs)
            compiled(*example_args)
        return compiled, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "not available on this machine"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"torch.compile failed: {type(exc).__name__}: {msg[:120]}"


# ----------------------------------------------------------------------------------------------------
# Correctness before timing
# ----------------------------------------------------------------------------------------------------
def assert_close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    """``torch.testing.assert_close`` over (nested) tuples, in float64, ``atol`` relative to the
    largest |expected| entry; raises with ``what`` in the message."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol=rtol, atol=atol, what=f"{what}[{i}]")
        return
    e = torch.as_tensor(expected).detach().to(torch.float64)
    a = torch.as_tensor(actual).detach().to(device=e.device, dtype=torch.float64)
    scale = float(e.abs().max()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-300), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def _fmt_time(s: float) -> str:
    if s != s:
        return "—"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def format_table(results: Sequence[Result], baseline: str | Sequence[str] | None = None,
                 columns: Iterable[str] = ("case", "impl", "median", "IQR", "× base", "note")) -> str:
    """A Markdown table, one row per result, grouped by case in input order. ``× base`` is
    ``median / median(baseline of the same case)`` (> 1: slower than the baseline), the baseline
    being the first impl named in ``baseline`` that the case has; without one, no ratio."""
    cols = list(columns)
    prefs = [baseline] if isinstance(baseline, str) else list(baseline or [])
    base: dict[str, float] = {}
    for name in dict.fromkeys(r.config.name for r in results):
        case = {r.impl: r.median_s for r in results if r.config.name == name and r.ok}
        for impl in prefs:
            if impl in case:
                base[name] = case[impl]
                break
    rows = []
    for r in results:
        b = base.get(r.config.name)
        ratio = f"{r.median_s / b:.2f}×" if (b and r.ok) else "—"
        cell = {"case": r.config.name, "impl": r.impl, "median": _fmt_time(r.median_s),
                "IQR": _fmt_time(r.iqr_s), "× base": ratio, "note": r.note, "runs": str(r.runs)}
        rows.append([cell[c] for c in cols])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def count_ops(fn: Callable[[], Any]) -> "collections.Counter[str]":
    """The top-level ATen (and lipfast) ops one call of ``fn`` dispatches, by name (a ``TorchDispatchMode``:
    ops a compiled kernel calls inside itself are not seen). On a GPU each is at least one launch, so a
    tracked step's count against a plain step's is the CPU-checkable proxy of its launch overhead."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as mode:
        fn()
    return mode.ops


def format_op_counts(plain: Mapping[str, int], tracked: Mapping[str, int], layers: int) -> str:
    """One line: ops per plain and tracked step, the difference per tracked layer, and the extra ops by name."""
    import collections

    extra = collections.Counter(tracked) - collections.Counter(plain)
    p, t = sum(plain.values()), sum(tracked.values())
    return (f"ops per step (dispatched, top level): plain {p}, tracked {t} (+{t - p}, "
            f"{(t - p) / max(layers, 1):.1f} per tracked layer, {layers} layers); extra: "
            + ", ".join(f"{k} ×{v}" for k, v in extra.most_common()))
