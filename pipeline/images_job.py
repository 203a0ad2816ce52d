"""`featurize images`: every image INPUT names, one row each (the `Job` for images; see pipeline/job.py)."""

from __future__ import annotations

from .config import RunConfig
from .decode import decode_batch
from .job import ModelJob, Planned, list_inputs, model_rows_per_shard, resolve_job
from .nodes import refuse_process_local
from .plan import (
    Listing,
    Workspace,
    classify,
    committed_view,
    contiguous_units,
    count_planned,
    next_unit,
    plan_unit_counts,
    planned_states,
    resumed_counts,
    unfinished_run,
    write_plan,
)
from .run import run_job
from .sources import IMAGE_SUFFIXES
from .write import OutputDir, image_table_builder


class ImagesJob:
    """Images listed from INPUT, planned by uri against the committed shards, decoded by `decode.decode_batch`."""

    command = "images"
    inputs = "images"
    noun = "images"
    plans_in_ray_tasks = False
    stage_columns = ["uri", "size", "mtime", "etag", "unit", "row"]

    def __init__(self, cfg: RunConfig, model: ModelJob):
        self.cfg, self.model = cfg, model
        self.preprocess = None

    def prepare(self, ws: Workspace) -> Listing:
        self.preprocess, listing = list_inputs(self.cfg, self.model, ws, IMAGE_SUFFIXES)
        return listing

    def identity(self) -> dict:
        return self.model.identity()

    def provenance_extra(self) -> dict:
        return {}

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
        """Resume the unfinished run over this input, or plan the inputs not yet committed (with incremental, also
        the changed ones; with retry_errors, those whose newest row is an error row)."""
        committed_view(ws, out, version)
        counts = classify(ws)
        states = planned_states(self.cfg.incremental, self.cfg.retry_errors)
        resumable = unfinished_run(out, runs, version, self.cfg.input)
        if resumable is not None:  # what the listing holds beyond the plan is for a run after it
            run_id, path = resumable
            units = plan_unit_counts(ws, out, path)
            counts = {"planned": sum(units.values()), **resumed_counts(ws, out, path, states)}
            return Planned(run_id, True, counts, units, plan_path=path)
        first_unit, rows_per_shard = next_unit(out, runs), model_rows_per_shard(self.cfg, self.model)
        if dry:
            local, rows = None, count_planned(ws, states)
        else:
            local, rows = write_plan(ws, states, first_unit, rows_per_shard)
        return Planned(
            run_id,
            False,
            {**counts, "planned": rows, "rows_per_shard": rows_per_shard},
            contiguous_units(rows, first_unit, rows_per_shard),
            local_plan=local,
        )

    def save_plan(self, out: OutputDir, planned: Planned) -> None:
        pass  # the plan file is all a resumed run needs

    def stage(self):
        cfg = self.cfg
        return decode_batch, {
            "spec": self.preprocess,
            "max_pixels": cfg.max_image_pixels,
            "storage_options": cfg.storage_options,
            "fast": cfg.fast_decode,
        }

    def encode_kwargs(self) -> dict:
        return {}

    def table_builder(self, run_id: str, version: int):
        return image_table_builder(run_id, version)

    def finish(self, ws: Workspace, out: OutputDir, planned: Planned, prov: dict, record: dict) -> None:
        pass

    def planned_text(self, planned: Planned) -> str:
        return f"{planned.counts['planned']} to process"

    def summary(self, listing: Listing, planned: Planned) -> str:
        c = planned.counts
        if planned.resumed:
            return f"resuming run {planned.run_id}"
        return (
            f"{c.get('new', 0)} new, {c.get('changed', 0)} changed, {c.get('error', 0)} error rows, "
            f"{c.get('unchanged', 0)} unchanged"
        )


def run_images(cfg: RunConfig, echo=print, command_started: float | None = None) -> dict:
    """`featurize images`: returns the run record (also written to OUTPUT/_run.json), or with dry_run the plan's
    counts. command_started: when the user's command began (for first_shard_s); defaults to now."""
    refuse_process_local(cfg)
    return run_job(cfg, ImagesJob(cfg, resolve_job(cfg)), echo, command_started)
