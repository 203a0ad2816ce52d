"""`featurize probe`: a linear probe on stored features of generated colour classes (tiny random-weight model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_rescore import colour_outputs, slides_output

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.probe import load_probe, stratified_split


@pytest.fixture(scope="module")
def colours(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return colour_outputs(tmp_path_factory, conceptclip_model, prompts_file)


@pytest.fixture(scope="module")
def labels_csv(colours, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    lines = ["uri,label"] + [f"{uri},{label}" for uri, label in colours["labels"].items()]
    lines.append("/not/featurised.jpg,red")  # not in OUTPUT: left out, and said so
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def probed(colours, labels_csv, tmp_path_factory):
    """The same probe twice (seed 3), to compare; each writes MODEL_DIR and predictions."""
    root = tmp_path_factory.mktemp("probe")
    for name in ("a", "b"):
        assert (
            main(
                [
                    "probe",
                    colours["output"],
                    "--labels",
                    str(labels_csv),
                    "--seed",
                    "3",
                    "--out",
                    str(root / name),
                    "--predict",
                    str(root / f"{name}.parquet"),
                ]
            )
            == 0
        )
    return root


def test_split_is_stratified_disjoint_and_seeded():
    labels = ["x"] * 20 + ["y"] * 10 + ["z"] * 3
    split = stratified_split(labels, seed=1)
    everything = np.concatenate(list(split.values()))
    assert sorted(everything) == list(range(len(labels)))
    y = np.array(labels)
    assert [int((y[split["test"]] == c).sum()) for c in "xyz"] == [4, 2, 1]
    assert [int((y[split["val"]] == c).sum()) for c in "xyz"] == [4, 2, 1]
    again = stratified_split(labels, seed=1)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], stratified_split(labels, seed=2)["test"])
    with pytest.raises(UserError, match="at least 3 per class"):
        stratified_split(labels + ["w", "w"], seed=0)


def test_probe_separates_colour_classes(probed, capsys):
    metrics = json.loads((probed / "a" / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 36, "val": 12, "test": 12}
    assert metrics["classes"] == ["blue", "green", "red"]
    assert metrics["test_accuracy"] > 0.8, metrics
    assert set(metrics["per_class"]) == {"blue", "green", "red"}
    assert sum(m["support"] for m in metrics["per_class"].values()) == 12
    assert all(0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 for m in metrics["per_class"].values())
    assert metrics["labelled_not_found"] == 1
    assert metrics["C"] in [r["C"] for r in metrics["sweep"]] and len(metrics["sweep"]) >= 13

    record = json.loads((probed / "a" / "probe.json").read_text())
    dataset = json.loads((Path(record["source"]) / "_dataset.json").read_text())
    assert record["identity"] == dataset["identity"] and record["classes"] == metrics["classes"]
    model, loaded = load_probe(str(probed / "a"))
    assert loaded == record and list(model.classes_) == ["blue", "green", "red"]


def test_same_seed_same_outputs(probed):
    for name in ("metrics.json", "probe.json"):
        assert (probed / "a" / name).read_bytes() == (probed / "b" / name).read_bytes()
    assert pq.read_table(probed / "a.parquet").equals(pq.read_table(probed / "b.parquet"))


def test_predictions_cover_every_ok_row(probed, colours):
    table = pq.read_table(probed / "a.parquet")
    assert table.column_names == ["uri", "label", "p_blue", "p_green", "p_red"]
    assert sorted(table.column("uri").to_pylist()) == sorted(colours["labels"])  # the two broken files are errors
    probs = np.stack([table.column(c).to_numpy() for c in ("p_blue", "p_green", "p_red")], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert table.column("label").to_pylist() == [["blue", "green", "red"][i] for i in probs.argmax(axis=1)]
    truth = [colours["labels"][u] for u in table.column("uri").to_pylist()]
    assert np.mean(np.array(truth) == np.array(table.column("label").to_pylist())) > 0.8


def test_cli_prints_the_table(colours, labels_csv, capsys):
    assert main(["probe", colours["output"], "--labels", str(labels_csv)]) == 0
    captured = capsys.readouterr()
    assert "precision  recall  support" in captured.out and "test accuracy" in captured.out
    assert "1 of 61 labelled uris are not ok rows" in captured.err


def test_bad_inputs_are_one_line_errors(
    colours, labels_csv, tmp_path, tmp_path_factory, conceptclip_model, prompts_file, capsys
):
    def refused(args, message):
        assert main(["probe", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("featurize: error: ") and message in err[0], err

    no_label = tmp_path / "no_label.csv"
    no_label.write_text("uri,class\na,b\n")
    refused([colours["output"], "--labels", str(no_label)], "has no label column")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("uri,label\n/x.jpg,a\n/y.jpg,b\n")
    refused([colours["output"], "--labels", str(unknown)], "none of the 2 labelled uris")
    few = tmp_path / "few.csv"
    few.write_text(
        "uri,label\n"
        + "".join(f"{u},{'odd' if i < 2 else lab}\n" for i, (u, lab) in enumerate(colours["labels"].items()))
    )
    refused([colours["output"], "--labels", str(few)], "class 'odd' has 2 labelled ok row(s)")
    refused([colours["output"], "--labels", str(tmp_path / "absent.csv")], "does not exist")
    refused(
        [colours["output"], "--labels", str(labels_csv), "--predict", str(tmp_path / "p.json")],
        "write a .parquet or .csv file",
    )
    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    refused([slides["output"], "--labels", str(labels_csv)], "is a slides OUTPUT")


def test_missing_labels_are_left_out_and_counted_never_a_class(colours, tmp_path, capsys):
    """A Parquet label column of floats with NaN for "not labelled": those rows are left out and counted, never a
    class called "nan"; a negative seed is one line."""
    import pyarrow as pa

    uris = list(colours["labels"])
    classes = sorted(set(colours["labels"].values()))
    codes = [float(classes.index(colours["labels"][u])) for u in uris]
    codes[0] = codes[1] = float("nan")
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"uri": uris, "label": pa.array(codes, pa.float64())}), path)
    out = tmp_path / "model"
    assert main(["probe", colours["output"], "--labels", str(path), "--out", str(out)]) == 0
    assert "2 row(s) of" in capsys.readouterr().err
    probe = json.loads((out / "probe.json").read_text())
    assert "nan" not in [str(c) for c in probe["classes"]] and len(probe["classes"]) == len(classes)
    assert json.loads((out / "metrics.json").read_text())["labels_missing"] == 2
    assert main(["probe", colours["output"], "--labels", str(path), "--seed", "-1"]) == 2
    assert "--seed must be 0 or more" in capsys.readouterr().err
