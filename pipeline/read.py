"""Reading a featurised OUTPUT: exactly one current row per input, streamed shard by shard.

Which rows are current (one definition, `_current_sql`, shared by read_features and open_features):
  - the rows of one dataset version: by default `_dataset.json`'s `readable_version` (the newest version whose run
    completed, so that a --new-version run in progress leaves the previous version readable), else its `version`;
  - images: each uri's rows from its newest run (run ids sort by time);
  - slides (shards with a slide_id column): each slide's tiles from the run that _slides.parquet says last finished
    it (else the newest run that wrote tiles of it), so a finished rerun of a slide replaces all of its old tiles, a
    tile the rerun's grid no longer has does not come back, and a rerun in progress changes nothing yet;
  - one row per key (uri; slide_id, x, y, level), whatever the shards hold.

Reading takes two passes so that an OUTPUT of thousands of shards streams through bounded memory and file handles
(pyarrow's scanner opens a few shards at a time):
  1. the key columns of every shard give the shards that hold current rows and the (group, run_id) pairs that newer
     runs superseded (few: only the inputs that were featurised again);
  2. only those shards are read for the wanted columns, superseded rows dropped batch by batch as they stream in.
read_features hands DuckDB the key columns only (DuckDB has no float16: the features stay as the shards hold them);
open_features hands the shards themselves to DuckDB's read_parquet, for SQL and Polars.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .dataset import read_prompts as dataset_prompts
from .dataset import readable_version
from .errors import UserError
from .plan import duckdb_path
from .schema import RENAMED_COLUMNS, current_names, current_names_sql
from .storage import exists, is_remote, join
from .write import OutputDir


@dataclass(frozen=True)
class Layout:
    """How an OUTPUT's rows are keyed: `group` is what one run rewrites whole (its newest run_id wins), `keys` name one
    row, `order` is read_features' sort (deterministic: the keys, each once)."""

    group: str
    keys: tuple[str, ...]
    order: tuple[str, ...]

    def key_columns(self, listing: bool = False) -> list[str]:
        """The columns the current-row query needs (uri too when it filters by the listing)."""
        return list(dict.fromkeys([*self.keys, self.group, "run_id", "dataset_version", *(["uri"] if listing else [])]))


IMAGES = Layout(group="uri", keys=("uri",), order=("uri",))
SLIDES = Layout(group="slide_id", keys=("slide_id", "x", "y", "level"), order=("slide_id", "y", "x", "level"))


@dataclass
class Snapshot:
    """What pass 1 found: the shards of one dataset version that hold current rows (committed shards never change,
    so this stays true while newer shards are written beside them), and the superseded (group, run_id) pairs."""

    out: OutputDir
    layout: Layout
    version: int
    shards: list[str]
    superseded: pa.Table
    listing: str | None  # the path of OUTPUT's _listing.parquet, when rows of removed inputs are to be dropped


def read_features(
    output: str,
    storage_options: dict | None = None,
    exclude_removed: bool = False,
    columns: list[str] | None = None,
    version: int | None = None,
) -> pa.Table:
    """The current rows (see the module docstring) as one pyarrow Table, sorted by uri (slides: slide_id, y, x,
    level). `columns` reads only those (the key columns are read besides, for the dedup, and not returned);
    `version` reads that dataset version instead of the readable one; `exclude_removed` drops inputs that the newest
    run's listing no longer had (deleted from the source)."""
    snap = snapshot(output, storage_options, version, exclude_removed)
    table = _candidates(snap, columns)
    with _connect(snap, quiet=True) as con:
        con.register(
            "candidates",
            table.select(snap.layout.key_columns(snap.listing is not None)).append_column(
                "row_index", pa.array(np.arange(table.num_rows, dtype=np.int64))
            ),
        )
        order = ", ".join(snap.layout.order)
        rows = con.sql(f"SELECT row_index FROM ({_current_sql(snap, 'candidates')}) ORDER BY {order}").fetchnumpy()[
            "row_index"
        ]
    return table.take(pa.array(rows, pa.int64())).select(columns or table.column_names)


def open_features(
    output: str, storage_options: dict | None = None, version: int | None = None, exclude_removed: bool = False
) -> duckdb.DuckDBPyRelation:
    """The current rows as a lazy DuckDB relation over read_parquet of the shards that hold them: query it with SQL
    (`rel.query("f", "SELECT ... FROM f")`), `rel.to_arrow_table()`, or `rel.pl()` with Polars installed. Unordered;
    DuckDB reads float16 features as FLOAT. A snapshot: shards committed after it was opened are not in it."""
    snap = snapshot(output, storage_options, version, exclude_removed)
    con = _connect(snap)
    paths = [duckdb_path(snap.out, p) for p in snap.shards]
    if snap.layout is SLIDES and _renamed(snap, _schema(snap.out, snap.shards[0])):  # shards from before a rename
        shards = con.read_parquet(paths, union_by_name=True)
        shards.select(current_names_sql(shards.columns, "tiles")).create_view("shards")
    else:
        con.read_parquet(paths).create_view("shards")
    return con.sql(_current_sql(snap, "shards"))


def read_prompts(output: str, storage_options: dict | None = None, version: int | None = None) -> pa.Table:
    """The prompt table of a dataset version (default: the readable one): `concept` in the order of every row's
    `concept_logits`, `prompts`, `text_embedding`. A one-line error for a features-only version."""
    out = OutputDir(output, storage_options)
    dataset = out.read_json("_dataset.json")
    if dataset is None:
        raise UserError(f"{output} holds no featurised output (no _dataset.json)")
    wanted = _version(dataset, version)
    table = dataset_prompts(out, wanted)
    if table is None:
        raise UserError(f"{output}: dataset version {wanted} has no prompt table (a features-only run)")
    return table


def snapshot(output: str, storage_options: dict | None, version: int | None, exclude_removed: bool) -> Snapshot:
    """Pass 1 over the key columns of every committed shard; refuses an OUTPUT without output or without rows of the
    version asked for."""
    out = OutputDir(output, storage_options)
    dataset = out.read_json("_dataset.json")
    shards = sorted(out.shard_units().values())
    if dataset is None or not shards:
        raise UserError(f"{output} holds no featurised output (no _dataset.json or part-*.parquet)")
    schema = _schema(out, shards[-1])
    layout = SLIDES if "slide_id" in schema.names else IMAGES
    wanted = _version(dataset, version)
    current, superseded = _index(out, shards, layout, schema, wanted)
    if not current:
        raise UserError(
            f"{output} has no rows of dataset version {wanted}; versions present: "
            f"{', '.join(map(str, _versions(out, shards, schema))) or 'none'}"
        )
    listing = None
    if exclude_removed and exists(out.child("_listing.parquet"), storage_options):
        listing = join(out.path, "_listing.parquet")  # written by newer runs only: without it nothing is known removed
    return Snapshot(out, layout, wanted, current, superseded, listing)


def _version(dataset: dict, version: int | None) -> int:
    """The version asked for, else the readable one."""
    return int(version) if version is not None else readable_version(dataset)


def _index(
    out: OutputDir, shards: list[str], layout: Layout, schema: pa.Schema, version: int
) -> tuple[list[str], pa.Table]:
    """Pass 1: (the shards holding current rows, in unit order; the superseded (group, run_id) pairs), from the group
    and run_id columns of this version's rows. DuckDB does the distinct and the window out of core."""
    scanner = _dataset(out, shards, _fields(schema, [layout.group, "run_id", "dataset_version"])).scanner(
        columns=[layout.group, "run_id"], filter=pads.field("dataset_version") == version
    )
    with _quiet(duckdb.connect()) as con:
        con.register("shard_keys", _with_shard(scanner, shards))
        newest = _newest(layout)
        con.execute(f"CREATE TEMP TABLE keys AS SELECT DISTINCT {layout.group}, run_id, shard FROM shard_keys")
        finished = _finished_slides(out, version) if layout is SLIDES else None
        if finished is not None:  # a slide's run is the one _slides.parquet names once a run finished it
            con.register("finished", finished)
            newest = (
                "run_id = coalesce(any_value(finished_run) OVER (PARTITION BY slide_id), "
                "max(run_id) OVER (PARTITION BY slide_id))"
            )
            con.execute("""CREATE OR REPLACE TEMP TABLE keys AS SELECT k.*, f.run_id AS finished_run
                           FROM keys k LEFT JOIN finished f USING (slide_id)""")
        con.execute(f"CREATE TEMP TABLE runs AS SELECT *, {newest} AS current FROM keys")
        current = con.sql("SELECT DISTINCT shard FROM runs WHERE current ORDER BY shard").fetchnumpy()["shard"]
        superseded = con.sql(f"SELECT DISTINCT {layout.group}, run_id FROM runs WHERE NOT current").to_arrow_table()
    return [shards[i] for i in current], superseded


def _finished_slides(out: OutputDir, version: int) -> pa.Table | None:
    """(slide_id, run_id) of each slide in _slides.parquet of this version: the run that last finished it. A rerun
    still in progress (or stopped) thus leaves the slide's previous tiles current until it finishes."""
    slides = out.read_table("_slides.parquet")
    if slides is None or not {"slide_id", "run_id", "dataset_version"} <= set(slides.column_names):
        return None
    slides = slides.filter(pc.equal(slides.column("dataset_version"), version))
    return slides.select(["slide_id", "run_id"])


def _newest(layout: Layout) -> str:
    """True for a row of its group's newest run."""
    return f"run_id = max(run_id) OVER (PARTITION BY {layout.group})"


def _current_sql(snap: Snapshot, source: str) -> str:
    """The current rows of `source` (a table or view with at least the key columns), as DuckDB SQL over the
    connection's `superseded` pairs and `listing`. Superseded pairs are dropped first, so the window holds current
    rows only; the QUALIFY is the definition itself, correct even over rows of every run."""
    layout = snap.layout
    joins = f"ANTI JOIN superseded USING ({layout.group}, run_id)"
    if snap.listing is not None:
        joins += " SEMI JOIN listing USING (uri)"
    return (
        f"SELECT * FROM {source} {joins} WHERE dataset_version = {int(snap.version)} "
        f"QUALIFY {_newest(layout)} "
        f"AND row_number() OVER (PARTITION BY {', '.join(layout.keys)} ORDER BY run_id DESC) = 1"
    )


def _connect(snap: Snapshot, quiet: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the OUTPUT's filesystem and the snapshot's `superseded` and `listing`; `quiet` for
    the queries read_features runs itself (a relation handed out keeps DuckDB's defaults, progress bar included)."""
    con = _quiet(duckdb.connect()) if quiet else duckdb.connect()
    if is_remote(snap.out.url):
        con.register_filesystem(snap.out.fs)
    con.register("superseded", snap.superseded)
    if snap.listing is not None:
        con.read_parquet(duckdb_path(snap.out, snap.listing)).create_view("listing")
    return con


def _quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No progress bar: a library's own queries print nothing."""
    con.execute("SET enable_progress_bar = false")
    return con


def _candidates(snap: Snapshot, columns: list[str] | None) -> pa.Table:
    """Pass 2: the wanted and key columns of the shards holding current rows, of this version; superseded rows are
    dropped from each batch as it arrives, so they are never held whole."""
    schema = _schema(snap.out, snap.shards[0])  # every such shard is of this version: one schema ...
    renamed = _renamed(snap, schema)
    for old, new in renamed.items():  # ... but for columns renamed since: the old shards first, then the new
        if new not in schema.names:
            schema = schema.insert(schema.get_field_index(old) + 1, pa.field(new, schema.field(old).type))
    names = current_names(schema.empty_table(), "tiles").column_names if renamed else schema.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise UserError(
            f"{snap.out.url} has no column {', '.join(missing)} in dataset version {snap.version}; "
            f"columns: {', '.join(names)}"
        )
    wanted = list(dict.fromkeys([*(columns or names), *snap.layout.key_columns(snap.listing is not None)]))
    scanner = _dataset(snap.out, snap.shards, schema).scanner(
        columns=wanted + [old for old, new in renamed.items() if new in wanted],
        filter=pads.field("dataset_version") == snap.version,
    )
    batches = scanner.to_batches()
    if snap.superseded.num_rows:
        superseded = _pairs(snap.superseded, snap.layout.group)
        batches = (
            batch.filter(pc.invert(pc.is_in(_pairs(batch, snap.layout.group), value_set=superseded)))
            for batch in batches
        )
    table = pa.Table.from_batches(batches, schema=scanner.projected_schema)
    return current_names(table, "tiles") if renamed else table


def _renamed(snap: Snapshot, schema: pa.Schema) -> dict[str, str]:
    """The renamed tile columns (old -> new) that the oldest current shard still has under their old name; shards
    are in unit order, so when it has none, none has."""
    if snap.layout is not SLIDES:
        return {}
    return {old: new for old, new in RENAMED_COLUMNS["tiles"].items() if old in schema.names}


def _pairs(rows, group: str) -> pa.Array:
    """(group, run_id) of each row as one string, for set membership."""
    joined = pc.binary_join_element_wise(rows.column(group), rows.column("run_id"), "\x1f")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def _versions(out: OutputDir, shards: list[str], schema: pa.Schema) -> list[int]:
    """The dataset versions that have rows (for the message that refuses another)."""
    column = _dataset(out, shards, _fields(schema, ["dataset_version"])).to_table().column(0)
    return sorted(v for v in pc.unique(column).to_pylist() if v is not None)


# -- shards as pyarrow and DuckDB see them ----------------------------------------------------------------------------
def _schema(out: OutputDir, path: str) -> pa.Schema:
    with out.fs.open(path, "rb") as f:
        return pq.read_schema(f)


def _fields(schema: pa.Schema, names: list[str]) -> pa.Schema:
    return pa.schema([schema.field(n) for n in names])


def _dataset(out: OutputDir, paths: list[str], schema: pa.Schema) -> pads.FileSystemDataset:
    """The shards as one pyarrow dataset of `schema`: paths as given (no listing, no footer read up front); a column
    a shard lacks reads as nulls."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    filesystem = PyFileSystem(FSSpecHandler(out.fs)) if is_remote(out.url) else LocalFileSystem()
    return pads.FileSystemDataset.from_paths(
        paths, schema=schema, format=pads.ParquetFileFormat(), filesystem=filesystem
    )


def _with_shard(scanner: pads.Scanner, paths: list[str]) -> pa.RecordBatchReader:
    """The scanner's batches, streamed, with `shard`: the index in `paths` of the shard each row came from."""
    index = {p: i for i, p in enumerate(paths)}
    schema = scanner.projected_schema.append(pa.field("shard", pa.int32()))

    def batches():
        for tagged in scanner.scan_batches():
            batch = tagged.record_batch
            shard = pa.repeat(pa.scalar(index[tagged.fragment.path], pa.int32()), batch.num_rows)
            yield pa.RecordBatch.from_arrays([*batch.columns, shard], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def current_rows(snap: Snapshot, columns: list[str] = ()) -> pa.Table:
    """The current rows' key columns and `columns`, with `shard` (the index in snap.shards) and `row` (the position in
    that shard), ordered by shard and row: for readers that go back to the shards for a wide column (the features) of
    chosen rows only. Shards are read one at a time, key columns only."""
    names = list(dict.fromkeys([*snap.layout.key_columns(snap.listing is not None), *columns]))
    parts = []
    for shard, path in enumerate(snap.shards):
        with snap.out.fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=names)
        parts.append(
            table.append_column("shard", pa.array(np.full(table.num_rows, shard, np.int32))).append_column(
                "row", pa.array(np.arange(table.num_rows, dtype=np.int64))
            )
        )
    with _connect(snap, quiet=True) as con:
        con.register("located", pa.concat_tables(parts))
        return con.sql(f"SELECT * FROM ({_current_sql(snap, 'located')}) ORDER BY shard, row").to_arrow_table()
