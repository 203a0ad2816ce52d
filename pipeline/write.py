"""Driver-side sink: the output folder's state, work units, and shards committed atomically.

Layout of OUTPUT:
  part-NNNNN.parquet       one shard per work unit, written whole or not at all
  _prompts.parquet         the prompt set and its text embeddings
  _dataset.json            what the numbers depend on (model, revision, dtype, prompt set) and the dataset version
  _run.json                the newest run's summary
  _runs/<run-id>.json      every run's counts and timings; <run-id>.plan.parquet its work units (for resume)
  _listing.parquet         the uris the newest run listed
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import (
    IMAGE_SCHEMA,
    error_column,
    features_column,
    logits_column,
    metadata_bytes,
    source_columns,
    with_crop_columns,
    without_absent_logits,
)
from .sources import image_id
from .storage import filesystem, is_remote, join, put_file_atomic, with_retries, write_bytes_atomic, write_json_atomic

SHARD_RE = re.compile(r"part-(\d+)\.parquet$")


def shard_name(unit: int) -> str:
    return f"part-{unit:05d}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class OutputDir:
    """An OUTPUT folder on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = filesystem(self.url, self.storage_options)

    def child(self, *names: str) -> str:
        return join(self.url, *names)

    def _child_path(self, *names: str) -> str:
        return join(self.path, *names)

    def exists(self) -> bool:
        return with_retries(lambda: self.fs.exists(self.path))

    def read_json(self, *names: str) -> dict | None:
        path = self._child_path(*names)
        try:
            return json.loads(with_retries(lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            return None

    def write_json(self, obj: dict, *names: str) -> None:
        write_json_atomic(self.child(*names), obj, self.storage_options)

    def write_table(self, table: pa.Table, *names: str) -> None:
        write_bytes_atomic(self.child(*names), parquet_bytes(table), self.storage_options)

    def shard_units(self) -> dict[int, str]:
        """Committed shards: unit -> path (listed afresh: a long-lived process must see shards written since)."""
        self.fs.invalidate_cache(self.path)
        try:
            names = with_retries(lambda: self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return {}
        units = {}
        for name in names:
            m = SHARD_RE.search(name.rsplit("/", 1)[-1])
            if m and name.rsplit("/", 1)[-1].startswith("part-"):
                units[int(m.group(1))] = name
        return units

    def committed_index(
        self, columns=("uri", "status", "size", "mtime", "etag", "run_id", "dataset_version")
    ) -> pa.Table:
        """Selected columns of every committed shard (one column read, not the features)."""
        paths = sorted(self.shard_units().values())
        if not paths:
            return pa.table({c: pa.array([], IMAGE_SCHEMA.field(c).type) for c in columns})
        import pyarrow.dataset as pads
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        arrow_fs = PyFileSystem(FSSpecHandler(self.fs)) if is_remote(self.url) else None
        return pads.dataset(paths, format="parquet", filesystem=arrow_fs).to_table(columns=list(columns))

    def runs(self) -> list[dict]:
        self.fs.invalidate_cache(self._child_path("_runs"))
        try:
            names = with_retries(lambda: self.fs.ls(self._child_path("_runs"), detail=False))
        except FileNotFoundError:
            return []
        out = []
        for name in sorted(names):
            if name.endswith(".json"):
                record = self.read_json("_runs", name.rsplit("/", 1)[-1])
                if record:
                    out.append(record)
        return out

    def remove(self, *names: str) -> None:
        """Remove a file of OUTPUT; nothing if it is not there."""
        path = self._child_path(*names)
        try:
            with_retries(lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def read_table(self, *names: str) -> pa.Table | None:
        path = self._child_path(*names)
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:
            return None


def newest_per_uri(table: pa.Table) -> pa.Table:
    """Each uri's newest row (by run id, which sorts by time), sorted by uri."""
    if table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("uri", "ascending"), ("run_id", "descending")]))
    uris = table.column("uri").to_numpy(zero_copy_only=False)
    keep = np.ones(len(uris), dtype=bool)
    keep[1:] = uris[1:] != uris[:-1]
    return table.filter(pa.array(keep))


# A spilled unit becomes its shard in row groups of about SHARD_ROW_GROUP_BYTES of Arrow data (at most
# SHARD_ROW_GROUP rows): the commit holds one row group, never the unit, whatever the row's width.
SHARD_ROW_GROUP = 65_536
SHARD_ROW_GROUP_BYTES = 8 * 2**20
ROW_KEY = "__row"  # the plan row number, kept beside a waiting unit's rows to sort its shard


class _Unit:
    """One work unit in flight: which of its rows arrived (a bitmap over its contiguous row numbers, or a set when
    they are not known), and its rows so far as Arrow tables, in memory or spilled to a local Arrow IPC file whose
    batches' row ranges are kept (so a commit reads only the batches of the window it writes)."""

    def __init__(self, expected: int, first_row: int | None, spill: str | None):
        self.expected, self.first_row, self.spill = expected, first_row, spill
        self.seen = np.zeros(expected, bool) if first_row is not None else set()
        self.taken = 0
        self.parts: list[pa.Table] = []
        self.writer = None
        self.ranges: list[tuple[int, int]] = []  # (lowest, highest) row number of each spilled batch
        self.row_bytes = 0.0  # the widest Arrow row seen, for the size of a window
        self.counts = {"ok": 0, "error": 0}
        self.error_classes: dict[str, int] = {}

    def fresh(self, rows: np.ndarray) -> np.ndarray:
        """Positions of rows not seen before (each once, also within this batch); marks them seen."""
        if isinstance(self.seen, set):
            keep = []
            for i, r in enumerate(rows.tolist()):
                if r not in self.seen:
                    self.seen.add(r)
                    keep.append(i)
            return np.asarray(keep, dtype=np.int64)
        offsets = rows.astype(np.int64) - self.first_row
        inside = (offsets >= 0) & (offsets < self.expected)
        _, first = np.unique(offsets, return_index=True)
        once = np.zeros(len(rows), bool)
        once[first] = True
        keep = np.flatnonzero(inside & once & ~self.seen[np.clip(offsets, 0, self.expected - 1)])
        self.seen[offsets[keep]] = True
        return keep

    def append(self, table: pa.Table, rows: np.ndarray) -> None:
        """Keep shard rows (with their plan row numbers, for the order of the shard)."""
        table = table.append_column(ROW_KEY, pa.array(rows.astype(np.int64)))
        if self.spill is None:
            self.parts.append(table)
            return
        self.row_bytes = max(self.row_bytes, table.nbytes / max(1, table.num_rows))
        if self.writer is None:
            self.writer = pa.ipc.new_file(self.spill, table.schema)
        for batch in table.to_batches():
            if batch.num_rows:
                keys = batch.column(ROW_KEY)
                self.writer.write_batch(batch)
                self.ranges.append((pc.min(keys).as_py(), pc.max(keys).as_py()))

    def window_rows(self) -> int:
        return int(min(SHARD_ROW_GROUP, max(64, SHARD_ROW_GROUP_BYTES // max(1.0, self.row_bytes))))

    def sorted_tables(self):
        """The unit's rows sorted by row number, one window of row numbers at a time: a spilled unit's batches are
        read only for the windows they overlap (not memory-mapped: mapped pages would stay resident), so memory
        holds one window, never the unit."""
        if self.spill is None:
            table = pa.concat_tables(self.parts)
            yield table.take(pc.sort_indices(table, [(ROW_KEY, "ascending")])).drop_columns([ROW_KEY])
            return
        self.writer.close()
        if not self.ranges:
            return
        lows = np.array([r[0] for r in self.ranges], np.int64)
        highs = np.array([r[1] for r in self.ranges], np.int64)
        step = self.window_rows()
        with pa.OSFile(self.spill) as source:
            reader = pa.ipc.open_file(source)
            for lo in range(int(lows.min()), int(highs.max()) + 1, step):
                hi = lo + step
                window = []
                for i in np.flatnonzero((lows < hi) & (highs >= lo)):
                    batch = reader.get_batch(int(i))
                    keys = batch.column(ROW_KEY)
                    if lows[i] < lo or highs[i] >= hi:
                        batch = batch.filter(pc.and_(pc.greater_equal(keys, lo), pc.less(keys, hi)))
                    window.append(batch)
                table = pa.Table.from_batches(window, schema=reader.schema)
                del window
                if table.num_rows:
                    table = table.take(pc.sort_indices(table, [(ROW_KEY, "ascending")])).drop_columns([ROW_KEY])
                    yield table  # (the unsorted window is freed before the shard writer encodes this one)
                del table

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.spill is not None and os.path.exists(self.spill):
            os.unlink(self.spill)


class ShardWriter:
    """Collects result rows per work unit (dropping rows Ray delivered twice) and commits each complete unit.

    `build_table(cols)` turns result rows (numpy columns) into shard rows (an Arrow table; every call the same
    schema). `before_commit()` runs before each shard is written (the lease check: a run that lost OUTPUT writes
    nothing). With `spill_dir`, a unit's rows wait in a local file, not in memory, and its shard is written from it
    in row groups: the driver's memory does not grow with the unit's size. `first_rows` (unit -> its first row
    number; a unit's rows are contiguous) lets a bitmap, not a set, record which rows arrived. A shard's rows are
    sorted by plan row (uri order for images), however they arrived.
    """

    def __init__(
        self,
        out: OutputDir,
        unit_counts: dict[int, int],
        build_table,
        prov: dict,
        before_commit=None,
        spill_dir: str | None = None,
        first_rows: dict[int, int] | None = None,
    ):
        self.out = out
        self.build_table = build_table
        self.before_commit = before_commit
        self.metadata = metadata_bytes(prov)
        self.spill_dir = spill_dir
        self.first_rows = first_rows or {}
        self.expected = {int(u): int(c) for u, c in unit_counts.items()}
        self.units: dict[int, _Unit] = {}
        self.committed: list[int] = []
        self.counts = {"ok": 0, "error": 0, "duplicates_dropped": 0}
        self.error_classes: dict[str, int] = {}
        self.rows_taken = 0  # rows accepted (each once), committed or waiting for the rest of their unit

    def _unit(self, unit: int) -> _Unit | None:
        if unit not in self.units:
            if unit not in self.expected:
                return None
            spill = os.path.join(self.spill_dir, f"unit-{unit}.arrows") if self.spill_dir else None
            self.units[unit] = _Unit(self.expected[unit], self.first_rows.get(unit), spill)
        return self.units[unit]

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        """Take one result batch; returns the units it completed (already committed)."""
        done = []
        units, rows = np.asarray(batch["unit"]), np.asarray(batch["row"])
        for unit in np.unique(units):
            idx = np.flatnonzero(units == unit)
            state = self._unit(int(unit))
            if state is None:  # committed already (a batch Ray delivered again), or not this run's
                self.counts["duplicates_dropped"] += len(idx)
                continue
            take = idx[state.fresh(rows[idx])]
            self.counts["duplicates_dropped"] += len(idx) - len(take)
            if not len(take):
                continue
            cols = {k: np.asarray(v)[take] for k, v in batch.items()}
            state.append(self.build_table(cols), rows[take])
            state.taken += len(take)
            self.rows_taken += len(take)
            failed = cols["status"] != "ok"
            state.counts["ok"] += int((~failed).sum())
            state.counts["error"] += int(failed.sum())
            classes = cols.get("error_class")
            for cls in classes[failed] if classes is not None else np.full(int(failed.sum()), None):
                key = str(cls or "other")
                state.error_classes[key] = state.error_classes.get(key, 0) + 1
            if state.taken == state.expected:
                self._commit(int(unit), state)
                done.append(int(unit))
        return done

    def _commit(self, unit: int, state: _Unit) -> None:
        if self.before_commit is not None:
            self.before_commit()
        if state.spill is None:
            table = next(state.sorted_tables()).replace_schema_metadata(self.metadata)
            self.out.write_table(table, shard_name(unit))
        else:
            local = state.spill + ".parquet"
            try:
                write_row_groups(state.sorted_tables(), local, self.metadata)
                put_file_atomic(local, self.out.child(shard_name(unit)), self.out.storage_options)
            finally:
                if os.path.exists(local):
                    os.unlink(local)
        state.discard()
        pa.default_memory_pool().release_unused()  # the commit's buffers go back to the system, not kept
        for key, n in state.counts.items():
            self.counts[key] += n
        for key, n in state.error_classes.items():
            self.error_classes[key] = self.error_classes.get(key, 0) + n
        self.committed.append(unit)
        del self.units[unit]
        del self.expected[unit]

    def close(self) -> None:
        """Drop the spill files of units that never completed (a failed run redoes them)."""
        for state in self.units.values():
            state.discard()

    @property
    def pending(self) -> int:
        return len(self.expected)

    @property
    def missing_rows(self) -> int:
        """Rows of the unfinished units that have not arrived."""
        return sum(n - (self.units[u].taken if u in self.units else 0) for u, n in self.expected.items())


def write_row_groups(tables, path: str, metadata: dict) -> None:
    """Tables (one schema) into a local Parquet file, each its own row group."""
    writer = None
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema.with_metadata(metadata), compression="zstd")
            writer.write_table(table.replace_schema_metadata(metadata))
    finally:
        if writer is not None:
            writer.close()


def unit_first_rows(units: dict[int, int]) -> dict[int, int]:
    """unit -> its first row number, for a plan whose rows are numbered from 0 in unit order (every plan here)."""
    first, out = 0, {}
    for unit in sorted(units):
        out[unit] = first
        first += units[unit]
    return out


def image_table_builder(run_id: str, dataset_version: int):
    """build_table for image shards: result columns plus what the listing knew of each input (size, mtime and etag
    travel with the rows through the stages: the driver keeps no per-input state)."""

    def build(cols: dict[str, np.ndarray]) -> pa.Table:
        ok = cols["status"] == "ok"
        uris = [str(u) for u in cols["uri"]]
        n = len(uris)
        table = pa.Table.from_arrays(
            [
                pa.array([image_id(u) for u in uris], pa.string()),
                pa.array(uris, pa.string()),
                pa.array([str(s) for s in cols["status"]], pa.string()),
                error_column(cols["error"]),
                pa.array(cols["width"], pa.int32()),
                pa.array(cols["height"], pa.int32()),
                features_column(cols, ok),
                logits_column(cols, ok),
                *source_columns(cols),
                pa.array([run_id] * n, pa.string()),
                pa.array([dataset_version] * n, pa.int32()),
            ],
            schema=IMAGE_SCHEMA,
        )
        return with_crop_columns(cols, ok, without_absent_logits(cols, table))

    return build
