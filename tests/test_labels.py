"""`featurize labels` and `pipeline.top_k`: zero-shot labels from stored concept logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_rescore import colour_outputs, slides_output

import pipeline
from pipeline import read_features
from pipeline.cli import main
from pipeline.errors import UserError

CONCEPTS = ["a", "b", "c", "d"]


def _table(logits, status=None) -> pa.Table:
    n = len(logits)
    return pa.table(
        {
            "uri": [f"u{i}" for i in range(n)],
            "status": status or ["ok"] * n,
            "concept_logits": pa.array(logits, pa.list_(pa.float32())),
        }
    )


@pytest.fixture(scope="module")
def colours(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return colour_outputs(tmp_path_factory, conceptclip_model, prompts_file)


def test_ranks_follow_the_logits_and_rank_one_is_the_argmax():
    logits = [[0.5, 2.0, -1.0, 2.0], [3.0, 1.0, 2.0, 0.0], None]
    out = pipeline.top_k(_table(logits, ["ok", "ok", "error"]), 3, CONCEPTS, kind="remote")
    assert out.column_names == ["uri", "rank", "concept", "logit", "probability"]
    assert out.column("uri").to_pylist() == ["u0"] * 3 + ["u1"] * 3  # the error row is left out
    assert out.column("rank").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert out.column("concept").to_pylist() == ["b", "d", "a", "a", "c", "b"]  # equal logits: the first concept
    assert out.column("logit").to_pylist() == [2.0, 2.0, 0.5, 3.0, 2.0, 1.0]
    assert pipeline.top_k(_table(logits[:2]), 10, CONCEPTS, kind="clip").num_rows == 8  # k is at most K
    with pytest.raises(UserError, match="at least 1"):
        pipeline.top_k(_table(logits[:2]), 0, CONCEPTS, kind="clip")


@pytest.mark.parametrize(
    "kind,softmax,expect",
    [
        ("clip", False, "softmax"),
        ("siglip", False, "sigmoid"),
        ("remote", False, "sigmoid"),
        ("remote", True, "softmax"),
        ("siglip", True, "softmax"),
    ],
)
def test_probabilities_per_family(kind, softmax, expect):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 4)) * 20).astype(np.float32)
    out = pipeline.top_k(_table(logits.tolist()), 4, CONCEPTS, kind=kind, softmax=softmax).to_pandas()
    probs = out.pivot(index="uri", columns="concept", values="probability").loc[[f"u{i}" for i in range(5)], CONCEPTS]
    if expect == "softmax":
        ref = np.exp(logits - logits.max(1, keepdims=True))
        ref /= ref.sum(1, keepdims=True)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # over all concepts
    else:
        ref = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(probs.to_numpy(), ref, atol=1e-6)


def test_cli_writes_csv_and_parquet_from_a_real_output(colours, tmp_path, capsys):
    out_csv, out_parquet = tmp_path / "labels.csv", tmp_path / "labels.parquet"
    assert main(["labels", colours["output"], "--top-k", "2", "--out", str(out_csv)]) == 0
    assert main(["labels", colours["output"], "--top-k", "2", "--out", str(out_parquet)]) == 0
    assert "wrote 120 labels (60 rows x top 2)" in capsys.readouterr().err
    from_csv, from_parquet = pacsv.read_csv(out_csv), pq.read_table(out_parquet)
    assert from_csv.column_names == from_parquet.column_names == ["uri", "rank", "concept", "logit", "probability"]
    assert from_csv.column("concept").to_pylist() == from_parquet.column("concept").to_pylist()
    np.testing.assert_allclose(
        from_csv.column("probability").to_numpy(), from_parquet.column("probability").to_numpy(), rtol=1e-6
    )

    rows = read_features(colours["output"])
    concepts = pq.read_table(Path(colours["output"]) / "_prompts.parquet").column("concept").to_pylist()
    ok = [
        (u, v)
        for u, s, v in zip(
            rows.column("uri").to_pylist(), rows.column("status").to_pylist(), rows.column("concept_logits").to_pylist()
        )
        if s == "ok"
    ]
    first = from_parquet.filter(pa.compute.equal(from_parquet.column("rank"), 1))
    assert first.column("uri").to_pylist() == [u for u, _ in ok]
    assert first.column("concept").to_pylist() == [concepts[int(np.argmax(v))] for _, v in ok]
    # ConceptCLIP-style: a sigmoid per concept.
    np.testing.assert_allclose(
        first.column("probability").to_numpy(),
        1 / (1 + np.exp(-first.column("logit").to_numpy().astype(np.float64))),
        atol=1e-6,
    )


def test_clip_outputs_get_a_softmax_and_features_only_outputs_are_refused(colours, tmp_path, capsys):
    clip_like = tmp_path / "clip"
    shutil.copytree(colours["output"], clip_like)
    dataset = json.loads((clip_like / "_dataset.json").read_text())
    dataset["identity"]["kind"] = "clip"
    (clip_like / "_dataset.json").write_text(json.dumps(dataset))
    assert main(["labels", str(clip_like), "--top-k", "4", "--out", str(tmp_path / "all.parquet")]) == 0
    table = pq.read_table(tmp_path / "all.parquet").to_pandas()
    np.testing.assert_allclose(table.groupby("uri")["probability"].sum(), 1.0, atol=1e-5)
    capsys.readouterr()

    (clip_like / "_prompts.parquet").unlink()  # as a features-only run leaves it: no prompt table at all
    shutil.rmtree(clip_like / "_versions")
    assert main(["labels", str(clip_like), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no concept logits" in err[0] and "featurize rescore" in err[0]
    assert main(["labels", colours["output"], "--out", str(tmp_path / "x.txt")]) == 2
    assert "write a .parquet or .csv file" in capsys.readouterr().err


def test_slides_and_rescored_outputs(ray_session, colours, tmp_path_factory, conceptclip_model, prompts_file, tmp_path):
    from pipeline.rescore import rescore

    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    assert main(["labels", slides["output"], "--top-k", "1", "--out", str(tmp_path / "tiles.parquet")]) == 0
    tiles = pq.read_table(tmp_path / "tiles.parquet")
    assert tiles.column_names == ["slide_id", "uri", "x", "y", "level", "rank", "concept", "logit", "probability"]
    assert tiles.num_rows == int((slides["status"] == "ok").sum())

    rescore(colours["output"], colours["new_prompts"], str(tmp_path / "out2"), trust_remote_code=True)
    assert main(["labels", str(tmp_path / "out2"), "--top-k", "1", "--out", str(tmp_path / "new.csv")]) == 0
    labels = pacsv.read_csv(tmp_path / "new.csv")
    assert labels.num_rows == 60 and set(labels.column("concept").to_pylist()) <= {
        "red things",
        "sky",
        "grass",
        "glass",
    }
