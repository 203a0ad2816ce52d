"""GPU placement on a real multi-node Ray, proven on CPUs: a 0-CPU head and two worker nodes that each declare 2 fake
GPUs (`ray start --num-gpus 2 --num-cpus 3`), every process with FEATURIZE_TEST_CUDA_AS_CPU=1 so a model actor
scheduled by the GPU resource runs the model on the CPU (the run record says so). `featurize images` goes in as a Ray
job with `device: auto`, as a user's would; the kill is triggered by an observed state (committed shards, the model
actors alive), never by a sleep.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from ray_cluster import private_cluster
from test_cluster import (
    JOB_TIMEOUT_S,
    SMALL,
    _assert_exactly_once,
    _config,
    _job,
    _ok,
    _run_record,
    _shards,
    _sid,
    _uris,
    _wait_until,
)

from pipeline.demo import make_images
from pipeline.models import CUDA_AS_CPU_ENV

GPUS_PER_NODE, CPUS_PER_NODE = 2, 3  # one CPU each for the two GPU actors, one left to decode
N_IMAGES, ROWS_PER_SHARD = 240, 20  # 12 work units: the paced model leaves tens of seconds of work after the kill
GPU_RUN = {"device": "auto", "dtype": "float32", "rows_per_shard": ROWS_PER_SHARD, "batch_size": 4}
GPU_ACTOR = "MapWorker"  # the model actors' class in Ray's state API: MapWorker(MapBatches(EncodeBatch))
DECODE_TASK = "decode_batch"  # in the name of the CPU stage's tasks: MapBatches(decode_batch)


@pytest.fixture(scope="module")
def gpu_cluster():
    """The fake-GPU cluster; node loss replaces the lost node, so each test finds two 2-GPU workers."""
    with private_cluster({CUDA_AS_CPU_ENV: "1"}) as cluster:
        for _ in range(2):
            cluster.add_worker(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        yield cluster


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-images")
    make_images(folder, N_IMAGES, seed=12, sizes=SMALL)
    return folder


def _job_id(cluster, submission_id: str) -> str | None:
    return cluster.api(f"/api/jobs/{submission_id}").get("job_id")


def _model_actors(cluster, job_id: str, state: str | None = None) -> list[dict]:
    actors = cluster.api("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    return [
        a
        for a in actors
        if a.get("job_id") == job_id and GPU_ACTOR in (a.get("class_name") or "") and state in (None, a["state"])
    ]


def _tasks(cluster, job_id: str, name: str) -> list[dict]:
    query = f"/api/v0/tasks?limit=10000&detail=true&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
    return [t for t in cluster.api(query, timeout=60)["data"]["result"]["result"] if name in (t.get("name") or "")]


def _assert_one_actor_per_gpu(alive: list[dict], workers: dict[str, str]) -> None:
    """Four live model actors, two on each worker node (workers: node id -> name), each holding one GPU (and the one
    CPU the layout gives it)."""
    per_node = Counter(workers.get(a["node_id"], f"not a worker: {a['node_id']}") for a in alive)
    assert per_node == {name: GPUS_PER_NODE for name in workers.values()}, per_node
    for actor in alive:
        assert actor["required_resources"] == {"GPU": 1.0, "CPU": 1.0}, actor["required_resources"]


def test_one_actor_per_fake_gpu_across_nodes_and_a_lost_2_gpu_node_loses_nothing(
    gpu_cluster, many_images, paced_model, prompts_file, tmp_path
):
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", many_images, output, paced_model, prompts_file, **GPU_RUN)
    sid = _sid("gpu-node-loss")
    sub = gpu_cluster.submit_background(_job("featurize.py", config), sid)
    units = math.ceil(N_IMAGES / ROWS_PER_SHARD)
    seen = {}  # the model actors alive when the kill's condition held

    def pool_up_with_2_shards() -> bool:
        """Two shards committed while all four model actors are alive (Ray Data starts them asynchronously)."""
        job_id = _job_id(gpu_cluster, sid) if len(_shards(output)) >= 2 else None
        seen["alive"] = _model_actors(gpu_cluster, job_id, "ALIVE") if job_id else []
        return len(seen["alive"]) == 2 * GPUS_PER_NODE

    _wait_until(pool_up_with_2_shards, sub, 240, "2 shards were committed while the 4 model actors run")
    workers = {w.node_id: w.name for w in gpu_cluster.workers}
    gpu_cluster.kill_node_raylet(gpu_cluster.workers[0])  # two GPU actors and a decode slot go with it
    committed = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _shards(output)}
    assert 2 <= len(committed) < units, f"the node was killed with {len(committed)} of {units} units committed"
    _assert_one_actor_per_gpu(seen["alive"], workers)  # as they were, just before the kill
    gpu_cluster.add_worker(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)

    _ok(sub.wait(JOB_TIMEOUT_S), "the job")
    _assert_exactly_once(output, _uris(many_images))
    for name, (mtime_ns, data) in committed.items():
        path = output / name
        assert path.stat().st_mtime_ns == mtime_ns and path.read_bytes() == data, f"{name} was rewritten"

    record = _run_record(output)
    assert record["counts"]["processed"] == record["counts"]["ok"] == N_IMAGES
    layout = record["layout"]
    # auto picked the GPUs: one actor per GPU, and 6 - 4 = 2 CPUs left to decode, half a CPU per GPU
    assert (layout["device"], layout["size"], layout["num_gpus"], layout["num_cpus"]) == ("cuda", 4, 1, 1)
    assert (layout["decode_cpus"], layout["decode_cpus_per_gpu"]) == (1.0, 0.5)
    # and the record says what really ran: the model on the CPU, no GPU figures
    assert record["stages"]["actor_start"]["device"] == "cpu"
    assert layout["device_override"].startswith(f"placed on cuda, the model ran on cpu ({CUDA_AS_CPU_ENV}=1")
    assert "gpu_busy_fraction" not in record["stages"]

    # The CPU stage: every decode task reserved the layout's CPU, on a worker node (the head has no CPUs)
    decode = _tasks(gpu_cluster, _job_id(gpu_cluster, sid), DECODE_TASK)
    assert decode, "no decode task in the state API"
    worker_nodes = {n.node_id for n in gpu_cluster.nodes if not n.head and not n.failed}
    assert {t["node_id"] for t in decode if t.get("node_id")} <= worker_nodes
    assert {t["required_resources"].get("CPU") for t in decode} == {layout["decode_cpus"]}
