"""The stream's plan readers (real Ray): the plan posted on the run's board after the stream started, read from
the plan file or handed over by the driver row group by row group, only the units still to do; and a run whose
model actors started before planning releases them when planning fails."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.board import RunBoard
from pipeline.config import RunConfig
from pipeline.errors import EnvironmentFailure, UserError
from pipeline.images_job import ImagesJob, run_images
from pipeline.plan import post_plan, read_plan_range
from pipeline.write import OutputDir

COLUMNS = ["uri", "unit", "row"]


def write_plan_file(path, units: dict[int, int], row_group: int) -> int:
    """A plan file as write_plan makes them: rows numbered from 0 in unit order, small row groups."""
    unit_col = np.concatenate([np.full(n, u, np.int32) for u, n in sorted(units.items())])
    rows = np.arange(len(unit_col), dtype=np.int64)
    pq.write_table(
        pa.table({"uri": [f"s3://b/{r:05d}.jpg" for r in rows], "size": rows * 3, "unit": unit_col, "row": rows}),
        path,
        row_group_size=row_group,
    )
    return len(rows)


def readers(board, ranges: int):
    import ray

    return ray.data.from_items([{"id": i} for i in range(ranges)], override_num_blocks=ranges).map_batches(
        read_plan_range,
        fn_kwargs={"board": board, "columns": COLUMNS},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        concurrency=min(2, ranges),
    )


@pytest.mark.parametrize("everywhere", [True, False])
def test_readers_started_before_the_plan_yield_each_pending_row_once(ray_session, tmp_path, monkeypatch, everywhere):
    import pipeline.plan as plan

    ray = ray_session
    monkeypatch.setattr(plan, "PLAN_RANGE_ROWS", 10)  # ranges of 10 rows across row groups of 16
    out = OutputDir(str(tmp_path))
    total = write_plan_file(tmp_path / "plan.parquet", {0: 40, 1: 35, 2: 50, 3: 7}, row_group=16)
    board = ray.remote(num_cpus=0, max_concurrency=64)(RunBoard).remote()
    blocks: list = []
    ranges = plan.plan_ranges(total)
    assert ranges == 14
    pulled = threading.Thread(
        target=lambda: blocks.extend(readers(board, ranges).iter_batches(batch_size=None, batch_format="pyarrow"))
    )
    pulled.start()  # the readers wait on the board: the plan does not exist yet
    time.sleep(0.5)
    assert pulled.is_alive() and not blocks
    pending = [1, 3]  # units 0 and 2 committed already (a resumed run)
    held = post_plan(board, out, str(tmp_path / "plan.parquet"), COLUMNS, pending, 42, everywhere)
    pulled.join(timeout=120)
    assert not pulled.is_alive()
    # the driver's objects (only when workers cannot read OUTPUT): one per range that has pending rows
    assert len(held) == (0 if everywhere else 6)
    got = pa.concat_tables(blocks)
    assert sorted(got.column("unit").to_pylist()) == [1] * 35 + [3] * 7
    assert sorted(got.column("row").to_pylist()) == list(range(40, 75)) + list(range(125, total))
    assert got.column_names == COLUMNS  # only the stage's columns travel
    assert max(b.num_rows for b in blocks) <= 10  # a block per range


def test_an_empty_plan_ends_the_readers(ray_session):
    ray = ray_session
    board = ray.remote(num_cpus=0, max_concurrency=64)(RunBoard).remote()
    board.post_plan.remote(None)  # what a run that fails, or has nothing to do, posts
    assert readers(board, 3).take_all() == []


def test_planning_failing_after_the_actors_started_releases_them(
    ray_session, conceptclip_model, prompts_file, photo_dir, tmp_path, monkeypatch
):
    ray = ray_session
    before = ray.available_resources().get("CPU", 0.0)
    during = []

    def broken_plan(self, *args, **kwargs):
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0.0) >= before and time.monotonic() < deadline:
            time.sleep(0.1)  # the model actor takes its CPUs while the driver plans
        during.append(ray.available_resources().get("CPU", 0.0))
        raise UserError("planning failed (test)")

    monkeypatch.setattr(ImagesJob, "plan", broken_plan)
    cfg = RunConfig(
        input=str(photo_dir),
        output=str(tmp_path / "out"),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
    )
    with pytest.raises(UserError, match="planning failed"):
        run_images(cfg, echo=lambda m: None)
    assert during and during[0] < before  # a first run over an empty OUTPUT plans with its actors starting
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == before  # the model actor's CPUs are free again
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("name", ["out", "it's out"])  # a quote in the path once broke the resume's SQL
def test_a_stream_that_ends_with_work_missing_fails_the_run_and_the_rerun_resumes_it(
    name, ray_session, conceptclip_model, prompts_file, photo_dir, tmp_path, monkeypatch
):
    import pipeline.stream as stream

    real = stream.post_plan

    def nothing_pending(board, out, path, columns, units, rows, everywhere):  # the readers see no unit to do
        return real(board, out, path, columns, [], rows, everywhere)

    monkeypatch.setattr(stream, "post_plan", nothing_pending)
    cfg = RunConfig(
        input=str(photo_dir),
        output=str(tmp_path / name),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
        rows_per_shard=8,
    )
    with pytest.raises(EnvironmentFailure, match=r"3 work unit\(s\) unfinished \(24 rows missing\)"):
        run_images(cfg, echo=lambda m: None)
    assert not list((tmp_path / name).glob("part-*"))
    assert json.loads((tmp_path / name / "_run.json").read_text())["state"] == "failed"  # never "complete"

    monkeypatch.setattr(stream, "post_plan", real)
    again = run_images(cfg, echo=lambda m: None)
    assert again["resumed"] and again["counts"]["ok"] == 24
    # no shard yet, but a plan to resume (which may hold more rows than today's listing): planned first
    assert not again["stages"]["actors_started_before_plan"]
