"""The output contract on real runs: a uri listed twice is processed once; the prompt table is written before the
first shard; --fast-decode is part of the dataset's identity; a --new-version run leaves the previous version
readable until it completes, and both versions stay readable with read_features(version=...)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_features
from pipeline.config import RunConfig
from pipeline.demo import make_images
from pipeline.errors import EnvironmentFailure, UserError
from pipeline.images_job import run_images

QUIET = {"echo": lambda m: None}


@pytest.fixture(scope="module")
def listed_twice(tmp_path_factory):
    """Six images in a .txt list that names two of them twice (once by another spelling of the same path)."""
    folder = tmp_path_factory.mktemp("twice")
    images = make_images(folder / "images", 6, seed=4, sizes=((64, 48), (96, 72)))
    lines = [str(p) for p in images] + [str(images[0]), str(images[3])]
    (folder / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_versions_duplicates_prompts_and_fast_decode(
    ray_session, conceptclip_model, prompts_file, listed_twice, tmp_path
):
    out = tmp_path / "out"
    common = dict(output=str(out), model=str(conceptclip_model), trust_remote_code=True, rows_per_shard=4)
    first = run_images(RunConfig(input=str(listed_twice / "list.txt"), prompts=str(prompts_file), **common), **QUIET)
    assert (first["counts"]["listed"], first["counts"]["duplicates"], first["counts"]["processed"]) == (8, 2, 6)
    v1 = read_features(str(out))
    assert v1.num_rows == 6 == len(set(v1.column("uri").to_pylist()))
    assert sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == 6  # each once in the shards
    # The prompt table is written before the first shard (never skipped).
    first_shard = min(p.stat().st_mtime_ns for p in out.glob("part-*.parquet"))
    assert (out / "_prompts.parquet").stat().st_mtime_ns <= first_shard
    assert json.loads((out / "_dataset.json").read_text())["readable_version"] == 1

    # --fast-decode changes the numbers: the same OUTPUT refuses it without --new-version
    with pytest.raises(UserError, match="fast_decode.*--new-version"):
        run_images(
            RunConfig(input=str(listed_twice / "list.txt"), prompts=str(prompts_file), fast_decode=True, **common),
            **QUIET,
        )

    # A --new-version run (another prompt set) that fails: version 1 stays what readers get.
    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("a photo of a cat\na photo of a dog\n", encoding="utf-8")
    manifest = tmp_path / "dead.parquet"
    pq.write_table(pa.table({"uri": ["s3://nowhere/a.jpg", "s3://nowhere/b.jpg"]}), manifest)
    dead = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "x"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(EnvironmentFailure):
        run_images(
            RunConfig(
                input=str(manifest), prompts=str(other_prompts), new_version=True, storage_options=dead, **common
            ),
            **QUIET,
        )
    dataset = json.loads((out / "_dataset.json").read_text())
    assert dataset["readable_version"] == 1  # _dataset.json is written when a run completes, never by a failed one
    failed = json.loads((out / "_run.json").read_text())
    assert (failed["state"], failed["dataset_version"]) == ("failed", 2)
    assert read_features(str(out)).equals(v1)

    # It completes: version 2 is what readers get, and version 1 is still there when asked for.
    second = run_images(RunConfig(input=str(listed_twice / "images"), prompts=str(other_prompts), **common), **QUIET)
    assert second["dataset_version"] == 2 and second["counts"]["ok"] == 6
    v2 = read_features(str(out))
    assert set(v2.column("dataset_version").to_pylist()) == {2}
    assert len(v2.column("concept_logits")[0].as_py()) == 2  # the new prompt set's two concepts
    assert read_features(str(out), version=1).equals(v1)
