"""Multi-crop (HD) features (`--crops hd:N`, `--merge 2x2`) against a plain loop of Phi-3-vision's recipe: PIL and the
transformers CLIP tower, no pipeline code in the reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.checkpoint import FeatureSpec, parse_features, with_views
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.decode import PreprocessSpec, decode_batch, hd_layout
from pipeline.errors import UserError
from pipeline.images_job import run_images
from pipeline.schema import ragged_list

QUIET = {"echo": lambda m: None}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Sizes of the test images: landscape, portrait, square, tiny (upscaled), and a strip of aspect 20
SIZES = {"landscape": (300, 130), "portrait": (90, 210), "square": (160, 160), "tiny": (9, 6), "strip": (400, 20)}


# -- the recipe, as a plain loop ------------------------------------------------------------------------------------
def recipe_views(path: Path, crops: int, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Phi-3-vision's image processing of one file: [global view, crops...] normalised [1 + h*w, 3, side, side], and
    the crop grid (h, w)."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    portrait = img.width < img.height
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    aspect = img.width / img.height
    scale = 1
    while scale * np.ceil(scale / aspect) <= crops:
        scale += 1
    scale -= 1
    new_w = int(scale * side)
    new_h = int(new_w / aspect)
    img = img.resize((new_w, new_h), Image.BILINEAR)  # what torchvision's resize does with a PIL image
    target = int(np.ceil(new_h / side) * side)
    top = int((target - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    h, w = x.shape[1] // side, x.shape[2] // side
    whole = torch.nn.functional.interpolate(x[None], size=(side, side), mode="bicubic")
    tiles = x.reshape(3, h, side, w, side).permute(1, 3, 0, 2, 4).reshape(h * w, 3, side, side)
    return torch.cat([whole, tiles]), (h, w)


def recipe_merge(tokens: torch.Tensor) -> torch.Tensor:
    """[V, G*G, D] -> [V, G*G/4, 4D], Phi-3-vision's 2x2 merge of a crop's patch grid."""
    v, length, d = tokens.shape
    g = int(length**0.5)
    return tokens.reshape(v, g // 2, 2, g // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(v, -1, 4 * d)


def recipe_features(tower, path: Path, crops: int, pool: str, merge: bool) -> tuple[np.ndarray, tuple[int, int]]:
    views, grid = recipe_views(path, crops, tower.config.image_size)
    with torch.no_grad():
        h = tower(pixel_values=views, output_hidden_states=True).hidden_states[-2].float()
    tokens = h[:, 1:] if pool == "patch" else h
    return (recipe_merge(tokens) if merge else tokens).numpy(), grid


# -- fixtures and helpers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hd_images(tmp_path_factory) -> Path:
    """Photo-like images of several aspect ratios, JPEG and PNG."""
    from pipeline.demo import make_photo

    folder = tmp_path_factory.mktemp("hd-images")
    rng = np.random.default_rng(7)
    for name, (w, h) in SIZES.items():
        photo = make_photo(rng, max(w, 60), max(h, 60)).resize((w, h), Image.BICUBIC)
        photo.save(folder / f"{name}.{'jpg' if name in ('landscape', 'square') else 'png'}")
    return folder


def rows(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(s) for s in sorted(output.glob("part-*.parquet"))])


def hd_run(images: Path, model: Path, out: Path, **options) -> tuple[dict, dict[str, dict]]:
    record = run_images(
        RunConfig(input=str(images), output=str(out), model=str(model), dtype="float32", **options), **QUIET
    )
    return record, {Path(r["uri"]).stem: r for r in rows(out).to_pylist()}


def cosines(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per view (first axis): the cosine of its tokens, flattened."""
    ours, ref = ours.reshape(len(ours), -1), ref.reshape(len(ref), -1)
    return (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)


def assert_rows_follow_the_recipe(found: dict[str, dict], tower, crops: int, pool: str, merge: bool, images: Path):
    for path in sorted(images.iterdir()):
        row = found[path.stem]
        want, grid = recipe_features(tower, path, crops, pool, merge)
        assert row["status"] == "ok", row["error"]
        assert tuple(row["crop_grid"]) == grid and 1 <= grid[0] * grid[1] <= crops
        assert row["feature_shape"] == list(want.shape)
        ours = np.asarray(row["image_features"], np.float32).reshape(row["feature_shape"])
        assert cosines(ours, want).min() >= 0.9999, (path.name, cosines(ours, want))


# -- end to end -----------------------------------------------------------------------------------------------------
def test_multi_crop_patch_tokens_merged_follow_the_recipe(ray_session, clip_model, hd_images, tmp_path):
    """Every crop and the global view of landscape, portrait, square, tiny and strip images, with the 2x2 merge: the
    grid and each view's tokens as the recipe's loop gives them; an image too elongated for the grid is an error row."""
    from transformers import CLIPVisionModel

    (tmp_path / "in").mkdir()
    for path in hd_images.iterdir():
        (tmp_path / "in" / path.name).write_bytes(path.read_bytes())
    Image.new("RGB", (2000, 1), "gray").save(tmp_path / "in" / "line.png")  # its short side would be 0 px
    record, found = hd_run(
        tmp_path / "in",
        clip_model,
        tmp_path / "out",
        features="hidden:-2:patch",
        crops="hd:6",
        merge="2x2",
        rows_per_shard=3,
    )
    tower = CLIPVisionModel.from_pretrained(clip_model).eval()
    assert_rows_follow_the_recipe(found, tower, 6, "patch", True, hd_images)
    assert {k: found[k]["crop_grid"] for k in ("landscape", "portrait", "square", "strip")} == {
        "landscape": [2, 3],
        "portrait": [3, 2],
        "square": [2, 2],
        "strip": [1, 6],
    }
    assert found["square"]["feature_shape"] == [5, 4, 128]  # 4x4 patches of width 32 -> 2x2 tokens of width 128
    line = found["line"]
    assert line["status"] == "error" and "too elongated for --crops hd:6" in line["error"]
    assert line["image_features"] is None and line["crop_grid"] is None and line["feature_shape"] is None
    assert record["counts"]["error_classes"] == {"unsupported": 1}
    assert (record["crops"], record["merge"], record["view_feature_shape"]) == ("hd:6", "2x2", [4, 128])
    identity = json.loads((tmp_path / "out" / "_dataset.json").read_text())["identity"]
    assert (identity["crops"], identity["merge"], identity["features"]) == ("hd:6", "2x2", "hidden:-2:patch")
    meta = json.loads(pq.read_metadata(sorted((tmp_path / "out").glob("part-*"))[0]).metadata[b"pipeline.provenance"])
    assert meta["crops"] == "hd:6" and "feature_shape" not in meta

    # Other numbers in the same OUTPUT need --new-version, like any change of what the features are.
    with pytest.raises(UserError, match="new-version"):
        run_images(
            RunConfig(
                input=str(tmp_path / "in"),
                output=str(tmp_path / "out"),
                model=str(clip_model),
                dtype="float32",
                features="hidden:-2:patch",
                crops="hd:4",
                dry_run=True,
            ),
            **QUIET,
        )


def test_multi_crop_with_the_class_token_follows_the_recipe(ray_session, clip_model, hd_images, tmp_path):
    from transformers import CLIPVisionModel

    _, found = hd_run(hd_images, clip_model, tmp_path / "out", features="hidden:-2:cls_patch", crops="hd:4")
    tower = CLIPVisionModel.from_pretrained(clip_model).eval()
    assert_rows_follow_the_recipe(found, tower, 4, "cls_patch", False, hd_images)
    assert found["square"]["feature_shape"] == [5, 17, 32]  # 1 + 2x2 views of the class token and 4x4 patches


def test_merge_of_a_plain_view(clip_model):
    """--merge 2x2 without crops: the processor's one view, its patch grid merged (as Phi-3-vision orders it)."""
    from transformers import CLIPVisionModel

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.models import Encoder

    spec = resolve_model(str(clip_model), dtype="float32", device="cpu")
    encoder = Encoder(spec, preprocess_spec(spec))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    features = with_views(parse_features("hidden:-1:patch"), "", "2x2")
    ours = encoder.encode_hidden(pixels, features)
    with torch.inference_mode():  # (the encoder's pixel buffer is an inference tensor)
        tower = CLIPVisionModel.from_pretrained(clip_model).eval()
        h = tower(pixel_values=encoder.pixel_values(pixels), output_hidden_states=True).hidden_states[-1][:, 1:]
    want = recipe_merge(h.float()).numpy()
    assert want.shape == (3, 4, 128) and ours.shape == (3, 4 * 128)
    np.testing.assert_allclose(ours, want.reshape(3, -1), rtol=1e-5, atol=1e-5)
    # Each merged token is its 2x2 block end to end: top-left, top-right, bottom-left, bottom-right.
    grid = h.float().numpy().reshape(3, 4, 4, 32)
    np.testing.assert_allclose(
        want[:, 1], np.concatenate([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], 1)
    )


# -- the CPU stage and the shard ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, crops, layout",
    [  # the recipe's own arithmetic at 336 px: (resized width, height, padded height, transposed)
        ((1000, 750), 16, (1344, 1008, 1008, False)),  # 4:3 -> 3 x 4 crops
        ((750, 1000), 16, (1344, 1008, 1008, True)),  # portrait: the same, transposed
        ((500, 500), 16, (1344, 1344, 1344, False)),  # square -> 4 x 4
        ((2000, 500), 16, (2688, 672, 672, False)),  # 4:1 -> 2 x 8
        ((640, 480), 4, (672, 504, 672, False)),  # padded 84 px top and bottom
        ((1920, 1080), 16, (1680, 945, 1008, False)),  # 16:9 -> 3 x 5
    ],
)
def test_hd_layout_is_the_recipes_arithmetic(size, crops, layout):
    assert hd_layout(*size, crops, 336) == layout
    new_w, _, padded_h, _ = layout
    assert (padded_h // 336) * (new_w // 336) <= crops


def test_decode_batch_cuts_the_padded_image_into_a_fixed_block(hd_images):
    spec = PreprocessSpec("squash", 64, 64, mean=CLIP_MEAN, std=CLIP_STD, crops=6)
    uris = [str(hd_images / "portrait.png"), str(hd_images / "nope.png")]
    out = decode_batch({"uri": np.array(uris, dtype=object)}, spec, 10**8)
    assert out["pixels"].shape == (2, 6, 64, 64, 3) and spec.out_shape == (6, 64, 64, 3)
    assert out["crop_grid"].tolist() == [[3, 2], [0, 0]] and list(out["status"]) == ["ok", "error"]
    views, _ = recipe_views(hd_images / "portrait.png", 6, 64)
    normalised = (out["pixels"][0].astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(normalised.transpose(0, 3, 1, 2), views[1:].numpy(), atol=1e-5)  # all 6 crops
    # 90x210, transposed: 210x90 resized to 192 x int(192 / (210 / 90)) = 82, padded 23 px on top and 23 below, so
    # transposed back the crops of the left column start with 23 white columns and those of the right end with them
    pixels = out["pixels"][0]
    assert (pixels[0::2, :, :23] == 255).all() and (pixels[1::2, :, -23:] == 255).all()
    assert (pixels[0::2, :, 23] != 255).any() and (pixels[1::2, :, -24] != 255).any()


def test_ragged_rows_keep_their_own_length_and_are_never_read_as_a_matrix():
    from pipeline.rescore import logits_matrix

    values = np.arange(12, dtype=np.float16).reshape(3, 4)
    column = ragged_list(values, np.array([2, 4, 3]), np.array([True, False, True]))
    assert column.to_pylist() == [[0, 1], None, [8, 9, 10]]
    square = np.zeros((4, 4), np.float16)
    rows = ragged_list(square, np.array([2, 4, 2, 4]), np.ones(4, bool))  # 12 values: a [4, 3] reshape would pass
    with pytest.raises(UserError, match="the rows hold 2 to 4 values each"):
        logits_matrix(rows)  # what probe, labels and report read features and logits with


def test_shards_and_batches_are_sized_for_every_crop_of_the_recipes_tower(tmp_path):
    """CLIP ViT-L/14-336 at hd:16 (17 views of 576 x 1024 tokens, 10 M values a row): no shard's list column passes
    2^31 values, and a default model batch stays within about 1 GiB of the actor's memory."""
    from transformers import CLIPVisionConfig

    from pipeline.cluster import MODEL_BATCH_BYTES, actor_layout
    from pipeline.job import model_rows_per_shard, resolve_job

    folder = tmp_path / "vit-l-336"
    CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16
    ).save_pretrained(folder)
    cfg = RunConfig(input="/in", output="/out", model=str(folder), features="hidden:-2:patch", crops="hd:16")
    model = resolve_job(cfg)
    assert model.feature_shape == (17, 576, 1024) and model.crop_px == 336
    rows = model_rows_per_shard(cfg, model)
    assert 1 <= rows and rows * 17 * 576 * 1024 < 2**31
    pixels = PreprocessSpec("squash", 336, 336, crops=16)
    layout = actor_layout(cfg, {"cpus": 16, "gpus": 1}, row_bytes=model.batch_row_bytes(pixels))
    assert layout.batch_size == MODEL_BATCH_BYTES // (16 * 336 * 336 * 3 + 10 * 17 * 576 * 1024) == 10
    assert actor_layout(cfg.model_copy(update={"batch_size": 64}), {"cpus": 16, "gpus": 1}).batch_size == 64


# -- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "features, crops, merge, message",
    [
        ("embedding", "hd:4", "", "--crops hd:4 stores the image tower's tokens of every crop: it needs --features"),
        ("hidden:-2:mean", "hd:4", "", "not hidden:-2:mean"),
        ("hidden:-2:patch", "hd", "", "use 'hd:N' with N the most crops per image"),
        ("hidden:-2:patch", "hd:0", "", "1..64"),
        ("hidden:-2:patch", "tiles:4", "", "use 'hd:N'"),
        ("hidden:-2:patch", "", "3x3", "--merge '3x3': use '2x2'"),
        ("hidden:-2:cls_patch", "hd:4", "2x2", "the class token has no neighbours to merge with"),
        ("embedding", "", "2x2", "it needs --features hidden:LAYER:patch"),
    ],
)
def test_bad_crops_and_merge_are_refused_in_one_line(features, crops, merge, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        with_views(parse_features(features), crops, merge)
    assert "\n" not in str(info.value)


def test_crops_refused_for_towers_the_recipe_is_not_for(
    siglip_model, conceptclip_model, clip_model, prompts_file, photo_dir, tmp_path, capsys
):
    """SigLIP and ConceptCLIP towers (no class token), an odd patch grid for the merge, prompts, and slides: each a
    one-line error, exit status 2, nothing written."""
    from pipeline.tiny import build_tiny_clip

    odd = build_tiny_clip(tmp_path / "odd", image_size=48)  # 3x3 patches
    common = ["images", str(photo_dir), str(tmp_path / "refused"), "--features", "hidden:-2:patch"]
    assert main([*common, "--model", str(siglip_model), "--crops", "hd:4"]) == 2
    assert main([*common, "--model", str(conceptclip_model), "--trust-remote-code", "--crops", "hd:4"]) == 2
    assert main([*common, "--model", str(odd), "--merge", "2x2"]) == 2
    assert main([*common, "--model", str(clip_model), "--crops", "hd:4", "--prompts", str(prompts_file)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("featurize: error:")]
    assert len(err) == 4
    assert "(SigLIP) has no class token" in err[0] and "use a CLIP checkpoint" in err[0]
    assert "(ConceptCLIP interface (remote code)) has no class token" in err[1]
    assert "patch grid is 3x3, odd" in err[2]
    assert "cannot go with --features hidden:-2:patch" in err[3]
    with pytest.raises(SystemExit) as info:
        main(["slides", str(photo_dir), str(tmp_path / "refused"), "--model", str(clip_model), "--crops", "hd:4"])
    assert info.value.code == 2 and "--crops" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_views_per_input():
    assert FeatureSpec().views == 1 and with_views(parse_features("hidden:-2:patch"), "hd:16", "").views == 17
