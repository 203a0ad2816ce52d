"""Object storage, exactly-once resume, actor loss, incremental runs and version safety (real Ray, real S3 server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_features
from pipeline.config import RunConfig
from pipeline.demo import make_images
from pipeline.errors import UserError
from pipeline.images_job import run_images

QUIET = {"echo": lambda m: None}


def shards(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def all_rows(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in shards(output)])


def features_by_name(table: pa.Table) -> dict[str, list]:
    return {
        u.rsplit("/", 1)[-1]: f
        for u, f in zip(table.column("uri").to_pylist(), table.column("image_features").to_pylist())
    }


def test_s3_in_s3_out_equals_local(
    ray_session, s3_server, s3_bucket, conceptclip_model, prompts_file, photo_dir, tmp_path
):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(photo_dir) + "/", f"{s3_bucket}/photos/", recursive=True)
    common = dict(model=str(conceptclip_model), prompts=str(prompts_file), trust_remote_code=True, rows_per_shard=10)
    run_images(RunConfig(input=str(photo_dir), output=str(tmp_path / "local"), **common), **QUIET)
    remote_cfg = RunConfig(
        input=f"s3://{s3_bucket}/photos", output=f"s3://{s3_bucket}-out/features", storage_options=options, **common
    )
    s3_server["create_bucket"](f"{s3_bucket}-out")
    record = run_images(remote_cfg, **QUIET)
    assert record["counts"]["ok"] == len(list(photo_dir.glob("*.jpg")))
    remote = read_features(f"s3://{s3_bucket}-out/features", storage_options=options)
    local = read_features(str(tmp_path / "local"))
    assert remote.num_rows == local.num_rows
    assert all(u.startswith(f"s3://{s3_bucket}/photos/") for u in remote.column("uri").to_pylist())
    assert features_by_name(remote) == features_by_name(local)
    assert fs.exists(f"{s3_bucket}-out/features/_prompts.parquet")
    # No credential from storage_options lands in any output file.
    for path in fs.find(f"{s3_bucket}-out/features"):
        content = fs.cat_file(path)
        assert options["secret"].encode() not in content and options["key"].encode() not in content, path


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    make_images(folder, 120, seed=3, sizes=((64, 48), (96, 72)))
    return folder


def _featurize_cmd(input_dir: Path, output: Path, model: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "images",
        str(input_dir),
        str(output),
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--trust-remote-code",
        "--rows-per-shard",
        "4",
        "--batch-size",
        "2",
        "--decode-batch-size",
        "2",
        *extra,
    ]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_driver_killed_then_rerun_resumes_exactly_once(many_images, conceptclip_model, prompts_file, tmp_path):
    output = tmp_path / "out"
    cmd = _featurize_cmd(many_images, output, conceptclip_model, prompts_file)
    _kill_after_shards(cmd, output, 2)
    before = {p.name: p.stat().st_mtime_ns for p in shards(output)}
    units = 120 // 4
    assert 2 <= len(before) < units, f"kill landed at {len(before)} of {units} shards"

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = all_rows(output)
    assert table.num_rows == 120
    assert len(set(table.column("uri").to_pylist())) == 120
    assert set(table.column("status").to_pylist()) == {"ok"}
    after = {p.name: p.stat().st_mtime_ns for p in shards(output)}
    assert all(after[name] == mtime for name, mtime in before.items())
    run = json.loads((output / "_run.json").read_text())
    assert run["resumed"] is True and run["counts"]["processed"] == 120 - 4 * len(before)
    assert not list(output.rglob(".tmp-*"))


def test_inputs_listed_after_a_crash_are_processed_by_the_same_command(conceptclip_model, prompts_file, tmp_path):
    """The driver is killed mid-run; new images arrive before the rerun. The rerun finishes the killed run's plan,
    then plans and processes the new images in the same command; the counts are exact (before, the new images were
    counted as "skipped (already committed)" and left for another night, and skipped could go negative)."""
    images = tmp_path / "images"
    make_images(images, 60, seed=11, sizes=((64, 48), (96, 72)))
    output = tmp_path / "out"
    cmd = _featurize_cmd(images, output, conceptclip_model, prompts_file)
    _kill_after_shards(cmd, output, 2)
    committed = len(shards(output))
    assert 2 <= committed < 60 // 4, f"kill landed at {committed} shards"
    make_images(tmp_path / "new", 6, seed=12, sizes=((64, 48), (96, 72)))
    for path in (tmp_path / "new").iterdir():
        path.rename(images / f"new_{path.name}")

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 input(s) beyond its plan" in done.stderr
    table = all_rows(output)
    assert table.num_rows == 66 == len(set(table.column("uri").to_pylist()))
    runs = sorted((json.loads(p.read_text()) for p in (output / "_runs").glob("*.json")), key=lambda r: r["run_id"])
    resumed, after = runs[-2], runs[-1]
    assert resumed["resumed"] and resumed["state"] == "complete" and after["state"] == "complete"
    assert resumed["counts"]["after_plan"] == 6 and resumed["counts"]["skipped"] == 0
    assert resumed["counts"]["processed"] == 60 - 4 * committed
    assert not after["resumed"] and after["counts"]["processed"] == 6 and after["counts"]["skipped"] == 60


def _kill_after_shards(cmd: list[str], output: Path, n: int) -> None:
    """Run the command and SIGKILL its driver once `n` shards are committed (or it ends, or 240 s pass)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(shards(output)) < n and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)


def _kill_group(pid: int) -> None:
    """Reap what the killed driver left behind (its local Ray processes share its session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_actor_killed_mid_run_gives_exactly_one_row_per_input(
    ray_session, many_images, conceptclip_model, prompts_file, tmp_path
):
    import psutil

    killed = []

    def kill_one_actor():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(p.info["cmdline"] or [])
                if "EncodeBatch" in cmdline and len(list((tmp_path / "out").glob("part-*.parquet"))) >= 1:
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    cfg = RunConfig(
        input=str(many_images),
        output=str(tmp_path / "out"),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
        rows_per_shard=4,
        batch_size=2,
        decode_batch_size=2,
        num_actors=2,
        stall_timeout_s=120,
    )
    record = run_images(cfg, **QUIET)
    killer.join(timeout=5)
    assert killed, "no model actor was found to kill"
    table = all_rows(tmp_path / "out")
    assert table.num_rows == 120 == len(set(table.column("uri").to_pylist()))
    assert record["counts"]["ok"] == 120


def test_incremental_processes_only_new_and_changed(ray_session, conceptclip_model, prompts_file, tmp_path):
    images = tmp_path / "images"
    make_images(images, 30, seed=5, sizes=((64, 48), (96, 72)))
    common = dict(
        input=str(images),
        output=str(tmp_path / "out"),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
        rows_per_shard=8,
        incremental=True,
    )
    first = run_images(RunConfig(**common), **QUIET)
    assert first["counts"]["processed"] == 30
    assert first["stages"]["actors_started_before_plan"]  # a first run loads the model while it plans
    old = features_by_name(read_features(str(tmp_path / "out")))

    extra = tmp_path / "extra"
    make_images(extra, 20, seed=6, sizes=((64, 48), (96, 72)))
    for i, p in enumerate(sorted(extra.glob("*.jpg"))):
        p.rename(images / f"new_{i:03d}.jpg")
    changed = sorted(images.glob("img_*.jpg"))[:2]
    for p in changed:
        make_images(tmp_path / "swap", 1, seed=hash(p.name) % 1000, sizes=((80, 60), (80, 60)))
        (tmp_path / "swap" / "img_00000.jpg").replace(p)

    second = run_images(RunConfig(**common), **QUIET)
    assert second["counts"]["processed"] == 22
    assert second["counts"]["skipped"] == 28 and second["counts"]["listed"] == 50
    runs = sorted((tmp_path / "out" / "_runs").glob("*.json"))
    assert len(runs) == 2
    assert {json.loads(r.read_text())["counts"]["processed"] for r in runs} == {30, 22}

    current = read_features(str(tmp_path / "out"))
    assert current.num_rows == 50 == len(set(current.column("uri").to_pylist()))
    new = features_by_name(current)
    for p in changed:
        assert new[p.name] != old[p.name]
    unchanged = sorted(images.glob("img_*.jpg"))[2:]
    assert all(new[p.name] == old[p.name] for p in unchanged)

    assert not second["stages"]["actors_started_before_plan"]  # later runs plan first
    third = run_images(RunConfig(**common), **QUIET)
    assert third["counts"]["processed"] == 0
    assert third["layout"] and not third["stages"]["actors_started_before_plan"]  # nothing new: no model loaded

    (images / changed[0].name).unlink()
    assert read_features(str(tmp_path / "out"), exclude_removed=True).num_rows == 50  # listing not refreshed yet
    run_images(RunConfig(**common), **QUIET)
    assert read_features(str(tmp_path / "out"), exclude_removed=True).num_rows == 49


def test_changed_prompts_or_model_refused_without_new_version(
    ray_session, conceptclip_model, clip_model, prompts_file, photo_dir, tmp_path
):
    out = str(tmp_path / "out")
    common = dict(input=str(photo_dir), output=out, trust_remote_code=True, rows_per_shard=50)
    run_images(RunConfig(model=str(conceptclip_model), prompts=str(prompts_file), **common), **QUIET)
    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("a photo of a cat\na photo of a dog\n")
    with pytest.raises(UserError, match="prompt_set_hash.*--new-version"):
        run_images(RunConfig(model=str(conceptclip_model), prompts=str(other_prompts), **common), **QUIET)
    with pytest.raises(UserError, match="model.*--new-version"):
        run_images(RunConfig(model=str(clip_model), prompts=str(prompts_file), **common), **QUIET)

    record = run_images(
        RunConfig(model=str(clip_model), prompts=str(prompts_file), new_version=True, **common), **QUIET
    )
    assert record["dataset_version"] == 2 and record["counts"]["processed"] == len(list(photo_dir.glob("*.jpg")))
    current = read_features(out)
    assert set(current.column("dataset_version").to_pylist()) == {2}
    assert len(current.column("image_features")[0]) == 32


def test_manifest_input_and_object_vanished_after_listing(
    ray_session, s3_server, s3_bucket, conceptclip_model, prompts_file, photo_dir, tmp_path
):
    import s3fs

    from pipeline.sources import write_manifest

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(photo_dir) + "/", f"{s3_bucket}/photos/", recursive=True)
    manifest = f"s3://{s3_bucket}/manifests/photos.parquet"
    listed = write_manifest(f"s3://{s3_bucket}/photos", manifest, options)
    n = len(list(photo_dir.glob("*.jpg")))
    assert listed.num_rows == n and all(e for e in listed.column("etag").to_pylist())
    gone = listed.column("uri")[3].as_py()
    fs.rm(gone)
    run_images(
        RunConfig(
            input=manifest,
            output=str(tmp_path / "out"),
            model=str(conceptclip_model),
            prompts=str(prompts_file),
            trust_remote_code=True,
            storage_options=options,
        ),
        **QUIET,
    )
    table = all_rows(tmp_path / "out")
    assert table.num_rows == n
    row = table.filter(pa.compute.equal(table.column("uri"), gone)).to_pylist()[0]
    assert row["status"] == "error" and "not found" in row["error"] and row["image_features"] is None
    assert table.column("status").to_pylist().count("ok") == n - 1
