"""`featurize dedup`: near-duplicate groups among an OUTPUT's current ok rows, or its rows that near-duplicate rows of
another OUTPUT made with the same model (train/test leakage).

A pair is a near-duplicate when the cosine similarity of its features (L2-normalised in float32) is at least the
threshold; groups are the connected components of such pairs. Every pair is found exactly within a partition:
  - up to `exact_rows` rows, one partition: all rows against all, in blocks;
  - above, out of core, as SemDeDup and NVIDIA's curator do: spherical k-means centroids (about `partition_rows`
    rows each) trained on a sample; each row lives in its nearest centroid's partition (home) and visits the
    partitions of the others of its ASSIGN nearest that are within MARGIN of the nearest (a guest). MARGIN is twice
    the distance between two unit vectors at the threshold: two such rows differ by at most half of it in their
    similarity to any unit centroid, so when their homes differ, each is a guest in the other's home, unless more
    than ASSIGN centroids crowd in. In a partition every row is compared with its home rows (guests with guests are
    not: that pair meets in a home of its own). Rows are spilled to local files (float16) in buckets of partitions,
    and each bucket is read back alone: memory holds one bucket, never all features.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .config import DEDUP_THRESHOLD as DEFAULT_THRESHOLD
from .errors import UserError
from .index import require_faiss
from .vectors import Vectors, normalised, open_vectors

EXACT_ROWS = 20_000
PARTITION_ROWS = 1_000
ASSIGN = 3  # the most partitions one row is compared in
TRAIN_ROWS = 100_000
BUCKET_BYTES = 256 * 2**20  # spilled features read back at a time
BLOCK_VALUES = 2**24  # similarities computed at a time (64 MB)


@dataclass
class Pairs:
    """Near-duplicate pairs by row number (of the combined rows: OUTPUT's first, then OTHER's), a < b."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray


def find_pairs(
    sides: list[Vectors],
    threshold: float,
    exact_rows: int = EXACT_ROWS,
    partition_rows: int = PARTITION_ROWS,
) -> Pairs:
    """The pairs at or above `threshold` among the rows of sides[0] (one side), or between sides[0] and sides[1]."""
    total = sum(v.rows.num_rows for v in sides)
    if total == 0 or (len(sides) == 2 and not all(v.rows.num_rows for v in sides)):
        return _pairs([])
    partitions = 1 if total <= exact_rows else math.ceil(total / partition_rows)
    if partitions > 1:
        require_faiss()
    centroids = _centroids(sides, partitions) if partitions > 1 else None
    margin = 2 * math.sqrt(max(0.0, 2 - 2 * threshold))
    dim = next(sides[0].batches(sides[0].rows.slice(0, 1)))[1].shape[1]
    with tempfile.TemporaryDirectory(prefix="featurize-dedup-") as scratch:
        buckets = Spill(scratch, partitions, total, dim)
        offset = 0
        for side, vectors in enumerate(sides):
            for batch, features in vectors.batches(stored=True):
                rows = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
                parts = _assign(normalised(features), centroids, margin)
                buckets.add(rows, np.full(len(rows), side, np.int8), parts, features)
                offset += batch.num_rows
        found = [
            _within(features[members], rows[members], side[members], home[members], threshold, len(sides) == 2)
            for rows, side, home, features, members in buckets.partitions()
        ]
    return _pairs(found)


def _centroids(sides: list[Vectors], partitions: int) -> np.ndarray:
    """Spherical k-means centroids from a random sample of the rows of both sides."""
    import faiss

    total = sum(v.rows.num_rows for v in sides)
    sample = []
    for vectors in sides:  # each side in proportion to its rows
        share = math.ceil(TRAIN_ROWS * vectors.rows.num_rows / total)
        sample += [x for _, x in vectors.batches(vectors.sample(share))] if vectors.rows.num_rows else []
    sample = np.concatenate(sample)
    kmeans = faiss.Kmeans(sample.shape[1], min(partitions, len(sample)), niter=10, spherical=True, seed=0)
    kmeans.cp.min_points_per_centroid = 1
    kmeans.train(sample)
    return kmeans.centroids


def _assign(features: np.ndarray, centroids: np.ndarray | None, margin: float) -> np.ndarray:
    """[n, ASSIGN] partitions of each row: its nearest centroid, then others within `margin` of it (-1: none)."""
    if centroids is None:
        return np.zeros((len(features), 1), np.int32)
    import faiss

    nearest = faiss.IndexFlatIP(centroids.shape[1])
    nearest.add(centroids)
    scores, parts = nearest.search(features, min(ASSIGN, len(centroids)))
    parts[scores < scores[:, :1] - margin] = -1
    return parts.astype(np.int32)


class Spill:
    """Rows spilled to local files by partition, `buckets` of partitions a file, and read back bucket by bucket. The
    features are spilled as stored (float16), so a partition's similarities are those of the stored values."""

    def __init__(self, folder: str, partitions: int, rows: int, dim: int):
        self.folder, self.dim = folder, dim
        self.buckets = max(1, min(partitions, math.ceil(rows * ASSIGN * dim * 2 / BUCKET_BYTES)))
        self.files = [
            {kind: open(os.path.join(folder, f"{b}.{kind}"), "wb") for kind in ("row", "side", "part", "x")}
            for b in range(self.buckets)
        ]

    def add(self, rows: np.ndarray, side: np.ndarray, parts: np.ndarray, features: np.ndarray) -> None:
        """Rows with their side (0: OUTPUT, 1: OTHER) and partitions (column 0 their home, then guest visits)."""
        features = features.astype(np.float16)
        for column in range(parts.shape[1]):
            keep = parts[:, column] >= 0
            bucket = parts[:, column] % self.buckets
            flags = (side | (2 if column else 0)).astype(np.int8)  # bit 1: a guest here
            for b in np.unique(bucket[keep]):
                chosen = keep & (bucket == b)
                files = self.files[int(b)]
                rows[chosen].tofile(files["row"])
                flags[chosen].tofile(files["side"])
                parts[chosen, column].tofile(files["part"])
                features[chosen].tofile(files["x"])

    def partitions(self):
        """(rows, sides, home, features, members) per non-empty partition, a bucket in memory at a time."""
        for files in self.files:
            for f in files.values():
                f.close()
        for b in range(self.buckets):
            path = os.path.join(self.folder, str(b))
            parts = np.fromfile(f"{path}.part", np.int32)
            if not len(parts):
                continue
            rows, flags = np.fromfile(f"{path}.row", np.int64), np.fromfile(f"{path}.side", np.int8)
            features = np.fromfile(f"{path}.x", np.float16).reshape(len(parts), self.dim)
            order = np.argsort(parts, kind="stable")
            bounds = np.flatnonzero(np.diff(parts[order])) + 1
            for members in np.split(order, bounds):
                yield rows, flags & 1, (flags & 2) == 0, features, members
            del features
            for kind in ("row", "side", "part", "x"):
                os.unlink(f"{path}.{kind}")


def _within(
    features: np.ndarray, rows: np.ndarray, sides: np.ndarray, home: np.ndarray, threshold: float, across: bool
) -> list:
    """Pairs (a, b, similarity) at or above the threshold in one partition: each row against the home rows; with
    `across` only pairs of a row of side 0 and one of side 1, one of them at home."""
    x = normalised(features)
    if across:
        ours, theirs = sides == 0, sides == 1
        blocks = [(ours, theirs & home), (ours & home, theirs & ~home)]
    else:
        blocks = [(np.ones(len(rows), bool), home)]
    found = []
    for left_mask, right_mask in blocks:
        left, right = np.flatnonzero(left_mask), np.flatnonzero(right_mask)
        step = max(1, BLOCK_VALUES // max(1, len(right)))
        for start in range(0, len(left) if len(right) else 0, step):
            block = left[start : start + step]
            scores = x[block] @ x[right].T
            i, j = np.nonzero(scores >= threshold)
            a, b = rows[block[i]], rows[right[j]]
            keep = a != b
            found.append((np.minimum(a, b)[keep], np.maximum(a, b)[keep], scores[i, j][keep]))
    return found


def _pairs(found: list) -> Pairs:
    parts = [p for group in found for p in group]
    if not parts:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    a, b, s = (np.concatenate(column) for column in zip(*parts))
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)  # a pair met in two partitions
    return Pairs(a[first], b[first], s[first].astype(np.float32))


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The connected component of each of n nodes given the edges (a, b): the smallest node of its component.
    Hooking and pointer jumping over numpy arrays, so millions of nodes need no Python loop per node."""
    parent = np.arange(n, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        low, high = np.minimum(ra, rb), np.maximum(ra, rb)
        moved = low != high
        if not moved.any():
            break
        np.minimum.at(parent, high[moved], low[moved])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _nearest(pairs: Pairs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, its most similar partner (-1: none) and that similarity."""
    rows = np.concatenate([pairs.a, pairs.b])
    partners = np.concatenate([pairs.b, pairs.a])
    scores = np.concatenate([pairs.similarity, pairs.similarity])
    order = np.lexsort((partners, -scores, rows))
    rows, partners, scores = rows[order], partners[order], scores[order]
    first = np.r_[True, rows[1:] != rows[:-1]] if len(rows) else np.zeros(0, bool)
    nearest = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    nearest[rows[first]], similarity[rows[first]] = partners[first], scores[first]
    return nearest, similarity


def groups_table(sides: list[Vectors], pairs: Pairs) -> pa.Table:
    """One row per row of OUTPUT in a group: group (numbered in OUTPUT's row order), group_size, the row's keys,
    nearest_<key> (its most similar member; with another OUTPUT, its most similar row there), similarity and, with
    another OUTPUT, matches (how many of its rows are near-duplicates)."""
    n = sum(v.rows.num_rows for v in sides)
    mine = sides[0].rows.num_rows
    keys = sides[0].keys
    nearest, similarity = _nearest(pairs, n)
    root = components(n, pairs.a, pairs.b)
    members = np.flatnonzero(nearest[:mine] >= 0)
    roots, group, size = np.unique(root[members], return_inverse=True, return_counts=True)
    combined = pa.concat_tables([v.rows.select(keys) for v in sides])
    columns = {"group": pa.array(group.astype(np.int64)), "group_size": pa.array(size[group].astype(np.int64))}
    columns.update({k: combined.column(k).take(pa.array(members)) for k in keys})
    partner = combined.take(pa.array(nearest[members]))
    columns.update({f"nearest_{k}": partner.column(k) for k in keys if k != "image_id"})
    columns["similarity"] = pa.array(similarity[members])
    if len(sides) == 2:
        counts = np.bincount(np.concatenate([pairs.a, pairs.b]), minlength=n)
        columns["matches"] = pa.array(counts[members].astype(np.int64))
        del columns["group_size"]
    table = pa.table(columns)
    return table.take(pa.array(np.lexsort((-similarity[members], group)), pa.int64())) if len(members) else table


def check_comparable(a: Vectors, b: Vectors, other: str) -> None:
    """--against needs the same features: model, revision, kind and feature kind."""
    mine = {**a.identity, "features": a.features}
    theirs = {**b.identity, "features": b.features}
    diff = [f for f in ("model", "revision", "kind", "features") if mine.get(f) != theirs.get(f)]
    if diff:
        detail = ", ".join(f"{f} {theirs.get(f)!r} vs {mine.get(f)!r}" for f in diff)
        raise UserError(
            f"--against {other} was made with other features ({detail}): near-duplicates can only be found between "
            "OUTPUTs of the same model and feature kind"
        )


def dedup(
    output: str,
    threshold: float = DEFAULT_THRESHOLD,
    against: str | None = None,
    storage_options: dict | None = None,
    exact_rows: int = EXACT_ROWS,
    partition_rows: int = PARTITION_ROWS,
) -> tuple[pa.Table, dict]:
    """The groups table (see groups_table) and counts for the summary line."""
    if not -1.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: a cosine similarity is between -1 and 1")
    sides = [open_vectors(output, storage_options)]
    if against is not None:
        sides.append(open_vectors(against, storage_options))
        check_comparable(sides[0], sides[1], against)
    pairs = find_pairs(sides, threshold, exact_rows, partition_rows)
    table = groups_table(sides, pairs)
    counts = {
        "rows": sides[0].rows.num_rows,
        "against_rows": sides[1].rows.num_rows if against else None,
        "pairs": len(pairs.a),
        "groups": int(len(np.unique(table.column("group").to_numpy()))) if table.num_rows else 0,
        "in_groups": table.num_rows,
    }
    return table, counts


def summary(counts: dict, threshold: float, against: str | None, out: str) -> str:
    if against:
        return (
            f"featurize: {counts['in_groups']} of {counts['rows']} rows near-duplicate rows of {against} "
            f"({counts['against_rows']} rows; cosine >= {threshold:g}, {counts['pairs']} pairs) -> {out}"
        )
    return (
        f"featurize: {counts['groups']} groups of near-duplicates hold {counts['in_groups']} of {counts['rows']} "
        f"rows (cosine >= {threshold:g}, {counts['pairs']} pairs; keeping one per group drops "
        f"{counts['in_groups'] - counts['groups']}) -> {out}"
    )
