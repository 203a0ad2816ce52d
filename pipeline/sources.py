"""Inputs: list every image under a folder, glob, list file or manifest, locally or on an object store.

A listing is a pyarrow Table with `uri`, `size`, `mtime` and `etag` (null where the store has none), sorted by uri.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import UserError, first_line
from .storage import filesystem, is_remote, local_path, with_retries

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic",
})
LIST_SUFFIXES = frozenset({".txt", ".csv", ".parquet", ".lst"})
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                            ("etag", pa.string())])


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


def iter_listing(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> Iterator[pa.Table]:
    """The inputs SOURCE names (folder, glob, list file or manifest) as LISTING_SCHEMA tables of at most CHUNK_ROWS
    rows, in no particular order and not deduplicated."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    if suffix in LIST_SUFFIXES and not _has_glob(source):
        chunks = _iter_list_file(source, storage_options)
    elif _has_glob(source):
        chunks = _iter_glob(source, storage_options, suffixes)
    else:
        chunks = _iter_folder(source, storage_options, suffixes)
    for chunk in chunks:
        if chunk.num_rows:
            yield chunk


def no_inputs(source: str, suffixes) -> UserError:
    return UserError(f"input {source} holds no images (looked for {', '.join(sorted(suffixes)[:6])}, ...)")


def list_inputs(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> pa.Table:
    """The whole listing in memory, sorted by uri: for small inputs and tools; runs stream (write_listing)."""
    chunks = list(iter_listing(source, storage_options, suffixes))
    if not chunks:
        raise no_inputs(source, suffixes)
    return pa.concat_tables(chunks).sort_by("uri")


def write_listing(source: str, folder: str, storage_options: dict | None = None,
                  suffixes=IMAGE_SUFFIXES) -> tuple[list[str], int]:
    """Stream the listing into Parquet chunk files under the local FOLDER: (their paths, rows listed)."""
    os.makedirs(folder, exist_ok=True)
    paths, rows = [], 0
    for chunk in iter_listing(source, storage_options, suffixes):
        paths.append(os.path.join(folder, f"listing-{len(paths):06d}.parquet"))
        pq.write_table(chunk, paths[-1], compression="zstd")
        rows += chunk.num_rows
    if not rows:
        raise no_inputs(source, suffixes)
    return paths, rows


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)],
                                schema=LISTING_SCHEMA)


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
    return _table([_remote_row(protocol, info) for name, info in found.items()
                   if info.get("type", "file") == "file" and os.path.splitext(name)[1].lower() in suffixes
                   and not name.rsplit("/", 1)[-1].startswith(".")])


def _iter_folder(source: str, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    """A local walk with os.scandir (subfolders in parallel threads), or an object store listed one paginated
    listing per top-level prefix, prefixes in parallel threads (listing is I/O-bound: threads on the driver keep up
    with the store's rate limits without shipping the listing between processes)."""
    if not is_remote(source):
        path = local_path(source)
        if not os.path.isdir(path):
            raise UserError(f"input {source} does not exist" if not os.path.exists(path)
                            else f"input {source} is a file; pass a folder, a glob or a list file (.txt/.csv/.parquet)")
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
        yield from _threaded(lambda p, emit: emit(_remote_files(
            protocol, with_retries(lambda: fs.find(p, detail=True)), suffixes)), prefixes)
    except FileNotFoundError:
        raise UserError(f"input {source} does not exist") from None
    except PermissionError:
        raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None


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
    yield _table([_remote_row(protocol, info) for name, info in found.items()
                  if info.get("type", "file") == "file" and os.path.splitext(name)[1].lower() in suffixes])


def read_list_file(source: str, storage_options: dict | None = None) -> pa.Table:
    """A whole list file in memory (see _iter_list_file)."""
    chunks = list(_iter_list_file(source, storage_options))
    return pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table()


def _iter_list_file(source: str, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """A .txt (one uri a line), .csv or .parquet (a `uri` column; manifests add size/mtime/etag) list of inputs, read
    in chunks. Relative uris are taken relative to the list's folder; a .txt list's files are looked up for their
    size and mtime (so --incremental sees a changed file), in parallel threads."""
    fs, path = filesystem(source, storage_options)
    if not with_retries(lambda: fs.exists(path)):
        raise UserError(f"input list {source} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    try:
        with fs.open(path, "rb") as f:
            if suffix == ".parquet":
                batches = pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS)
            elif suffix == ".csv":
                batches = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=8 << 20))
            else:
                batches = _text_lines(f)
            for batch in batches:
                table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                yield _list_chunk(table, source, base, storage_options, stat=suffix not in (".parquet", ".csv"))
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"input list {source} cannot be read: {first_line(exc)}") from None


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


def _list_chunk(table: pa.Table, source: str, base: str, storage_options: dict | None, stat: bool) -> pa.Table:
    """One chunk of a list file as LISTING_SCHEMA: uris resolved, the manifest's size/mtime/etag kept, and with
    stat the files' size and mtime looked up."""
    if "uri" not in table.column_names:
        raise UserError(f"input list {source} has no 'uri' column (columns: {', '.join(table.column_names)})")
    uris = table.column("uri").cast(pa.string())
    present = pc.and_kleene(pc.is_valid(uris), pc.invert(pc.equal(pc.utf8_trim_whitespace(uris), "")))
    extra = [name for name in ("size", "mtime", "etag") if name in table.column_names]
    if extra and not pc.all(present.fill_null(False)).as_py():
        raise UserError(f"input list {source} has empty uri values")
    table = table.filter(present.fill_null(False))
    uris = table.column("uri").cast(pa.string())
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    if not pc.all(absolute).as_py():
        uris = pa.array([_resolve(u, base) for u in uris.to_pylist()], pa.string())
    columns = {"uri": uris}
    for name in ("size", "mtime", "etag"):
        field = LISTING_SCHEMA.field(name)
        columns[name] = (table.column(name).cast(pa.string() if name == "etag" else field.type)
                         if name in table.column_names else pa.nulls(table.num_rows, field.type))
    if stat and table.num_rows:
        columns["size"], columns["mtime"] = _stat_all(columns["uri"].to_pylist() if hasattr(columns["uri"], "to_pylist")
                                                      else list(columns["uri"]), storage_options)
    return pa.table(columns, schema=LISTING_SCHEMA)


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
