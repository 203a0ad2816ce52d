"""Input errors and environment errors: a broken input is an error row with a class; a fault that is not the
input's (permission, storage, device, a path the workers cannot see) stops the run without committing its unit.
Also: --retry-errors, memory:// refused, a private local Ray whatever Ray's address file says, and a quiet run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import read_features
from pipeline.config import RunConfig
from pipeline.console import Progress
from pipeline.decode import PreprocessSpec, decode_batch
from pipeline.demo import make_images
from pipeline.errors import EnvironmentFailure, UserError, is_device_error, read_error_class
from pipeline.images_job import run_images
from pipeline.stream import environment_failure

QUIET = {"echo": lambda m: None}
SPEC = PreprocessSpec("squash", 16, 16)
CFG = dict(input="in", output="out", model="m", prompts="p.yaml")


# -- classes ---------------------------------------------------------------------------------------------------------
def test_each_failure_gets_its_class(tmp_path):
    good = tmp_path / "good.jpg"
    make_images(tmp_path / "g", 1, sizes=((64, 48), (64, 48)))
    (tmp_path / "g" / "img_00000.jpg").rename(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"this is not an image at all")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.jpg").mkdir()
    names = ["good.jpg", "empty.jpg", "text.jpg", "truncated.jpg", "folder.jpg", "gone.jpg"]
    out = decode_batch({"uri": np.array([str(tmp_path / n) for n in names], dtype=object)}, SPEC, 10**8)
    assert list(out["status"]) == ["ok"] + ["error"] * 5
    assert list(out["error_class"]) == [None, "empty", "unsupported", "corrupt", "unsupported", "missing"]
    # None of these is the environment's fault: the driver lets them through as error rows.
    assert environment_failure(out, RunConfig(**CFG)) is None

    big = decode_batch({"uri": np.array([str(good)], dtype=object)}, SPEC, 100)
    assert big["error_class"][0] == "too_large" and "decompression-bomb" in big["error"][0]


def test_exceptions_map_to_environment_classes():
    assert read_error_class(PermissionError(13, "Permission denied")) == "permission"
    assert read_error_class(ConnectionError("connection reset")) == "storage"
    assert read_error_class(OSError(5, "Input/output error")) == "storage"
    assert read_error_class(FileNotFoundError(2, "gone")) == "missing"
    assert is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_device_error(ValueError("image has 4 channels"))


def test_a_storage_fault_fails_the_rest_of_its_batch_fast(monkeypatch, tmp_path):
    """After an environment fault outlasted the retries, the batch's other inputs are not tried one by one."""
    import pipeline.decode as decode

    calls = []

    def failing(uri, storage_options=None):
        calls.append(uri)
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(decode, "read_bytes", failing)
    monkeypatch.setattr(decode, "ENVIRONMENT_RETRY_DELAYS_S", (0.0, 0.0))
    out = decode_batch({"uri": np.array([f"s3://b/{i}.jpg" for i in range(4)], dtype=object)}, SPEC, 10**8)
    assert calls == ["s3://b/0.jpg"] * 3  # the first input, tried three times; the others not at all
    assert list(out["error_class"]) == ["permission"] * 4 and set(out["status"]) == {"error"}
    failure = environment_failure(out, RunConfig(**CFG))
    assert isinstance(failure, EnvironmentFailure)
    assert "s3://b/0.jpg" in str(failure) and "credentials" in str(failure) and "rerun to resume" in str(failure)


def test_a_file_the_driver_sees_but_a_worker_did_not_is_an_environment_failure(tmp_path):
    present = tmp_path / "there.jpg"
    present.write_bytes(b"x")
    batch = {
        "uri": np.array([str(tmp_path / "gone.jpg"), str(present)], dtype=object),
        "error": np.array(["file not found", "file not found"], dtype=object),
        "error_class": np.array(["missing", "missing"], dtype=object),
    }
    failure = environment_failure(batch, RunConfig(**{**CFG, "input": str(tmp_path)}))
    assert isinstance(failure, EnvironmentFailure)
    assert f"INPUT {tmp_path} is a local path the worker nodes cannot read" in str(failure)
    assert str(present) in str(failure)


def test_a_device_fault_is_not_blamed_on_the_images(conceptclip_model, prompts_file):
    """A CUDA fault (not out-of-memory) marks the chunk as class device; the driver then stops the run."""
    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.encode import EncodeBatch
    from pipeline.prompts import load_prompts

    spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    preprocess = preprocess_spec(spec)
    actor = EncodeBatch(spec, preprocess, load_prompts(str(prompts_file)))
    n = 3
    batch = {
        "uri": np.array([f"u{i}" for i in range(n)], dtype=object),
        "pixels": np.zeros((n, *preprocess.out_shape), np.uint8),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }

    def cuda_fault(pixels):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    actor._encode_chunk = cuda_fault
    out = actor(dict(batch))
    assert list(out["error_class"]) == ["device"] * n and set(out["status"]) == {"error"}
    failure = environment_failure(out, RunConfig(**CFG))
    assert isinstance(failure, EnvironmentFailure) and "accelerator" in str(failure)

    def model_bug(pixels):
        raise ValueError("shapes do not match")

    actor._encode_chunk = model_bug
    out = actor(dict(batch, pixels=np.zeros((n, *preprocess.out_shape), np.uint8)))
    assert list(out["error_class"]) == ["model"] * n  # the input's (or the model's), not the environment's
    assert environment_failure(out, RunConfig(**CFG)) is None


# -- runs --------------------------------------------------------------------------------------------------------------
def test_storage_down_stops_the_run_and_commits_nothing(
    ray_session, s3_server, conceptclip_model, prompts_file, tmp_path
):
    """Objects listed in a manifest on a storage endpoint that is down: no error rows, no shard, one line."""
    import pyarrow as pa

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"s3://nowhere/img_{i}.jpg" for i in range(4)]}), manifest)
    dead = {
        **s3_server["storage_options"],
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    out = tmp_path / "out"
    cfg = RunConfig(
        input=str(manifest),
        output=str(out),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
        storage_options=dead,
        rows_per_shard=2,
        decode_batch_size=4,
    )
    with pytest.raises(EnvironmentFailure, match="s3://nowhere/img_0.jpg.*storage kept failing.*rerun to resume"):
        run_images(cfg, **QUIET)
    assert not list(out.glob("part-*.parquet"))
    record = json.loads((out / "_run.json").read_text())
    assert record["state"] == "failed" and "storage kept failing" in record["failure"]
    assert not (out / "_lease.json").exists()


def test_retry_errors_reprocesses_committed_error_rows(ray_session, conceptclip_model, prompts_file, tmp_path):
    images = tmp_path / "images"
    make_images(images, 5, seed=9, sizes=((64, 48), (96, 72)))
    broken = images / "img_00002.jpg"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")
    common = dict(
        input=str(images),
        output=str(tmp_path / "out"),
        model=str(conceptclip_model),
        prompts=str(prompts_file),
        trust_remote_code=True,
        rows_per_shard=10,
    )
    first = run_images(RunConfig(**common), **QUIET)
    assert first["counts"]["error"] == 1 and first["counts"]["error_classes"] == {"unsupported": 1}

    broken.write_bytes(good_bytes)  # the user repairs the file
    assert run_images(RunConfig(**common), **QUIET)["counts"]["processed"] == 0  # committed uris are not redone
    again = run_images(RunConfig(**common, retry_errors=True), **QUIET)
    assert again["counts"]["processed"] == 1 and again["counts"]["ok"] == 1
    rows = {Path(r["uri"]).name: r for r in read_features(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"ok"}
    assert run_images(RunConfig(**common, retry_errors=True), **QUIET)["counts"]["processed"] == 0


def test_memory_urls_are_refused_before_anything_starts(conceptclip_model, prompts_file, photo_dir):
    with pytest.raises(UserError, match="OUTPUT memory://out is in this process's memory.*object storage"):
        run_images(
            RunConfig(
                input=str(photo_dir),
                output="memory://out",
                model=str(conceptclip_model),
                prompts=str(prompts_file),
                trust_remote_code=True,
            ),
            **QUIET,
        )


def test_output_that_is_a_file_is_one_line_before_anything_starts(
    conceptclip_model, prompts_file, photo_dir, tmp_path, capsys
):
    from pipeline.cli import main

    taken = tmp_path / "results.parquet"
    taken.write_bytes(b"not a folder")
    code = main(
        [
            "images",
            str(photo_dir),
            str(taken),
            "--model",
            str(conceptclip_model),
            "--prompts",
            str(prompts_file),
            "--trust-remote-code",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{taken} is a file, not a folder" in err[0], err
    assert taken.read_bytes() == b"not a folder"


def test_relative_output_inside_a_ray_job_is_refused(monkeypatch, conceptclip_model, prompts_file, photo_dir):
    """Inside `ray job submit --working-dir .` a relative OUTPUT would be written into Ray's temporary copy."""
    common = dict(input=str(photo_dir), model=str(conceptclip_model), prompts=str(prompts_file), trust_remote_code=True)
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}),
    )
    with pytest.raises(UserError, match="OUTPUT out/ is a relative path inside a Ray job.*absolute path"):
        run_images(RunConfig(output="out/", **common), **QUIET)


# -- starting Ray, and what a run shows ------------------------------------------------------------------------------
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
NOISE = ("core_worker", "Token authentication", "Loading weights", "token-auth", "WARNING", " E ", "INFO")


def test_stale_address_file_ignored_and_a_run_is_quiet(conceptclip_model, prompts_file, tmp_path):
    """Ray's address file names a dead cluster: featurize starts its own Ray anyway. Its output holds our lines
    only: no Ray or transformers noise, and (not a terminal) progress lines."""
    images = tmp_path / "images"
    make_images(images, 12, seed=4, sizes=((64, 48), (96, 72)))
    saved = RAY_ADDRESS_FILE.read_text() if RAY_ADDRESS_FILE.exists() else None
    RAY_ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RAY_ADDRESS_FILE.write_text("127.0.0.1:9")  # nothing listens there
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FEATURIZE_DEBUG")}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "images",
                str(images),
                str(tmp_path / "out"),
                "--model",
                str(conceptclip_model),
                "--prompts",
                str(prompts_file),
                "--trust-remote-code",
                "--rows-per-shard",
                "3",
                "--batch-size",
                "2",
                "--decode-batch-size",
                "2",
                "--progress-interval-s",
                "0.01",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_text(saved)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert all(ln.startswith("featurize: ") for ln in lines), lines
    assert not [ln for ln in lines if any(word in ln for word in NOISE)], lines
    progress = [ln for ln in lines if "/12 images (" in ln]
    assert progress and progress[-1].startswith("featurize: 12/12 images (100%)"), lines
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["counts"]["ok"] == 12


class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


class _Log(_Terminal):
    def isatty(self):
        return False


def test_progress_is_a_live_bar_on_a_terminal_and_lines_in_a_log():
    term = _Terminal()
    bar = Progress(100, "images", stream=term)
    bar.interval_s = 0.0
    for _ in range(4):
        bar.update(25)
    bar.close()
    assert term.text.count("\rfeaturize: [") == 4 and "ETA" in term.text and term.text.endswith("\n")
    assert "[########################] 100/100 images (100%)" in term.text

    log = _Log()
    lines = Progress(10, "tiles", interval_s=0.0, stream=log)
    lines.update(4)
    lines.update(6)
    lines.close()
    assert log.text.splitlines()[0] == "featurize: 4/10 tiles (40%)"  # no rate yet: the first rows start the clock
    assert log.text.splitlines()[1].startswith("featurize: 10/10 tiles (100%), ")
    assert "\r" not in log.text and len(log.text.splitlines()) == 2
