"""What the cluster's nodes can see: locations only this process would see are refused, and before streaming one
task per worker node checks that it can read the local paths the run needs (a local disk is not shared across
nodes)."""

from __future__ import annotations

import json
import os

from .config import JobConfig
from .errors import EnvironmentFailure, UserError
from .lease import LEASE_NAME
from .storage import check_storage_options, is_remote, local_path, only_driver_node, working_nodes


def refuse_process_local(cfg: JobConfig) -> None:
    """Refuse locations that only this process would see: memory:// (Ray's workers see an empty filesystem), and
    a relative local OUTPUT inside `ray job submit --working-dir` (it would land in Ray's temporary copy of the
    working dir, deleted with the job)."""
    check_storage_options([cfg.input, cfg.output], cfg.storage_options)  # before the model is resolved
    for name in ("input", "output"):
        if str(getattr(cfg, name)).startswith("memory://"):
            raise UserError(
                f"{name.upper()} {getattr(cfg, name)} is in this process's memory, which Ray's workers "
                "cannot see: use a local folder or object storage"
            )
    output = local_path(cfg.output)
    if not is_remote(cfg.output) and os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"output {cfg.output} is a file, not a folder: choose another OUTPUT")
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
