"""The driver: validate, list, plan work units, stream them through Ray Data, commit shards, record the run."""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import JobConfig, RunConfig
from .decode import decode_batch
from .encode import EncodeBatch, PromptStore
from .errors import UserError
from .models import ModelSpec, preprocess_spec, resolve_model
from .prompts import load_prompts
from .schema import package_versions, prompts_table, provenance
from .sources import check_local_input, list_inputs
from .write import OutputDir, ShardWriter, check_identity, image_table_builder, make_plan, unit_counts

log = logging.getLogger(__name__)


# A decode task holds a batch of full-size decoded images. Reserving memory for it also keeps Ray Data from fusing
# decoding into the model actors (differing remote args never fuse): decoding stays a parallel CPU stage.
DECODE_TASK_MEMORY = 512 * 1024**2


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


# -- Ray ------------------------------------------------------------------------------------------------------------
def init_ray() -> bool:
    """Connect to RAY_ADDRESS / the job's cluster, else start a local one. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return address is None


def while_ray_starts(prepare):
    """Run prepare() (listing, loading the processor) on a thread while Ray starts on this one (ray.init wants
    the main thread). Returns (whether we started Ray, prepare's result); Ray is shut down again if prepare fails."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="featurize-prepare") as pool:
        future = pool.submit(prepare)
        started_ray = init_ray()
        try:
            return started_ray, future.result()
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise


def cluster_shape() -> dict:
    import ray

    res = ray.cluster_resources()
    return {"cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0))}


def actor_layout(cfg: JobConfig, shape: dict) -> dict:
    """Actor count and resources: one per GPU; on CPUs, leave room for the decode tasks (a pool that takes every
    CPU starves them and the run hangs)."""
    device = cfg.device
    gpus = shape["gpus"]
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda":
        if not gpus and not cfg.num_actors:
            raise UserError("device cuda was asked for, but the Ray cluster has no GPUs up; on an autoscaling "
                            "cluster pass --num-actors N so the autoscaler starts GPU workers for them")
        size = cfg.num_actors or gpus  # pending actors make an autoscaler add GPU nodes
        return {"device": "cuda", "size": size, "num_gpus": 1, "num_cpus": 1, "torch_threads": cfg.torch_threads,
                "batch_size": cfg.batch_size or 256, "compile": cfg.torch_compile}
    cpus = max(1, shape["cpus"])
    size = cfg.num_actors or max(1, cpus // 8)
    if size >= cpus and cpus > 1:
        raise UserError(f"num_actors={size} would take all {cpus} CPUs and starve decoding; use at most {cpus - 1}")
    threads = cfg.torch_threads or max(1, cpus // size)
    return {"device": "cpu", "size": size, "num_gpus": 0, "num_cpus": 1, "torch_threads": threads,
            "batch_size": cfg.batch_size or 32, "compile": cfg.torch_compile}


def placed_spec(spec: ModelSpec, layout: dict) -> ModelSpec:
    """The model spec with the layout's device and a concrete dtype (auto: bfloat16 on GPUs, float32 on CPUs)."""
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if layout["device"] == "cuda" else "float32")
    return ModelSpec(spec.model, spec.kind, spec.revision, spec.trust_remote_code, dtype, layout["device"],
                     spec.token)


# -- planning -------------------------------------------------------------------------------------------------------
def _changed(listing: pa.Table, committed: pa.Table) -> np.ndarray:
    """Per listed input: True where it is new, or (by etag, else size and mtime) changed since it was committed."""
    latest = {}
    for uri, size, mtime, etag, run_id in zip(*(committed.column(c).to_pylist()
                                                for c in ("uri", "size", "mtime", "etag", "run_id"))):
        if uri not in latest or run_id > latest[uri][3]:
            latest[uri] = (size, mtime, etag, run_id)
    out = np.ones(listing.num_rows, dtype=bool)
    for i, (uri, size, mtime, etag) in enumerate(zip(*(listing.column(c).to_pylist()
                                                       for c in ("uri", "size", "mtime", "etag")))):
        seen = latest.get(uri)
        if seen is None:
            continue
        if etag is not None and seen[2] is not None:
            out[i] = etag != seen[2]
        else:
            out[i] = size != seen[0] or (mtime is not None and seen[1] is not None and abs(mtime - seen[1]) > 1e-6)
    return out


def unfinished_run(out: OutputDir, runs: list[dict], version: int, cfg: JobConfig) -> tuple[str, pa.Table] | None:
    """The newest run on this OUTPUT over the same input and dataset version that did not complete, and its plan."""
    for record in reversed(runs):
        if record.get("state") != "complete" and record.get("dataset_version") == version \
                and record.get("input") == cfg.input:
            plan = out.read_plan(record["run_id"])
            if plan is not None:
                return record["run_id"], plan
    return None


def next_unit(out: OutputDir, runs: list[dict]) -> int:
    """The first work unit number no committed shard or earlier run has used."""
    used = list(out.shard_units()) + [int(r.get("last_unit", -1)) for r in runs]
    return max(used, default=-1) + 1


def plan_run(out: OutputDir, listing: pa.Table, version: int, cfg: JobConfig) -> tuple[str, pa.Table, bool]:
    """Resume the unfinished run on this OUTPUT, or plan a new one over the inputs not yet committed."""
    runs = out.runs()
    resumable = unfinished_run(out, runs, version, cfg)
    if resumable is not None:
        return (*resumable, True)
    committed = out.committed_index()
    committed = committed.filter(pc.equal(committed.column("dataset_version"), version))
    if cfg.incremental:
        mask = _changed(listing, committed)
    else:
        mask = ~np.asarray(pc.is_in(listing.column("uri"), value_set=committed.column("uri")).to_numpy(
            zero_copy_only=False), dtype=bool)
    pending = listing.filter(pa.array(mask))
    first_unit = next_unit(out, runs)
    run_id = new_run_id()
    plan = make_plan(pending, first_unit, cfg.rows_per_shard)
    return run_id, plan, False


# -- the run --------------------------------------------------------------------------------------------------------
def _consume(ds, writer: ShardWriter, stall_timeout_s: float, stats: dict, on_commit) -> None:
    """Pull result batches on a thread; the main thread commits shards and fails the run if nothing progresses."""
    q: queue.Queue = queue.Queue(maxsize=8)
    done = object()

    def pull():
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                q.put(batch)
            q.put(done)
        except BaseException as exc:  # surfaced on the main thread
            q.put(exc)

    threading.Thread(target=pull, name="featurize-pull", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=stall_timeout_s)
        except queue.Empty:
            raise UserError(f"no progress for {stall_timeout_s:.0f} s ({writer.pending} work units unfinished); "
                            "the cluster may have lost its actors. Rerun the same command to resume "
                            "(raise stall_timeout_s if batches are legitimately this slow)") from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        stats.setdefault("first_batch_at", time.perf_counter())
        stats["read_s"] = stats.get("read_s", 0.0) + float(np.sum(item.pop("read_s", 0)))
        stats["decode_s"] += float(np.sum(item.pop("decode_s", 0)))
        stats["model_s"] += float(np.sum(item.pop("model_s", 0)))
        t = time.perf_counter()
        committed = writer.add(item)
        stats["write_s"] += time.perf_counter() - t
        for unit in committed:
            on_commit(unit)


def save_run_record(out: OutputDir, record: dict) -> None:
    """The run's record under _runs/ and as the newest _run.json."""
    out.write_json(record, "_runs", f"{record['run_id']}.json")
    out.write_json(record, "_run.json")


def stage_summary(stats: dict, stream_started: float) -> dict:
    """Per-stage seconds for the run record; startup_s is the wait for the first result (actors starting)."""
    out = {k: round(v, 3) for k, v in stats.items() if k.endswith("_s")}
    if "first_batch_at" in stats:
        out["startup_s"] = round(stats["first_batch_at"] - stream_started, 3)
    return out


def run_images(cfg: RunConfig, echo=print, command_started: float | None = None) -> dict:
    """`featurize images`: returns the run record (also written to OUTPUT/_run.json).

    command_started: when the user's command began (for first_shard_s); defaults to now."""
    started = time.time()
    command_started = command_started or started
    prompt_set = load_prompts(cfg.prompts)
    spec = resolve_model(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.dtype, cfg.device)
    check_local_input(cfg.input)

    def prepare():
        t = time.perf_counter()
        listing = list_inputs(cfg.input, cfg.storage_options)
        t_listed = time.perf_counter()
        return preprocess_spec(spec), listing, t_listed - t, time.perf_counter() - t_listed

    t_prepare = time.perf_counter()
    started_ray, (preprocess, listing, listing_s, processor_s) = while_ray_starts(prepare)
    ray_start_s = time.perf_counter() - t_prepare
    try:
        layout = actor_layout(cfg, cluster_shape())
        spec = placed_spec(spec, layout)
        identity = {**spec.identity(), "prompt_set_hash": prompt_set.set_hash}
        out = OutputDir(cfg.output, cfg.storage_options)
        version = check_identity(out, identity, cfg.new_version)
        run_id, plan, resumed = plan_run(out, listing, version, cfg)
        prov = provenance(spec.identity(), prompt_set.set_hash, run_id, {"dataset_version": version})
        done_units = set(out.shard_units())
        pending_units = set(int(u) for u in np.unique(plan.column("unit").to_numpy())) - done_units
        record = {
            "run_id": run_id, "state": "running", "input": cfg.input, "output": cfg.output,
            **identity, "dataset_version": version, "resumed": resumed,
            "started_at": _iso(started), "versions": package_versions(),
            "counts": {"listed": listing.num_rows, "skipped": listing.num_rows - plan.num_rows,
                       "planned": plan.num_rows},
            "last_unit": int(pc.max(plan.column("unit")).as_py()) if plan.num_rows else -1,
            "layout": layout,
        }
        if plan.num_rows and not resumed:
            out.write_table(plan, "_runs", f"{run_id}.plan.parquet")
        out.write_json({"identity": identity, "version": version}, "_dataset.json")
        out.write_table(listing.select(["uri"]), "_listing.parquet")  # lets readers drop removed inputs
        out.write_json(record, "_runs", f"{run_id}.json")
        echo(f"featurize: {listing.num_rows} inputs listed in {listing_s:.1f} s; "
             f"{'resuming run ' + run_id + ': ' if resumed else ''}{len(pending_units)} work unit(s) to process "
             f"on {layout['size']} {layout['device']} actor(s)")

        stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
        processed = 0
        writer = None
        t_stream = time.perf_counter()
        first_commit = [None]
        if pending_units:
            work = plan.filter(pc.is_in(plan.column("unit"), value_set=pa.array(sorted(pending_units), pa.int32())))
            processed = work.num_rows
            writer = ShardWriter(out, unit_counts(plan, pending_units), image_table_builder(plan, run_id, version),
                                 prov)
            store = _prompt_store()
            ds = build_dataset(
                work.select(["uri", "unit", "row"]), decode_batch,
                {"spec": preprocess, "max_pixels": cfg.max_image_pixels, "storage_options": cfg.storage_options,
                 "fast": cfg.fast_decode},
                cfg.decode_batch_size,
                {"model_spec": spec, "preprocess": preprocess, "prompt_set": prompt_set, "prompt_store": store},
                layout)

            def on_commit(unit):
                if first_commit[0] is None:
                    first_commit[0] = time.time() - command_started
                    _write_prompts(out, store, prompt_set, prov)

            _consume(ds, writer, cfg.stall_timeout_s, stats, on_commit)
        stream_s = time.perf_counter() - t_stream
        ended = time.time()
        counts = record["counts"]
        counts.update(processed=processed, ok=writer.counts["ok"] if writer else 0,
                      error=writer.counts["error"] if writer else 0,
                      duplicates_dropped=writer.counts["duplicates_dropped"] if writer else 0)
        record.update(state="complete", ended_at=_iso(ended), wall_s=round(ended - started, 3),
                      images_per_s=round(processed / stream_s, 2) if processed and stream_s > 0 else 0.0,
                      first_shard_s=round(first_commit[0], 3) if first_commit[0] else None,
                      stages={"listing_s": round(listing_s, 3), "processor_s": round(processor_s, 3),
                              "ray_start_and_prepare_s": round(ray_start_s, 3), "stream_s": round(stream_s, 3),
                              **stage_summary(stats, t_stream)})
        if layout["device"] == "cuda" and stream_s > 0:
            record["stages"]["gpu_busy_fraction"] = round(min(1.0, stats["model_s"] / (stream_s * layout["size"])), 4)
        save_run_record(out, record)
        return record
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _prompt_store():
    import ray

    return ray.remote(num_cpus=0)(PromptStore).remote()


def _write_prompts(out: OutputDir, store, prompt_set, prov: dict) -> None:
    import ray

    value = ray.get(store.get.remote(), timeout=60)
    if value is None:
        return
    table = prompts_table(prompt_set, value["text_embeddings"], {**prov, "logit_scale": value["logit_scale"],
                                                                 "logit_bias": value["logit_bias"]})
    out.write_table(table, "_prompts.parquet")


def build_dataset(work: pa.Table, decode_fn, decode_kwargs: dict, decode_batch_size: int, encode_kwargs: dict,
                  layout: dict):
    """work rows -> decode tasks (CPU) -> model actors; nothing is pulled until the driver iterates.

    decode_fn(batch, **decode_kwargs) must add `pixels` (uint8 [N,H,W,3]), `status` and `error` to each batch;
    encode_kwargs are EncodeBatch's constructor arguments (model_spec, preprocess, prompt_set, prompt_store...).
    """
    import ray

    n = work.num_rows
    cpus = max(1, cluster_shape()["cpus"])
    block_rows = int(min(1024, max(decode_batch_size, math.ceil(n / (4 * cpus)))))
    blocks = [work.slice(i, block_rows) for i in range(0, n, block_rows)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_fn, fn_kwargs=decode_kwargs, batch_size=decode_batch_size, batch_format="numpy",
                        num_cpus=1, memory=DECODE_TASK_MEMORY)
    return ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"torch_threads": layout["torch_threads"], "compile": layout["compile"], **encode_kwargs},
        compute=ray.data.ActorPoolStrategy(size=layout["size"]),
        num_gpus=layout["num_gpus"], num_cpus=layout["num_cpus"],
        batch_size=layout["batch_size"], batch_format="numpy",
    )
