"""The image features of an OUTPUT's current ok rows, streamed shard by shard: what `index`, `search` and `dedup` read.

`open_vectors` plans from the key columns only (pass 1 of `pipeline.read`, then its current-row query): each current
ok row's keys, run_id, the shard it is in and its position there. `batches` then reads the features of chosen rows,
one shard's feature column at a time, never the whole OUTPUT, and L2-normalises them in float32 so that an inner
product is a cosine similarity whatever is stored (embeddings are stored normalised, then rounded to float16; hidden
states are stored as the model returns them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .read import SLIDES, current_rows, snapshot
from .rescore import IMAGE_KEYS, TILE_KEYS
from .storage import filesystem
from .write import OutputDir

# Identity keys that do not change what image_features holds: an index or a comparison ignores them.
NOT_FEATURE_KEYS = ("prompt_set_hash", "concept_maps")
BATCH_ROWS = 8192


@dataclass
class Vectors:
    """An OUTPUT's current ok rows (`rows`: keys, run_id, shard, row) and what their features are."""

    url: str
    storage_options: dict
    identity: dict
    version: int
    is_slides: bool
    shards: list[str]  # fsspec paths, indexed by rows' `shard`
    rows: pa.Table

    @property
    def keys(self) -> list[str]:
        """The columns that name a row in results: the image (uri, image_id) or the tile."""
        return TILE_KEYS if self.is_slides else IMAGE_KEYS

    @property
    def features(self) -> str:
        return self.identity.get("features", "embedding")

    @property
    def feature_identity(self) -> dict:
        return feature_identity(self.identity, self.version)

    def batches(
        self, rows: pa.Table | None = None, batch_rows: int = BATCH_ROWS, stored: bool = False
    ) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(rows, features [n, D] float32, L2-normalised; with `stored`, as stored) for `rows` (a selection of
        self.rows in its order; all by default), in order, at most `batch_rows` a batch; one shard is open at a
        time."""
        rows = self.rows if rows is None else rows
        if not rows.num_rows:
            return
        shard_of = rows.column("shard").to_numpy()
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(shard_of)]):
            chosen = rows.slice(int(start), int(stop - start))
            path = self.shards[int(shard_of[start])]
            positions = chosen.column("row").to_numpy()
            for begin in range(0, len(positions), batch_rows):
                part = positions[begin : begin + batch_rows]
                features = shard_features(self.url, self.storage_options, path, part, not stored)
                yield chosen.slice(begin, len(part)), features


def shard_features(
    url: str, storage_options: dict | None, path: str, positions: np.ndarray, normalise: bool = True
) -> np.ndarray:
    """The image_features of the rows at `positions` (ascending) of one shard, [n, D] float32 L2-normalised (else as
    stored); reads only the row groups that hold them. Also what a Ray task runs (it opens the filesystem itself)."""
    fs, _ = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = np.array([parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)], np.int64)
        ends = np.cumsum(sizes)
        group_of = np.searchsorted(ends, positions, side="right")
        groups = np.unique(group_of)
        table = parquet.read_row_groups(groups.tolist(), columns=["image_features"])
    offset = np.zeros(len(sizes), np.int64)  # where each group that was read starts in `table`
    offset[groups] = np.cumsum(np.r_[0, sizes[groups][:-1]])
    local = positions - (ends - sizes)[group_of] + offset[group_of]
    column = table.column("image_features").take(pa.array(local, pa.int64())).combine_chunks()
    if column.null_count:
        raise UserError(f"{path}: a current ok row has no image_features; the shard is damaged")
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return normalised(values) if normalise else values


def feature_identity(identity: dict, version: int) -> dict:
    """What the stored features depend on (the identity less the prompt set), with the dataset version."""
    return {**{k: v for k, v in identity.items() if k not in NOT_FEATURE_KEYS}, "dataset_version": int(version)}


def readable_version(dataset: dict) -> int:
    """The dataset version readers read (as pipeline.read does): the readable one, else the newest."""
    version = dataset.get("readable_version")
    return int(version if version is not None else dataset.get("version", 1))


def normalised(features: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def open_vectors(output: str, storage_options: dict | None = None) -> Vectors:
    """The current ok rows of `output` (images or slides). An OUTPUT without rows yet gives no rows; one that is not an
    OUTPUT, or a rescore's OUT2 (no features), is refused."""
    out = OutputDir(output, storage_options)
    dataset = out.read_json("_dataset.json")
    if dataset is None:
        rescored = out.read_json("_rescore.json")
        why = "it is a rescore's OUT2, which stores no image_features" if rescored else "no _dataset.json"
        raise UserError(
            f"{output} holds no featurised output ({why}); pass the OUTPUT of `featurize images` or `slides`"
        )
    identity = dict(dataset.get("identity", {}))
    if not out.shard_units():
        version = readable_version(dataset)
        is_slides = out.read_table("_slides.parquet") is not None
        return Vectors(output, out.storage_options, identity, version, is_slides, [], _no_rows(is_slides))
    snap = snapshot(output, storage_options, None, False)
    rows = current_rows(snap, ["status", *(["uri"] if snap.layout is SLIDES else ["image_id"])])
    rows = rows.filter(pc.fill_null(pc.equal(rows.column("status"), "ok"), False))
    keys = TILE_KEYS if snap.layout is SLIDES else IMAGE_KEYS
    rows = rows.select([*keys, "run_id", "shard", "row"])
    return Vectors(output, out.storage_options, identity, snap.version, snap.layout is SLIDES, snap.shards, rows)


def _no_rows(is_slides: bool) -> pa.Table:
    types = {"x": pa.int64(), "y": pa.int64(), "level": pa.int32(), "shard": pa.int32(), "row": pa.int64()}
    names = [*(TILE_KEYS if is_slides else IMAGE_KEYS), "run_id", "shard", "row"]
    return pa.table({n: pa.array([], types.get(n, pa.string())) for n in names})


def row_keys(table: pa.Table, keys: list[str]) -> np.ndarray:
    """One string per row that names it and the run that wrote it (keys and run_id), for set operations."""
    parts = [pc.cast(table.column(k), pa.string()) for k in [*keys, "run_id"]]
    joined = pc.binary_join_element_wise(*parts, "\x1f")
    return joined.to_numpy(zero_copy_only=False).astype(object)
