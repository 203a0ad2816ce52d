"""S3 Inventory: INPUT is an inventory's `manifest.json`, and its Parquet or CSV data files are the list (image keys
only, no delete markers, no old versions). The data files are read as list files are (lists.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError, first_line
from ..storage import exists, read_text
from .common import IMAGE_SUFFIXES, LISTING_SCHEMA, epoch_seconds, has_glob, no_inputs
from .lists import ListFiles, read_lists

name = "S3 Inventory"
INVENTORY_MANIFEST = "manifest.json"
# Its Parquet data files name the columns bucket, key, size, last_modified_date, e_tag, is_latest, is_delete_marker;
# CSV ones have no header, and the manifest's fileSchema names them in CamelCase ("Bucket, Key, ..., ETag").


def claims(source: str, storage_options: dict | None = None) -> bool:
    return source.rstrip("/").rsplit("/", 1)[-1].lower().endswith(INVENTORY_MANIFEST) and not has_glob(source)


def chunks(source: str, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    yield from read_lists(inventory_files(source, storage_options), storage_options, suffixes, inventory_chunk)


def inventory_files(source: str, storage_options: dict | None) -> ListFiles:
    """An S3 Inventory's manifest.json: its data files (`files[].key` in `destinationBucket`) and their columns."""
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
    if not re.fullmatch(r"[A-Za-z0-9.\-_]{1,255}", bucket):  # S3's own rule, checked before any request
        raise UserError(f"input {source}: destinationBucket {manifest['destinationBucket']!r} names no bucket")
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
    files = tuple(f"s3://{bucket}/{k}" for k in keys)
    return ListFiles(source, files, fmt, tuple(columns) if fmt == "csv" else None, inventory=True)


def _snake(name: str) -> str:
    """`LastModifiedDate` -> `last_modified_date`, `ETag` -> `e_tag`: a CSV inventory's names as Parquet's."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


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
    return epoch_seconds(column)


def inventory_chunk(
    table: pa.Table, spec: ListFiles, base: str, named: str, storage_options: dict | None, suffixes
) -> pa.Table:
    """One chunk of an S3 Inventory's data as LISTING_SCHEMA: uri = s3://bucket/key (CSV keys are URL-encoded,
    Parquet ones are not), size, mtime, etag; only keys with one of `suffixes`, no delete markers, no old
    versions."""
    if not {"bucket", "key"} <= set(table.column_names):
        raise UserError(
            f"input {spec.source}: its inventory data has no bucket and key columns (columns: "
            f"{', '.join(table.column_names)})"
        )
    repeated = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if repeated:
        raise UserError(f"input {spec.source}: its inventory data has the column(s) {', '.join(repeated)} twice")
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
    buckets = table.column("bucket").cast(pa.string())
    if pc.any(pc.invert(pc.not_equal(buckets, "").fill_null(False))).as_py():  # else a null or `s3:///key` uri
        raise UserError(f"input {spec.source}: its inventory data has rows without a bucket")
    columns = {"uri": pc.binary_join_element_wise("s3://", buckets, "/", table.column("key"), "")}
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
