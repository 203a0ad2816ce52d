"""Whole-slide images: readers, mpp, tissue and tile grid (pure functions on real tifffile-written slides, both
readers), then `featurize slides` end to end through real Ray (local disk and the loopback S3 server)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import PreprocessSpec, resize_for_model
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
from slide_fixtures import draw_slide, true_fraction, truncate, write_slide

READERS = ["tiffslide", "openslide"]
TILING = Tiling(mpp=0.5, tile_px=64, overlap=0, min_tissue=0.25)
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
    expected = {"tif25": (0.25, "tiff.XResolution"), "tif50": (0.5, "tiff.XResolution"),
                "svs": (0.25, "aperio.MPP"), "nompp": (None, None)}
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
    assert row["status"] == "ok" and (row["mpp"], row["mpp_source"]) == (0.25, "slide_mpp")
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
@pytest.mark.parametrize("name,footprint,level,read_px", [("tif25", 128, 1, 64), ("tif50", 64, 0, 64),
                                                          ("svs", 128, 1, 64)])
def test_tiles_lie_on_tissue_cover_it_and_step_by_their_footprint(slide_files, drawn, reader, name, footprint,
                                                                   level, read_px):
    row, tiles = plan_slide(str(slide_files[name]), TILING, reader)
    assert row["status"] == "ok", row["error"]
    assert (row["footprint_px"], row["step_px"], row["level"], row["read_px"]) == (footprint, footprint, level,
                                                                                   read_px)
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
        covered[y:y + footprint, x:x + footprint] = True
    assert (covered & truth).sum() / truth.sum() > 0.95


def test_min_tissue_and_overlap():
    geometry = tile_geometry(0.25, [1.0, 2.0, 4.0, 8.0], Tiling(mpp=0.5, tile_px=64, overlap=16))
    assert (geometry.level, geometry.read_px, geometry.footprint_px, geometry.step_px) == (1, 64, 128, 96)
    # A slide at 0.3 um/px reads level 0 and rounds the footprint to whole pixels; mpp records the real value.
    geometry = tile_geometry(0.3, [1.0, 2.0], Tiling(mpp=0.5, tile_px=64))
    assert (geometry.level, geometry.footprint_px) == (0, 107) and geometry.mpp == pytest.approx(107 * 0.3 / 64)
    with pytest.raises(ValueError, match="coarser than the target mpp"):
        tile_geometry(1.0, [1.0], Tiling(mpp=0.5, tile_px=64))
    with pytest.raises(ValueError):
        Tiling(tile_px=64, overlap=64)


def test_more_tissue_required_means_fewer_tiles(slide_files):
    counts = [plan_slide(str(slide_files["tif25"]), Tiling(mpp=0.5, tile_px=64, min_tissue=m), "tiffslide")[0]
              ["n_tiles"] for m in (0.0, 0.5, 1.0)]
    assert counts[0] > counts[1] > counts[2] > 0


def test_slide_ids_use_the_relative_path_only_when_names_collide():
    assert slide_ids(["/d/a.svs", "/d/b.tif"]) == ["a", "b"]
    assert slide_ids(["/d/x/a.svs", "/d/y/a.svs", "/d/y/b.svs"]) == ["x/a", "y/a", "b"]
    assert slide_ids(["s3://b/p/a.svs", "s3://b/p/a.tif"]) == ["a.svs", "a.tif"]


# -- reading tiles --------------------------------------------------------------------------------------------------
def test_read_tiles_resizes_like_the_processor_and_both_readers_agree(slide_files, drawn):
    row, tiles = plan_slide(str(slide_files["tif25"]), TILING, "tiffslide")
    n = 12
    batch = {"uri": np.array([str(slide_files["tif25"])] * n, dtype=object),
             "x": tiles["x"][:n], "y": tiles["y"][:n], "level": np.full(n, row["level"]),
             "read_px": np.full(n, row["read_px"])}
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
    bad = read_tiles({**batch, "uri": np.array(["/nowhere.svs"] * n, dtype=object),
                      "reader": np.array(["tiffslide"] * n, dtype=object)}, spec, tile_px=64)
    assert set(bad["status"]) == {"error"} and "cannot read tile" in bad["error"][0]
