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

from .dataset import readable_version
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
            done = 0
            for features in shard_batches(
                self.url, self.storage_options, path, chosen.column("row").to_numpy(), batch_rows, not stored
            ):
                yield chosen.slice(done, len(features)), features
                done += len(features)

    def sample(self, count: int, seed: int = 0) -> pa.Table:
        """About `count` rows chosen at random (in self.rows' order) from random row groups holding at least twice as
        many, so that reading the sample reads a part of the OUTPUT, not all of it; all rows when there are few."""
        n = self.rows.num_rows
        if count >= n:
            return self.rows
        rng = np.random.default_rng(seed)
        shard_of, row_of = self.rows.column("shard").to_numpy(), self.rows.column("row").to_numpy()
        groups = []  # (first, last) positions in self.rows of each row group's rows
        for shard in np.unique(shard_of):
            first, last = np.searchsorted(shard_of, [shard, shard + 1])
            fs, _ = filesystem(self.url, self.storage_options)
            with fs.open(self.shards[int(shard)], "rb") as f:
                metadata = pq.ParquetFile(f).metadata
            ends = np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
            bounds = first + np.searchsorted(row_of[first:last], np.r_[0, ends], side="left")
            groups += [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        chosen, total = [], 0
        for i in rng.permutation(len(groups)):
            chosen.append(groups[i])
            total += groups[i][1] - groups[i][0]
            if total >= 2 * count:
                break
        candidates = np.concatenate([np.arange(a, b) for a, b in chosen])
        picked = np.sort(rng.choice(candidates, min(count, len(candidates)), replace=False))
        return self.rows.take(pa.array(picked, pa.int64()))


def shard_batches(
    url: str,
    storage_options: dict | None,
    path: str,
    positions: np.ndarray,
    batch_rows: int = BATCH_ROWS,
    normalise: bool = True,
) -> Iterator[np.ndarray]:
    """The image_features of the rows at `positions` (ascending) of one shard, in order, at most `batch_rows` rows
    a batch: [n, D] float32 L2-normalised (else as stored). Each row group that holds some is read once; the
    others are not read."""
    fs, _ = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        group_of = np.searchsorted(starts, positions, side="right") - 1
        pending: list[np.ndarray] = []
        for group in np.unique(group_of):
            column = parquet.read_row_group(int(group), columns=["image_features"]).column(0)
            pending.append(_matrix(column.take(pa.array(positions[group_of == group] - starts[group])), path))
            while sum(len(p) for p in pending) >= batch_rows:
                values = np.concatenate(pending)
                yield normalised(values[:batch_rows]) if normalise else values[:batch_rows]
                pending = [values[batch_rows:]]
        if pending and sum(len(p) for p in pending):
            values = np.concatenate(pending)
            yield normalised(values) if normalise else values


def shard_features(url: str, storage_options: dict | None, path: str, positions: np.ndarray) -> np.ndarray:
    """The rows at `positions` of one shard, [n, D] float32 L2-normalised, at once (what a Ray task reads)."""
    return np.concatenate(list(shard_batches(url, storage_options, path, positions, len(positions) or 1)))


def _matrix(column, path: str) -> np.ndarray:
    """A list<float16> column without nulls -> [n, D] float16."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise UserError(f"{path}: a current ok row has no image_features; the shard is damaged")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def feature_identity(identity: dict, version: int) -> dict:
    """What the stored features depend on (the identity less the prompt set), with the dataset version."""
    return {**{k: v for k, v in identity.items() if k not in NOT_FEATURE_KEYS}, "dataset_version": int(version)}


def check_one_vector_a_row(identity: dict, url: str) -> None:
    """Refuses multi-crop features: a row holds every crop's token grid, not one vector to compare."""
    if identity.get("crops"):
        raise UserError(
            f"{url} stores multi-crop features ({identity['crops']}): each row is every crop's token grid, not one "
            "vector to compare; index, search and dedup take embeddings or one view's hidden features"
        )


def normalised(features: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def read_dataset(out: OutputDir) -> dict:
    """OUTPUT's _dataset.json; an OUTPUT that has none (or a rescore's OUT2, which stores no features) is refused."""
    dataset = out.read_json("_dataset.json")
    if dataset is None:
        rescored = out.read_json("_rescore.json")
        why = "it is a rescore's OUT2, which stores no image_features" if rescored else "no _dataset.json"
        raise UserError(
            f"{out.url} holds no featurised output ({why}); pass the OUTPUT of `featurize images` or `slides`"
        )
    return dataset


def open_vectors(output: str, storage_options: dict | None = None) -> Vectors:
    """The current ok rows of `output` (images or slides). An OUTPUT without rows yet gives no rows; one that is not an
    OUTPUT, or a rescore's OUT2 (no features), is refused."""
    out = OutputDir(output, storage_options)
    dataset = read_dataset(out)
    identity = dict(dataset.get("identity", {}))
    check_one_vector_a_row(identity, output)
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
