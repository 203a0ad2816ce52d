"""Folders and globs: every file with an image (or slide) suffix under a folder, recursively, or matching a glob;
on local disk or an object store. Hidden files and folders (a name starting with '.') are skipped.

A path that exists is taken literally, even with glob characters in its name; a glob is a glob only when nothing by
that exact name exists, and its existing literal folders are matched as they are spelt.

Local folders are walked with os.scandir, subfolders in parallel threads. Object stores are listed page by page as
the store returns them (on S3, ListObjectsV2 with its continuation token): files at the top of the folder stream
while it is paged, and each subfolder is paged recursively in a thread of its own. Nothing holds a whole listing:
chunks of at most CHUNK_ROWS rows go on as soon as they fill.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from ..errors import UserError
from ..storage import filesystem, is_remote, local_path, with_retries
from . import common
from .common import (
    glob_pattern,
    has_glob,
    listing_table,
    literal,
    remote_row,
    suffix_of,
    threaded,
)

name = "folder or glob"


def claims(source: str, storage_options: dict | None = None) -> bool:
    """Any INPUT no other kind claims: a folder, or a glob of files."""
    return True


def chunks(source: str, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    what = literal(source, storage_options)
    if what == "dir":
        yield from (_remote_folder if is_remote(source) else _local_folder)(source, storage_options, suffixes)
    elif what == "file":
        raise UserError(f"input {source} is a file; pass a folder, a glob or a list file (.txt/.csv/.parquet)")
    elif has_glob(source):
        yield from _glob(glob_pattern(source, storage_options), storage_options, suffixes)
    else:
        raise UserError(f"input {source} does not exist")


# -- local disk -------------------------------------------------------------------------------------------------------
def _local_folder(source: str, storage_options, suffixes) -> Iterator[pa.Table]:
    """The top folder's files here, its subfolders each walked by a thread."""
    subdirs: list[str] = []
    found: list[pa.Table] = []
    _scan_dir(os.path.abspath(local_path(source)), suffixes, False, found.append, subdirs)
    yield from found
    yield from threaded(lambda d, emit: _scan_dir(d, suffixes, True, emit), subdirs)


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
                elif suffix_of(entry.name) in suffixes and entry.is_file():
                    st = entry.stat()
                    rows.append((entry.path, st.st_size, st.st_mtime, None))
                    if len(rows) >= common.CHUNK_ROWS:
                        emit(listing_table(rows))
                        rows = []
    emit(listing_table(rows))


def _glob(pattern: str, storage_options, suffixes) -> Iterator[pa.Table]:
    if not is_remote(pattern):
        import glob as globmod

        rows = []
        for p in globmod.iglob(local_path(pattern), recursive=True):
            if suffix_of(p) in suffixes and os.path.isfile(p) and not _hidden(p):
                st = os.stat(p)
                rows.append((os.path.abspath(p), st.st_size, st.st_mtime, None))
                if len(rows) >= common.CHUNK_ROWS:
                    yield listing_table(rows)
                    rows = []
        yield listing_table(rows)
        return
    fs, path = filesystem(pattern, storage_options)
    found = with_retries(lambda: fs.glob(path, detail=True))
    yield _files(pattern.split("://", 1)[0], found.values(), suffixes)


def _hidden(path: str) -> bool:
    return os.path.basename(path).startswith(".")


# -- object stores ----------------------------------------------------------------------------------------------------
def _remote_folder(source: str, storage_options, suffixes) -> Iterator[pa.Table]:
    fs, path = filesystem(source, storage_options)
    protocol = source.split("://", 1)[0]
    pages = _s3_pages if hasattr(fs, "call_s3") else _fsspec_pages
    try:
        prefixes: list[str] = []
        # the folder's own files stream as its top level is paged; its subfolders are gathered for the threads
        yield from _files_in_chunks(protocol, pages(fs, path, True, prefixes), suffixes)
        yield from threaded(
            lambda prefix, emit: [
                emit(chunk) for chunk in _files_in_chunks(protocol, pages(fs, prefix, False, None), suffixes)
            ],
            prefixes,
        )
    except FileNotFoundError:
        raise UserError(f"input {source} does not exist") from None
    except PermissionError:
        raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None


def _s3_pages(fs, path: str, top: bool, prefixes: list | None) -> Iterator[list[dict]]:
    """S3's own listing of `path`, one page of (up to 1,000) file infos at a time: with top, only the folder's own
    files (its subfolders go to `prefixes`); else every file below it. Each page is asked for after the one before
    was consumed."""
    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/" if top else "", **getattr(fs, "req_kw", {})}
    while True:
        page = with_retries(lambda: fs.call_s3("list_objects_v2", **request))
        if prefixes is not None:
            prefixes.extend(_shown(f"{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", [])))
        yield [
            {"name": f"{bucket}/{item['Key']}", "size": item.get("Size"), "LastModified": item.get("LastModified"),
             "ETag": item.get("ETag"), "type": "file", "relative": item["Key"][len(prefix):]}
            for item in page.get("Contents", []) if not item["Key"].endswith("/")
        ]  # fmt: skip
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _fsspec_pages(fs, path: str, top: bool, prefixes: list | None) -> Iterator[list[dict]]:
    """Other object stores, through fsspec: the top level in one listing, each subfolder in one `find` (held whole
    while it is listed: only S3 is paged here)."""
    fs.invalidate_cache(path)
    if top:
        entries = with_retries(lambda: fs.ls(path, detail=True))
        if not entries and not with_retries(lambda: fs.exists(path)):
            raise FileNotFoundError(path)
        prefixes.extend(_shown(e["name"] for e in entries if e.get("type") == "directory"))
        found = [e for e in entries if e.get("type") == "file"]
    else:
        found = list(with_retries(lambda: fs.find(path, detail=True)).values())
    base = path.rstrip("/") + "/"
    yield [{**info, "relative": info["name"][len(base):] if info["name"].startswith(base) else info["name"]}
           for info in found]  # fmt: skip


def _shown(folders) -> list[str]:
    """The subfolders that are not hidden."""
    return [f for f in folders if not f.rstrip("/").rsplit("/", 1)[-1].startswith(".")]


def _files_in_chunks(protocol: str, pages: Iterator[list[dict]], suffixes) -> Iterator[pa.Table]:
    """Pages of file infos as listing chunks of at most CHUNK_ROWS rows, each sent on as soon as it fills."""
    rows: list[tuple] = []
    for page in pages:
        for info in page:
            if _wanted(info, suffixes):
                rows.append(remote_row(protocol, info))
                if len(rows) >= common.CHUNK_ROWS:
                    yield listing_table(rows)
                    rows = []
    yield listing_table(rows)


def _wanted(info: dict, suffixes) -> bool:
    """A file with one of `suffixes`, in no hidden folder and not hidden itself (relative to the listed folder)."""
    relative = info.get("relative", info["name"].rsplit("/", 1)[-1])
    return (
        info.get("type", "file") == "file"
        and suffix_of(info["name"]) in suffixes
        and not any(part.startswith(".") for part in relative.split("/"))
    )


def _files(protocol: str, infos, suffixes) -> pa.Table:
    return listing_table([remote_row(protocol, info) for info in infos if _wanted(info, suffixes)])
