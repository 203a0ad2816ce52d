"""`featurize index`: an approximate nearest-neighbour index (faiss) over an OUTPUT's current ok rows' features.

The index folder (default OUTPUT/_index; local or fsspec):
  _index.json           what the index covers (the OUTPUT's feature identity, dataset version, shards) and how it was
                        built; written last, it names the two files below, so a reader never mixes generations
  index-NNNNN.faiss     the faiss index over L2-normalised float32 vectors (inner product = cosine); ids are row ids
  ids-NNNNN.parquet     id, the row's keys (uri, image_id; slides: slide_id, uri, x, y, level), run_id
  _lease.json           while `featurize index` writes there (one writer at a time)

The type follows the row count and a memory budget, as autofaiss chooses: exact (flat) below EXACT_ROWS rows; above,
IVF over sqrt-sized lists with 8-bit scalar quantisation (d bytes a row) when it fits the budget, else IVF with
product quantisation sized to fit; the quantisers are trained on a random sample. `nprobe` is calibrated at build
time: the smallest (to within an eighth) whose recall@10 against exact search reaches TARGET_RECALL on sample rows.

Updates are incremental: rows no longer current (superseded by a newer run, removed from the dataset) are removed,
current rows not yet indexed are added; nothing else is read. An index made for another feature identity or dataset
version is refused. Rows are read shard by shard (`pipeline.vectors`), so memory holds the index and one batch.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time

import numpy as np
import pyarrow as pa

from .errors import UserError
from .lease import Lease
from .storage import is_remote, join, put_file_atomic, with_retries
from .vectors import Vectors, open_vectors, row_keys
from .write import OutputDir

INDEX_FOLDER = "_index"
META_NAME = "_index.json"
FORMAT = 1
EXACT_ROWS = 100_000  # below this many rows the index is exact
TRAIN_ROWS = 100_000  # the most rows a quantiser is trained on
MEMORY_FRACTION = 0.25  # of the machine's memory: the default --max-memory
CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
TARGET_RECALL = 0.97
FEW_QUERIES = 8  # fewer queries than this are searched on one thread
IVF_RE = re.compile(r"(^|,)IVF\d+")


def require_faiss() -> None:
    """faiss is an extra: without it, one line that says how to install it."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UserError("the nearest-neighbour index needs faiss: pip install 'pipeline-featurize[search]'") from None


# -- choosing the index --------------------------------------------------------------------------------------------
def parse_size(text: str | int | None) -> int | None:
    """'4GB', '512MB', '2.5G', '1000000' -> bytes (binary units)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"--max-memory {text!r}: give a size such as 4GB or 512MB")
    return int(float(match.group(1)) * 1024 ** "BKMGT".index((match.group(2) or "B").upper()))


def default_max_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_FRACTION)


def list_count(rows: int) -> int:
    """IVF lists: a power of two near 4 sqrt(rows), 16..65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(rows, 1)))))))


def choose_factory(rows: int, dim: int, max_memory: int) -> str:
    """The faiss factory string for `rows` vectors of `dim` within `max_memory` bytes (see the module docstring)."""
    if rows < EXACT_ROWS and rows * dim * 4 <= max_memory:
        return "Flat"
    nlist = list_count(rows)
    overhead = nlist * dim * 4 + rows * 8  # centroids, ids
    ivf = f"IVF{nlist}"  # (an HNSW graph over the centroids adds faster, but misses lists: recall 0.92 at most)
    if rows * dim + overhead <= max_memory:
        return f"{ivf},SQ8"
    fits = [m for m in range(dim // 2, 0, -1) if dim % m == 0 and rows * m + overhead <= max_memory]
    if not fits:
        need = rows * min(m for m in range(1, dim + 1) if dim % m == 0) + overhead
        raise UserError(f"--max-memory {max_memory} bytes cannot hold an index of {rows} rows; give at least {need}")
    return f"{ivf},PQ{fits[0]}"


def make_index(factory: str, dim: int):
    """An empty faiss index for inner product; flat indexes get an id map (ids and removal)."""
    import faiss

    ivf = bool(IVF_RE.search(factory))
    if not ivf and factory != "Flat":
        raise UserError(
            f"--index-type {factory!r}: give 'Flat' or an IVF factory string such as 'IVF4096,SQ8', "
            "'IVF4096,PQ96' or 'IVF4096_HNSW32,SQ8' (rows must be removable for incremental updates)"
        )
    try:
        index = faiss.index_factory(dim, factory if ivf else "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UserError(f"--index-type {factory!r} is not a faiss factory string for {dim} dims ({exc})") from None
    if ivf:
        ivf_index = faiss.extract_index_ivf(index)
        ivf_index.cp.niter = 10
        ivf_index.cp.min_points_per_centroid = 1  # small samples train too (faiss would print a warning)
        if "SQ" in factory:
            # 8-bit codes of the vectors themselves, not of their residuals: the ranges learnt from the sample fit
            # rows added later (a residual can be larger than any in the sample); measured, recall 0.998 vs 0.995
            ivf_index.by_residual = False
    return index


def is_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


# -- the index folder ----------------------------------------------------------------------------------------------
def default_index_dir(output: str) -> str:
    return join(output.rstrip("/"), INDEX_FOLDER)


def coverage(out: OutputDir) -> dict:
    """What of OUTPUT an index covers, cheaply comparable: its shard names and, for slides, which run finished
    each slide (a finished rerun changes a slide's current tiles without a new shard name)."""
    shards = sorted(p.rsplit("/", 1)[-1] for p in out.shard_units().values())
    slides = out.read_table("_slides.parquet")
    digest = None
    if slides is not None and "run_id" in slides.column_names:
        pairs = sorted(zip(slides.column("slide_id").to_pylist(), slides.column("run_id").to_pylist()))
        digest = str(hash_text(json.dumps(pairs)))
    return {"shards": shards, "slides": digest}


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_identity(meta: dict, identity: dict, output: str, index_dir: str, fix: str) -> None:
    """Refuse an index made for other features (model, revision, kind, feature kind) or another dataset version."""
    made = meta.get("feature_identity", {})
    if made == identity:
        return
    changed = sorted(k for k in set(made) | set(identity) if made.get(k) != identity.get(k))
    detail = ", ".join(f"{k} {made.get(k)!r} (index) vs {identity.get(k)!r} (OUTPUT)" for k in changed)
    raise UserError(f"index {index_dir} was made for other features than {output} has now: {detail}; {fix}")


class Index:
    """A loaded index: its metadata, the faiss index (None when it holds no rows) and its ids table."""

    def __init__(self, index_dir: str, meta: dict, faiss_index, ids: pa.Table):
        self.index_dir, self.meta, self.faiss_index, self.ids = index_dir, meta, faiss_index, ids
        self.sorted_ids = ids.column("id").to_numpy()  # ascending: ids files are written sorted by id

    @property
    def rows(self) -> int:
        return int(self.meta.get("rows", 0))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [Q, k] for L2-normalised float32 queries; ids of -1 where fewer than k rows matched."""
        import faiss

        if self.faiss_index is None or k < 1:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if is_ivf(self.faiss_index):
            faiss.extract_index_ivf(self.faiss_index).nprobe = int(nprobe or self.meta.get("nprobe") or 1)
        threads = faiss.omp_get_max_threads()
        if len(queries) < FEW_QUERIES:  # threads splitting one query wait on each other (on a busy machine: 40x)
            faiss.omp_set_num_threads(1)
        try:
            return self.faiss_index.search(np.ascontiguousarray(queries, np.float32), int(k))
        finally:
            faiss.omp_set_num_threads(threads)

    def rows_of(self, ids: np.ndarray) -> pa.Table:
        """The ids table's rows for `ids`, in that order."""
        positions = np.searchsorted(self.sorted_ids, ids)
        return self.ids.take(pa.array(positions, pa.int64()))


def read_meta(index_dir: str, storage_options: dict | None) -> dict | None:
    return OutputDir(index_dir, storage_options).read_json(META_NAME)


def load_index(index_dir: str, storage_options: dict | None = None) -> Index:
    """The index in `index_dir` (a remote one is copied to a local temporary file for faiss, then removed)."""
    require_faiss()
    import faiss

    folder = OutputDir(index_dir, storage_options)
    meta = folder.read_json(META_NAME)
    if meta is None:
        raise UserError(f"{index_dir} holds no index (no {META_NAME}); make one with `featurize index OUTPUT`")
    if int(meta.get("format", 0)) != FORMAT:
        raise UserError(f"index {index_dir} has format {meta.get('format')}, this version reads {FORMAT}: rebuild it")
    if not meta.get("rows"):
        types = {"x": pa.int64(), "y": pa.int64(), "level": pa.int32()}
        names = ["id", *meta.get("keys", []), "run_id"]
        empty = pa.table({n: pa.array([], pa.int64() if n == "id" else types.get(n, pa.string())) for n in names})
        return Index(index_dir, meta, None, empty)
    ids = folder.read_table(meta["files"]["ids"])
    path = join(folder.path, meta["files"]["index"])
    if not is_remote(folder.url):
        return Index(index_dir, meta, faiss.read_index(path), ids)
    with tempfile.TemporaryDirectory(prefix="featurize-index-") as tmp:
        local = os.path.join(tmp, "index.faiss")
        with_retries(lambda: folder.fs.get(path, local))
        return Index(index_dir, meta, faiss.read_index(local), ids)


def _ids_table(ids, rows: pa.Table | None, keys: list[str]) -> pa.Table:
    columns = {"id": pa.array(np.asarray(ids, np.int64), pa.int64())}
    for name in [*keys, "run_id"] if rows is not None else []:
        columns[name] = rows.column(name)
    return pa.table(columns)


def _save(folder: OutputDir, index, ids: pa.Table, meta: dict, old: dict | None, lease: Lease) -> dict:
    """Write a new generation (the index, then ids, then _index.json naming them), then remove the old one's files;
    _index.json and the removal only while `lease` is held (a fenced write)."""
    import faiss

    generation = int((old or {}).get("generation", 0)) + 1
    files = {"index": f"index-{generation:05d}.faiss", "ids": f"ids-{generation:05d}.parquet"}
    meta = {**meta, "generation": generation, "files": files if ids.num_rows else {}}
    if ids.num_rows:
        with tempfile.TemporaryDirectory(prefix="featurize-index-") as tmp:
            local = os.path.join(tmp, files["index"])
            faiss.write_index(index, local)
            put_file_atomic(local, folder.child(files["index"]), folder.storage_options)
        folder.write_table(ids.sort_by("id"), files["ids"])
    with lease.fenced():
        folder.write_json(meta, META_NAME)
    for name in (old or {}).get("files", {}).values():
        try:
            with lease.fenced():
                with_retries(lambda name=name: folder.fs.rm(join(folder.path, name)))
        except FileNotFoundError:
            pass
    return meta


# -- building and updating -----------------------------------------------------------------------------------------
def build_index(
    output: str,
    index_dir: str | None = None,
    storage_options: dict | None = None,
    max_memory: int | str | None = None,
    index_type: str | None = None,
    rebuild: bool = False,
    use_ray: bool | None = None,
    echo=print,
) -> dict:
    """Build the index of OUTPUT's current ok rows into `index_dir`, or bring an existing one up to date; returns
    the new _index.json record (with `added`, `removed`, `seconds` of this call)."""
    from .record import new_run_id

    require_faiss()
    started = time.perf_counter()
    index_dir = index_dir or default_index_dir(output)
    budget = parse_size(max_memory) or default_max_memory()
    vectors = open_vectors(output, storage_options)
    folder = OutputDir(index_dir, storage_options)
    old = folder.read_json(META_NAME)
    if old is not None and not rebuild:
        check_identity(old, vectors.feature_identity, output, index_dir, "pass --rebuild to make it again for them")
    if use_ray is None:
        use_ray = bool(os.environ.get("RAY_ADDRESS"))
    with Lease.acquire(index_dir, storage_options, new_run_id()) as lease:
        base = {
            "format": FORMAT,
            "output": output,
            "feature_identity": vectors.feature_identity,
            "features": vectors.features,
            "is_slides": vectors.is_slides,
            "keys": vectors.keys,
            "metric": "inner_product",
            "normalised": True,
            "coverage": coverage(OutputDir(output, storage_options)),
        }
        family_changed = old is not None and _wants_rebuild(old, vectors.rows.num_rows, index_type)
        if old is None or rebuild or family_changed or not old.get("rows"):
            if family_changed:
                echo(f"featurize: building the index again ({_rebuild_reason(old, vectors.rows.num_rows, index_type)})")
            index, ids, info = _full_build(vectors, budget, index_type, use_ray, echo)
            counts = {"added": ids.num_rows, "removed": int((old or {}).get("rows", 0))}
        else:
            index, ids, info, counts = _update(vectors, load_index(index_dir, storage_options), use_ray)
        meta = {**base, **info, "rows": ids.num_rows, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta = _save(folder, index, ids, meta, old, lease)
    return {**meta, **counts, "seconds": round(time.perf_counter() - started, 3)}


def _wants_rebuild(old: dict, rows: int, index_type: str | None) -> bool:
    """Another type asked for, or a chosen one that no longer fits the rows: an exact index past EXACT_ROWS, or IVF
    lists (and quantisers) made for a sixteenth of the rows or fewer."""
    if index_type:
        return index_type != old.get("factory")
    if not old.get("chosen", True):
        return False
    if old.get("factory") == "Flat":
        return rows >= EXACT_ROWS
    return bool(old.get("nlist")) and list_count(rows) >= 4 * int(old["nlist"])


def _rebuild_reason(old: dict, rows: int, index_type: str | None) -> str:
    if index_type:
        return f"--index-type {index_type}, was {old.get('factory')}"
    return f"{rows} rows outgrow {old.get('factory')}"


def _full_build(vectors: Vectors, budget: int, index_type: str | None, use_ray: bool, echo):
    rows = vectors.rows
    n = rows.num_rows
    if n == 0:
        return None, _ids_table([], rows, vectors.keys), {"factory": None, "dim": None, "next_id": 0}
    rng = np.random.default_rng(0)
    dim = next(vectors.batches(rows.slice(0, 1)))[1].shape[1]
    factory = index_type or choose_factory(n, dim, budget)
    index = make_index(factory, dim)
    ids = np.arange(n, dtype=np.int64)
    info = {"factory": factory, "chosen": index_type is None, "dim": int(dim), "next_id": n, "max_memory": budget}
    if not is_ivf(index):
        _add_local(index, vectors, rows, ids, None)
        return index, _ids_table(ids, rows, vectors.keys), info
    sampled = vectors.sample(TRAIN_ROWS)
    train = np.concatenate([x for _, x in vectors.batches(sampled)])
    sample = _positions(rows, sampled)
    echo(f"featurize: training {factory} on {len(train)} of {n} rows")
    index.train(train)
    probes = sample[rng.choice(len(sample), min(len(sample), CALIBRATION_QUERIES), replace=False)]
    queries = Calibration(train[np.searchsorted(sample, probes)], probes)
    del train
    if use_ray:
        _add_with_ray(index, vectors, rows, ids, queries)
    else:
        _add_local(index, vectors, rows, ids, queries)
    nprobe, recall = queries.calibrate(index)
    info.update(
        nlist=int(faiss_ivf(index).nlist), nprobe=nprobe, calibration={"queries": len(probes), "recall_at_10": recall}
    )
    return index, _ids_table(ids, rows, vectors.keys), info


def _positions(rows: pa.Table, chosen: pa.Table) -> np.ndarray:
    """Where the rows of `chosen` (a selection of `rows`, in its order) stand in `rows`: their ids in a full build."""
    key = rows.column("shard").to_numpy().astype(np.int64) << 40 | rows.column("row").to_numpy()
    wanted = chosen.column("shard").to_numpy().astype(np.int64) << 40 | chosen.column("row").to_numpy()
    return np.searchsorted(key, wanted)


def faiss_ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def _update(vectors: Vectors, loaded: Index, use_ray: bool):
    """Remove the indexed rows that are no longer current, add the current rows not indexed yet."""
    import faiss

    current = vectors.rows
    indexed = row_keys(loaded.ids, vectors.keys)
    now = row_keys(current, vectors.keys)
    gone = ~np.isin(indexed, now)
    new = np.flatnonzero(~np.isin(now, indexed))
    index, meta = loaded.faiss_index, dict(loaded.meta)
    if gone.any():
        index.remove_ids(faiss.IDSelectorBatch(loaded.ids.column("id").to_numpy()[gone]))
    next_id = int(meta.get("next_id", 0))
    ids = np.arange(next_id, next_id + len(new), dtype=np.int64)
    added = current.take(pa.array(new, pa.int64()))
    if len(new):
        (_add_with_ray if use_ray and is_ivf(index) else _add_local)(index, vectors, added, ids, None)
    kept = loaded.ids.filter(pa.array(~gone))
    table = pa.concat_tables([kept, _ids_table(ids, added, vectors.keys).cast(kept.schema)])
    info = {
        k: meta[k] for k in ("factory", "chosen", "dim", "nlist", "nprobe", "calibration", "max_memory") if k in meta
    }
    return index, table, {**info, "next_id": next_id + len(new)}, {"added": len(new), "removed": int(gone.sum())}


class Calibration:
    """Sample rows used as queries: their exact top k+1 (themselves included) kept while the rows stream past, then
    the smallest nprobe whose recall@k (themselves left out) reaches TARGET_RECALL."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int = CALIBRATION_K):
        self.queries, self.query_ids, self.k = queries, query_ids, k
        self.scores = np.full((len(queries), k + 1), -np.inf, np.float32)
        self.ids = np.full((len(queries), k + 1), -1, np.int64)

    def see(self, features: np.ndarray, ids: np.ndarray) -> None:
        self.merge(self.queries @ features.T, np.broadcast_to(ids, (len(self.queries), len(ids))))

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        scores = np.concatenate([self.scores, scores], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        top = np.argpartition(-scores, self.k, axis=1)[:, : self.k + 1]
        self.scores, self.ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)

    def recall(self, found: np.ndarray) -> float:
        """Mean recall@k of `found` ([Q, k+1] ids) against the exact neighbours, each query itself left out."""
        hits = 0.0
        for query, scores, exact, approx in zip(self.query_ids, self.scores, self.ids, found):
            exact = exact[np.argsort(-scores, kind="stable")]
            truth = set(exact[(exact != query) & (exact >= 0)][: self.k].tolist())
            hits += len(truth & set(approx[approx != query][: self.k].tolist())) / max(1, len(truth))
        return hits / max(1, len(self.query_ids))

    def calibrate(self, index) -> tuple[int, float]:
        """The smallest nprobe reaching TARGET_RECALL: doubling, then halving the last step until it is an eighth of
        nprobe (latency grows with nprobe: 64 vs 128 lists halve it)."""
        ivf = faiss_ivf(index)

        def recall_at(nprobe: int) -> float:
            ivf.nprobe = nprobe
            return self.recall(index.search(self.queries, self.k + 1)[1])

        nprobe, recall = 1, recall_at(1)
        while recall < TARGET_RECALL and nprobe < ivf.nlist:
            nprobe = min(nprobe * 2, ivf.nlist)
            recall = recall_at(nprobe)
        low = nprobe // 2 if recall >= TARGET_RECALL else nprobe  # fell short at low (or nothing below to try)
        while nprobe - low > max(1, nprobe // 8):
            middle = (low + nprobe) // 2
            reached = recall_at(middle)
            if reached >= TARGET_RECALL:
                nprobe, recall = middle, reached
            else:
                low = middle
        return nprobe, round(recall, 4)


def _add_local(index, vectors: Vectors, rows: pa.Table, ids: np.ndarray, calibration: Calibration | None) -> None:
    done = 0
    for batch, features in vectors.batches(rows):
        part = ids[done : done + batch.num_rows]
        index.add_with_ids(features, part)
        if calibration is not None:
            calibration.see(features, part)
        done += batch.num_rows


def _add_with_ray(index, vectors: Vectors, rows: pa.Table, ids: np.ndarray, calibration: Calibration | None) -> None:
    """The adds as Ray tasks, one per shard piece: each fills a copy of the trained, empty index (and the exact
    scores of the calibration queries over its rows); the driver merges the copies as they come back."""
    import faiss
    import ray

    from .cluster import init_ray
    from .storage import only_driver_node

    started_ray = init_ray()
    try:
        options = {"num_cpus": 1}
        if not is_remote(vectors.url) and not only_driver_node():  # the other nodes may not see a local OUTPUT
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), False
            )
        task = ray.remote(**options)(_add_piece)
        empty = faiss.clone_index(index)
        empty.reset()
        template = ray.put(faiss.serialize_index(empty))
        queries = ray.put(None if calibration is None else calibration.queries)
        limit = max(2, int(ray.cluster_resources().get("CPU", 2)))
        pending = []
        for piece, positions, part in _pieces(rows, ids):
            path = vectors.shards[piece]
            pending.append(task.remote(template, vectors.url, vectors.storage_options, path, positions, part, queries))
            if len(pending) >= limit:
                pending = _merge_done(index, pending, calibration, 1)
        _merge_done(index, pending, calibration, len(pending))
    finally:
        if started_ray:
            ray.shutdown()


def _pieces(rows: pa.Table, ids: np.ndarray, piece_rows: int = 65536):
    shard_of = rows.column("shard").to_numpy()
    positions = rows.column("row").to_numpy()
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(shard_of)]):
        for begin in range(int(start), int(stop), piece_rows):
            end = min(int(stop), begin + piece_rows)
            yield int(shard_of[begin]), positions[begin:end], ids[begin:end]


def _merge_done(index, pending: list, calibration: Calibration | None, at_least: int) -> list:
    import faiss
    import ray

    done, pending = ray.wait(pending, num_returns=min(at_least, len(pending)))
    for ref in done:
        serialized, scores, ids = ray.get(ref)
        index.merge_from(faiss.deserialize_index(serialized), 0)
        if calibration is not None:
            calibration.merge(scores, ids)
    return pending


def _add_piece(template, url: str, storage_options: dict, path: str, positions, ids, queries):
    """A Ray task: the rows' features added to a copy of the empty index; the copy, serialised, and the calibration
    queries' best k+1 scores and ids among these rows (not all their scores: those would be large to send back)."""
    import faiss

    from .vectors import shard_features

    index = faiss.deserialize_index(template)
    features = shard_features(url, storage_options, path, positions)
    index.add_with_ids(features, ids)
    if queries is None:
        return faiss.serialize_index(index), None, None
    best = Calibration(queries, np.zeros(0, np.int64))
    best.see(features, ids)
    return faiss.serialize_index(index), best.scores, best.ids


def index_summary(meta: dict) -> str:
    kind = meta.get("factory") or "empty"
    probe = f", nprobe {meta['nprobe']} (recall@10 {meta['calibration']['recall_at_10']})" if meta.get("nprobe") else ""
    return (
        f"indexed {meta['rows']} rows ({kind}{probe}): {meta.get('added', 0)} added, {meta.get('removed', 0)} "
        f"removed in {meta.get('seconds', 0)} s"
    )
