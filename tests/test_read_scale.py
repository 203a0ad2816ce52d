"""Reading at scale: read_features streams the shards (two passes, a few files open at a time) and returns each input's
current row once; open_features is the same rows as a lazy DuckDB relation. OUTPUTs are built here with pyarrow."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.read import open_features, read_features
from pipeline.schema import IMAGE_SCHEMA, RESULT_COLUMNS, SOURCE_COLUMNS, fixed_list

TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("level", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
    + RESULT_COLUMNS
    + SOURCE_COLUMNS
)


def _results(n: int, value: float) -> list[pa.Array]:
    ok = np.ones(n, bool)
    return [
        fixed_list(np.full((n, 2), value, np.float16), pa.float16(), ok),
        fixed_list(np.full((n, 1), value, np.float32), pa.float32(), ok),
    ]


def _source(n: int, run_id: str, version: int) -> list[pa.Array]:
    return [
        pa.array([1] * n, pa.int64()),
        pa.array([0.0] * n),
        pa.array([None] * n, pa.string()),
        pa.array([run_id] * n),
        pa.array([version] * n, pa.int32()),
    ]


def images(uris: list[str], run_id: str, version: int = 1, width: int = 4, logits: bool = True) -> pa.Table:
    """An image shard: IMAGE_SCHEMA rows; `width` and the features tell runs apart."""
    n = len(uris)
    table = pa.Table.from_arrays(
        [
            pa.array([u.rsplit("/", 1)[-1] for u in uris]),
            pa.array(uris),
            pa.array(["ok"] * n),
            pa.array([None] * n, pa.string()),
            pa.array([width] * n, pa.int32()),
            pa.array([4] * n, pa.int32()),
            *_results(n, width),
            *_source(n, run_id, version),
        ],
        schema=IMAGE_SCHEMA,
    )
    return table if logits else table.drop_columns(["concept_logits"])


def tiles(slide_id: str, xy: list[tuple[int, int]], run_id: str, value: float = 1.0) -> pa.Table:
    """A slide shard: one row per (x, y) tile of the slide, level 0."""
    n = len(xy)
    return pa.Table.from_arrays(
        [
            pa.array([slide_id] * n),
            pa.array([f"/slides/{slide_id}.svs"] * n),
            pa.array([x for x, _ in xy], pa.int64()),
            pa.array([y for _, y in xy], pa.int64()),
            pa.array([0] * n, pa.int32()),
            pa.array(["ok"] * n),
            pa.array([None] * n, pa.string()),
            *_results(n, value),
            *_source(n, run_id, 1),
        ],
        schema=TILE_SCHEMA,
    )


def make_output(folder: Path, shards: list[pa.Table], dataset: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for unit, table in enumerate(shards):
        pq.write_table(table, folder / f"part-{unit:05d}.parquet")
    (folder / "_dataset.json").write_text(json.dumps(dataset or {"version": 1}))
    return str(folder)


def _rows(table: pa.Table, *columns: str) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def _sorted_rows(relation: duckdb.DuckDBPyRelation, *columns: str) -> list[tuple]:
    return sorted(_rows(relation.to_arrow_table(), *columns))


# -- images -----------------------------------------------------------------------------------------------------------
def test_an_image_featurised_again_comes_back_once_from_its_newest_run(tmp_path):
    output = make_output(
        tmp_path / "out",
        [
            images(["/in/c.jpg", "/in/a.jpg", "/in/b.jpg"], "20240101T000000-r1", width=1),
            images(["/in/b.jpg"], "20240201T000000-r2", width=2),  # b changed and was featurised again
            images(["/in/b.jpg"], "20240201T000000-r2", width=2),  # ...and its shard is there twice
        ],
    )
    table = read_features(output)
    assert _rows(table, "uri", "width") == [("/in/a.jpg", 1), ("/in/b.jpg", 2), ("/in/c.jpg", 1)]  # sorted by uri
    assert table.schema.field("image_features").type == pa.list_(pa.float16())  # the features as stored
    assert _sorted_rows(open_features(output), "uri", "width") == _rows(table, "uri", "width")


def test_columns_are_projected_and_an_unknown_column_is_refused(tmp_path):
    output = make_output(tmp_path / "out", [images(["/in/a.jpg"], "r1"), images(["/in/a.jpg"], "r2", width=9)])
    table = read_features(output, columns=["width"])
    assert table.column_names == ["width"] and table.column("width").to_pylist() == [9]
    with pytest.raises(UserError, match="no column nope.*columns: image_id, uri"):
        read_features(output, columns=["uri", "nope"])


def test_a_shard_whose_rows_were_all_superseded_is_read_for_its_keys_only(tmp_path):
    """Pass 2 reads only shards that hold current rows: an old shard whose `width` no longer reads as int32 would fail
    there, while pass 1 reads its uri, run_id and dataset_version."""
    old = images(["/in/a.jpg", "/in/b.jpg"], "r1")
    old = old.set_column(old.schema.get_field_index("width"), "width", pa.array(["wide", "wide"]))
    output = make_output(tmp_path / "out", [old, images(["/in/a.jpg", "/in/b.jpg"], "r2", width=3)])
    assert _rows(read_features(output, columns=["uri", "width"]), "uri", "width") == [
        ("/in/a.jpg", 3),
        ("/in/b.jpg", 3),
    ]


def test_exclude_removed_drops_inputs_the_newest_listing_no_longer_had(tmp_path):
    output = make_output(tmp_path / "out", [images(["/in/a.jpg", "/in/b.jpg", "/in/c.jpg"], "r1")])
    assert read_features(output, exclude_removed=True).num_rows == 3  # no _listing.parquet: nothing known removed
    pq.write_table(pa.table({"uri": ["/in/a.jpg", "/in/c.jpg", "/in/new.jpg"]}), tmp_path / "out" / "_listing.parquet")
    assert read_features(output, exclude_removed=True).column("uri").to_pylist() == ["/in/a.jpg", "/in/c.jpg"]
    assert read_features(output).num_rows == 3
    assert _sorted_rows(open_features(output, exclude_removed=True), "uri") == [("/in/a.jpg",), ("/in/c.jpg",)]


# -- slides -----------------------------------------------------------------------------------------------------------
def test_a_slide_rerun_replaces_all_of_its_tiles_and_a_tile_its_new_grid_lacks_is_gone(tmp_path):
    output = make_output(
        tmp_path / "out",
        [
            tiles("s1", [(0, 0), (256, 0), (0, 256)], "r1", value=1.0),
            tiles("s2", [(0, 0), (256, 0)], "r1", value=1.0),
            # s1 changed: its rerun's grid has (0, 0) again and (512, 512), not (256, 0) nor (0, 256); one tile twice
            tiles("s1", [(512, 512), (0, 0), (0, 0)], "r2", value=2.0),
        ],
    )
    table = read_features(output)
    expected = [("s1", 0, 0, "r2"), ("s1", 512, 512, "r2"), ("s2", 0, 0, "r1"), ("s2", 256, 0, "r1")]
    assert _rows(table, "slide_id", "x", "y", "run_id") == expected  # sorted by slide_id, y, x, level
    assert _sorted_rows(open_features(output), "slide_id", "x", "y", "run_id") == sorted(expected)


def test_a_rerun_that_wrote_no_tiles_of_a_slide_leaves_that_slide_as_it_was(tmp_path):
    output = make_output(tmp_path / "out", [tiles("s1", [(0, 0), (256, 0)], "r1"), tiles("s2", [(0, 0)], "r2")])
    assert _rows(read_features(output), "slide_id", "x", "run_id") == [
        ("s1", 0, "r1"),
        ("s1", 256, "r1"),
        ("s2", 0, "r2"),
    ]


# -- dataset versions -------------------------------------------------------------------------------------------------
def test_the_readable_version_is_read_unless_a_version_is_asked_for(tmp_path):
    v1 = images(["/in/a.jpg", "/in/b.jpg"], "r1", version=1, width=1)
    v2 = images(["/in/a.jpg"], "r2", version=2, width=2, logits=False)  # a --new-version run, features only
    output = make_output(tmp_path / "out", [v1, v2], {"version": 2, "readable_version": 1})  # v2 still running
    default = read_features(output)
    assert _rows(default, "uri", "width") == [("/in/a.jpg", 1), ("/in/b.jpg", 1)]
    assert "concept_logits" in default.column_names  # the schema of version 1's shards
    explicit = read_features(output, version=2)
    assert _rows(explicit, "uri", "width") == [("/in/a.jpg", 2)] and "concept_logits" not in explicit.column_names
    assert _sorted_rows(open_features(output, version=2), "uri", "dataset_version") == [("/in/a.jpg", 2)]
    assert _sorted_rows(open_features(output), "uri", "dataset_version") == [("/in/a.jpg", 1), ("/in/b.jpg", 1)]
    (tmp_path / "out" / "_dataset.json").write_text(json.dumps({"version": 2}))  # a writer before readable_version
    assert read_features(output).column("width").to_pylist() == [2]


def test_a_version_without_rows_is_refused_naming_the_versions_present(tmp_path):
    output = make_output(
        tmp_path / "out",
        [images(["/in/a.jpg"], "r1", version=1), images(["/in/a.jpg"], "r2", version=3)],
        {"version": 3},
    )
    for read in (read_features, open_features):
        with pytest.raises(UserError, match="no rows of dataset version 2; versions present: 1, 3"):
            read(output, version=2)


def test_an_output_without_shards_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_dataset.json").write_text("{}")
    with pytest.raises(UserError, match="holds no featurised output"):
        open_features(str(tmp_path / "out"))


# -- open_features ----------------------------------------------------------------------------------------------------
def test_open_features_is_a_lazy_snapshot_that_duckdb_queries(tmp_path):
    output = make_output(
        tmp_path / "out",
        [
            images([f"/in/{i}.jpg" for i in range(10)], "r1", width=1),
            images([f"/in/{i}.jpg" for i in range(5)], "r2", width=2),
        ],
    )
    relation = open_features(output)
    assert isinstance(relation, duckdb.DuckDBPyRelation)
    counts = relation.query("f", "SELECT width, count(*), count(DISTINCT uri) FROM f GROUP BY width ORDER BY width")
    assert counts.fetchall() == [(1, 5, 5), (2, 5, 5)]
    table = relation.to_arrow_table()
    assert table.num_rows == 10 and {"uri", "image_features", "run_id"} <= set(table.column_names)
    pq.write_table(images(["/in/late.jpg"], "r3"), tmp_path / "out" / "part-00002.parquet")  # committed since
    assert relation.arrow().read_all().num_rows == 10  # the shards of when it was opened
    assert open_features(output).aggregate("count(*)").fetchall() == [(11,)]


def test_open_and_read_features_over_s3(s3_server, s3_bucket):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    for unit, table in enumerate(
        [images(["s3://in/a.jpg", "s3://in/b.jpg"], "r1", width=1), images(["s3://in/b.jpg"], "r2", width=2)]
    ):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        fs.pipe_file(f"{s3_bucket}/out/part-{unit:05d}.parquet", sink.getvalue())
    fs.pipe_file(f"{s3_bucket}/out/_dataset.json", json.dumps({"version": 1}).encode())
    fs.pipe_file(f"{s3_bucket}/out/_listing.parquet", _parquet(pa.table({"uri": ["s3://in/b.jpg"]})))
    output = f"s3://{s3_bucket}/out"
    assert _rows(read_features(output, options), "uri", "width") == [("s3://in/a.jpg", 1), ("s3://in/b.jpg", 2)]
    relation = open_features(output, options)
    assert relation.query("f", "SELECT uri, width FROM f ORDER BY uri").fetchall() == [
        ("s3://in/a.jpg", 1),
        ("s3://in/b.jpg", 2),
    ]
    assert _rows(open_features(output, options, exclude_removed=True).to_arrow_table(), "uri") == [("s3://in/b.jpg",)]


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# -- scale ------------------------------------------------------------------------------------------------------------
SHARDS = 5000
UNIQUE = 4000  # shards 4000-4999 are a second run that featurised the first 1000 inputs again


def _write_many(folder: Path) -> str:
    """5,000 one-row shards written straight from one template table (fast: no per-shard table building)."""
    template = images(["/in/x.jpg"], "r1")
    uri, run = template.schema.get_field_index("uri"), template.schema.get_field_index("run_id")
    shards = []
    for unit in range(SHARDS):
        table = template.set_column(uri, "uri", pa.array([f"/in/{unit % UNIQUE:05d}.jpg"]))
        shards.append(table.set_column(run, "run_id", pa.array(["r2" if unit >= UNIQUE else "r1"])))
    return make_output(folder, shards)


def test_five_thousand_shards_read_with_256_file_descriptors(tmp_path):
    output = _write_many(tmp_path / "out")
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # opening every shard at once would fail
        from pipeline.read import open_features, read_features
        table = read_features({output!r}, columns=["uri", "run_id"])
        uris, runs = table.column("uri").to_pylist(), table.column("run_id").to_pylist()
        assert uris == sorted(set(uris)) and len(uris) == {UNIQUE}, len(uris)
        assert runs.count("r2") == {SHARDS - UNIQUE}, runs.count("r2")
        relation = open_features({output!r})
        print(relation.query("f", "SELECT count(*), count(DISTINCT uri), count_if(run_id = 'r2') FROM f").fetchall())
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"[({UNIQUE}, {UNIQUE}, {SHARDS - UNIQUE})]"  # after DuckDB's progress
