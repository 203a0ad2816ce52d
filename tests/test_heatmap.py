"""Heatmaps over a slides OUTPUT built with the driver's own table builders (no Ray needed), on real slides."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.heatmap import SlideOutput, tile_grid_values, write_all, write_heatmap
from pipeline.run_slides import tile_table_builder
from pipeline.schema import SLIDE_SCHEMA
from pipeline.schema import prompts_table
from pipeline.prompts import Concept, PromptSet
from pipeline.write import OutputDir
from slide_fixtures import draw_slide, grid_plan, with_plan, write_slide

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
        rows.append({"slide_id": slide_id, "uri": str(path), "status": "ok", "reader": "tiffslide", "mpp": 0.25,
                     "mpp_source": "tiff.XResolution", "width": width, "height": height, "n_tiles": n,
                     "footprint_px": fp, "step_px": fp, "tile_px": 64, "run_id": run_id, "dataset_version": 1})
    plan = pa.concat_tables(plan_parts)
    n = plan.num_rows
    xs = plan.column("x").to_numpy().astype(np.float32)
    logits = np.stack([xs, -xs, np.zeros(n, np.float32)], axis=1)
    cols = {"row": np.arange(n), "status": np.array(["ok"] * n, dtype=object),
            "error": np.array([None] * n, dtype=object), "image_features": np.zeros((n, 8), np.float16),
            "concept_logits": logits}
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
    wide = write_slide(root / "wide.tif", draw_slide(1024, 512, shapes=[("rect", 128, 128, 768, 384)]), 0.25,
                       levels=2)
    tall = write_slide(root / "tall.tif", draw_slide(512, 1024, shapes=[("rect", 64, 128, 448, 896)]), 0.25,
                       levels=2)
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
    slide_path = write_slide(tmp_path / "m.tif", draw_slide(512, 256, shapes=[("rect", 0, 0, 512, 256)]), 0.25,
                             levels=1)
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
    assert err[-1] == ("featurize: error: no concept 'lymph' in " + output +
                       "; available: tumor, stroma, necrotic tissue")
    assert main(["heatmap", str(tmp_path), "--slide", "wide", "--concept", "tumor", "--out", "x.png"]) == 2
    assert "has no _slides.parquet" in capsys.readouterr().err


def test_missing_slide_file_still_draws_on_a_blank_background(tmp_path, caplog):
    slide_path = write_slide(tmp_path / "gone.tif", draw_slide(512, 256), 0.25, levels=1)
    url = _fake_output(tmp_path, {"gone": (slide_path, 512, 256)})
    slide_path.unlink()
    written = write_all(SlideOutput(url), tmp_path / "all")
    assert len(written) == len(CONCEPTS) and "blank background" in caplog.text
