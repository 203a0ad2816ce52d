"""The stream: the Ray Data graph a run executes (plan readers -> CPU stage tasks -> model actors) and the driver's
side of it (a pull thread, a stall watchdog, the hand-over of the plan and of the actors' messages)."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

import numpy as np

from .board import PromptEmbeddings, RunBoard
from .cluster import Layout, cluster_shape
from .config import JobConfig
from .console import Progress
from .encode import EncodeBatch
from .errors import ENVIRONMENT_ERROR_CLASSES, EnvironmentFailure
from .plan import plan_ranges, post_plan, read_plan_range
from .storage import exists
from .write import OutputDir, ShardWriter

log = logging.getLogger(__name__)

# A decode task holds a batch of full-size decoded images. Reserving memory for it also keeps Ray Data from fusing
# decoding into the model actors (differing remote args never fuse): decoding stays a parallel CPU stage.
DECODE_TASK_MEMORY = 512 * 1024**2

# A block of the CPU stage's output (the model's input pixels) holds at most this much: 151 rows at 384 px, 445 at
# 224 px. Smaller blocks fill and drain the pipeline sooner (the model waits for a whole decoded block).
DECODED_BLOCK_BYTES = 64 * 1024**2

# How long a failed run waits for its pull thread to let go of the stream (a stalled stream never answers).
STREAM_SHUTDOWN_S = 5.0


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


class Stream:
    """Result batches pulled from a dataset on a thread from start() on (Ray Data starts its model actors when the
    pull begins, so a stream may start before its plan exists: its plan readers wait on the run's board until
    post_plan). consume() commits them on the calling thread; close() shuts the stream down (its actors released)
    and stops the pull thread within a bounded wait, however the run ends."""

    def __init__(self, ds, board=None):
        self.ds = ds
        self.board = board
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

    def post_plan(
        self, out: OutputDir, plan_path: str, columns: list[str], units: list[int] | None, rows: int, everywhere: bool
    ) -> None:
        """Hand the plan to the stream's readers (see plan.post_plan); the objects they need are held here."""
        self.held = post_plan(self.board, out, plan_path, columns, units, rows, everywhere)

    def prompt_embeddings(self, timeout_s: float = 60) -> PromptEmbeddings:
        """What the first model actor posted before its first batch (so it is there once a batch arrived)."""
        import ray

        message = ray.get(self.board.prompts.remote(), timeout=timeout_s)
        if message is None:  # the actor posts before its first batch: this is a broken actor, not a race
            raise EnvironmentFailure(
                "the model actor returned results without handing over the prompt embeddings; rerun to resume"
            )
        return message

    def actor_start(self) -> dict | None:
        """The first model actor's start-up for the run record: its steps' seconds, and when its constructor began
        after the stream opened (the worker process's spawn and imports; across nodes, as far as their clocks
        agree). None when no actor got that far, or the board cannot be read (the record is worth less than the
        run)."""
        import ray

        try:
            message = ray.get(self.board.actor_start.remote(), timeout=30)
        except Exception:
            log.warning("could not read the model actor's start-up times", exc_info=True)
            return None
        if message is None:
            return None
        return {
            **message.steps,
            "device": message.device,
            "pid": message.pid,
            "constructor_began_after_stream_s": round(message.started_at - self.started_wall, 3),
        }

    def consume(self, writer: ShardWriter, cfg: JobConfig, stats: dict, progress: Progress | None = None) -> None:
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
            writer.add(item)
            stats["write_s"] += time.perf_counter() - t
            if progress is not None:
                progress.update(writer.rows_taken - taken)

    def close(self) -> None:
        """End the stream: readers still waiting for a plan are freed (a posted plan stays), the pull thread stops,
        the plan's objects are let go."""
        if self.board is not None:
            self.board.post_plan.remote(None)
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=STREAM_SHUTDOWN_S)
        self.held = []


def open_stream(job, cfg: JobConfig, layout: Layout, plan_rows: int, rows: int) -> Stream:
    """The run's started stream: plan readers, one task per range of the plan file's `plan_rows` rows (or at most
    that many), waiting for the plan on the run's board -> blocks sized for the CPU stage (`rows` to process, or at
    most that many) -> the job's CPU stage -> the model actors, which Ray Data starts now."""
    import ray

    board = RunBoard.start()
    model = job.model
    shape = cluster_shape()
    ranges = plan_ranges(plan_rows)
    readers = min(ranges, max(2, min(16, 2 * shape["nodes"])))  # at once: two per node
    block_rows = stage_block_rows(rows, cfg.decode_batch_size, job.preprocess.out_shape, shape["cpus"])
    source = (
        ray.data.from_items([{"id": i} for i in range(ranges)], override_num_blocks=ranges)
        .map_batches(
            read_plan_range,
            fn_kwargs={"board": board, "columns": job.stage_columns},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            concurrency=readers,
        )
        .repartition(target_num_rows_per_block=block_rows)
    )
    stage_fn, stage_kwargs = job.stage()
    ds = build_dataset(
        source,
        stage_fn,
        stage_kwargs,
        cfg.decode_batch_size,
        {
            "model_spec": model.spec,
            "preprocess": job.preprocess,
            "prompt_set": model.prompt_set,
            "board": board,
            "features": model.features,
            **job.encode_kwargs(),
        },
        layout,
    )
    return Stream(ds, board).start()


def stage_block_rows(rows: int, decode_batch_size: int, pixel_shape, cpus: int) -> int:
    """Rows per block into the CPU stage: a share of the run's rows for each CPU (four blocks each), at most 1,024
    and at most DECODED_BLOCK_BYTES of decoded pixels, never less than one decode batch."""
    cpus = max(1, int(cpus))
    by_bytes = DECODED_BLOCK_BYTES // max(1, math.prod(pixel_shape))
    return int(max(decode_batch_size, min(1024, by_bytes, math.ceil(rows / (4 * cpus)))))


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
