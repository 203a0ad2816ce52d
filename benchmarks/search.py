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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common
from .common import log

GB = 1024**3

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
    import pyarrow.parquet as pq

    from pipeline.schema import IMAGE_SCHEMA, fixed_list
    from pipeline.sources import image_id
    from pipeline.write import SHARD_ROW_GROUP_BYTES, OutputDir

    truth_path = folder / "truth.npz"
    if truth_path.is_file():
        truth = dict(np.load(truth_path))
        return {"output": str(folder / "out"), **truth}
    model = Model(rows, dim, seed)
    rng = np.random.default_rng(seed + 1)
    planted = int(rows * PLANTED_FRACTION)
    copies = rng.integers(1, 4, planted)
    originals = np.sort(rng.choice(rows - int(copies.sum()), planted, replace=False))
    base_rows = rows - int(copies.sum())
    out = OutputDir(str(folder / "out"))
    Path(out.path).mkdir(parents=True, exist_ok=True)
    schema = IMAGE_SCHEMA.remove(IMAGE_SCHEMA.get_field_index("concept_logits"))
    kept = np.zeros((planted, dim), np.float32)

    def shard(unit_no: int, features: np.ndarray, uris: list[str]) -> None:
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
        group_rows = max(64, SHARD_ROW_GROUP_BYTES // (dim * 2 + 120))  # row groups of ~8 MB, as the pipeline writes
        pq.write_table(
            table, Path(out.path) / f"part-{unit_no:05d}.parquet", row_group_size=group_rows, compression="zstd"
        )

    unit_no = 0
    for first in range(0, base_rows, shard_rows):
        n = min(shard_rows, base_rows - first)
        features = model.draw(rng, n)
        inside = (originals >= first) & (originals < first + n)
        kept[inside] = features[originals[inside] - first]
        shard(unit_no, features, [f"/data/img_{i:08d}.jpg" for i in range(first, first + n)])
        unit_no += 1
        log(f"wrote {first + n} of {rows} rows")
    kinds = np.array(["reencode", "colour", "crop"])
    edited, uris = [], []
    truth_uris = [f"/data/img_{original:08d}.jpg" for original in originals]
    truth_groups = list(range(planted))
    for group, (original, count) in enumerate(zip(originals, copies)):
        for kind in kinds[rng.permutation(3)[:count]]:
            edited.append(model.edit(rng, kept[group], kind))
            uris.append(f"/data/img_{original:08d}.{kind}.jpg")
            truth_uris.append(uris[-1])
            truth_groups.append(group)
    for first in range(0, len(uris), shard_rows):
        shard(unit_no, np.array(edited[first : first + shard_rows]), uris[first : first + shard_rows])
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
    truth = {
        "queries": model.draw(np.random.default_rng(seed + 2), queries),
        "planted_uris": np.array(truth_uris),
        "planted_groups": np.array(truth_groups, np.int64),
    }
    np.savez(truth_path, **truth)
    return {"output": str(out.url), **truth}


# -- measuring ------------------------------------------------------------------------------------------------------
def measured(args: list[str], interval: float = 0.1) -> dict:
    """A `featurize` subprocess: wall seconds, CPU seconds (user + system, from wait4), its peak RSS (the kernel's
    high-water mark VmHWM of that process, read from /proc every `interval` s until it exits; wait4's ru_maxrss
    would carry this process's own peak across the fork), the load average around it, its stderr. On a shared
    machine the CPU seconds say what the command costs; the wall time says what the neighbours left it."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=common.quiet_env(), stderr=err)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _hwm(proc.pid))
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode:
        raise SystemExit(f"featurize {' '.join(args)} failed ({proc.returncode}):\n{stderr}")
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(peak / GB, 3),
        "loadavg": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "stderr": stderr.strip(),
    }


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def exact_top(output: str, queries: np.ndarray, k: int) -> np.ndarray:
    """The ids (row numbers in read order) of each query's k nearest rows, every row scanned in float32."""
    from pipeline.vectors import open_vectors

    vectors = open_vectors(output)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    done = 0
    for batch, features in vectors.batches(batch_rows=32768):
        s = np.concatenate([scores, queries @ features.T], axis=1)
        i = np.concatenate(
            [ids, np.broadcast_to(np.arange(done, done + batch.num_rows), (len(queries), batch.num_rows))], axis=1
        )
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        done += batch.num_rows
    uris = vectors.rows.column("uri").to_numpy(zero_copy_only=False)
    return uris[ids]


def search_figures(output: str, queries: np.ndarray) -> dict:
    """Recall@10 of the index against exact search, and the latency of one query at k = 10 (index loaded)."""
    from pipeline.index import default_index_dir, load_index

    started = time.perf_counter()
    index = load_index(default_index_dir(output))
    load_s = time.perf_counter() - started
    log(f"index loaded in {load_s:.1f} s; exact search of {len(queries)} queries")
    truth = exact_top(output, queries, 10)
    latencies, best, hits = [], [], 0.0
    for query, exact in zip(queries, truth):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            _, ids = index.search(query[None], 10)
            found = index.rows_of(ids[0][ids[0] >= 0]).column("uri").to_pylist()
            times.append(time.perf_counter() - t)
        latencies.append(times[0])
        best.append(min(times))  # the query's cost with the least interference from neighbours
        hits += len(set(found) & set(exact.tolist())) / 10
    ms, best_ms = np.array(latencies) * 1000, np.array(best) * 1000
    return {
        "index_load_s": round(load_s, 1),
        "recall_at_10": round(hits / len(queries), 4),
        "query_ms_median": round(float(np.median(ms)), 2),
        "query_ms_p95": round(float(np.quantile(ms, 0.95)), 2),
        "query_ms_median_best_of_3": round(float(np.median(best_ms)), 2),
    }


def text_encoding_ms(work: Path, repeats: int = 20) -> dict:
    """One text query through a ConceptCLIP-shaped text tower (BERT-base width and depth, random weights) on CPU."""
    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.models import Encoder
    from pipeline.search import text_vector
    from pipeline.tiny import _conceptclip_config, _save_conceptclip

    folder = work / "text-tower-bert-base"
    if not (folder / "config.json").is_file():
        config = _conceptclip_config(
            image_size=64, patch_size=16, vision_width=32, vision_layers=2, vision_heads=2,
            text_width=768, text_layers=12, text_heads=12, embed_dim=1152,
        )  # fmt: skip
        _save_conceptclip(folder, config, 0)
    spec = resolve_model(str(folder), trust_remote_code=True, dtype="float32", device="cpu")
    encoder = Encoder(spec, preprocess_spec(spec))
    text_vector(encoder, "warm-up")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        text_vector(encoder, "necrotic tissue", ["a histopathology image of {}"])
        times.append(time.perf_counter() - t)
    return {"text_encode_ms_median": round(float(np.median(times)) * 1000, 1)}


def dedup_figures(groups_path: Path, truth: dict) -> dict:
    """Precision and recall of the pairs within dedup's groups against the pairs within the planted groups."""
    import pyarrow.parquet as pq

    table = pq.read_table(groups_path, columns=["group", "uri"])
    found = dict(zip(table.column("uri").to_pylist(), table.column("group").to_pylist()))
    sizes = np.bincount(table.column("group").to_numpy()) if table.num_rows else np.zeros(0, np.int64)
    predicted = int((sizes * (sizes - 1) // 2).sum())
    planted: dict[int, list[str]] = {}
    for uri, group in zip(truth["planted_uris"].tolist(), truth["planted_groups"].tolist()):
        planted.setdefault(group, []).append(uri)
    true_pairs = hits = 0
    for members in planted.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                true_pairs += 1
                hits += a in found and found.get(a) == found.get(b)
    return {
        "dedup_pairs_predicted": predicted,
        "dedup_pairs_planted": true_pairs,
        "dedup_precision": round(hits / max(1, predicted), 4),
        "dedup_recall": round(hits / max(1, true_pairs), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and latency")
    parser.add_argument("--shard-rows", type=int, default=47_500, help="rows a shard (the pipeline's default size)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: index,search,text,dedup")
    args = parser.parse_args(argv)
    common.set_quiet_env()
    skip = set(filter(None, args.skip.split(",")))
    folder = args.work / f"search-{args.rows}x{args.dim}"
    started = time.perf_counter()
    data = write_output(folder, args.rows, args.dim, args.shard_rows, args.queries)
    result = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": len(data["queries"]),
        "write_s": round(time.perf_counter() - started, 1),
    }
    output = data["output"]
    if "index" not in skip:
        shutil.rmtree(Path(output) / "_index", ignore_errors=True)
        log("featurize index")
        build = measured(["index", output])
        meta = json.loads((Path(output) / "_index" / "_index.json").read_text())
        result.update(
            index_wall_s=build["wall_s"],
            index_cpu_s=build["cpu_s"],
            index_loadavg=build["loadavg"],
            index_peak_rss_gb=build["peak_rss_gb"],
            index_type=meta["factory"],
            nprobe=meta.get("nprobe"),
            calibration=meta.get("calibration"),
            index_line=build["stderr"].splitlines()[-1],
        )
    if "search" not in skip:
        result.update(search_figures(output, data["queries"]))
    if "text" not in skip:
        result.update(text_encoding_ms(args.work))
    if "dedup" not in skip:
        log("featurize dedup")
        groups = folder / "groups.parquet"
        run = measured(["dedup", output, "--out", str(groups)])
        result.update(
            dedup_wall_s=run["wall_s"],
            dedup_cpu_s=run["cpu_s"],
            dedup_loadavg=run["loadavg"],
            dedup_peak_rss_gb=run["peak_rss_gb"],
            dedup_line=run["stderr"].splitlines()[-1],
        )
        result.update(dedup_figures(groups, data))
    record = {"benchmark": "search", "command": common.command_line(), "machine": common.machine_info(),
              "versions": common.versions(), "result": result, "targets": TARGETS}  # fmt: skip
    common.RESULTS.mkdir(exist_ok=True)
    path = common.RESULTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-search.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(report(result))
    log(f"wrote {path}")
    return 0


def report(result: dict) -> str:
    lines = [f"search benchmark: {result['rows']} rows x {result['dim']}"]
    for key, value in result.items():
        target = TARGETS.get(key)
        verdict = ""
        if target is not None and isinstance(value, (int, float)):
            upper = not key.startswith(("recall", "dedup_precision", "dedup_recall"))
            met = value <= target if upper else value >= target
            verdict = f"  (target {'<=' if upper else '>='} {target}: {'ok' if met else 'MISSED'})"
        lines.append(f"  {key}: {value}{verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
