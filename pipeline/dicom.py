"""DICOM whole-slide images: one slide is one series, stored as several `.dcm` instances (one per pyramid level,
plus label and overview images) in one folder.

What a DICOM slide is to the rest of the pipeline:
- its `uri` is its level-0 instance (the VOLUME instance with the most pixels; the first by name among equals): the
  file OpenSlide is handed, stable across runs while the series' files stay;
- its `size` is the sum of its instances' sizes, its `mtime` the newest of theirs, its `etag` a hash of theirs (null
  unless every instance has one), so that `--incremental` sees a change to any instance;
- instances are grouped by folder and SeriesInstanceUID, read from their headers (never from file names); an instance
  whose header cannot be read stays a listing row of its own, and opening it gives the reason.

Opening a DICOM slide (`check_series`, then OpenSlide for local files or `WsiDicomHandle` through fsspec) first checks
that its series is whole and consistent: a whole-slide image (VL Whole Slide Microscopy SOP class), with a pyramid
level, levels that image the same area, no instance twice, and no instance cut short. Otherwise a ValueError with
the reason, which the planner records as the slide's error row.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UserError, first_line
from .sources import LISTING_SCHEMA
from .storage import _options_key, filesystem, is_remote, local_path, with_retries

DICOM_SUFFIXES = frozenset({".dcm"})
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
REMOTE_BLOCK_BYTES = 1 << 18  # a header, an offset table or a few frames per ranged read, never a whole instance
HEADER_THREADS = 16
IMAGED_SIZE_TOLERANCE = 0.01  # levels of one pyramid image the same area, up to rounding to whole pixels

_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000): an item of encapsulated pixel data
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD): the end of encapsulated pixel data


def is_dicom(uri: str) -> bool:
    return os.path.splitext(uri.rstrip("/"))[1].lower() in DICOM_SUFFIXES


def folder_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


# -- headers --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """What the pipeline needs from one instance's header; `error` says why it could not be read."""

    uri: str
    size: int = 0
    mtime: float | None = None
    etag: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None
    sop_class: str | None = None
    flavor: str | None = None  # ImageType's third value: VOLUME, LABEL, OVERVIEW or THUMBNAIL
    width: int = 0  # TotalPixelMatrixColumns
    height: int = 0
    spacing_mm: tuple[float, float] | None = None  # PixelSpacing: (between rows, between columns)
    frame_of_reference: str | None = None
    truncated: str | None = None  # why the pixel data is cut short, when it is
    error: str | None = None

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(uri: str, storage_options: dict | None):
    if not is_remote(uri):
        return open(local_path(uri), "rb")
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.open(path, "rb", block_size=REMOTE_BLOCK_BYTES, cache_type="readahead"))


def _pixel_spacing(ds) -> tuple[float, float] | None:
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        spacing = ds.get("PixelSpacing")
        return (float(spacing[0]), float(spacing[1])) if spacing else None


def read_header(
    uri: str, storage_options: dict | None = None, source: tuple = (0, None, None), check_pixels: bool = False
) -> Header:
    """The header of one instance (pydicom reads up to the pixel data, never the pixels). `source` is the listing's
    (size, mtime, etag); `check_pixels` also checks that the pixel data is whole (a few small reads). Never raises:
    a file that is not DICOM gives a Header with `error`."""
    try:
        import pydicom
    except ImportError:
        raise UserError("DICOM slides need pydicom and wsidicom: pip install 'pipeline-featurize[dicom]'") from None
    size, mtime, etag = source
    try:
        with _open(uri, storage_options) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            pixel_start = f.tell()
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            truncated = _truncation(f, ds, pixel_start, size or _size(f)) if check_pixels else None
    except Exception as exc:  # pydicom, fsspec and the OS each raise their own types for a file that is not DICOM
        return Header(uri, size, mtime, etag, error=f"not a readable DICOM file ({first_line(exc)})")
    return Header(
        uri,
        size,
        mtime,
        etag,
        series_uid=str(ds.get("SeriesInstanceUID", "")) or None,
        instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
        sop_class=str(ds.get("SOPClassUID", "")) or None,
        flavor=image_type[2] if len(image_type) > 2 else None,
        width=int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0),
        height=int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0),
        spacing_mm=_pixel_spacing(ds),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")) or None,
        truncated=truncated,
    )


def _size(f) -> int:
    f.seek(0, os.SEEK_END)
    return f.tell()


def _truncation(f, ds, start: int, size: int) -> str | None:
    """Why the pixel data (starting at byte `start`) does not fit in the file's `size` bytes, or None when it does.
    Native pixel data: its length; encapsulated: the file ends with the sequence's end marker, or else the items from
    the last frame's offset (Basic or Extended Offset Table, else the first item) are walked to say where it stops."""
    if start >= size:
        return "it ends before its pixel data"
    f.seek(start)
    head = f.read(12)
    if len(head) < 8:
        return "it ends inside its pixel data header"
    explicit = head[4:6] in (b"OB", b"OW")
    length = struct.unpack("<I", head[8:12] if explicit else head[4:8])[0]
    first = start + (12 if explicit else 8)
    if length != 0xFFFFFFFF:  # native pixel data of a fixed length
        return None if first + length <= size else f"its pixel data needs {first + length} bytes, the file has {size}"
    f.seek(size - 8)
    if f.read(8) == _SEQUENCE_END + bytes(4):  # whole: the usual case needs one read, a broken file the walk below
        return None
    f.seek(first)
    tag, table_length = _item_header(f.read(8))
    if tag != _ITEM:
        return "its encapsulated pixel data has no offset table"
    offsets = np.frombuffer(f.read(table_length), "<u4") if table_length else np.zeros(0, "<u4")
    base = first + 8 + table_length
    extended = ds.get("ExtendedOffsetTable")
    last = int(offsets[-1]) if len(offsets) else int(np.frombuffer(extended, "<u8")[-1]) if extended else 0
    position = base + last
    while position + 8 <= size:
        f.seek(position)
        tag, item_length = _item_header(f.read(8))
        if tag == _SEQUENCE_END:
            return None
        if tag != _ITEM:
            return f"its pixel data has no item at byte {position} (a bad offset table?)"
        position += 8 + item_length
    return f"its pixel data runs past the end of the file ({size} bytes)"


def _item_header(raw: bytes) -> tuple[bytes, int]:
    return (raw[:4], struct.unpack("<I", raw[4:8])[0]) if len(raw) == 8 else (b"", 0)


def read_headers(
    rows: Iterable[tuple], storage_options: dict | None = None, check_pixels: bool = False
) -> list[Header]:
    """Headers of (uri, size, mtime, etag) rows, read in threads (each read waits on the disk or the store)."""
    rows = list(rows)
    if not rows:
        return []
    with ThreadPoolExecutor(min(HEADER_THREADS, len(rows)), thread_name_prefix="featurize-dicom") as pool:
        return list(pool.map(lambda r: read_header(r[0], storage_options, tuple(r[1:4]), check_pixels), rows))


# -- series ---------------------------------------------------------------------------------------------------------
def group_series(headers: Iterable[Header]) -> list[list[Header]]:
    """Instances grouped into slides by folder and SeriesInstanceUID, each group sorted by uri; an instance whose
    header gave no series is a group of its own."""
    groups: dict[tuple, list[Header]] = defaultdict(list)
    for header in headers:
        key = (folder_of(header.uri), header.series_uid) if header.series_uid else ("", header.uri)
        groups[key].append(header)
    return [sorted(group, key=lambda h: h.uri) for _, group in sorted(groups.items())]


def representative(series: list[Header]) -> Header:
    """The instance a slide is opened by: the level-0 VOLUME instance (most pixels, then first by name)."""
    volumes = [h for h in series if h.flavor == "VOLUME"] or series
    return min(volumes, key=lambda h: (-h.pixels, h.uri))


def slide_row(series: list[Header]) -> tuple:
    """The listing row of one slide: (uri, size, mtime, etag) as the module docstring defines them."""
    mtimes = [h.mtime for h in series if h.mtime is not None]
    etags = [h.etag for h in series]
    etag = None
    if all(etags):
        etag = hashlib.sha256("\n".join(f"{h.name}:{h.etag}" for h in series).encode()).hexdigest()[:32]
    return (representative(series).uri, sum(int(h.size or 0) for h in series), max(mtimes, default=None), etag)


def series_problem(series: list[Header]) -> str | None:
    """Why a series is not one whole, consistent slide (one line), or None."""
    first = series[0]
    if first.error:
        return first.error
    where = f"DICOM series {first.series_uid} ({len(series)} instance(s) in {folder_of(first.uri)})"
    foreign = sorted({h.sop_class for h in series if h.sop_class != WSI_SOP_CLASS})
    if foreign:
        return f"{where} is not a whole-slide image (SOP class {', '.join(map(str, foreign))})"
    volumes = [h for h in series if h.flavor == "VOLUME"]
    if not volumes:
        kinds = ", ".join(sorted({str(h.flavor) for h in series}))
        return f"{where} is incomplete: it has no pyramid level (VOLUME instance), only {kinds}"
    seen: dict[str, str] = {}
    for h in series:
        if h.instance_uid in seen:
            twice = f"{seen[h.instance_uid]}, {h.name}"
            return f"{where} is inconsistent: instance {h.instance_uid} is stored twice ({twice})"
        seen[h.instance_uid] = h.name
    if len({h.frame_of_reference for h in volumes}) > 1:
        return f"{where} is inconsistent: its pyramid levels have different frames of reference"
    return _geometry_problem(where, volumes) or next(
        (f"{where} is incomplete: instance {h.name} is truncated ({h.truncated})" for h in series if h.truncated), None
    )


def _geometry_problem(where: str, volumes: list[Header]) -> str | None:
    """Levels of one pyramid cover the same area: columns x spacing agree (to rounding) across levels."""
    unspaced = [h.name for h in volumes if not h.spacing_mm]
    if unspaced:
        return f"{where} has no pixel spacing in level instance {unspaced[0]}; pass --slide-mpp with its level-0 um/px"
    base = representative(volumes)
    base_width, base_height = base.width * base.spacing_mm[1], base.height * base.spacing_mm[0]
    for h in volumes:
        width, height = h.width * h.spacing_mm[1], h.height * h.spacing_mm[0]
        slack = IMAGED_SIZE_TOLERANCE + max(h.spacing_mm) / max(min(width, height), 1e-9)
        if abs(width - base_width) > slack * base_width or abs(height - base_height) > slack * base_height:
            return (
                f"{where} is inconsistent: level instance {h.name} images {width:.4g} x {height:.4g} mm but level 0 "
                f"({base.name}) images {base_width:.4g} x {base_height:.4g} mm"
            )
    return None


# -- the listing ----------------------------------------------------------------------------------------------------
def group_listing(table: pa.Table, storage_options: dict | None = None) -> pa.Table:
    """A listing (LISTING_SCHEMA) with its `.dcm` instances replaced by one row per slide (series); other rows as
    they were. Reads each instance's header once (threads)."""
    dicom = np.array([is_dicom(u) for u in table.column("uri").to_pylist()], dtype=bool)
    if not dicom.any():
        return table
    instances = table.filter(pa.array(dicom))
    rows = zip(*(instances.column(c).to_pylist() for c in ("uri", "size", "mtime", "etag")))
    slides = [slide_row(series) for series in group_series(read_headers(rows, storage_options))]
    grouped = pa.Table.from_arrays(
        [pa.array(list(column), type=f.type) for column, f in zip(zip(*slides), LISTING_SCHEMA)], schema=LISTING_SCHEMA
    )
    return pa.concat_tables([table.filter(pa.array(~dicom)).cast(LISTING_SCHEMA), grouped])


# -- opening (in the worker that reads the slide) -------------------------------------------------------------------
_FOLDERS: OrderedDict = OrderedDict()  # (folder, files, options) -> checked headers, per process
_FOLDERS_LOCK = threading.Lock()
MAX_FOLDERS = 16


def _folder_rows(folder: str, storage_options: dict | None) -> list[tuple]:
    """(uri, size, mtime, etag) of the `.dcm` files directly in a folder."""
    if not is_remote(folder):
        path = local_path(folder)
        with os.scandir(path) as entries:
            found = [e for e in entries if e.is_file() and is_dicom(e.name) and not e.name.startswith(".")]
        return sorted((os.path.join(path, e.name), e.stat().st_size, e.stat().st_mtime, None) for e in found)
    fs, path = filesystem(folder, storage_options)
    protocol = folder.split("://", 1)[0]
    entries = with_retries(lambda: fs.ls(path, detail=True))
    return sorted(
        (f"{protocol}://{e['name']}", int(e.get("size") or 0), None, None)
        for e in entries
        if e.get("type", "file") == "file" and is_dicom(e["name"])
    )


def series_of(uri: str, storage_options: dict | None = None) -> list[Header]:
    """The instances (pixel data checked) of the series `uri` belongs to, from the headers of its folder (kept per
    process while the folder's files are the same)."""
    folder = folder_of(uri)
    rows = _folder_rows(folder, storage_options)
    key = (folder, tuple(rows), _options_key(storage_options))
    with _FOLDERS_LOCK:
        headers = _FOLDERS.get(key)
    if headers is None:
        headers = read_headers(rows, storage_options, check_pixels=True)
        with _FOLDERS_LOCK:
            _FOLDERS[key] = headers
            while len(_FOLDERS) > MAX_FOLDERS:
                _FOLDERS.popitem(last=False)
    own = next((h for h in headers if h.uri.rstrip("/") == uri.rstrip("/")), None)
    if own is None:
        raise FileNotFoundError(uri)
    if own.series_uid is None:
        return [own]
    return [h for h in headers if h.series_uid == own.series_uid and not h.error]


def check_series(uri: str, storage_options: dict | None = None) -> list[Header]:
    """The slide's instances when its series is whole and consistent; else ValueError with the reason."""
    series = series_of(uri, storage_options)
    problem = series_problem(series)
    if problem:
        raise ValueError(problem)
    return series


# OpenSlide's property for the level-0 pixel spacing in mm (row spacing first, then column): both readers expose it.
PIXEL_SPACING_X = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]"


class WsiDicomHandle:
    """A DICOM series read with wsidicom through fsspec (offset tables and the frames a region needs, by ranged reads;
    never whole instances), behind the part of openslide's API that `slides.SlideReader` uses."""

    def __init__(self, series: list[Header], storage_options: dict | None = None):
        from wsidicom import WsiDicom

        options = dict(storage_options or {})
        if series[0].uri.startswith(("s3://", "s3a://")):  # s3fs reads 50 MB blocks unless told: ranged reads instead
            options.setdefault("default_block_size", REMOTE_BLOCK_BYTES)
        self.wsi = WsiDicom.open([h.uri for h in series], file_options=options)
        levels = list(self.wsi.levels)
        self.dimensions = (levels[0].size.width, levels[0].size.height)
        self.level_dimensions = [(level.size.width, level.size.height) for level in levels]
        width, height = self.dimensions
        # as openslide computes a level's downsample: the mean of its two dimensions' ratios
        self.level_downsamples = [(width / w + height / h) / 2 for w, h in self.level_dimensions]
        self._pyramid_levels = [level.level for level in levels]
        base = representative([h for h in series if h.flavor == "VOLUME"])
        self.properties = {"dicom.SeriesInstanceUID": base.series_uid, PIXEL_SPACING_X: repr(base.spacing_mm[1])}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """openslide's read_region: RGBA, (x, y) in level-0 pixels, transparent outside the level."""
        from PIL import Image

        width, height = size
        if width < 0 or height < 0:
            raise ValueError(f"negative width ({width}) or negative height ({height}) not allowed")
        rgba = np.zeros((height, width, 4), np.uint8)
        if not (0 <= level < len(self.level_dimensions)) or not (width and height):
            return Image.fromarray(rgba, "RGBA")
        downsample = self.level_downsamples[level]
        x, y = int(location[0] // downsample), int(location[1] // downsample)
        level_width, level_height = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_width), min(y + height, level_height)
        if x0 < x1 and y0 < y1:
            pixels = self.wsi.read_region((x0, y0), self._pyramid_levels[level], (x1 - x0, y1 - y0), as_array=True)
            rgba[y0 - y : y1 - y, x0 - x : x1 - x, :3] = np.asarray(pixels)[..., :3]
            rgba[y0 - y : y1 - y, x0 - x : x1 - x, 3] = 255
        return Image.fromarray(rgba, "RGBA")

    def close(self) -> None:
        self.wsi.close()


def group_listing_files(files: list[str], storage_options: dict | None = None) -> tuple[list[str], int]:
    """A run's listing chunks (local Parquet files) with their `.dcm` instances replaced by one row per slide, written
    as one more chunk beside them: (the chunk files, rows listed). Chunks without instances are left as they are."""
    import pyarrow.parquet as pq

    kept, instances, rows = [], [], 0
    for path in files:
        table = pq.read_table(path)
        dicom = pa.array([is_dicom(u) for u in table.column("uri").to_pylist()], pa.bool_())
        if table.num_rows and pc.any(dicom).as_py():
            instances.append(table.filter(dicom))
            table = table.filter(pc.invert(dicom))
            pq.write_table(table, path, compression="zstd")
        kept.append(path)
        rows += table.num_rows
    if not instances:
        return files, rows
    listed = pa.concat_tables(instances)
    _, first = np.unique(np.asarray(listed.column("uri").to_pylist(), dtype=object), return_index=True)
    slides = group_listing(listed.take(pa.array(np.sort(first))), storage_options)
    path = os.path.join(os.path.dirname(files[0]), "listing-dicom.parquet")
    pq.write_table(slides, path, compression="zstd")
    return [*kept, path], rows + slides.num_rows
