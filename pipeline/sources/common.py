"""What every input kind shares: the listing's schema and chunking, uris (ids, normalisation, globs taken
literally where a path exists), and a bounded thread pool for listings that wait on storage."""

from __future__ import annotations

import glob as globmod
import hashlib
import os
import posixpath
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..storage import filesystem, is_remote, local_path, with_retries

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic",
})  # fmt: skip
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])
# Listings stream in chunks of at most this many rows: the driver never holds a whole listing.
CHUNK_ROWS = 100_000
GLOB_CHARS = "*?["


def image_id(uri: str) -> str:
    """Stable id derived from the URI (96 bits of SHA-256)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def has_glob(path: str) -> bool:
    return any(ch in path for ch in GLOB_CHARS)


def suffix_of(name: str) -> str:
    return os.path.splitext(name.rstrip("/"))[1].lower()


def no_inputs(source: str, suffixes) -> UserError:
    return UserError(f"input {source} holds no images (looked for {', '.join(sorted(suffixes)[:6])}, ...)")


def epoch_seconds(column) -> pa.ChunkedArray:
    """A timestamp column as seconds since the epoch (float64), whatever its unit."""
    per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[column.type.unit]
    return pc.divide(pc.cast(column, pa.int64()).cast(pa.float64()), float(per_second))


def listing_table(rows: list[tuple]) -> pa.Table:
    """(uri, size, mtime, etag) tuples as a LISTING_SCHEMA table."""
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)], schema=LISTING_SCHEMA)


# -- what a path names --------------------------------------------------------------------------------------------
def literal(source: str, storage_options: dict | None = None) -> str | None:
    """What SOURCE names taken literally: "dir", "file", or None when nothing has that exact name. A name with glob
    characters that exists (a folder `scans [2024]`) is that folder, never a pattern."""
    if not is_remote(source):
        path = local_path(source)
        return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else None
    fs, path = filesystem(source, storage_options)
    try:
        info = with_retries(lambda: fs.info(path))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None
    return "dir" if info.get("type") == "directory" else "file"


def glob_pattern(source: str, storage_options: dict | None = None) -> str:
    """A glob pattern with its longest existing literal folder escaped: `scans [2024]/*.jpg` matches the jpgs in
    the folder `scans [2024]`, not in `scans 2`, `scans 0`..."""
    head, sep, rest = source.partition("://") if is_remote(source) else ("", "", source)
    parts = rest.split("/")
    for i in range(len(parts) - 1, 0, -1):
        prefix = "/".join(parts[:i])
        if prefix and has_glob(prefix) and literal(head + sep + prefix, storage_options) == "dir":
            return head + sep + globmod.escape(prefix) + "/" + "/".join(parts[i:])
    return source


def normalised_uri(uri: str) -> str:
    """A uri with `.` and `..` segments resolved, the same way wherever it was read (some stores reject dotted
    keys, and the same file must have one uri: its identity and resume key)."""
    if "://" in uri:
        scheme, _, path = uri.partition("://")
        bucket, slash, key = path.partition("/")
        if not slash or not any(part in (".", "..") for part in key.split("/")):
            return uri
        return f"{scheme}://{bucket}/{posixpath.normpath(key).lstrip('/')}"
    return os.path.normpath(uri) if os.path.isabs(uri) else uri


def remote_row(protocol: str, info: dict) -> tuple:
    uri = f"{protocol}://{info['name']}"
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("content_md5")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    elif not isinstance(mtime, (int, float)):
        mtime = None
    return (uri, int(info.get("size") or 0), mtime, str(etag).strip('"') if etag else None)


def threaded(work, items: list, max_workers: int = 16) -> Iterator:
    """Run work(item, emit) for every item on a thread pool and yield what they emit as it comes: the queue is
    bounded, so memory stays a few chunks whatever the listing's size. A worker's exception ends the iteration."""
    q: queue.Queue = queue.Queue(maxsize=4 * max_workers)
    stop = threading.Event()
    done = object()

    def emit(item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def run(item):
        try:
            work(item, emit)
        except BaseException as exc:
            emit(exc)
        finally:
            emit(done)

    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix="featurize-list") as pool:
        for item in items:
            pool.submit(run, item)
        try:
            finished = 0
            while finished < len(items):
                got = q.get()
                if got is done:
                    finished += 1
                elif isinstance(got, BaseException):
                    raise got
                else:
                    yield got
        finally:
            stop.set()
