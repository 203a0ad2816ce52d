"""Heatmaps over a slides OUTPUT built with the driver's own table builders (no Ray needed), on real slides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from slide_fixtures import draw_slide, grid_plan, with_old_column_names, with_plan, write_slide

from pipeline import open_features, read_features
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.heatmap import SlideOutput, tile_grid_values, write_all, write_heatmap
from pipeline.prompts import Concept, PromptSet
from pipeline.schema import SLIDE_SCHEMA, TILE_SCHEMA, prompts_table
from pipeline.slides_job import tile_table_builder
from pipeline.write import OutputDir

CONCEPTS = ["tumor", "stroma", "necrotic tissue"]
MAP_SIDE = 4


def _fake_output(root, slides: dict, concept_maps: bool = False):
    """OUTPUT with one shard: every slide's grid of tiles over its drawn tissue; logit 0 of a tile = its x."""
    out = OutputDir(str(root / "out"))
    run_id = "20260101T000000Z-abcdef"
    plan_parts, rows = [], []
    for slide_id, (path, width, height) in slides.items():
        fp = 128
        plan_parts.append(grid_plan(slide_id, str(path), width, height, fp, every=2))  # gaps stay transparent
        n = plan_parts[-1].num_rows
        rows.append(
            {
                "slide_id": slide_id,
                "uri": str(path),
                "status": "ok",
                "reader": "tiffslide",
                "slide_mpp": 0.25,
                "mpp_source": "tiff.XResolution",
                "width": width,
                "height": height,
                "n_tiles": n,
                "footprint_px": fp,
                "step_px": fp,
                "tile_px": 64,
                "run_id": run_id,
                "dataset_version": 1,
            }
        )
    plan = pa.concat_tables(plan_parts)
    n = plan.num_rows
    xs = plan.column("x").to_numpy().astype(np.float32)
    logits = np.stack([xs, -xs, np.zeros(n, np.float32)], axis=1)
    cols = {
        "row": np.arange(n),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
        "image_features": np.zeros((n, 8), np.float16),
        "concept_logits": logits,
    }
    if concept_maps:  # the map of concept 0 rises left to right inside each tile
        maps = np.zeros((n, len(CONCEPTS), MAP_SIDE, MAP_SIDE), np.float16)
        maps[:, 0] = np.arange(MAP_SIDE, dtype=np.float16)[None, None, :]
        cols["concept_maps"] = maps.reshape(n, -1)
    table = tile_table_builder(64, run_id, 1, concept_maps)(with_plan(cols, plan))
    out.write_table(table, "part-00000.parquet")
    out.write_table(pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA), "_slides.parquet")
    prompt_set = PromptSet(tuple(Concept(c, (c,)) for c in CONCEPTS))
    out.write_table(prompts_table(prompt_set, np.eye(len(CONCEPTS), 4, dtype=np.float32), {}), "_prompts.parquet")
    return out.url


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("heat")
    wide = write_slide(root / "wide.tif", draw_slide(1024, 512, shapes=[("rect", 128, 128, 768, 384)]), 0.25, levels=2)
    tall = write_slide(root / "tall.tif", draw_slide(512, 1024, shapes=[("rect", 64, 128, 448, 896)]), 0.25, levels=2)
    return _fake_output(root, {"wide": (wide, 1024, 512), "tall": (tall, 512, 1024)})


def test_png_has_the_slide_aspect_ratio(output, tmp_path):
    result = SlideOutput(output)
    for slide_id, ratio in (("wide", 2.0), ("tall", 0.5)):
        path = write_heatmap(result, slide_id, "tumor", tmp_path / f"{slide_id}.png")
        width, height = Image.open(path).size
        assert max(width, height) == 1200 and width / height == pytest.approx(ratio, abs=0.01)


def test_values_sit_on_their_tiles():
    tiles = pa.table({"x": [0, 256], "y": [128, 0], "concept_logits": [[1.0, 5.0], [2.0, 6.0]]})
    slide = {"width": 512, "height": 384, "footprint_px": 128, "step_px": 128}
    grid, extent = tile_grid_values(tiles, slide, 1, use_maps=False)
    assert extent[:2] == (0, grid.shape[1] * 128)
    assert grid[1, 0] == 5.0 and grid[0, 2] == 6.0 and np.isnan(grid).sum() == grid.size - 2
    # With overlap, each tile's cell is centred on the tile.
    grid, extent = tile_grid_values(tiles.slice(0, 1), {**slide, "step_px": 96}, 0, use_maps=False)
    assert extent[0] == 16 and np.nanmax(grid) == 1.0


def test_concept_maps_are_drawn_patch_by_patch(tmp_path):
    slide_path = write_slide(
        tmp_path / "m.tif", draw_slide(512, 256, shapes=[("rect", 0, 0, 512, 256)]), 0.25, levels=1
    )
    url = _fake_output(tmp_path, {"m": (slide_path, 512, 256)}, concept_maps=True)
    result = SlideOutput(url)
    tiles = result.tiles(result.slide("m"))
    grid, extent = tile_grid_values(tiles, result.slide("m"), 0, use_maps=True)
    # Patches are footprint / 4 = 32 level-0 pixels; the first tile's map spans the first 4 cells of row 0.
    assert extent[1] == grid.shape[1] * 32
    np.testing.assert_array_equal(grid[0, :4], [0, 1, 2, 3])
    path = write_heatmap(result, "m", "tumor", tmp_path / "m.png")
    assert Image.open(path).size == (1200, 600)


def test_missing_slide_or_concept_names_it_and_lists_the_choices(output):
    result = SlideOutput(output)
    with pytest.raises(UserError, match=r"no slide 'nope'.*available: wide, tall"):
        result.slide("nope")
    with pytest.raises(UserError, match=r"no concept 'nope'.*available: tumor, stroma, necrotic tissue"):
        result.concept_index("nope")


def test_cli_all_writes_one_per_slide_and_concept(output, tmp_path, capsys):
    folder = tmp_path / "maps"
    assert main(["heatmap", output, "--all", "--out", str(folder)]) == 0
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == sorted(f"{s}.{c.replace(' ', '_')}.png" for s in ("wide", "tall") for c in CONCEPTS)
    assert main(["heatmap", output, "--slide", "wide", "--concept", "lymph", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "featurize: error: no concept 'lymph' in " + output + "; available: tumor, stroma, necrotic tissue"
    )
    assert main(["heatmap", str(tmp_path), "--slide", "wide", "--concept", "tumor", "--out", "x.png"]) == 2
    assert "has no _slides.parquet" in capsys.readouterr().err


def test_missing_slide_file_still_draws_on_a_blank_background(tmp_path, caplog):
    slide_path = write_slide(tmp_path / "gone.tif", draw_slide(512, 256), 0.25, levels=1)
    url = _fake_output(tmp_path, {"gone": (slide_path, 512, 256)})
    slide_path.unlink()
    written = write_all(SlideOutput(url), tmp_path / "all")
    assert len(written) == len(CONCEPTS) and "blank background" in caplog.text


# -- OUTPUTs written before `mpp` was renamed -----------------------------------------------------------------------
def with_dataset(src, dst) -> Path:
    """A copy of the fake OUTPUT with the _dataset.json that read_features needs."""
    shutil.copytree(src, dst)
    (Path(dst) / "_dataset.json").write_text(json.dumps({"identity": {}, "version": 1}))
    return Path(dst)


def test_heatmap_reads_an_output_with_the_old_mpp_columns(output, tmp_path):
    old = with_old_column_names(output, tmp_path / "old")
    assert "mpp" in pq.read_schema(old / "_slides.parquet").names
    assert "mpp" in pq.read_schema(old / "part-00000.parquet").names
    result = SlideOutput(str(old))
    slide = result.slide("wide")
    assert slide["slide_mpp"] == 0.25 and "mpp" not in slide
    drawn = [
        np.asarray(Image.open(write_heatmap(SlideOutput(source), "wide", "tumor", tmp_path / f"{name}.png")))
        for name, source in (("new", output), ("old", str(old)))
    ]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert main(["heatmap", str(old), "--all", "--out", str(tmp_path / "maps")]) == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2 * len(CONCEPTS)


def test_read_features_gives_shards_with_the_old_mpp_column_todays_name(output, tmp_path):
    """Old shards alone, and old shards followed by new ones (an incremental run after the rename)."""
    old = with_old_column_names(with_dataset(output, tmp_path / "new"), tmp_path / "old")
    expected = read_features(str(tmp_path / "new"))  # the same rows, written today
    assert expected.column_names == TILE_SCHEMA.names
    for mixed in (False, True):
        if mixed:  # the second half of the tiles in a shard written after the rename
            table = pq.read_table(old / "part-00000.parquet")
            half = table.num_rows // 2
            pq.write_table(table.slice(0, half), old / "part-00000.parquet")
            pq.write_table(table.slice(half).rename_columns(TILE_SCHEMA.names), old / "part-00001.parquet")
        tiles = read_features(str(old))
        assert tiles.column_names == TILE_SCHEMA.names and tiles.equals(expected), mixed
        assert read_features(str(old), columns=["x", "tile_mpp"]).equals(expected.select(["x", "tile_mpp"]))
        with pytest.raises(UserError, match="no column mpp"):
            read_features(str(old), columns=["mpp"])
        rel = open_features(str(old))
        assert "mpp" not in rel.columns
        assert rel.query("f", "SELECT count(*), min(tile_mpp), max(tile_mpp) FROM f").fetchall() == [
            (expected.num_rows, 0.5, 0.5)
        ]
