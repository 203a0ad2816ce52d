"""Features-only runs (no prompt set) and hidden-state features, against the model documents' own recipe:
`VisionModel(..., output_hidden_states=True).hidden_states[layer]`, the class token, the patch tokens `[:, 1:]` or
the whole sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.checkpoint import parse_features
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.images_job import run_images

QUIET = {"echo": lambda m: None}


def rows(output: Path):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(s) for s in sorted(output.glob("part-*.parquet"))])


def recipe_hidden(tower, processor, paths: list[Path], layer: int) -> np.ndarray:
    """The documented loop: processor, then the vision model's hidden_states[layer] [N, T, D]."""
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer].float().numpy()


def assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    ours, ref = ours.reshape(len(ours), -1), ref.reshape(len(ref), -1)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos.min()


def run(photo_dir, model, tmp_path, name, **options) -> tuple[np.ndarray, dict, dict]:
    out = tmp_path / name
    record = run_images(
        RunConfig(
            input=str(photo_dir), output=str(out), model=str(model), dtype="float32", rows_per_shard=50, **options
        ),
        **QUIET,
    )
    table = rows(out)
    assert table.num_rows == record["counts"]["ok"]
    meta = json.loads(pq.read_metadata(sorted(out.glob("part-*.parquet"))[0]).metadata[b"pipeline.provenance"])
    return np.array(table.column("image_features").to_pylist(), np.float32), record, meta


@pytest.fixture(scope="module")
def clip_vision(clip_model, tmp_path_factory) -> Path:
    """A CLIPVisionModel checkpoint (image tower only), saved from the tiny CLIP with its processor."""
    from transformers import AutoProcessor, CLIPVisionModel

    folder = tmp_path_factory.mktemp("clip-vision")
    CLIPVisionModel.from_pretrained(clip_model).save_pretrained(folder)
    AutoProcessor.from_pretrained(clip_model).image_processor.save_pretrained(folder)
    return folder


def test_hidden_states_of_clip_follow_the_recipe_for_every_pool(ray_session, clip_model, photo_dir, tmp_path):
    from transformers import AutoProcessor, CLIPVisionModel

    paths = sorted(photo_dir.glob("*.jpg"))
    tower = CLIPVisionModel.from_pretrained(clip_model).eval()
    ref = recipe_hidden(tower, AutoProcessor.from_pretrained(clip_model), paths, -2)  # [N, 1 + P, D]
    expected = {"cls": ref[:, 0], "mean": ref[:, 1:].mean(1), "patch": ref[:, 1:], "cls_patch": ref}
    for pool, want in expected.items():
        feats, record, meta = run(photo_dir, clip_model, tmp_path, pool, features=f"hidden:-2:{pool}")
        assert_parity(feats, want)
        assert record["features"] == meta["features"] == f"hidden:-2:{pool}"
        assert record["feature_shape"] == meta["feature_shape"] == list(want.shape[1:])
        assert feats.shape[1] == int(np.prod(want.shape[1:]))
        assert not (Path(tmp_path / pool) / "_prompts.parquet").exists()
        assert "concept_logits" not in rows(tmp_path / pool).column_names
    # Stored as the model returns them (not normalised), in float16.
    assert abs(np.linalg.norm(feats[0]) - np.linalg.norm(ref[0])) / np.linalg.norm(ref[0]) < 1e-2


def test_hidden_states_of_siglip_and_conceptclip_and_no_class_token(
    ray_session, siglip_model, conceptclip_model, photo_dir, tmp_path
):
    from transformers import AutoModel, AutoProcessor, SiglipVisionModel

    paths = sorted(photo_dir.glob("*.jpg"))
    tower = SiglipVisionModel.from_pretrained(siglip_model).eval()
    ref = recipe_hidden(tower, AutoProcessor.from_pretrained(siglip_model), paths, -1)
    feats, _, _ = run(photo_dir, siglip_model, tmp_path, "siglip", features="hidden:-1:mean")
    assert_parity(feats, ref.mean(1))

    remote = AutoModel.from_pretrained(conceptclip_model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(conceptclip_model, trust_remote_code=True)
    ref = recipe_hidden(remote.vision_model, processor.image_processor, paths, -2)
    feats, record, _ = run(
        photo_dir, conceptclip_model, tmp_path, "remote", features="hidden:-2:patch", trust_remote_code=True
    )
    assert_parity(feats, ref)
    assert record["feature_shape"] == list(ref.shape[1:])

    for model, remote_code in ((siglip_model, False), (conceptclip_model, True)):
        with pytest.raises(UserError, match="has no class token; use mean, patch or cls_patch"):
            run_images(
                RunConfig(
                    input=str(photo_dir),
                    output=str(tmp_path / "cls"),
                    model=str(model),
                    trust_remote_code=remote_code,
                    features="hidden:-2:cls",
                ),
                **QUIET,
            )


def test_features_only_runs_and_vision_only_checkpoints(
    ray_session, conceptclip_model, clip_vision, prompts_file, photo_dir, tmp_path, capsys
):
    scored, _, _ = run(
        photo_dir, conceptclip_model, tmp_path, "scored", prompts=str(prompts_file), trust_remote_code=True
    )
    plain, record, _ = run(photo_dir, conceptclip_model, tmp_path, "plain", trust_remote_code=True)
    np.testing.assert_array_equal(plain, scored)  # the same embedding, without the concept logits
    assert record["prompt_set_hash"] is None and record["features"] == "embedding"
    assert "concept_logits" not in rows(tmp_path / "plain").column_names
    assert not (tmp_path / "plain" / "_prompts.parquet").exists()

    from transformers import CLIPVisionModel

    feats, _, _ = run(photo_dir, clip_vision, tmp_path, "vision")
    ref = recipe_hidden(
        CLIPVisionModel.from_pretrained(clip_vision).eval(),
        __import__("transformers").AutoImageProcessor.from_pretrained(clip_vision),
        sorted(photo_dir.glob("*.jpg")),
        -1,
    )
    assert feats.shape[1] == ref.shape[2]  # the pooled output of an image tower, L2-normalised
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=2e-3)

    common = ["images", str(photo_dir), str(tmp_path / "refused"), "--prompts", str(prompts_file)]
    assert main([*common, "--model", str(clip_vision)]) == 2
    assert (
        main([*common, "--model", str(conceptclip_model), "--trust-remote-code", "--features", "hidden:-2:mean"]) == 2
    )
    assert (
        main([*common[:3], "--model", str(conceptclip_model), "--trust-remote-code", "--features", "hidden:99:mean"])
        == 2
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("featurize: error:")]
    assert len(err) == 3
    assert "image tower without a text tower" in err[0] and "drop --prompts" in err[0]
    assert "cannot go with --features hidden:-2:mean" in err[1]
    assert "LAYER must be in" in err[2]
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("text", ["hidden", "hidden:x:mean", "hidden:-2:max", "embeddings", "hidden:-2"])
def test_bad_features_option_names_itself(text):
    with pytest.raises(UserError, match="--features .*'embedding' or 'hidden:LAYER:POOL'"):
        parse_features(text)


def broken_copy(clip_model, tmp_path, name: str, change) -> Path:
    """The tiny CLIP with its weights changed by change(model), saved through save_pretrained like any checkpoint."""
    import shutil

    from transformers import CLIPModel

    folder = tmp_path / name
    shutil.copytree(clip_model, folder)
    model = CLIPModel.from_pretrained(folder)
    with torch.no_grad():
        change(model)
    model.save_pretrained(folder)
    return folder


def test_non_finite_features_become_error_rows_never_ok_rows(
    ray_session, clip_model, photo_dir, prompts_file, tmp_path
):
    """A model whose activations overflow float16 (hidden states scaled past 65504), or whose projection gives NaN,
    commits error rows of their own class with the cause and a hint, never `ok` rows of inf or NaN; the analysis
    commands then run on what is finite."""
    n = len(list(photo_dir.glob("*.jpg")))
    huge = broken_copy(clip_model, tmp_path, "huge", lambda m: m.vision_model.pre_layrnorm.weight.mul_(1e6))
    options = dict(input=str(photo_dir), dtype="float32")
    record = run_images(RunConfig(output=str(tmp_path / "huge-out"), model=str(huge), features="hidden:0:mean",
                                  **options), **QUIET)  # fmt: skip
    assert record["counts"]["ok"] == 0 and record["counts"]["error_classes"] == {"non_finite": n}
    table = rows(tmp_path / "huge-out")
    assert set(table.column("status").to_pylist()) == {"error"} and table.column("image_features").null_count == n
    assert "--dtype float32" in table.column("error")[0].as_py() and "pooled" in table.column("error")[0].as_py()

    nan = broken_copy(clip_model, tmp_path, "nan", lambda m: m.visual_projection.weight.fill_(float("nan")))
    record = run_images(RunConfig(output=str(tmp_path / "nan-out"), model=str(nan), prompts=str(prompts_file),
                                  **options), **QUIET)  # fmt: skip
    assert record["counts"]["ok"] == 0 and record["counts"]["error_classes"] == {"non_finite": n}
    assert rows(tmp_path / "nan-out").column("concept_logits").null_count == n  # no NaN logits either
    assert main(["report", str(tmp_path / "nan-out"), "--out", str(tmp_path / "r.html")]) == 0
