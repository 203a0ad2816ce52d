"""Where the work runs: starting (or joining) Ray, the cluster's shape, and the layout of the model actors and the
CPU stage on it (how many actors, what each reserves, torch threads, batch sizes)."""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

from .config import JobConfig
from .console import hide_native_log_lines, stderr_is_terminal
from .errors import UserError
from .write import OutputDir


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


def while_ray_starts(prepare, verbose: bool = False):
    """Run prepare() (listing, reading the preprocessing) on a thread while Ray starts on this one (ray.init wants
    the main thread). Returns (whether we started Ray, prepare's result); Ray is shut down again if prepare fails."""
    with ThreadPoolExecutor(1, thread_name_prefix="featurize-prepare") as pool:
        future = pool.submit(prepare)
        started_ray = init_ray(verbose)
        try:
            return started_ray, future.result()
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
# A GPU actor reserves one CPU (the process that feeds its GPU); decode tasks take the CPUs the actors leave.
GPU_ACTOR_CPUS = 1
# GPU actors take two calls at a time, so Ray Data assembles the next batch while the model runs the current one (one
# call left the GPU idle between batches: docs/design.md). CPU actors keep one: a second call's thread would compete
# for the cores.
GPU_ACTOR_CALLS = 2
# The model's share of a CPU run's work when OUTPUT has no earlier run to measure it from.
DEFAULT_MODEL_SHARE = 0.5
# A default model batch holds at most this much in the actor (pixels and features): large rows (patch tokens of every
# crop, 10 M values a row at hd:16 with CLIP ViT-L/14-336) make smaller batches, never a batch of several GB.
MODEL_BATCH_BYTES = 2**30


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
    # GPU runs: the cluster's CPUs the actors leave to decode tasks, per GPU actor, when the run starts
    decode_cpus_per_gpu: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def actor_layout(cfg: JobConfig, shape: dict, model_share: float | None = None, row_bytes: int = 0) -> Layout:
    """Actor count and resources: one per GPU (gpu_layout). On CPUs the actors and the decode tasks share the cores
    by measured demand: the actors reserve the model's share of the work (model_share, measured by an earlier run into
    OUTPUT: model seconds / (model + decode seconds)), at most half of the smallest node, with one torch thread more
    than that reservation; decode tasks take a CPU each in the rest, so at least one always fits (a pool that takes
    every CPU starves them and the run hangs). A default batch of rows of `row_bytes` stays within MODEL_BATCH_BYTES."""
    layout = _layout(cfg, shape, model_share)
    if cfg.batch_size or not row_bytes:
        return layout
    return replace(layout, batch_size=max(1, min(layout.batch_size, MODEL_BATCH_BYTES // row_bytes)))


def _layout(cfg: JobConfig, shape: dict, model_share: float | None) -> Layout:
    device = cfg.device
    gpus = shape["gpus"]
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda":
        return gpu_layout(cfg, shape)
    cpus = max(1, shape["cpus"])
    size = cfg.num_actors or max(1, cpus // 8)
    if size >= cpus and cpus > 1:
        raise UserError(f"num_actors={size} would take all {cpus} CPUs and starve decoding; use at most {cpus - 1}")
    share = DEFAULT_MODEL_SHARE if model_share is None else min(0.9, max(0.1, model_share))
    node_cpus = max(1, shape.get("node_cpus", cpus))
    per_actor = max(0.25, min(cpus * share / size, node_cpus / 2, (cpus - DECODE_CPUS) / size))
    per_actor = round(per_actor * 4) / 4  # quarters: readable in the record, and whole when the share is
    # one torch thread more than the reservation (within the node): the model borrows the cycles a decode task leaves
    # idle while it waits on storage
    threads = cfg.torch_threads or min(node_cpus, math.ceil(per_actor) + 1)
    decode = min(DECODE_CPUS, cpus - per_actor * size)  # below one CPU only on a one-CPU machine
    return Layout("cpu", size, 0, per_actor, threads, cfg.batch_size or 32, cfg.torch_compile, decode)


def gpu_layout(cfg: JobConfig, shape: dict) -> Layout:
    """One actor per GPU (or num_actors), each reserving one GPU and GPU_ACTOR_CPUS; decode tasks take a CPU each in
    the CPUs the actors leave, anywhere in the cluster: a cluster the actors would leave none is refused (the run
    would hang), unless num_actors is pinned (an autoscaler may add CPUs for the pending decode tasks)."""
    gpus = shape["gpus"]
    if not gpus and not cfg.num_actors:
        raise UserError(
            "device cuda was asked for, but the Ray cluster has no GPUs up; on an autoscaling "
            "cluster pass --num-actors N so the autoscaler starts GPU workers for them"
        )
    size = cfg.num_actors or gpus  # pending actors make an autoscaler add GPU nodes
    left = shape["cpus"] - size * GPU_ACTOR_CPUS
    if left < DECODE_CPUS and not cfg.num_actors:
        raise UserError(
            f"the {size} GPU actors would take all {shape['cpus']} CPUs of the Ray cluster (one each) and leave none "
            "for decoding; give the GPU nodes more CPUs than GPUs, or add a CPU node"
        )
    return Layout(
        "cuda",
        size,
        1,
        GPU_ACTOR_CPUS,
        cfg.torch_threads,
        cfg.batch_size or 256,
        cfg.torch_compile,
        actor_calls=GPU_ACTOR_CALLS,
        decode_cpus_per_gpu=round(max(0, left) / size, 2),
    )


def model_share(out: OutputDir) -> float | None:
    """The model's share of the work in OUTPUT's newest CPU run (its model and decode seconds), if there is one."""
    record = out.read_json("_run.json") or {}
    stages = record.get("stages") or {}
    model, decode = stages.get("model_s"), stages.get("decode_s")
    if (record.get("layout") or {}).get("device") != "cpu" or not model or not decode:
        return None
    return model / (model + decode)
