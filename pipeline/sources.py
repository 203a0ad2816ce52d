"""Inputs: list every image under a folder, glob, list file or manifest, locally or on an object store.

A listing is a pyarrow Table with `uri`, `size`, `mtime` and `etag` (null where the store has none), sorted by uri.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import UserError
from .storage import filesystem, is_remote, with_retries

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
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.exists(path):
        raise UserError(f"input {source} does not exist")


def list_inputs(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> pa.Table:
    """List the images named by SOURCE (folder, glob, list file or manifest)."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    if suffix in LIST_SUFFIXES and not _has_glob(source):
        table = read_list_file(source, storage_options)
    elif _has_glob(source):
        table = _list_glob(source, storage_options, suffixes)
    else:
        table = _list_folder(source, storage_options, suffixes)
    if table.num_rows == 0:
        raise UserError(f"input {source} holds no images (looked for {', '.join(sorted(suffixes)[:6])}, ...)")
    return table.sort_by("uri")


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)],
                                schema=LISTING_SCHEMA)


def _scan_dir(top: str, suffixes, recurse: bool) -> tuple[list[tuple], list[str]]:
    """Files of one folder tree (stat comes with the directory entry); the subfolders left unvisited.
    Symlinked folders are followed once (a link back to a parent would loop)."""
    rows: list[tuple] = []
    stack, unvisited = [top], []
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
    return rows, unvisited


def _scan_local(root: str, suffixes) -> list[tuple]:
    """The top folder, then its subfolders walked in parallel threads (listing is I/O-bound)."""
    rows, subdirs = _scan_dir(root, suffixes, recurse=False)
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(subdirs)))) as pool:
        for found, _ in pool.map(lambda d: _scan_dir(d, suffixes, recurse=True), subdirs):
            rows.extend(found)
    return rows


def _remote_row(protocol: str, info: dict) -> tuple:
    uri = f"{protocol}://{info['name']}"
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("content_md5")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    elif not isinstance(mtime, (int, float)):
        mtime = None
    return (uri, int(info.get("size") or 0), mtime, str(etag).strip('"') if etag else None)


def _list_folder(source: str, storage_options: dict | None, suffixes) -> pa.Table:
    if not is_remote(source):
        path = source[len("file://"):] if source.startswith("file://") else source
        if not os.path.isdir(path):
            raise UserError(f"input {source} does not exist" if not os.path.exists(path)
                            else f"input {source} is a file; pass a folder, a glob or a list file (.txt/.csv/.parquet)")
        return _table(_scan_local(os.path.abspath(path), suffixes))
    fs, path = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    try:
        found = _find_parallel(fs, path)
    except FileNotFoundError:
        raise UserError(f"input {source} does not exist") from None
    except PermissionError:
        raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None
    rows = [_remote_row(protocol, info) for name, info in found.items()
            if info.get("type", "file") == "file" and os.path.splitext(name)[1].lower() in suffixes
            and not name.rsplit("/", 1)[-1].startswith(".")]
    return _table(rows)


def _find_parallel(fs, path: str) -> dict:
    """Recursive listing, one paginated listing per top-level prefix, in parallel threads."""
    top = with_retries(lambda: fs.ls(path, detail=True))
    if not top and not with_retries(lambda: fs.exists(path)):
        raise FileNotFoundError(path)
    found = {e["name"]: e for e in top if e.get("type") == "file"}
    prefixes = [e["name"] for e in top if e.get("type") == "directory"]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(prefixes)))) as pool:
        for part in pool.map(lambda p: with_retries(lambda: fs.find(p, detail=True)), prefixes):
            found.update(part)
    return found


def write_manifest(source: str, manifest: str, storage_options: dict | None = None) -> pa.Table:
    """`featurize manifest`: list once and save uri, size, mtime, etag as Parquet (atomically)."""
    import io

    from .storage import write_bytes_atomic

    table = list_inputs(source, storage_options)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(manifest, sink.getvalue(), storage_options)
    return table


def _list_glob(source: str, storage_options: dict | None, suffixes) -> pa.Table:
    if not is_remote(source):
        import glob as globmod

        path = source[len("file://"):] if source.startswith("file://") else source
        rows = []
        for p in globmod.glob(path, recursive=True):
            if os.path.isfile(p) and os.path.splitext(p)[1].lower() in suffixes:
                st = os.stat(p)
                rows.append((os.path.abspath(p), st.st_size, st.st_mtime, None))
        return _table(rows)
    fs, path = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    found = with_retries(lambda: fs.glob(path, detail=True))
    return _table([_remote_row(protocol, info) for name, info in found.items()
                   if info.get("type", "file") == "file" and os.path.splitext(name)[1].lower() in suffixes])


def read_list_file(source: str, storage_options: dict | None = None) -> pa.Table:
    """A .txt (one uri a line), .csv or .parquet (a `uri` column; manifests add size/mtime/etag) list of inputs."""
    fs, path = filesystem(source, storage_options)
    if not with_retries(lambda: fs.exists(path)):
        raise UserError(f"input list {source} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".parquet":
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        elif suffix == ".csv":
            with fs.open(path, "rb") as f:
                table = pacsv.read_csv(f)
        else:
            with fs.open(path, "rt", encoding="utf-8-sig") as f:  # tolerate a byte-order mark
                lines = [ln.strip() for ln in f]
            table = pa.table({"uri": [ln for ln in lines if ln and not ln.startswith("#")]})
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"input list {source} cannot be read: {str(exc).splitlines()[0]}") from None
    if "uri" not in table.column_names:
        raise UserError(f"input list {source} has no 'uri' column (columns: {', '.join(table.column_names)})")
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    uris = [_resolve(str(u), base) for u in table.column("uri").to_pylist() if u is not None and str(u).strip()]
    extra = {name: table.column(name).to_pylist() for name in ("size", "mtime", "etag") if name in table.column_names}
    n = len(uris)
    if extra and n != table.num_rows:
        raise UserError(f"input list {source} has empty uri values")
    table = pa.table({
        "uri": pa.array(uris, pa.string()),
        "size": pa.array(extra.get("size", [None] * n), pa.int64()),
        "mtime": pa.array(extra.get("mtime", [None] * n), pa.float64()),
        "etag": pa.array([None if e is None else str(e) for e in extra.get("etag", [None] * n)], pa.string()),
    })
    return table


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        return f"{base}/{uri}"
    return str(Path(base, uri).resolve())
