"""Inline thumbnails: images decoded as runs decode them, tiles cropped from real slides, reasons for the rest."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from slide_fixtures import draw_slide, pyramid, write_slide

from pipeline.thumbnails import (
    Thumbnail,
    data_uri,
    image_thumbnail,
    slide_thumbnail,
    tile_level,
    tile_thumbnails,
)


def pixels(thumb: Thumbnail) -> np.ndarray:
    assert thumb.reason is None and thumb.src.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(thumb.src.split(",", 1)[1]))).convert("RGB"), np.float32)


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (220, 30, 30)
    rgb[:, width // 2 :] = (30, 30, 220)
    return Image.fromarray(rgb)


def test_an_image_thumbnail_is_the_image_upright_within_the_cap(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    halves(200, 100).save(path, "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == (100, 200)
    upright.thumbnail((64, 64))
    thumb = pixels(image_thumbnail(str(path), max_px=64))
    assert thumb.shape == (64, 32, 3)
    assert np.abs(thumb - np.asarray(upright, np.float32)).mean() < 8
    assert thumb[:24, :, 0].mean() > 180 and thumb[40:, :, 2].mean() > 180  # red on top, blue below
    small = tmp_path / "small.png"
    halves(40, 30).save(small)
    assert pixels(image_thumbnail(str(small), max_px=64)).shape == (30, 40, 3)  # never enlarged


def test_an_input_that_cannot_be_read_gets_a_reason(tmp_path):
    gone = image_thumbnail(str(tmp_path / "gone.jpg"))
    assert gone.src is None and "file not found" in gone.reason
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    assert "not a readable image" in image_thumbnail(str(tmp_path / "text.jpg")).reason
    with pytest.raises(ValueError, match="1 to 1024"):
        data_uri(halves(10, 10), 0)


def test_a_truncated_jpeg_shows_what_it_holds_only_when_asked(tmp_path):
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[:128] = (30, 200, 40)
    rgb[128:] = np.random.default_rng(0).integers(0, 255, (128, 256, 3))
    data = io.BytesIO()
    Image.fromarray(rgb).save(data, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 3])
    assert "cannot decode" in image_thumbnail(str(path)).reason
    partial = pixels(image_thumbnail(str(path), max_px=128, partial=True))
    assert partial.shape == (128, 128, 3)
    assert np.abs(partial[:48] - (30, 200, 40)).mean() < 12  # the green top half survived the cut
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # runs still refuse truncated files


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    drawn = draw_slide(1024, 768, shapes=[("rect", 256, 128, 768, 640)], seed=5)
    path = write_slide(tmp_path_factory.mktemp("slide") / "s.tif", drawn, 0.25, levels=2, compression="zlib")
    return path, drawn


def test_a_tile_is_cropped_from_the_coarsest_level_that_gives_its_size(slide):
    from pipeline.slide_readers import open_slide

    path, drawn = slide
    with open_slide(str(path)) as reader:
        assert reader.level_downsamples == [1.0, 2.0, 4.0]
        assert (
            tile_level(reader, 512, 128) == 2 and tile_level(reader, 512, 129) == 1 and tile_level(reader, 64, 128) == 0
        )
    level2 = pyramid(drawn.rgb, 2)[2].astype(np.float32)
    tiles = [
        {"uri": str(path), "x": 256, "y": 128, "footprint_px": 512, "reader": "tiffslide"},
        {"uri": str(path), "x": 512, "y": 256, "footprint_px": 512},
        {"uri": str(path.with_name("gone.tif")), "x": 0, "y": 0, "footprint_px": 512},
    ]
    first, second, gone = tile_thumbnails(tiles, max_px=128)
    assert np.abs(pixels(first) - level2[32:160, 64:192]).mean() < 6
    assert np.abs(pixels(second) - level2[64:192, 128:256]).mean() < 6
    assert gone.src is None and gone.reason.startswith("slide not readable") and "not found" in gone.reason


def test_a_slide_thumbnail_is_the_whole_slide(slide, tmp_path):
    path, drawn = slide
    whole = pixels(slide_thumbnail(str(path), "tiffslide", None, max_px=128))
    assert whole.shape == (96, 128, 3)
    expected = Image.fromarray(pyramid(drawn.rgb, 2)[2])
    expected.thumbnail((128, 128), Image.Resampling.LANCZOS)
    assert np.abs(whole - np.asarray(expected, np.float32)).mean() < 6
    (tmp_path / "bad.svs").write_bytes(b"II*\x00 not really")
    assert slide_thumbnail(str(tmp_path / "bad.svs"), None, None).reason.startswith("slide not readable")
