"""End to end through real Ray: parity with the documented model loop, one row per input, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import RunConfig
from pipeline.images_job import run_images
from pipeline.prompts import load_prompts


def read_output(output: Path):
    shards = sorted(output.glob("part-*.parquet"))
    assert shards, f"no shards in {output}"
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(s) for s in shards])


def reference_outputs(model_dir: Path, kind: str, image_paths: list[Path], prompts: list[str]):
    """The documented way: processor + model in one process, EXIF applied, .convert('RGB')."""
    from transformers import AutoModel, AutoProcessor

    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in image_paths]
    remote = kind == "remote"
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=remote)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=remote).eval()
    with torch.no_grad():
        if remote:
            inputs = processor(
                images=images, text=prompts, return_tensors="pt", padding=True, truncation=True, max_length=77
            )
            out = model(**inputs)
            feats, text = out["image_features"], out["text_features"]
            logits = out["logit_scale"] * feats @ text.T + out["logit_bias"]
            projected = model.encode_image(inputs["pixel_values"], normalize=False)[0]  # the whole-slide recipe's
        else:
            padding = "max_length" if kind == "siglip" else True
            inputs = processor(
                images=images,
                text=prompts,
                return_tensors="pt",
                padding=padding,
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
            )
            out = model(**inputs)
            feats = out.image_embeds
            logits = out.logits_per_image
            projected = model.get_image_features(pixel_values=inputs["pixel_values"])
            projected = getattr(projected, "pooler_output", projected)
    return feats.numpy(), logits.numpy(), projected.numpy()


@pytest.mark.parametrize("kind", ["remote", "clip", "siglip"])
def test_features_and_logits_equal_the_model_loop(kind, ray_session, request, photo_dir, prompts_file, tmp_path):
    model_dir = request.getfixturevalue(
        {"remote": "conceptclip_model", "clip": "clip_model", "siglip": "siglip_model"}[kind]
    )
    cfg = RunConfig(
        input=str(photo_dir),
        output=str(tmp_path / "out"),
        model=str(model_dir),
        prompts=str(prompts_file),
        trust_remote_code=kind == "remote",
        dtype="float32",
        rows_per_shard=10,
        batch_size=7,
    )
    record = run_images(cfg, echo=lambda m: None)
    table = read_output(tmp_path / "out")
    paths = sorted(photo_dir.glob("*.jpg"))
    assert record["counts"]["ok"] == len(paths) == table.num_rows
    assert table.column("uri").to_pylist() == [str(p) for p in paths]

    prompts = load_prompts(str(prompts_file)).all_prompts
    ref_feats, ref_logits, ref_projected = reference_outputs(model_dir, kind, paths, prompts)
    feats = np.array(table.column("image_features").to_pylist(), dtype=np.float32)
    logits = np.array(table.column("concept_logits").to_pylist(), dtype=np.float32)
    cos = (feats * ref_feats).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref_feats, axis=1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=0)
    assert table.column("width").to_pylist() == [Image.open(p).size[0] for p in paths]
    # The projected embedding before normalisation (ConceptCLIP's whole-slide recipe), within float16 rounding.
    norms = np.array(table.column("embedding_norm").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(norms, np.linalg.norm(ref_projected, axis=1), rtol=1e-5)
    restored = feats * norms[:, None]
    np.testing.assert_allclose(restored, ref_projected, rtol=0, atol=2.0**-11 * np.abs(ref_projected).max() + 1e-6)

    # The prompt table holds the ensembled float32 text embeddings, in concept order.
    prompt_table = pq.read_table(tmp_path / "out" / "_prompts.parquet")
    assert prompt_table.column("concept").to_pylist() == ["tumor", "stroma", "lymphocytes", "necrosis"]
    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["counts"]["listed"] == len(paths) and run["dtype"] == "float32"
    # Telemetry: where the time went, stage by stage.
    assert {"listing_s", "read_s", "decode_s", "model_s", "write_s", "stream_s", "startup_s"} <= set(run["stages"])
    assert run["stages"]["decode_s"] > 0 and run["stages"]["model_s"] > 0 and run["first_shard_s"] > 0
    assert run["first_shard_s"] <= run["wall_s"]  # both from the command's start
    # The model actor's start-up, step by step: the steps add up to its constructor, which began after the stream
    # opened and before the first result came back.
    start = run["stages"]["actor_start"]
    steps = ["torch_import_s", "transformers_import_s", "model_load_s", "prompts_s", "warmup_s"]
    assert all(start[k] >= 0 for k in steps) and start["model_load_s"] > 0
    assert sum(start[k] for k in steps) == pytest.approx(start["constructor_s"], abs=0.01)
    assert start["device"] == "cpu" and start["pid"] > 0
    assert 0 <= start["constructor_began_after_stream_s"]
    assert start["constructor_began_after_stream_s"] + start["constructor_s"] <= run["stages"]["startup_s"] + 0.05


def test_same_input_gives_identical_features_whatever_the_batching(
    ray_session, conceptclip_model, photo_dir, prompts_file, tmp_path
):
    outputs = []
    for i, (batch_size, actors, decode_batch) in enumerate([(1, 1, 1), (16, 2, 5)]):
        cfg = RunConfig(
            input=str(photo_dir),
            output=str(tmp_path / f"out{i}"),
            model=str(conceptclip_model),
            prompts=str(prompts_file),
            trust_remote_code=True,
            batch_size=batch_size,
            num_actors=actors,
            decode_batch_size=decode_batch,
            rows_per_shard=5 + 7 * i,
        )
        run_images(cfg, echo=lambda m: None)
        outputs.append(read_output(tmp_path / f"out{i}"))
    a, b = outputs
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    fa = np.array(a.column("image_features").to_pylist(), np.float32)
    fb = np.array(b.column("image_features").to_pylist(), np.float32)
    # Different batch shapes change float summation order in the matmuls; fp16 storage absorbs it (at most 1 ulp).
    np.testing.assert_allclose(fa, fb, rtol=0, atol=2.0**-11)
    assert (fa == fb).mean() > 0.99
    np.testing.assert_allclose(
        np.array(a.column("concept_logits").to_pylist()),
        np.array(b.column("concept_logits").to_pylist()),
        rtol=0,
        atol=1e-4,
    )


def _mixed_folder(folder: Path) -> tuple[set[str], set[str]]:
    """Unusual-but-valid images and broken files side by side; returns (good names, broken names)."""
    import io

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    good = {
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "sixteen bit.png": lambda p: Image.fromarray((rng.integers(0, 65535, (50, 70))).astype(np.uint16)).save(p),
        "palette.png": lambda p: rgb.convert("P").save(p),
        "alpha.png": lambda p: rgb.convert("RGBA").save(p),
        "bilevel.tif": lambda p: rgb.convert("1").save(p),
        "photo.webp": lambda p: rgb.save(p, "WEBP"),
        "photo.bmp": lambda p: rgb.save(p),
        "anim.gif": lambda p: rgb.save(p, save_all=True, append_images=[rgb.rotate(90)]),
        "rotated.jpg": lambda p: rgb.save(p, exif=_exif(6)),
        "png named.jpg": lambda p: rgb.save(p, "PNG"),
        "ünïcödé 名前.jpg": lambda p: rgb.save(p),
    }
    for name, write in good.items():
        write(folder / name)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    broken = {
        "empty.jpg": b"",
        "truncated.jpg": buf.getvalue()[:200],
        "notes.png": b"not an image at all",
        "huge.png": _png_header(200_000, 200_000),
    }
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    return set(good), set(broken)


def _exif(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_header(width: int, height: int) -> bytes:
    """A real small PNG whose header claims width x height (a decompression bomb's signature)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_cli_run_with_broken_and_unusual_files(
    ray_session, conceptclip_model, prompts_file, tmp_path, capfd, monkeypatch
):
    from pipeline.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_TOKEN_must_not_leak_987")
    good, broken = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    code = main(
        [
            "images",
            str(tmp_path / "in"),
            str(out),
            "--model",
            str(conceptclip_model),
            "--prompts",
            str(prompts_file),
            "--trust-remote-code",
            "--rows-per-shard",
            "6",
            "--fail-on-error",
        ]
    )
    assert code == 1  # --fail-on-error: some inputs are error rows
    table = read_output(out)
    rows = {Path(r["uri"]).name: r for r in table.to_pylist()}
    assert set(rows) == good | broken and table.num_rows == len(good | broken)
    for name in good:
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
        assert len(rows[name]["image_features"]) == 32 and rows[name]["error"] is None
    for name in broken:
        assert rows[name]["status"] == "error" and rows[name]["error"], name
        assert rows[name]["image_features"] is None and rows[name]["concept_logits"] is None
    assert "decompression-bomb" in rows["huge.png"]["error"]
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (90, 120)
    run = json.loads((out / "_run.json").read_text())
    assert run["counts"]["ok"] == len(good) and run["counts"]["error"] == len(broken)

    captured = capfd.readouterr()
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_TOKEN_must_not_leak" not in path.read_bytes(), path
    assert "hf_TOKEN_must_not_leak" not in captured.out + captured.err
