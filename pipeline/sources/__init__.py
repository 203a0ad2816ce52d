"""Inputs: every image (or slide) INPUT names, listed as Parquet chunks of uri, size, mtime and etag (null where the
store has none), never held whole.

One module per kind of INPUT, each with its normalisation and its error messages:

    inventory.py  an S3 Inventory's manifest.json (its Parquet or CSV data files are the list)
    lists.py      list files: .txt/.lst (one uri a line), .csv/.parquet (a `uri` column), or a glob of them
    folders.py    a folder (recursive) or a glob of files, on local disk or an object store

Each kind is a module with `name`, `claims(source, storage_options)` and `chunks(source, storage_options,
suffixes)`; the first kind in KINDS that claims INPUT lists it. Adding an input kind is one module and its place in
KINDS. Every listing is made on the driver (threads for the waits on storage), the same way in a run and in tools.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..storage import is_remote, local_path, write_bytes_atomic
from . import folders, inventory, lists
from .common import CHUNK_ROWS, IMAGE_SUFFIXES, LISTING_SCHEMA, has_glob, image_id, no_inputs
from .lists import LIST_SUFFIXES, ListFiles

KINDS = (inventory, lists, folders)

__all__ = [
    "CHUNK_ROWS",
    "IMAGE_SUFFIXES",
    "KINDS",
    "LISTING_SCHEMA",
    "LIST_SUFFIXES",
    "check_local_input",
    "image_id",
    "input_kind",
    "is_list_input",
    "iter_listing",
    "list_files",
    "list_inputs",
    "write_listing",
    "write_manifest",
]


def input_kind(source: str, storage_options: dict | None = None):
    """The module that lists SOURCE (see KINDS)."""
    return next(kind for kind in KINDS if kind.claims(source, storage_options))


def is_list_input(source: str, storage_options: dict | None = None) -> bool:
    """Whether SOURCE names list files rather than images (a list file, a glob of them, an S3 Inventory)."""
    return input_kind(source, storage_options) is not folders


def list_files(source: str, storage_options: dict | None = None) -> ListFiles:
    """The list files a list INPUT names: one file, every file a glob matches, or an S3 Inventory's data files."""
    if inventory.claims(source, storage_options):
        return inventory.inventory_files(source, storage_options)
    return lists.list_files(source, storage_options)


def check_local_input(source: str) -> None:
    """Fail fast (before any cluster starts) when a local input path does not exist."""
    if is_remote(source) or has_glob(source):
        return
    if not os.path.exists(local_path(source)):
        raise UserError(f"input {source} does not exist")


def iter_listing(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> Iterator[pa.Table]:
    """The inputs SOURCE names as LISTING_SCHEMA tables of at most CHUNK_ROWS rows, in no particular order and not
    deduplicated."""
    for chunk in input_kind(source, storage_options).chunks(source, storage_options, suffixes):
        if chunk.num_rows:
            yield chunk


def list_inputs(source: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES) -> pa.Table:
    """The whole listing in memory, sorted by uri: for small inputs and tools; runs stream (write_listing)."""
    chunks = list(iter_listing(source, storage_options, suffixes))
    if not chunks:
        raise no_inputs(source, suffixes)
    return pa.concat_tables(chunks).sort_by("uri")


def write_listing(
    source: str, folder: str, storage_options: dict | None = None, suffixes=IMAGE_SUFFIXES
) -> tuple[list[str], int]:
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


def write_manifest(source: str, manifest: str, storage_options: dict | None = None) -> pa.Table:
    """`featurize manifest`: list once and save uri, size, mtime, etag as Parquet (atomically)."""
    table = list_inputs(source, storage_options)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(manifest, sink.getvalue(), storage_options)
    return table
