"""``ParquetWriter``: a Tracker's records as Parquet files (needs ``pyarrow``, which lipfast does not require)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..runio import LAYER_COLUMNS, NETWORK_COLUMNS, STR_COLUMNS

__all__ = ["ParquetWriter"]

LAYERS_FILE = "layers.parquet"
NETWORK_FILE = "network.parquet"


def _pyarrow():
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ImportError("lipfast.integrations.parquet.ParquetWriter needs the package 'pyarrow': "
                          "pip install pyarrow") from None


class ParquetWriter:
    """An ``on_record`` sink writing ``layers.parquet`` and ``network.parquet`` (the run folder's columns) into a
    folder, one row group per ``flush_every`` steps.

    A Parquet file is readable only once closed (its footer comes last): a killed run loses the whole file. For
    records that survive a crash, stream to a :class:`lipfast.RunWriter` too (``on_record=[RunWriter(d), pq]``)
    and convert afterwards.

    Args:
        folder: created if missing; existing Parquet files of these names are replaced.
        flush_every: steps buffered in memory per row group.
    """

    def __init__(self, folder: str | os.PathLike, flush_every: int = 100):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"ParquetWriter: flush_every must be an int >= 1, got {flush_every!r}")
        self._pa, self._pq = _pyarrow()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._rows: list[dict] = []
        self._net: list[dict] = []
        self._writers: dict[str, object] = {}
        self._closed = False

    def __call__(self, rows: list[dict], net: dict) -> None:
        if self._closed:
            raise ValueError(f"ParquetWriter for {self.folder} is closed")
        self._rows.extend(rows)
        self._net.append(net)
        if len(self._net) >= self.flush_every:
            self.flush()

    def _append(self, name: str, columns: list[str], rows: list[dict]) -> None:
        if not rows:
            return
        table = self._pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows], schema=self._schema(columns))
        if name not in self._writers:
            self._writers[name] = self._pq.ParquetWriter(self.folder / name, table.schema)
        self._writers[name].write_table(table)

    def _schema(self, columns: list[str]):
        """Fixed column types, so that every row group matches the first (a NaN-only or empty group would
        otherwise infer other types)."""
        pa = self._pa

        def kind(c):
            if c in ("step", "m", "n", "batch"):
                return pa.int64()
            if c in ("degenerate", "nonfinite"):
                return pa.bool_()
            return pa.string() if c in STR_COLUMNS else pa.float64()
        return pa.schema([(c, kind(c)) for c in columns])

    def flush(self) -> None:
        """Write the buffered steps as one row group per file."""
        self._append(LAYERS_FILE, LAYER_COLUMNS, self._rows)
        self._append(NETWORK_FILE, NETWORK_COLUMNS, self._net)
        self._rows, self._net = [], []

    def close(self) -> None:
        """Flush and finish both files. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        for writer in self._writers.values():
            writer.close()

    def __enter__(self) -> "ParquetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
