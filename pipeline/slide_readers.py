"""Whole-slide readers behind openslide's API, whichever library reads: tiffslide (the TIFF family, local or through
fsspec), openslide (local; also MRXS and DICOM series), wsidicom (DICOM series on object storage). Handles are opened
once per worker process (a small cache keyed by uri, reader and storage options) and never pickled."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
from PIL import Image

from . import dicom
from .decode import to_rgb
from .errors import InputError, first_line
from .storage import _options_key, is_remote, local_path

# Suffixes the readers handle: tiffslide reads the TIFF family (local or fsspec URLs); openslide (local) adds MRXS.
TIFF_SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
OPENSLIDE_ONLY_SUFFIXES = frozenset({".mrxs"})
# DICOM: one slide is a series of `.dcm` instances, listed as one row (dicom.group_listing); openslide reads it locally,
# wsidicom (a reader only `auto` picks) through fsspec.
SLIDE_SUFFIXES = TIFF_SLIDE_SUFFIXES | OPENSLIDE_ONLY_SUFFIXES | dicom.DICOM_SUFFIXES
READERS = ("auto", "tiffslide", "openslide", "wsidicom")


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
