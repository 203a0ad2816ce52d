"""Search and dedup at scale: `featurize index`, `search` and `dedup` over a synthetic OUTPUT of N x D features.

    python -m benchmarks.search                                  # 1,000,000 x 1152 (the targets' size; long)
    nice -n 10 python -m benchmarks.search --rows 100000         # a quick check
    python -m benchmarks.search --rows 20000 --dim 256 --queries 200

The OUTPUT is written as real shards (`part-NNNNN.parquet`, the image schema of a features-only run: float16
L2-normalised `image_features`, uri, status, run_id, ...) with `_dataset.json`, once per size under the work folder
(`bench-out/search-<rows>x<dim>/`), and reused. Its rows come from a clustered model of embeddings, so that nearest
neighbours mean something: clusters of about 500 rows around random unit centres, each row its centre plus a point
of an 8-d latent space (a per-cluster scale) plus isotropic noise, normalised; a row's nearest neighbours are rows of
its cluster close in the latent space (cosine about 0.85 on average, rarely above 0.94). Planted near-duplicates
model three edits of an image, as offsets from the original's vector: re-encodes (cosine >= 0.995), colour shifts
(a shift along one shared "colour" direction, cosine about 0.98) and crops (cosine 0.96-0.975); 1% of the
originals get one to three copies each. Held-out queries (--queries) are drawn like rows but are not written.

Measured, each command a subprocess whose peak RSS is the kernel's high-water mark (ru_maxrss, read by a wrapper
process that waits for it):
  index    `featurize index OUT`: wall time, peak RSS, the index type chosen and its calibrated nprobe.
  search   in this process, the index loaded: recall@10 of the held-out queries against exact search (all rows
           streamed, float32), and the latency of one query at k = 10 (median and p95 over the queries; the query
           vector given, text encoding excluded), and of encoding one text query with a ConceptCLIP-shaped text
           tower on CPU (reported separately).
  dedup    `featurize dedup OUT --out groups.parquet` at the default threshold: wall time, peak RSS, and precision
           and recall of the pairs within its groups against the pairs within the planted groups.
Targets at 1,000,000 x 1152 on the 2-core machine: index <= 15 min and <= 4 GB, recall@10 >= 0.95, <= 20 ms a query;
dedup <= 15 min and <= 4 GB, precision and recall >= 0.95. Writes benchmarks/results/<timestamp>-search.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import common  # noqa: E402
from .common import log  # noqa: E402

CLUSTER_ROWS = 500
LATENT = 8
NOISE = 0.4
SCALE = 0.35
PLANTED_FRACTION = 0.01
RUN_ID = "20260101T000000Z-synth0"
TARGETS = {
    "index_wall_s": 15 * 60,
    "index_peak_rss_gb": 4.0,
    "recall_at_10": 0.95,
    "query_ms_median": 20.0,
    "dedup_wall_s": 15 * 60,
    "dedup_peak_rss_gb": 4.0,
    "dedup_precision": 0.95,
    "dedup_recall": 0.95,
}


class Model:
    """The clustered model of embeddings (see the module docstring), fixed by `seed`."""

    def __init__(self, rows: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.clusters = max(1, rows // CLUSTER_ROWS)
        centres = rng.standard_normal((self.clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        basis = rng.standard_normal((dim, LATENT), dtype=np.float32)
        self.basis = basis / np.linalg.norm(basis, axis=0, keepdims=True)
        self.scales = (rng.uniform(0.5, 1.5, self.clusters) * SCALE).astype(np.float32)
        colour = rng.standard_normal(dim).astype(np.float32)
        self.colour = colour / np.linalg.norm(colour)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        cluster = rng.integers(0, self.clusters, n)
        latent = rng.standard_normal((n, LATENT), dtype=np.float32) * self.scales[cluster, None]
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) * (NOISE / np.sqrt(self.dim))
        return unit(self.centres[cluster] + latent @ self.basis.T + noise)

    def edit(self, rng: np.random.Generator, original: np.ndarray, kind: str) -> np.ndarray:
        """A near-duplicate of `original` (one row) made by an edit of `kind`."""
        offset = rng.standard_normal(self.dim).astype(np.float32)
        offset /= np.linalg.norm(offset)
        if kind == "reencode":
            return unit(original + offset * rng.uniform(0.05, 0.1))
        if kind == "colour":
            return unit(original + self.colour * rng.uniform(0.12, 0.2) + offset * 0.05)
        return unit(original + offset * rng.uniform(0.22, 0.29))  # crop


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_output(folder: Path, rows: int, dim: int, shard_rows: int, queries: int, seed: int = 0) -> dict:
    """The synthetic OUTPUT (once per size), the held-out queries and the planted groups (truth.npz beside it)."""
    import pyarrow as pa

    from pipeline.schema import IMAGE_SCHEMA, fixed_list
    from pipeline.sources import image_id
    from pipeline.write import OutputDir

    truth_path = folder / "truth.npz"
    if truth_path.is_file():
        truth = np.load(truth_path)
        return {"output": str(folder / "out"), "queries": truth["queries"], "groups": truth["groups"]}
    model = Model(rows, dim, seed)
    rng = np.random.default_rng(seed + 1)
    planted = int(rows * PLANTED_FRACTION)
    copies = rng.integers(1, 4, planted)
    originals = np.sort(rng.choice(rows - int(copies.sum()), planted, replace=False))
    base_rows = rows - int(copies.sum())
    out = OutputDir(str(folder / "out"))
    schema = IMAGE_SCHEMA.remove(IMAGE_SCHEMA.get_field_index("concept_logits"))
    kept = np.zeros((planted, dim), np.float32)
    groups = np.full(rows, -1, np.int64)  # row -> its planted group (the original's position in `originals`)
    groups[originals] = np.arange(planted)

    def shard(unit_no: int, first: int, features: np.ndarray, uris: list[str]) -> None:
        n = len(uris)
        ok = np.ones(n, bool)
        table = pa.table(
            {
                "image_id": [image_id(u) for u in uris],
                "uri": uris,
                "status": ["ok"] * n,
                "error": pa.nulls(n, pa.string()),
                "width": pa.array(np.full(n, 640, np.int32)),
                "height": pa.array(np.full(n, 480, np.int32)),
                "image_features": fixed_list(features.astype(np.float16), pa.float16(), ok),
                "size": pa.array(np.full(n, 1000, np.int64)),
                "mtime": pa.array(np.zeros(n)),
                "etag": pa.nulls(n, pa.string()),
                "run_id": [RUN_ID] * n,
                "dataset_version": pa.array(np.ones(n, np.int32)),
            },
            schema=schema,
        )
        out.write_table(table, f"part-{unit_no:05d}.parquet")

    unit_no = 0
    for first in range(0, base_rows, shard_rows):
        n = min(shard_rows, base_rows - first)
        features = model.draw(rng, n)
        inside = (originals >= first) & (originals < first + n)
        kept[inside] = features[originals[inside] - first]
        shard(unit_no, first, features, [f"/data/img_{i:08d}.jpg" for i in range(first, first + n)])
        unit_no += 1
        log(f"wrote {first + n} of {rows} rows")
    kinds = np.array(["reencode", "colour", "crop"])
    edited, uris, row = [], [], base_rows
    for group, (original, count) in enumerate(zip(originals, copies)):
        for kind in kinds[rng.permutation(3)[:count]]:
            edited.append(model.edit(rng, kept[group], kind))
            uris.append(f"/data/img_{original:08d}.{kind}.jpg")
            groups[row] = group
            row += 1
    for first in range(0, len(uris), shard_rows):
        shard(unit_no, base_rows + first, np.array(edited[first : first + shard_rows]), uris[first : first + shard_rows])
        unit_no += 1
    identity = {
        "model": "synthetic",
        "kind": "clip",
        "revision": None,
        "dtype": "float32",
        "prompt_set_hash": None,
        "features": "embedding",
    }
    out.write_json({"identity": identity, "version": 1, "readable_version": 1}, "_dataset.json")
    held_out = model.draw(np.random.default_rng(seed + 2), queries)
    np.savez(truth_path, queries=held_out, groups=groups)
    return {"output": str(out.url), "queries": held_out, "groups": groups}
