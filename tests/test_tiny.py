"""The tiny model builders: real save_pretrained / from_pretrained round trips, offline."""

import math

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor, CLIPTokenizer

from pipeline.tiny import (
    build_conceptclip_sized,
    build_tiny_clip,
    build_tiny_conceptclip,
    build_tiny_siglip,
    conceptclip_sized_config,
)

SCALARS = ("logit_scale", "logit_bias", "concept_logit_scale", "concept_logit_bias")
PROMPTS = ["a photo of carcinoma", "necrosis", "histopathology slide showing lymphocytes and stroma"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def conceptclip_dir(tmp_path_factory):
    return build_tiny_conceptclip(tmp_path_factory.mktemp("models") / "conceptclip")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return build_tiny_siglip(tmp_path_factory.mktemp("models") / "siglip")


def images(n=2, shape=(100, 80)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for _ in range(n)]


def load_conceptclip(folder):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return model, processor


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------------- ConceptCLIP


def test_conceptclip_forward_interface(conceptclip_dir):
    model, processor = load_conceptclip(conceptclip_dir)
    assert model.config.model_type == "conceptclip"
    inputs = processor(
        images=images(2), text=PROMPTS, return_tensors="pt", padding=True, truncation=True, max_length=77
    )
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values"}
    with torch.no_grad():
        out = model(**inputs)

    assert isinstance(out, dict)
    assert set(out) == {"image_features", "text_features", "image_token_features", "text_token_features", *SCALARS}
    n_text, length = inputs["input_ids"].shape
    assert out["image_features"].shape == (2, 32)
    assert out["text_features"].shape == (n_text, 32)
    assert out["image_token_features"].shape == (2, 16, 32)  # (64 / 16) ** 2 patches
    assert out["text_token_features"].shape == (n_text, length, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(n_text))
    expected = {"logit_scale": 10.0, "logit_bias": -5.0, "concept_logit_scale": 10.0, "concept_logit_bias": -5.0}
    for name, value in expected.items():
        assert out[name].dim() == 0
        assert abs(out[name].item() - value) < 1e-5, name


def test_conceptclip_reload_keeps_saved_weights(conceptclip_dir):
    model = AutoModel.from_pretrained(conceptclip_dir, trust_remote_code=True)
    assert_same_weights(weights(conceptclip_dir), model.state_dict())


def test_conceptclip_encoders_match_forward(conceptclip_dir):
    model, processor = load_conceptclip(conceptclip_dir)
    inputs = processor(
        images=images(2), text=PROMPTS, return_tensors="pt", padding=True, truncation=True, max_length=77
    )
    with torch.no_grad():
        out = model(**inputs)
        pooled, tokens = model.encode_image(inputs["pixel_values"], normalize=True)
        raw, _ = model.encode_image(inputs["pixel_values"], normalize=False)
        text_pooled, text_tokens = model.encode_text(inputs["input_ids"], normalize=True)
        projected_tokens = model.image_proj(tokens)
        projected_text_tokens = model.text_proj(text_tokens)

    torch.testing.assert_close(pooled, out["image_features"])
    torch.testing.assert_close(projected_tokens, out["image_token_features"])
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), pooled)
    assert tokens.shape == (2, 16, model.config.vision_config.hidden_size)
    torch.testing.assert_close(text_pooled, out["text_features"])
    torch.testing.assert_close(projected_text_tokens, out["text_token_features"])
    assert text_tokens.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)


def test_conceptclip_text_ignores_padding(conceptclip_dir):
    model, processor = load_conceptclip(conceptclip_dir)
    alone = processor(text=["tumor"], return_tensors="pt", padding=True)["input_ids"]
    padded = processor(text=["tumor", "a much longer prompt about tissue"], return_tensors="pt", padding=True)
    assert padded["input_ids"].shape[1] > alone.shape[1]
    with torch.no_grad():
        a, _ = model.encode_text(alone)
        b, _ = model.encode_text(padded["input_ids"])
    torch.testing.assert_close(a[0], b[0])


def test_conceptclip_one_modality(conceptclip_dir):
    model, processor = load_conceptclip(conceptclip_dir)
    pixels = processor(images=images(1), return_tensors="pt")["pixel_values"]
    ids = processor(text=["stroma"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        image_only = model(pixel_values=pixels)
        text_only = model(input_ids=ids)
    assert set(image_only) == {"image_features", "image_token_features", *SCALARS}
    assert set(text_only) == {"text_features", "text_token_features", *SCALARS}


def test_conceptclip_processor(conceptclip_dir):
    processor = AutoProcessor.from_pretrained(conceptclip_dir, trust_remote_code=True)
    image = images(1, shape=(90, 50))[0]
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    # Squash resize (no crop), bicubic, rescale 1/255, mean = std = 0.5.
    resized = np.asarray(image.resize((64, 64), Image.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy((resized / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    torch.testing.assert_close(pixels, expected, atol=1e-4, rtol=0)

    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("Qwertyuiop carcinoma")["input_ids"]
    assert tokenizer.unk_token_id not in ids  # unknown words fall back to word pieces
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "[CLS]"
    long = processor(text=["tissue " * 200], return_tensors="pt", padding=True, truncation=True, max_length=77)
    assert long["input_ids"].shape == (1, 77)


def test_conceptclip_needs_trust_remote_code(conceptclip_dir, monkeypatch):
    for auto in (AutoConfig, AutoModel, AutoProcessor):
        with pytest.raises(ValueError, match="trust_remote_code"):
            auto.from_pretrained(conceptclip_dir, trust_remote_code=False)
    # Left unset, transformers asks on stdin (15 s by default); with the prompt disabled it refuses at once.
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(conceptclip_dir)


def test_conceptclip_requested_scalars(tmp_path):
    folder = build_tiny_conceptclip(
        tmp_path / "m", seed=3, logit_scale=20.0, logit_bias=-2.5, concept_logit_scale=150.0, concept_logit_bias=1.0
    )
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[2, 10, 3]]))
    assert abs(out["logit_scale"].item() - 20.0) < 1e-5
    assert abs(out["logit_bias"].item() + 2.5) < 1e-5
    assert out["concept_logit_scale"].item() == 100.0  # clamped like the real model
    assert abs(out["concept_logit_bias"].item() - 1.0) < 1e-5


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("build", [build_tiny_conceptclip, build_tiny_clip, build_tiny_siglip])
def test_same_seed_same_weights(build, tmp_path):
    a = weights(build(tmp_path / "a", seed=7))
    b = weights(build(tmp_path / "b", seed=7))
    c = weights(build(tmp_path / "c", seed=8))
    assert_same_weights(a, b)
    assert any(not torch.equal(a[key], c[key]) for key in a)


# ---------------------------------------------------------------------------------------------------- CLIP, SigLIP


def test_clip_reloads(clip_dir, tmp_path):
    model = AutoModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    assert type(model).__name__ == "CLIPModel"
    assert type(processor).__name__ == "CLIPProcessor"
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-4

    inputs = processor(images=images(2, shape=(100, 80)), text=PROMPTS, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)  # shortest edge 64, then centre crop
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, len(PROMPTS))
    assert torch.isfinite(out.logits_per_image).all()

    # The BPE files written beside tokenizer.json tokenise the same way.
    from_files = CLIPTokenizer(vocab=str(clip_dir / "vocab.json"), merges=str(clip_dir / "merges.txt"))
    assert from_files(PROMPTS)["input_ids"] == processor.tokenizer(PROMPTS)["input_ids"]

    scaled = AutoModel.from_pretrained(build_tiny_clip(tmp_path / "scaled", logit_scale=3.0))
    assert abs(scaled.logit_scale.item() - 3.0) < 1e-6


def test_siglip_reloads(siglip_dir):
    model = AutoModel.from_pretrained(siglip_dir).eval()
    processor = AutoProcessor.from_pretrained(siglip_dir)
    assert type(model).__name__ == "SiglipModel"
    assert type(processor).__name__ == "SiglipProcessor"
    assert abs(model.logit_scale.item() - 2.3) < 1e-6
    assert abs(model.logit_bias.item() + 3.0) < 1e-6
    assert model.config.text_config.max_position_embeddings == 16

    inputs = processor(images=images(2), text=PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    assert set(inputs) == {"input_ids", "pixel_values"}
    assert inputs["input_ids"].shape == (len(PROMPTS), 16)
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = model(**inputs)
    expected = math.exp(2.3) * out.image_embeds @ out.text_embeds.T - 3.0
    torch.testing.assert_close(out.logits_per_image, expected)


# -------------------------------------------------------------------------------------------------------- sizes


def test_so400m_config():
    vision = conceptclip_sized_config("so400m").vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 27, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4304, 14, 384)
    assert vision.vision_use_head
    assert conceptclip_sized_config("so400m").embed_dim == 1152
    with pytest.raises(ValueError):
        conceptclip_sized_config("huge")


def test_base_size_builds(tmp_path):
    config = conceptclip_sized_config("base")
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (768, 12)
    assert (config.vision_config.patch_size, config.vision_config.image_size, config.embed_dim) == (16, 224, 768)

    model, processor = load_conceptclip(build_conceptclip_sized(tmp_path / "base", "base"))
    assert 80e6 < sum(p.numel() for p in model.vision_model.parameters()) < 100e6
    pixels = processor(images=images(1), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out["image_features"].shape == (1, 768)
    assert out["image_token_features"].shape == (1, 196, 768)


def test_the_demo_ships_the_tiny_conceptclip_build_tiny_conceptclip_writes(conceptclip_dir, tmp_path):
    """`featurize demo` copies a shipped model instead of building one (no torch or transformers in its driver):
    the copy is file for file what build_tiny_conceptclip writes at seed 0 (weights equal, configs equal but for
    the writer's transformers version, remote code byte-identical), so the demo keeps ConceptCLIP's interface."""
    import json
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.demo import copy_demo_model; copy_demo_model(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    shipped = tmp_path / "demo-model"
    loaded = subprocess.run([sys.executable, "-c", code, str(shipped)], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in conceptclip_dir.iterdir())
    for path in conceptclip_dir.iterdir():
        copy = shipped / path.name
        if path.suffix == ".safetensors":
            built, ours = load_file(path), load_file(copy)
            assert built.keys() == ours.keys()
            for key in built:
                torch.testing.assert_close(ours[key], built[key], rtol=0, atol=0)
        elif path.suffix == ".json":
            strip = lambda d: {k: v for k, v in d.items() if k != "transformers_version"}  # noqa: E731
            assert strip(json.loads(copy.read_text())) == strip(json.loads(path.read_text())), path.name
        else:
            assert copy.read_bytes() == path.read_bytes(), path.name
    model = AutoModel.from_pretrained(shipped, trust_remote_code=True)
    assert model.config.model_type == "conceptclip"
