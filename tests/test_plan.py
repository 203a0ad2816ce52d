"""Planning at scale without a cluster: streamed listings, DuckDB's classification against committed shards, the
plan file, resume matching, shard sizing, and `--dry-run` (which starts no Ray and writes nothing)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.job import resolve_job
from pipeline.plan import (
    MAX_LIST_VALUES,
    SHARD_BYTES,
    Workspace,
    classify,
    committed_view,
    contiguous_units,
    normalised_input,
    open_listing,
    planned_states,
    shard_rows,
    unfinished_run,
    write_plan,
)
from pipeline.schema import IMAGE_SCHEMA, fixed_list
from pipeline.sources import LISTING_SCHEMA, write_listing
from pipeline.write import OutputDir, shard_name


def listing_chunks(ws: Workspace, rows: list[tuple], chunk: int = 3) -> list[str]:
    """rows (uri, size, mtime, etag) as listing chunk files, `chunk` rows each (several files, like a big listing)."""
    paths = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        paths.append(ws.path(f"listing-{i:06d}.parquet"))
        pq.write_table(
            pa.Table.from_arrays(
                [pa.array(c, f.type) for c, f in zip(zip(*part), LISTING_SCHEMA)], schema=LISTING_SCHEMA
            ),
            paths[-1],
        )
    return paths


def committed_shard(out: OutputDir, unit: int, rows: list[dict], run_id: str, version: int = 1) -> None:
    """A committed shard holding what planning reads (the feature columns are nulls)."""
    n = len(rows)
    columns = {
        "image_id": ["x"] * n,
        "uri": [r["uri"] for r in rows],
        "status": [r.get("status", "ok") for r in rows],
        "error": [None] * n,
        "width": [1] * n,
        "height": [1] * n,
        "image_features": pa.nulls(n, pa.list_(pa.float16())),
        "concept_logits": pa.nulls(n, pa.list_(pa.float32())),
        "size": [r.get("size") for r in rows],
        "mtime": [r.get("mtime") for r in rows],
        "etag": [r.get("etag") for r in rows],
        "run_id": [run_id] * n,
        "dataset_version": [version] * n,
    }
    out.write_table(
        pa.table(
            {
                f.name: pa.array(columns[f.name], f.type)
                if not isinstance(columns[f.name], pa.Array)
                else columns[f.name]
                for f in IMAGE_SCHEMA
            },
            schema=IMAGE_SCHEMA,
        ),
        shard_name(unit),
    )


def test_new_changed_error_and_unchanged_are_told_apart_against_each_inputs_newest_row(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    committed_shard(
        out,
        0,
        [
            {"uri": "/d/same", "size": 5, "mtime": 1.0},
            {"uri": "/d/grown", "size": 5, "mtime": 1.0},
            {"uri": "/d/touched", "size": 5, "mtime": 1.0},
            {"uri": "/d/etag", "size": 5, "mtime": 1.0, "etag": "a"},
            {"uri": "/d/broken", "size": 5, "mtime": 1.0, "status": "error"},
            {"uri": "/d/fixed", "size": 5, "mtime": 1.0, "status": "error"},
            {"uri": "/d/repaired", "size": 5, "mtime": 1.0, "status": "error"},
        ],
        "20260101T000000Z-a",
    )
    # a newer run redid /d/fixed (ok now) and /d/grown at its new size: the newest row is what counts
    committed_shard(
        out,
        1,
        [{"uri": "/d/fixed", "size": 5, "mtime": 1.0}, {"uri": "/d/grown", "size": 9, "mtime": 1.0}],
        "20260102T000000Z-b",
    )
    committed_shard(out, 2, [{"uri": "/d/new", "size": 1, "mtime": 1.0}], "20260102T000000Z-b", version=2)
    listed = [
        ("/d/same", 5, 1.0, None),
        ("/d/grown", 9, 1.0, None),
        ("/d/touched", 5, 2.0, None),
        ("/d/etag", 5, 1.0, "b"),
        ("/d/broken", 5, 1.0, None),
        ("/d/fixed", 5, 1.0, None),
        ("/d/new", 1, 1.0, None),
        ("/d/repaired", 6, 1.0, None),
        ("/d/same", 5, 1.0, None),
    ]  # /d/same listed twice
    with Workspace() as ws:
        listing = open_listing(ws, listing_chunks(ws, listed), len(listed))
        assert (listing.rows, listing.unique, listing.duplicates) == (9, 8, 1)
        committed_view(ws, out, version=1)
        counts = classify(ws)
        kinds = dict(ws.con.execute("SELECT uri, state FROM classified").fetchall())
    assert kinds == {
        "/d/same": "unchanged",
        "/d/grown": "unchanged",
        "/d/touched": "changed",
        "/d/etag": "changed",
        "/d/broken": "error",
        "/d/fixed": "unchanged",
        "/d/new": "new",  # /d/new is only in version 2
        "/d/repaired": "error_changed",
    }
    assert counts == {"new": 1, "changed": 2, "error": 2, "unchanged": 3}


@pytest.mark.parametrize(
    "incremental,retry,expected",
    [
        (False, False, ["/d/c"]),
        (True, False, ["/d/a", "/d/c", "/d/d"]),
        (False, True, ["/d/b", "/d/c", "/d/d"]),
        (True, True, ["/d/a", "/d/b", "/d/c", "/d/d"]),
    ],
)
def test_the_plan_is_sorted_cut_into_units_and_holds_only_what_the_options_ask_for(
    tmp_path, incremental, retry, expected
):
    out = OutputDir(str(tmp_path / "out"))
    committed_shard(
        out,
        0,
        [
            {"uri": "/d/a", "size": 1},
            {"uri": "/d/b", "size": 1, "status": "error"},
            {"uri": "/d/d", "size": 1, "status": "error"},
        ],
        "r1",
    )
    with Workspace() as ws:  # a changed, b an error row, c new, d an error row whose file changed (repaired)
        open_listing(
            ws,
            listing_chunks(
                ws, [("/d/c", 1, None, None), ("/d/b", 1, None, None), ("/d/a", 2, None, None), ("/d/d", 2, None, None)]
            ),
            4,
        )
        committed_view(ws, out, 1)
        classify(ws)
        path, rows = write_plan(ws, planned_states(incremental, retry), first_unit=7, rows_per_shard=2)
        plan = pq.read_table(path)
    assert plan.column("uri").to_pylist() == expected and rows == len(expected)
    assert plan.column("row").to_pylist() == list(range(rows))
    assert plan.column("unit").to_pylist() == [7 + i // 2 for i in range(rows)]
    assert contiguous_units(rows, 7, 2) == dict(zip(*np.unique(plan.column("unit").to_numpy(), return_counts=True)))


def test_a_big_listing_streams_in_chunks_and_plans_every_input_once(tmp_path, monkeypatch):
    import pipeline.sources.common as common

    monkeypatch.setattr(common, "CHUNK_ROWS", 7)  # many chunk files from a small tree
    tree = tmp_path / "tree"
    for d in range(4):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(10):
            (tree / f"d{d}" / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    with Workspace() as ws:
        files, rows = write_listing(str(tree), ws.path("listing"))
        assert rows == 40 and len(files) >= 40 // 7
        assert all(pq.read_metadata(f).num_rows <= 7 for f in files)
        open_listing(ws, files, rows)
        committed_view(ws, OutputDir(str(tmp_path / "out")), 1)
        assert classify(ws)["new"] == 40
        path, planned = write_plan(ws, ["new"], 0, 16)
        uris = pq.read_table(path).column("uri").to_pylist()
    assert planned == 40 and uris == sorted(str(p) for p in tree.rglob("*.jpg"))


def test_runs_are_matched_by_the_normalised_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert (
        normalised_input("data")
        == normalised_input("data/")
        == normalised_input("./data")
        == normalised_input(f"file://{tmp_path}/data")
        == str(tmp_path / "data")
    )
    assert normalised_input("s3://b/data/") == "s3://b/data"
    out = OutputDir(str(tmp_path / "out"))
    out.write_table(pa.table({"uri": ["x"]}), "_runs", "r1.plan.parquet")
    runs = [{"run_id": "r1", "state": "failed", "dataset_version": 1, "input": "data/"}]
    assert unfinished_run(out, runs, 1, "data")[0] == "r1"
    assert unfinished_run(out, runs, 1, "./data/")[0] == "r1"
    assert unfinished_run(out, runs, 1, "other") is None
    assert unfinished_run(out, runs, 2, "data") is None


def test_shards_are_sized_by_bytes_and_list_offsets_never_pass_2_31():
    so400m = {"image_features": (1152, 2), "concept_logits": (80, 4)}
    rows = shard_rows(0, so400m)
    assert abs(rows * (200 + 1152 * 2 + 80 * 4) - SHARD_BYTES) < 2 * (200 + 1152 * 2 + 80 * 4)
    # ConceptCLIP concept maps: 80 concepts x 27 x 27 patches = 58,320 values a row
    maps = {**so400m, "concept_maps": (80 * 729, 2)}
    assert shard_rows(0, maps) * 80 * 729 < MAX_LIST_VALUES and shard_rows(0, maps) < rows
    assert shard_rows(40_000, maps) == MAX_LIST_VALUES // (80 * 729)  # an explicit size is capped, not wrapped
    assert shard_rows(40_000, so400m) == 40_000
    too_many = np.broadcast_to(np.zeros(1, np.float16), (40_000, 80 * 729))  # no memory: a view
    with pytest.raises(ValueError, match="2\\^31 list offsets"):
        fixed_list(too_many, pa.float16(), np.ones(40_000, bool))


# -- --dry-run ------------------------------------------------------------------------------------------------------
def dry_run(capsys, *args) -> tuple[dict, str]:
    """(the JSON of stdout's last line, what the command said on stderr)."""
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_dry_run_counts_against_the_output_and_writes_nothing(
    tmp_path, capsys, conceptclip_model, prompts_file, ray_session
):
    import ray

    manifest = tmp_path / "manifest.parquet"
    uris = [f"s3://bucket/img_{i:03d}.jpg" for i in range(10)]
    pq.write_table(pa.table({"uri": uris + uris[:2], "size": [1] * 10 + [1] * 2, "mtime": [0.0] * 12}), manifest)
    model = ["--model", conceptclip_model, "--prompts", prompts_file, "--trust-remote-code", "--rows-per-shard", 4]

    ray_was_up = ray.is_initialized()  # (the session's Ray: a list INPUT is read by Ray Data, so Ray is up)
    counts, text = dry_run(capsys, "images", manifest, tmp_path / "empty", "--dry-run", *model)
    assert {k: counts[k] for k in ("listed", "duplicates", "new", "changed", "unchanged", "planned", "work_units")} == {
        "listed": 12,
        "duplicates": 2,
        "new": 10,
        "changed": 0,
        "unchanged": 0,
        "planned": 10,
        "work_units": 3,
    }
    assert "nothing written" in text and not (tmp_path / "empty").exists()
    assert ray.is_initialized() == ray_was_up  # a dry run leaves Ray as it found it

    out = OutputDir(str(tmp_path / "out"))
    cfg = RunConfig(
        input=str(manifest),
        output=out.url,
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
    )
    out.write_json({"identity": {**resolve_job(cfg).identity(), "dtype": "float32"}, "version": 1}, "_dataset.json")
    committed_shard(out, 0, [{"uri": u, "size": 1, "mtime": 0.0} for u in uris[:6]], "20260101T000000Z-a")
    committed_shard(out, 1, [{"uri": uris[6], "size": 2, "mtime": 0.0}], "20260101T000000Z-a")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    counts, text = dry_run(capsys, "images", manifest, out.url, "--dry-run", "--incremental", *model)
    assert {k: counts[k] for k in ("new", "changed", "unchanged", "planned", "work_units", "dataset_version")} == {
        "new": 3,
        "changed": 1,
        "unchanged": 6,
        "planned": 4,
        "work_units": 1,
        "dataset_version": 1,
    }
    counts, text = dry_run(capsys, "images", manifest, out.url, "--dry-run", *model)
    assert counts["planned"] == 3 and "only --incremental reprocesses them" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before

    # --fast-decode changes the numbers: part of the identity, refused as the run would refuse it
    assert main(["images", str(manifest), out.url, "--dry-run", "--fast-decode", *map(str, model)]) == 2
    assert "fast_decode" in capsys.readouterr().err
    counts, _ = dry_run(capsys, "images", manifest, out.url, "--dry-run", "--fast-decode", "--new-version", *model)
    assert (counts["dataset_version"], counts["new"], counts["planned"]) == (2, 10, 10)
