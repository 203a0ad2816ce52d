"""Cluster operation, proven: `ray job submit` onto a real 3-node Ray on this machine (token authentication on),
then node loss, a cluster with no CPU node left, actor loss and nightly incremental runs, with the outputs checked
row by row. The cluster is `ray_cluster` (tests/ray_cluster.py): a 0-CPU head where job drivers run and two
2-CPU worker nodes. Every kill is triggered by an observed state (committed shards, the model actor's process),
never by a sleep, and each test checks that its kill landed while the run still had work to do.
"""

from __future__ import annotations

import json
import math
import signal
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_cluster import ray_cluster_fixture  # noqa: F401  (the session fixture `ray_cluster`)

from pipeline import read_features
from pipeline.demo import make_images
from pipeline.sources import list_inputs

SMALL = ((64, 48), (96, 72))
N_IMAGES = 48  # 12 work units of 4; with the paced model a kill after 1-2 units leaves seconds of work
FAST = {
    "rows_per_shard": 4,
    "batch_size": 2,
    "decode_batch_size": 2,
    "device": "cpu",
    "trust_remote_code": True,
    "torch_threads": 1,
}
JOB_TIMEOUT_S = 300
# The run's no-progress watchdog also covers the wait for the first batch (the actors' start-up), which takes 20-37 s
# on a busy 2-core machine: a shorter stall timeout can fail the run before anything could be killed.
STALL_S = 40
MODEL_ACTOR = "EncodeBatch"  # in the model actor's process title (ray::MapWorker(MapBatches(EncodeBatch)))


# -- helpers --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Small JPEGs shared by the tests (read-only): in a pytest tmp dir, which every node on this machine reads."""
    folder = tmp_path_factory.mktemp("cluster-images")
    make_images(folder, N_IMAGES, seed=11, sizes=SMALL)
    return folder


def _config(path: Path, input_dir: Path, output: Path, model: Path, prompts: Path, **options) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "input": str(input_dir),
                "output": str(output),
                "model": str(model),
                "prompts": str(prompts),
                **FAST,
                **options,
            }
        ),
        encoding="utf-8",
    )
    return path


def _job(script: str, config: Path) -> list[str]:
    return ["python", f"jobs/{script}", "--config", str(config)]


def _sid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _shards(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def _rows(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in _shards(output)])


def _uris(folder: Path) -> set[str]:
    return set(list_inputs(str(folder)).column("uri").to_pylist())


def _run_record(output: Path) -> dict:
    return json.loads((output / "_run.json").read_text(encoding="utf-8"))


def _assert_exactly_once(output: Path, expected_uris: set[str]) -> pa.Table:
    table = _rows(output)
    counts = Counter(table.column("uri").to_pylist())
    assert set(counts) == expected_uris, (
        f"missing {sorted(expected_uris - set(counts))[:5]}, unexpected {sorted(set(counts) - expected_uris)[:5]}"
    )
    twice = sorted(u for u, c in counts.items() if c != 1)
    assert not twice, f"{len(twice)} inputs have more than one row, e.g. {twice[:3]}"
    assert set(table.column("status").to_pylist()) == {"ok"}
    return table


def _ok(done, what: str) -> None:
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout[-6000:]}"


def _wait_until(condition, submission, timeout: float, what: str) -> None:
    """Poll condition() until true; fail clearly if the job ended first (the kill would come too late)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if submission.done():
            out = submission.wait(1).stdout
            pytest.fail(
                f"job {submission.submission_id} ended (exit {submission.proc.returncode}) before {what}: "
                f"the workload is too small for the kill to land mid-run\n{out[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout} s:\n{submission.output.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)


def _model_actor(cluster):
    """(process, node) of this test's model actor; None while there is none (a straggler of an earlier job, which
    the fixture below ends, is never taken for it)."""
    found = _left(cluster)
    assert len(found) <= 1, f"more than one model actor: {[(p.pid, n.name) for p, n in found]}"
    return found[0] if found else None


def _model_dim(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["embed_dim"])


def _assert_two_workers(cluster) -> None:
    workers = cluster.workers
    assert len(workers) == 2 and len(cluster.cpu_node_ids()) == 2, [w.name for w in workers]
    assert sum(w.hidden for w in workers) == (1 if cluster.hide_works else 0)


_STRAGGLERS: set[int] = set()  # model actor processes that outlived their job (ended by the fixture below)


def _about(proc: psutil.Process, node) -> str:
    """A model actor process that outlived its job, for the warning: its state and the tail of its Ray logs."""
    try:
        up = time.time() - proc.create_time()
        state = f"pid {proc.pid} on {node.name}, {proc.status()}, parent {proc.ppid()}, up {up:.0f} s"
    except psutil.NoSuchProcess:
        return f"pid {proc.pid} on {node.name} (gone)"
    logs = node.temp_dir / "session_latest" / "logs"
    tails = []
    for path in sorted(logs.glob(f"*{proc.pid}*")) if logs.is_dir() else []:
        if path.name.endswith((f"_{proc.pid}.log", f"-{proc.pid}.out", f"-{proc.pid}.err")):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join([state, *tails])


@pytest.fixture(autouse=True)
def _no_model_actor_left(ray_cluster):
    """After each test, wait until its job's model actor is gone, so the next test finds only its own.

    Ray ends a finished job's worker processes; a model actor process that is still there a minute later (seen once,
    on a loaded 2-core CI machine: a worker of a finished job, sleeping) is ended here by its pid and reported as a
    warning with its Ray logs, so that it neither fails the tests that follow nor goes unnoticed."""
    yield
    deadline = time.monotonic() + 60
    while _left(ray_cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc, node in _left(ray_cluster):
        warnings.warn(f"a model actor outlived its job; ending it: {_about(proc, node)}", stacklevel=1)
        _STRAGGLERS.add(proc.pid)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _left(cluster) -> list:
    return [(p, n) for p, n in cluster.processes_named(MODEL_ACTOR) if p.pid not in _STRAGGLERS]


# -- tests ----------------------------------------------------------------------------------------------------------
def test_hidden_dir_is_seen_by_the_head_only(ray_cluster):
    """The fixture's "local path the worker nodes cannot read": the head sees it, the hidden worker does not."""
    # Nor does the cluster write the default address file that a bare ray.init() would join.
    assert not ray_cluster.wrote_default_address_file()
    assert (ray_cluster.head.temp_dir / "ray_current_cluster").read_text().strip().endswith(f":{ray_cluster.gcs_port}")
    if not ray_cluster.hide_works:
        pytest.skip("unshare --mount does not work here")
    probe = ray_cluster.hidden_dir / "probe.txt"
    probe.write_text("driver only")
    try:
        by_name = {w.hidden: w for w in ray_cluster.workers}
        for node, visible in ((ray_cluster.head, True), (by_name[False], True), (by_name[True], False)):
            raylet = node.raylet()
            assert Path(f"/proc/{raylet.pid}/root{probe}").exists() is visible, node.name
    finally:
        probe.unlink()


def test_local_input_a_worker_node_cannot_read_is_refused_by_the_probe(
    ray_cluster, conceptclip_model, prompts_file, tmp_path
):
    """INPUT under the directory the hidden worker cannot see: the driver lists it, the probe task on that node
    cannot read it, and the job fails with one line naming INPUT and the fix, before any model starts."""
    if not ray_cluster.hide_works:
        pytest.skip("unshare --mount does not work here")
    images = ray_cluster.hidden_dir / f"images-{uuid.uuid4().hex[:6]}"
    make_images(images, 3, seed=2, sizes=SMALL)
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", images, output, conceptclip_model, prompts_file)
    done = ray_cluster.submit(_job("featurize.py", config), _sid("probe"), timeout=JOB_TIMEOUT_S)
    assert done.returncode != 0, done.stdout[-3000:]
    assert f"featurize: error: INPUT {images} is a local path the worker nodes cannot read" in done.stdout, done.stdout[
        -3000:
    ]
    assert "put it on shared or object storage" in done.stdout
    assert not list(output.glob("part-*.parquet"))


def test_job_submit_featurizes_every_image_once_and_leaks_no_secret(
    ray_cluster, images, conceptclip_model, prompts_file, tmp_path
):
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", images, output, conceptclip_model, prompts_file)
    sid = _sid("featurize")
    done = ray_cluster.submit(_job("featurize.py", config), sid, timeout=JOB_TIMEOUT_S)
    _ok(done, "ray job submit")
    assert f"Job '{sid}' succeeded" in done.stdout

    uris = _uris(images)
    table = _assert_exactly_once(output, uris)
    dim = _model_dim(conceptclip_model)
    for row in table.to_pylist():  # one by one
        assert row["status"] == "ok", row["uri"]
        assert row["image_features"] is not None and len(row["image_features"]) == dim, row["uri"]
        assert all(v is not None for v in row["image_features"]), row["uri"]
        assert row["concept_logits"] is not None and len(row["concept_logits"]) == 4, row["uri"]
        assert row["width"] > 0 and row["height"] > 0
    assert len(_shards(output)) == math.ceil(len(uris) / 4)
    record = _run_record(output)
    assert record["state"] == "complete" and record["counts"]["processed"] == record["counts"]["ok"] == len(uris)

    # It ran on the cluster: the model actor was placed on a worker node (the head has no CPUs).
    job_id = ray_cluster.api(f"/api/jobs/{sid}")["job_id"]
    actors = ray_cluster.api("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    model_actors = [a for a in actors if a.get("job_id") == job_id and "MapWorker" in (a.get("class_name") or "")]
    assert model_actors, [(a.get("class_name"), a.get("job_id")) for a in actors]
    assert {a["node_id"] for a in model_actors} <= {w.node_id for w in ray_cluster.workers}

    # HF_TOKEN is set on every node (it reaches the driver and the actors); it, and the cluster token, never show.
    logs = ray_cluster.logs(sid)
    assert "featurize: run" in logs
    for secret in (ray_cluster.secret_marker, ray_cluster.token):
        assert secret not in logs and secret not in done.stdout
        for path in output.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path

    # A batch whose rows are all ok carries an all-None `error` column, which Ray Data hands back as float NaN:
    # it must be stored as null, never as the string "nan".
    assert set(table.column("error").to_pylist()) == {None}
    # Quiet by default, in a job's log too: no Ray log lines, no token notice, no weight-loading bars.
    for noise in ("core_worker", "Token authentication", "Loading weights"):
        assert noise not in logs, noise


def test_actor_killed_mid_run_loses_and_duplicates_no_row(ray_cluster, images, paced_model, prompts_file, tmp_path):
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", images, output, paced_model, prompts_file, stall_timeout_s=120)
    sub = ray_cluster.submit_background(_job("featurize.py", config), _sid("actor-loss"))
    units = math.ceil(N_IMAGES / 4)
    _wait_until(
        lambda: len(_shards(output)) >= 1 and _model_actor(ray_cluster) is not None,
        sub,
        180,
        "a shard was committed while the model actor runs",
    )
    proc, node = _model_actor(ray_cluster)
    proc.send_signal(signal.SIGKILL)
    at_kill = len(_shards(output))
    psutil.wait_procs([proc], timeout=10)
    assert at_kill < units, f"the actor was killed after all {units} units were committed"

    _ok(sub.wait(JOB_TIMEOUT_S), "the job")
    _assert_exactly_once(output, _uris(images))
    counts = _run_record(output)["counts"]
    assert counts["processed"] == N_IMAGES
    assert counts["ok"] + counts["error"] == counts["processed"]
    assert "duplicates_dropped" in counts and counts["duplicates_dropped"] >= 0


def test_nightly_job_processes_only_new_and_changed_images(ray_cluster, conceptclip_model, prompts_file, tmp_path):
    incoming = tmp_path / "incoming"
    make_images(incoming, 10, seed=21, sizes=SMALL)
    output = tmp_path / "out"
    config = _config(tmp_path / "nightly.yaml", incoming, output, conceptclip_model, prompts_file)

    _ok(ray_cluster.submit(_job("nightly.py", config), _sid("nightly-1"), timeout=JOB_TIMEOUT_S), "first night")
    first = _run_record(output)
    assert first["counts"]["processed"] == first["counts"]["ok"] == 10
    before = {
        u: f for u, f in zip(*(read_features(str(output)).column(c).to_pylist() for c in ("uri", "image_features")))
    }

    new = make_images(tmp_path / "new", 5, seed=22, sizes=SMALL)
    for i, p in enumerate(new):
        p.rename(incoming / f"new_{i:03d}.jpg")
    changed = sorted(incoming.glob("img_*.jpg"))[:2]
    for i, p in enumerate(changed):
        old = p.stat()
        replacement = make_images(tmp_path / f"swap{i}", 1, seed=100 + i, sizes=((90, 70), (90, 70)))[0]
        replacement.replace(p)
        now = p.stat()
        assert (now.st_size, now.st_mtime_ns) != (old.st_size, old.st_mtime_ns)

    _ok(ray_cluster.submit(_job("nightly.py", config), _sid("nightly-2"), timeout=JOB_TIMEOUT_S), "second night")
    second = _run_record(output)
    assert second["run_id"] != first["run_id"]
    assert second["counts"]["listed"] == 15
    assert second["counts"]["processed"] == 7 and second["counts"]["skipped"] == 8
    current = read_features(str(output))
    assert current.num_rows == 15 == len(set(current.column("uri").to_pylist()))
    after = dict(zip(*(current.column(c).to_pylist() for c in ("uri", "image_features"))))
    differ = {u for u in before if after[u] != before[u]}
    assert differ == {str(p) for p in changed}


def test_node_with_the_model_actor_lost_mid_run_then_a_new_node_joins(
    ray_cluster, images, paced_model, prompts_file, tmp_path
):
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", images, output, paced_model, prompts_file, stall_timeout_s=120)
    sub = ray_cluster.submit_background(_job("featurize.py", config), _sid("node-loss"))
    units = math.ceil(N_IMAGES / 4)
    _wait_until(
        lambda: len(_shards(output)) >= 2 and _model_actor(ray_cluster) is not None,
        sub,
        180,
        "2 shards were committed while the model actor runs",
    )
    proc, node = _model_actor(ray_cluster)
    ray_cluster.kill_node_raylet(node)
    committed = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _shards(output)}
    assert 2 <= len(committed) < units, f"the node was killed with {len(committed)} of {units} units committed"

    ray_cluster.add_worker(hide=node.hidden)  # replaces the lost node (other tests expect two workers)
    _ok(sub.wait(JOB_TIMEOUT_S), "the job")
    _assert_exactly_once(output, _uris(images))
    for name, (mtime_ns, data) in committed.items():
        path = output / name
        assert path.stat().st_mtime_ns == mtime_ns and path.read_bytes() == data, f"{name} was rewritten"
    record = _run_record(output)
    assert record["counts"]["processed"] == record["counts"]["ok"] == N_IMAGES
    _assert_two_workers(ray_cluster)


def test_no_cpu_node_left_fails_clearly_then_resubmission_resumes(
    ray_cluster, images, paced_model, prompts_file, tmp_path
):
    stall = STALL_S
    output = tmp_path / "out"
    config = _config(tmp_path / "job.yaml", images, output, paced_model, prompts_file, stall_timeout_s=stall)
    sid = _sid("no-node")
    sub = ray_cluster.submit_background(_job("featurize.py", config), sid)
    units = math.ceil(N_IMAGES / 4)
    _wait_until(
        lambda: len(_shards(output)) >= 1 and _model_actor(ray_cluster) is not None,
        sub,
        180,
        "a shard was committed while the model actor runs",
    )
    lost = list(ray_cluster.workers)
    for node in lost:
        ray_cluster.kill_node_raylet(node)
    killed_at = time.monotonic()
    at_kill = len(_shards(output))
    assert at_kill < units, f"the nodes were killed after all {units} units were committed"

    failed = sub.wait(stall + 90)
    assert failed.returncode != 0, f"the job did not fail:\n{failed.stdout[-4000:]}"
    assert time.monotonic() - killed_at < stall + 90
    message = f"no progress for {stall} s"
    assert message in failed.stdout, failed.stdout[-4000:]
    assert message in ray_cluster.logs(sid)
    kept = len(_shards(output))
    assert kept < units

    for node in lost:  # the same shape as before: one plain worker, one with the hidden directory
        ray_cluster.add_worker(hide=node.hidden)
    _assert_two_workers(ray_cluster)
    # The same job again; only its stall limit is roomier, since fresh nodes start every worker process anew
    # (slow on a loaded 2-core machine) and the failure detection above is what this test times.
    rerun = _config(tmp_path / "rerun.yaml", images, output, paced_model, prompts_file, stall_timeout_s=180)
    _ok(
        ray_cluster.submit(_job("featurize.py", rerun), _sid("no-node-rerun"), timeout=JOB_TIMEOUT_S),
        "the resubmitted job",
    )
    _assert_exactly_once(output, _uris(images))
    record = _run_record(output)
    assert record["resumed"] is True and record["state"] == "complete"
    assert record["counts"]["processed"] == N_IMAGES - 4 * kept  # the committed units were not redone


def test_slides_job_plans_on_the_worker_nodes_into_an_object_store(
    ray_cluster, conceptclip_model, prompts_file, s3_server, s3_bucket, tmp_path
):
    """`featurize slides` submitted to the cluster with OUTPUT on S3: the planning tasks run on the worker nodes (the
    head has no CPUs) and write each slide's tiles to OUTPUT themselves (none handed to the driver); the run removes
    those part files once its plan is written, and every tile of the plan is scored exactly once."""
    import s3fs
    from slide_fixtures import draw_slide, write_slide

    from pipeline.slides import Tiling, plan_slide

    slides = tmp_path / "slides"
    write_slide(slides / "a.tif", draw_slide(1024, 768, seed=5), 0.25)
    write_slide(slides / "b.svs", draw_slide(1024, 768, seed=6), 0.5, aperio=True)
    options = s3_server["storage_options"]
    output = f"s3://{s3_bucket}/out"
    args = [
        "python",
        "-m",
        "pipeline.cli",
        "slides",
        str(slides),
        output,
        "--storage-options",
        json.dumps(options),
        "--model",
        str(conceptclip_model),
        "--prompts",
        str(prompts_file),
        "--trust-remote-code",
        "--target-mpp",
        "0.5",
        "--tile-px",
        "64",
        "--rows-per-shard",
        "40",
        "--batch-size",
        "8",
        "--decode-batch-size",
        "8",
        "--device",
        "cpu",
        "--torch-threads",
        "1",
        "--stall-timeout-s",
        "120",
    ]
    _ok(ray_cluster.submit(args, _sid("slides"), timeout=JOB_TIMEOUT_S), "the slides job")

    fs = s3fs.S3FileSystem(**options)
    record = json.loads(fs.cat_file(f"{s3_bucket}/out/_run.json"))
    assert record["state"] == "complete" and record["counts"]["slides_ok"] == 2
    assert record["counts"]["tile_parts_by_driver"] == 0  # the worker nodes wrote every part themselves
    assert not [p for p in fs.ls(f"{s3_bucket}/out/_runs") if p.endswith(".tiles")]
    tiles = pa.concat_tables(
        [pq.read_table(p, filesystem=fs) for p in sorted(fs.glob(f"{s3_bucket}/out/part-*.parquet"))]
    )
    tiling = Tiling(target_mpp=0.5, tile_px=64, overlap_px=0, min_tissue=0.25)
    for name, file in (("a", "a.tif"), ("b", "b.svs")):
        _, grid = plan_slide(str(slides / file), tiling)
        got = sorted((r["x"], r["y"]) for r in tiles.to_pylist() if r["slide_id"] == name)
        assert got == sorted(zip(grid["x"].tolist(), grid["y"].tolist())) and got
    assert set(tiles.column("status").to_pylist()) == {"ok"}
    assert record["counts"]["processed"] == tiles.num_rows == record["counts"]["tiles"]
