"""Small inline thumbnails (data: URIs) of inputs, for pages that must open offline (`featurize report`, the search
gallery): an image read and decoded as a run decodes it (EXIF orientation applied, the decompression-bomb limit
checked from the header first), or a tile cropped from its slide at the tile's level-0 x, y and footprint, read from
the coarsest pyramid level that still gives the thumbnail's size. An input that cannot be read any more gives a
`Thumbnail` with the reason instead of pixels, never an exception.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageFile

from .config import RunConfig
from .decode import open_image
from .errors import first_line
from .slide_readers import SlideReader, open_slide
from .storage import read_bytes

THUMB_PX = 128  # the longer side of a thumbnail
MAX_THUMB_PX = 1024  # the most any caller may ask for: a page of thumbnails stays small
JPEG_QUALITY = 80
MAX_SLIDE_LEVEL_PIXELS = 64 * 2**20  # a slide without a small pyramid level is not read whole for a thumbnail
MAX_PIXELS = RunConfig.model_fields["max_image_pixels"].default  # the runs' decompression-bomb limit


@dataclass(frozen=True)
class Thumbnail:
    """An inline JPEG (`src`, a data: URI), or why there is none (`reason`)."""

    src: str | None = None
    reason: str | None = None


def _side(max_px: int) -> int:
    if not 1 <= int(max_px) <= MAX_THUMB_PX:
        raise ValueError(f"a thumbnail's side must be 1 to {MAX_THUMB_PX} pixels, not {max_px}")
    return int(max_px)


def data_uri(image: Image.Image, max_px: int = THUMB_PX, quality: int = JPEG_QUALITY) -> str:
    """`image` shrunk to at most `max_px` a side (never enlarged), as a base64 JPEG data: URI."""
    image = image.convert("RGB")
    image.thumbnail((_side(max_px), _side(max_px)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_TRUNCATED = threading.Lock()


@contextmanager
def _truncated_images_allowed():
    """PIL decodes what a truncated file holds while inside (its switch is process-wide; pipeline.decode keeps it off
    for runs, and the lock keeps two thumbnailers from racing on it)."""
    with _TRUNCATED:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found (moved or deleted since the run?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return first_line(exc, 200) or type(exc).__name__


def image_thumbnail(
    uri: str, storage_options: dict | None = None, max_px: int = THUMB_PX, partial: bool = False
) -> Thumbnail:
    """An image file's thumbnail; `partial` also shows what a truncated file holds (for error rows)."""
    side = _side(max_px)
    try:
        data = read_bytes(uri, storage_options)
        if partial:
            with _truncated_images_allowed():
                image = open_image(data, MAX_PIXELS, draft_px=2 * side)
        else:
            image = open_image(data, MAX_PIXELS, draft_px=2 * side)
        return Thumbnail(src=data_uri(image, side))
    except Exception as exc:  # a moved, unreadable or undecodable file: the page shows the reason instead
        return Thumbnail(reason=_reason(exc))


def tile_level(slide: SlideReader, footprint_px: int, max_px: int) -> int:
    """The coarsest pyramid level at which the tile is still at least `max_px` wide (level 0 if none is)."""
    fits = [i for i, ds in enumerate(slide.level_downsamples) if footprint_px / ds >= max_px]
    return max(fits, key=lambda i: slide.level_downsamples[i]) if fits else 0


def tile_image(slide: SlideReader, x: int, y: int, footprint_px: int, max_px: int = THUMB_PX) -> Image.Image:
    """The tile whose top-left corner is level-0 pixel (x, y), `footprint_px` level-0 pixels a side, read at the
    coarsest level that gives `max_px` pixels."""
    level = tile_level(slide, footprint_px, max_px)
    side = max(1, math.ceil(footprint_px / slide.level_downsamples[level]))
    return Image.fromarray(slide.read(int(x), int(y), level, side, side))


def tile_thumbnails(
    tiles: Iterable[dict], storage_options: dict | None = None, max_px: int = THUMB_PX
) -> list[Thumbnail]:
    """One thumbnail per tile (dicts with uri, x, y, footprint_px and optionally reader), each slide opened once."""
    side = _side(max_px)
    tiles = list(tiles)
    opened: dict[tuple[str, str], SlideReader | Exception] = {}
    out = []
    try:
        for tile in tiles:
            key = (tile["uri"], tile.get("reader") or "auto")
            if key not in opened:
                try:
                    opened[key] = open_slide(key[0], key[1], storage_options)
                except Exception as exc:  # a slide gone or unreadable: every tile of it gets the reason
                    opened[key] = exc
            slide = opened[key]
            if isinstance(slide, Exception):
                out.append(Thumbnail(reason=f"slide not readable: {_reason(slide)}"))
                continue
            try:
                footprint = int(tile["footprint_px"])
                out.append(Thumbnail(src=data_uri(tile_image(slide, tile["x"], tile["y"], footprint, side), side)))
            except Exception as exc:
                out.append(Thumbnail(reason=f"tile not readable: {_reason(exc)}"))
    finally:
        for slide in opened.values():
            if isinstance(slide, SlideReader):
                slide.close()
    return out


def row_thumbnails(
    rows: list[dict],
    slides: list[dict] | None,
    storage_options: dict | None = None,
    max_px: int = THUMB_PX,
    partial: bool = False,
) -> list[Thumbnail]:
    """One thumbnail per row of an OUTPUT: for image rows (`slides` None) the file (`partial`: also what a truncated
    file holds); for tile rows the tile cropped from its slide, whose footprint and reader come from `slides` (the
    read version's rows of _slides.parquet), a reason where the slide has none."""
    if slides is None:
        return [image_thumbnail(r["uri"], storage_options, max_px, partial) for r in rows]
    known = {s["uri"]: s for s in slides}
    placed = [i for i, r in enumerate(rows) if known.get(r["uri"], {}).get("footprint_px") is not None]
    tiles = [{**rows[i], **{k: known[rows[i]["uri"]][k] for k in ("footprint_px", "reader")}} for i in placed]
    out = [Thumbnail(reason="its slide has no tile geometry in _slides.parquet")] * len(rows)
    for i, thumbnail in zip(placed, tile_thumbnails(tiles, storage_options, max_px)):
        out[i] = thumbnail
    return out


def slide_thumbnail(uri: str, reader: str | None, storage_options: dict | None, max_px: int = THUMB_PX) -> Thumbnail:
    """The whole slide, from the coarsest level that is still `max_px` on its longer side."""
    side = _side(max_px)
    try:
        with open_slide(uri, reader or "auto", storage_options) as slide:
            width, height = slide.dimensions
            footprint = max(width, height)
            level = tile_level(slide, footprint, side)
            w, h = slide.level_dimensions[level]
            if w * h > MAX_SLIDE_LEVEL_PIXELS:
                return Thumbnail(reason=f"no pyramid level small enough for a thumbnail (the smallest is {w}x{h})")
            return Thumbnail(src=data_uri(Image.fromarray(slide.read(0, 0, level, w, h)), side))
    except Exception as exc:
        return Thumbnail(reason=f"slide not readable: {_reason(exc)}")
