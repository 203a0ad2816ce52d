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
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .schema import IMAGE_SCHEMA, error_column, source_columns, fixed_list, logits_column, metadata_bytes, without_absent_logits
from .sources import image_id
from .storage import filesystem, is_remote, join, with_retries, write_bytes_atomic, write_json_atomic

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

    def committed_index(self, columns=("uri", "status", "size", "mtime", "etag", "run_id",
                                       "dataset_version")) -> pa.Table:
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

    def read_table(self, *names: str) -> pa.Table | None:
        path = self._child_path(*names)
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:
            return None

    def read_plan(self, run_id: str) -> pa.Table | None:
        return self.read_table("_runs", f"{run_id}.plan.parquet")


def newest_per_uri(table: pa.Table) -> pa.Table:
    """Each uri's newest row (by run id, which sorts by time), sorted by uri."""
    if table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("uri", "ascending"), ("run_id", "descending")]))
    uris = table.column("uri").to_numpy(zero_copy_only=False)
    keep = np.ones(len(uris), dtype=bool)
    keep[1:] = uris[1:] != uris[:-1]
    return table.filter(pa.array(keep))


@dataclass
class _Unit:
    expected: int
    seen: set = field(default_factory=set)
    parts: list = field(default_factory=list)


class ShardWriter:
    """Collects result rows per work unit (dropping rows Ray delivered twice) and commits each complete unit.

    `build_table(cols)` turns one unit's rows (numpy columns sorted by `row`) into the shard's Arrow table.
    `before_commit()` runs before each shard is written (the lease check: a run that lost OUTPUT writes nothing).
    """

    def __init__(self, out: OutputDir, unit_counts: dict[int, int], build_table, prov: dict, before_commit=None):
        self.out = out
        self.build_table = build_table
        self.before_commit = before_commit
        self.metadata = metadata_bytes(prov)
        self.units = {int(u): _Unit(int(c)) for u, c in unit_counts.items()}
        self.committed: list[int] = []
        self.counts = {"ok": 0, "error": 0, "duplicates_dropped": 0}
        self.error_classes: dict[str, int] = {}
        self.rows_taken = 0  # rows accepted (each once), committed or waiting for the rest of their unit

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        """Take one result batch; returns the units it completed (already committed)."""
        done = []
        units, rows = batch["unit"], batch["row"]
        for unit in np.unique(units):
            state = self.units.get(int(unit))
            if state is None:
                self.counts["duplicates_dropped"] += int((units == unit).sum())
                continue
            idx = np.flatnonzero(units == unit)
            fresh = [i for i in idx if int(rows[i]) not in state.seen]
            self.counts["duplicates_dropped"] += len(idx) - len(fresh)
            if not fresh:
                continue
            state.seen.update(int(rows[i]) for i in fresh)
            self.rows_taken += len(fresh)
            take = np.asarray(fresh)
            state.parts.append({k: np.asarray(v)[take] for k, v in batch.items()})
            if len(state.seen) == state.expected:
                self._commit(int(unit), state)
                done.append(int(unit))
        return done

    def _commit(self, unit: int, state: _Unit) -> None:
        cols = {k: np.concatenate([p[k] for p in state.parts]) for k in state.parts[0]}
        order = np.argsort(cols["row"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        table = self.build_table(cols).replace_schema_metadata(self.metadata)
        if self.before_commit is not None:
            self.before_commit()
        self.out.write_table(table, shard_name(unit))
        failed = cols["status"] != "ok"
        self.counts["ok"] += int((~failed).sum())
        self.counts["error"] += int(failed.sum())
        classes = cols.get("error_class")
        for cls in (classes[failed] if classes is not None else np.full(int(failed.sum()), None)):
            key = str(cls or "other")
            self.error_classes[key] = self.error_classes.get(key, 0) + 1
        self.committed.append(unit)
        del self.units[unit]

    @property
    def pending(self) -> int:
        return len(self.units)


def image_table_builder(run_id: str, dataset_version: int):
    """build_table for image shards: result columns plus what the listing knew of each input (size, mtime and etag
    travel with the rows through the stages: the driver keeps no per-input state)."""

    def build(cols: dict[str, np.ndarray]) -> pa.Table:
        ok = cols["status"] == "ok"
        uris = [str(u) for u in cols["uri"]]
        n = len(uris)
        return without_absent_logits(cols, pa.Table.from_arrays([
            pa.array([image_id(u) for u in uris], pa.string()),
            pa.array(uris, pa.string()),
            pa.array([str(s) for s in cols["status"]], pa.string()),
            error_column(cols["error"]),
            pa.array(cols["width"], pa.int32()),
            pa.array(cols["height"], pa.int32()),
            fixed_list(np.asarray(cols["image_features"], np.float16), pa.float16(), ok),
            logits_column(cols, ok),
            *source_columns(cols),
            pa.array([run_id] * n, pa.string()),
            pa.array([dataset_version] * n, pa.int32()),
        ], schema=IMAGE_SCHEMA))

    return build


def check_identity(out: OutputDir, identity: dict, new_version: bool) -> int:
    """The dataset version to write; refuses to mix a changed model/revision/dtype/prompt set silently."""
    current = out.read_json("_dataset.json")
    if current is None:
        return 1
    old = current.get("identity", {})
    if old == identity:
        return int(current.get("version", 1))
    changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if not new_version:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        raise UserError(f"output {out.url} was made with a different {', '.join(changed)} ({detail}); "
                        "pass --new-version to start a new dataset version there, or use another OUTPUT")
    return int(current.get("version", 1)) + 1
