"""Whole-slide images: readers, mpp, tissue and tile grid (pure functions on real tifffile-written slides, both
readers), then `featurize slides` end to end through real Ray (local disk and the loopback S3 server)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from slide_fixtures import draw_slide, true_fraction, truncate, with_old_column_names, write_slide

from pipeline.cli import main
from pipeline.decode import PreprocessSpec, resize_for_model
from pipeline.plan import shard_rows
from pipeline.schema import PLAN_TILE_SCHEMA
from pipeline.slides import (
    Tiling,
    open_slide,
    otsu_threshold,
    plan_slide,
    read_tiles,
    resolve_mpp,
    slide_ids,
    tile_geometry,
    tissue_mask,
)

READERS = ["tiffslide", "openslide"]
TILING = Tiling(target_mpp=0.5, tile_px=64, overlap_px=0, min_tissue=0.25)
SPEC = PreprocessSpec("squash", 64, 64)


@pytest.fixture(scope="module")
def drawn():
    return draw_slide(2048, 1536, seed=3)


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory, drawn):
    """The same drawing as a 0.25 um/px generic TIFF (JPEG), a 0.5 um/px one (zlib), an Aperio-style SVS without
    resolution tags, a TIFF without any mpp, and a truncated copy."""
    root = tmp_path_factory.mktemp("slides")
    files = {
        "tif25": write_slide(root / "tif25.tif", drawn, 0.25),
        "tif50": write_slide(root / "tif50.tiff", drawn, 0.5, compression="zlib"),
        "svs": write_slide(root / "aperio.svs", drawn, 0.25, aperio=True),
        "nompp": write_slide(root / "nompp.tif", drawn, None),
    }
    files["truncated"] = truncate(files["tif25"], root / "truncated.tif", 0.6)
    return files


# -- mpp ------------------------------------------------------------------------------------------------------------
def test_resolve_mpp_order_and_sources():
    tags = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}
    assert resolve_mpp(tags) == (0.25, "tiff.XResolution")
    assert resolve_mpp({"tiff.ResolutionUnit": "CENTIMETER", "tiff.XResolution": 20000.0}) == (0.5, "tiff.XResolution")
    assert resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}) == (None, None)
    assert resolve_mpp({"aperio.MPP": "0.2527", **tags}) == (0.2527, "aperio.MPP")
    assert resolve_mpp({"openslide.mpp-x": "0.2527", "aperio.MPP": "0.2527"}) == (0.2527, "aperio.MPP")
    # The reader's own property wins, named by itself when it is not one of the other sources.
    assert resolve_mpp({"openslide.mpp-x": "0.3", "aperio.MPP": "0.25"}) == (0.3, "openslide.mpp-x")
    assert resolve_mpp({"tiffslide.mpp-x": 0.3}) == (0.3, "tiffslide.mpp-x")
    assert resolve_mpp({"openslide.mpp-x": "0", "aperio.MPP": "nan"}) == (None, None)
    assert resolve_mpp({}, slide_mpp=0.46) == (0.46, "slide_mpp")
    assert resolve_mpp({"aperio.MPP": "0.25"}, slide_mpp=0.46) == (0.46, "slide_mpp")


@pytest.mark.parametrize("reader", READERS)
def test_mpp_from_resolution_tags_and_aperio_description(slide_files, reader):
    expected = {
        "tif25": (0.25, "tiff.XResolution"),
        "tif50": (0.5, "tiff.XResolution"),
        "svs": (0.25, "aperio.MPP"),
        "nompp": (None, None),
    }
    for name, want in expected.items():
        slide = open_slide(str(slide_files[name]), reader)
        try:
            assert slide.name == reader
            mpp, source = resolve_mpp(slide.properties)
            assert (None if mpp is None else pytest.approx(mpp)) == want[0] and source == want[1], name
            assert slide.dimensions == (2048, 1536) and slide.level_count == 4
        finally:
            slide.close()


@pytest.mark.parametrize("reader", READERS)
def test_slide_without_mpp_is_an_error_naming_mpp_unless_overridden(slide_files, reader):
    row, tiles = plan_slide(str(slide_files["nompp"]), TILING, reader)
    assert row["status"] == "error" and "mpp" in row["error"] and "--slide-mpp" in row["error"]
    assert row["n_tiles"] == 0 and len(tiles["x"]) == 0
    row, tiles = plan_slide(str(slide_files["nompp"]), TILING, reader, slide_mpp=0.25)
    assert row["status"] == "ok" and (row["slide_mpp"], row["mpp_source"]) == (0.25, "slide_mpp")
    assert row["n_tiles"] == len(tiles["x"]) > 0


@pytest.mark.parametrize("reader", READERS)
def test_truncated_or_foreign_files_are_error_rows(slide_files, tmp_path, reader):
    row, tiles = plan_slide(str(slide_files["truncated"]), TILING, reader)
    assert row["status"] == "error" and row["error"] and len(tiles["x"]) == 0
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 100)
    row, _ = plan_slide(str(junk), TILING, reader)
    assert row["status"] == "error" and "unreadable" in row["error"]
    row, _ = plan_slide(str(tmp_path / "missing.svs"), TILING, reader)
    assert row["status"] == "error" and "not found" in row["error"]


# -- tissue and tiles -----------------------------------------------------------------------------------------------
def test_otsu_and_tissue_mask_separate_stain_from_glass():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 15, 5000), rng.integers(100, 140, 3000)]).astype(np.uint8)
    assert 14 <= otsu_threshold(values) < 100
    drawn = draw_slide(256, 192, shapes=[("rect", 64, 32, 160, 128)])
    mask = tissue_mask(drawn.rgb)
    assert (mask == drawn.truth).mean() > 0.99
    blank = draw_slide(256, 192, shapes=[])
    assert not tissue_mask(blank.rgb).any()  # noise on glass is not tissue


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "name,footprint,level,read_px", [("tif25", 128, 1, 64), ("tif50", 64, 0, 64), ("svs", 128, 1, 64)]
)
def test_tiles_lie_on_tissue_cover_it_and_step_by_their_footprint(
    slide_files, drawn, reader, name, footprint, level, read_px
):
    row, tiles = plan_slide(str(slide_files[name]), TILING, reader)
    assert row["status"] == "ok", row["error"]
    assert (row["footprint_px"], row["step_px"], row["level"], row["read_px"]) == (footprint, footprint, level, read_px)
    assert row["tile_mpp"] == pytest.approx(0.5)
    xs, ys = tiles["x"], tiles["y"]
    assert row["n_tiles"] == len(xs) > 20
    # Grid: corners are multiples of the footprint; neighbours in a row are one footprint apart.
    assert not (xs % footprint).any() and not (ys % footprint).any()
    steps = np.diff(xs)[np.diff(ys) == 0]
    assert steps.min() == footprint
    truth = drawn.truth
    fractions = np.array([true_fraction(truth, x, y, footprint) for x, y in zip(xs, ys)])
    # Every scored tile lies on tissue (none from the blank background) ...
    assert fractions.min() >= TILING.min_tissue - 0.1
    np.testing.assert_allclose(tiles["tissue_fraction"], fractions, atol=0.1)
    # ... and the tiles cover it: every grid square that is clearly tissue is scored.
    scored = set(zip(xs.tolist(), ys.tolist()))
    for y in range(0, 1536 - footprint + 1, footprint):
        for x in range(0, 2048 - footprint + 1, footprint):
            if true_fraction(truth, x, y, footprint) >= TILING.min_tissue + 0.1:
                assert (x, y) in scored, (x, y)
    covered = np.zeros_like(truth)
    for x, y in scored:
        covered[y : y + footprint, x : x + footprint] = True
    assert (covered & truth).sum() / truth.sum() > 0.95


def test_min_tissue_and_overlap():
    geometry = tile_geometry(0.25, [1.0, 2.0, 4.0, 8.0], Tiling(target_mpp=0.5, tile_px=64, overlap_px=16))
    assert (geometry.level, geometry.read_px, geometry.footprint_px, geometry.step_px) == (1, 64, 128, 96)
    # A slide at 0.3 um/px reads level 0 and rounds the footprint to whole pixels; tile_mpp records the real value.
    geometry = tile_geometry(0.3, [1.0, 2.0], Tiling(target_mpp=0.5, tile_px=64))
    assert (geometry.level, geometry.footprint_px) == (0, 107)
    assert geometry.tile_mpp == pytest.approx(107 * 0.3 / 64)
    with pytest.raises(ValueError, match="coarser than target_mpp 0.5 um/px; pass a larger --target-mpp"):
        tile_geometry(1.0, [1.0], Tiling(target_mpp=0.5, tile_px=64))
    with pytest.raises(ValueError, match="0 <= overlap_px < tile_px"):
        Tiling(tile_px=64, overlap_px=64)


def test_more_tissue_required_means_fewer_tiles(slide_files):
    counts = [
        plan_slide(str(slide_files["tif25"]), Tiling(target_mpp=0.5, tile_px=64, min_tissue=m), "tiffslide")[0][
            "n_tiles"
        ]
        for m in (0.0, 0.5, 1.0)
    ]
    assert counts[0] > counts[1] > counts[2] > 0


def test_slide_ids_use_the_relative_path_only_when_names_collide():
    assert slide_ids(["/d/a.svs", "/d/b.tif"]) == ["a", "b"]
    assert slide_ids(["/d/x/a.svs", "/d/y/a.svs", "/d/y/b.svs"]) == ["x/a", "y/a", "b"]
    assert slide_ids(["s3://b/p/a.svs", "s3://b/p/a.tif"]) == ["a.svs", "a.tif"]


# -- reading tiles --------------------------------------------------------------------------------------------------
def test_read_tiles_resizes_like_the_processor_and_both_readers_agree(slide_files, drawn):
    row, tiles = plan_slide(str(slide_files["tif25"]), TILING, "tiffslide")
    n = 12
    batch = {
        "uri": np.array([str(slide_files["tif25"])] * n, dtype=object),
        "x": tiles["x"][:n],
        "y": tiles["y"][:n],
        "level": np.full(n, row["level"]),
        "read_px": np.full(n, row["read_px"]),
    }
    spec = PreprocessSpec("squash", 48, 48)  # a model input smaller than the tile: resized as the processor would
    out = {}
    for reader in READERS:
        result = read_tiles({**batch, "reader": np.array([reader] * n, dtype=object)}, spec, tile_px=64)
        assert list(result["status"]) == ["ok"] * n and result["pixels"].shape == (n, 48, 48, 3)
        out[reader] = result["pixels"]
    np.testing.assert_array_equal(out["tiffslide"], out["openslide"])
    slide = open_slide(str(slide_files["tif25"]), "openslide")
    region = slide.read(int(tiles["x"][0]), int(tiles["y"][0]), 1, 64, 64)
    np.testing.assert_array_equal(out["tiffslide"][0], resize_for_model(Image.fromarray(region), spec))
    slide.close()
    bad = read_tiles(
        {
            **batch,
            "uri": np.array(["/nowhere.svs"] * n, dtype=object),
            "reader": np.array(["tiffslide"] * n, dtype=object),
        },
        spec,
        tile_px=64,
    )
    assert set(bad["status"]) == {"error"} and "cannot read tile" in bad["error"][0]


# -- end to end: `featurize slides` through real Ray ----------------------------------------------------------------

TILE_COLUMNS = [
    "slide_id",
    "uri",
    "x",
    "y",
    "level",
    "tile_px",
    "tile_mpp",
    "tissue_fraction",
    "status",
    "error",
    "image_features",
    "embedding_norm",  # issue 23: the embedding's norm before normalisation
    "concept_logits",
    "size",
    "mtime",
    "etag",
    "run_id",
    "dataset_version",
]
DRAWINGS = {
    "a": dict(seed=5),
    "b": dict(seed=6, shapes=[("rect", 1024, 128, 1792, 640), ("ellipse", 600, 1100, 400, 300)]),
}


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    """a.tif (0.25 um/px, resolution tags), b.svs (Aperio description, 0.5 um/px), nompp.tif, truncated.tif."""
    root = tmp_path_factory.mktemp("wsi")
    folder = root / "in"
    drawings = {name: draw_slide(2048, 1536, **kw) for name, kw in DRAWINGS.items()}
    write_slide(folder / "a.tif", drawings["a"], 0.25)
    write_slide(folder / "b.svs", drawings["b"], 0.5, aperio=True)
    write_slide(folder / "nompp.tif", drawings["a"], None, compression="zlib")
    truncate(folder / "a.tif", folder / "truncated.tif", 0.6)
    return folder, drawings


def featurize(*args) -> int:
    return main([str(a) for a in args])


def model_args(conceptclip_model, prompts_file, *extra):
    return [
        "--model",
        conceptclip_model,
        "--prompts",
        prompts_file,
        "--trust-remote-code",
        "--num-actors",
        1,
        "--batch-size",
        16,
        "--decode-batch-size",
        16,
        "--rows-per-shard",
        60,
        *extra,
    ]


def read_tiles_output(output) -> pa.Table:
    if isinstance(output, Path):
        return pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))])
    fs, path = output
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in sorted(fs.glob(path + "/part-*.parquet"))])


@pytest.fixture(scope="module")
def local_run(ray_session, conceptclip_model, prompts_file, slide_dir, tmp_path_factory):
    folder, _ = slide_dir
    output = tmp_path_factory.mktemp("wsi-out") / "out"
    args = ["slides", folder, output, *model_args(conceptclip_model, prompts_file)]
    assert featurize(*args) == 0
    return output, args


def test_dry_run_plans_the_tiles_and_writes_nothing(
    local_run, slide_dir, conceptclip_model, prompts_file, tmp_path, capsys
):
    folder, _ = slide_dir
    capsys.readouterr()
    assert featurize("slides", folder, tmp_path / "new", "--dry-run", *model_args(conceptclip_model, prompts_file)) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["listed"], counts["new"], counts["slides"], counts["slide_errors_at_planning"]) == (4, 4, 4, 2)
    assert counts["tiles"] > 0 and counts["work_units"] == -(-counts["tiles"] // 60)
    assert not (tmp_path / "new").exists()
    output, _ = local_run  # finished: the two readable slides are done, the two unreadable ones are tried again
    before = sorted(p.name for p in output.rglob("*"))
    assert featurize("slides", folder, output, "--dry-run", *model_args(conceptclip_model, prompts_file)) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["unchanged"], counts["new"], counts["tiles"]) == (2, 2, 0)
    assert sorted(p.name for p in output.rglob("*")) == before


def test_slides_end_to_end(local_run, slide_dir):
    output, _ = local_run
    folder, drawings = slide_dir
    slides = {r["slide_id"]: r for r in pq.read_table(output / "_slides.parquet").to_pylist()}
    assert sorted(slides) == ["a", "b", "nompp", "truncated"]
    a, b = slides["a"], slides["b"]
    assert (a["status"], a["slide_mpp"], a["mpp_source"], a["footprint_px"], a["level"], a["tile_mpp"]) == (
        "ok",
        0.25,
        "tiff.XResolution",
        128,
        1,
        0.5,
    )
    assert (b["status"], b["slide_mpp"], b["mpp_source"], b["footprint_px"], b["level"], b["tile_mpp"]) == (
        "ok",
        0.5,
        "aperio.MPP",
        64,
        0,
        0.5,
    )
    assert "mpp" not in slides["a"]
    assert (a["width"], a["height"]) == (2048, 1536)
    # The slide without mpp and the truncated slide are error rows; the others finished.
    assert slides["nompp"]["status"] == "error" and "mpp" in slides["nompp"]["error"]
    assert slides["truncated"]["status"] == "error" and "truncated" in slides["truncated"]["error"]

    tiles = read_tiles_output(output)
    assert tiles.column_names == TILE_COLUMNS
    assert set(tiles.column("slide_id").to_pylist()) == {"a", "b"}
    assert set(tiles.column("status").to_pylist()) == {"ok"}
    assert json.loads(tiles.schema.metadata[b"pipeline.provenance"])["model"] == str(local_run[1][4])
    for name in ("a", "b"):
        rows = tiles.filter(pc.equal(tiles.column("slide_id"), name))
        fp = slides[name]["footprint_px"]
        assert rows.num_rows == slides[name]["n_tiles"] > 20
        xs, ys = rows.column("x").to_numpy(), rows.column("y").to_numpy()
        assert not (xs % fp).any() and not (ys % fp).any()
        assert np.diff(xs)[np.diff(ys) == 0].min() == fp  # x steps equal the footprint at either native mpp
        truth = drawings[name].truth
        fractions = np.array([true_fraction(truth, x, y, fp) for x, y in zip(xs, ys)])
        assert fractions.min() >= 0.15  # every scored tile lies on tissue: none from the blank background
        covered = np.zeros_like(truth)
        for x, y in zip(xs, ys):
            covered[y : y + fp, x : x + fp] = True
        assert (covered & truth).sum() / truth.sum() > 0.95  # and they cover it
        assert set(rows.column("tile_mpp").to_pylist()) == {0.5} and set(rows.column("tile_px").to_pylist()) == {64}
        logits = np.array(rows.column("concept_logits").to_pylist(), np.float32)
        assert logits.shape == (rows.num_rows, 4)
        np.testing.assert_allclose(slides[name]["concept_max"], logits.max(axis=0), rtol=1e-6)
        top = -np.sort(-logits, axis=0)[:16].mean(axis=0)
        np.testing.assert_allclose(slides[name]["concept_topk_mean"], top, rtol=1e-5)
    record = json.loads((output / "_run.json").read_text())
    assert record["counts"]["slides_ok"] == 2 and record["counts"]["slides_error"] == 2
    assert record["counts"]["ok"] == tiles.num_rows


def test_planning_tasks_write_the_tiles_and_the_plan_is_the_same_wherever_they_went(
    ray_session, slide_dir, s3_server, s3_bucket, tmp_path
):
    """Each slide's task writes its tiles as a part file (the workspace on one node, OUTPUT on an object store, or
    handed to the driver where workers cannot write): the driver keeps a row per slide, and DuckDB numbers the tiles
    in slide order, so the plan is the same file whichever way they came and whichever task finished first."""
    import s3fs

    from pipeline.config import SlidesConfig
    from pipeline.plan import Workspace
    from pipeline.slides_job import plan_slides
    from pipeline.sources import list_inputs
    from pipeline.storage import remove_tree
    from pipeline.write import OutputDir

    folder, _ = slide_dir
    pending = list_inputs(str(folder), suffixes=(".tif", ".svs"))
    uris = pending.column("uri").to_pylist()
    ids = dict(zip(uris, slide_ids(uris)))
    options = s3_server["storage_options"]
    cfg = SlidesConfig(input=str(folder), output=str(tmp_path / "o"), model="m", storage_options=options)
    out = OutputDir(f"s3://{s3_bucket}/out", options)
    fs = s3fs.S3FileSystem(**options)
    plans = {}
    for where in ("workspace", "s3", "driver"):
        with Workspace() as ws:
            dest = {"workspace": ws.path("tiles"), "s3": f"s3://{s3_bucket}/out/_runs/r.tiles", "driver": None}[where]
            slides, n_tiles, plan, by_driver = plan_slides(pending, ids, TILING, cfg, "r", 1, 7, 25, ws, out, dest)
            assert by_driver == (2 if where == "driver" else 0)
            written = (
                sorted(Path(dest).glob("*.parquet"))
                if where == "workspace"
                else fs.ls(f"{s3_bucket}/out/_runs/r.tiles")
                if where == "s3"
                else sorted(Path(ws.path("tiles")).glob("*"))
            )
            # One part per slide with tiles (a and b: index 0 and 1 by uri), written by the tasks or by the driver.
            assert [str(p).rsplit("/", 1)[-1] for p in written] == ["00000000.parquet", "00000001.parquet"]
            plans[where] = pq.read_table(plan)
            if where == "s3":
                remove_tree(dest, options)
                fs.invalidate_cache()
                assert not fs.exists(f"{s3_bucket}/out/_runs/r.tiles")
        by_id = {r["slide_id"]: r for r in slides.to_pylist()}
        assert {k: r["status"] for k, r in by_id.items()} == {
            "a": "ok",
            "b": "ok",
            "nompp": "error",
            "truncated": "error",
        }
        assert n_tiles == by_id["a"]["n_tiles"] + by_id["b"]["n_tiles"] > 50
    plan = plans["workspace"]
    assert plans["s3"].equals(plan) and plans["driver"].equals(plan)
    assert (
        plan.column_names == [*PLAN_TILE_SCHEMA.names, "unit", "row"] and plan.schema.field("unit").type == pa.int32()
    )
    assert plan.column("row").to_pylist() == list(range(n_tiles))
    assert plan.column("unit").to_pylist() == [7 + r // 25 for r in range(n_tiles)]
    # Slides in uri order, each slide's tiles in its grid's order (as plan_slide lays them).
    n_a = by_id["a"]["n_tiles"]
    assert plan.column("slide_id").to_pylist() == ["a"] * n_a + ["b"] * by_id["b"]["n_tiles"]
    _, grid = plan_slide(uris[0], TILING)
    assert plan.column("x").to_pylist()[:n_a] == grid["x"].tolist()
    assert plan.column("y").to_pylist()[:n_a] == grid["y"].tolist()
    a_size = pending.filter(pc.equal(pending.column("uri"), uris[0])).column("size")[0].as_py()
    assert set(plan.column("size").to_pylist()[:n_a]) == {a_size}
    # Counting only (a dry run where the parts would go to OUTPUT): the same tiles, nothing written.
    with Workspace() as ws:
        slides, dry_tiles, dry_plan, _ = plan_slides(
            pending, ids, TILING, cfg, "r", 1, 7, 25, ws, out, None, count_only=True
        )
        assert (dry_tiles, dry_plan, os.listdir(ws.dir)) == (n_tiles, None, [])


def test_interrupted_run_resumes_and_finished_slides_are_skipped(local_run, tmp_path, capsys):
    output, args = local_run
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    before = read_tiles_output(copy)
    slides_before = pq.read_table(copy / "_slides.parquet")
    # Interrupt: the run record says running and one shard never committed.
    record = json.loads((copy / "_run.json").read_text())
    lost = sorted(copy.glob("part-*.parquet"))[1]
    lost_rows = pq.read_table(lost).num_rows
    lost.unlink()
    (copy / "_runs" / f"{record['run_id']}.json").write_text(json.dumps({**record, "state": "running"}))
    run_args = [a if a != output else copy for a in args]
    assert featurize(*run_args) == 0
    resumed = json.loads((copy / "_run.json").read_text())
    assert resumed["resumed"] and resumed["run_id"] == record["run_id"]
    assert resumed["counts"]["processed"] == lost_rows
    after = read_tiles_output(copy)
    assert after.num_rows == before.num_rows
    np.testing.assert_allclose(
        np.array(after.column("concept_logits").to_pylist()),
        np.array(before.column("concept_logits").to_pylist()),
        atol=1e-4,
    )
    assert pq.read_table(copy / "_slides.parquet").column("n_tiles").equals(slides_before.column("n_tiles"))
    # A new run of the same command skips the finished slides and retries only the failed ones.
    shards = sorted(p.name for p in copy.glob("part-*.parquet"))
    assert featurize(*run_args, "--fail-on-error") == 1  # the two bad slides fail again
    again = json.loads((copy / "_run.json").read_text())
    assert again["run_id"] != record["run_id"] and again["counts"]["skipped"] == 2
    assert again["counts"]["planned"] == 2 and again["counts"]["processed"] == 0
    assert sorted(p.name for p in copy.glob("part-*.parquet")) == shards
    assert "2 skipped (already done)" in capsys.readouterr().err


def test_a_run_into_an_output_with_the_old_mpp_columns_continues_it(local_run, tmp_path):
    """An OUTPUT written before `mpp` became tile_mpp and slide_mpp (and the options --target-mpp, --overlap-px): its
    identity keeps the first key names, so the same command continues it, and its slide rows get today's names."""
    output, args = local_run
    old = with_old_column_names(output, tmp_path / "old")
    tiling = json.loads((old / "_dataset.json").read_text())["identity"]["tiling"]
    assert (tiling["mpp"], tiling["tile_px"], tiling["overlap"]) == (0.5, 64, 0)
    assert featurize(*[a if a != output else old for a in args]) == 0
    record = json.loads((old / "_run.json").read_text())
    assert (record["counts"]["skipped"], record["counts"]["planned"]) == (2, 2)  # the two failed slides again
    slides = pq.read_table(old / "_slides.parquet")
    assert "mpp" not in slides.column_names
    assert {r["slide_id"]: r["slide_mpp"] for r in slides.to_pylist()} == {
        "a": 0.25,
        "b": 0.5,
        "nompp": None,
        "truncated": None,
    }


def test_openslide_reader_and_slide_mpp_override(local_run, slide_dir, conceptclip_model, prompts_file, tmp_path):
    folder, _ = slide_dir
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{folder / 'a.tif'}\n{folder / 'nompp.tif'}\n")
    output = tmp_path / "out"
    assert (
        featurize(
            "slides",
            listing,
            output,
            "--reader",
            "openslide",
            "--slide-mpp",
            0.25,
            *model_args(conceptclip_model, prompts_file),
        )
        == 0
    )
    slides = {r["slide_id"]: r for r in pq.read_table(output / "_slides.parquet").to_pylist()}
    assert {r["status"] for r in slides.values()} == {"ok"}
    assert {(r["reader"], r["slide_mpp"], r["mpp_source"]) for r in slides.values()} == {
        ("openslide", 0.25, "slide_mpp")
    }
    # Same pixels through either reader: a.tif scores as the tiffslide run scored it.
    ours, theirs = read_tiles_output(output), read_tiles_output(local_run[0])
    ours = ours.filter(pc.equal(ours.column("slide_id"), "a"))
    theirs = theirs.filter(pc.equal(theirs.column("slide_id"), "a"))
    assert ours.select(["x", "y", "level"]).equals(theirs.select(["x", "y", "level"]))
    np.testing.assert_allclose(
        np.array(ours.column("concept_logits").to_pylist()),
        np.array(theirs.column("concept_logits").to_pylist()),
        atol=1e-4,
    )
    # nompp.tif holds the same drawing as a.tif (zlib instead of JPEG): tissue found at the same places.
    nompp = read_tiles_output(output).filter(pc.equal(read_tiles_output(output).column("slide_id"), "nompp"))
    assert set(zip(nompp.column("x").to_pylist(), nompp.column("y").to_pylist())) == set(
        zip(ours.column("x").to_pylist(), ours.column("y").to_pylist())
    )


def test_cli_errors_are_one_line(slide_dir, conceptclip_model, prompts_file, tmp_path, capsys):
    folder, _ = slide_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    assert featurize("slides", empty, tmp_path / "o", *model_args(conceptclip_model, prompts_file)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featurize: error: input") and "\n" not in err and ".svs" in err
    assert (
        featurize(
            "slides",
            folder,
            tmp_path / "o",
            "--tile-px",
            64,
            "--overlap-px",
            64,
            *model_args(conceptclip_model, prompts_file),
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == "featurize: error: overlap_px 64 must be smaller than the tile size 64 px"
    assert (
        featurize("slides", folder, tmp_path / "o", "--min-tissue", 2, *model_args(conceptclip_model, prompts_file))
        == 2
    )
    assert "min_tissue" in capsys.readouterr().err


# -- the same slide from object storage -----------------------------------------------------------------------------
def test_slide_on_s3_scores_as_the_local_copy(
    local_run, slide_dir, s3_server, s3_bucket, conceptclip_model, prompts_file, tmp_path
):
    import s3fs

    folder, _ = slide_dir
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(folder / "a.tif"), f"{s3_bucket}/in/a.tif")
    options = json.dumps(s3_server["storage_options"])
    assert (
        featurize(
            "slides",
            f"s3://{s3_bucket}/in",
            f"s3://{s3_bucket}/out",
            "--storage-options",
            options,
            *model_args(conceptclip_model, prompts_file),
        )
        == 0
    )
    fs.invalidate_cache()
    remote = read_tiles_output((fs, f"{s3_bucket}/out"))
    local = read_tiles_output(local_run[0])
    local = local.filter(pc.equal(local.column("slide_id"), "a"))
    assert remote.column("uri").to_pylist() == [f"s3://{s3_bucket}/in/a.tif"] * local.num_rows
    assert remote.select(["slide_id", "x", "y", "level", "tissue_fraction"]).equals(
        local.select(["slide_id", "x", "y", "level", "tissue_fraction"])
    )
    np.testing.assert_allclose(
        np.array(remote.column("image_features").to_pylist(), np.float32),
        np.array(local.column("image_features").to_pylist(), np.float32),
        atol=2.0**-11,
    )
    np.testing.assert_allclose(
        np.array(remote.column("concept_logits").to_pylist()),
        np.array(local.column("concept_logits").to_pylist()),
        atol=1e-4,
    )
    with fs.open(f"{s3_bucket}/out/_slides.parquet", "rb") as f:
        row = pq.read_table(f).to_pylist()[0]
    assert (row["slide_id"], row["status"], row["reader"], row["mpp_source"]) == (
        "a",
        "ok",
        "tiffslide",
        "tiff.XResolution",
    )
    # The heatmap reads the remote OUTPUT and the remote slide's thumbnail.
    png = tmp_path / "a.png"
    assert (
        featurize(
            "heatmap",
            f"s3://{s3_bucket}/out",
            "--slide",
            "a",
            "--concept",
            "tumor",
            "--out",
            png,
            "--storage-options",
            options,
        )
        == 0
    )
    assert Image.open(png).size == (1200, 900)


# -- patch-level concept maps ---------------------------------------------------------------------------------------
def test_concept_maps_follow_the_documented_recipe(conceptclip_model, prompts_file, slide_files):
    """EncodeBatch(concept_maps=True) against REFERENCE.md's recipe, computed from the model's own forward dict."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.encode import EncodeBatch
    from pipeline.prompts import load_prompts

    spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    preprocess = preprocess_spec(spec)
    prompt_set = load_prompts(str(prompts_file))
    row, tiles = plan_slide(str(slide_files["tif25"]), TILING, "tiffslide")
    n = 5
    batch = read_tiles(
        {
            "uri": np.array([str(slide_files["tif25"])] * n, dtype=object),
            "reader": np.array(["tiffslide"] * n, dtype=object),
            "x": tiles["x"][:n],
            "y": tiles["y"][:n],
            "level": np.full(n, 1),
            "read_px": np.full(n, 64),
        },
        preprocess,
        64,
    )
    batch["status"][3] = "error"  # a row that failed upstream keeps zero maps
    pixels = batch["pixels"].copy()
    with_maps = EncodeBatch(spec, preprocess, prompt_set, concept_maps=True)(dict(batch))
    plain = EncodeBatch(spec, preprocess, prompt_set)(dict(batch, pixels=pixels))
    assert "concept_maps" not in plain
    np.testing.assert_array_equal(with_maps["image_features"], plain["image_features"])
    np.testing.assert_allclose(with_maps["concept_logits"], plain["concept_logits"], atol=1e-5)
    maps = with_maps["concept_maps"]
    assert maps.dtype == np.float16 and maps.shape == (n, 4 * 4 * 4) and not maps[3].any()

    model = AutoModel.from_pretrained(conceptclip_model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(conceptclip_model, trust_remote_code=True)
    names = prompt_set.names
    inputs = processor(
        images=[Image.fromarray(p) for p in pixels],
        text=names,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=77,
    )
    with torch.no_grad():
        out = model(**inputs)
    tokenizer = processor.tokenizer
    concepts = []
    for i in range(len(names)):  # the concept's word pieces: every position but [CLS], [SEP] and padding
        ids = inputs["input_ids"][i].tolist()
        keep = [
            j
            for j, t in enumerate(ids)
            if t not in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        ]
        concepts.append(out["text_token_features"][i, keep].mean(0))
    concepts = torch.nn.functional.normalize(torch.stack(concepts), dim=-1)
    patches = torch.nn.functional.normalize(out["image_token_features"], dim=-1)  # [B, 16, D]: a 4 x 4 grid
    local = out["concept_logit_scale"] * patches @ concepts.T + out["concept_logit_bias"]  # [B, 16, K]
    expected = local.permute(0, 2, 1).reshape(n, len(names), 4, 4).numpy()
    got = maps.astype(np.float32).reshape(n, len(names), 4, 4)
    ok = [0, 1, 2, 4]
    np.testing.assert_allclose(got[ok], expected[ok], atol=2e-2, rtol=1e-2)  # float16 storage


def test_concept_maps_end_to_end_and_drawn_by_the_heatmap(ray_session, slide_dir, conceptclip_model, tmp_path):
    """80 concepts (x 4 x 4 patches): the shard size follows the row's width, and the maps read back whole."""
    folder, _ = slide_dir
    listing = tmp_path / "one.txt"
    listing.write_text(f"{folder / 'a.tif'}\n")
    prompts = tmp_path / "eighty.yaml"
    prompts.write_text(
        "concepts: [" + ", ".join(f"concept {i}" for i in range(80)) + "]\n"
        "templates: ['a histopathology image of {}']\n"
    )
    output = tmp_path / "maps"
    args = model_args(conceptclip_model, prompts)
    args[args.index("--rows-per-shard") : args.index("--rows-per-shard") + 2] = []  # sized by bytes
    assert featurize("slides", listing, output, "--concept-maps", "--min-tissue", 0.9, *args) == 0
    tiles = read_tiles_output(output)
    assert tiles.schema.field("concept_maps").type == pa.list_(pa.float16())
    maps = np.array(tiles.column("concept_maps").to_pylist(), np.float32)
    assert maps.shape == (tiles.num_rows, 80 * 4 * 4) and np.isfinite(maps).all() and maps.std() > 0
    record = json.loads((output / "_run.json").read_text())
    assert record["counts"]["rows_per_shard"] == shard_rows(
        0, {"image_features": (32, 2), "concept_logits": (80, 4), "concept_maps": (80 * 16, 2)}
    )
    png = tmp_path / "a.png"
    assert featurize("heatmap", output, "--slide", "a", "--concept", "concept 7", "--out", png) == 0
    assert Image.open(png).size == (1200, 900)


def test_concept_maps_need_the_concept_head(clip_model, prompts_file, slide_dir, tmp_path, capsys):
    folder, _ = slide_dir
    assert (
        featurize("slides", folder, tmp_path / "o", "--model", clip_model, "--prompts", prompts_file, "--concept-maps")
        == 2
    )
    assert "--concept-maps needs a model with ConceptCLIP's concept head" in capsys.readouterr().err


def test_slide_handles_are_cached_per_process_and_never_pickled(slide_files):
    import pickle

    from pipeline import slides as slides_module

    uri = str(slide_files["tif25"])
    first = slides_module.cached_slide(uri, "tiffslide", None)
    assert slides_module.cached_slide(uri, "tiffslide", None) is first
    assert slides_module.cached_slide(uri, "openslide", None) is not first
    with pytest.raises(TypeError, match="belongs to the process"):
        pickle.dumps(first)


@pytest.fixture
def silent_server():
    """An HTTP endpoint on loopback that accepts connections and never answers (a remote read that hangs)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # held open, never read from or answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_a_slide_whose_read_hangs_does_not_hold_the_run(
    ray_session, slide_dir, silent_server, conceptclip_model, prompts_file, tmp_path
):
    """Planning waits at most --stall-timeout-s for a slide: the hanging one becomes an error row (retried by the
    next run), the others are scored."""
    folder, _ = slide_dir
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{folder / 'b.svs'}\n{silent_server}/hangs.svs\n")
    output = tmp_path / "out"
    assert (
        featurize("slides", listing, output, *model_args(conceptclip_model, prompts_file), "--stall-timeout-s", 30) == 0
    )
    slides = {Path(r["uri"]).name: r for r in pq.read_table(output / "_slides.parquet").to_pylist()}
    assert slides["b.svs"]["status"] == "ok" and slides["b.svs"]["n_tiles"] > 0
    hung = slides["hangs.svs"]
    assert hung["status"] == "error" and "no progress for 30 s" in hung["error"] and hung["n_tiles"] == 0
