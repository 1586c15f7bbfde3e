"""The run folder: writing it during training and reading it back, robust to interruption.

A run folder holds::

    config.json        written once at start (schema_version, lipfast_version, config, created)
    layers.csv         one row per (step, layer), columns LAYER_COLUMNS
    network.csv        one row per step, columns NETWORK_COLUMNS
    summary.json       written atomically (temporary file + fsync + os.replace)
    sde_layers.csv     } written by lipfast.analysis (``lipfast simulate``)
    sde_network.csv    }
    figures/*.png      } written by lipfast.report (``lipfast report``)
    report.html        }
    checkpoint.pt      written by the training loop

CSV conventions: a header line, ``\\n`` line endings, floats written with ``repr(float)``
(shortest text that reads back bit-identical; ``nan``/``inf``/``-inf`` for non-finite values),
booleans as ``0``/``1``. Every write appends whole lines with one ``os.write`` per call and is
flushed to disk (``os.fsync``) every ``fsync_every`` writes, so a killed process keeps every
completed step; at most the last line is partial, and readers drop it.
"""

from __future__ import annotations

import csv
import dataclasses
import errno as _errno
import io
import json
import math
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "SCHEMA_VERSION",
    "LAYER_COLUMNS",
    "NETWORK_COLUMNS",
    "RunFolderError",
    "RunWriteError",
    "RunWriter",
    "Run",
    "load_run",
    "is_run_folder",
    "read_summary",
    "update_summary",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

SCHEMA_VERSION = 1

LAYER_COLUMNS = [
    "step", "layer", "kind", "m", "n", "batch", "lr", "sigma", "sigma2", "sigma_next",
    "delta_obs", "first_order", "second_order", "delta_pred", "drift", "diffusion_var",
    "ito", "ito_lo", "ito_hi", "gap", "degenerate", "residual", "sigma_err", "nonfinite", "flag_names",
    "group", "shared_with",
]  # fmt: skip
# Columns later versions added: a run folder written before them still loads, with NaN in them (it cannot
# be resumed: its rows would mix two layouts).
_ADDED_COLUMNS = frozenset({"sigma_err", "group", "shared_with"})
# Columns later versions renamed (old name -> new): pandas' DataFrame.flags shadowed ``flags``.
_RENAMED_COLUMNS = {"flags": "flag_names"}
NETWORK_COLUMNS = [
    "step", "log_bound", "log_bound_next", "drift", "diffusion_var", "ito", "loss", "train_acc",
]  # fmt: skip

CONFIG_FILE = "config.json"
LAYERS_FILE = "layers.csv"
NETWORK_FILE = "network.csv"
SUMMARY_FILE = "summary.json"
SDE_LAYERS_FILE = "sde_layers.csv"
SDE_NETWORK_FILE = "sde_network.csv"
REPORT_FILE = "report.html"
CHECKPOINT_FILE = "checkpoint.pt"
BATCHNORM_FILE = "batchnorm.csv"
FIGURES_DIR = "figures"

# Files lipfast itself creates at the top of a run folder; `overwrite` removes these and nothing else
# (plus figures/*.png and leftover temporary files of our atomic writes).
_OWN_FILES = (
    CONFIG_FILE, LAYERS_FILE, NETWORK_FILE, SUMMARY_FILE, SDE_LAYERS_FILE, SDE_NETWORK_FILE,
    REPORT_FILE, CHECKPOINT_FILE, BATCHNORM_FILE,
)  # fmt: skip
_TMP_MARK = ".lipfast-tmp-"

_INT_COLUMNS = frozenset({"step", "m", "n", "batch", "group"})
_BOOL_COLUMNS = frozenset({"degenerate", "nonfinite"})
_STR_COLUMNS = frozenset({"layer", "kind", "flag_names", "shared_with"})
STR_COLUMNS = _STR_COLUMNS  # text columns of layers.csv; every other column is numeric


class RunFolderError(ValueError):
    """A run folder cannot be created, resumed or read as asked (the message says why)."""


class RunWriteError(OSError):
    """Writing a run file failed; the message names the file. Records written before are kept."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _lipfast_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("lipfast")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - importlib.metadata exists on every supported Python
        pass
    import sys

    return str(getattr(sys.modules.get("lipfast"), "__version__", "unknown"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_error(path: Path, exc: OSError, what: str = "write") -> RunWriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    err = RunWriteError(
        exc.errno if exc.errno is not None else _errno.EIO,
        f"lipfast: cannot {what} {path}: {reason} (records already written are kept)",
    )
    err.filename = str(path)
    return err


def _fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory so a rename/creation inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(obj: Any, where: str = "summary") -> Any:
    """A JSON-able copy of ``obj``: numpy/torch scalars become Python numbers, non-finite floats
    become ``None`` (strict JSON has no NaN), paths become strings, tuples become lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    # numpy / torch scalars and 0-d arrays, numpy arrays (via tolist)
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        return _jsonable(item(), where)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise ValueError(f"{where}: {type(obj).__name__} value {obj!r} is not JSON-serialisable")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync,
    ``os.replace``. On any failure the previous file (if any) is untouched and no temporary
    file is left behind.

    Raises:
        RunWriteError: the file could not be written (the message names it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _write_error(path, exc) from exc
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` (see :func:`_jsonable`) and write it atomically to ``path``.

    Raises:
        ValueError: ``obj`` holds something that is not JSON-serialisable (nothing is written).
        RunWriteError: the file could not be written.
    """
    text = json.dumps(_jsonable(obj, Path(path).name), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises rather than returning 0 on regular files
            raise OSError(_errno.EIO, "short write")
        view = view[n:]


def _read_config(run_dir: Path) -> dict | None:
    """The parsed config.json if ``run_dir`` is a lipfast run folder, else None."""
    try:
        meta = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and "schema_version" in meta:
        return meta
    return None


def is_run_folder(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` has a config.json with a ``schema_version`` (a lipfast run folder)."""
    return _read_config(Path(run_dir)) is not None


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """summary.json of a run folder as a dict, or None when absent or unreadable."""
    try:
        obj = json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def update_summary(run_dir: str | os.PathLike, updates: Mapping[str, Any]) -> dict:
    """Merge ``updates`` into summary.json (top-level keys replaced) and write it atomically.

    Returns:
        The merged summary as written.
    """
    merged = read_summary(run_dir) or {}
    merged.update(updates)
    merged = _jsonable(merged, SUMMARY_FILE)
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, merged)
    return merged


# --------------------------------------------------------------------------------------------
# CSV encoding / decoding
# --------------------------------------------------------------------------------------------


def _fmt_float(v: Any) -> str:
    if v is None:
        return "nan"
    if isinstance(v, str):
        v = float(v)  # raises ValueError for junk
    return repr(float(v))


def _fmt_int(col: str, v: Any) -> str:
    if isinstance(v, bool) or v is None:
        raise ValueError(f"column {col!r} must be an integer, got {v!r}")
    try:
        i = int(v)
        ok = float(v) == i
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"column {col!r} must be an integer, got {v!r}")
    return str(i)


def _fmt_bool(col: str, v: Any) -> str:
    if isinstance(v, str) or v is None:
        raise ValueError(f"column {col!r} must be a boolean, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"column {col!r} must be a boolean, got {v!r}") from None
    if f not in (0.0, 1.0):
        raise ValueError(f"column {col!r} must be a boolean (or 0/1), got {v!r}")
    return "1" if f else "0"


def _fmt_str(col: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"column {col!r} must be a string, got {type(v).__name__} {v!r}")
    if "\n" in v or "\r" in v:
        raise ValueError(f"column {col!r} must not contain line breaks, got {v!r}")
    return v


def _encode_rows(columns: list[str], rows: Iterable[Mapping[str, Any]], what: str) -> bytes:
    """One CSV text block for ``rows``; checks every row before encoding any."""
    expected = set(columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{what} row {i} must be a dict, got {type(row).__name__}")
        keys = set(row)
        if keys != expected:
            missing = [c for c in columns if c not in keys]
            unknown = sorted(str(k) for k in keys - expected)
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:
                parts.append(f"unknown {unknown}")
            raise ValueError(f"{what} row {i}: " + "; ".join(parts))
        cells = []
        for col in columns:
            v = row[col]
            try:
                if col in _INT_COLUMNS:
                    cells.append(_fmt_int(col, v))
                elif col in _BOOL_COLUMNS:
                    cells.append(_fmt_bool(col, v))
                elif col in _STR_COLUMNS:
                    cells.append(_fmt_str(col, v))
                else:
                    cells.append(_fmt_float(v))
            except (TypeError, ValueError) as exc:
                msg = str(exc) if str(exc).startswith("column") else f"column {col!r}: {exc}"
                raise ValueError(f"{what} row {i}: {msg}") from None
        writer.writerow(cells)
    return buf.getvalue().encode("utf-8")


def _header(columns: list[str]) -> bytes:
    return (",".join(columns) + "\n").encode("utf-8")


def _parse_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in ("1", "true", "1.0"):
        return True
    if t in ("0", "false", "0.0", ""):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def _parse_float(s: str) -> float:
    s = s.strip()
    return float(s) if s else math.nan


def _parse_cell(col: str, s: str) -> Any:
    if col in _INT_COLUMNS:
        return int(s)
    if col in _BOOL_COLUMNS:
        return _parse_bool(s)
    if col in _STR_COLUMNS:
        return s
    return _parse_float(s)


def _split_complete(data: bytes) -> tuple[bytes, int]:
    """(the part of ``data`` made of complete lines, number of partial trailing lines dropped)."""
    if not data or data.endswith(b"\n"):
        return data, 0
    cut = data.rfind(b"\n") + 1
    return data[:cut], 1


def _read_csv(path: Path, columns: list[str]) -> tuple[list[dict], int]:
    """Typed rows of a run CSV and the number of dropped (partial) trailing lines."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise RunFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    data, dropped = _split_complete(data)
    if not data:
        return [], dropped
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"{path} is not UTF-8 text ({exc})") from None
    lines = text.split("\n")[:-1]  # data ends with "\n"
    reader = csv.reader(lines)
    header = [_RENAMED_COLUMNS.get(c, c) for c in next(reader)]
    if header != [c for c in columns if c in header] or not set(columns) - set(header) <= _ADDED_COLUMNS:
        raise RunFolderError(
            f"{path}: unexpected CSV header {header!r}; this lipfast expects {columns!r}"
        )
    # Columns added later, missing from an older run: the values every record of that run would have had.
    missing = {c: {"group": -1, "shared_with": ""}.get(c, math.nan) for c in columns if c not in header}
    ncol = len(header)
    rows = []
    for lineno, cells in enumerate(reader, start=2):
        if len(cells) != ncol:
            raise RunFolderError(
                f"{path}, line {lineno}: expected {ncol} fields, found {len(cells)}"
            )
        try:
            row = {c: _parse_cell(c, s) for c, s in zip(header, cells)}
            rows.append({c: row[c] if c in row else missing[c] for c in columns})
        except ValueError as exc:
            raise RunFolderError(f"{path}, line {lineno}: {exc}") from None
    return rows, dropped


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _AppendFile:
    """An append-only CSV file written with whole-block os.write calls."""

    def __init__(self, path: Path, columns: list[str], fsync_every: int):
        self.path = path
        self.columns = columns
        self.fsync_every = fsync_every
        self._pending = 0
        self.fd: int | None = None

    def open(self, *, fresh: bool) -> None:
        """Open for appending; ``fresh`` starts the file with only its header. Otherwise an
        existing file's partial last line is cut and its header checked (a missing or empty
        file gets a header)."""
        try:
            if fresh or not self.path.exists() or self.path.stat().st_size == 0:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _write_all(fd, _header(self.columns))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                self._repair()
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise _write_error(self.path, exc, "open") from exc

    def _repair(self) -> None:
        """Cut a partial last line and check the header of an existing file."""
        data = self.path.read_bytes()
        header = _header(self.columns)
        complete, _ = _split_complete(data)
        if not complete:
            # Killed while writing the header: only a prefix of it is there.
            if not header.startswith(data):
                raise RunFolderError(
                    f"cannot resume: {self.path} does not start with the expected CSV header"
                )
            fixed = header
        else:
            first = complete.split(b"\n", 1)[0] + b"\n"
            if first != header:
                got = first.decode("utf-8", "replace").strip()
                raise RunFolderError(
                    f"cannot resume: {self.path} has header {got!r}, expected "
                    f"{header.decode().strip()!r}"
                )
            fixed = complete
        if fixed == data:
            return
        if data.startswith(fixed):
            with open(self.path, "r+b") as f:
                f.truncate(len(fixed))
                f.flush()
                os.fsync(f.fileno())
        else:
            write_text_atomic(self.path, fixed.decode("utf-8"))

    def truncate_to(self, step: int) -> int:
        """Drop rows whose step is >= ``step`` (and any partial line). Returns rows dropped."""
        self.close()
        try:
            self._repair()
            data = self.path.read_bytes()
        except OSError as exc:
            raise _write_error(self.path, exc, "read") from exc
        lines = data.split(b"\n")[:-1]
        keep = [lines[0]]
        dropped = 0
        for line in lines[1:]:
            head = line.split(b",", 1)[0]
            try:
                s = int(head)
            except ValueError:
                raise RunFolderError(
                    f"cannot resume: {self.path} has a row with step {head!r}"
                ) from None
            if s < step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            write_text_atomic(self.path, b"\n".join(keep).decode("utf-8") + "\n")
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise _write_error(self.path, exc, "open") from exc
        return dropped

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self.fd is None:
            raise ValueError(f"{self.path.name} is closed")
        try:
            start = os.fstat(self.fd).st_size
        except OSError:
            start = None
        try:
            _write_all(self.fd, data)
            self._pending += 1
            if self.fsync_every and self._pending >= self.fsync_every:
                os.fsync(self.fd)
                self._pending = 0
        except OSError as exc:
            # Remove whatever part of this block made it to the file, so the file still ends
            # with the last complete write (best effort: readers drop a partial line anyway).
            if start is not None:
                try:
                    os.ftruncate(self.fd, start)
                except OSError:
                    pass
            raise _write_error(self.path, exc) from exc

    def sync(self) -> None:
        if self.fd is not None and self._pending:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            self._pending = 0

    def close(self) -> None:
        if self.fd is not None:
            self.sync()
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class RunWriter:
    """Writes a run folder while training runs.

    It is also a record sink: ``Tracker(..., on_record=RunWriter(run_dir))`` appends each tracked step's
    rows to layers.csv and network.csv as the step completes (one ``os.write`` per file and step), so a
    killed process keeps every completed step and, with ``keep_records=False``, memory stays flat.
    ``lipfast report run_dir`` reads the folder; :meth:`write_summary` adds a summary.json.

    Args:
        run_dir: the folder (created with its parents if missing).
        config: JSON-able training options, stored in config.json under ``"config"`` (default: none).
        overwrite: start afresh in a folder that holds files: removes lipfast's own files
            (config.json, the CSVs, summary.json, report.html, checkpoint.pt, figures/*.png) and
            nothing else.
        resume: continue an existing run: its CSVs are opened for appending after their
            partial last line (if any) is cut. Call :meth:`truncate_to` with the checkpoint's
            step (or pass ``resume_from_step``) so the records equal those of an uninterrupted
            run. On resume config.json keeps its ``created`` time, gets the given ``config``
            and a ``resumed`` list of times. Resuming a missing or empty folder starts a new run.
        resume_from_step: with ``resume``, drop rows whose step is >= this step at once.
        fsync_every: fsync the CSVs after every this many writes (1: every write; 0: only at
            :meth:`flush`/:meth:`close`). Every write reaches the OS at once regardless, so a
            killed *process* loses nothing; fsync protects against a machine crash.

    Raises:
        RunFolderError: the folder holds other files and neither flag allows writing there.
        RunWriteError: the folder or a file in it cannot be created (the message names it).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
        resume_from_step: int | None = None,
        fsync_every: int = 1,
    ):
        if overwrite and resume:
            raise ValueError("RunWriter: overwrite and resume are mutually exclusive")
        if resume_from_step is not None and not resume:
            raise ValueError("RunWriter: resume_from_step needs resume=True")
        config = {} if config is None else config
        if not isinstance(config, Mapping):
            raise ValueError(f"RunWriter: config must be a dict, got {type(config).__name__}")
        if int(fsync_every) < 0:
            raise ValueError(f"RunWriter: fsync_every must be >= 0, got {fsync_every}")
        self.path = Path(run_dir)
        self.fsync_every = int(fsync_every)
        self._closed = False
        config_json = _jsonable(dict(config), "config")

        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"run folder {path} exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(path, exc, "create run folder") from exc

        existing = _read_config(path)
        non_empty = any(path.iterdir())
        resuming = False
        if non_empty:
            if resume and existing is None:
                raise RunFolderError(
                    f"cannot resume {path}: the folder is not empty and is not a lipfast run "
                    f"folder (no config.json with a schema_version)"
                )
            if existing is None and not overwrite:
                raise RunFolderError(
                    f"refusing to write into {path}: the folder is not empty and is not a "
                    f"lipfast run folder (no config.json with a schema_version); choose another "
                    f"folder or pass overwrite=True to write there anyway"
                )
            if existing is not None and not (overwrite or resume):
                raise RunFolderError(
                    f"refusing to write into {path}: it already holds a lipfast run; pass "
                    f"overwrite=True to replace it or resume=True to continue it"
                )
            if resume and existing is not None:
                version = existing.get("schema_version")
                if not isinstance(version, int) or version > SCHEMA_VERSION:
                    raise RunFolderError(
                        f"cannot resume {path}: it has schema_version {version!r}, this lipfast "
                        f"writes schema_version {SCHEMA_VERSION}; upgrade lipfast or start a "
                        f"new run"
                    )
                resuming = True
            if overwrite:
                self._remove_own_files()

        meta = {
            "schema_version": SCHEMA_VERSION,
            "lipfast_version": _lipfast_version(),
            "config": config_json,
            "created": _now(),
        }
        if resuming:
            meta["created"] = existing.get("created", meta["created"])
            meta["resumed"] = list(existing.get("resumed", [])) + [_now()]
        write_json_atomic(path / CONFIG_FILE, meta)
        self.meta = meta

        self._layers = _AppendFile(path / LAYERS_FILE, LAYER_COLUMNS, self.fsync_every)
        self._network = _AppendFile(path / NETWORK_FILE, NETWORK_COLUMNS, self.fsync_every)
        try:
            self._layers.open(fresh=not resuming)
            self._network.open(fresh=not resuming)
        except BaseException:
            self._layers.close()
            self._network.close()
            raise
        if resume_from_step is not None:
            self.truncate_to(resume_from_step)

    # -- folder management ---------------------------------------------------------------

    def _remove_own_files(self) -> None:
        path = self.path
        try:
            for name in _OWN_FILES:
                p = path / name
                if p.is_file() or p.is_symlink():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
            for p in path.iterdir():
                if _TMP_MARK in p.name and (p.is_file() or p.is_symlink()):
                    p.unlink()
            figures = path / FIGURES_DIR
            if figures.is_dir():
                for p in figures.glob("*.png"):
                    p.unlink()
                if not any(figures.iterdir()):
                    figures.rmdir()
        except OSError as exc:
            raise _write_error(Path(exc.filename or path), exc, "remove") from exc

    # -- writing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"RunWriter for {self.path} is closed")

    def truncate_to(self, step: int) -> tuple[int, int]:
        """Drop every layers.csv and network.csv row whose step is >= ``step`` (call it with the
        step a checkpoint resumes at). Returns (layer rows dropped, network rows dropped)."""
        self._check_open()
        step = int(step)
        return self._layers.truncate_to(step), self._network.truncate_to(step)

    def write_layers(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append per-layer records (dicts with exactly the LAYER_COLUMNS keys).

        Raises:
            ValueError: a row has missing or unknown keys or a badly typed value (the message
                names them); nothing of the call is written then.
            RunWriteError: the file could not be written; rows written before are kept.
        """
        self._check_open()
        self._layers.append(_encode_rows(LAYER_COLUMNS, list(rows), "layers"))

    def write_network(self, row: Mapping[str, Any]) -> None:
        """Append one per-step network record (a dict with exactly the NETWORK_COLUMNS keys;
        ``train_acc`` may be None or NaN). Errors as :meth:`write_layers`."""
        self._check_open()
        self._network.append(_encode_rows(NETWORK_COLUMNS, [row], "network"))

    def __call__(self, rows: Iterable[Mapping[str, Any]], network: Mapping[str, Any]) -> None:
        """A Tracker's ``on_record``: append one step's layer rows and its network row."""
        self.write_layers(rows)
        self.write_network(network)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically, merged over the keys it already holds (for instance
        the ``sde``/``pathwise`` keys of ``lipfast simulate``). Non-finite floats are stored
        as null."""
        update_summary(self.path, summary)

    def flush(self) -> None:
        """fsync both CSVs now."""
        self._layers.sync()
        self._network.sync()

    def close(self) -> None:
        """fsync and close the CSVs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._layers.close()
        self._network.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort on garbage collection
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder read back.

    Attributes:
        path: the folder.
        config: the training options (config.json's ``"config"``).
        layers: per-(step, layer) records in file order, typed (int step/m/n/batch, bool
            degenerate/nonfinite, str layer/kind, float otherwise; NaN for missing values).
        network: per-step records in file order (float ``train_acc`` NaN when absent).
        summary: summary.json, or None when there is none yet.
        dropped_lines: partial trailing CSV lines (an interrupted write) that were ignored.
        meta: the whole config.json (schema_version, lipfast_version, created, ...).
    """

    path: Path
    config: dict
    layers: list
    network: list
    summary: dict | None
    dropped_lines: int = 0
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        """Layer names in order of first appearance."""
        return list(dict.fromkeys(r["layer"] for r in self.layers))

    @property
    def schema_version(self) -> int:
        return int(self.meta.get("schema_version", SCHEMA_VERSION))

    def to_pandas(self):
        """(layer_frame, network_frame) as pandas DataFrames (pandas is optional).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("Run.to_pandas needs pandas: pip install pandas") from exc
        return (
            pd.DataFrame(self.layers, columns=LAYER_COLUMNS),
            pd.DataFrame(self.network, columns=NETWORK_COLUMNS),
        )


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder.

    A partial last line in a CSV (the process was killed mid-write) is dropped and counted in
    ``Run.dropped_lines``, as are layer rows of a step whose network row was never written (the step was
    cut short); a missing CSV reads as no rows.

    Raises:
        RunFolderError: the folder is missing, config.json is missing or invalid, the run was
            written by a newer lipfast (higher schema_version), or a CSV header or row is not
            what this lipfast writes. The message is one line naming the problem.
    """
    path = Path(run_dir)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise RunFolderError(f"run folder {path} is not a folder")
    cfg_path = path / CONFIG_FILE
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFolderError(
            f"{path} is not a lipfast run folder: {CONFIG_FILE} is missing"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"cannot read {cfg_path}: {exc}") from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise RunFolderError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or "schema_version" not in meta:
        raise RunFolderError(f"{cfg_path} is not a lipfast run config (no schema_version)")
    version = meta["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunFolderError(f"{cfg_path}: invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise RunFolderError(
            f"{path} was written with run-folder schema_version {version} "
            f"(lipfast {meta.get('lipfast_version', '?')}), but this lipfast "
            f"({_lipfast_version()}) reads schema_version {SCHEMA_VERSION} at most; "
            f"upgrade lipfast to read it"
        )
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise RunFolderError(f"{cfg_path}: 'config' must be an object, got {config!r}")
    layers, d1 = _read_csv(path / LAYERS_FILE, LAYER_COLUMNS)
    network, d2 = _read_csv(path / NETWORK_FILE, NETWORK_COLUMNS)
    if network:
        # A step is committed by its network row, written after its layer rows: layer rows past the last one
        # are a step cut short (a SIGKILL can land inside the write of a step's lines, leaving some of them).
        last = network[-1]["step"]
        uncommitted = sum(r["step"] > last for r in layers)
        if uncommitted:
            layers = [r for r in layers if r["step"] <= last]
            d1 += uncommitted
    return Run(
        path=path,
        config=config,
        layers=layers,
        network=network,
        summary=read_summary(path),
        dropped_lines=d1 + d2,
        meta=meta,
    )
