"""Planning at scale: the listing streams into Parquet chunks, DuckDB joins it against the committed index out of
core and writes the plan file (inputs in work units) that Ray Data reads. The driver keeps counts per work unit,
never a row per input.

Why DuckDB rather than Ray Data's joins: planning is one join of two Parquet sets on one key, then a sort. DuckDB
does that in one process, spilling to local disk past its memory limit, in seconds for tens of millions of rows; a
Ray Data join would shuffle both sides through the object store and needs the cluster up before planning can start
(a dry run needs no cluster at all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa

from .board import PlanPosted
from .storage import filesystem, is_remote, local_path, put_file_atomic
from .write import OutputDir

# DuckDB's share of the driver's memory; past it, joins and sorts spill to the workspace.
DUCKDB_MEMORY = os.environ.get("FEATURIZE_PLAN_MEMORY", "512MB")
PLAN_ROW_GROUP = 65_536


def sql_string(value) -> str:
    """A SQL string literal of a path or uri, quotes escaped: the one way a path enters SQL (DuckDB's COPY ... TO and
    read_parquet take no bound parameters for file names)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values) -> str:
    """A SQL list literal of strings (read_parquet's file list)."""
    return "[" + ", ".join(sql_string(v) for v in values) + "]"


class Workspace:
    """A local scratch folder for one command (listing chunks, DuckDB's database and spill files, the plan before it
    is uploaded), removed when the command ends."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="featurize-")
        self._con = None

    def path(self, *names: str) -> str:
        return os.path.join(self.dir, *names)

    @property
    def con(self):
        """The DuckDB connection: a database file in the workspace, memory bounded, spilling to the workspace."""
        if self._con is None:
            import duckdb

            self._con = duckdb.connect(self.path("plan.duckdb"))
            self._con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
            self._con.execute(f"SET temp_directory = {sql_string(self.path('spill'))}")
            self._con.execute(f"SET threads = {max(1, os.cpu_count() or 1)}")
        return self._con

    def use(self, out: OutputDir) -> None:
        """Let DuckDB read OUTPUT's files through its fsspec filesystem (object stores)."""
        if is_remote(out.url) and not self.con.filesystem_is_registered(_protocol(out.fs)):
            self.con.register_filesystem(out.fs)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fetch_table(con, sql: str) -> pa.Table:
    """A query's result as a pyarrow Table."""
    return con.sql(sql).to_arrow_table()


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


def duckdb_path(out: OutputDir, path: str) -> str:
    """A path of OUTPUT as DuckDB names it: local as is, remote with the registered protocol."""
    return f"{_protocol(out.fs)}://{path}" if is_remote(out.url) else path


# -- the listing ----------------------------------------------------------------------------------------------------
@dataclass
class Listing:
    """A listing as Parquet chunks in the workspace; `listed` is a DuckDB view of it, one row per uri."""

    files: list[str]
    rows: int  # as listed, duplicates included
    unique: int = 0
    sample: list[str] = field(default_factory=list)  # a few uris (first, middle, last): the nodes' path probe

    @property
    def duplicates(self) -> int:
        return self.rows - self.unique


def open_listing(ws: Workspace, files: list[str], rows: int) -> Listing:
    """The `listed` view: one row per uri (a uri listed twice is one input)."""
    ws.con.execute(f"""CREATE OR REPLACE TABLE listed AS
        SELECT uri, max(size) AS size, max(mtime) AS mtime, max(etag) AS etag
        FROM read_parquet({sql_list(files)}) GROUP BY uri""")
    unique = ws.con.execute("SELECT count(*) FROM listed").fetchone()[0]
    sample = [
        r[0]
        for r in ws.con.execute("SELECT min(uri) FROM listed UNION ALL SELECT max(uri) FROM listed").fetchall()
        if r[0] is not None
    ]
    return Listing(files, rows, int(unique), sample)


def write_listing_uris(ws: Workspace, out: OutputDir) -> None:
    """OUTPUT/_listing.parquet: the uris the newest run listed (readers drop removed inputs with it)."""
    local = ws.path("_listing.parquet")
    ws.con.execute(
        f"COPY (SELECT uri FROM listed ORDER BY uri) TO {sql_string(local)} (FORMAT parquet, COMPRESSION zstd)"
    )
    put_file_atomic(local, out.child("_listing.parquet"), out.storage_options)


# -- new, changed, unchanged ----------------------------------------------------------------------------------------
# A committed input changed when its etag differs (both known), else its size or (both known) its mtime.
CHANGED_SQL = """CASE WHEN l.etag IS NOT NULL AND c.etag IS NOT NULL THEN l.etag <> c.etag
    ELSE l.size IS DISTINCT FROM c.size
        OR (l.mtime IS NOT NULL AND c.mtime IS NOT NULL AND abs(l.mtime - c.mtime) > 1e-6)
    END"""


def committed_view(
    ws: Workspace,
    out: OutputDir,
    version: int,
    name: str = "committed",
    key: str = "uri",
    shards: list[str] | None = None,
) -> None:
    """A view of each input's newest committed row (by run id) of this dataset version: key, status, size, mtime,
    etag, run_id. Reads only those columns of the shards."""
    shards = sorted(out.shard_units().values()) if shards is None else shards
    if not shards:
        ws.con.execute(f"""CREATE OR REPLACE VIEW {name} AS SELECT NULL::VARCHAR AS uri, NULL::VARCHAR AS status,
            NULL::BIGINT AS size, NULL::DOUBLE AS mtime, NULL::VARCHAR AS etag, NULL::VARCHAR AS run_id WHERE false""")
        return
    ws.use(out)
    files = sql_list(duckdb_path(out, p) for p in shards)
    ws.con.execute(f"""CREATE OR REPLACE TABLE {name} AS
        SELECT {key} AS uri, newest.status AS status, newest.size AS size, newest.mtime AS mtime, newest.etag AS etag,
               newest.run_id AS run_id
        FROM (SELECT {key}, arg_max({{'status': status, 'size': size, 'mtime': mtime, 'etag': etag, 'run_id': run_id}},
                                    run_id) AS newest
              FROM read_parquet({files}, union_by_name = true)
              WHERE dataset_version = {int(version)} GROUP BY {key})""")


def classify(ws: Workspace) -> dict[str, int]:
    """Every listed input as new, changed (since its newest committed row, an ok row), error or error_changed (its
    newest row is an error row; its file unchanged or changed since) or unchanged: the `classified` table, and its
    counts (error rows counted once, as `error`, whether or not their file changed)."""
    ws.con.execute(f"""CREATE OR REPLACE TABLE classified AS
        SELECT l.uri, l.size, l.mtime, l.etag,
               CASE WHEN c.uri IS NULL THEN 'new'
                    WHEN c.status <> 'ok' THEN CASE WHEN {CHANGED_SQL} THEN 'error_changed' ELSE 'error' END
                    WHEN {CHANGED_SQL} THEN 'changed' ELSE 'unchanged' END AS state
        FROM listed l LEFT JOIN committed c ON l.uri = c.uri""")
    counts = {"new": 0, "changed": 0, "error": 0, "unchanged": 0}
    for state, n in ws.con.execute("SELECT state, count(*) FROM classified GROUP BY state").fetchall():
        counts["error" if state == "error_changed" else state] += int(n)
    return counts


def planned_states(incremental: bool, retry_errors: bool) -> list[str]:
    """What a run processes: new inputs; with incremental the changed ones (error rows too); with retry_errors every
    input whose newest row is an error row."""
    states = ["new"]
    if incremental:
        states += ["changed", "error_changed"]
    if retry_errors:
        states += ["error"] + ([] if incremental else ["error_changed"])
    return states


def count_planned(ws: Workspace, states: list[str]) -> int:
    """How many listed inputs are in one of `states` (what a dry run would plan)."""
    listed = ", ".join(sql_string(state) for state in states)
    return int(ws.con.execute(f"SELECT count(*) FROM classified WHERE state IN ({listed})").fetchone()[0])


def write_plan(ws: Workspace, states: list[str], first_unit: int, rows_per_shard: int) -> tuple[str, int]:
    """The plan file (uri, size, mtime, etag, unit, row; inputs sorted by uri, cut into runs of rows_per_shard) in
    the workspace: (its path, rows)."""
    path = ws.path("plan.parquet")
    ws.con.execute(f"""COPY (
        SELECT uri, size, mtime, etag,
               CAST({int(first_unit)} + (n - 1) // {int(rows_per_shard)} AS INTEGER) AS unit,
               CAST(n - 1 AS BIGINT) AS "row"
        FROM (SELECT uri, size, mtime, etag, row_number() OVER (ORDER BY uri) AS n
              FROM classified WHERE state IN ({", ".join(sql_string(k) for k in states)}))
        ORDER BY n) TO {sql_string(path)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {PLAN_ROW_GROUP})""")
    rows = ws.con.execute(f"SELECT count(*) FROM read_parquet({sql_string(path)})").fetchone()[0]
    return path, int(rows)


def contiguous_units(rows: int, first_unit: int, rows_per_shard: int) -> dict[int, int]:
    """unit -> rows of a plan cut into runs of rows_per_shard rows from first_unit."""
    full, rest = divmod(rows, rows_per_shard)
    units = {first_unit + i: rows_per_shard for i in range(full)}
    if rest:
        units[first_unit + full] = rest
    return units


def plan_unit_counts(ws: Workspace, out: OutputDir, plan_path: str) -> dict[int, int]:
    """unit -> rows of a plan file (a resumed run's), read by DuckDB: only the unit column."""
    ws.use(out)
    rows = ws.con.execute(
        f"SELECT unit, count(*) FROM read_parquet({sql_string(duckdb_path(out, plan_path))}) GROUP BY unit"
    )
    return {int(u): int(n) for u, n in rows.fetchall()}


# -- a resumed plan against today's listing ---------------------------------------------------------------------------
def resumed_counts(
    ws: Workspace,
    out: OutputDir,
    plan_path: str,
    states: list[str] | None = None,
    done: pa.Table | None = None,
    planned_uris: pa.Table | None = None,
) -> dict:
    """How today's listing stands against a resumed run's plan: `in_plan`, the listed inputs the plan holds (its
    rows' uris, or `planned_uris` where the plan has inputs without rows: slides that failed at planning), and
    `after_plan`, those it does not hold that a new run would process: the classified inputs (classify first) in
    one of `states`, or the listed ones not in `done` (slides)."""
    if planned_uris is not None:
        ws.con.register("planned_uris", planned_uris.select(["uri"]))
        ws.con.execute("CREATE OR REPLACE TEMP TABLE plan_uris AS SELECT DISTINCT uri FROM planned_uris")
    else:
        ws.use(out)
        plan = sql_string(duckdb_path(out, plan_path))
        ws.con.execute(f"CREATE OR REPLACE TEMP TABLE plan_uris AS SELECT DISTINCT uri FROM read_parquet({plan})")
    if done is not None:
        ws.con.register("done_inputs", done.select(["uri"]))
        wanted = "SELECT uri FROM listed WHERE uri NOT IN (SELECT uri FROM done_inputs)"
    else:
        listed = ", ".join(sql_string(state) for state in states or [])
        wanted = f"SELECT uri FROM classified WHERE state IN ({listed})"
    in_plan, after_plan = ws.con.execute(f"""SELECT
        (SELECT count(*) FROM listed WHERE uri IN (SELECT uri FROM plan_uris)),
        (SELECT count(*) FROM ({wanted}) w WHERE w.uri NOT IN (SELECT uri FROM plan_uris))""").fetchone()
    return {"in_plan": int(in_plan), "after_plan": int(after_plan)}


# -- slides: what is done, and a plan from per-slide parts -----------------------------------------------------------
def listed_uris(ws: Workspace) -> list[str]:
    """Every listed uri, sorted (a few per slide: fine in memory, unlike an image listing)."""
    return fetch_table(ws.con, "SELECT uri FROM listed ORDER BY uri").column("uri").to_pylist()


def listed_except(ws: Workspace, done: pa.Table) -> pa.Table:
    """The listed inputs (uri, size, mtime, etag) whose uri is not in `done`, sorted by uri."""
    ws.con.register("done_inputs", done.select(["uri"]))
    try:
        return fetch_table(
            ws.con,
            "SELECT uri, size, mtime, etag FROM listed WHERE uri NOT IN (SELECT uri FROM done_inputs) ORDER BY uri",
        )
    finally:
        ws.con.unregister("done_inputs")


def done_slides(ws: Workspace, out: OutputDir, previous: pa.Table | None, version: int, incremental: bool) -> pa.Table:
    """The listed slides that need no new run: finished (status ok) in `previous` (OUTPUT's slide table) with all
    their tiles in committed shards (counted by DuckDB over the shards, never per tile on the driver), and with
    `incremental` unchanged since. A one-column table of uris."""
    import pyarrow.compute as pc

    if previous is None or previous.num_rows == 0:
        return pa.table({"uri": pa.array([], pa.string())})
    previous = previous.filter(
        pc.and_(pc.equal(previous.column("dataset_version"), version), pc.equal(previous.column("status"), "ok"))
    )
    ws.con.register("previous_slides", previous.select(["uri", "run_id", "n_tiles", "size", "mtime", "etag"]))
    shards = sorted(out.shard_units().values())
    if shards:
        ws.use(out)
        files = sql_list(duckdb_path(out, p) for p in shards)
        tiles = f"""(SELECT uri, run_id, count(*) AS n FROM read_parquet({files}, union_by_name = true)
                     WHERE dataset_version = {int(version)} GROUP BY uri, run_id)"""
    else:
        tiles = "(SELECT NULL::VARCHAR AS uri, NULL::VARCHAR AS run_id, 0 AS n WHERE false)"
    changed = f"AND NOT ({CHANGED_SQL})" if incremental else ""
    return fetch_table(
        ws.con,
        f"""SELECT c.uri FROM previous_slides c JOIN {tiles} t ON c.uri = t.uri
        AND c.run_id = t.run_id JOIN listed l ON l.uri = c.uri WHERE t.n = c.n_tiles {changed}""",
    )


def write_parts_plan(
    ws: Workspace,
    out: OutputDir | None,
    parts: dict[int, str],
    n_rows: dict[int, int],
    schema: pa.Schema,
    first_unit: int,
    rows_per_shard: int,
) -> str:
    """The plan file from per-slide part files (`schema`'s columns plus `part` and `tile`): row = the part's first
    row (parts in order) + the tile's position in it; units of rows_per_shard rows from first_unit. DuckDB reads the
    parts (OUTPUT's filesystem for remote ones) and writes the plan sorted by row, in row groups the plan readers
    take one at a time. The same plan whichever part was written first."""
    import numpy as np
    import pyarrow.parquet as pq

    path = ws.path("plan.parquet")
    if not parts:
        pq.write_table(
            schema.append(pa.field("unit", pa.int32())).append(pa.field("row", pa.int64())).empty_table(), path
        )
        return path
    order = sorted(parts)
    starts = np.concatenate([[0], np.cumsum([n_rows[i] for i in order])[:-1]]).astype(np.int64)
    ws.con.register("plan_parts", pa.table({"part": pa.array(order, pa.int32()), "start": pa.array(starts)}))
    if any(is_remote(p) for p in parts.values()):
        ws.use(out)
    files = sql_list(duckdb_path(out, filesystem(parts[i])[1]) if is_remote(parts[i]) else parts[i] for i in order)
    columns = ", ".join(f't."{f.name}"' for f in schema)
    ws.con.execute(f"""COPY (
        SELECT {columns}, CAST({int(first_unit)} + (p.start + t.tile) // {int(rows_per_shard)} AS INTEGER) AS unit,
               CAST(p.start + t.tile AS BIGINT) AS "row"
        FROM read_parquet({files}) t JOIN plan_parts p ON t.part = p.part ORDER BY "row")
        TO {sql_string(path)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {PLAN_ROW_GROUP})""")
    ws.con.unregister("plan_parts")
    return path


# -- resume ---------------------------------------------------------------------------------------------------------
def normalised_input(source: str) -> str:
    """An input as runs are matched by: `data`, `data/`, `./data` and `file:///abs/data` are one input."""
    if is_remote(source):
        return source.rstrip("/")
    return os.path.abspath(local_path(source)).rstrip("/") or "/"


def unfinished_run(out: OutputDir, runs: list[dict], version: int, source: str) -> tuple[str, str] | None:
    """The newest run on this OUTPUT over the same input and dataset version that did not complete, and the path of
    its plan file (in OUTPUT's filesystem)."""
    key = normalised_input(source)
    for record in reversed(runs):
        if (
            record.get("state") != "complete"
            and record.get("dataset_version") == version
            and normalised_input(str(record.get("input"))) == key
        ):
            path = out._child_path("_runs", f"{record['run_id']}.plan.parquet")
            if out.fs.exists(path):
                return record["run_id"], path
    return None


def next_unit(out: OutputDir, runs: list[dict]) -> int:
    """The first work unit number no committed shard or earlier run has used."""
    used = list(out.shard_units()) + [int(r.get("last_unit", -1)) for r in runs]
    return max(used, default=-1) + 1


# -- shard size -----------------------------------------------------------------------------------------------------
SHARD_BYTES = 128 * 1024**2
MAX_LIST_VALUES = 2**31 - 1  # Arrow list offsets are int32: a shard's list column holds fewer values than this
ROW_OVERHEAD_BYTES = 200  # ids, uri, status, source columns


def shard_rows(rows_per_shard: int, values_per_row: dict[str, tuple[int, int]]) -> int:
    """Rows per shard: the user's number, or (0) about SHARD_BYTES of row data. values_per_row names each list
    column's (values per row, bytes per value). Either way, capped so no list column's offsets pass 2^31."""
    width = ROW_OVERHEAD_BYTES + sum(n * size for n, size in values_per_row.values())
    rows = rows_per_shard or max(1, SHARD_BYTES // width)
    widest = max((n for n, _ in values_per_row.values()), default=1)
    return max(1, min(rows, MAX_LIST_VALUES // max(1, widest)))


def upload_plan(local: str, out: OutputDir, run_id: str) -> str:
    """Put the plan into OUTPUT/_runs (for resume); returns its path in OUTPUT's filesystem."""
    put_file_atomic(local, out.child("_runs", f"{run_id}.plan.parquet"), out.storage_options)
    return out._child_path("_runs", f"{run_id}.plan.parquet")


# -- reading the plan in the stream -------------------------------------------------------------------------------
# A plan reader task reads this many plan rows: one block of the stream's first stage (a few MB of uris).
PLAN_RANGE_ROWS = PLAN_ROW_GROUP


def plan_ranges(rows: int) -> int:
    """How many reader tasks cover a plan file of (at most) `rows` rows."""
    return max(1, -(-int(rows) // PLAN_RANGE_ROWS))


def read_plan_range(batch, board, columns: list[str]):
    """(Ray Data stage, no CPU; a generator.) The plan's rows numbered [i, i + 1) * range_rows, for the `id` i
    of its one input row: waits on the run's board for the plan (the stream may open while the driver still plans),
    then yields those of the units still to do, read from the plan file (its row groups that overlap the range) or,
    when the workers cannot read OUTPUT, the driver's object for the range."""
    import numpy as np
    import pyarrow.compute as pc
    import ray

    plan = ray.get(board.wait_plan.remote())
    if plan is None or not plan.rows:
        return
    wanted = pa.array(plan.units, pa.int32()) if plan.units is not None else None
    step = int(plan.range_rows)
    for i in np.asarray(batch["id"]).tolist():
        if plan.refs is not None:
            ref = plan.refs.get(i)
            table = ray.get(ref) if ref is not None else None
        else:
            table = _plan_rows(plan.output, plan.storage_options, plan.path, i * step, (i + 1) * step, columns)
            if table is not None and wanted is not None:
                table = table.filter(pc.is_in(table.column("unit"), value_set=wanted))
        if table is not None and table.num_rows:
            yield table


def _plan_rows(output: str, storage_options: dict, path: str, lo: int, hi: int, columns: list[str]):
    """The rows numbered [lo, hi) of a plan file (a plan's rows are numbered by their place in it), or None."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs = OutputDir(output, storage_options).fs
    with fs.open(path, "rb") as f:
        plan = pq.ParquetFile(f)
        groups, start = [], 0
        for g in range(plan.metadata.num_row_groups):
            n = plan.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                groups.append(g)
            start += n
        if not groups:
            return None
        table = plan.read_row_groups(groups, columns=columns)
    row = table.column("row")
    return table.filter(pc.and_(pc.greater_equal(row, lo), pc.less(row, hi)))


def plan_range_refs(out: OutputDir, path: str, columns: list[str], units: list[int] | None) -> dict:
    """The driver's hand-over when the workers cannot read OUTPUT: range number -> one object with that range's rows
    of the units still to do; the plan is read, and each range put, one at a time."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    wanted = pa.array(units, pa.int32()) if units is not None else None
    refs: dict = {}
    current, buffer = None, []
    with out.fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PLAN_RANGE_ROWS, columns=columns):
            table = pa.Table.from_batches([batch])
            if wanted is not None:
                table = table.filter(pc.is_in(table.column("unit"), value_set=wanted))
            ranges = table.column("row").to_numpy() // PLAN_RANGE_ROWS
            for i in np.unique(ranges).tolist():  # rows are in order: a range, once left, is complete
                if current is not None and i != current:
                    refs[current] = ray.put(pa.concat_tables(buffer))
                    buffer = []
                current = i
                buffer.append(table.filter(pa.array(ranges == i)))
    if buffer:
        refs[current] = ray.put(pa.concat_tables(buffer))
    return refs


def post_plan(
    board, out: OutputDir, plan_path: str, columns: list[str], units: list[int] | None, rows: int, everywhere: bool
) -> list:
    """Post the plan to the stream's readers: `rows` to process (0: nothing, the readers end), the units still to do
    (None: all), and the plan file's path when every node can read OUTPUT (object storage, one node, shared disk),
    else its ranges put into the object store by the driver one at a time (never whole in the driver's memory).
    Returns the refs to hold until the stream ends."""
    refs = None if everywhere else plan_range_refs(out, plan_path, columns, units)
    plan = PlanPosted(
        rows, units if everywhere else None, out.url, out.storage_options, plan_path, PLAN_RANGE_ROWS, refs=refs
    )
    board.post_plan.remote(plan)
    return list((refs or {}).values())
