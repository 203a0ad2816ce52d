"""Model adapters without Ray: recognition, remote-code consent, dtypes, secrets."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from pipeline.checkpoint import Secret, preprocess_spec, resolve_model
from pipeline.errors import UserError
from pipeline.models import Encoder
from pipeline.prompts import Concept, PromptSet

PROMPTS = PromptSet(
    (
        Concept("tumor", ("a histopathology image of tumor", "tumor tissue")),
        Concept("stroma", ("a histopathology image of stroma",)),
    )
)


def test_families_are_recognised_from_the_config(conceptclip_model, clip_model, siglip_model):
    assert resolve_model(str(clip_model)).family.name == "clip"
    assert resolve_model(str(siglip_model)).family.name == "siglip"
    assert resolve_model(str(conceptclip_model), trust_remote_code=True).family.name == "remote"
    with pytest.raises(UserError, match="--trust-remote-code"):
        resolve_model(str(conceptclip_model))


def test_unsupported_or_missing_models_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="neither a folder"):
        resolve_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_token_is_never_shown_but_survives_pickling(monkeypatch, conceptclip_model):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_value_123")
    spec = resolve_model(str(conceptclip_model), trust_remote_code=True)
    assert "hf_SECRET" not in repr(spec) and "hf_SECRET" not in str(spec.token)
    assert pickle.loads(pickle.dumps(spec)).token.get() == "hf_SECRET_value_123"  # what the actors receive
    assert "hf_SECRET" not in json.dumps(spec.identity())
    assert repr(Secret(None)) == "Secret(None)"


def test_bfloat16_on_cpu_stays_close_to_float32(conceptclip_model):
    spec32 = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    spec16 = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="bfloat16", device="cpu")
    pre = preprocess_spec(spec32)
    pixels = np.random.default_rng(0).integers(0, 256, (4, *pre.out_shape), dtype=np.uint8)
    f32, f16 = Encoder(spec32, pre), Encoder(spec16, pre)
    a, b = f32.encode_images(pixels), f16.encode_images(pixels)
    assert a.dtype == b.dtype == np.float32
    assert ((a * b).sum(1) > 0.98).all()
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("kind", ["conceptclip", "clip"])
def test_pixels_are_normalised_in_a_reused_buffer_batch_after_batch(kind, request):
    """pixel_values reuses one float buffer: each batch, smaller or larger than the last, is normalised exactly
    as the processor's formula says, and a batch's features do not depend on the batch before it. CLIP's mean and
    std differ per channel: a factor applied to the wrong channel fails here."""
    spec = resolve_model(
        str(request.getfixturevalue(f"{kind}_model")),
        trust_remote_code=kind == "conceptclip",
        dtype="float32",
        device="cpu",
    )
    pre = preprocess_spec(spec)
    assert kind == "conceptclip" or len(set(pre.mean)) == 3 and len(set(pre.std)) == 3
    encoder = Encoder(spec, pre)
    rng = np.random.default_rng(1)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    alone = {}
    for n in (5, 2, 7, 2):
        pixels = rng.integers(0, 256, (n, *pre.out_shape), dtype=np.uint8)
        expected = ((pixels.astype(np.float32) * np.float32(pre.rescale_factor) - mean) / std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(encoder.pixel_values(pixels).numpy(), expected, atol=1e-6)
        alone[n] = (pixels, encoder.encode_images(pixels))
    fresh = Encoder(spec, pre)
    for pixels, features in alone.values():
        np.testing.assert_array_equal(fresh.encode_images(pixels), features)


def test_a_batch_encoded_in_pieces_equals_the_batch_at_once(conceptclip_model):
    """On a GPU a batch goes through in pieces of `pipeline_rows` (copies overlapping the device's work): the rows
    come back in order and equal to encoding the batch at once, a short last piece included."""
    spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    pre = preprocess_spec(spec)
    encoder = Encoder(spec, pre)
    assert encoder.pipeline_rows == 0  # CPU: the whole batch at once
    pixels = np.random.default_rng(2).integers(0, 256, (7, *pre.out_shape), dtype=np.uint8)
    whole = encoder.encode_images(pixels)
    encoder.pipeline_rows = 3
    pieces = encoder.encode_images(pixels)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
    assert pieces.shape == whole.shape and not np.allclose(pieces[:3], pieces[3:6])  # distinct rows, in order
    per_row = np.concatenate([encoder.encode_images(pixels[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(pieces, per_row, rtol=1e-5, atol=1e-6)


def test_prompt_embeddings_are_ensembled_and_logits_follow_the_formula(conceptclip_model):
    spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    encoder = Encoder(spec, preprocess_spec(spec))
    text = encoder.encode_prompts(PROMPTS)
    assert text.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-6)
    assert encoder.logit_scale == pytest.approx(10.0, rel=1e-5) and encoder.logit_bias == pytest.approx(-5.0)
    feats = np.eye(text.shape[1], dtype=np.float32)[:3]
    np.testing.assert_allclose(encoder.logits(feats, text), 10.0 * feats @ text.T - 5.0, rtol=1e-6)


@pytest.mark.parametrize("fixture", ["conceptclip_model", "clip_model", "siglip_model"])
def test_preprocessing_read_from_saved_config_equals_the_loaded_processor(fixture, request, tmp_path):
    import shutil

    from pipeline.checkpoint import load_processor
    from pipeline.decode import spec_from_image_processor

    folder = request.getfixturevalue(fixture)
    spec = resolve_model(str(folder), trust_remote_code=True)
    loaded = spec_from_image_processor(load_processor(spec).image_processor)
    assert preprocess_spec(spec) == loaded
    # A saved configuration that leaves keys to its class's defaults is read through the processor instead.
    copy = shutil.copytree(folder, tmp_path / "copy")
    for name in ("preprocessor_config.json", "processor_config.json"):
        config = json.loads((copy / name).read_text())
        target = config.get("image_processor", config)
        target.pop("resample", None)
        (copy / name).write_text(json.dumps(config))
    assert preprocess_spec(resolve_model(str(copy), trust_remote_code=True)) == loaded


def test_saved_siglip_config_is_read_without_loading_the_processor(siglip_model, tmp_path):
    import shutil

    from pipeline.checkpoint import load_processor

    copy = shutil.copytree(siglip_model, tmp_path / "copy")
    for name in ("preprocessor_config.json", "processor_config.json"):  # SigLIP configs never name a crop
        config = json.loads((copy / name).read_text())
        config.get("image_processor", config).pop("do_center_crop", None)
        (copy / name).write_text(json.dumps(config))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (copy / name).unlink()  # the processor can no longer load: the saved config must be enough
    with pytest.raises(UserError, match="cannot load its processor"):
        load_processor(resolve_model(str(copy)))
    spec = preprocess_spec(resolve_model(str(copy)))
    assert (spec.mode, spec.height, spec.width, spec.mean) == ("squash", 64, 64, (0.5, 0.5, 0.5))


def test_hub_ids_resolve_through_the_hub_cache_and_unpinned_remote_code_warns(
    tmp_path, monkeypatch, caplog, conceptclip_model
):
    """A hub id is read through huggingface_hub's own cache (offline here); remote code at a branch warns."""
    import shutil

    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--conceptclip-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(conceptclip_model, repo / "snapshots" / commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        spec = resolve_model("acme/conceptclip-tiny", trust_remote_code=True)
    assert spec.family.name == "remote"
    assert "not a commit hash" in caplog.text and "--revision" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert resolve_model("acme/conceptclip-tiny", revision=commit, trust_remote_code=True).revision == commit
    assert "not a commit hash" not in caplog.text
    with pytest.raises(UserError, match="not in the local cache"):
        resolve_model("acme/missing-model", trust_remote_code=True)


def test_a_local_model_folder_is_one_model_however_it_is_named(conceptclip_model, monkeypatch):
    from pipeline.checkpoint import resolve_model

    monkeypatch.chdir(conceptclip_model.parent)
    relative = resolve_model(f"./{conceptclip_model.name}", trust_remote_code=True)
    absolute = resolve_model(str(conceptclip_model), trust_remote_code=True)
    assert relative.identity() == absolute.identity()
    assert relative.model == str(conceptclip_model.resolve())


# -- the real ConceptCLIP's packages (remote code imports) -------------------------------------------------------------
def remote_code_copy(conceptclip_model, tmp_path, imports: str):
    """The tiny ConceptCLIP-interface checkpoint with `imports` added to the top of its modeling file."""
    import shutil

    folder = tmp_path / "cclip"
    shutil.copytree(conceptclip_model, folder)
    modeling = folder / "modeling_conceptclip.py"
    modeling.write_text(imports + modeling.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def test_remote_code_needing_a_missing_package_stops_before_anything_runs(
    conceptclip_model, prompts_file, photo_dir, tmp_path, capsys
):
    """transformers refuses remote code whose imports are missing, on every actor, after the download: the driver's
    model check says so first, in one line naming the packages (by their pip names) and the extra, exit status 2."""
    from pipeline.cli import main

    imports = (
        "import math\nimport featurize_missing_pkg_a\nfrom open_clip import create_model\n"
        "try:\n    import featurize_optional_pkg\nexcept ImportError:\n    pass\n"
    )
    folder = remote_code_copy(conceptclip_model, tmp_path, imports)
    out = tmp_path / "out"
    code = main(["images", str(photo_dir), str(out), "--model", str(folder), "--trust-remote-code",
                 "--prompts", str(prompts_file)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "featurize_missing_pkg_a, open_clip_torch" in err and "pipeline-featurize[conceptclip]" in err
    assert "featurize_optional_pkg" not in err  # imports in a try block are optional, as transformers counts them
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_the_tiny_conceptclip_loads_with_the_extras_packages_imported(conceptclip_model, tmp_path):
    """Remote code importing what the conceptclip extra brings (ftfy, regex; timm needs the torchvision of the
    platform's torch, which this machine's CPU wheel has none of) passes the check and loads."""
    folder = remote_code_copy(conceptclip_model, tmp_path, "import ftfy\nimport regex\n")
    spec = resolve_model(str(folder), trust_remote_code=True, dtype="float32", device="cpu")
    encoder = Encoder(spec, preprocess_spec(spec))
    assert encoder.encode_prompts(PROMPTS).shape == (2, encoder.model.config.embed_dim)


def test_concept_embeddings_do_not_depend_on_the_padding_length(conceptclip_model):
    """OpenCLIP trained the text tower at a 77-token context; the model card's loop (and the pipeline) pads to the
    longest prompt. The tower rebuilds its mask from the pad tokens, so both give the same embeddings."""
    import torch

    spec = resolve_model(str(conceptclip_model), trust_remote_code=True, dtype="float32", device="cpu")
    encoder = Encoder(spec, preprocess_spec(spec))
    stored = encoder.encode_prompts(PROMPTS)
    prompts = PROMPTS.all_prompts
    full = encoder.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert full["input_ids"].shape[1] == 77
    with torch.inference_mode():
        pooled, _ = encoder.model.encode_text(full["input_ids"], normalize=True)
    from pipeline.prompts import ensemble

    at_77 = ensemble(pooled.float().numpy(), PROMPTS.counts)
    np.testing.assert_allclose(stored, at_77, atol=1e-5)


def test_the_test_only_switch_runs_cuda_actors_on_the_cpu_and_says_so(monkeypatch):
    """FEATURIZE_TEST_CUDA_AS_CPU=1 (fake-GPU cluster tests): an actor placed on a GPU runs the model on the CPU, and
    the note for the run record says so; without it nothing changes."""
    from pipeline.models import CUDA_AS_CPU_ENV, device_override, pick_device

    monkeypatch.delenv(CUDA_AS_CPU_ENV, raising=False)
    assert pick_device("cuda") == "cuda" and pick_device("cpu") == "cpu"
    assert device_override("cuda", "cuda:0") is None and device_override("cpu", "cpu") is None
    monkeypatch.setenv(CUDA_AS_CPU_ENV, "1")
    assert pick_device("cuda") == "cpu" and pick_device("cpu") == "cpu"
    assert device_override("cuda", "cpu") == (
        "placed on cuda, the model ran on cpu (FEATURIZE_TEST_CUDA_AS_CPU=1: a test-only switch)"
    )
