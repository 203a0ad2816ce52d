"""`summary.summarise_slides` (per-shard Ray tasks, partials merged on the driver) against a plain loop over every
tile (`summarise` below, every tile pulled to the driver): synthetic tile shards written with pyarrow into a real
OutputDir."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import SLIDE_SCHEMA, TILE_SCHEMA
from pipeline.summary import shard_partial, summarise_slides
from pipeline.write import OutputDir, shard_name


# The plain loop summarise_slides must equal: every tile of the run pulled to one process.
def slide_scores(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(top_k, len(logits))
    top = -np.sort(-logits, axis=0)[:k]
    return top[0].astype(np.float32), top.mean(axis=0).astype(np.float32)


def summarise(out: OutputDir, slides: pa.Table, plan: pa.Table, top_k: int, logits: bool = True) -> pa.Table:
    """Fill each slide's tile error count, status and concept scores (with logits: not in features-only runs) from
    the run's committed shards."""
    shards = out.shard_units()
    units = sorted(set(plan.column("unit").to_pylist()))
    columns = ["uri", "status", "error"] + (["concept_logits"] if logits else [])
    parts = [pq.read_table(shards[u], columns=columns, filesystem=out.fs) for u in units if u in shards]
    by_uri: dict[str, list] = {}
    for part in parts:
        values = [part.column(c).to_pylist() for c in columns] + ([] if logits else [[None] * part.num_rows])
        for uri, status, error, tile_logits in zip(*values):
            by_uri.setdefault(uri, []).append((status, error, tile_logits))
    rows = slides.to_pylist()
    for row in rows:
        tiles = by_uri.get(row["uri"], [])
        if row["status"] != "ok" or not row["n_tiles"]:
            continue
        good = [t[2] for t in tiles if t[0] == "ok"]
        errors = [t[1] for t in tiles if t[0] != "ok"]
        if good and logits:
            maxima, topk = slide_scores(np.asarray(good, np.float32), top_k)
            row.update(concept_max=maxima.tolist(), concept_topk_mean=topk.tolist())
        row["n_tile_errors"] = len(errors)
        if errors:
            row.update(
                status="error",
                error=f"{len(errors)} of {row['n_tiles']} tiles could not be scored "
                f"(first: {errors[0]}); rerun to retry this slide",
            )
    return pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA)


K = 5
ROWS_PER_SHARD = 8
FIRST_UNIT = 2

# uri -> (planned status, n_tiles, tile indices that failed (None: failed without a reason))
SLIDES = {
    "s/a.svs": ("ok", 10, {}),
    "s/b.svs": ("ok", 25, {9: "decode failed at 9", 20: "decode failed at 20", 23: "decode failed at 23"}),
    "s/c.svs": ("ok", 3, {0: "c0", 1: "c1", 2: "c2"}),  # every tile failed: no scores
    "s/d.svs": ("ok", 12, {5: None}),  # an error tile without a reason
    "s/e.svs": ("error", 0, {}),  # failed at planning (given stray tiles below: must stay untouched)
    "s/f.svs": ("ok", 4, {}),  # its unit was never committed
    "s/g.svs": ("ok", 0, {}),  # no tissue
}


def slide_table() -> pa.Table:
    rows = []
    for uri, (status, n_tiles, _) in SLIDES.items():
        rows.append(
            {
                "slide_id": uri.split("/")[-1],
                "uri": uri,
                "status": status,
                "n_tiles": n_tiles,
                "top_k": 4,
                "error": "cannot open this slide" if status == "error" else None,
                "reader": "tiffslide",
                "slide_mpp": 0.25,
                "plan_s": 0.1,
                "run_id": "r1",
                "dataset_version": 1,
                "concept_max": [9.0] * K if status == "error" else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA)


def tile_rows(rng, shuffle: bool) -> list[dict]:
    """The tiles in plan order (or shuffled: slides interleaved within and across shards)."""
    rows = []
    for uri, (_status, n_tiles, failed) in SLIDES.items():
        count = 2 if uri == "s/e.svs" else (0 if uri == "s/f.svs" else n_tiles)
        for i in range(count):
            logits = rng.normal(size=K).astype(np.float32)
            if i % 2:
                logits = np.round(logits, 1).astype(np.float32)  # ties
            bad = i in failed
            rows.append(
                {
                    "slide_id": uri.split("/")[-1],
                    "uri": uri,
                    "x": i * 64,
                    "y": 0,
                    "level": 0,
                    "tile_px": 64,
                    "tile_mpp": 0.5,
                    "tissue_fraction": 0.9,
                    "status": "error" if bad else "ok",
                    "error": failed.get(i, f"{uri} tile {i}") if bad else None,
                    "image_features": None if bad else [0.0] * 4,
                    "concept_logits": None if bad else logits.tolist(),
                    "size": 1,
                    "mtime": 1.0,
                    "etag": None,
                    "run_id": "r1",
                    "dataset_version": 1,
                }
            )
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def write_run(out: OutputDir, seed: int = 0, shuffle: bool = False, logits: bool = True) -> list[int]:
    """Shards of ROWS_PER_SHARD tiles from FIRST_UNIT on, an older run's shard (unit 1, not among the units) and a
    never-committed unit for s/f; returns the run's units (unsorted)."""
    rng = np.random.default_rng(seed)
    rows = tile_rows(rng, shuffle)
    units = []
    for start in range(0, len(rows), ROWS_PER_SHARD):
        unit = FIRST_UNIT + start // ROWS_PER_SHARD
        write_shard(out, unit, rows[start : start + ROWS_PER_SHARD], logits)
        units.append(unit)
    stale = [
        dict(r, concept_logits=[100.0] * K, status="ok", error=None)
        for r in tile_rows(rng, False)
        if r["uri"] == "s/a.svs"
    ][:3]
    write_shard(out, 1, stale, logits)
    return [*reversed(units), 99]  # unit 99 (s/f's) has no shard


def write_shard(out: OutputDir, unit: int, rows: list[dict], logits: bool) -> None:
    table = pa.Table.from_pylist(rows, schema=TILE_SCHEMA)
    if not logits:  # features-only runs have no concept_logits column at all
        table = table.drop_columns(["concept_logits"])
    out.write_table(table, shard_name(unit))


def assert_same(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.schema == SLIDE_SCHEMA
    assert actual.num_rows == expected.num_rows
    for name in SLIDE_SCHEMA.names:
        got, want = actual.column(name).to_pylist(), expected.column(name).to_pylist()
        if name in ("concept_max", "concept_topk_mean"):
            for g, w in zip(got, want):
                assert (g is None) == (w is None), name
                if w is not None:
                    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6, err_msg=name)
        else:
            assert got == want, name


def reference(out: OutputDir, slides: pa.Table, units: list[int], top_k: int, logits: bool) -> pa.Table:
    return summarise(out, slides, pa.table({"unit": pa.array(units, pa.int32())}), top_k, logits)


@pytest.mark.parametrize("shuffle", [False, True])
def test_matches_summarise(ray_session, tmp_path, shuffle):
    out = OutputDir(str(tmp_path / "out"))
    units = write_run(out, seed=1 + shuffle, shuffle=shuffle)
    slides = slide_table()
    for top_k in (1, 4, 100):
        expected = reference(out, slides, units, top_k, True)
        actual = summarise_slides(out, slides, units, top_k, max_in_flight=2)
        assert_same(actual, expected)
    rows = {r["uri"]: r for r in actual.to_pylist()}
    assert rows["s/a.svs"]["status"] == "ok" and rows["s/a.svs"]["n_tile_errors"] == 0
    assert rows["s/a.svs"]["concept_max"] and max(rows["s/a.svs"]["concept_max"]) < 100  # the stale shard ignored
    assert rows["s/b.svs"]["status"] == "error" and rows["s/b.svs"]["n_tile_errors"] == 3
    if not shuffle:
        assert "(first: decode failed at 9)" in rows["s/b.svs"]["error"]
    assert rows["s/c.svs"]["concept_max"] is None and rows["s/c.svs"]["n_tile_errors"] == 3
    assert "(first: None)" in rows["s/d.svs"]["error"]
    assert rows["s/e.svs"] == slides.to_pylist()[4]  # failed at planning: untouched
    assert rows["s/f.svs"]["n_tile_errors"] == 0 and rows["s/f.svs"]["concept_max"] is None
    assert rows["s/g.svs"]["n_tile_errors"] is None


def test_slide_split_across_shards(ray_session, tmp_path):
    """s/b spans four shards (units given in reverse, one task at a time so they finish in that order, rows of unit
    11 reversed): its first error is that of the lowest (unit, row), whatever order the tasks finish in."""
    out = OutputDir(str(tmp_path / "out"))
    rng = np.random.default_rng(7)
    rows = [r for r in tile_rows(rng, False) if r["uri"] == "s/b.svs"]
    assert len(rows) == 25
    # Units 10..13 of 7 rows; the row order inside unit 11 puts its error last.
    chunks = [rows[0:7], rows[7:14][::-1], rows[14:21], rows[21:25]]
    for unit, chunk in zip((10, 11, 12, 13), chunks):
        write_shard(out, unit, chunk, True)
    slides = slide_table().filter(pa.array([u == "s/b.svs" for u in SLIDES]))
    for units in ([13, 12, 11, 10], [12, 13]):
        expected = reference(out, slides, units, 4, True)
        actual = summarise_slides(out, slides, units, 4, max_in_flight=1)
        assert_same(actual, expected)
    row = summarise_slides(out, slides, [13, 12, 11, 10], 4).to_pylist()[0]
    assert row["n_tile_errors"] == 3
    assert row["error"].startswith("3 of 25 tiles could not be scored (first: decode failed at 9)")
    good = np.array([r["concept_logits"] for r in rows if r["status"] == "ok"], np.float32)
    assert row["concept_max"] == pytest.approx(good.max(axis=0).tolist(), abs=1e-6)
    assert row["concept_topk_mean"] == pytest.approx(np.sort(good, axis=0)[-4:].mean(axis=0).tolist(), abs=1e-6)


@pytest.mark.parametrize("column", [True, False])
def test_without_logits(ray_session, tmp_path, column):
    out = OutputDir(str(tmp_path / "out"))
    units = write_run(out, seed=3, logits=column)
    slides = slide_table()
    expected = reference(out, slides, units, 4, False)
    actual = summarise_slides(out, slides, units, 4, logits=False)
    assert_same(actual, expected)
    rows = {r["uri"]: r for r in actual.to_pylist()}
    assert rows["s/a.svs"]["concept_max"] is None and rows["s/b.svs"]["n_tile_errors"] == 3


def test_without_ray(monkeypatch, tmp_path):
    """Without Ray initialised the shards are reduced in this process, to the same result."""
    import ray

    out = OutputDir(str(tmp_path / "out"))
    units = write_run(out, seed=4, shuffle=True)
    slides = slide_table()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert_same(summarise_slides(out, slides, units, 3), reference(out, slides, units, 3, True))


def test_no_shards(ray_session, tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    slides = slide_table()
    assert_same(summarise_slides(out, slides, [2, 3], 4), reference(out, slides, [2, 3], 4, True))


def test_shard_partial_is_compact():
    rng = np.random.default_rng(5)
    rows = tile_rows(rng, True)[:16]
    table = pa.Table.from_pylist(rows, schema=TILE_SCHEMA)
    part = shard_partial(table, 2, True)
    assert part["top"].dtype == np.float32 and part["top"].shape[1] == K
    assert part["top"].shape[0] == int(part["counts"].sum()) <= 2 * len(part["uris"])
    for g, uri in enumerate(part["uris"]):
        mine = [r for r in rows if r["uri"] == uri]
        bad = [i for i, r in enumerate(rows) if r["uri"] == uri and r["status"] != "ok"]
        assert part["n_errors"][g] == len(bad)
        assert part["first_error_row"][g] == (bad[0] if bad else -1)
        good = np.array([r["concept_logits"] for r in mine if r["status"] == "ok"], np.float32).reshape(-1, K)
        start = int(part["counts"][:g].sum())
        block = part["top"][start : start + int(part["counts"][g])]
        np.testing.assert_array_equal(block, -np.sort(-good, axis=0)[:2])


def test_remote_output(ray_session, s3_server, s3_bucket):
    """An object-store OUTPUT: each task opens its own filesystem from the url and storage_options."""
    out = OutputDir(f"s3://{s3_bucket}/out", s3_server["storage_options"])
    units = write_run(out, seed=6, shuffle=True)
    slides = slide_table()
    actual = summarise_slides(out, slides, units, 4, max_in_flight=3)
    assert_same(actual, reference(out, slides, units, 4, True))
