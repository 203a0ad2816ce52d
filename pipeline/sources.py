"""Inputs: list every image under a folder, glob, list file or manifest, locally or on an object store.

A listing is a pyarrow Table with `uri`, `size`, `mtime` and `etag` (null where the store has none), sorted by uri.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import UserError, first_line
from .storage import exists, filesystem, is_remote, local_path, only_driver_node, with_retries

IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".jp2",
        ".j2k",
        ".avif",
        ".heic",
    }
)
LIST_SUFFIXES = frozenset({".txt", ".csv", ".parquet", ".lst"})
INVENTORY_MANIFEST = "manifest.json"  # an S3 Inventory's manifest: its data files are the list
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])


def image_id(uri: str) -> str:
    """Stable id derived from the URI (96 bits of SHA-256)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def check_local_input(source: str) -> None:
    """Fail fast (before any cluster starts) when a local input path does not exist."""
    if is_remote(source) or _has_glob(source):
        return
    if not os.path.exists(local_path(source)):
        raise UserError(f"input {source} does not exist")


# Listings stream in chunks of at most this many rows: the driver never holds a whole listing.
CHUNK_ROWS = 100_000


def iter_listing(
    source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES, in_ray: bool = False
) -> Iterator[pa.Table]:
    """The inputs SOURCE names (folder, glob, list file or manifest) as LISTING_SCHEMA tables of at most CHUNK_ROWS
    rows, in no particular order and not deduplicated. in_ray: list object-store prefixes in Ray tasks (Ray is up)."""
    if is_list_input(source):
        chunks = _iter_list_files(list_files(source, storage_options), storage_options, suffixes)
    elif _has_glob(source):
        chunks = _iter_glob(source, storage_options, suffixes)
    else:
        chunks = _iter_folder(source, storage_options, suffixes, in_ray)
    for chunk in chunks:
        if chunk.num_rows:
            yield chunk


def is_list_input(source: str) -> bool:
    """Whether SOURCE names list files rather than images: a list file (.txt/.csv/.parquet/.lst), a glob whose
    pattern ends in a list suffix (every file it matches is a list), or an S3 Inventory's manifest.json."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower() in LIST_SUFFIXES or name.lower().endswith(INVENTORY_MANIFEST)


# Local list files smaller than this in all are read on the driver, while Ray starts: Ray Data would first wait for
# Ray (seconds on a small machine) and then pay its fixed cost per read, for what the driver reads in a second or two
# (about 1M uris: a .txt list of paths, or a Parquet manifest with sizes and etags).
RAY_LIST_MIN_BYTES = 16 << 20


def lists_with_ray(source: str) -> bool:
    """Whether a run lists SOURCE in Ray tasks, so Ray must be up before the listing starts: object-store prefixes
    (one task each), list files on object storage, and local list files of RAY_LIST_MIN_BYTES or more (read by Ray
    Data). Decided without Ray, the same way every time for the same input."""
    if not is_list_input(source):
        return is_remote(source) and not _has_glob(source)
    if is_remote(source):
        return True
    try:
        files = list_files(source).files
    except UserError:
        return False  # the listing reports it, on the driver
    return sum(os.path.getsize(local_path(f)) for f in files) >= RAY_LIST_MIN_BYTES


def no_inputs(source: str, suffixes) -> UserError:
    return UserError(f"input {source} holds no images (looked for {', '.join(sorted(suffixes)[:6])}, ...)")


def list_inputs(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> pa.Table:
    """The whole listing in memory, sorted by uri: for small inputs and tools; runs stream (write_listing)."""
    chunks = list(iter_listing(source, storage_options, suffixes))
    if not chunks:
        raise no_inputs(source, suffixes)
    return pa.concat_tables(chunks).sort_by("uri")


def write_listing(
    source: str, folder: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES
) -> tuple[list[str], int]:
    """Stream the listing into Parquet chunk files under the local FOLDER: (their paths, rows listed). In a run (Ray
    up), list files that lists_with_ray names are read by Ray Data (_ray_list_files) when its tasks can see them: on
    object storage, or local on a one-node Ray; otherwise, and in tools, on the driver in chunks."""
    os.makedirs(folder, exist_ok=True)
    paths, rows = [], 0
    spec = list_files(source, storage_options) if is_list_input(source) else None
    # Ray is consulted only for inputs a run lists in Ray, for which the run starts Ray before the listing; the
    # others are listed on a thread while Ray starts, and must not look at it.
    in_ray = lists_with_ray(source) and _ray_is_up()
    if spec is not None and in_ray and (is_remote(spec.files[0]) or only_driver_node()):
        chunks = _ray_list_files(spec, storage_options, suffixes)
    elif spec is not None:
        chunks = _iter_list_files(spec, storage_options, suffixes)
    else:
        chunks = iter_listing(source, storage_options, suffixes, in_ray)
    for chunk in chunks:
        paths.append(os.path.join(folder, f"listing-{len(paths):06d}.parquet"))
        pq.write_table(chunk, paths[-1], compression="zstd")
        rows += chunk.num_rows
    if not rows:
        raise no_inputs(source, suffixes)
    return paths, rows


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)], schema=LISTING_SCHEMA)


def _threaded(work, items: list, max_workers: int = 16) -> Iterator:
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


def _scan_dir(top: str, suffixes, recurse: bool, emit, unvisited: list | None = None) -> None:
    """Emit the files of one folder tree in chunks (stat comes with the directory entry); without recurse, the
    subfolders go to `unvisited`. Symlinked folders are followed once (a link back to a parent would loop)."""
    rows: list[tuple] = []
    stack = [top]
    visited = {os.path.realpath(top)}
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    real = os.path.realpath(entry.path)
                    if real in visited:
                        continue
                    visited.add(real)
                    (stack if recurse else unvisited).append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in suffixes and entry.is_file():
                    st = entry.stat()
                    rows.append((entry.path, st.st_size, st.st_mtime, None))
                    if len(rows) >= CHUNK_ROWS:
                        emit(_table(rows))
                        rows = []
    emit(_table(rows))


def _remote_row(protocol: str, info: dict) -> tuple:
    uri = f"{protocol}://{info['name']}"
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("content_md5")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    elif not isinstance(mtime, (int, float)):
        mtime = None
    return (uri, int(info.get("size") or 0), mtime, str(etag).strip('"') if etag else None)


def _remote_files(protocol: str, found: dict, suffixes) -> pa.Table:
    return _table(
        [
            _remote_row(protocol, info)
            for name, info in found.items()
            if info.get("type", "file") == "file"
            and os.path.splitext(name)[1].lower() in suffixes
            and not name.rsplit("/", 1)[-1].startswith(".")
        ]
    )


def _iter_folder(source: str, storage_options: dict | None, suffixes, in_ray: bool = False) -> Iterator[pa.Table]:
    """A local walk with os.scandir (subfolders in parallel threads), or an object store listed one paginated
    listing per top-level prefix: in a run (Ray up) one Ray task per prefix, PREFIX_TASKS at a time across the
    cluster, each streaming its chunks back; in tools, prefixes in parallel threads."""
    if not is_remote(source):
        path = local_path(source)
        if not os.path.isdir(path):
            raise UserError(
                f"input {source} does not exist"
                if not os.path.exists(path)
                else f"input {source} is a file; pass a folder, a glob or a list file (.txt/.csv/.parquet)"
            )
        subdirs: list[str] = []
        chunks: list[pa.Table] = []
        _scan_dir(os.path.abspath(path), suffixes, False, chunks.append, subdirs)
        yield from chunks
        yield from _threaded(lambda d, emit: _scan_dir(d, suffixes, True, emit), subdirs)
        return
    fs, path = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    try:
        top = with_retries(lambda: fs.ls(path, detail=True))
        if not top and not with_retries(lambda: fs.exists(path)):
            raise FileNotFoundError(path)
        yield _remote_files(protocol, {e["name"]: e for e in top if e.get("type") == "file"}, suffixes)
        prefixes = [e["name"] for e in top if e.get("type") == "directory"]
        if in_ray:  # a run: one Ray task per prefix, spread over the cluster
            yield from _ray_list_prefixes(source, prefixes, storage_options, suffixes)
        else:  # tools: threads on this process
            yield from _threaded(
                lambda p, emit: [
                    emit(chunk) for chunk in _prefix_chunks(source, p, storage_options, suffixes, CHUNK_ROWS)
                ],
                prefixes,
            )
    except FileNotFoundError:
        raise UserError(f"input {source} does not exist") from None
    except PermissionError:
        raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None


def _prefix_chunks(
    source: str, prefix: str, storage_options: dict | None, suffixes, chunk_rows: int
) -> Iterator[pa.Table]:
    """One object-store prefix, listed (paginated by the store) with its image files in chunks of chunk_rows."""
    fs, _ = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    found = with_retries(lambda: fs.find(prefix, detail=True))
    names = list(found)
    for i in range(0, len(names), chunk_rows):
        yield _remote_files(protocol, {n: found[n] for n in names[i : i + chunk_rows]}, suffixes)


# Prefix-listing tasks in flight at once: listing waits on the store, so more tasks than cores keep it busy; each
# asks for LIST_TASK_CPUS.
PREFIX_TASKS = 32


def _ray_list_prefixes(source: str, prefixes: list[str], storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    """A run's object-store listing: one Ray task per top-level prefix (streaming its chunks back as it lists), at
    most PREFIX_TASKS in flight, chunks yielded as they arrive. A task's failure comes back as its own exception
    (PermissionError, FileNotFoundError: the caller names INPUT)."""
    import ray
    from ray.exceptions import RayTaskError

    task = ray.remote(num_cpus=LIST_TASK_CPUS, num_returns="streaming", max_retries=0)(_prefix_chunks)
    waiting = list(reversed(prefixes))
    running: list = []
    try:
        while waiting or running:
            while waiting and len(running) < PREFIX_TASKS:
                running.append(task.remote(source, waiting.pop(), storage_options, suffixes, CHUNK_ROWS))
            ready, _ = ray.wait(running, num_returns=1)
            generator = ready[0]
            try:
                ref = next(generator)
            except StopIteration:
                running.remove(generator)
                continue
            try:
                yield ray.get(ref)
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, BaseException) else exc) from None
    finally:
        for generator in running:
            ray.cancel(generator)


def write_manifest(source: str, manifest: str, storage_options: dict | None = None) -> pa.Table:
    """`featurize manifest`: list once and save uri, size, mtime, etag as Parquet (atomically)."""
    import io

    from .storage import write_bytes_atomic

    table = list_inputs(source, storage_options)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(manifest, sink.getvalue(), storage_options)
    return table


def _iter_glob(source: str, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    if not is_remote(source):
        import glob as globmod

        rows = []
        for p in globmod.iglob(local_path(source), recursive=True):
            if os.path.isfile(p) and os.path.splitext(p)[1].lower() in suffixes:
                st = os.stat(p)
                rows.append((os.path.abspath(p), st.st_size, st.st_mtime, None))
                if len(rows) >= CHUNK_ROWS:
                    yield _table(rows)
                    rows = []
        yield _table(rows)
        return
    fs, path = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    found = with_retries(lambda: fs.glob(path, detail=True))
    yield _table(
        [
            _remote_row(protocol, info)
            for name, info in found.items()
            if info.get("type", "file") == "file" and os.path.splitext(name)[1].lower() in suffixes
        ]
    )


# -- list files: one or many .txt/.csv/.parquet lists, or an S3 Inventory ------------------------------------------
@dataclass(frozen=True)
class ListFiles:
    """The list files an INPUT names, resolved on the driver: all of one format."""

    source: str  # INPUT as given (named in messages)
    files: tuple[str, ...]  # each list file's uri, local ones absolute
    fmt: str  # "parquet", "csv" or "text"
    inventory: tuple[str, ...] | None = None  # an S3 Inventory's data files: their columns (from fileSchema)

    def base(self, uri: str) -> str:
        """The folder a list file's relative uris are taken from."""
        return uri.rsplit("/", 1)[0] if "/" in uri else "."


_LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".txt": "text", ".lst": "text"}
# An S3 Inventory's columns: its Parquet data files name them so; CSV ones have no header and the manifest's
# fileSchema names them in CamelCase ("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ...").
_INVENTORY_COLUMNS = ("bucket", "key", "size", "last_modified_date", "e_tag", "is_latest", "is_delete_marker")


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(local_path(uri))


def list_files(source: str, storage_options: dict | None = None) -> ListFiles:
    """Resolve a list INPUT (is_list_input) into its list files: one file, every file a glob matches, or the data
    files of an S3 Inventory's manifest.json. Missing files and globs matching nothing are UserErrors."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if name.lower().endswith(INVENTORY_MANIFEST) and not _has_glob(source):
        return _inventory_files(source, storage_options)
    suffix = os.path.splitext(name)[1].lower()
    fmt = _LIST_FORMATS[suffix]
    if not _has_glob(source):
        fs, path = filesystem(source, storage_options)
        if not with_retries(lambda: fs.exists(path)):
            raise UserError(f"input list {source} does not exist")
        return ListFiles(source, (_absolute(source),), fmt)
    if not is_remote(source):
        import glob as globmod

        found = sorted(
            os.path.abspath(p)
            for p in globmod.iglob(local_path(source), recursive=True)
            if os.path.isfile(p) and os.path.splitext(p)[1].lower() == suffix
        )
    else:
        fs, path = filesystem(source, storage_options)
        protocol = source.split("://", 1)[0]
        try:
            matched = with_retries(lambda: fs.glob(path, detail=True))
        except PermissionError:
            raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None
        found = sorted(
            f"{protocol}://{n}"
            for n, info in matched.items()
            if info.get("type", "file") == "file" and os.path.splitext(n)[1].lower() == suffix
        )
    if not found:
        raise UserError(f"input {source} matches no list file (looked for {suffix} files)")
    return ListFiles(source, tuple(found), fmt)


def _inventory_files(source: str, storage_options: dict | None) -> ListFiles:
    """An S3 Inventory's manifest.json: its data files (`files[].key` in `destinationBucket`) and their columns."""
    import json

    from .storage import read_text

    if not exists(source, storage_options):
        raise UserError(f"input {source} does not exist")
    try:
        manifest = json.loads(read_text(source, storage_options))
        fmt = str(manifest.get("fileFormat", "")).lower()
        bucket = str(manifest["destinationBucket"]).rsplit(":", 1)[-1]
        keys = [str(f["key"]) for f in manifest["files"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"input {source} is not an S3 Inventory manifest ({first_line(exc) or 'no files'}): it "
            "needs fileFormat, destinationBucket and files[].key"
        ) from None
    if fmt not in ("parquet", "csv"):
        raise UserError(
            f"input {source}: S3 Inventory format {manifest.get('fileFormat')!r} is not supported; "
            "configure the inventory as Parquet or CSV"
        )
    columns = [_snake(c.strip()) for c in str(manifest.get("fileSchema", "")).split(",") if c.strip()]
    if fmt == "csv" and not {"bucket", "key"} <= set(columns):
        raise UserError(f"input {source}: its fileSchema ({manifest.get('fileSchema')!r}) names no Bucket and Key")
    if not keys:
        raise no_inputs(source, IMAGE_SUFFIXES)
    return ListFiles(source, tuple(f"s3://{bucket}/{k}" for k in keys), fmt, tuple(columns))


def _snake(name: str) -> str:
    """`LastModifiedDate` -> `last_modified_date`, `ETag` -> `e_tag`: a CSV inventory's names as Parquet's."""
    import re

    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _open_list(uri: str, storage_options: dict | None, fs=None, path=None):
    if fs is None:
        fs, path = filesystem(uri, storage_options)
    f = fs.open(path, "rb")
    if uri.endswith(".gz"):  # a CSV inventory's data files are gzipped
        import gzip

        return gzip.GzipFile(fileobj=f)
    return f


def _csv_options(spec: ListFiles) -> dict:
    """pyarrow.csv options: an inventory's headerless CSV gets its manifest's column names, every column a string."""
    if not spec.inventory:
        return {"read_options": pacsv.ReadOptions(block_size=8 << 20)}
    return {
        "read_options": pacsv.ReadOptions(block_size=8 << 20, column_names=list(spec.inventory)),
        "convert_options": pacsv.ConvertOptions(
            column_types={c: pa.string() for c in spec.inventory}, strings_can_be_null=True
        ),
    }


def _existing_list_file(spec: ListFiles, uri: str, storage_options: dict | None):
    """(filesystem, path) of one of spec's list files; a UserError naming it (and INPUT) if it is not there."""
    fs, path = filesystem(uri, storage_options)
    if not with_retries(lambda: fs.exists(path)):
        raise _missing_list_file(spec, uri)
    return fs, path


def _missing_list_file(spec: ListFiles, uri: str) -> UserError:
    return UserError(
        f"input list {uri} does not exist"
        if uri == _absolute(spec.source)
        else f"input {spec.source}: its list file {uri} does not exist"
    )


def _no_uri_column(spec: ListFiles, uri: str, names) -> UserError:
    return UserError(f"input list {_named(spec, uri)} has no 'uri' column (columns: {', '.join(names)})")


def _unreadable_list_file(spec: ListFiles, uri: str, exc: BaseException) -> UserError:
    return UserError(f"input list {_named(spec, uri)} cannot be read: {first_line(exc)}")


def _iter_list_files(spec: ListFiles, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    """The driver's path (tools, or no Ray up): each list file read in chunks, one after the other."""
    for uri in spec.files:
        fs, path = _existing_list_file(spec, uri, storage_options)
        try:
            with _open_list(uri, storage_options, fs, path) as f:
                if spec.fmt == "parquet":
                    batches = pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS)
                elif spec.fmt == "csv":
                    batches = pacsv.open_csv(f, **_csv_options(spec))
                else:
                    batches = _text_lines(f)
                for batch in batches:
                    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                    yield _normalise(table, spec, spec.base(uri), storage_options, suffixes, _named(spec, uri))
        except (pa.ArrowInvalid, UnicodeDecodeError, OSError, EOFError) as exc:
            raise _unreadable_list_file(spec, uri, exc) from None


def _named(spec: ListFiles, uri: str) -> str:
    """A list file as messages name it: INPUT itself when it is the one file, else the file (of INPUT)."""
    return spec.source if len(spec.files) == 1 and not spec.inventory else f"{uri} (of {spec.source})"


def _text_lines(f) -> Iterator[pa.Table]:
    """A text list's uris in chunks (blank lines and # comments skipped; a byte-order mark tolerated)."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig")
    lines: list[str] = []
    for line in text:
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
            if len(lines) >= CHUNK_ROWS:
                yield pa.table({"uri": pa.array(lines, pa.string())})
                lines = []
    yield pa.table({"uri": pa.array(lines, pa.string())})


def _text_table(table: pa.Table) -> pa.Table:
    """Ray Data's read_text rows (`text`, one line a row; `path` kept) as `uri` rows: blank lines and # comments
    dropped, as _text_lines does."""
    lines = pc.utf8_trim_whitespace(table.column("text").cast(pa.string()))
    keep = pc.and_(pc.invert(pc.equal(lines, "")), pc.invert(pc.starts_with(lines, "#"))).fill_null(False)
    return table.append_column("uri", lines).drop_columns(["text"]).filter(keep)


def _normalise(
    table: pa.Table, spec: ListFiles, base, storage_options: dict | None, suffixes, name: str | None = None
) -> pa.Table:
    """One chunk of any list file as LISTING_SCHEMA: the code both paths (driver chunks, Ray Data batches) share.
    `name`: the list file as messages name it (INPUT where unknown)."""
    if spec.inventory is not None:
        return _inventory_chunk(table, spec, suffixes)
    return _list_chunk(table, name or spec.source, base, storage_options, stat=spec.fmt == "text")


def _list_chunk(table: pa.Table, source: str, base: str, storage_options: dict | None, stat: bool) -> pa.Table:
    """One chunk of a list file as LISTING_SCHEMA: uris resolved, the manifest's size/mtime/etag kept, and with
    stat the files' size and mtime looked up. Relative uris are taken from `base`, or, where the chunk has a `_base`
    column (rows of several list files), from each row's own."""
    names = [n for n in table.column_names if n != "_base"]
    if "uri" not in names:
        raise UserError(f"input list {source} has no 'uri' column (columns: {', '.join(names)})")
    uris = table.column("uri").cast(pa.string())
    present = pc.and_kleene(pc.is_valid(uris), pc.invert(pc.equal(pc.utf8_trim_whitespace(uris), "")))
    extra = [name for name in ("size", "mtime", "etag") if name in names]
    if extra and not pc.all(present.fill_null(False)).as_py():
        raise UserError(f"input list {source} has empty uri values")
    table = table.filter(present.fill_null(False))
    uris = table.column("uri").cast(pa.string())
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    if not pc.all(absolute).as_py():
        bases = table.column("_base").to_pylist() if "_base" in table.column_names else [base] * table.num_rows
        uris = pa.array([_resolve(u, b) for u, b in zip(uris.to_pylist(), bases)], pa.string())
    columns = {"uri": uris}
    for name in ("size", "mtime", "etag"):
        field = LISTING_SCHEMA.field(name)
        columns[name] = (
            table.column(name).cast(pa.string() if name == "etag" else field.type)
            if name in names
            else pa.nulls(table.num_rows, field.type)
        )
    if stat and table.num_rows:
        columns["size"], columns["mtime"] = _stat_all(columns["uri"].to_pylist(), storage_options)
    return pa.table(columns, schema=LISTING_SCHEMA)


_TRUE = ("true", "1", "t", "yes")


def _flag(column) -> pa.ChunkedArray:
    """A boolean column of an inventory, Parquet's booleans or CSV's "true"/"false"."""
    if pa.types.is_boolean(column.type):
        return column
    return pc.is_in(pc.utf8_lower(column.cast(pa.string())), pa.array(_TRUE))


def _epoch_seconds(column) -> pa.Array:
    """last_modified_date (a Parquet timestamp, or CSV's ISO-8601 text) as epoch seconds."""
    if not pa.types.is_timestamp(column.type):
        column = pc.cast(pc.utf8_replace_slice(column.cast(pa.string()), 23, 100, ""), pa.timestamp("ms"))
    per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[column.type.unit]
    return pc.divide(pc.cast(column, pa.int64()).cast(pa.float64()), float(per_second))


def _inventory_chunk(table: pa.Table, spec: ListFiles, suffixes) -> pa.Table:
    """One chunk of an S3 Inventory's data as LISTING_SCHEMA: uri = s3://bucket/key (CSV keys are URL-encoded,
    Parquet ones are not), size, mtime, etag; only keys with one of `suffixes`, no delete markers, no old
    versions."""
    if not {"bucket", "key"} <= set(table.column_names):
        raise UserError(
            f"input {spec.source}: its inventory data has no bucket and key columns (columns: "
            f"{', '.join(table.column_names)})"
        )
    keys = table.column("key").cast(pa.string()).combine_chunks()
    if spec.fmt == "csv":
        from urllib.parse import unquote_plus

        keys = pa.array([None if k is None else unquote_plus(k) for k in keys.to_pylist()], pa.string())
    table = table.set_column(table.column_names.index("key"), "key", keys)
    suffix = pc.utf8_lower(pc.extract_regex(keys, r"(?P<s>\.[^./]*)$").field("s"))
    keep = pc.is_in(suffix, pa.array(sorted(suffixes), pa.string())).fill_null(False)
    if "is_delete_marker" in table.column_names:
        keep = pc.and_(keep, pc.invert(_flag(table.column("is_delete_marker")).fill_null(False)))
    if "is_latest" in table.column_names:
        keep = pc.and_(keep, _flag(table.column("is_latest")).fill_null(True))
    table = table.filter(keep)
    columns = {
        "uri": pc.binary_join_element_wise(
            "s3://", table.column("bucket").cast(pa.string()), "/", table.column("key"), ""
        )
    }
    n = table.num_rows
    columns["size"] = (
        pc.cast(table.column("size"), pa.int64()) if "size" in table.column_names else pa.nulls(n, pa.int64())
    )
    columns["mtime"] = (
        _epoch_seconds(table.column("last_modified_date"))
        if "last_modified_date" in table.column_names
        else pa.nulls(n, pa.float64())
    )
    columns["etag"] = (
        pc.utf8_trim(table.column("e_tag").cast(pa.string()), '"')
        if "e_tag" in table.column_names
        else pa.nulls(n, pa.string())
    )
    return pa.table(columns, schema=LISTING_SCHEMA)


# -- list files read by Ray Data (a run: Ray is up) ------------------------------------------------------------------
LIST_BLOCK_BYTES = 16 << 20  # Ray Data blocks of a list (its default, 128 MB, tripled the driver's RSS at 10M uris)
LIST_STORE_BYTES = 128 << 20  # the list read's object-store budget: blocks waiting for the driver
LIST_TASK_CPUS = 0.25  # the list-reading tasks' CPU request: small, so a model actor starting beside them never waits


def _ray_is_up() -> bool:
    """Whether this process has Ray initialised (without importing ray where nothing has)."""
    import sys

    # Another thread may be importing ray right now (a run lists on a thread while Ray starts): a module still being
    # initialised may lack is_initialized yet, and Ray is not up then.
    is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
    return bool(is_initialized is not None and is_initialized())


def _arrow_filesystem(uri: str, storage_options: dict | None):
    """(pyarrow filesystem, path) for Ray Data: local files as they are, remote ones through our fsspec one."""
    if not is_remote(uri):
        return None, _absolute(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _check_first_file(spec: ListFiles, storage_options: dict | None) -> list[str] | None:
    """Cheap checks on the driver before Ray Data starts: the first list file opens, and a Parquet or CSV list has
    the columns it needs (from the Parquet footer or the CSV header). Returns the Parquet columns to read: of several
    Parquet lists, those any of them has (every footer is read), so a column only later files have is kept (Ray
    Data reads it as nulls from the files without it), as the driver's path keeps each file's own columns."""
    first = spec.files[0]
    fs, path = _existing_list_file(spec, first, storage_options)
    try:
        if spec.fmt == "parquet":
            names = _parquet_names(fs, path)
        elif spec.fmt == "csv" and not spec.inventory:
            with _open_list(first, storage_options, fs, path) as f:
                names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
        else:
            return None
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError, EOFError) as exc:
        raise _unreadable_list_file(spec, first, exc) from None
    wanted = _INVENTORY_COLUMNS if spec.inventory is not None else ("uri", "size", "mtime", "etag")
    if spec.inventory is not None and not {"bucket", "key"} <= set(names):
        raise UserError(
            f"input {spec.source}: its inventory data has no bucket and key columns (columns: {', '.join(names)})"
        )
    if spec.inventory is None and "uri" not in names:
        raise _no_uri_column(spec, first, names)
    if spec.fmt == "parquet" and spec.inventory is None and len(spec.files) > 1:
        names = set(names).union(*_later_parquet_names(spec, storage_options))
    return [c for c in wanted if c in names]


def _parquet_names(fs, path: str) -> list[str]:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def _later_parquet_names(spec: ListFiles, storage_options: dict | None) -> list[list[str]]:
    """The column names of every Parquet list file but the first, read 32 footers at a time; each must have a uri
    column (the first failing file in the list's order is the one named)."""

    def names(uri: str) -> list[str]:
        fs, path = filesystem(uri, storage_options)
        try:
            found = with_retries(lambda: _parquet_names(fs, path))
        except FileNotFoundError:
            raise _missing_list_file(spec, uri) from None
        except (pa.ArrowInvalid, OSError, EOFError) as exc:
            raise _unreadable_list_file(spec, uri, exc) from None
        if "uri" not in found:
            raise _no_uri_column(spec, uri, found)
        return found

    with ThreadPoolExecutor(max_workers=min(32, len(spec.files) - 1), thread_name_prefix="featurize-footer") as pool:
        return list(pool.map(names, spec.files[1:]))


def _ray_list_files(spec: ListFiles, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    """A run's path: the list files read by Ray Data (Parquet with only the columns used, CSV, text), each batch
    normalised in Ray tasks (a .txt list's files are looked up there, in parallel across the cluster), streamed to
    the driver in chunks of at most CHUNK_ROWS rows. What fails in Ray Data comes back as one-line UserErrors."""
    import ray.data

    columns = _check_first_file(spec, storage_options)
    pafs, _ = _arrow_filesystem(spec.files[0], storage_options)
    paths = [_arrow_filesystem(u, storage_options)[1] for u in spec.files]
    several = len(paths) > 1 and spec.inventory is None  # relative uris resolve against each row's own list file
    uris = dict(zip(paths, spec.files))
    bases = {p: spec.base(u) for p, u in uris.items()} if several else None
    base = spec.base(spec.files[0])
    cpus = LIST_TASK_CPUS

    def normalise(batch: pa.Table) -> pa.Table:
        if spec.fmt == "parquet" and spec.inventory is None and batch.column("uri").null_count:
            _no_uri_files(batch, spec, uris)  # a later file without the column reads as nulls
        if "path" in batch.column_names:
            if bases is not None:
                batch = batch.append_column(
                    "_base", pa.array([bases[p] for p in batch.column("path").to_pylist()], pa.string())
                )
            batch = batch.drop_columns(["path"])
        if spec.fmt == "text":
            batch = _text_table(batch)
        return _normalise(batch, spec, base, storage_options, suffixes)

    try:
        if spec.fmt == "parquet":
            ds = ray.data.read_parquet(
                paths, filesystem=pafs, include_paths=several, file_extensions=None, num_cpus=cpus
            ).select_columns(columns + (["path"] if several else []))
        elif spec.fmt == "csv":
            ds = ray.data.read_csv(paths, filesystem=pafs, include_paths=several, num_cpus=cpus, **_csv_options(spec))
        else:
            ds = ray.data.read_text(paths, filesystem=pafs, encoding="utf-8-sig", include_paths=several, num_cpus=cpus)
        # batch_size=None: whole blocks, so the map fuses into the read task (no second pass through the store)
        ds = ds.map_batches(normalise, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, num_cpus=cpus)
        ds.context.raise_original_map_exception = True  # a UserError raised in a task comes back as itself
        # The driver maps every block it reads from the object store (its pages count in its RSS): small blocks and
        # a small budget of blocks in flight keep that bounded, whatever the list's size.
        ds.context.target_max_block_size = LIST_BLOCK_BYTES
        ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
            object_store_memory=LIST_STORE_BYTES
        )
        with _quiet_ray_data():
            yield from ds.iter_batches(batch_size=CHUNK_ROWS, batch_format="pyarrow", prefetch_batches=1)
    except Exception as exc:  # noqa: BLE001 - Ray Data wraps what failed in its own exceptions
        mapped = _ray_list_error(exc, spec)
        if mapped is exc:
            raise
        raise mapped from None


def _no_uri_files(batch: pa.Table, spec: ListFiles, uris: dict) -> None:
    """Raise if some list file of the batch has no uri at all: Ray Data reads a later file that lacks the `uri`
    column (only the first file's footer was checked) as nulls, which must not pass as an empty list."""
    null = pc.is_null(batch.column("uri"))
    if "path" not in batch.column_names:
        missing = [spec.source] if pc.all(null).as_py() else []
    else:
        paths = batch.column("path")
        missing = sorted(set(paths.filter(null).to_pylist()) - set(paths.filter(pc.invert(null)).to_pylist()))
    if missing:
        where = uris.get(missing[0], missing[0])
        raise UserError(
            f"input list {where} has no 'uri' column or no uri values"
            if where == spec.source
            else f"input {spec.source}: its list file {where} has no 'uri' column or no uri values"
        )


@contextmanager
def _quiet_ray_data():
    """Where Ray Data's own lines are hidden (a run without --verbose: its logger at ERROR), a failed list read
    shows no Ray ERROR lines and stack traces either: its error reaches the user as one UserError line."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    if level >= logging.ERROR:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ray_list_error(exc: BaseException, spec: ListFiles) -> BaseException:
    """What Ray Data raised while reading list files, as the user should read it: a UserError raised in a task
    (no 'uri' column, empty uris) as itself, an unreadable file as `input list ... cannot be read: <cause>`;
    anything else (the cluster failing) as it came."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, UserError) and not isinstance(exc, RayTaskError):
        return exc  # ours, raised on the driver
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cause = getattr(cur, "cause", None) if isinstance(cur, RayTaskError) else None
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    own = [e for e in chain if not isinstance(e, RayTaskError) and type(e).__module__.split(".")[0] != "ray"]
    for e in own:
        if isinstance(e, UserError):  # ours, raised in a task (Ray adds lines to its message: ours is the first)
            return UserError(first_line(e, limit=2000))
    readable = (pa.ArrowInvalid, UnicodeDecodeError, OSError, EOFError, ValueError)
    for e in own:
        if isinstance(e, readable):
            return UserError(f"input list {spec.source} cannot be read: {first_line(e)}")
    return exc


def _stat_all(uris: list[str], storage_options: dict | None) -> tuple[pa.Array, pa.Array]:
    """Size and mtime of each uri (null where it cannot be looked up: the run makes it an error row)."""

    def one(uri: str) -> tuple:
        try:
            if not is_remote(uri):
                st = os.stat(local_path(uri))
                return st.st_size, st.st_mtime
            fs, path = filesystem(uri, storage_options)
            row = _remote_row(uri.split("://", 1)[0], {**with_retries(lambda: fs.info(path)), "name": path})
            return row[1], row[2]
        except Exception:  # missing, or not ours to read: the run's read reports it as the input's error row
            return None, None

    if any(is_remote(u) for u in uris):
        with ThreadPoolExecutor(max_workers=32) as pool:
            found = list(pool.map(one, uris))
    else:
        found = [one(u) for u in uris]
    return pa.array([s for s, _ in found], pa.int64()), pa.array([m for _, m in found], pa.float64())


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        return f"{base}/{uri}"
    return str(Path(base, uri).resolve())
