"""Whole-slide images: readers, microns per pixel, tissue mask, tile grid, and the tile-reading CPU stage.

Pure functions over numbers and arrays, plus two entry points the driver runs in Ray tasks:
- `plan_slide(uri, ...)`: open a slide, resolve its microns per pixel, find tissue on a low-resolution level and lay
  the tile grid over it. Any failure becomes a slide row with status "error" and a reason, never an exception.
- `read_tiles(batch, ...)`: a Ray Data batch function that reads each tile region from the best pyramid level and
  resizes it to the model input exactly as `decode.resize_for_model` would for an RGB image of that tile.

Coordinates `x`, `y` are level-0 pixels of a tile's top-left corner. A tile covers `footprint_px` level-0 pixels
on a side; it is read as `read_px` pixels at pyramid level `level` and resized to `tile_px` pixels at `target_mpp`
(the tile's own microns per pixel, `tile_mpp`, differs only by the footprint's rounding to whole pixels).
Slide handles are opened once per worker process (a small cache keyed by uri and reader) and never pickled.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import dicom
from .decode import PreprocessSpec, resize_for_model, to_rgb
from .errors import InputError, first_line, read_error_class
from .storage import _options_key, is_remote, is_transient, local_path

# Suffixes the readers handle: tiffslide reads the TIFF family (local or fsspec URLs); openslide (local) adds MRXS.
TIFF_SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
OPENSLIDE_ONLY_SUFFIXES = frozenset({".mrxs"})
# DICOM: one slide is a series of `.dcm` instances, listed as one row (dicom.group_listing); openslide reads it locally,
# wsidicom (a reader only `auto` picks) through fsspec.
SLIDE_SUFFIXES = TIFF_SLIDE_SUFFIXES | OPENSLIDE_ONLY_SUFFIXES | dicom.DICOM_SUFFIXES
READERS = ("auto", "tiffslide", "openslide", "wsidicom")

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


# -- readers --------------------------------------------------------------------------------------------------------
def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except Exception:  # ImportError, or the shared library failing to load
        return False
    return True


class SlideReader:
    """One open slide behind openslide's API (dimensions, levels, properties, `read_region`), whichever library
    reads; `read` gives a region as an RGB array. A context manager: `with open_slide(uri) as slide:` closes it.
    (Handles from `cached_slide` belong to the cache, which closes them: do not close those yourself.)"""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)
        self.level_dimensions = [tuple(int(v) for v in d) for d in handle.level_dimensions]
        self.level_downsamples = [float(d) for d in handle.level_downsamples]
        self.properties = {str(k): v for k, v in dict(handle.properties).items()}

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """The region whose top-left corner is level-0 pixel (x, y), `width` x `height` pixels at `level`,
        as HxWx3 uint8 RGB (openslide: transparent pixels on white; tiffslide: pixels outside the slide black)."""
        if self.name == "tiffslide":
            arr = np.asarray(
                self.handle.read_region((int(x), int(y)), int(level), (int(width), int(height)), as_array=True)
            )
            if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
                return arr
            return np.asarray(to_rgb(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)))
        return np.asarray(to_rgb(self.read_region((x, y), level, (width, height))))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """openslide's `read_region`: an RGBA PIL image of `size` (width, height) pixels at `level`, whose top-left
        corner is level-0 pixel `location` (x, y). Pixels outside the slide, and every pixel of a level the slide
        does not have, are transparent (0, 0, 0, 0); a negative size is an error. With tiffslide the pixels come
        from `read` (a source with alpha is composited on white) and the part inside the level is opaque."""
        x, y = (int(v) for v in location)
        width, height = (int(v) for v in size)
        level = int(level)
        if self.name != "tiffslide":
            return self.handle.read_region((x, y), level, (width, height))  # openslide's own (not premultiplied)
        if width < 0 or height < 0:
            raise ValueError(f"negative width ({width}) or negative height ({height}) not allowed")
        rgba = np.zeros((height, width, 4), dtype=np.uint8)
        if not (width and height and 0 <= level < self.level_count):
            return Image.fromarray(rgba, "RGBA")
        # tiffslide places the region at its own level coordinates and pads what lies outside the level with
        # zeros: the part inside the level is opaque, the rest stays (0, 0, 0, 0).
        transform = getattr(self.handle, "_read_region_loc_transform", None)
        ds = self.level_downsamples[level]
        x0, y0 = transform((x, y), level) if transform is not None else (int(x / ds), int(y / ds))
        lw, lh = self.level_dimensions[level]
        rows = slice(min(max(-y0, 0), height), min(max(lh - y0, 0), height))
        cols = slice(min(max(-x0, 0), width), min(max(lw - x0, 0), width))
        if rows.start < rows.stop and cols.start < cols.stop:  # nothing to read for a region wholly outside
            rgba[rows, cols, :3] = self.read(x, y, level, width, height)[rows, cols]
            rgba[rows, cols, 3] = 255
        return Image.fromarray(rgba, "RGBA")

    def close(self) -> None:
        try:
            self.handle.close()
        except Exception:
            pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError(
            "a slide handle belongs to the process that opened it; pass the uri and open it there (slides.cached_slide)"
        )


def _open_tiffslide(uri: str, storage_options: dict | None) -> SlideReader:
    from tiffslide import TiffSlide

    if is_remote(uri):
        handle = TiffSlide(uri, storage_options=storage_options or {})
    else:
        handle = TiffSlide(local_path(uri))
    reader = SlideReader(handle, "tiffslide")
    _check_not_truncated(handle)
    return reader


def _check_not_truncated(handle) -> None:
    """A cut-off TIFF often opens fine and fails (or reads zeros) tile by tile later: compare its data to its size."""
    tf = handle.ts_tifffile
    size = tf.filehandle.size
    for page in tf.pages:
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            raise ValueError(f"file is truncated: page {page.index} needs {max(ends)} bytes but the file has {size}")


def _open_openslide(uri: str) -> SlideReader:
    if is_remote(uri):
        raise ValueError("openslide reads local files only; use reader tiffslide for object storage")
    import openslide

    return SlideReader(openslide.OpenSlide(local_path(uri)), "openslide")


def open_slide(uri: str, reader: str = "auto", storage_options: dict | None = None) -> SlideReader:
    """Open with the named reader. auto: tiffslide for the TIFF family (local or remote), openslide for what only
    it reads, and openslide as a fallback for local files tiffslide cannot read. Raises ValueError with a reason."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; expected one of {', '.join(READERS)}")
    if dicom.is_dicom(uri):
        return _open_dicom(uri, reader, storage_options)
    suffix = os.path.splitext(uri.rstrip("/"))[1].lower()
    attempts = (
        [reader]
        if reader != "auto"
        else (
            ["openslide"]
            if suffix in OPENSLIDE_ONLY_SUFFIXES
            else ["tiffslide"] + (["openslide"] if not is_remote(uri) and openslide_available() else [])
        )
    )
    if not is_remote(uri) and not os.path.exists(local_path(uri)):
        raise ValueError("file not found")
    reasons = []
    for name in attempts:
        try:
            if name == "openslide" and not openslide_available():
                raise ValueError("openslide is not installed (pip install openslide-python openslide-bin)")
            return _open_tiffslide(uri, storage_options) if name == "tiffslide" else _open_openslide(uri)
        except FileNotFoundError:
            raise InputError("file not found", "missing") from None
        except Exception as exc:  # every library raises its own types for unreadable files
            reasons.append(f"{name}: {first_line(exc)}")
    raise ValueError("unsupported or unreadable slide (" + "; ".join(reasons) + ")")


def _open_dicom(uri: str, reader: str, storage_options: dict | None) -> SlideReader:
    """A DICOM series, checked whole first: openslide for local files, wsidicom (ranged reads) for fsspec URLs."""
    name = reader if reader != "auto" else "wsidicom" if is_remote(uri) else "openslide"
    if name == "tiffslide":
        raise ValueError("tiffslide does not read DICOM; use reader auto (openslide locally, wsidicom remotely)")
    if name == "openslide" and is_remote(uri):
        raise ValueError(
            "openslide reads local files only: copy the series folder to a local disk, or use reader auto "
            "(wsidicom reads DICOM from object storage)"
        )
    try:
        series = dicom.check_series(uri, storage_options)
    except FileNotFoundError:
        raise InputError("file not found", "missing") from None
    if name == "wsidicom":
        return SlideReader(dicom.WsiDicomHandle(series, storage_options), "wsidicom")
    if not openslide_available():
        raise ValueError("openslide is not installed (pip install openslide-python openslide-bin)")
    return _open_openslide(uri)


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
_HANDLES: OrderedDict = OrderedDict()  # (uri, reader, storage options) -> SlideReader, per worker process
MAX_OPEN_SLIDES = 8


def cached_slide(uri: str, reader: str, storage_options: dict | None) -> SlideReader:
    """This process's open handle for the slide (opened on first use, least recently used closed first)."""
    key = (uri, reader, _options_key(storage_options))
    slide = _HANDLES.get(key)
    if slide is None:
        slide = open_slide(uri, reader, storage_options)
        _HANDLES[key] = slide
        while len(_HANDLES) > MAX_OPEN_SLIDES:
            _HANDLES.popitem(last=False)[1].close()
    else:
        _HANDLES.move_to_end(key)
    return slide


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
