"""The cluster side: cluster.yaml against Ray's own schema, the job configs, and the job entry points run for real."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.autoscaler
import yaml

import pipeline.cli
from pipeline.config import RunConfig, SlidesConfig, load_config_file
from pipeline.prompts import load_prompts
from pipeline.sources import list_inputs

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
JOB_CONFIGS = [JOBS / "featurize.yaml", JOBS / "nightly.yaml", JOBS / "slides.yaml"]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))


# -- cluster.yaml ---------------------------------------------------------------------------------------------------
def test_cluster_yaml_is_valid_for_the_installed_ray():
    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    cluster = _cluster()
    jsonschema.validate(cluster, schema)

    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--num-cpus=0" in head_start.split("ray start --head", 1)[1], "tasks must not land next to the driver"
    assert cluster["head_node_type"] in cluster["available_node_types"]
    # The container's Ray must be the Ray that submits jobs to it.
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


# -- job configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_is_a_valid_run_config(path):
    cfg = (SlidesConfig if path.name == "slides.yaml" else RunConfig)(**load_config_file(path))
    # Paths in a job config are relative to the working dir, i.e. the repository root.
    prompts = load_prompts(str(REPO / cfg.prompts))
    assert len(prompts.concepts) >= 5
    assert cfg.model == "JerrryNie/ConceptCLIP" and cfg.trust_remote_code and cfg.revision
    # num_actors is pinned to the GPU pool of cluster.yaml (one GPU per worker instance).
    cluster = _cluster()
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert cfg.num_actors == sum(t["min_workers"] for t in workers)


# -- entry points: argument forwarding (in process, no Ray) ----------------------------------------------------------
@pytest.mark.parametrize(
    "script, command, added",
    [("featurize.py", "images", []), ("nightly.py", "images", ["--incremental"]), ("slides.py", "slides", [])],
)
def test_entry_point_forwards_its_arguments_to_featurize(script, command, added, monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 3

    monkeypatch.setattr(pipeline.cli, "main", fake_main)
    monkeypatch.syspath_prepend(str(JOBS))  # what `python jobs/x.py` does for its own folder
    monkeypatch.delitem(sys.modules, "featurize", raising=False)  # import afresh, binding the fake main
    user_args = ["--config", "job.yaml", "--rows-per-shard", "5"]
    monkeypatch.setattr(sys, "argv", [str(JOBS / script), *user_args])
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(JOBS / script), run_name="__main__")
    finally:
        sys.modules.pop("featurize", None)  # it holds the fake main
    assert exit_info.value.code == 3
    assert calls == [[command, *user_args, *added]]


# -- entry points: real runs ----------------------------------------------------------------------------------------
def _write_config(tmp_path: Path, name: str, model: Path, photo_dir: Path, prompts_file: Path, output: Path) -> Path:
    path = tmp_path / name
    path.write_text(
        yaml.safe_dump(
            {
                "input": str(photo_dir),
                "output": str(output),
                "model": str(model),
                "prompts": str(prompts_file),
                "trust_remote_code": True,
                "device": "cpu",
                "rows_per_shard": 100,
            }
        ),
        encoding="utf-8",
    )
    return path


def _run_job(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python jobs/SCRIPT ARGS` from the repository root, as `ray job submit` would, starting its own local Ray."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEATURIZE_DEBUG": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(Path("jobs") / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _run_record(output: Path) -> dict:
    return json.loads((output / "_run.json").read_text(encoding="utf-8"))


def _shards(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


@pytest.mark.slow
def test_featurize_job_runs_like_the_cli_with_overrides(conceptclip_model, photo_dir, prompts_file, tmp_path):
    output = tmp_path / "out"
    config = _write_config(tmp_path, "job.yaml", conceptclip_model, photo_dir, prompts_file, output)
    uris = set(list_inputs(str(photo_dir)).column("uri").to_pylist())
    n = len(uris)

    _run_job("featurize.py", "--config", str(config), "--rows-per-shard", "5")  # the command line beats the 100

    shards = _shards(output)
    assert len(shards) == math.ceil(n / 5)
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    assert table.num_rows == n and set(table.column("uri").to_pylist()) == uris
    assert set(table.column("status").to_pylist()) == {"ok"}
    record = _run_record(output)
    assert record["state"] == "complete"
    assert record["counts"]["processed"] == record["counts"]["ok"] == n
    assert record["last_unit"] + 1 == math.ceil(n / 5)  # units numbered from 0 in a new OUTPUT


@pytest.mark.slow
def test_nightly_job_second_run_processes_nothing(conceptclip_model, photo_dir, prompts_file, tmp_path):
    output = tmp_path / "out"
    config = _write_config(tmp_path, "nightly.yaml", conceptclip_model, photo_dir, prompts_file, output)
    n = list_inputs(str(photo_dir)).num_rows

    _run_job("nightly.py", "--config", str(config))
    first = _run_record(output)
    assert first["counts"]["processed"] == first["counts"]["ok"] == n
    shards = _shards(output)

    _run_job("nightly.py", "--config", str(config))
    second = _run_record(output)
    assert second["run_id"] != first["run_id"] and second["state"] == "complete"
    assert second["counts"]["processed"] == 0
    assert second["counts"]["skipped"] == n
    assert _shards(output) == shards


@pytest.mark.slow
def test_slides_job_scores_a_cohort_like_the_cli(conceptclip_model, prompts_file, tmp_path):
    """jobs/slides.py: `featurize slides` as a Ray job entry point, on two real slides (written with tifffile)."""
    from slide_fixtures import draw_slide, write_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", draw_slide(1024, 768, seed=1), 0.25)
    write_slide(slides / "b.svs", draw_slide(1024, 768, seed=2), 0.5, aperio=True)
    output = tmp_path / "out"
    config = tmp_path / "slides.yaml"
    config.write_text(
        yaml.safe_dump({"input": str(slides), "output": str(output), "model": str(conceptclip_model),
                        "prompts": str(prompts_file), "trust_remote_code": True, "device": "cpu"}),
        encoding="utf-8",
    )  # fmt: skip
    _run_job("slides.py", "--config", str(config), "--tile-px", "64")
    record = _run_record(output)
    assert record["state"] == "complete" and record["command"] == "slides"
    assert record["counts"]["slides_ok"] == 2 and record["counts"]["ok"] == record["counts"]["processed"] > 0
    summary = pq.read_table(output / "_slides.parquet")
    assert sorted(summary.column("slide_id").to_pylist()) == ["a", "b"]
