"""`featurize slides`: plan every slide in Ray tasks, stream its tissue tiles through the image pipeline's stages
(`run.build_dataset` with `slides.read_tiles` as the CPU stage, the same model actors), commit tile shards with
`write.ShardWriter`, then summarise each slide.

OUTPUT, beside the files every run writes (see write.py):
  part-NNNNN.parquet            tile rows (TILE_SCHEMA), one shard per work unit of `rows_per_shard` tiles
  _slides.parquet               one row per slide (SLIDE_SCHEMA): status, mpp and its source, tiles, concept scores
  _runs/<run-id>.plan.parquet   the run's tiles and their work units; <run-id>.slides.parquet its slides (resume)

Resume: rerunning the same command finishes an interrupted run's uncommitted units; a new run skips slides whose
tiles are all committed (slides that failed are tried again).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import SlidesConfig
from .errors import UserError, first_line
from .models import preprocess_spec
from .console import Progress
from .run import (_changed, _consume, _iso, _prompt_store, _write_prompts, actor_layout, build_dataset, cluster_shape,
                  finished_counts, finishing, hold_output, init_ray, new_run_id, next_unit, placed_spec, probe_nodes,
                  refuse_process_local, resolve_job, save_run_record, stage_summary, unfinished_run)
from .schema import (RESULT_COLUMNS, SOURCE_COLUMNS, error_column, fixed_list, logits_column, metadata_bytes, package_versions,
                     provenance, without_absent_logits)
from .slides import SLIDE_SUFFIXES, Tiling, plan_slide, read_tiles, slide_ids
from .sources import list_inputs
from .write import OutputDir, ShardWriter, check_identity, unit_counts, work_units

log = logging.getLogger(__name__)

TILE_COLUMNS = [
    ("slide_id", pa.string()),
    ("uri", pa.string()),
    ("x", pa.int64()),  # level-0 pixels, top-left corner
    ("y", pa.int64()),
    ("level", pa.int32()),  # the pyramid level the tile was read from
    ("tile_px", pa.int32()),
    ("mpp", pa.float64()),  # the tile's microns per pixel at tile_px
    ("tissue_fraction", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
]
TILE_SCHEMA = pa.schema(TILE_COLUMNS + RESULT_COLUMNS + SOURCE_COLUMNS)
CONCEPT_MAPS_FIELD = pa.field("concept_maps", pa.list_(pa.float16()))  # [K, P, P] per tile, flattened

SLIDE_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("reader", pa.string()),
    ("mpp", pa.float64()),  # level-0 microns per pixel
    ("mpp_source", pa.string()),  # slide_mpp | aperio.MPP | tiff.XResolution | <reader>.mpp-x
    ("width", pa.int64()),  # level-0 pixels
    ("height", pa.int64()),
    ("level_count", pa.int32()),
    ("n_tiles", pa.int64()),
    ("n_tile_errors", pa.int64()),
    ("level", pa.int32()),
    ("read_px", pa.int32()),
    ("footprint_px", pa.int32()),  # a tile's side in level-0 pixels
    ("step_px", pa.int32()),  # level-0 pixels between neighbouring tiles
    ("tile_px", pa.int32()),
    ("tile_mpp", pa.float64()),
    ("top_k", pa.int32()),
    ("concept_max", pa.list_(pa.float32())),  # per concept (the order of _prompts.parquet): the highest tile logit
    ("concept_topk_mean", pa.list_(pa.float32())),  # and the mean of the top_k highest
    ("plan_s", pa.float64()),
] + SOURCE_COLUMNS)

# The run's tiles in work-unit order (plus `unit` and `row`): what read_tiles needs and the shards repeat.
PLAN_TILE_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("uri", pa.string()), ("reader", pa.string()), ("x", pa.int64()), ("y", pa.int64()),
    ("level", pa.int32()), ("read_px", pa.int32()), ("tile_mpp", pa.float64()), ("tissue_fraction", pa.float32()),
    ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string()),
])


def make_tiling(cfg: SlidesConfig, model_input_px: int) -> Tiling:
    tile_px = cfg.tile_px or model_input_px
    if cfg.overlap >= tile_px:
        raise UserError(f"overlap {cfg.overlap} must be smaller than the tile size {tile_px} px")
    return Tiling(mpp=cfg.mpp, tile_px=tile_px, overlap=cfg.overlap, min_tissue=cfg.min_tissue)


# -- planning -------------------------------------------------------------------------------------------------------
def done_slides(out: OutputDir, listing: pa.Table, version: int, incremental: bool) -> set[str]:
    """Slides of OUTPUT/_slides.parquet that finished (status ok) and whose tiles are all in committed shards;
    with `incremental`, less those whose file changed since."""
    previous = out.read_table("_slides.parquet")
    if previous is None or previous.num_rows == 0:
        return set()
    previous = previous.filter(pc.and_(pc.equal(previous.column("dataset_version"), version),
                                       pc.equal(previous.column("status"), "ok")))
    committed = out.committed_index(columns=("uri", "run_id", "dataset_version"))
    committed = committed.filter(pc.equal(committed.column("dataset_version"), version))
    tiles = Counter(zip(committed.column("uri").to_pylist(), committed.column("run_id").to_pylist()))
    done = {uri for uri, run_id, n in zip(*(previous.column(c).to_pylist() for c in ("uri", "run_id", "n_tiles")))
            if tiles[(uri, run_id)] == n}
    if incremental and done:
        listed = listing.filter(pc.is_in(listing.column("uri"), value_set=pa.array(sorted(done), pa.string())))
        changed = _changed(listed, previous.select(["uri", "size", "mtime", "etag", "run_id"]))
        done -= set(np.asarray(listed.column("uri").to_pylist(), dtype=object)[changed])
    return done


def plan_slides(pending: pa.Table, ids: dict[str, str], tiling: Tiling, cfg: SlidesConfig, run_id: str,
                version: int, first_unit: int) -> tuple[pa.Table, pa.Table]:
    """One Ray task per slide (open, mpp, tissue, grid): (slides table, plan of tiles in work units)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(plan_slide)
    uris = pending.column("uri").to_pylist()
    refs = [task.remote(uri, tiling, cfg.reader, cfg.slide_mpp, cfg.storage_options) for uri in uris]
    planned = _gather(refs, cfg.stall_timeout_s)
    rows, tile_parts = [], []
    for i, uri in enumerate(uris):
        row, tiles = planned[i] if isinstance(planned[i], tuple) else (_crashed_row(uri, planned[i]), None)
        source = {c: pending.column(c)[i].as_py() for c in ("size", "mtime", "etag")}
        row.update(slide_id=ids[uri], tile_px=tiling.tile_px, top_k=cfg.top_k, n_tile_errors=0, run_id=run_id,
                   dataset_version=version, **source)
        rows.append(row)
        if tiles is not None and len(tiles["x"]):
            n = len(tiles["x"])
            per_slide = {"slide_id": ids[uri], "uri": uri, "reader": row["reader"], "level": row["level"],
                         "read_px": row["read_px"], "tile_mpp": row["tile_mpp"], **source}
            tile_parts.append(pa.table({  # the grid's columns, and the slide's values repeated on every tile
                f.name: tiles[f.name] if f.name in tiles else pa.repeat(pa.scalar(per_slide[f.name], f.type), n)
                for f in PLAN_TILE_SCHEMA}, schema=PLAN_TILE_SCHEMA))
    slides = pa.Table.from_pylist([{f.name: row.get(f.name) for f in SLIDE_SCHEMA} for row in rows],
                                  schema=SLIDE_SCHEMA)
    tiles = pa.concat_tables(tile_parts) if tile_parts else PLAN_TILE_SCHEMA.empty_table()
    units, row_ids = work_units(tiles.num_rows, first_unit, cfg.rows_per_shard)
    plan = tiles.append_column("unit", pa.array(units)).append_column("row", pa.array(row_ids))
    return slides, plan


def _gather(refs: list, stall_timeout_s: float) -> list:
    """Each task's result, or the exception that ended it. When none finishes for stall_timeout_s (a remote read that
    hangs, a node gone), the rest are cancelled and given a timeout error: planning never waits for ever."""
    import ray

    out: list = [None] * len(refs)
    waiting = {ref: i for i, ref in enumerate(refs)}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=stall_timeout_s)
        if not ready:
            for ref, i in waiting.items():
                ray.cancel(ref, force=True)
                out[i] = TimeoutError(f"planning made no progress for {stall_timeout_s:.0f} s (a read that hangs?); "
                                      "rerun to retry this slide")
            break
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        for ref in ready:
            i = waiting.pop(ref)
            try:
                out[i] = ray.get(ref)
            except Exception as exc:  # the task's worker died (a reader crashing on this file, say)
                out[i] = exc
    return out


def _crashed_row(uri: str, exc: BaseException) -> dict:
    reason = first_line(exc) if isinstance(exc, TimeoutError) else \
        f"planning this slide crashed its worker ({type(exc).__name__}: {first_line(exc)})"
    return {"uri": uri, "status": "error", "n_tiles": 0, "plan_s": 0.0, "error": reason}


# -- shards ---------------------------------------------------------------------------------------------------------
def tile_table_builder(plan: pa.Table, tile_px: int, run_id: str, dataset_version: int, concept_maps: bool):
    """build_table for tile shards: result columns plus what the plan knew of each tile."""
    schema = TILE_SCHEMA.append(CONCEPT_MAPS_FIELD) if concept_maps else TILE_SCHEMA

    def build(cols: dict[str, np.ndarray]) -> pa.Table:
        rows = pa.array(cols["row"])
        n = len(rows)
        ok = cols["status"] == "ok"
        known = {c: plan.column(c).take(rows).combine_chunks()
                 for c in ("slide_id", "uri", "x", "y", "level", "tile_mpp", "tissue_fraction", "size", "mtime",
                           "etag")}
        arrays = [
            known["slide_id"], known["uri"], known["x"], known["y"], known["level"],
            pa.array(np.full(n, tile_px), pa.int32()), known["tile_mpp"], known["tissue_fraction"],
            pa.array([str(s) for s in cols["status"]], pa.string()),
            error_column(cols["error"]),
            fixed_list(np.asarray(cols["image_features"], np.float16), pa.float16(), ok),
            logits_column(cols, ok),
            known["size"], known["mtime"], known["etag"],
            pa.array([run_id] * n, pa.string()), pa.array([dataset_version] * n, pa.int32()),
        ]
        if concept_maps:
            maps = np.asarray(cols["concept_maps"], np.float16)
            arrays.append(fixed_list(maps.reshape(n, -1), pa.float16(), ok))
        return without_absent_logits(cols, pa.Table.from_arrays(arrays, schema=schema))

    return build


# -- per-slide scores -----------------------------------------------------------------------------------------------
def slide_scores(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per concept over a slide's tiles [N,K]: the max and the mean of the top_k highest (all tiles if fewer)."""
    if len(logits) == 0:
        return np.full(logits.shape[1], np.nan, np.float32), np.full(logits.shape[1], np.nan, np.float32)
    k = min(top_k, len(logits))
    top = -np.sort(-logits, axis=0)[:k]
    return top[0].astype(np.float32), top.mean(axis=0).astype(np.float32)


def summarise(out: OutputDir, slides: pa.Table, plan: pa.Table, top_k: int, logits: bool = True) -> pa.Table:
    """Fill each slide's tile error count, status and concept scores (with logits: not in features-only runs) from
    the run's committed shards."""
    shards = out.shard_units()
    units = sorted(set(plan.column("unit").to_pylist()))
    columns = ["uri", "status", "error"] + (["concept_logits"] if logits else [])
    parts = [pq.read_table(shards[u], columns=columns, filesystem=out.fs) for u in units if u in shards]
    by_uri: dict[str, list] = {}
    for part in parts:
        values = [part.column(c).to_pylist() for c in columns] + ([] if logits else [[None] * part.num_rows])
        for uri, status, error, tile_logits in zip(*values):
            by_uri.setdefault(uri, []).append((status, error, tile_logits))
    rows = slides.to_pylist()
    for row in rows:
        tiles = by_uri.get(row["uri"], [])
        if row["status"] != "ok" or not row["n_tiles"]:
            continue
        good = [t[2] for t in tiles if t[0] == "ok"]
        errors = [t[1] for t in tiles if t[0] != "ok"]
        if good and logits:
            maxima, topk = slide_scores(np.asarray(good, np.float32), top_k)
            row.update(concept_max=maxima.tolist(), concept_topk_mean=topk.tolist())
        row["n_tile_errors"] = len(errors)
        if errors:
            row.update(status="error", error=f"{len(errors)} of {row['n_tiles']} tiles could not be scored "
                                             f"(first: {errors[0]}); rerun to retry this slide")
    return pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA)


def merge_slides(previous: pa.Table | None, current: pa.Table) -> pa.Table:
    """This run's slide rows replace earlier rows of the same slide; the rest are kept. Sorted by uri."""
    if previous is None or previous.num_rows == 0:
        return current.sort_by("uri")
    previous = previous.select(SLIDE_SCHEMA.names).cast(SLIDE_SCHEMA)
    keep = pc.invert(pc.is_in(previous.column("uri"), value_set=current.column("uri")))
    return pa.concat_tables([previous.filter(keep), current]).sort_by("uri")


# -- the run --------------------------------------------------------------------------------------------------------
def run_slides(cfg: SlidesConfig, echo=print) -> dict:
    """`featurize slides`: returns the run record (also written to OUTPUT/_run.json)."""
    started = time.time()
    refuse_process_local(cfg)
    job = resolve_job(cfg)
    spec = job.spec
    if cfg.concept_maps and job.prompt_set is None:
        raise UserError("--concept-maps scores concepts: it needs --prompts")
    if cfg.concept_maps and spec.kind != "remote":
        raise UserError(f"--concept-maps needs a model with ConceptCLIP's concept head; {cfg.model} is a "
                        f"{spec.kind} model")
    preprocess = preprocess_spec(spec)
    tiling = make_tiling(cfg, max(preprocess.height, preprocess.width))
    t = time.perf_counter()
    listing = list_inputs(cfg.input, cfg.storage_options, suffixes=SLIDE_SUFFIXES)
    listing_s = time.perf_counter() - t
    ids = dict(zip(listing.column("uri").to_pylist(), slide_ids(listing.column("uri").to_pylist())))

    run_id = new_run_id()
    with hold_output(cfg, run_id, echo) as lease:
        return _run_slides(cfg, echo, started, job, preprocess, tiling, listing, listing_s, ids, run_id, lease)


def _run_slides(cfg: SlidesConfig, echo, started, job, preprocess, tiling, listing, listing_s, ids, run_id,
                lease) -> dict:
    prompt_set = job.prompt_set
    started_ray = init_ray(cfg.verbose)
    record: dict = {}
    with finishing(cfg, record, lease, started_ray):
        layout = actor_layout(cfg, cluster_shape())
        probe_nodes(cfg, listing, echo)
        spec = job.spec = placed_spec(job.spec, layout)
        identity = {**job.identity(),
                    "tiling": {"mpp": tiling.mpp, "tile_px": tiling.tile_px, "overlap": tiling.overlap,
                               "min_tissue": tiling.min_tissue, "slide_mpp": cfg.slide_mpp, "reader": cfg.reader},
                    "concept_maps": cfg.concept_maps}
        out = OutputDir(cfg.output, cfg.storage_options)
        version = check_identity(out, identity, cfg.new_version)
        runs = out.runs()
        resumable = unfinished_run(out, runs, version, cfg)
        t = time.perf_counter()
        if resumable is not None:
            run_id, plan = resumable
            lease.update(run_id=run_id)
            slides = out.read_table("_runs", f"{run_id}.slides.parquet")
            if slides is None:
                raise UserError(f"run {run_id} in {out.url} has a plan but no slide table; "
                                "remove its files under _runs to start afresh")
            skipped = listing.num_rows - slides.num_rows
        else:
            done = done_slides(out, listing, version, cfg.incremental)
            pending = listing.filter(pc.invert(pc.is_in(listing.column("uri"),
                                                        value_set=pa.array(sorted(done), pa.string()))))
            skipped = listing.num_rows - pending.num_rows
            echo(f"featurize: {listing.num_rows} slides listed; planning {pending.num_rows} in Ray tasks "
                 f"({skipped} already done)")
            slides, plan = plan_slides(pending, ids, tiling, cfg, run_id, version, next_unit(out, runs))
        plan_s = time.perf_counter() - t
        prov = provenance(spec.identity(), identity["prompt_set_hash"], run_id,
                          {"dataset_version": version, "tiling": identity["tiling"], **job.described()})
        done_units = set(out.shard_units())
        pending_units = set(int(u) for u in np.unique(plan.column("unit").to_numpy())) - done_units
        slide_errors = int(pc.sum(pc.equal(slides.column("status"), "error")).as_py() or 0)
        record.update({
            "run_id": run_id, "command": "slides", "state": "running", "input": cfg.input, "output": cfg.output,
            **identity, "dataset_version": version, "resumed": resumable is not None,
            "started_at": _iso(started), "versions": package_versions(), **job.described(),
            "counts": {"listed": listing.num_rows, "skipped": skipped, "planned": slides.num_rows,
                       "slide_errors_at_planning": slide_errors, "tiles": plan.num_rows},
            "last_unit": int(pc.max(plan.column("unit")).as_py()) if plan.num_rows else -1,
            "layout": layout,
        })
        if resumable is None:
            out.write_table(slides, "_runs", f"{run_id}.slides.parquet")
            if plan.num_rows:
                out.write_table(plan, "_runs", f"{run_id}.plan.parquet")
        out.write_json({"identity": identity, "version": version}, "_dataset.json")
        out.write_json(record, "_runs", f"{run_id}.json")
        echo(f"featurize: {'resuming run ' + run_id + ': ' if resumable else ''}{plan.num_rows} tissue tiles from "
             f"{slides.num_rows - slide_errors} slides ({slide_errors} unreadable); {len(pending_units)} work "
             f"unit(s) on {layout['size']} {layout['device']} actor(s)")

        stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
        writer = None
        processed = 0
        t_stream = time.perf_counter()
        if pending_units:
            work = plan.filter(pc.is_in(plan.column("unit"), value_set=pa.array(sorted(pending_units), pa.int32())))
            processed = work.num_rows
            writer = ShardWriter(out, unit_counts(plan, pending_units),
                                 tile_table_builder(plan, tiling.tile_px, run_id, version, cfg.concept_maps), prov,
                                 before_commit=lease.check)
            store = _prompt_store()
            encode_kwargs = {"model_spec": spec, "preprocess": preprocess, "prompt_set": prompt_set,
                             "prompt_store": store, "features": job.features}
            if cfg.concept_maps:
                encode_kwargs["concept_maps"] = True
            ds = build_dataset(work.select(["uri", "reader", "x", "y", "level", "read_px", "unit", "row"]),
                               read_tiles, {"spec": preprocess, "tile_px": tiling.tile_px,
                                            "storage_options": cfg.storage_options},
                               cfg.decode_batch_size, encode_kwargs, layout)
            prompts_written = []

            def on_commit(unit):
                if not prompts_written:
                    _write_prompts(out, store, prompt_set, prov)
                    prompts_written.append(unit)

            progress = Progress(processed, "tiles", cfg.progress_interval_s)
            try:
                _consume(ds, writer, cfg, stats, on_commit, progress)
            finally:
                progress.close()
        stream_s = time.perf_counter() - t_stream

        slides = summarise(out, slides, plan, cfg.top_k, logits=prompt_set is not None)
        merged = merge_slides(out.read_table("_slides.parquet"), slides)
        out.write_table(merged.replace_schema_metadata(metadata_bytes({**prov, "concepts": prompt_set.names if prompt_set else []})),
                        "_slides.parquet")
        ended = time.time()
        statuses = slides.column("status").to_pylist()
        record["counts"].update(slides_ok=statuses.count("ok"), slides_error=statuses.count("error"),
                                processed=processed, **finished_counts(writer))
        record.update(state="complete", ended_at=_iso(ended), wall_s=round(ended - started, 3),
                      tiles_per_s=round(processed / stream_s, 2) if processed and stream_s > 0 else 0.0,
                      stages={"listing_s": round(listing_s, 3), "planning_s": round(plan_s, 3),
                              "stream_s": round(stream_s, 3), **stage_summary(stats, t_stream)})
        save_run_record(out, record)
        return record


# -- command line ---------------------------------------------------------------------------------------------------
def register_slides(sub) -> None:
    """Add `featurize slides` to the CLI's subcommands."""
    from .cli import add_model_options

    p = sub.add_parser("slides", help="score every tissue tile of every whole-slide image under INPUT into OUTPUT")
    p.add_argument("--config", help="YAML file with the same options (command-line options win)")
    add_model_options(p, SlidesConfig, positional=("input", "output"))
    p.set_defaults(func=_cmd_slides)


def _cmd_slides(args) -> int:
    from .cli import _echo, options_from_args
    from .config import make_config

    cfg = make_config(SlidesConfig, options_from_args(args, SlidesConfig))
    record = run_slides(cfg, echo=_echo)
    c = record["counts"]
    _echo(f"featurize: run {record['run_id']} {record['state']}: {c['listed']} slides listed, {c['skipped']} "
          f"skipped (already done), {c['slides_ok']} ok, {c['slides_error']} error; {c['processed']} tiles scored "
          f"({c['ok']} ok, {c['error']} error) at {record['tiles_per_s']} tiles/s; output {record['output']}")
    failed = c["slides_error"] or c["error"]
    return 1 if failed and cfg.fail_on_error else 0
