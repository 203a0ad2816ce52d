"""What `featurize report` reads from an OUTPUT's current rows: one streaming pass (ScoredOutput.chunks, a shard at a
time) for the counts, the error reasons grouped with example rows, per concept the top k rows by logit, and a
deterministic sample of ok rows' features for the 2-D map; then one pass over the logits for the histograms.

Memory stays bounded whatever the OUTPUT's size: k rows per concept, EXAMPLES_PER_REASON rows per error reason,
`map_points` feature vectors, HIST_BINS counts per concept, besides one shard's columns at a time.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UserError
from .labels import probabilities
from .rescore import ScoredOutput, logits_matrix

HIST_BINS = 40
EXAMPLES_PER_REASON = 3
TOP_K = 8  # rows shown per concept
MAP_POINTS = 3000  # ok rows in the 2-D map
MAP_SEED = 0


def reason_key(reason: str, uri: str) -> str:
    """An error reason with what is particular to the input (its uri, file name, long numbers) taken out, so
    the same failure on many inputs is one group."""
    text = reason or "(no reason given)"
    for part in sorted({uri, uri.rsplit("/", 1)[-1]} - {""}, key=len, reverse=True):
        text = text.replace(part, "…")
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text)  # object addresses (<_io.BytesIO object at 0x7f...>)
    return re.sub(r"\d{4,}", "N", text)


@dataclass(frozen=True)
class Pick:
    """One row chosen to be shown: its key columns (uri; slide_id, uri, x, y, level), logit and probability."""

    key: dict
    logit: float
    probability: float | None
    order: int  # the row's place in the scan: among equal logits the first row wins


class ConceptTopK:
    """Per concept, the k rows with the highest logits seen so far (ties: the row seen first)."""

    def __init__(self, n_concepts: int, k: int):
        self.k = k
        self.best: list[list[Pick]] = [[] for _ in range(n_concepts)]

    def add(self, keys: pa.Table, logits: np.ndarray, probs: np.ndarray | None, first: int) -> None:
        """`keys` and `logits` [N, K] of a chunk's ok rows; `first`: the scan order of its first row."""
        if not self.k or not len(logits):
            return
        take = min(self.k, len(logits))
        order = np.argsort(-logits, axis=0, kind="stable")[:take]  # [take, K] row indices
        rows = np.unique(order)
        key_rows = dict(zip(rows.tolist(), keys.take(pa.array(rows)).to_pylist()))
        for j, best in enumerate(self.best):
            new = [
                Pick(key_rows[i], float(logits[i, j]), None if probs is None else float(probs[i, j]), first + i)
                for i in order[:, j].tolist()
            ]
            self.best[j] = sorted(best + new, key=lambda p: (-p.logit, p.order))[: self.k]


class MapSample:
    """At most `points` ok rows' features, chosen by a seeded hash of each row's key: the same rows whatever the
    shards' layout, so the same OUTPUT always draws the same map."""

    def __init__(self, points: int, seed: int = MAP_SEED):
        self.points, self.salt = points, f"{seed}\x1f".encode()
        self.hashes = np.zeros(0, np.uint64)
        self.features: np.ndarray | None = None
        self.top = np.zeros(0, np.int64)  # each row's top concept (-1: no logits)
        self.note: str | None = None  # why there is no map
        self.offered = 0  # the ok rows the sample was drawn from

    def _hash(self, key: str) -> int:
        return int.from_bytes(hashlib.blake2b(self.salt + key.encode(), digest_size=8).digest(), "little")

    def add(self, key_text: list[str], features: pa.Array, top: np.ndarray) -> None:
        if self.note is not None or not self.points or not key_text:
            return
        self.offered += len(key_text)
        hashes = np.fromiter((self._hash(k) for k in key_text), np.uint64, len(key_text))
        if len(self.hashes) >= self.points:  # only rows that would enter the sample are converted
            keep = np.nonzero(hashes < self.hashes.max())[0]
        else:
            keep = np.arange(len(hashes))
        if not len(keep):
            return
        try:
            vectors = logits_matrix(features.take(pa.array(keep)))
        except UserError:  # rows of different widths (multi-crop features)
            self.note, self.features = "the rows hold features of different widths (multi-crop): no map", None
            return
        if self.features is not None and vectors.shape[1] != self.features.shape[1]:
            self.note, self.features = "the rows hold features of different widths: no map", None
            return
        stacked = vectors if self.features is None else np.concatenate([self.features, vectors])
        hashes = np.concatenate([self.hashes, hashes[keep]])
        tops = np.concatenate([self.top, top[keep]])
        chosen = np.sort(np.argsort(hashes, kind="stable")[: self.points])
        self.hashes, self.features, self.top = hashes[chosen], stacked[chosen], tops[chosen]


def key_text(keys: pa.Table) -> list[str]:
    """Each row's key as one string (uri; for tiles uri, x, y, level)."""
    if "x" not in keys.column_names:
        return keys.column("uri").to_pylist()
    columns = [keys.column(c).to_pylist() for c in ("uri", "x", "y", "level")]
    return ["\x1f".join(map(str, parts)) for parts in zip(*columns)]


class RowSummary:
    """Counts, grouped error reasons, per-concept top rows and logit histograms, and the map's sample over an
    OUTPUT's current rows."""

    def __init__(self, source: ScoredOutput, top_k: int = TOP_K, map_points: int = MAP_POINTS):
        self.source = source
        self.counts: Counter = Counter()
        self.reasons: dict[str, dict] = {}
        self.with_logits = source.has_logits
        self.key_columns = [c for c in source.keys if c in source.columns]
        k = len(source.concepts) if self.with_logits else 0
        self.low, self.high = np.full(k, np.inf), np.full(k, -np.inf)
        self.total, self.n, self.seen = np.zeros(k), 0, 0
        self.top = ConceptTopK(k, top_k)
        self.map = MapSample(map_points if "image_features" in source.columns else 0)
        if "image_features" not in source.columns:
            self.map.note = "this OUTPUT stores no image features (a rescore's OUT2 holds logits only)"
        self.kind = source.identity.get("kind", "")
        columns = (
            list(dict.fromkeys([*self.key_columns, "status"]))
            + (["error"] if "error" in source.columns else [])
            + (["concept_logits"] if self.with_logits else [])
            + (["image_features"] if self.map.points else [])
        )
        for chunk in source.chunks(columns) if source.shards else ():
            self._count(chunk)
            self._ok_rows(chunk)
            self.seen += chunk.num_rows
        self.histograms = self._histograms() if self.with_logits and self.n else []

    def _count(self, chunk: pa.Table) -> None:
        status = chunk.column("status").to_pylist()
        self.counts.update(status)
        failed = [i for i, s in enumerate(status) if s != "ok"]
        if not failed:
            return
        uris = chunk.column("uri").to_pylist()
        errors = chunk.column("error").to_pylist() if "error" in chunk.column_names else [None] * len(uris)
        keys = chunk.select(self.key_columns)
        for i in failed:
            group = self.reasons.setdefault(
                reason_key(errors[i], uris[i]), {"count": 0, "examples": [], "rows": [], "reason": errors[i]}
            )
            group["count"] += 1
            if len(group["examples"]) < EXAMPLES_PER_REASON:
                group["examples"].append(uris[i])
                group["rows"].append({**keys.slice(i, 1).to_pylist()[0], "error": errors[i]})

    def _ok_rows(self, chunk: pa.Table) -> None:
        ok = pc.fill_null(pc.equal(chunk.column("status"), "ok"), False)
        if self.with_logits:
            scored = chunk.filter(pc.fill_null(pc.and_(ok, pc.is_valid(chunk.column("concept_logits"))), False))
            if scored.num_rows:
                logits = logits_matrix(scored.column("concept_logits"))
                self.low = np.minimum(self.low, logits.min(axis=0))
                self.high = np.maximum(self.high, logits.max(axis=0))
                self.total += logits.sum(axis=0, dtype=np.float64)
                self.n += len(logits)
                self.top.add(scored.select(self.key_columns), logits, self._probabilities(logits), self.seen)
        if not self.map.points:
            return
        mapped = pc.and_(ok, pc.is_valid(chunk.column("image_features")))
        if self.with_logits:
            mapped = pc.and_(mapped, pc.is_valid(chunk.column("concept_logits")))
        rows = chunk.filter(pc.fill_null(mapped, False))
        if rows.num_rows:
            top = (  # ties: the first concept, as `featurize labels` ranks
                np.argmax(logits_matrix(rows.column("concept_logits")), axis=1)
                if self.with_logits
                else np.full(rows.num_rows, -1, np.int64)
            )
            self.map.add(key_text(rows.select(self.key_columns)), rows.column("image_features"), top)

    def _probabilities(self, logits: np.ndarray) -> np.ndarray | None:
        try:
            return probabilities(logits, self.kind)
        except UserError:  # a family this version does not know: logits only
            return None

    @staticmethod
    def _ok_logits(chunk) -> np.ndarray:
        ok = pc.fill_null(
            pc.and_(pc.equal(chunk.column("status"), "ok"), pc.is_valid(chunk.column("concept_logits"))), False
        )
        return logits_matrix(chunk.column("concept_logits").filter(ok))

    def _histograms(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Second pass: per concept, counts over HIST_BINS equal bins between its lowest and highest logit."""
        edges = []
        for lo, hi in zip(self.low, self.high):
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges.append(np.linspace(lo, hi, HIST_BINS + 1))
        counts = [np.zeros(HIST_BINS, np.int64) for _ in edges]
        for chunk in self.source.chunks(["uri", "status", "concept_logits"]):
            logits = self._ok_logits(chunk)
            for j, e in enumerate(edges):
                counts[j] += np.histogram(logits[:, j], bins=e)[0] if len(logits) else 0
        return list(zip(counts, edges))

    def error_rows(self, limit: int) -> list[dict]:
        """Up to `limit` example error rows: the most frequent reasons first, their examples in scan order."""
        groups = sorted(self.reasons.values(), key=lambda g: (-g["count"], str(g["reason"])))
        return [row for g in groups for row in g["rows"]][:limit]
