"""Reading a featurised OUTPUT: exactly one current row per input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .write import OutputDir, newest_per_uri


def read_features(output: str, storage_options: dict | None = None, exclude_removed: bool = False,
                  columns: list[str] | None = None) -> pa.Table:
    """One row per input of the current dataset version: a changed image's newest row wins.

    exclude_removed drops inputs that the newest run no longer listed (deleted from the source).
    """
    out = OutputDir(output, storage_options)
    dataset = out.read_json("_dataset.json")
    shards = sorted(out.shard_units().values())
    if dataset is None or not shards:
        raise UserError(f"{output} holds no featurised output (no _dataset.json or part-*.parquet)")
    with_fs = [out.fs.open(p, "rb") for p in shards]
    try:
        table = pa.concat_tables([pq.read_table(f, columns=columns and _with_keys(columns)) for f in with_fs],
                                 promote_options="default")
    finally:
        for f in with_fs:
            f.close()
    table = newest_per_uri(table.filter(pc.equal(table.column("dataset_version"), int(dataset.get("version", 1)))))
    if exclude_removed:
        listing = out.read_table("_listing.parquet")
        if listing is not None:
            table = table.filter(pc.is_in(table.column("uri"), value_set=listing.column("uri")))
    if columns:
        table = table.select(columns)
    return table


def _with_keys(columns: list[str]) -> list[str]:
    return list(dict.fromkeys([*columns, "uri", "run_id", "dataset_version"]))
