"""Dataset versions (real runs, real Parquet): readers read the readable version whatever a newer one left behind,
every version keeps its concept names and its identity, and an aborted --new-version run neither locks the readable
version out nor loses its own resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import EnvironmentFailure
from pipeline.images_job import run_images
from pipeline.rescore import ScoredOutput

QUIET = {"echo": lambda m: None}
OTHER_CONCEPTS = ["cat", "dog", "bird", "car"]  # as many as the conftest prompt set: nothing but names tells them apart


@pytest.fixture()
def other_prompts(tmp_path) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text(f"concepts: [{', '.join(OTHER_CONCEPTS)}]\ntemplates: ['a photo of a {{}}']\n", encoding="utf-8")
    return path


def common(model, output: Path, **options) -> dict:
    return dict(output=str(output), model=str(model), trust_remote_code=True, rows_per_shard=8, **options)


def test_readers_read_the_readable_version_whatever_a_newer_one_left(
    ray_session, conceptclip_model, prompts_file, other_prompts, photo_dir, tmp_path
):
    """An OUTPUT as an older writer left it while a --new-version run was in progress (or after it crashed):
    `_dataset.json` says version 2, readable version 1, and a shard of version 2 sits beside version 1's. Every
    reader (read_features, labels, report, the analysis commands' ScoredOutput) reads version 1."""
    out, other = tmp_path / "out", tmp_path / "other"
    run_images(RunConfig(input=str(photo_dir), prompts=str(prompts_file), **common(conceptclip_model, out)), **QUIET)
    run_images(RunConfig(input=str(photo_dir), prompts=str(other_prompts), **common(conceptclip_model, other)), **QUIET)
    v2 = pq.read_table(other / "part-00000.parquet")
    v2 = v2.set_column(
        v2.column_names.index("dataset_version"), "dataset_version", pa.array([2] * v2.num_rows, pa.int32())
    )
    pq.write_table(v2, out / "part-00099.parquet")
    dataset = json.loads((out / "_dataset.json").read_text())
    other_identity = json.loads((other / "_dataset.json").read_text())["identity"]
    (out / "_dataset.json").write_text(json.dumps({"identity": other_identity, "version": 2, "readable_version": 1}))

    n = len(list(photo_dir.glob("*.jpg")))
    assert pipeline.read_features(str(out)).num_rows == n
    source = ScoredOutput(str(out))
    assert source.version == 1 and source.identity == dataset["identity"]  # the readable version's identity
    assert main(["labels", str(out), "--top-k", "1", "--out", str(tmp_path / "l.csv")]) == 0
    labels = pacsv.read_csv(tmp_path / "l.csv")
    assert labels.num_rows == n and set(labels.column("concept").to_pylist()) <= {
        "tumor", "stroma", "lymphocytes", "necrosis"
    }  # fmt: skip
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert f">{n}<" in (tmp_path / "r.html").read_text().replace(",", "")


def test_every_version_keeps_its_concept_names(
    ray_session, conceptclip_model, prompts_file, other_prompts, photo_dir, tmp_path
):
    """A --new-version run with another prompt set of the same size: version 1's names stay readable with version 1
    (before, `_prompts.parquet` was overwritten and relabelled version 1's logits), version 2's with version 2, and
    `_prompts.parquet` follows the readable version."""
    out = tmp_path / "out"
    run_images(RunConfig(input=str(photo_dir), prompts=str(prompts_file), **common(conceptclip_model, out)), **QUIET)
    first = ["tumor", "stroma", "lymphocytes", "necrosis"]
    assert pipeline.read_prompts(str(out)).column("concept").to_pylist() == first
    cfg = RunConfig(
        input=str(photo_dir), prompts=str(other_prompts), new_version=True, **common(conceptclip_model, out)
    )
    record = run_images(cfg, **QUIET)
    assert record["dataset_version"] == 2
    assert pipeline.read_prompts(str(out), version=1).column("concept").to_pylist() == first
    assert pipeline.read_prompts(str(out), version=2).column("concept").to_pylist() == OTHER_CONCEPTS
    assert pipeline.read_prompts(str(out)).column("concept").to_pylist() == OTHER_CONCEPTS  # the readable one
    assert pq.read_table(out / "_prompts.parquet").column("concept").to_pylist() == OTHER_CONCEPTS
    assert ScoredOutput(str(out)).concepts == OTHER_CONCEPTS


def test_an_aborted_new_version_run_locks_nothing_out(
    ray_session, s3_server, s3_bucket, conceptclip_model, prompts_file, other_prompts, photo_dir, tmp_path
):
    """Version 1 complete; a --new-version run (another prompt set) fails on its storage. The readable version's
    nightly --incremental still runs as version 1 (before, its identity had been replaced and it was refused), and
    rerunning the new version's command, its storage back, resumes that run as version 2."""
    import s3fs

    options = s3_server["storage_options"]
    s3fs.S3FileSystem(**options).put(str(photo_dir) + "/", f"{s3_bucket}/photos/", recursive=True)
    out = tmp_path / "out"
    v1 = RunConfig(input=str(photo_dir), prompts=str(prompts_file), incremental=True, **common(conceptclip_model, out))
    run_images(v1, **QUIET)
    manifest = tmp_path / "remote.parquet"
    uris = [f"s3://{s3_bucket}/photos/{p.name}" for p in sorted(photo_dir.glob("*.jpg"))]
    pq.write_table(pa.table({"uri": uris}), manifest)
    dead = {**options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}  # fmt: skip
    v2 = dict(input=str(manifest), prompts=str(other_prompts), new_version=True, **common(conceptclip_model, out))
    with pytest.raises(EnvironmentFailure):
        run_images(RunConfig(storage_options=dead, **v2), **QUIET)
    failed = json.loads((out / "_run.json").read_text())
    assert (failed["state"], failed["dataset_version"]) == ("failed", 2)

    nightly = run_images(v1, **QUIET)
    assert (nightly["state"], nightly["dataset_version"], nightly["counts"]["processed"]) == ("complete", 1, 0)
    assert json.loads((out / "_dataset.json").read_text())["readable_version"] == 1

    resumed = run_images(RunConfig(storage_options=options, **v2), **QUIET)
    assert resumed["resumed"] and resumed["run_id"] == failed["run_id"] and resumed["dataset_version"] == 2
    dataset = json.loads((out / "_dataset.json").read_text())
    assert dataset["readable_version"] == 2 and set(dataset["versions"]) == {"1", "2"}
    assert dataset["versions"]["1"]["prompt_set_hash"] != dataset["versions"]["2"]["prompt_set_hash"]
    current = pipeline.read_features(str(out))
    assert current.num_rows == len(uris) and set(pc.unique(current.column("dataset_version")).to_pylist()) == {2}
    assert pipeline.read_features(str(out), version=1).num_rows == len(uris)


def test_slide_rows_of_other_versions_are_kept():
    """_slides.parquet holds a row per slide and version: a run replaces its own version's row of a slide only."""
    from pipeline.schema import SLIDE_SCHEMA
    from pipeline.slides_job import merge_slides

    def rows(*pairs):
        return pa.Table.from_pylist(
            [{"uri": uri, "slide_id": uri, "status": "ok", "dataset_version": v, "n_tiles": n} for uri, v, n in pairs],
            schema=SLIDE_SCHEMA,
        )

    merged = merge_slides(rows(("a", 1, 5), ("b", 1, 6)), rows(("a", 2, 7)))
    assert sorted(zip(*(merged.column(c).to_pylist() for c in ("uri", "dataset_version", "n_tiles")))) == [
        ("a", 1, 5), ("a", 2, 7), ("b", 1, 6)
    ]  # fmt: skip
    again = merge_slides(merged, rows(("a", 2, 9)))
    assert sorted(zip(*(again.column(c).to_pylist() for c in ("uri", "dataset_version", "n_tiles")))) == [
        ("a", 1, 5), ("a", 2, 9), ("b", 1, 6)
    ]  # fmt: skip
