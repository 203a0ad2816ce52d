"""The driver: validate, list, plan work units, stream them through Ray Data, commit shards, record the run."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .config import JobConfig, RunConfig
from .console import Progress, hide_native_log_lines, stderr_is_terminal
from .decode import decode_batch
from .encode import EncodeBatch, RunBoard
from .errors import ENVIRONMENT_ERROR_CLASSES, EnvironmentFailure, UserError, first_line
from .lease import LEASE_NAME, Lease
from .models import (
    FeatureSpec,
    ModelSpec,
    hidden_shape,
    parse_features,
    preprocess_spec,
    resolve_model,
    row_widths,
)
from .plan import (
    Listing,
    Workspace,
    classify,
    committed_view,
    contiguous_units,
    next_unit,
    open_listing,
    plan_ranges,
    plan_unit_counts,
    planned_kinds,
    post_plan,
    read_plan_range,
    shard_rows,
    unfinished_run,
    upload_plan,
    write_listing_uris,
    write_plan,
)
from .prompts import PromptSet, load_prompts
from .schema import package_versions, prompts_table, provenance
from .sources import IMAGE_SUFFIXES, check_local_input, lists_with_ray, write_listing
from .storage import exists, is_remote, local_path, only_driver_node, working_nodes
from .write import OutputDir, ShardWriter, check_identity, image_table_builder, unit_first_rows

log = logging.getLogger(__name__)


# A decode task holds a batch of full-size decoded images. Reserving memory for it also keeps Ray Data from fusing
# decoding into the model actors (differing remote args never fuse): decoding stays a parallel CPU stage.
DECODE_TASK_MEMORY = 512 * 1024**2


# A block of the CPU stage's output (the model's input pixels) holds at most this much: 151 rows at 384 px, 445 at
# 224 px. Smaller blocks fill and drain the pipeline sooner (the model waits for a whole decoded block).
DECODED_BLOCK_BYTES = 64 * 1024**2

# How long a failed run waits for its pull thread to let go of the stream (a stalled stream never answers).
STREAM_SHUTDOWN_S = 5.0


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


# -- Ray ------------------------------------------------------------------------------------------------------------
def init_ray(verbose: bool = False) -> bool:
    """Attach to the cluster RAY_ADDRESS names (`ray job submit` sets it for the job's driver); without it, start a
    private local Ray, never one that Ray's address file names (it may be dead, or someone else's). Quiet unless
    verbose: no worker output, no Ray log lines, no token notice. Returns True if we started Ray."""
    import ray

    if ray.is_initialized():
        return False
    import ray.data  # configures its own loggers when imported: our levels go after it

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose:
        # Ray's C++ core logs an ERROR line for every Ray Data actor pool (constructor arguments in the object
        # store, ray #53727) that is no failure of the run; failures that matter reach us as exceptions.
        hide_native_log_lines()
    address = os.environ.get("RAY_ADDRESS") or None
    level = logging.WARNING if verbose else logging.ERROR
    for name in ("ray", "ray.data"):  # before init: a new local Ray announces its token authentication at WARNING
        logging.getLogger(name).setLevel(level)
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=level,
        log_to_driver=verbose,
        configure_logging=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose and stderr_is_terminal()
    ctx.print_on_execution_start = False
    return address is None


def while_ray_starts(prepare, verbose: bool = False, overlap: bool = True):
    """Run prepare() (listing, loading the processor) on a thread while Ray starts on this one (ray.init wants
    the main thread); without overlap (a listing that runs in Ray tasks), after Ray has started. Returns (whether we
    started Ray, prepare's result); Ray is shut down again if prepare fails."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="featurize-prepare") as pool:
        future = pool.submit(prepare) if overlap else None
        started_ray = init_ray(verbose)
        try:
            return started_ray, (future.result() if future is not None else prepare())
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise


def cluster_shape() -> dict:
    """CPUs and GPUs of the cluster, and the CPUs of its smallest CPU node (an actor must fit there beside a decode
    task, or a run that lost its bigger nodes would hang)."""
    import ray

    res = ray.cluster_resources()
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0)]
    return {
        "cpus": int(res.get("CPU", 0)),
        "gpus": int(res.get("GPU", 0)),
        "nodes": len(nodes),
        "node_cpus": int(min(nodes)) if nodes else int(res.get("CPU", 0)),
    }


# On CPUs, a decode task reserves one CPU; an actor at most half its node, so decoding can never be starved there.
DECODE_CPUS = 1.0
# GPU actors take two calls at a time: measured on an H200 with the so400m tower, one call at a time left the GPU
# idle while Ray Data assembled each 256-image batch in the actor (543 images/s streamed against 620 inside the
# callable; 646 with two calls). CPU actors keep one: their batches are small, and a second call's thread would
# compete for the cores.
GPU_ACTOR_CALLS = 2
# The model's share of a CPU run's work when OUTPUT has no earlier run to measure it from.
DEFAULT_MODEL_SHARE = 0.5


@dataclass(frozen=True)
class Layout:
    """Where and how the model actors run."""

    device: str
    size: int  # model actors
    num_gpus: float
    num_cpus: float  # each actor's CPU reservation (fractional on CPU runs)
    torch_threads: int
    batch_size: int
    compile: bool
    decode_cpus: float = 1.0  # each CPU-stage task's reservation
    # calls in flight inside each actor: Ray Data assembles the next batch (and hands back the last) while the
    # model runs the current one; the model itself still runs one batch at a time
    actor_calls: int = 1

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def actor_layout(cfg: JobConfig, shape: dict, model_share: float | None = None) -> Layout:
    """Actor count and resources: one per GPU. On CPUs the actors and the decode tasks share the cores by measured
    demand: the actors reserve the model's share of the work (model_share, measured by an earlier run into OUTPUT:
    model seconds / (model + decode seconds)), at most half of the smallest node, with one torch thread more than
    that reservation; decode tasks take a CPU each in the rest, so at least one always fits (a pool that takes every
    CPU starves them and the run hangs)."""
    device = cfg.device
    gpus = shape["gpus"]
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda":
        if not gpus and not cfg.num_actors:
            raise UserError(
                "device cuda was asked for, but the Ray cluster has no GPUs up; on an autoscaling "
                "cluster pass --num-actors N so the autoscaler starts GPU workers for them"
            )
        size = cfg.num_actors or gpus  # pending actors make an autoscaler add GPU nodes
        return Layout(
            "cuda", size, 1, 1, cfg.torch_threads, cfg.batch_size or 256, cfg.torch_compile, actor_calls=GPU_ACTOR_CALLS
        )
    cpus = max(1, shape["cpus"])
    size = cfg.num_actors or max(1, cpus // 8)
    if size >= cpus and cpus > 1:
        raise UserError(f"num_actors={size} would take all {cpus} CPUs and starve decoding; use at most {cpus - 1}")
    share = DEFAULT_MODEL_SHARE if model_share is None else min(0.9, max(0.1, model_share))
    node_cpus = max(1, shape.get("node_cpus", cpus))
    per_actor = max(0.25, min(cpus * share / size, node_cpus / 2, (cpus - DECODE_CPUS) / size))
    per_actor = round(per_actor * 4) / 4  # quarters: readable in the record, and whole when the share is
    # one torch thread more than the reservation (within the node): the model borrows the core a decode task leaves
    # idle (measured on 2 cores: +20% on the ConceptCLIP-shaped model, no loss on a decode-bound one)
    threads = cfg.torch_threads or min(node_cpus, math.ceil(per_actor) + 1)
    decode = min(DECODE_CPUS, cpus - per_actor * size)  # below one CPU only on a one-CPU machine
    return Layout("cpu", size, 0, per_actor, threads, cfg.batch_size or 32, cfg.torch_compile, decode)


def model_share(out: OutputDir) -> float | None:
    """The model's share of the work in OUTPUT's newest CPU run (its model and decode seconds), if there is one."""
    record = out.read_json("_run.json") or {}
    stages = record.get("stages") or {}
    model, decode = stages.get("model_s"), stages.get("decode_s")
    if (record.get("layout") or {}).get("device") != "cpu" or not model or not decode:
        return None
    return model / (model + decode)


@dataclass
class ModelJob:
    """The model side of a run: the checkpoint, the prompt set (None: features only) and what the features are."""

    spec: ModelSpec
    prompt_set: PromptSet | None
    features: FeatureSpec
    feature_shape: tuple[int, ...] | None  # hidden-state features: one row's shape before flattening
    fast_decode: bool = False  # approximate JPEG decoding changes the numbers a little

    def identity(self) -> dict:
        """What the numbers depend on (features only when not the default, so older OUTPUTs keep theirs)."""
        identity = {**self.spec.identity(), "prompt_set_hash": self.prompt_set.set_hash if self.prompt_set else None}
        if self.features.hidden:
            identity["features"] = self.features.name
        if self.fast_decode:
            identity["fast_decode"] = True
        return identity

    def described(self) -> dict:
        """For provenance and the run record."""
        out = {"features": self.features.name, "fast_decode": self.fast_decode}
        if self.feature_shape is not None:
            out["feature_shape"] = list(self.feature_shape)
        return out


def resolve_job(cfg: JobConfig) -> ModelJob:
    """Load and check what the run's numbers come from, before anything starts."""
    features = parse_features(cfg.features)
    prompt_set = load_prompts(cfg.prompts) if cfg.prompts else None
    spec = resolve_model(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.dtype, cfg.device)
    if prompt_set is not None and not spec.family.has_text:
        raise UserError(
            f"model {cfg.model} is an image tower without a text tower: it cannot score prompts; drop "
            "--prompts for a features-only run"
        )
    if prompt_set is not None and features.hidden:
        raise UserError(
            f"--prompts scores concepts against the model's embedding, so it cannot go with --features "
            f"{features.name}: drop one of them"
        )
    shape = hidden_shape(spec, features) if features.hidden else None
    return ModelJob(spec, prompt_set, features, shape, bool(getattr(cfg, "fast_decode", False)))


# -- where the work runs --------------------------------------------------------------------------------------------
def refuse_process_local(cfg: JobConfig) -> None:
    """Refuse locations that only this process would see: memory:// (Ray's workers see an empty filesystem), and
    a relative local OUTPUT inside `ray job submit --working-dir` (it would land in Ray's temporary copy of the
    working dir, deleted with the job)."""
    for name in ("input", "output"):
        if str(getattr(cfg, name)).startswith("memory://"):
            raise UserError(
                f"{name.upper()} {getattr(cfg, name)} is in this process's memory, which Ray's workers "
                "cannot see: use a local folder or object storage"
            )
    if not is_remote(cfg.output) and not os.path.isabs(local_path(cfg.output)) and _in_job_working_dir():
        raise UserError(
            f"OUTPUT {cfg.output} is a relative path inside a Ray job, i.e. inside Ray's temporary copy "
            "of the job's working dir, which is deleted with the job: give an absolute path on shared "
            "storage, or an object store URL"
        )


def _in_job_working_dir() -> bool:
    """Whether this process is a `ray job submit` driver running in an uploaded working dir."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def _readable(paths: list[str]) -> list[str]:
    """(Runs on each node.) The paths this node cannot read."""
    return [p for p in paths if not os.access(p, os.R_OK)]


def probe_nodes(cfg: JobConfig, sample: list[str], echo=print, timeout_s: float = 120.0) -> bool:
    """Before streaming, one task per worker node checks it can read the local paths the run needs there (a sample
    of the inputs, the model folder): on a multi-node cluster the driver's disk is not the workers' disk.
    Skipped when the only node is the driver's own. Returns whether every node reads OUTPUT (then Ray Data reads
    the plan file itself)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if only_driver_node():
        return True
    nodes = working_nodes()
    needs = {local_path(uri): "INPUT" for uri in sample if not is_remote(uri)}
    if os.path.isdir(cfg.model):
        needs[os.path.join(os.path.abspath(cfg.model), "config.json")] = "MODEL"
    if not is_remote(cfg.output):
        needs[os.path.join(os.path.abspath(local_path(cfg.output)), LEASE_NAME)] = "OUTPUT"
    if not needs:
        return True
    task = ray.remote(num_cpus=0, max_retries=0)(_readable)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            sorted(needs)
        ): n
        for n in nodes
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    everywhere = not pending
    for ref in pending:
        echo(
            f"featurize: warning: node {refs[ref]['NodeManagerAddress']} did not answer the path probe in "
            f"{timeout_s:.0f} s; not checked"
        )
    for ref in ready:
        node = refs[ref]["NodeManagerAddress"]
        try:
            missing = ray.get(ref)
        except Exception as exc:  # the node died meanwhile: Ray Data will not schedule on it either
            echo(f"featurize: warning: node {node} failed the path probe ({type(exc).__name__}); not checked")
            everywhere = False
            continue
        for path in missing:
            if needs[path] == "OUTPUT":
                everywhere = False
                continue
            if needs[path] == "INPUT":
                raise EnvironmentFailure(
                    f"INPUT {cfg.input} is a local path the worker nodes cannot read (node "
                    f"{node} cannot read {path}): put it on shared or object storage"
                )
            raise EnvironmentFailure(
                f"--model {cfg.model} is a local folder that node {node} cannot read: put "
                "it at the same path on every node (shared storage), or use a hub id"
            )
    if not is_remote(cfg.output):
        echo(f"featurize: note: OUTPUT {cfg.output} is a local path: shards are written on the driver's node only")
    return everywhere


# What to do when a worker hit a fault that is not the input's.
ENVIRONMENT_FIXES = {
    "permission": "check the credentials (storage_options, the nodes' roles) and the input's permissions",
    "storage": "the storage kept failing after retries; check it (throttling, outage, disk)",
    "device": "the accelerator failed; check the node (nvidia-smi, dmesg) or leave it out",
}


def environment_failure(batch: dict, cfg: JobConfig) -> EnvironmentFailure | None:
    """A result batch's first row that failed through no fault of its input, as the error that stops the run (its
    unit is then never committed). A file a worker could not find but the driver can see means the workers do not
    share the driver's disk."""
    classes = batch.get("error_class")
    if classes is None:
        return None
    for i, cls in enumerate(classes):
        if cls in ENVIRONMENT_ERROR_CLASSES:
            return EnvironmentFailure(
                f"{batch['uri'][i]}: {batch['error'][i]}; {ENVIRONMENT_FIXES[cls]}, then rerun to resume"
            )
        if cls == "missing" and exists(str(batch["uri"][i]), cfg.storage_options):
            return EnvironmentFailure(
                f"a worker could not find {batch['uri'][i]}, which the driver can read: INPUT "
                f"{cfg.input} is a local path the worker nodes cannot read; put it on "
                "shared or object storage"
            )
    return None


# -- the run --------------------------------------------------------------------------------------------------------
class Stream:
    """Result batches pulled from a dataset on a thread from start() on (Ray Data starts its model actors when the
    pull begins, so a stream may start before its plan exists: its plan readers wait on the run's board).
    consume() commits them on the calling thread; close() shuts the stream down (its actors released) and stops
    the pull thread within a bounded wait, however the run ends."""

    def __init__(self, ds):
        self.ds = ds
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.done = object()
        self.thread: threading.Thread | None = None
        self.started_at, self.started_wall = time.perf_counter(), time.time()
        self.held: list = []  # object refs the stream's readers need (the plan's ranges), held until it ends

    def _offer(self, item) -> bool:
        """Hand an item to the consumer unless it stopped listening."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _pull(self) -> None:
        batches = self.ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        try:
            for batch in batches:
                if not self._offer(batch):
                    return
            self._offer(self.done)
        except BaseException as exc:  # surfaced on the consumer's thread
            self._offer(exc)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a generator's close ends Ray Data's streaming executor and frees its actors

    def start(self) -> Stream:
        self.started_at, self.started_wall = time.perf_counter(), time.time()
        self.thread = threading.Thread(target=self._pull, name="featurize-pull", daemon=True)
        self.thread.start()
        return self

    def consume(
        self, writer: ShardWriter, cfg: JobConfig, stats: dict, on_commit, progress: Progress | None = None
    ) -> None:
        """Commit result batches until the stream ends; fail the run if nothing progresses for stall_timeout_s, or
        when a row failed through no fault of its input (environment_failure)."""
        stall_timeout_s = cfg.stall_timeout_s
        while True:
            try:
                item = self.queue.get(timeout=stall_timeout_s)
            except queue.Empty:
                raise EnvironmentFailure(
                    f"no progress for {stall_timeout_s:.0f} s ({writer.pending} work units unfinished); the cluster "
                    "may have lost its actors or nodes. Rerun the same command to resume (raise stall_timeout_s if "
                    "batches are legitimately this slow)"
                ) from None
            if item is self.done:
                return
            if isinstance(item, BaseException):
                raise item
            stats.setdefault("first_batch_at", time.perf_counter())
            stats["read_s"] = stats.get("read_s", 0.0) + float(np.sum(item.pop("read_s", 0)))
            stats["decode_s"] += float(np.sum(item.pop("decode_s", 0)))
            stats["model_s"] += float(np.sum(item.pop("model_s", 0)))
            failure = environment_failure(item, cfg)
            if failure is not None:
                raise failure
            t = time.perf_counter()
            taken = writer.rows_taken
            committed = writer.add(item)
            stats["write_s"] += time.perf_counter() - t
            if progress is not None:
                progress.update(writer.rows_taken - taken)
            for unit in committed:
                on_commit(unit)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=STREAM_SHUTDOWN_S)


def save_run_record(out: OutputDir, record: dict) -> None:
    """The run's record under _runs/ and as the newest _run.json."""
    out.write_json(record, "_runs", f"{record['run_id']}.json")
    out.write_json(record, "_run.json")


def actor_start_record(board, stream: Stream) -> dict | None:
    """The first model actor's start-up (its steps' seconds, posted on the board), with when its constructor began
    after the stream opened (the worker process's spawn and imports; across nodes, as far as their clocks agree).
    None when no actor got that far."""
    import ray

    try:
        value = ray.get(board.get.remote("actor_start"), timeout=30)
    except Exception:  # the record is worth less than the run: a lost board costs only this entry
        log.warning("could not read the model actor's start-up times", exc_info=True)
        return None
    if not value:
        return None
    value = dict(value)
    value["constructor_began_after_stream_s"] = round(value.pop("started_at") - stream.started_wall, 3)
    return value


def stage_summary(stats: dict, stream_started: float) -> dict:
    """Per-stage seconds for the run record; startup_s is the wait for the first result (actors starting)."""
    out = {k: round(v, 3) for k, v in stats.items() if k.endswith("_s")}
    if "first_batch_at" in stats:
        out["startup_s"] = round(stats["first_batch_at"] - stream_started, 3)
    return out


@dataclass
class Planned:
    """A run's plan: the work units (unit -> rows) and counts; the driver holds nothing per input."""

    run_id: str
    resumed: bool
    counts: dict
    units: dict[int, int]
    plan_path: str | None = None  # the plan file in OUTPUT's filesystem (a resumed run's, or once uploaded)
    local_plan: str | None = None  # a new plan, in the workspace until the run uploads it
    extra: dict = field(default_factory=dict)  # what the job kind needs later (slides: the slide table)


class ImagesJob:
    """`featurize images` for the job skeleton (run_job): each job kind supplies its listing and plan, its CPU stage,
    its table builder and its finish step."""

    command = "images"
    noun = "images"  # what the stream processes
    inputs = "images"  # what is listed
    suffixes = IMAGE_SUFFIXES
    plan_needs_ray = False
    start_before_plan = True  # a first run's model actors load while the driver plans
    stage_columns = ["uri", "size", "mtime", "etag", "unit", "row"]

    def __init__(self, cfg: RunConfig, model: ModelJob):
        self.cfg, self.model = cfg, model
        self.preprocess = None

    def prepare(self, ws: Workspace) -> Listing:
        """On a thread while Ray starts: the processor's preprocessing, and the listing into the workspace."""
        self.preprocess = preprocess_spec(self.model.spec)
        files, rows = write_listing(self.cfg.input, ws.path("listing"), self.cfg.storage_options, self.suffixes)
        return open_listing(ws, files, rows)

    def identity(self) -> dict:
        return self.model.identity()

    def provenance_extra(self) -> dict:
        return {}

    def rows_per_shard(self) -> int:
        prompts = self.model.prompt_set
        return shard_rows(
            self.cfg.rows_per_shard,
            row_widths(
                self.model.spec, self.model.features, self.model.feature_shape, len(prompts.names) if prompts else 0
            ),
        )

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
        the changed ones; with retry_errors, those whose newest row is an error row). A dry run counts, and writes
        no plan file."""
        resumable = unfinished_run(out, runs, version, self.cfg.input)
        if resumable is not None:
            run_id, path = resumable
            units = plan_unit_counts(ws, out, path)
            return Planned(run_id, True, {"planned": sum(units.values())}, units, plan_path=path)
        committed_view(ws, out, version)
        counts = classify(ws)
        first_unit, rows_per_shard = next_unit(out, runs), self.rows_per_shard()
        kinds = planned_kinds(self.cfg.incremental, self.cfg.retry_errors)
        if dry:
            local = None
            rows = int(
                ws.con.execute(
                    "SELECT count(*) FROM classified WHERE kind IN (" + ", ".join(repr(k) for k in kinds) + ")"
                ).fetchone()[0]
            )
        else:
            local, rows = write_plan(ws, kinds, first_unit, rows_per_shard)
        return Planned(
            run_id,
            False,
            {**counts, "planned": rows, "rows_per_shard": rows_per_shard},
            contiguous_units(rows, first_unit, rows_per_shard),
            local_plan=local,
        )

    def stage(self):
        """The CPU stage: Ray Data batch function and its keyword arguments."""
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
    model = resolve_job(cfg)
    return run_job(cfg, ImagesJob(cfg, model), echo, command_started)


def run_job(cfg: JobConfig, kind, echo=print, command_started: float | None = None) -> dict:
    """The driver's one skeleton: list and plan, stream the plan's work units through the CPU stage and the model
    actors, commit each unit's shard, finish, record the run."""
    started = time.time()
    command_started = command_started or started
    check_local_input(cfg.input)
    if cfg.dry_run:
        return dry_run(cfg, kind, echo)
    run_id = new_run_id()
    with hold_output(cfg, run_id, echo) as lease, Workspace() as ws:

        def prepare():
            t = time.perf_counter()
            listing = kind.prepare(ws)
            return listing, time.perf_counter() - t

        t_prepare = time.perf_counter()
        # An input listed in Ray tasks (list files read by Ray Data, object-store prefixes) waits for Ray.
        started_ray, (listing, listing_s) = while_ray_starts(
            prepare, cfg.verbose, overlap=not lists_with_ray(cfg.input)
        )
        ray_start_s = time.perf_counter() - t_prepare
        record: dict = {}
        with finishing(cfg, record, lease, started_ray):
            out = OutputDir(cfg.output, cfg.storage_options)
            layout = actor_layout(cfg, cluster_shape(), model_share(out))
            everywhere = probe_nodes(cfg, listing.sample, echo)
            model = kind.model
            model.spec = model.spec.placed(layout.device)
            identity = kind.identity()
            version = check_identity(out, identity, cfg.new_version)
            runs = out.runs()
            board = stream = None
            early = bool(
                kind.start_before_plan
                and not out.shard_units()
                and unfinished_run(out, runs, version, cfg.input) is None
            )
            if early:
                # A first run over OUTPUT: the model actors load while the driver plans (at most every unique
                # input listed is planned; a resumed plan may hold more, so it plans first). Other runs plan
                # first, so a run with nothing new never loads the model.
                board, stream = open_stream(kind, cfg, layout, listing.unique, listing.unique)
            try:
                t_plan = time.perf_counter()
                planned = kind.plan(ws, out, listing, version, run_id, runs)
                plan_s = time.perf_counter() - t_plan
                if planned.resumed:
                    lease.update(run_id=planned.run_id)
                run_id = planned.run_id
                prov = provenance(
                    model.spec.identity(),
                    identity["prompt_set_hash"],
                    run_id,
                    {"dataset_version": version, **kind.provenance_extra(), **model.described()},
                )
                done_units = set(out.shard_units())
                pending = {u: n for u, n in planned.units.items() if u not in done_units}
                record.update(
                    {
                        "run_id": run_id,
                        "command": kind.command,
                        "state": "running",
                        "input": cfg.input,
                        "output": cfg.output,
                        "command_line": prov["command"],
                        **identity,
                        "dataset_version": version,
                        "resumed": planned.resumed,
                        "started_at": _iso(started),
                        "versions": package_versions(),
                        **model.described(),
                        "counts": {
                            "listed": listing.rows,
                            "duplicates": listing.duplicates,
                            **planned.counts,
                            "skipped": listing.unique - planned.counts["planned"],
                        },
                        "last_unit": max(planned.units, default=-1),
                        "layout": layout.as_dict(),
                    }
                )
                if planned.local_plan is not None and planned.units:
                    planned.plan_path = upload_plan(planned.local_plan, out, run_id)
                current = out.read_json("_dataset.json") or {}
                readable = current.get("readable_version", current.get("version"))
                out.write_json(
                    {"identity": identity, "version": version, **({"readable_version": readable} if readable else {})},
                    "_dataset.json",
                )
                write_listing_uris(ws, out)
                out.write_json(record, "_runs", f"{run_id}.json")
                if listing.duplicates:
                    echo(f"featurize: {listing.duplicates} uri(s) listed more than once: each is processed once")
                echo(
                    f"featurize: {listing.rows} {kind.inputs} listed in {listing_s:.1f} s; "
                    f"{kind.summary(listing, planned)}; "
                    f"{len(pending)} work unit(s) to process on {layout.size} {layout.device} actor(s)"
                )

                stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
                processed = sum(pending.values())
                writer = None
                first_commit = [None]
                if pending:
                    if stream is None:
                        board, stream = open_stream(kind, cfg, layout, sum(planned.units.values()), processed)
                    stream.held = post_plan(
                        board,
                        out,
                        planned.plan_path,
                        kind.stage_columns,
                        None if len(pending) == len(planned.units) else sorted(pending),
                        processed,
                        everywhere,
                    )

                    def before_commit():
                        lease.check()
                        if first_commit[0] is None:  # the prompt table goes first: no shard without it
                            _write_prompts(out, board, model.prompt_set, prov)
                            first_commit[0] = time.time() - command_started

                    os.makedirs(ws.path("units"), exist_ok=True)
                    writer = ShardWriter(
                        out,
                        pending,
                        kind.table_builder(run_id, version),
                        prov,
                        before_commit=before_commit,
                        spill_dir=ws.path("units"),
                        first_rows=unit_first_rows(planned.units),
                    )
                    progress = Progress(processed, kind.noun, cfg.progress_interval_s)
                    try:
                        stream.consume(writer, cfg, stats, lambda unit: None, progress)
                    finally:
                        progress.close()
                    if writer.pending:  # never recorded complete with work missing
                        raise EnvironmentFailure(
                            f"the stream ended with {writer.pending} work unit(s) unfinished "
                            f"({writer.missing_rows} rows missing); rerun the same command to resume"
                        )
            finally:
                if stream is not None:
                    board.put.remote("plan", None)  # (ignored once the plan is posted) frees waiting readers
                    stream.close()
                    stream.held = []
            t_stream = stream.started_at if stream is not None else time.perf_counter()
            stream_s = time.perf_counter() - t_stream
            record["counts"].update(processed=processed, **finished_counts(writer))
            kind.finish(ws, out, planned, prov, record)
            ended = time.time()
            record.update(
                state="complete",
                ended_at=_iso(ended),
                wall_s=round(ended - started, 3),
                per_s=round(processed / stream_s, 2) if processed and stream_s > 0 else 0.0,
                first_shard_s=round(first_commit[0], 3) if first_commit[0] else None,
                stages={
                    "listing_s": round(listing_s, 3),
                    "ray_start_and_prepare_s": round(ray_start_s, 3),
                    "planning_s": round(plan_s, 3),
                    "stream_s": round(stream_s, 3),
                    "actors_started_before_plan": early,
                    **stage_summary(stats, t_stream),
                },
            )
            actor_start = actor_start_record(board, stream) if stream is not None else None
            if actor_start:
                record["stages"]["actor_start"] = actor_start
            record[f"{kind.noun}_per_s"] = record.pop("per_s")
            if layout.device == "cuda" and stream_s > 0:
                record["stages"]["gpu_busy_fraction"] = round(min(1.0, stats["model_s"] / (stream_s * layout.size)), 4)
            out.write_json({"identity": identity, "version": version, "readable_version": version}, "_dataset.json")
            save_run_record(out, record)
            return record


def dry_run(cfg: JobConfig, kind, echo=print) -> dict:
    """List and plan as the run would, against OUTPUT as it is; start no model and write nothing to OUTPUT. Prints
    a summary, then the counts as one JSON line (the last line of stdout)."""
    t = time.perf_counter()
    out = OutputDir(cfg.output, cfg.storage_options)
    with Workspace() as ws:
        # listed in Ray tasks (list files, object-store prefixes): Ray up before the listing
        started_ray = init_ray(cfg.verbose) if lists_with_ray(cfg.input) else False
        try:
            t_list = time.perf_counter()
            listing = kind.prepare(ws)
            listing_s = time.perf_counter() - t_list
            current = out.read_json("_dataset.json")
            version = int(current.get("version", 1)) if current else 1
            if current is not None and _identity_changed(current.get("identity", {}), kind.identity()):
                if not cfg.new_version:
                    check_identity(out, kind.identity(), False)  # raises, naming what changed
                version += 1
            if kind.plan_needs_ray:
                started_ray = init_ray(cfg.verbose) or started_ray
            planned = kind.plan(ws, out, listing, version, "dry-run", out.runs(), dry=True)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
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
        f"featurize: dry run: {listing.rows} {kind.inputs} listed ({listing.duplicates} duplicate(s)); "
        f"{kind.summary(listing, planned)}; {kind.planned_text(planned)} in {counts['work_units']} work unit(s); "
        "nothing written"
    )
    print(json.dumps(counts, sort_keys=True), flush=True)
    return counts


def _identity_changed(old: dict, new: dict) -> bool:
    """Whether a dry run's identity differs from OUTPUT's; the dtype is settled only when the model is placed, so an
    `auto` dtype matches whatever OUTPUT recorded."""
    keys = set(old) | set(new)
    if new.get("dtype") == "auto":
        keys.discard("dtype")
    return any(old.get(k) != new.get(k) for k in keys)


@contextmanager
def hold_output(cfg: JobConfig, run_id: str, echo=print):
    """The OUTPUT's lease for the whole run (one writer per OUTPUT), released however the run ends."""
    with Lease.acquire(cfg.output, cfg.storage_options, run_id) as lease:
        if lease.swept:
            echo(f"featurize: removed {lease.swept} temporary file(s) a stopped run left in {cfg.output}")
        yield lease


def finished_counts(writer: ShardWriter | None) -> dict:
    """The run record's result counts: ok and error rows (errors by class), and the rows Ray delivered twice."""
    if writer is None:
        return {"ok": 0, "error": 0, "error_classes": {}, "duplicates_dropped": 0}
    return {**writer.counts, "error_classes": dict(sorted(writer.error_classes.items()))}


@contextmanager
def finishing(cfg: JobConfig, record: dict, lease, started_ray: bool):
    """However the run ends: a failure is written to its record (a rerun resumes it), and a Ray we started stops."""
    try:
        yield
    except BaseException as exc:
        record_failure(cfg, record, exc, lease)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def record_failure(cfg: JobConfig, record: dict, exc: BaseException, lease) -> None:
    """Mark the run record failed with the reason (a rerun still resumes it); never masks the original error, and
    writes nothing once another run holds OUTPUT."""
    if not record or getattr(lease, "lost", None):
        return
    record.update(
        state="failed",
        ended_at=_iso(time.time()),
        failure=f"{type(exc).__name__}: {first_line(exc)}" if not isinstance(exc, UserError) else first_line(exc, 1000),
    )
    try:
        save_run_record(OutputDir(cfg.output, cfg.storage_options), record)
    except Exception:
        log.warning("could not write the failed run's record", exc_info=True)


def open_stream(kind, cfg: JobConfig, layout: Layout, plan_rows: int, rows: int):
    """The run's board and its started stream: plan readers, one task per range of the plan file's `plan_rows` rows
    (or at most that many), waiting for the plan on the board -> blocks sized for the CPU stage (`rows` to process,
    or at most that many) -> the job's CPU stage -> the model actors, which Ray Data starts now."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a worker node lost mid-run must not take the plan and the prompts with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0, max_concurrency=64)(RunBoard).options(scheduling_strategy=here).remote()
    model = kind.model
    shape = cluster_shape()
    ranges = plan_ranges(plan_rows)
    readers = min(ranges, max(2, min(16, 2 * shape["nodes"])))  # at once: two per node
    block_rows = stage_block_rows(rows, cfg.decode_batch_size, kind.preprocess.out_shape, shape["cpus"])
    source = (
        ray.data.from_items([{"id": i} for i in range(ranges)], override_num_blocks=ranges)
        .map_batches(
            read_plan_range,
            fn_kwargs={"board": board, "columns": kind.stage_columns},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            concurrency=readers,
        )
        .repartition(target_num_rows_per_block=block_rows)
    )
    stage_fn, stage_kwargs = kind.stage()
    ds = build_dataset(
        source,
        stage_fn,
        stage_kwargs,
        cfg.decode_batch_size,
        {
            "model_spec": model.spec,
            "preprocess": kind.preprocess,
            "prompt_set": model.prompt_set,
            "board": board,
            "features": model.features,
            **kind.encode_kwargs(),
        },
        layout,
    )
    return board, Stream(ds).start()


def stage_block_rows(rows: int, decode_batch_size: int, pixel_shape, cpus: int) -> int:
    """Rows per block into the CPU stage: a share of the run's rows for each CPU (four blocks each), at most 1,024
    and at most DECODED_BLOCK_BYTES of decoded pixels, never less than one decode batch."""
    cpus = max(1, int(cpus))
    by_bytes = DECODED_BLOCK_BYTES // max(1, math.prod(pixel_shape))
    return int(max(decode_batch_size, min(1024, by_bytes, math.ceil(rows / (4 * cpus)))))


def _write_prompts(out: OutputDir, board, prompt_set, prov: dict) -> None:
    import ray

    if prompt_set is None:  # features only
        return
    value = ray.get(board.get.remote("prompts"), timeout=60)
    if value is None:  # the actor hands them over before its first batch: this is a broken actor, not a race
        raise EnvironmentFailure(
            "the model actor returned results without handing over the prompt embeddings; rerun to resume"
        )
    table = prompts_table(
        prompt_set,
        value["text_embeddings"],
        {**prov, "logit_scale": value["logit_scale"], "logit_bias": value["logit_bias"]},
    )
    out.write_table(table, "_prompts.parquet")


def build_dataset(source, decode_fn, decode_kwargs: dict, decode_batch_size: int, encode_kwargs: dict, layout: Layout):
    """plan rows -> CPU stage tasks -> model actors; nothing runs until the driver iterates.

    decode_fn(batch, **decode_kwargs) must add `pixels` (uint8 [N,H,W,3]), `status` and `error` to each batch;
    encode_kwargs are EncodeBatch's constructor arguments (model_spec, preprocess, prompt_set, board...).
    """
    ds = source.map_batches(
        decode_fn,
        fn_kwargs=decode_kwargs,
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=layout.decode_cpus,
        memory=DECODE_TASK_MEMORY,
    )
    return ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"torch_threads": layout.torch_threads, "compile": layout.compile, **encode_kwargs},
        batch_size=layout.batch_size,
        batch_format="numpy",
        **actor_pool_options(layout),
    )


def actor_pool_options(layout: Layout) -> dict:
    """The model actors' pool and resources for map_batches. More than one call per actor lets Ray Data batch the
    next call's rows while the current call runs; Ray Data still runs the model one call at a time (its
    single-threaded callable wrapper). A Ray whose ActorPoolStrategy has `max_concurrent_calls_per_actor` takes it
    there; an older one as the actor option `max_concurrency` (which newer ones deprecate)."""
    import inspect

    import ray

    pool, options = {"size": layout.size}, {"num_gpus": layout.num_gpus, "num_cpus": layout.num_cpus}
    if layout.actor_calls > 1:
        if "max_concurrent_calls_per_actor" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
            pool["max_concurrent_calls_per_actor"] = layout.actor_calls
        else:
            options["max_concurrency"] = layout.actor_calls
    return {"compute": ray.data.ActorPoolStrategy(**pool), **options}
