"""`featurize slides`: the `Job` for whole-slide images (see pipeline/job.py). Every slide is planned in a Ray task;
its tissue tiles stream through the same stages as images (`slides.read_tiles` as the CPU stage, the same model
actors) into tile shards; then each slide is summarised.

OUTPUT, beside the files every run writes (see write.py):
  part-NNNNN.parquet            tile rows (TILE_SCHEMA), one shard per work unit of `rows_per_shard` tiles
  _slides.parquet               one row per slide (SLIDE_SCHEMA): status, slide_mpp and its source, tiles, scores
  _runs/<run-id>.plan.parquet   the run's tiles and their work units; <run-id>.slides.parquet its slides (resume)

Resume: rerunning the same command finishes an interrupted run's uncommitted units; a new run skips slides whose
tiles are all committed (slides that failed are tried again).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import SlidesConfig
from .dicom import group_listing_files
from .errors import UserError, first_line
from .job import ModelJob, Planned, list_inputs, model_rows_per_shard, resolve_job
from .nodes import refuse_process_local
from .plan import (
    Listing,
    Workspace,
    contiguous_units,
    done_slides,
    listed_except,
    listed_uris,
    next_unit,
    plan_unit_counts,
    resumed_counts,
    unfinished_run,
    write_parts_plan,
)
from .run import run_job
from .schema import (
    CONCEPT_MAPS_FIELD,
    PLAN_TILE_SCHEMA,
    SLIDE_SCHEMA,
    TILE_SCHEMA,
    current_names,
    error_column,
    fixed_list,
    logits_column,
    metadata_bytes,
    nullable,
    source_columns,
    without_absent_logits,
)
from .slides import SLIDE_SUFFIXES, Tiling, plan_slide, read_tiles, slide_ids
from .storage import is_remote, join, only_driver_node, remove_tree, write_bytes_atomic
from .summary import summarise_slides
from .write import OutputDir, parquet_bytes

log = logging.getLogger(__name__)


def make_tiling(cfg: SlidesConfig, model_input_px: int) -> Tiling:
    tile_px = cfg.tile_px or model_input_px
    if cfg.overlap_px >= tile_px:
        raise UserError(f"overlap_px {cfg.overlap_px} must be smaller than the tile size {tile_px} px")
    return Tiling(target_mpp=cfg.target_mpp, tile_px=tile_px, overlap_px=cfg.overlap_px, min_tissue=cfg.min_tissue)


# -- planning -------------------------------------------------------------------------------------------------------
def _as_completed(refs: list, stall_timeout_s: float):
    """(index, result or the exception that ended it) as each task finishes. When none finishes for
    stall_timeout_s (a remote read that hangs, a node gone), the rest are cancelled and given a timeout error:
    planning never waits for ever."""
    import ray

    waiting = {ref: i for i, ref in enumerate(refs)}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=stall_timeout_s)
        if not ready:
            for ref, i in waiting.items():
                ray.cancel(ref, force=True)
                yield (
                    i,
                    TimeoutError(
                        f"planning made no progress for {stall_timeout_s:.0f} s (a read that hangs?); "
                        "rerun to retry this slide"
                    ),
                )
            return
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        for ref in ready:
            i = waiting.pop(ref)
            try:
                yield i, ray.get(ref)
            except Exception as exc:  # the task's worker died (a reader crashing on this file, say)
                yield i, exc


def tile_plan_table(row: dict, tiles: dict, slide_id: str, part: int, sources: dict) -> pa.Table:
    """One slide's tiles as plan rows (PLAN_TILE_SCHEMA, the slide's values repeated on every tile) with their part
    (the slide's index in the run's plan) and tile (position in the slide): the driver numbers rows by both."""
    n = len(tiles["x"])
    per_slide = {
        "slide_id": slide_id,
        "uri": row["uri"],
        "reader": row["reader"],
        "level": row["level"],
        "read_px": row["read_px"],
        "tile_mpp": row["tile_mpp"],
        **sources,
    }
    table = pa.table(
        {
            f.name: tiles[f.name] if f.name in tiles else pa.repeat(pa.scalar(per_slide[f.name], f.type), n)
            for f in PLAN_TILE_SCHEMA
        },
        schema=PLAN_TILE_SCHEMA,
    )
    return table.append_column("part", pa.array(np.full(n, part, np.int32))).append_column(
        "tile", pa.array(np.arange(n, dtype=np.int64))
    )


def plan_slide_tiles(
    uri: str,
    slide_id: str,
    part: int,
    sources: dict,
    tiling: Tiling,
    reader: str,
    slide_mpp: float | None,
    storage_options: dict | None,
    dest: str | None,
    count_only: bool,
):
    """(A Ray task per slide.) Plan one slide and write its tiles as a plan part file under dest: (the slide row,
    where its tiles are). That is the part file's path; the tiles themselves when dest is None (the workers cannot
    write where the driver reads) or the write failed (the driver writes them); None with no tiles or count_only (the
    row counts them)."""
    row, tiles = plan_slide(uri, tiling, reader, slide_mpp, storage_options)
    if count_only or not row["n_tiles"]:
        return row, None
    table = tile_plan_table(row, tiles, slide_id, part, sources)
    if dest is None:
        return row, table
    path = join(dest, f"{part:08d}.parquet")
    try:
        write_bytes_atomic(path, parquet_bytes(table), storage_options)
    except Exception:  # not the slide's fault: the driver writes the tiles instead
        return row, table
    return row, path


def plan_slides(
    pending: pa.Table,
    ids: dict[str, str],
    tiling: Tiling,
    cfg: SlidesConfig,
    run_id: str,
    version: int,
    first_unit: int,
    rows_per_shard: int,
    ws: Workspace,
    out: OutputDir | None,
    dest: str | None,
    count_only: bool = False,
) -> tuple[pa.Table, int, str | None, int]:
    """One Ray task per slide (open, microns per pixel, tissue, grid) writes its tiles as a part file under dest
    (see plan_slide_tiles); the driver keeps a row per slide, never the tiles. DuckDB then numbers the tiles in slide
    order (slides by uri, tiles in grid order) into work units and writes the plan file in the workspace: the plan is
    the same wherever the parts were written and whichever task finished first. Returns (the slides table, tiles
    planned, the plan file's path (None with count_only, which writes no parts), how many parts the driver wrote)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(plan_slide_tiles)
    uris = pending.column("uri").to_pylist()
    sources = pending.select(["size", "mtime", "etag"]).to_pylist()
    refs = [
        task.remote(
            uri, ids[uri], i, sources[i], tiling, cfg.reader, cfg.slide_mpp, cfg.storage_options, dest, count_only
        )
        for i, uri in enumerate(uris)
    ]
    rows: list[dict] = [{} for _ in uris]
    parts: dict[int, str] = {}
    by_driver = 0
    for i, planned in _as_completed(refs, cfg.stall_timeout_s):
        uri = uris[i]
        row, where = planned if isinstance(planned, tuple) else (_crashed_row(uri, planned), None)
        row.update(
            slide_id=ids[uri],
            tile_px=tiling.tile_px,
            top_k=cfg.top_k,
            n_tile_errors=0,
            run_id=run_id,
            dataset_version=version,
            **sources[i],
        )
        rows[i] = row
        if isinstance(where, pa.Table):  # the driver writes what the worker could not
            os.makedirs(ws.path("tiles"), exist_ok=True)
            parts[i] = ws.path("tiles", f"{i:08d}.parquet")
            pq.write_table(where, parts[i], compression="zstd")
            by_driver += 1
        elif where is not None:
            parts[i] = where
    slides = pa.Table.from_pylist(
        [{f.name: row.get(f.name) for f in SLIDE_SCHEMA} for row in rows], schema=SLIDE_SCHEMA
    )
    n_tiles = sum(int(r["n_tiles"] or 0) for r in rows)
    if count_only:
        return slides, n_tiles, None, 0
    n_tiles_by_part = {i: int(rows[i]["n_tiles"]) for i in parts}
    plan = write_parts_plan(ws, out, parts, n_tiles_by_part, PLAN_TILE_SCHEMA, first_unit, rows_per_shard)
    return slides, n_tiles, plan, by_driver


def tile_parts_destination(ws: Workspace, out: OutputDir, run_id: str) -> str | None:
    """Where the planning tasks write the slides' part files: the workspace when every node is the driver's, OUTPUT
    (`_runs/<run-id>.tiles/`, removed once the plan is written) on an object store; else (a local OUTPUT on several
    nodes, whose disks may differ) nowhere: the tasks hand their tiles to the driver."""
    if only_driver_node():
        return ws.path("tiles")
    if is_remote(out.url):
        return out.child("_runs", f"{run_id}.tiles")
    return None


def _crashed_row(uri: str, exc: BaseException) -> dict:
    reason = (
        first_line(exc)
        if isinstance(exc, TimeoutError)
        else f"planning this slide crashed its worker ({type(exc).__name__}: {first_line(exc)})"
    )
    return {"uri": uri, "status": "error", "n_tiles": 0, "plan_s": 0.0, "error": reason}


# -- shards ---------------------------------------------------------------------------------------------------------
def tile_table_builder(tile_px: int, run_id: str, dataset_version: int, concept_maps: bool):
    """build_table for tile shards: result columns plus what the plan knew of each tile (carried through the
    stages with the rows)."""
    schema = TILE_SCHEMA.append(CONCEPT_MAPS_FIELD) if concept_maps else TILE_SCHEMA

    def build(cols: dict[str, np.ndarray]) -> pa.Table:
        n = len(cols["row"])
        ok = cols["status"] == "ok"
        arrays = [
            pa.array([str(v) for v in cols["slide_id"]], pa.string()),
            pa.array([str(v) for v in cols["uri"]], pa.string()),
            pa.array(cols["x"], pa.int64()),
            pa.array(cols["y"], pa.int64()),
            pa.array(cols["level"], pa.int32()),
            pa.array(np.full(n, tile_px), pa.int32()),
            nullable(cols["tile_mpp"], pa.float64()),
            pa.array(cols["tissue_fraction"], pa.float32()),
            pa.array([str(s) for s in cols["status"]], pa.string()),
            error_column(cols["error"]),
            fixed_list(np.asarray(cols["image_features"], np.float16), pa.float16(), ok),
            logits_column(cols, ok),
            *source_columns(cols),
            pa.array([run_id] * n, pa.string()),
            pa.array([dataset_version] * n, pa.int32()),
        ]
        if concept_maps:
            maps = np.asarray(cols["concept_maps"], np.float16)
            arrays.append(fixed_list(maps.reshape(n, -1), pa.float16(), ok))
        return without_absent_logits(cols, pa.Table.from_arrays(arrays, schema=schema))

    return build


def merge_slides(previous: pa.Table | None, current: pa.Table) -> pa.Table:
    """This run's slide rows replace earlier rows of the same slide in the same dataset version; the rest are kept
    (other versions' rows too, under today's column names, whenever they were written). Sorted by uri."""
    if previous is None or previous.num_rows == 0:
        return current.sort_by("uri")
    previous = current_names(previous, "slides").select(SLIDE_SCHEMA.names).cast(SLIDE_SCHEMA)
    keys = pc.binary_join_element_wise(
        current.column("uri"), current.column("dataset_version").cast(pa.string()), "\x1f"
    )
    mine = pc.binary_join_element_wise(
        previous.column("uri"), pc.fill_null(previous.column("dataset_version"), 0).cast(pa.string()), "\x1f"
    )
    keep = pc.invert(pc.is_in(mine, value_set=keys))
    return pa.concat_tables([previous.filter(keep), current]).sort_by("uri")


# -- the run --------------------------------------------------------------------------------------------------------
class SlidesJob:
    """Slides listed, planned into tissue tiles by one Ray task per slide, tiles read by `slides.read_tiles`, tile
    shards, then one summary row per slide in _slides.parquet."""

    command = "slides"
    inputs = "slides"
    noun = "tiles"
    plans_in_ray_tasks = True
    stage_columns = [
        "slide_id",
        "uri",
        "reader",
        "x",
        "y",
        "level",
        "read_px",
        "tile_mpp",
        "tissue_fraction",
        "size",
        "mtime",
        "etag",
        "unit",
        "row",
    ]

    def __init__(self, cfg: SlidesConfig, model: ModelJob):
        self.cfg, self.model = cfg, model
        self.preprocess = None
        self.tiling: Tiling | None = None

    def prepare(self, ws: Workspace) -> Listing:
        # A DICOM slide is a series of .dcm instances: one listing row per series, as a slide file is one.
        self.preprocess, listing = list_inputs(self.cfg, self.model, ws, SLIDE_SUFFIXES, group=group_listing_files)
        self.tiling = make_tiling(self.cfg, max(self.preprocess.height, self.preprocess.width))
        return listing

    def identity(self) -> dict:
        cfg, tiling = self.cfg, self.tiling
        # The keys keep their first names (`mpp` is target_mpp, `overlap` is overlap_px) although the options were
        # renamed: the identity is compared with the one an existing OUTPUT recorded, and new keys would refuse
        # every OUTPUT written before the rename as changed (needing --new-version for the same tiling).
        return {
            **self.model.identity(),
            "tiling": {
                "mpp": tiling.target_mpp,
                "tile_px": tiling.tile_px,
                "overlap": tiling.overlap_px,
                "min_tissue": tiling.min_tissue,
                "slide_mpp": cfg.slide_mpp,
                "reader": cfg.reader,
            },
            "concept_maps": cfg.concept_maps,
        }

    def provenance_extra(self) -> dict:
        return {"tiling": self.identity()["tiling"]}

    def plan(
        self,
        ws: Workspace,
        out: OutputDir,
        listing: Listing,
        version: int,
        run_id: str,
        runs: list[dict],
        dry: bool = False,
    ) -> Planned:
        """Resume the unfinished run, or plan the slides not done yet into tiles (a dry run too)."""
        resumable = unfinished_run(out, runs, version, self.cfg.input)
        if resumable is not None:
            return self._resumed(ws, out, version, *resumable)
        cfg = self.cfg
        done = done_slides(ws, out, out.read_table("_slides.parquet"), version, cfg.incremental)
        pending = listed_except(ws, done)
        uris = listed_uris(ws)
        first_unit = next_unit(out, runs)
        rows_per_shard = model_rows_per_shard(cfg, self.model, cfg.concept_maps)
        dest = tile_parts_destination(ws, out, run_id)
        # A dry run on one node plans as a run does (into the workspace: what benchmarks.scale measures); elsewhere
        # it only counts the tiles (it writes nothing to OUTPUT, and pulls no tiles to the driver).
        count_only = dry and dest != ws.path("tiles")
        try:
            slides, n_tiles, local, by_driver = plan_slides(
                pending, dict(zip(uris, slide_ids(uris))), self.tiling, cfg, run_id, version, first_unit,
                rows_per_shard, ws, out, None if count_only else dest, count_only,
            )  # fmt: skip
        finally:
            if dest is not None and is_remote(dest):  # the plan file holds the tiles now
                remove_tree(dest, cfg.storage_options)
        counts = {**self._counts(slides, n_tiles), "rows_per_shard": rows_per_shard, "new": pending.num_rows,
                  "unchanged": done.num_rows, "tile_parts_by_driver": by_driver}  # fmt: skip
        units = contiguous_units(n_tiles, first_unit, rows_per_shard)
        return Planned(run_id, False, counts, units, local_plan=local, extra={"slides": slides})

    def _resumed(self, ws: Workspace, out: OutputDir, version: int, run_id: str, path: str) -> Planned:
        """The unfinished run's plan and slide table, as it wrote them; and the slides listed beyond it."""
        slides = current_names(out.read_table("_runs", f"{run_id}.slides.parquet"), "slides")
        if slides is None:
            raise UserError(
                f"run {run_id} in {out.url} has a plan but no slide table (written by a version before slide tables "
                "were saved with the plan); remove its files under _runs to start afresh"
            )
        units = plan_unit_counts(ws, out, path)
        done = done_slides(ws, out, out.read_table("_slides.parquet"), version, self.cfg.incremental)
        counts = {
            **self._counts(slides, sum(units.values())),
            **resumed_counts(ws, out, path, done=done, planned_uris=slides),
        }
        return Planned(run_id, True, counts, units, plan_path=path, extra={"slides": slides})

    @staticmethod
    def _counts(slides: pa.Table, tiles: int) -> dict:
        errors = int(pc.sum(pc.equal(slides.column("status"), "error")).as_py() or 0)
        return {
            "planned": slides.num_rows,
            "slides": slides.num_rows,
            "slide_errors_at_planning": errors,
            "tiles": tiles,
        }

    def save_plan(self, out: OutputDir, planned: Planned) -> None:
        """The run's slide table beside its plan: a rerun after a crash resumes with it (a resumed run has it)."""
        if not planned.resumed:
            out.write_table(planned.extra["slides"], "_runs", f"{planned.run_id}.slides.parquet")

    def stage(self):
        return read_tiles, {
            "spec": self.preprocess,
            "tile_px": self.tiling.tile_px,
            "storage_options": self.cfg.storage_options,
        }

    def encode_kwargs(self) -> dict:
        return {"concept_maps": True} if self.cfg.concept_maps else {}

    def table_builder(self, run_id: str, version: int):
        return tile_table_builder(self.tiling.tile_px, run_id, version, self.cfg.concept_maps)

    def finish(self, ws: Workspace, out: OutputDir, planned: Planned, prov: dict, record: dict) -> None:
        """Each slide's summary from the run's shards; _slides.parquet keeps the other slides' rows."""
        prompt_set = self.model.prompt_set
        slides = summarise_slides(
            out, planned.extra["slides"], sorted(planned.units), self.cfg.top_k, logits=prompt_set is not None
        )
        merged = merge_slides(out.read_table("_slides.parquet"), slides)
        out.write_table(
            merged.replace_schema_metadata(
                metadata_bytes({**prov, "concepts": prompt_set.names if prompt_set else []})
            ),
            "_slides.parquet",
        )
        statuses = slides.column("status").to_pylist()
        record["counts"].update(slides_ok=statuses.count("ok"), slides_error=statuses.count("error"))

    def planned_text(self, planned: Planned) -> str:
        return f"{planned.counts['tiles']} tiles to score"

    def summary(self, listing: Listing, planned: Planned) -> str:
        c = planned.counts
        head = (
            f"resuming run {planned.run_id}: "
            if planned.resumed
            else f"{c.get('unchanged', 0)} slide(s) already done; "
        )
        return (
            f"{head}{c['tiles']} tissue tiles from {c['slides'] - c['slide_errors_at_planning']} slides "
            f"({c['slide_errors_at_planning']} unreadable)"
        )


def run_slides(cfg: SlidesConfig, echo=print, command_started: float | None = None) -> dict:
    """`featurize slides`: returns the run record (also written to OUTPUT/_run.json), or with dry_run the plan's
    counts."""
    refuse_process_local(cfg)
    model = resolve_job(cfg)
    if cfg.concept_maps and model.prompt_set is None:
        raise UserError("--concept-maps scores concepts: it needs --prompts")
    if cfg.concept_maps and not model.spec.family.concept_head:
        raise UserError(
            f"--concept-maps needs a model with ConceptCLIP's concept head; {cfg.model} is a "
            f"{model.spec.family.title} model"
        )
    return run_job(cfg, SlidesJob(cfg, model), echo, command_started)
