"""Whole-slide images: microns per pixel, tissue mask, tile grid, and the tile-reading CPU stage (the readers are in
slide_readers.py; `open_slide` and `SlideReader` are importable from here too).

Pure functions over numbers and arrays, plus two entry points the driver runs in Ray tasks:
- `plan_slide(uri, ...)`: open a slide, resolve its microns per pixel, find tissue on a low-resolution level and lay
  the tile grid over it. Any failure becomes a slide row with status "error" and a reason, never an exception.
- `read_tiles(batch, ...)`: a Ray Data batch function that reads each tile region from the best pyramid level and
  resizes it to the model input exactly as `decode.resize_for_model` would for an RGB image of that tile.

Coordinates `x`, `y` are level-0 pixels of a tile's top-left corner. A tile covers `footprint_px` level-0 pixels
on a side; it is read as `read_px` pixels at pyramid level `level` and resized to `tile_px` pixels at `target_mpp`
(the tile's own microns per pixel, `tile_mpp`, differs only by the footprint's rounding to whole pixels).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import dicom
from .decode import PreprocessSpec, resize_for_model
from .errors import InputError, first_line, read_error_class
from .slide_readers import READERS, SLIDE_SUFFIXES, SlideReader, cached_slide, open_slide  # noqa: F401 (the API)
from .storage import is_transient

MIN_MASK_TILE_PX = 8  # the tissue mask level keeps at least this many mask pixels across a tile
MAX_MASK_PIXELS = 1 << 26  # never read a mask level larger than this (64 Mpx, ~200 MB of RGB)
MIN_TISSUE_SATURATION = 20  # an Otsu threshold below this is noise on a blank slide, not tissue
MAX_UPSAMPLING = 1.1  # a slide may be at most this much coarser than target_mpp


@dataclass(frozen=True)
class Tiling:
    """How tiles are cut: at `target_mpp` microns per pixel, `tile_px` pixels a side, `overlap_px` pixels (at
    target_mpp) shared with each neighbour, kept when at least `min_tissue` (a fraction) of the tile is tissue."""

    target_mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.25

    def __post_init__(self):
        if (
            not self.target_mpp > 0
            or self.tile_px < 1
            or not 0 <= self.overlap_px < self.tile_px
            or not 0 <= self.min_tissue <= 1
        ):
            raise ValueError(
                f"invalid tiling {self}: need target_mpp > 0, tile_px >= 1, "
                "0 <= overlap_px < tile_px, 0 <= min_tissue <= 1"
            )


# -- microns per pixel ----------------------------------------------------------------------------------------------
def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_resolution(properties: dict) -> float | None:
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    if unit not in ("centimeter", "centimetre", "3"):
        return None  # inch resolutions are display DPI in practice, not the scanner's pixel size
    resolution = _positive(properties.get("tiff.XResolution"))
    return 10_000.0 / resolution if resolution else None


def _mpp_from_dicom(properties: dict) -> float | None:
    spacing_mm = _positive(properties.get(dicom.PIXEL_SPACING_X))
    return spacing_mm * 1000.0 if spacing_mm else None


def resolve_mpp(properties: dict, slide_mpp: float | None = None) -> tuple[float | None, str | None]:
    """(microns per level-0 pixel, where it came from).

    `slide_mpp` (the user's override) wins; then the reader's own property (`openslide.mpp-x` /
    `tiffslide.mpp-x`), then the Aperio description's `MPP`, the DICOM pixel spacing, then the TIFF resolution tags
    in centimetres. The source names the metadata the value comes from: `aperio.MPP`, `dicom.PixelSpacing` or
    `tiff.XResolution` when the reader's property is one of those, the reader's property name when it has a source
    of its own (a vendor's XML, say).
    (None, None) when nothing gives a usable value.
    """
    if slide_mpp is not None:
        value = _positive(slide_mpp)
        if value is None:
            raise ValueError(f"slide_mpp must be a positive number, got {slide_mpp!r}")
        return value, "slide_mpp"
    named = [
        ("aperio.MPP", _positive(properties.get("aperio.MPP"))),
        ("dicom.PixelSpacing", _mpp_from_dicom(properties)),
        ("tiff.XResolution", _mpp_from_resolution(properties)),
    ]
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = _positive(properties.get(key))
        if value is not None:
            for source, candidate in named:
                if candidate is not None and math.isclose(candidate, value, rel_tol=1e-6):
                    return value, source
            return value, key
    for source, candidate in named:
        if candidate is not None:
            return candidate, source
    return None, None


# -- tissue ---------------------------------------------------------------------------------------------------------
def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an HxWx3 uint8 image, 0..255 (as PIL's HSV conversion computes it)."""
    arr = rgb.astype(np.int32)
    hi, lo = arr.max(axis=2), arr.min(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(hi > 0, (hi - lo) * 255 // np.maximum(hi, 1), 0)
    return s.astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of (<= t, > t)."""
    hist = np.bincount(values.reshape(-1), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def tissue_mask(rgb: np.ndarray, min_saturation: int = MIN_TISSUE_SATURATION) -> np.ndarray:
    """Tissue where saturation exceeds its Otsu threshold (never below `min_saturation`: glass and white
    background are unsaturated, stained tissue is not). Returns an HxW bool array."""
    s = saturation(rgb)
    return s > max(otsu_threshold(s), min_saturation)


def mask_level(level_dimensions, level_downsamples, footprint_px: float) -> int:
    """The coarsest level that still resolves a tile in MIN_MASK_TILE_PX pixels and is small enough to read."""
    candidates = [i for i, ds in enumerate(level_downsamples) if footprint_px / ds >= MIN_MASK_TILE_PX] or [0]
    small = [i for i in candidates if level_dimensions[i][0] * level_dimensions[i][1] <= MAX_MASK_PIXELS]
    if small:
        return max(small, key=lambda i: level_downsamples[i])
    fits = [i for i, (w, h) in enumerate(level_dimensions) if w * h <= MAX_MASK_PIXELS]
    if not fits:
        w, h = level_dimensions[-1]
        raise ValueError(
            f"no pyramid level small enough for a tissue mask (smallest is {w}x{h}); "
            "the slide needs a reduced-resolution level"
        )
    return min(fits, key=lambda i: level_downsamples[i])


def tissue_fractions(
    mask: np.ndarray, dimensions: tuple[int, int], xs: np.ndarray, ys: np.ndarray, footprint_px: int
) -> np.ndarray:
    """The fraction of tissue under each tile (level-0 corners xs, ys), measured on the mask with a summed-area
    table; the mask covers the whole slide at its own scale."""
    mh, mw = mask.shape
    w0, h0 = dimensions
    sx, sy = mw / w0, mh / h0
    sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x0 = np.clip(np.rint(xs * sx).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.rint(ys * sy).astype(np.int64), 0, mh - 1)
    x1 = np.clip(np.maximum(x0 + 1, np.rint((xs + footprint_px) * sx).astype(np.int64)), 1, mw)
    y1 = np.clip(np.maximum(y0 + 1, np.rint((ys + footprint_px) * sy).astype(np.int64)), 1, mh)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)


# -- tile grid ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGeometry:
    """One slide's tiles: read `read_px` pixels at `level` (downsample `downsample`), covering `footprint_px`
    level-0 pixels, every `step_px` level-0 pixels; `tile_mpp` is the tile's actual microns per pixel at tile_px."""

    level: int
    downsample: float
    read_px: int
    footprint_px: int
    step_px: int
    tile_mpp: float


def tile_geometry(slide_mpp: float, level_downsamples, tiling: Tiling) -> TileGeometry:
    """Read from the coarsest level that is not coarser than target_mpp; round the footprint to whole pixels
    of that level so every tile starts on a pixel of the level it is read from (both readers then agree)."""
    target_ds = tiling.target_mpp / slide_mpp
    if target_ds < 1 / MAX_UPSAMPLING:
        raise ValueError(
            f"level 0 is {slide_mpp:g} um/px, coarser than target_mpp {tiling.target_mpp:g} um/px; "
            "pass a larger --target-mpp (tiles are never upsampled)"
        )
    usable = [i for i, ds in enumerate(level_downsamples) if ds <= target_ds * (1 + 1e-3)] or [0]
    level = max(usable, key=lambda i: level_downsamples[i])
    ds = float(level_downsamples[level])
    whole = round(ds)
    ds_grid = float(whole) if whole >= 1 and abs(ds - whole) < 1e-2 else ds
    read_px = max(1, round(tiling.tile_px * target_ds / ds_grid))
    overlap_read = round(tiling.overlap_px * read_px / tiling.tile_px)
    footprint = int(round(read_px * ds_grid))
    step = int(round((read_px - overlap_read) * ds_grid))
    if step < 1:
        raise ValueError(f"overlap_px {tiling.overlap_px} leaves no step between tiles at {tiling.tile_px} px")
    return TileGeometry(level, ds, read_px, footprint, step, footprint * slide_mpp / tiling.tile_px)


def tile_grid(
    dimensions: tuple[int, int], level_dimensions, geometry: TileGeometry, mask: np.ndarray, min_tissue: float
) -> dict[str, np.ndarray]:
    """Tiles lying wholly inside the slide (and inside the level they are read from) whose tissue fraction is at
    least `min_tissue` and above zero, in row-major order: {"x", "y", "tissue_fraction"}."""
    w0, h0 = dimensions
    fp = geometry.footprint_px
    xs = np.arange(0, w0 - fp + 1, geometry.step_px, dtype=np.int64)
    ys = np.arange(0, h0 - fp + 1, geometry.step_px, dtype=np.int64)
    lw, lh = level_dimensions[geometry.level]
    xs = xs[(xs / geometry.downsample).astype(np.int64) + geometry.read_px <= lw]
    ys = ys[(ys / geometry.downsample).astype(np.int64) + geometry.read_px <= lh]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    if not len(gx):
        return {"x": gx, "y": gy, "tissue_fraction": np.zeros(0, np.float32)}
    fraction = tissue_fractions(mask, dimensions, gx, gy, fp)
    keep = (fraction >= min_tissue) & (fraction > 0)
    return {"x": gx[keep], "y": gy[keep], "tissue_fraction": fraction[keep]}


# -- planning one slide (runs in a Ray task) ------------------------------------------------------------------------
def plan_slide(
    uri: str, tiling: Tiling, reader: str = "auto", slide_mpp: float | None = None, storage_options: dict | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Open one slide, resolve its level-0 microns per pixel, find its tissue and lay the grid: (slide row, tile
    columns).

    Never raises for a bad slide: the row then has status "error" and a reason, and no tiles.
    """
    t = time.perf_counter()
    row = {
        "uri": uri,
        "status": "ok",
        "error": None,
        "reader": None,
        "slide_mpp": None,
        "mpp_source": None,
        "width": None,
        "height": None,
        "level_count": None,
        "n_tiles": 0,
        "level": None,
        "read_px": None,
        "footprint_px": None,
        "step_px": None,
        "tile_mpp": None,
        "plan_s": 0.0,
    }
    empty = {"x": np.zeros(0, np.int64), "y": np.zeros(0, np.int64), "tissue_fraction": np.zeros(0, np.float32)}
    slide = None
    try:
        slide = open_slide(uri, reader, storage_options)
        row.update(
            reader=slide.name, width=slide.dimensions[0], height=slide.dimensions[1], level_count=slide.level_count
        )
        level0_mpp, source = resolve_mpp(slide.properties, slide_mpp)
        if level0_mpp is None:
            raise ValueError(
                "slide has no microns-per-pixel (mpp) metadata (no reader mpp property, Aperio MPP "
                "or centimetre resolution tags); pass --slide-mpp with its level-0 um/px"
            )
        row.update(slide_mpp=level0_mpp, mpp_source=source)
        geometry = tile_geometry(level0_mpp, slide.level_downsamples, tiling)
        row.update(
            level=geometry.level,
            read_px=geometry.read_px,
            footprint_px=geometry.footprint_px,
            step_px=geometry.step_px,
            tile_mpp=geometry.tile_mpp,
        )
        level = mask_level(slide.level_dimensions, slide.level_downsamples, geometry.footprint_px)
        lw, lh = slide.level_dimensions[level]
        mask = tissue_mask(slide.read(0, 0, level, lw, lh))
        tiles = tile_grid(slide.dimensions, slide.level_dimensions, geometry, mask, tiling.min_tissue)
        row["n_tiles"] = int(len(tiles["x"]))
    except Exception as exc:  # one bad slide must not stop the others
        row.update(status="error", error=_reason(exc), n_tiles=0)
        tiles = empty
    finally:
        if slide is not None:
            slide.close()
    row["plan_s"] = time.perf_counter() - t
    return row, tiles


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        return str(exc)[:1000]
    return first_line(exc)


# -- slide ids ------------------------------------------------------------------------------------------------------
def slide_ids(uris: list[str]) -> list[str]:
    """The file name without its extension (a DICOM series: its folder's name); the path relative to the slides'
    common folder (without extension, or with it if that still collides) for slides that share a name."""
    parts = [u.rstrip("/").split("/") for u in uris]
    stems = [
        p[-2] if dicom.is_dicom(u) and len(p) > 1 and p[-2] else os.path.splitext(p[-1])[0] for u, p in zip(uris, parts)
    ]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    if all(c == 1 for c in counts.values()):
        return stems
    common = 0
    dirs = [p[:-1] for p in parts]
    while all(len(d) > common for d in dirs) and len({d[common] for d in dirs}) == 1:
        common += 1
    rel = ["/".join(p[common:]) for p in parts]
    rel_stems = [os.path.splitext(r)[0] for r in rel]
    out = []
    for stem, r, rs in zip(stems, rel, rel_stems):
        if counts[stem] == 1:
            out.append(stem)
        else:
            out.append(rs if rel_stems.count(rs) == 1 else r)
    return out


# -- reading tiles (a Ray Data batch function) ----------------------------------------------------------------------
def tile_pixels(region: np.ndarray, tile_px: int, spec: PreprocessSpec) -> np.ndarray:
    """A region read at its pyramid level -> the tile at tile_px -> the model input, as the processor resizes."""
    img = Image.fromarray(region, "RGB")
    if img.size != (tile_px, tile_px):
        img = img.resize((tile_px, tile_px), resample=spec.resample)
    return resize_for_model(img, spec)


def read_tiles(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, tile_px: int, storage_options: dict | None = None
) -> dict[str, np.ndarray]:
    """Ray Data batch function: tile rows (uri, reader, x, y, level, read_px) -> the same rows plus `pixels`,
    `status` and `error`. A tile that cannot be read becomes an error row with a reason."""
    t = time.perf_counter()
    n = len(batch["uri"])
    pixels = np.zeros((n, *spec.out_shape), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    error_class = np.full(n, None, dtype=object)
    for i in range(n):
        try:
            slide = cached_slide(str(batch["uri"][i]), str(batch["reader"][i]), storage_options)
            size = int(batch["read_px"][i])
            region = slide.read(int(batch["x"][i]), int(batch["y"][i]), int(batch["level"][i]), size, size)
            pixels[i] = tile_pixels(region, tile_px, spec)
        except Exception as exc:  # a bad tile must not sink its batch
            status[i], error[i], error_class[i] = "error", f"cannot read tile: {_reason(exc)}", _tile_error_class(exc)
    out = dict(batch)
    out.update(
        pixels=pixels,
        status=status,
        error=error,
        error_class=error_class,
        decode_s=np.full(n, (time.perf_counter() - t) / max(n, 1)),
    )
    return out


def _tile_error_class(exc: BaseException) -> str:
    """Readers raise OSError for damaged files too, so only unambiguous environment faults leave the input class."""
    if isinstance(exc, (InputError, FileNotFoundError, PermissionError)) or is_transient(exc):
        return read_error_class(exc)
    return "corrupt"
