"""Driver pieces that need no cluster: actor sizing, work-unit planning and the no-progress watchdog."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.run import _consume, actor_layout

CFG = dict(input="in", output="out", model="m", prompts="p.yaml")


def test_cpu_pool_leaves_room_for_decoding():
    layout = actor_layout(RunConfig(**CFG), {"cpus": 2, "gpus": 0})
    assert layout["size"] == 1 and layout["device"] == "cpu" and layout["num_gpus"] == 0
    with pytest.raises(UserError, match="starve decoding"):
        actor_layout(RunConfig(**CFG, num_actors=2), {"cpus": 2, "gpus": 0})


def test_one_actor_per_gpu_in_bfloat16_batches():
    layout = actor_layout(RunConfig(**CFG), {"cpus": 64, "gpus": 4})
    assert layout["size"] == 4 and layout["num_gpus"] == 1 and layout["device"] == "cuda"
    with pytest.raises(UserError, match="no GPUs"):
        actor_layout(RunConfig(**CFG, device="cuda"), {"cpus": 8, "gpus": 0})


class _Stalled:
    """A stream that yields one batch and then never again (a lost actor pool)."""

    def iter_batches(self, **_):
        yield {"unit": np.array([0]), "row": np.array([0])}
        threading.Event().wait()


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
        _consume(_Stalled(), writer, RunConfig(**CFG, stall_timeout_s=1.0), stats, on_commit=lambda unit: None)
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

    batch = {"unit": np.array([0]), "row": np.array([0]), "uri": np.array(["s3://b/x.jpg"], dtype=object),
             "error": np.array(["device fault"], dtype=object), "error_class": np.array(["device"], dtype=object)}
    stream = _Endless(batch)
    stats = {"decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    before = set(threading.enumerate())  # (the stalled stream above keeps its thread: it never answers)
    with pytest.raises(EnvironmentFailure, match="s3://b/x.jpg: device fault; the accelerator failed"):
        _consume(stream, _Writer(), RunConfig(**CFG, stall_timeout_s=60), stats, on_commit=lambda unit: None)
    assert stream.closed.wait(10), "the stream was left running"
    assert not [t for t in set(threading.enumerate()) - before if t.name == "featurize-pull"]


def test_error_column_is_null_for_ok_rows_even_as_nan():
    """Ray Data returns an all-None object column as float NaN: the shard stores null, not "nan"."""
    from pipeline.schema import error_column

    assert error_column(np.array([np.nan, np.nan], dtype=np.float32)).to_pylist() == [None, None]
    assert error_column(np.array([None, "bad file"], dtype=object)).to_pylist() == [None, "bad file"]
