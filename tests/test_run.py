"""Driver pieces that need no cluster: actor sizing, work-unit planning and the no-progress watchdog."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.cluster import actor_layout
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.stream import Stream

CFG = dict(input="in", output="out", model="m", prompts="p.yaml")


def test_cpu_pool_leaves_room_for_decoding():
    layout = actor_layout(RunConfig(**CFG), {"cpus": 2, "gpus": 0})
    assert (layout.size, layout.device, layout.num_gpus) == (1, "cpu", 0)
    # the model's default half of two cores, and a torch thread more (the core a decode task leaves idle); a decode
    # task in the rest
    assert (layout.num_cpus, layout.torch_threads, layout.decode_cpus) == (1.0, 2, 1.0)
    with pytest.raises(UserError, match="starve decoding"):
        actor_layout(RunConfig(**CFG, num_actors=2), {"cpus": 2, "gpus": 0})


@pytest.mark.parametrize(
    "share,cpus,node_cpus,expected",
    [
        (0.9, 2, 2, (1.0, 2)),  # a model-bound run: at most half of a node
        (0.2, 2, 2, (0.5, 2)),  # a decode-bound run: the decode tasks get the rest
        (0.5, 16, 16, (4.0, 5)),  # two actors (one per 8 CPUs), half the cores between them
        (0.8, 8, 2, (1.0, 2)),  # four 2-CPU nodes: an actor must fit on one beside a decode task
        (0.75, 32, 32, (6.0, 7)),  # four actors
        (None, 3, 3, (1.5, 3)),
        (0.5, 1, 1, (0.25, 1)),  # one CPU: never more threads than the node has
    ],
)
def test_cpu_share_follows_the_measured_demand(share, cpus, node_cpus, expected):
    layout = actor_layout(RunConfig(**CFG), {"cpus": cpus, "gpus": 0, "node_cpus": node_cpus}, share)
    assert (layout.num_cpus, layout.torch_threads) == expected
    assert layout.num_cpus * layout.size + layout.decode_cpus <= cpus


def test_the_model_share_is_measured_by_the_outputs_newest_cpu_run(tmp_path):
    from pipeline.cluster import model_share
    from pipeline.write import OutputDir

    out = OutputDir(str(tmp_path))
    assert model_share(out) is None
    out.write_json({"layout": {"device": "cpu"}, "stages": {"model_s": 30.0, "decode_s": 10.0}}, "_run.json")
    assert model_share(out) == 0.75
    out.write_json({"layout": {"device": "cuda"}, "stages": {"model_s": 30.0, "decode_s": 10.0}}, "_run.json")
    assert model_share(out) is None  # a GPU run says nothing about CPU demand


@pytest.mark.parametrize(
    "rows,side,cpus,expected",
    [
        (64, 64, 2, 32),  # the demo: at least one decode batch a block
        (10_000, 64, 2, 1024),  # small images: at most 1,024 rows
        (10_000, 384, 2, 151),  # ConceptCLIP's 384 px: ~64 MB of decoded pixels a block, not 453 MB
        (10_000_000, 384, 64, 151),
        (5_000, 224, 16, 79),  # four blocks per CPU
    ],
)
def test_blocks_into_the_cpu_stage_are_bounded_by_rows_and_by_decoded_bytes(rows, side, cpus, expected):
    from pipeline.stream import stage_block_rows

    assert stage_block_rows(rows, 32, (side, side, 3), cpus) == expected


def test_one_actor_per_gpu_in_bfloat16_batches():
    layout = actor_layout(RunConfig(**CFG), {"cpus": 64, "gpus": 4})
    assert (layout.size, layout.num_gpus, layout.device) == (4, 1, "cuda")
    with pytest.raises(UserError, match="no GPUs"):
        actor_layout(RunConfig(**CFG, device="cuda"), {"cpus": 8, "gpus": 0})


def test_gpu_actors_take_a_cpu_each_and_decoding_the_cpus_they_leave():
    # two nodes of 3 CPUs and 2 GPUs (tests/test_cluster_gpus.py): 4 actors, 2 CPUs left to decode, 0.5 per GPU
    layout = actor_layout(RunConfig(**CFG), {"cpus": 6, "gpus": 4, "nodes": 2, "node_cpus": 3})
    assert (layout.size, layout.num_gpus, layout.num_cpus, layout.decode_cpus) == (4, 1, 1, 1.0)
    assert layout.as_dict()["decode_cpus_per_gpu"] == 0.5
    assert actor_layout(RunConfig(**CFG), {"cpus": 64, "gpus": 8}).decode_cpus_per_gpu == 7.0
    # actors that would take every CPU leave the decode tasks none: the run would hang
    with pytest.raises(UserError, match="take all 4 CPUs of the Ray cluster .* leave none for decoding"):
        actor_layout(RunConfig(**CFG), {"cpus": 4, "gpus": 4})
    # pinned actors (an autoscaling cluster, which adds nodes for pending work) are left to the autoscaler
    pinned = actor_layout(RunConfig(**CFG, device="cuda", num_actors=4), {"cpus": 0, "gpus": 0})
    assert (pinned.size, pinned.decode_cpus_per_gpu) == (4, 0.0)


def test_gpu_actors_take_a_second_call_while_the_model_runs_and_cpu_actors_do_not():
    """On a GPU, Ray Data batches the next call's rows in the actor while the model runs (max_concurrency 2);
    CPU actors keep one call, so no extra thread competes for their cores."""
    from pipeline.cluster import GPU_ACTOR_CALLS
    from pipeline.stream import actor_pool_options

    gpu = actor_layout(RunConfig(**CFG), {"cpus": 64, "gpus": 4})
    assert GPU_ACTOR_CALLS == 2 and gpu.as_dict()["actor_calls"] == 2
    options = actor_pool_options(gpu)
    pool = options.pop("compute")
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (4, 4, 2)
    assert options == {"num_gpus": 1, "num_cpus": 1}  # no deprecated max_concurrency actor option
    cpu = actor_layout(RunConfig(**CFG), {"cpus": 2, "gpus": 0})
    options = actor_pool_options(cpu)
    assert cpu.actor_calls == 1 and options.pop("compute").max_concurrent_calls_per_actor is None
    assert options == {"num_gpus": 0, "num_cpus": cpu.num_cpus}


class _Stalled:
    """A stream that yields one batch and then never again (a lost actor pool)."""

    def iter_batches(self, **_):
        yield {"unit": np.array([0]), "row": np.array([0])}
        threading.Event().wait()


def consume(ds, writer, cfg, stats) -> None:
    """A whole stream as the run drives it: started, consumed, closed however that ends."""
    stream = Stream(ds).start()
    try:
        stream.consume(writer, cfg, stats)
    finally:
        stream.close()


class _Writer:
    pending = 3
    rows_taken = 0

    def __init__(self):
        self.batches = []

    def add(self, batch):
        self.batches.append(batch)
        return []


def test_watchdog_fails_a_stalled_run_with_a_clear_message():
    writer = _Writer()
    stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    t = time.perf_counter()
    with pytest.raises(UserError, match="no progress for 1 s.*Rerun the same command to resume"):
        consume(_Stalled(), writer, RunConfig(**CFG, stall_timeout_s=1.0), stats)
    assert time.perf_counter() - t < 10
    assert len(writer.batches) == 1


class _Endless:
    """A stream that would go on for ever; records whether it was shut down (Ray Data's iterator is a generator:
    closing it stops the streaming executor and frees its actors)."""

    def __init__(self, batch):
        self.batch = batch
        self.closed = threading.Event()

    def iter_batches(self, **_):
        try:
            while True:
                yield dict(self.batch)
        finally:
            self.closed.set()


def test_a_failed_run_shuts_its_stream_down_and_leaves_no_thread_behind():
    from pipeline.errors import EnvironmentFailure

    batch = {
        "unit": np.array([0]),
        "row": np.array([0]),
        "uri": np.array(["s3://b/x.jpg"], dtype=object),
        "error": np.array(["device fault"], dtype=object),
        "error_class": np.array(["device"], dtype=object),
    }
    stream = _Endless(batch)
    stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    before = set(threading.enumerate())  # (the stalled stream above keeps its thread: it never answers)
    with pytest.raises(EnvironmentFailure, match="s3://b/x.jpg: device fault; the accelerator failed"):
        consume(stream, _Writer(), RunConfig(**CFG, stall_timeout_s=60), stats)
    assert stream.closed.wait(10), "the stream was left running"
    assert not [t for t in set(threading.enumerate()) - before if t.name == "featurize-pull"]


def test_error_column_is_null_for_ok_rows_even_as_nan():
    """Ray Data returns an all-None object column as float NaN: the shard stores null, not "nan"."""
    from pipeline.schema import error_column

    assert error_column(np.array([np.nan, np.nan], dtype=np.float32)).to_pylist() == [None, None]
    assert error_column(np.array([None, "bad file"], dtype=object)).to_pylist() == [None, "bad file"]
