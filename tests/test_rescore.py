"""`featurize rescore`: new logits from stored float16 features, text tower only.

Also the OUTPUTs the analysis tests share (test_labels, test_probe, test_report import them): two real
`run_images` runs over generated colour images (once per session), and a slides OUTPUT built with the driver's own
table builders over real synthetic slides (no Ray).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_features
from pipeline.cli import main
from pipeline.rescore import ScoredOutput, float16_logit_bound

NEW_PROMPTS_YAML = """\
concepts: [red things, {name: sky, prompts: ["a blue sky", "the sky"]}, grass, glass]
templates: ["a photo of {}", "{}"]
"""
CLASSES = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
PER_CLASS = 20
_CACHE: dict = {}


# -- shared OUTPUTs -------------------------------------------------------------------------------------------------
def colour_images(folder: Path) -> dict[str, str]:
    """PER_CLASS noisy JPEGs per colour class (sizes vary), plus two broken files; returns uri -> class."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    labels = {}
    for name, rgb in CLASSES.items():
        for i in range(PER_CLASS):
            w, h = int(rng.integers(48, 120)), int(rng.integers(48, 120))
            base = np.array(rgb, np.float32) + rng.normal(0, 25, 3)  # the class colour, shifted per image
            pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{name}_{i:02d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            labels[str(path)] = name
    (folder / "broken_1.jpg").write_bytes(b"not a jpeg at all")
    (folder / "broken_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return labels


def colour_outputs(tmp_path_factory, conceptclip_model, prompts_file) -> dict:
    """Once per session: the colour images featurised with the conftest prompts (`output`) and with
    NEW_PROMPTS_YAML (`fresh`), by two real runs of the tiny ConceptCLIP-style model. Needs ray_session."""
    if "colours" not in _CACHE:
        from pipeline.config import RunConfig
        from pipeline.images_job import run_images

        root = tmp_path_factory.mktemp("colours")
        labels = colour_images(root / "images")
        new_prompts = root / "new.yaml"
        new_prompts.write_text(NEW_PROMPTS_YAML, encoding="utf-8")
        outputs = {}
        for name, prompts in (("output", prompts_file), ("fresh", new_prompts)):
            cfg = RunConfig(
                input=str(root / "images"),
                output=str(root / name),
                model=str(conceptclip_model),
                prompts=str(prompts),
                trust_remote_code=True,
                dtype="float32",
                rows_per_shard=25,
                batch_size=16,
            )
            run_images(cfg, echo=lambda m: None)
            outputs[name] = str(root / name)
        _CACHE["colours"] = {
            **outputs,
            "labels": labels,
            "new_prompts": str(new_prompts),
            "root": root,
            "images": root / "images",
        }
    return _CACHE["colours"]


def slides_output(tmp_path_factory, conceptclip_model, prompts_file) -> dict:
    """Once per session: a slides OUTPUT (two real slides, one with a failed tile, one unreadable slide) with
    random unit features of the tiny model's width, made by the driver's table builders."""
    if "slides" not in _CACHE:
        from slide_fixtures import draw_slide, grid_plan, with_plan, write_slide

        from pipeline.prompts import load_prompts
        from pipeline.schema import SLIDE_SCHEMA, prompts_table
        from pipeline.slides_job import tile_table_builder
        from pipeline.write import OutputDir

        root = tmp_path_factory.mktemp("slides")
        rng = np.random.default_rng(3)
        run_id = "20260101T000000Z-abcdef"
        out = OutputDir(str(root / "out"))
        slides = {"wide": (1024, 512), "tall": (512, 768)}
        plan_parts, rows = [], []
        for slide_id, (width, height) in slides.items():
            path = write_slide(
                root / f"{slide_id}.tif",
                draw_slide(width, height, shapes=[("rect", 64, 64, width - 64, height - 64)]),
                0.25,
                levels=2,
            )
            fp = 128
            plan_parts.append(grid_plan(slide_id, str(path), width, height, fp))
            n = plan_parts[-1].num_rows
            rows.append(
                {
                    "slide_id": slide_id,
                    "uri": str(path),
                    "status": "ok",
                    "reader": "tiffslide",
                    "slide_mpp": 0.25,
                    "mpp_source": "tiff.XResolution",
                    "width": width,
                    "height": height,
                    "n_tiles": n,
                    "n_tile_errors": 0,
                    "footprint_px": fp,
                    "step_px": fp,
                    "tile_px": 64,
                    "top_k": 4,
                    "run_id": run_id,
                    "dataset_version": 1,
                }
            )
        rows[0].update(status="error", n_tile_errors=1, error="1 of 32 tiles could not be scored (first: boom)")
        rows.append(
            {
                "slide_id": "broken",
                "uri": str(root / "broken.svs"),
                "status": "error",
                "error": "cannot open slide <b>broken</b>",
                "n_tiles": 0,
                "run_id": run_id,
                "dataset_version": 1,
            }
        )
        plan = pa.concat_tables(plan_parts)
        n = plan.num_rows
        features = rng.normal(size=(n, 32)).astype(np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        status = np.array(["ok"] * n, dtype=object)
        error = np.array([None] * n, dtype=object)
        status[3], error[3] = "error", "boom"
        cols = {
            "row": np.arange(n),
            "status": status,
            "error": error,
            "image_features": features.astype(np.float16),
            "concept_logits": rng.normal(size=(n, 4)).astype(np.float32),
        }
        from pipeline.summary import slide_scores

        uris = np.array(plan.column("uri").to_pylist())
        for row in rows[:2]:
            mine = cols["concept_logits"][(uris == row["uri"]) & (status == "ok")]
            maxima, topk = slide_scores(mine, row["top_k"])
            row.update(concept_max=maxima.tolist(), concept_topk_mean=topk.tolist())
        out.write_table(tile_table_builder(64, run_id, 1, False)(with_plan(cols, plan)), "part-00000.parquet")
        out.write_table(pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA), "_slides.parquet")
        prompt_set = load_prompts(str(prompts_file))
        from pipeline.checkpoint import preprocess_spec, resolve_model
        from pipeline.models import Encoder

        spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32")
        encoder = Encoder(spec, preprocess_spec(spec))
        text = encoder.encode_prompts(prompt_set)
        out.write_table(
            prompts_table(prompt_set, text, {"logit_scale": encoder.logit_scale, "logit_bias": encoder.logit_bias}),
            "_prompts.parquet",
        )
        identity = {
            **spec.identity(),
            "prompt_set_hash": prompt_set.set_hash,
            "tiling": {"mpp": 0.5, "tile_px": 64},
            "concept_maps": False,
        }
        out.write_json({"identity": identity, "version": 1}, "_dataset.json")
        record = {
            "run_id": run_id,
            "command": "slides",
            "state": "complete",
            "counts": {
                "listed": 3,
                "planned": 3,
                "tiles": n,
                "processed": n,
                "ok": n - 1,
                "error": 1,
                "slides_ok": 1,
                "slides_error": 2,
            },
            "tiles_per_s": 12.5,
            "wall_s": 9.0,
            "stages": {"listing_s": 0.1, "planning_s": 1.0, "stream_s": 6.0, "decode_s": 2.0, "model_s": 3.0},
        }
        out.write_json(record, "_run.json")
        out.write_json(record, "_runs", f"{run_id}.json")
        _CACHE["slides"] = {"output": str(root / "out"), "root": root, "features": features, "status": status}
    return _CACHE["slides"]


@pytest.fixture(scope="module")
def colours(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return colour_outputs(tmp_path_factory, conceptclip_model, prompts_file)


@pytest.fixture(scope="module")
def rescored(colours, tmp_path_factory):
    out2 = tmp_path_factory.mktemp("rescored") / "out2"
    assert (
        main(
            [
                "rescore",
                colours["output"],
                "--prompts",
                colours["new_prompts"],
                "--out",
                str(out2),
                "--trust-remote-code",
                "--rows-per-shard",
                "25",
                "--batch-size",
                "7",
            ]
        )
        == 0
    )
    return out2


def _table(folder) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(Path(folder).glob("part-*.parquet"))])


def _text_embeddings(model, prompts):
    """The new prompt set's embeddings, scale and bias, through the model's Encoder (not through rescore)."""
    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.models import Encoder
    from pipeline.prompts import load_prompts

    spec = resolve_model(str(model), trust_remote_code=True, dtype="float32")
    encoder = Encoder(spec, preprocess_spec(spec))
    return encoder.encode_prompts(load_prompts(prompts)), encoder.logit_scale, encoder.logit_bias


# -- tests ----------------------------------------------------------------------------------------------------------
def test_logits_are_the_model_formula_on_the_stored_float16_features(colours, rescored, conceptclip_model):
    source = read_features(colours["output"])
    table = _table(rescored)
    assert table.column_names == ["uri", "image_id", "status", "concept_logits", "run_id"]
    assert table.column("uri").to_pylist() == source.column("uri").to_pylist()  # read_features' rows, in order
    assert table.column("image_id").to_pylist() == source.column("image_id").to_pylist()
    assert len(list(Path(rescored).glob("part-*.parquet"))) == 3  # 62 rows, 25 a shard

    text, scale, bias = _text_embeddings(conceptclip_model, colours["new_prompts"])
    ok = np.array(source.column("status").to_pylist()) == "ok"
    assert ok.sum() == 60 and table.column("status").to_pylist() == source.column("status").to_pylist()
    features = np.array([f for f, good in zip(source.column("image_features").to_pylist(), ok) if good], np.float16)
    expected = scale * (features.astype(np.float32) @ text.T) + bias
    logits = np.array([v for v, good in zip(table.column("concept_logits").to_pylist(), ok) if good], np.float32)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    # Error rows stay errors, without logits.
    assert all(v is None for v, good in zip(table.column("concept_logits").to_pylist(), ok) if not good)

    prompts = pq.read_table(Path(rescored) / "_prompts.parquet")
    assert prompts.column("concept").to_pylist() == ["red things", "sky", "grass", "glass"]
    np.testing.assert_allclose(np.array(prompts.column("text_embedding").to_pylist()), text, atol=1e-6)
    record = json.loads((Path(rescored) / "_rescore.json").read_text())
    dataset = json.loads((Path(colours["output"]) / "_dataset.json").read_text())
    assert record["state"] == "complete" and record["source"]["output"] == colours["output"]
    new_hash = prompts.column("prompt_set_hash")[0].as_py()
    assert record["identity"] == {**dataset["identity"], "prompt_set_hash": new_hash}
    assert record["counts"] == {"rows": 62, "ok": 60, "error": 2}
    meta = json.loads(pq.read_schema(Path(rescored) / "part-00000.parquet").metadata[b"pipeline.provenance"])
    assert meta["rescore_of"] == colours["output"] and meta["prompt_set_hash"] == record["prompt_set_hash"]


def test_a_fresh_run_with_the_new_prompts_agrees_within_the_float16_bound(colours, rescored):
    """The run scores float32 features before storing them as float16; rescore scores the float16 ones. For a
    unit vector f, ||f16(f) - f|| <= 2^-11 + sqrt(D) * 2^-25, so |dlogit| <= scale * that (plus float32 noise)."""
    fresh = read_features(colours["fresh"])
    table = _table(rescored)
    assert fresh.column("uri").to_pylist() == table.column("uri").to_pylist()
    ok = np.array(fresh.column("status").to_pylist()) == "ok"
    a = np.array([v for v, good in zip(fresh.column("concept_logits").to_pylist(), ok) if good], np.float32)
    b = np.array([v for v, good in zip(table.column("concept_logits").to_pylist(), ok) if good], np.float32)
    record = json.loads((Path(rescored) / "_rescore.json").read_text())
    dim = len(fresh.column("image_features")[0].as_py())
    bound = float16_logit_bound(record["logit_scale"], dim)
    assert bound <= record["logit_scale"] * 2.0**-11 * np.sqrt(dim)  # tighter than the per-component bound
    worst = float(np.abs(a - b).max())
    assert 0 < worst <= bound + 1e-5, (worst, bound)
    fresh_prompts = pq.read_table(Path(colours["fresh"]) / "_prompts.parquet")
    ours = pq.read_table(Path(rescored) / "_prompts.parquet")
    assert fresh_prompts.column("prompt_set_hash").to_pylist() == ours.column("prompt_set_hash").to_pylist()


def test_rescoring_again_replaces_out2(colours, tmp_path):
    out2 = tmp_path / "again"
    args = [
        "rescore",
        colours["output"],
        "--prompts",
        colours["new_prompts"],
        "--out",
        str(out2),
        "--trust-remote-code",
    ]
    assert main([*args, "--rows-per-shard", "10"]) == 0
    assert len(list(out2.glob("part-*.parquet"))) == 7
    assert main(args) == 0  # one shard now; the six others are gone
    assert [p.name for p in out2.glob("part-*.parquet")] == ["part-00000.parquet"]
    dataset = json.loads((Path(colours["output"]) / "_dataset.json").read_text())
    assert ScoredOutput(str(out2)).identity["model"] == dataset["identity"]["model"]


def test_slides_output_gets_slide_scores_from_the_new_logits(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    from pipeline.heatmap import SlideOutput
    from pipeline.summary import slide_scores

    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    new_prompts = tmp_path / "new.yaml"
    new_prompts.write_text(NEW_PROMPTS_YAML, encoding="utf-8")
    out2 = tmp_path / "out2"
    assert (
        main(["rescore", slides["output"], "--prompts", str(new_prompts), "--out", str(out2), "--trust-remote-code"])
        == 0
    )
    table = _table(out2)
    assert table.column_names == ["slide_id", "uri", "x", "y", "level", "status", "concept_logits", "run_id"]
    text, scale, bias = _text_embeddings(conceptclip_model, str(new_prompts))
    expected = scale * (slides["features"].astype(np.float16).astype(np.float32) @ text.T) + bias
    ok = slides["status"] == "ok"
    got = table.column("concept_logits").to_pylist()
    np.testing.assert_allclose(np.array([g for g, good in zip(got, ok) if good]), expected[ok], atol=1e-5)
    assert got[3] is None and table.column("status")[3].as_py() == "error"

    summary = pq.read_table(out2 / "_slides.parquet").to_pylist()
    assert [s["slide_id"] for s in summary] == ["wide", "tall", "broken"]
    uris = np.array(table.column("uri").to_pylist())
    for row in summary[:2]:
        mine = expected[(uris == row["uri"]) & ok]
        maxima, topk = slide_scores(mine, 4)
        np.testing.assert_allclose(row["concept_max"], maxima, atol=1e-5)
        np.testing.assert_allclose(row["concept_topk_mean"], topk, atol=1e-5)
    assert summary[2]["concept_max"] is None and summary[0]["status"] == "error"  # statuses as the source had them
    # The heatmap reads OUT2 like a slides OUTPUT: new concepts, same tiles.
    result = SlideOutput(str(out2))
    assert result.concepts == ["red things", "sky", "grass", "glass"]
    assert result.tiles(result.slide("tall")).num_rows == int(((uris == summary[1]["uri"]) & ok).sum())
    # An OUTPUT written before `mpp` was renamed: OUT2's _slides.parquet has today's names and the same rows.
    from slide_fixtures import with_old_column_names

    old = with_old_column_names(slides["output"], tmp_path / "old")
    assert (
        main(
            [
                "rescore",
                str(old),
                "--prompts",
                str(new_prompts),
                "--out",
                str(tmp_path / "old-out2"),
                "--trust-remote-code",
            ]
        )
        == 0
    )
    again = pq.read_table(tmp_path / "old-out2" / "_slides.parquet")
    assert "slide_mpp" in again.column_names and "mpp" not in again.column_names
    assert again.to_pylist() == summary


def _fake_output(folder: Path, identity: dict) -> str:
    folder.mkdir()
    (folder / "_dataset.json").write_text(json.dumps({"identity": identity, "version": 1}))
    return str(folder)


def test_refusals_are_one_line(colours, tmp_path, capsys):
    new = colours["new_prompts"]
    dataset = json.loads((Path(colours["output"]) / "_dataset.json").read_text())["identity"]

    def refused(args, message):
        assert main(["rescore", *args, "--prompts", new, "--trust-remote-code"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("featurize: error: ") and message in err[0], err

    empty = tmp_path / "empty"
    empty.mkdir()
    refused([str(empty), "--out", str(tmp_path / "o1")], "no _dataset.json")
    refused([colours["output"], "--out", colours["output"] + "/"], "is OUTPUT itself")
    hidden = _fake_output(tmp_path / "hidden", {**dataset, "features": "hidden:-2:cls"})
    refused([hidden, "--out", str(tmp_path / "o2")], "hidden-state features")
    gone = _fake_output(tmp_path / "gone", {**dataset, "model": "/no/such/model"})
    refused([gone, "--out", str(tmp_path / "o3")], "cannot be loaded here")
    refused([colours["fresh"], "--out", colours["output"]], "holds another featurised output")
    # ConceptCLIP-style checkpoints run their own code: not without --trust-remote-code.
    assert main(["rescore", colours["output"], "--prompts", new, "--out", str(tmp_path / "o4")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_changed_weights_behind_the_model_path_are_refused(colours, tmp_path, capsys):
    from pipeline.tiny import build_tiny_conceptclip

    source = tmp_path / "source"
    shutil.copytree(colours["output"], source)
    other = build_tiny_conceptclip(tmp_path / "other", seed=1)
    dataset = json.loads((source / "_dataset.json").read_text())
    dataset["identity"]["model"] = str(other)
    (source / "_dataset.json").write_text(json.dumps(dataset))
    assert (
        main(
            [
                "rescore",
                str(source),
                "--prompts",
                colours["new_prompts"],
                "--out",
                str(tmp_path / "o"),
                "--trust-remote-code",
            ]
        )
        == 2
    )
    assert "weights changed since the run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rescore_on_object_storage(colours, rescored, s3_server, s3_bucket, capsys):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(colours["output"] + "/", f"{s3_bucket}/out/", recursive=True)
    out2 = f"s3://{s3_bucket}/out2"
    assert (
        main(
            [
                "rescore",
                f"s3://{s3_bucket}/out",
                "--prompts",
                colours["new_prompts"],
                "--out",
                out2,
                "--trust-remote-code",
                "--storage-options",
                json.dumps(options),
            ]
        )
        == 0
    )
    remote = pa.concat_tables(
        [
            pq.read_table(f"{s3_bucket}/out2/{p.rsplit('/', 1)[-1]}", filesystem=fs)
            for p in sorted(fs.ls(f"{s3_bucket}/out2"))
            if "part-" in p
        ]
    )
    local = _table(rescored)
    assert remote.column("concept_logits").to_pylist() == local.column("concept_logits").to_pylist()
    captured = capsys.readouterr()
    record = fs.cat_file(f"{s3_bucket}/out2/_rescore.json").decode()
    meta = pq.read_schema(fs.open(f"{s3_bucket}/out2/part-00000.parquet")).metadata[b"pipeline.provenance"].decode()
    for text in (captured.out, captured.err, record, meta):
        assert options["secret"] not in text and options["key"] not in text


def test_a_features_only_output_is_rescored_too(colours, rescored, tmp_path):
    """The common case: featurise once without prompts, score concepts later."""
    source = tmp_path / "features_only"
    shutil.copytree(colours["output"], source)
    for shard in source.glob("part-*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns(["concept_logits"]), shard)
    (source / "_prompts.parquet").unlink()
    shutil.rmtree(source / "_versions")  # a features-only run writes no prompt table
    dataset = json.loads((source / "_dataset.json").read_text())
    dataset["identity"]["prompt_set_hash"] = None
    (source / "_dataset.json").write_text(json.dumps(dataset))
    assert (
        main(
            [
                "rescore",
                str(source),
                "--prompts",
                colours["new_prompts"],
                "--out",
                str(tmp_path / "o"),
                "--trust-remote-code",
            ]
        )
        == 0
    )
    assert _table(tmp_path / "o").column("concept_logits").equals(_table(rescored).column("concept_logits"))
