"""The driver: every featurisation job (see pipeline/job.py) runs through the same five phases.

    acquire  the OUTPUT's lease (one writer per OUTPUT) and a local workspace
    list     Ray started, INPUT listed meanwhile (on a thread); the actors' layout; the
             worker nodes probed for the local paths they need; the dataset version this run writes
    plan     the job's plan, resumed or new (a first run's model actors load meanwhile); the run record, the plan
             and what a resume needs written to OUTPUT
    stream   the plan's work units through the CPU stage and the model actors; each unit's shard committed as soon
             as its last row arrives
    finish   the job's finish step; the run record and _dataset.json written as complete

Each phase is a function over one `Run`. A dry run lists and plans the same way and writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from .cluster import Layout, actor_layout, cluster_shape, init_ray, model_share, while_ray_starts
from .config import JobConfig
from .console import Progress
from .dataset import Versions, prompts_file
from .errors import EnvironmentFailure
from .job import Job, Planned
from .lease import Lease
from .models import device_override
from .nodes import probe_nodes
from .plan import Listing, Workspace, unfinished_run, upload_plan, write_listing_uris
from .record import finished_counts, iso, new_run_id, record_failure, save_run_record, stage_summary, started_record
from .schema import prompts_table, provenance
from .sources import check_local_input
from .stream import Stream, open_stream
from .write import OutputDir, ShardWriter, unit_first_rows


@dataclass
class Run:
    """One run's state, handed from phase to phase."""

    cfg: JobConfig
    job: Job
    echo: Callable[[str], None]
    command_started: float  # when the user's command began: first_shard_s and wall_s count from here
    run_id: str
    lease: Lease
    ws: Workspace
    out: OutputDir
    started: float = field(default_factory=time.time)
    seconds: dict = field(default_factory=dict)  # listing, Ray's start, planning, streaming
    listing: Listing | None = None
    layout: Layout | None = None
    everywhere: bool = True  # every node reads OUTPUT (else the driver hands the plan to the stream)
    runs: list[dict] = field(default_factory=list)
    versions: Versions | None = None
    identity: dict = field(default_factory=dict)
    version: int = 1
    stream: Stream | None = None
    streamed_before_plan: bool = False
    planned: Planned | None = None
    pending: dict[int, int] = field(default_factory=dict)  # work unit -> rows, of the units not committed yet
    prov: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    writer: ShardWriter | None = None
    stats: dict = field(default_factory=lambda: {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0})
    first_shard_s: float | None = None


def run_job(cfg: JobConfig, job: Job, echo=print, command_started: float | None = None) -> dict:
    """Run `job` into OUTPUT; returns the run record (also OUTPUT/_run.json), or with dry_run the plan's counts."""
    check_local_input(cfg.input)
    if cfg.dry_run:
        return dry_run(cfg, job, echo)
    command_started = command_started or time.time()
    record = run_once(cfg, job, echo, command_started)
    after = record["counts"].get("after_plan", 0) if record.get("resumed") else 0
    if after:  # the resumed run did its own plan; what was listed since gets a run of its own, now
        echo(f"featurize: resumed run {record['run_id']} complete; {after} input(s) beyond its plan: planning them")
        record = run_once(cfg, job, echo, command_started)
    return record


def run_once(cfg: JobConfig, job: Job, echo, command_started: float) -> dict:
    """One run through the phases (a resumed one finishes its own plan, nothing more)."""
    with ExitStack() as cleanup:  # released in reverse: the stream, Ray, the workspace, the lease
        run = acquire(cfg, job, echo, command_started, cleanup)
        try:
            list_inputs(run, cleanup)
            plan(run, cleanup)
            stream(run, cleanup)
            return finish(run)
        except BaseException as exc:
            record_failure(run.out, run.record, exc, run.lease)
            raise


# -- the phases -----------------------------------------------------------------------------------------------------
def acquire(cfg: JobConfig, job: Job, echo, command_started: float, cleanup: ExitStack) -> Run:
    """The OUTPUT's lease and a local workspace, released however the run ends."""
    run_id = new_run_id()
    lease = cleanup.enter_context(Lease.acquire(cfg.output, cfg.storage_options, run_id))
    if lease.swept:
        echo(f"featurize: removed {lease.swept} temporary file(s) a stopped run left in {cfg.output}")
    ws = cleanup.enter_context(Workspace())
    return Run(cfg, job, echo, command_started, run_id, lease, ws, OutputDir(cfg.output, cfg.storage_options))


def list_inputs(run: Run, cleanup: ExitStack) -> None:
    """Ray started and INPUT listed, then the actors' layout, the node probe and the dataset version."""
    cfg, job = run.cfg, run.job

    def listing():
        t = time.perf_counter()
        return job.prepare(run.ws), time.perf_counter() - t

    t = time.perf_counter()
    started_ray, (run.listing, listing_s) = while_ray_starts(listing, cfg.verbose)
    if started_ray:
        cleanup.callback(_shutdown_ray)
    run.seconds.update(listing_s=listing_s, ray_start_and_prepare_s=time.perf_counter() - t)
    run.layout = actor_layout(cfg, cluster_shape(), model_share(run.out), job.model.batch_row_bytes(job.preprocess))
    run.everywhere = probe_nodes(cfg, run.listing.sample, run.echo)
    job.model.spec = job.model.spec.placed(run.layout.device)
    run.identity = job.identity()
    run.runs = run.out.runs()
    run.versions = Versions(run.out.read_json("_dataset.json"), run.runs)
    run.version = run.versions.choose(run.out.url, run.identity, cfg.new_version)


def plan(run: Run, cleanup: ExitStack) -> None:
    """The job's plan (the stream may open first), then the run record, the plan and the listing written."""
    job, out, listing = run.job, run.out, run.listing
    if stream_before_plan(run):
        run.streamed_before_plan = True
        open_run_stream(run, cleanup, listing.unique, listing.unique)
    t = time.perf_counter()
    planned = run.planned = job.plan(run.ws, out, listing, run.version, run.run_id, run.runs)
    run.seconds["planning_s"] = time.perf_counter() - t
    if planned.resumed:
        run.lease.update(run_id=planned.run_id)
    run.run_id = planned.run_id
    extra = {"dataset_version": run.version, **job.provenance_extra(), **job.model.described()}
    run.prov = provenance(job.model.spec.identity(), run.identity["prompt_set_hash"], run.run_id, extra)
    done = set(out.shard_units())
    run.pending = {u: n for u, n in planned.units.items() if u not in done}
    run.record = started_record(
        run.run_id,
        job,
        run.cfg,
        run.identity,
        run.version,
        planned,
        listing,
        run.started,
        run.layout,
        run.prov["command"],
    )
    fenced = run.lease.fenced  # every write of a shared file in OUTPUT, only while this run holds it
    with fenced():
        job.save_plan(out, planned)  # first: a plan in OUTPUT is resumable only with what goes beside it
    if planned.local_plan is not None and planned.units:
        with fenced():
            planned.plan_path = upload_plan(planned.local_plan, out, run.run_id)
    with fenced():
        write_listing_uris(run.ws, out)
    with fenced():
        out.write_json(run.record, "_runs", f"{run.run_id}.json")
    if listing.duplicates:
        run.echo(f"featurize: {listing.duplicates} uri(s) listed more than once: each is processed once")
    run.echo(
        f"featurize: {listing.rows} {job.inputs} listed in {run.seconds['listing_s']:.1f} s; "
        f"{job.summary(listing, planned)}; {len(run.pending)} work unit(s) to process on {run.layout.size} "
        f"{run.layout.device} actor(s)"
    )


def stream(run: Run, cleanup: ExitStack) -> None:
    """Every pending work unit through the stream, each unit's shard committed once all its rows arrived."""
    t = time.perf_counter()
    try:
        if run.pending:
            _stream_units(run, cleanup)
    finally:
        if run.stream is not None:
            run.stream.close()  # the actors' CPUs are free for the finish step
            t = run.stream.started_at
        run.seconds["stream_s"] = time.perf_counter() - t


def _stream_units(run: Run, cleanup: ExitStack) -> None:
    cfg, job, planned = run.cfg, run.job, run.planned
    rows = sum(run.pending.values())
    if run.stream is None:
        open_run_stream(run, cleanup, sum(planned.units.values()), rows)
    units = None if len(run.pending) == len(planned.units) else sorted(run.pending)
    run.stream.post_plan(run.out, planned.plan_path, job.stage_columns, units, rows, run.everywhere)
    os.makedirs(run.ws.path("units"), exist_ok=True)
    run.writer = ShardWriter(
        run.out,
        run.pending,
        job.table_builder(run.run_id, run.version),
        run.prov,
        before_commit=lambda: _before_commit(run),
        spill_dir=run.ws.path("units"),
        first_rows=unit_first_rows(planned.units),
    )
    progress = Progress(rows, job.noun, cfg.progress_interval_s)
    try:
        run.stream.consume(run.writer, cfg, run.stats, progress)
    finally:
        progress.close()
    if run.writer.pending:  # never recorded complete with work missing
        raise EnvironmentFailure(
            f"the stream ended with {run.writer.pending} work unit(s) unfinished "
            f"({run.writer.missing_rows} rows missing); rerun the same command to resume"
        )


def _before_commit(run: Run) -> None:
    """Before each shard: the lease still ours; before the first, the prompt table (no shard without it)."""
    run.lease.check()  # a shard is written by one PUT (or a rename) right after: within the lease's margin
    if run.first_shard_s is None:
        prompt_set = run.job.model.prompt_set
        if prompt_set is not None:  # features only: no prompt table
            message = run.stream.prompt_embeddings()
            prov = {**run.prov, "logit_scale": message.logit_scale, "logit_bias": message.logit_bias}
            table = prompts_table(prompt_set, message.text_embeddings, prov)
            with run.lease.fenced():
                run.out.write_table(table, *prompts_file(run.version))
            if run.versions.readable in (None, run.version):  # never the names of a version still readable
                with run.lease.fenced():
                    run.out.write_table(table, "_prompts.parquet")
        run.first_shard_s = time.time() - run.command_started


def finish(run: Run) -> dict:
    """The job's finish step, then the run recorded as complete and its version made readable."""
    job, record, layout = run.job, run.record, run.layout
    processed = sum(run.pending.values())
    record["counts"].update(processed=processed, **finished_counts(run.writer))
    with run.lease.fenced():  # the job's own writes (slides: _slides.parquet)
        job.finish(run.ws, run.out, run.planned, run.prov, record)
    ended, stream_s = time.time(), run.seconds["stream_s"]
    stream_started = run.stream.started_at if run.stream is not None else time.perf_counter()
    record.update(
        state="complete",
        ended_at=iso(ended),
        wall_s=round(ended - run.command_started, 3),
        first_shard_s=round(run.first_shard_s, 3) if run.first_shard_s else None,
        stages={
            **{name: round(seconds, 3) for name, seconds in run.seconds.items()},
            "actors_started_before_plan": run.streamed_before_plan,
            **stage_summary(run.stats, stream_started),
        },
    )
    record[f"{job.noun}_per_s"] = round(processed / stream_s, 2) if processed and stream_s > 0 else 0.0
    actor_start = run.stream.actor_start() if run.stream is not None else None
    override = device_override(layout.device, actor_start["device"]) if actor_start else None
    if actor_start:
        record["stages"]["actor_start"] = actor_start
    if override:  # no GPU did the work: no GPU figures either
        record["layout"]["device_override"] = override
    elif layout.device == "cuda" and stream_s > 0:
        busy = run.stats["model_s"] / (stream_s * layout.size)
        record["stages"]["gpu_busy_fraction"] = round(min(1.0, busy), 4)
    if run.versions.readable not in (None, run.version):  # a new version becomes the readable one
        with run.lease.fenced():
            _readable_prompts(run.out, run.version)
    with run.lease.fenced():
        run.out.write_json(run.versions.completed(run.version, run.identity), "_dataset.json")
    with run.lease.fenced():
        save_run_record(run.out, record)
    return record


def _readable_prompts(out: OutputDir, version: int) -> None:
    """_prompts.parquet becomes `version`'s prompt table (or goes, for a features-only version)."""
    table = out.read_table(*prompts_file(version))
    if table is not None:
        out.write_table(table, "_prompts.parquet")
    else:
        out.remove("_prompts.parquet")


# -- the run's one optional speed-up, decided here --------------------------------------------------------------------
def stream_before_plan(run: Run) -> bool:
    """Open the stream (the model actors load) before planning: only for a first run over OUTPUT (nothing committed,
    nothing to resume, so at most every listed input is planned), and only when planning needs no CPUs of its own.
    Other runs plan first, so a run with nothing new never loads the model."""
    if run.job.plans_in_ray_tasks or run.out.shard_units():
        return False
    return unfinished_run(run.out, run.runs, run.version, run.cfg.input) is None


def open_run_stream(run: Run, cleanup: ExitStack, plan_rows: int, rows: int) -> None:
    run.stream = open_stream(run.job, run.cfg, run.layout, plan_rows, rows)
    cleanup.callback(run.stream.close)


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


# -- dry run ----------------------------------------------------------------------------------------------------------
def dry_run(cfg: JobConfig, job: Job, echo=print) -> dict:
    """List and plan as the run would, against OUTPUT as it is; start no model and write nothing to OUTPUT. Prints
    a summary, then the counts as one JSON line (the last line of stdout)."""
    t = time.perf_counter()
    out = OutputDir(cfg.output, cfg.storage_options)
    with Workspace() as ws, ExitStack() as cleanup:
        t_list = time.perf_counter()
        listing = job.prepare(ws)
        listing_s = time.perf_counter() - t_list
        runs = out.runs()
        version = Versions(out.read_json("_dataset.json"), runs).choose(out.url, job.identity(), cfg.new_version)
        if job.plans_in_ray_tasks and init_ray(cfg.verbose):
            cleanup.callback(_shutdown_ray)
        planned = job.plan(ws, out, listing, version, "dry-run", runs, dry=True)
    done = set(out.shard_units())
    counts = {
        "listed": listing.rows,
        "duplicates": listing.duplicates,
        "unique": listing.unique,
        **{k: 0 for k in ("new", "changed", "error", "unchanged")},
        **planned.counts,
        "work_units": sum(1 for u in planned.units if u not in done),
        "resumes_run": planned.resumed and planned.run_id or None,
        "dataset_version": version,
        "listing_s": round(listing_s, 3),
        "seconds": round(time.perf_counter() - t, 3),
    }
    if not cfg.incremental and counts["changed"]:
        echo(f"featurize: {counts['changed']} committed input(s) changed since; only --incremental reprocesses them")
    if counts["error"] and not getattr(cfg, "retry_errors", False):
        echo(f"featurize: {counts['error']} input(s) have an error row; --retry-errors reprocesses them")
    echo(
        f"featurize: dry run: {listing.rows} {job.inputs} listed ({listing.duplicates} duplicate(s)); "
        f"{job.summary(listing, planned)}; {job.planned_text(planned)} in {counts['work_units']} work unit(s); "
        "nothing written"
    )
    print(json.dumps(counts, sort_keys=True), flush=True)
    return counts
