"""Per-slide summary at cohort scale: one Ray task per tile shard reduces its tiles to per-slide partial aggregates
(compact numpy), and the driver merges them, so no tile's logits ever travel to the driver as Python lists.

A shard's partial, per slide uri found in it: the number of error tiles, the first error (its row in the shard and
its text), and the top_k highest logits per concept as a [min(top_k, n_ok), K] float32 block sorted descending per
concept (its first row is the per-concept max). The driver keeps, per slide, the top_k of the concatenated blocks
(memory O(slides x top_k x K)) and the error of the lowest (unit, row) -- the order the shards are read in by
a plain loop over every tile, whose results these equal (tests/test_summary.py).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import SLIDE_SCHEMA
from .storage import with_retries
from .write import OutputDir

TASK_CPUS = 0.25
_PATCHED = ("status", "error", "n_tile_errors", "concept_max", "concept_topk_mean")


def _slide_schema() -> pa.Schema:
    return SLIDE_SCHEMA


def slide_scores(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per concept over a slide's tiles [N,K]: the max and the mean of the top_k highest (all tiles if fewer)."""
    if len(logits) == 0:
        return np.full(logits.shape[1], np.nan, np.float32), np.full(logits.shape[1], np.nan, np.float32)
    top = _top_rows(logits, min(top_k, len(logits)))
    return top[0].astype(np.float32), top.mean(axis=0).astype(np.float32)


# -- one shard ------------------------------------------------------------------------------------------------------
def _top_rows(values: np.ndarray, top_k: int) -> np.ndarray:
    """Per column, the top_k highest values sorted descending (NaN last), as `slide_scores` ranks them."""
    return -np.sort(-values, axis=0)[:top_k]


def shard_partial(table: pa.Table, top_k: int, logits: bool = True) -> dict:
    """A shard's tiles (columns uri, status, error and, with logits, concept_logits) reduced per uri.

    Returns {"uris": [G], "n_errors": int64[G], "first_error_row": int64[G] (-1: none), "first_error": [G] (text or
    None), "counts": int64[G] (rows of each uri's block), "top": float32[sum(counts), K]}: blocks contiguous in uri
    order, each the uri's top min(top_k, its ok tiles with logits) logits per concept, sorted descending."""
    n = table.num_rows
    if n == 0:
        return {
            "uris": [],
            "n_errors": np.zeros(0, np.int64),
            "first_error_row": np.zeros(0, np.int64),
            "first_error": [],
            "counts": np.zeros(0, np.int64),
            "top": np.zeros((0, 0), np.float32),
        }
    encoded = pc.dictionary_encode(table.column("uri").combine_chunks(), null_encoding="encode")
    uris = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    groups = len(uris)
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)

    bad = np.flatnonzero(~ok)
    n_errors = np.bincount(codes[bad], minlength=groups).astype(np.int64)
    first_error_row = np.full(groups, -1, np.int64)
    first_error: list = [None] * groups
    if len(bad):
        seen, first = np.unique(codes[bad], return_index=True)  # bad is ascending: first index = lowest row
        first_error_row[seen] = bad[first]
        texts = table.column("error").take(pa.array(bad[first])).to_pylist()
        for g, text in zip(seen.tolist(), texts):
            first_error[g] = text

    no_logits = (np.zeros(groups, np.int64), np.zeros((0, 0), np.float32))
    counts, top = _top_per_group(table, ok, codes, groups, top_k) if logits else no_logits
    return {
        "uris": uris,
        "n_errors": n_errors,
        "first_error_row": first_error_row,
        "first_error": first_error,
        "counts": counts,
        "top": top,
    }


def _top_per_group(table: pa.Table, ok: np.ndarray, codes: np.ndarray, groups: int, top_k: int):
    """(rows of each group's block, the blocks): per group, its top min(top_k, its scored tiles) logits per concept,
    sorted descending, blocks contiguous in group order."""
    counts = np.zeros(groups, np.int64)
    top = np.zeros((0, 0), np.float32)
    column = table.column("concept_logits").combine_chunks()
    scored = ok & column.is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(scored)
    if len(rows):
        lists = column.take(pa.array(rows))
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        width = int(lengths[0])
        if (lengths != width).any():
            raise ValueError(f"tiles with different numbers of concept logits ({sorted(set(lengths.tolist()))})")
        values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        values = values.reshape(len(rows), width)
        g = codes[rows]
        # Per concept: rows by value descending (NaN last, as -np.sort(-x)), then stably by uri.
        by_value = np.argsort(-values, axis=0, kind="stable")
        by_group = np.argsort(g[by_value], axis=0, kind="stable")
        order = np.take_along_axis(by_value, by_group, axis=0)
        ranked = np.take_along_axis(values, order, axis=0)
        g_sorted = np.sort(g, kind="stable")
        starts = np.searchsorted(g_sorted, g_sorted, side="left")
        keep = (np.arange(len(rows)) - starts) < top_k
        top = np.ascontiguousarray(ranked[keep])
        counts = np.bincount(g_sorted[keep], minlength=groups).astype(np.int64)
    return counts, top


def read_shard_partial(url: str, storage_options: dict | None, path: str, top_k: int, logits: bool) -> dict:
    """Read only the columns a summary needs from one shard (its own filesystem, for remote OUTPUTs) and reduce it."""
    out = OutputDir(url, storage_options)
    columns = ["uri", "status", "error"] + (["concept_logits"] if logits else [])
    table = with_retries(lambda: pq.read_table(path, columns=columns, filesystem=out.fs))
    return shard_partial(table, top_k, logits)


# -- the driver -----------------------------------------------------------------------------------------------------
class _Merger:
    """Per wanted uri: error count, first error by (unit, row), and the running top_k block."""

    def __init__(self, wanted: set, top_k: int):
        self.wanted = wanted
        self.top_k = top_k
        self.n_errors: dict = {}
        self.first_error: dict = {}  # uri -> (unit, row, text)
        self.top: dict = {}

    def add(self, unit: int, partial: dict) -> None:
        offsets = np.concatenate([[0], np.cumsum(partial["counts"])])
        top = partial["top"]
        for g, uri in enumerate(partial["uris"]):
            if uri not in self.wanted:
                continue
            errors = int(partial["n_errors"][g])
            if errors:
                self.n_errors[uri] = self.n_errors.get(uri, 0) + errors
                key = (unit, int(partial["first_error_row"][g]), partial["first_error"][g])
                if uri not in self.first_error or key[:2] < self.first_error[uri][:2]:
                    self.first_error[uri] = key
            block = top[offsets[g] : offsets[g + 1]]
            if len(block):
                held = self.top.get(uri)
                self.top[uri] = block.copy() if held is None else _top_rows(np.concatenate([held, block]), self.top_k)


def _partials(out: OutputDir, todo: list[tuple[int, str]], top_k: int, logits: bool, max_in_flight: int | None):
    """Yield (unit, partial) per shard: Ray tasks, at most max_in_flight at once (in-process without Ray)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        ray = None
    if ray is None or not ray.is_initialized():
        for unit, path in todo:
            yield unit, read_shard_partial(out.url, out.storage_options, path, top_k, logits)
        return
    if max_in_flight is None:
        max_in_flight = max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=TASK_CPUS)(read_shard_partial)
    queue = deque(todo)
    in_flight: dict = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < max_in_flight:
                unit, path = queue.popleft()
                in_flight[task.remote(out.url, out.storage_options, path, top_k, logits)] = unit
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            rest = [ref for ref in in_flight if ref not in ready]
            if rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready = ready + more
            for ref in ready:
                unit = in_flight.pop(ref)
                yield unit, ray.get(ref)
    finally:
        for ref in in_flight:  # an error (or an abandoned generator): do not leave reads running
            ray.cancel(ref)


def summarise_slides(
    out: OutputDir,
    slides: pa.Table,
    units: list[int],
    top_k: int,
    logits: bool = True,
    max_in_flight: int | None = None,
) -> pa.Table:
    """Fill each planned-ok slide's tile error count, status and concept scores (with logits: not in features-only
    runs) from the committed shards of the run's work units `units`; the same table as a plain loop over every tile
    gives.

    One Ray task per shard (num_cpus=TASK_CPUS, at most max_in_flight -- default 4 per cluster CPU -- at once) reads
    uri, status, error (and concept_logits) and returns per-uri partials; the driver merges them per slide. Without
    Ray initialised the shards are reduced in this process."""
    schema = _slide_schema()
    shards = out.shard_units()
    todo = [(u, shards[u]) for u in sorted(set(int(u) for u in units)) if u in shards]
    statuses = slides.column("status").to_pylist()
    uris = slides.column("uri").to_pylist()
    n_tiles = slides.column("n_tiles").to_pylist()
    wanted = {uri for uri, status, n in zip(uris, statuses, n_tiles) if status == "ok" and n}
    merger = _Merger(wanted, top_k)
    if wanted:
        for unit, partial in _partials(out, todo, top_k, logits, max_in_flight):
            merger.add(unit, partial)

    n = slides.num_rows
    present = set(slides.column_names)
    patched = {name: (slides.column(name).to_pylist() if name in present else [None] * n) for name in _PATCHED}
    for i, (uri, status, count) in enumerate(zip(uris, statuses, n_tiles)):
        if status != "ok" or not count:
            continue
        block = merger.top.get(uri)
        if block is not None and logits:
            k = min(top_k, len(block))
            patched["concept_max"][i] = block[0].astype(np.float32).tolist()
            patched["concept_topk_mean"][i] = block[:k].mean(axis=0).astype(np.float32).tolist()
        errors = merger.n_errors.get(uri, 0)
        patched["n_tile_errors"][i] = errors
        if errors:
            first = merger.first_error[uri][2]
            patched["status"][i] = "error"
            patched["error"][i] = (
                f"{errors} of {count} tiles could not be scored (first: {first}); rerun to retry this slide"
            )
    arrays = []
    for field in schema:
        if field.name in patched:
            arrays.append(pa.array(patched[field.name], field.type))
        elif field.name in present:
            arrays.append(slides.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
