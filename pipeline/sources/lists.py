"""List files: the uris to process, written down. A `.txt`/`.lst` file holds one uri a line (blank lines and `#`
comments skipped); a `.csv` or `.parquet` file has a `uri` column, and a manifest adds `size`, `mtime` and `etag`.
INPUT is one list file, or a glob of them (a pattern ending in a list suffix: every file it matches is a list).

Relative uris are taken from the list file's own folder; every uri is normalised (`.` and `..` resolved). A text
list says nothing of its files' sizes and times, so they are looked up (32 at a time for object stores): for very
large remote lists, a manifest (`featurize manifest`) saves those lookups.

The list files are read on the driver, in chunks, one file after another; S3 Inventories (inventory.py) are read the
same way. Every problem with a list is one UserError naming the list file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import UserError, first_line
from ..storage import filesystem, is_remote, local_path, with_retries
from . import common
from .common import (
    LISTING_SCHEMA,
    epoch_seconds,
    glob_pattern,
    has_glob,
    literal,
    normalised_uri,
    remote_row,
    suffix_of,
)

name = "list files"
LIST_SUFFIXES = frozenset({".txt", ".csv", ".parquet", ".lst"})
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".txt": "text", ".lst": "text"}


def claims(source: str, storage_options: dict | None = None) -> bool:
    """A name with a list suffix (a file, or a glob of files: `lists/part-*.parquet`)."""
    return suffix_of(source.rstrip("/").rsplit("/", 1)[-1]) in LIST_SUFFIXES


def chunks(source: str, storage_options: dict | None, suffixes) -> Iterator[pa.Table]:
    yield from read_lists(list_files(source, storage_options), storage_options, suffixes, list_chunk)


@dataclass(frozen=True)
class ListFiles:
    """The list files an INPUT names, resolved on the driver: all of one format."""

    source: str  # INPUT as given (named in messages)
    files: tuple[str, ...]  # each list file's uri, local ones absolute
    fmt: str  # "parquet", "csv" or "text"
    csv_columns: tuple[str, ...] | None = None  # a headerless CSV's column names (an S3 Inventory's)
    inventory: bool = False  # the data files of an S3 Inventory

    def base(self, uri: str) -> str:
        """The folder a list file's relative uris are taken from."""
        return uri.rsplit("/", 1)[0] if "/" in uri else "."

    def named(self, uri: str) -> str:
        """A list file as messages name it: INPUT itself when it is the one file, else the file (of INPUT)."""
        return self.source if len(self.files) == 1 and not self.inventory else f"{uri} (of {self.source})"


def absolute(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(local_path(uri))


def list_files(source: str, storage_options: dict | None = None) -> ListFiles:
    """One list file, or every list file a glob matches. Missing files and globs matching nothing are UserErrors."""
    suffix = suffix_of(source.rstrip("/").rsplit("/", 1)[-1])
    fmt = _FORMATS[suffix]
    if not has_glob(source) or literal(source, storage_options) == "file":
        if literal(source, storage_options) != "file":
            raise UserError(f"input list {source} does not exist")
        return ListFiles(source, (absolute(source),), fmt)
    pattern = glob_pattern(source, storage_options)
    if not is_remote(source):
        import glob as globmod

        found = sorted(
            os.path.abspath(p)
            for p in globmod.iglob(local_path(pattern), recursive=True)
            if os.path.isfile(p) and suffix_of(p) == suffix
        )
    else:
        fs, path = filesystem(pattern, storage_options)
        protocol = source.split("://", 1)[0]
        try:
            matched = with_retries(lambda: fs.glob(path, detail=True))
        except PermissionError:
            raise UserError(f"input {source}: access denied (check credentials / storage_options)") from None
        found = sorted(
            f"{protocol}://{n}" for n, info in matched.items() if info.get("type", "file") == "file"
            and suffix_of(n) == suffix
        )  # fmt: skip
    if not found:
        raise UserError(f"input {source} matches no list file (looked for {suffix} files)")
    return ListFiles(source, tuple(found), fmt)


# -- reading ---------------------------------------------------------------------------------------------------------
Normalise = Callable[[pa.Table, ListFiles, str, str, "dict | None", "frozenset"], pa.Table]


def read_lists(spec: ListFiles, storage_options: dict | None, suffixes, normalise: Normalise) -> Iterator[pa.Table]:
    """Each list file in chunks, one after the other, each chunk normalised to LISTING_SCHEMA by
    normalise(chunk, spec, list file's base, list file as messages name it, storage_options, suffixes)."""
    for uri in spec.files:
        fs, path = filesystem(uri, storage_options)
        if not with_retries(lambda fs=fs, path=path: fs.exists(path)):
            raise UserError(
                f"input list {uri} does not exist" if uri == absolute(spec.source)
                else f"input {spec.source}: its list file {uri} does not exist"
            )  # fmt: skip
        try:
            with _open_list(uri, fs, path) as f:
                for batch in _batches(f, spec):
                    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                    yield normalise(table, spec, spec.base(uri), spec.named(uri), storage_options, suffixes)
        except (ValueError, pa.ArrowException, OSError, EOFError) as exc:  # Arrow's errors, bad text, NUL bytes
            raise UserError(f"input list {spec.named(uri)} cannot be read: {first_line(exc)}") from None


def _open_list(uri: str, fs, path):
    f = fs.open(path, "rb")
    if uri.endswith(".gz"):  # a CSV inventory's data files are gzipped
        import gzip

        return gzip.GzipFile(fileobj=f)
    return f


def _batches(f, spec: ListFiles) -> Iterator:
    if spec.fmt == "parquet":
        return pq.ParquetFile(f).iter_batches(batch_size=common.CHUNK_ROWS)
    if spec.fmt == "csv":
        return pacsv.open_csv(f, **_csv_options(spec))
    return _text_lines(f)


def _csv_options(spec: ListFiles) -> dict:
    """pyarrow.csv options: a headerless CSV gets its column names, every column a string."""
    if not spec.csv_columns:
        return {"read_options": pacsv.ReadOptions(block_size=8 << 20)}
    return {
        "read_options": pacsv.ReadOptions(block_size=8 << 20, column_names=list(spec.csv_columns)),
        "convert_options": pacsv.ConvertOptions(
            column_types={c: pa.string() for c in spec.csv_columns}, strings_can_be_null=True
        ),
    }


def _text_lines(f) -> Iterator[pa.Table]:
    """A text list's uris in chunks (blank lines and # comments skipped; a byte-order mark tolerated)."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig")
    lines: list[str] = []
    for line in text:
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
            if len(lines) >= common.CHUNK_ROWS:
                yield pa.table({"uri": pa.array(lines, pa.string())})
                lines = []
    yield pa.table({"uri": pa.array(lines, pa.string())})


# -- normalising ------------------------------------------------------------------------------------------------------
def list_chunk(
    table: pa.Table, spec: ListFiles, base: str, named: str, storage_options: dict | None, suffixes
) -> pa.Table:
    """One chunk of a list file as LISTING_SCHEMA: uris resolved against `base` and normalised, a manifest's
    size/mtime/etag kept, and for a text list the files' size and mtime looked up. Every listed uri is kept, whatever
    its suffix: a list names its inputs."""
    names = table.column_names
    if "uri" not in names:
        raise UserError(f"input list {named} has no 'uri' column (columns: {', '.join(names)})")
    uris = _listing_column(table, LISTING_SCHEMA.field("uri"), named)
    present = pc.and_kleene(pc.is_valid(uris), pc.invert(pc.equal(pc.utf8_trim_whitespace(uris), "")))
    if any(n in names for n in ("size", "mtime", "etag")) and not pc.all(present.fill_null(False)).as_py():
        raise UserError(f"input list {named} has empty uri values")
    table = table.filter(present.fill_null(False))
    uris = _resolved(uris.filter(present.fill_null(False)).combine_chunks(), base)
    columns = {"uri": uris}
    for field in LISTING_SCHEMA:
        if field.name != "uri":
            columns[field.name] = (
                _listing_column(table, field, named) if field.name in names
                else pa.nulls(table.num_rows, field.type)
            )  # fmt: skip
    if spec.fmt == "text" and table.num_rows:
        columns["size"], columns["mtime"] = _stat_all(uris.to_pylist(), storage_options)
    return pa.table(columns, schema=LISTING_SCHEMA)


def _listing_column(table: pa.Table, field: pa.Field, named: str) -> pa.ChunkedArray:
    """A list file's column as LISTING_SCHEMA types it (a timestamp mtime as seconds since the epoch); a column given
    twice, or one whose values do not convert, is a UserError naming it."""
    found = table.schema.get_all_field_indices(field.name)
    if len(found) > 1:
        raise UserError(f"input list {named} has {len(found)} columns named {field.name!r}; keep one")
    column = table.column(found[0])
    if field.name == "mtime" and pa.types.is_timestamp(column.type):
        return epoch_seconds(column)
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise UserError(
            f"input list {named}: its {field.name!r} column ({column.type}) cannot be read as {field.type}: "
            f"{first_line(exc)}"
        ) from None


def _resolved(uris: pa.Array, base: str) -> pa.Array:
    """Relative uris taken from `base`, and `.`/`..` segments resolved; only the uris that need it go through
    Python (a manifest of absolute uris passes as it is)."""
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    needs = pc.or_(pc.invert(absolute), pc.match_substring_regex(uris, r"(^|/)\.\.?(/|$)"))
    if not pc.any(needs).as_py():
        return uris
    values = uris.to_pylist()
    for i in pc.indices_nonzero(needs).to_pylist():
        values[i] = normalised_uri(_resolve(values[i], base))
    return pa.array(values, pa.string())


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        return f"{base}/{uri}"
    return str(Path(base, uri).resolve())


def _stat_all(uris: list[str], storage_options: dict | None) -> tuple[pa.Array, pa.Array]:
    """Size and mtime of each uri (null where it cannot be looked up: the run makes it an error row)."""

    def one(uri: str) -> tuple:
        try:
            if not is_remote(uri):
                st = os.stat(local_path(uri))
                return st.st_size, st.st_mtime
            fs, path = filesystem(uri, storage_options)
            row = remote_row(uri.split("://", 1)[0], {**with_retries(lambda: fs.info(path)), "name": path})
            return row[1], row[2]
        except Exception:  # missing, or not ours to read: the run's read reports it as the input's error row
            return None, None

    if any(is_remote(u) for u in uris):
        with ThreadPoolExecutor(max_workers=32) as pool:
            found = list(pool.map(one, uris))
    else:
        found = [one(u) for u in uris]
    return pa.array([s for s, _ in found], pa.int64()), pa.array([m for _, m in found], pa.float64())
