"""Real OUTPUTs for the index, search and dedup tests, made once per session by real `featurize images` and `slides`
runs with the tiny models: photos with planted near-duplicates, a broken file, and one small slide."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cli import main

_CACHE: dict = {}
PHOTOS = 14


def planted_photos(folder: Path) -> dict[str, str]:
    """PHOTOS generated photos, plus near-duplicates of the first three (a byte-identical copy, a JPEG re-encode, a
    slight colour shift) and one broken file; returns copy -> original."""
    from PIL import Image

    from pipeline.demo import make_images

    paths = make_images(folder, PHOTOS, seed=5, sizes=((96, 72), (200, 150)))
    shutil.copyfile(paths[0], folder / "dup_copy.jpg")
    with Image.open(paths[1]) as img:
        img.save(folder / "dup_reencode.jpg", quality=95)
    with Image.open(paths[2]) as img:
        shifted = np.clip(np.asarray(img.convert("RGB"), np.int16) + [3, -2, 2], 0, 255).astype(np.uint8)
        Image.fromarray(shifted).save(folder / "dup_shift.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return {
        str(folder / "dup_copy.jpg"): str(paths[0]),
        str(folder / "dup_reencode.jpg"): str(paths[1]),
        str(folder / "dup_shift.png"): str(paths[2]),
    }


def featurize(*args) -> int:
    return main([str(a) for a in args])


def images_output(root: Path, model: Path, prompts: Path | None, name: str = "out", *extra) -> str:
    """A real `featurize images` run over root/photos (made once) into root/name."""
    photos = root / "photos"
    if not photos.exists():
        planted_photos(photos)
    output = root / name
    options = ["--prompts", prompts] if prompts else []
    code = featurize(
        "images", photos, output, "--model", model, "--trust-remote-code", "--dtype", "float32",
        "--rows-per-shard", 6, "--batch-size", 8, *options, *extra,
    )  # fmt: skip
    assert code == 0
    return str(output)


def photos_output(tmp_path_factory, conceptclip_model, prompts_file) -> dict:
    """Once per session: the planted photos featurised with the tiny ConceptCLIP-style model and the conftest
    prompts (several shards). Needs ray_session."""
    if "photos" not in _CACHE:
        root = tmp_path_factory.mktemp("search-photos")
        output = images_output(root, conceptclip_model, prompts_file)
        _CACHE["photos"] = {"output": output, "photos": root / "photos", "root": root}
    return _CACHE["photos"]


def errors_only_output(tmp_path_factory, conceptclip_model) -> str:
    """Once per session: an OUTPUT whose every input was broken: shards of error rows only, no features."""
    if "errors" not in _CACHE:
        root = tmp_path_factory.mktemp("search-errors")
        (root / "in").mkdir()
        for i in range(3):
            (root / "in" / f"broken_{i}.jpg").write_bytes(b"broken")
        assert featurize("images", root / "in", root / "out", "--model", conceptclip_model, "--trust-remote-code") == 0
        _CACHE["errors"] = str(root / "out")
    return _CACHE["errors"]


def slides_run(tmp_path_factory, conceptclip_model, prompts_file) -> dict:
    """Once per session: a real `featurize slides` run over one small synthetic slide (0.5 um/px, 64 px tiles)."""
    if "slides" not in _CACHE:
        from slide_fixtures import draw_slide, write_slide

        root = tmp_path_factory.mktemp("search-slides")
        drawing = draw_slide(768, 512, shapes=[("rect", 64, 64, 448, 448), ("ellipse", 600, 256, 120, 200)])
        write_slide(root / "in" / "case1.tif", drawing, 0.5)
        output = root / "out"
        code = featurize(
            "slides", root / "in", output, "--model", conceptclip_model, "--prompts", prompts_file,
            "--trust-remote-code", "--dtype", "float32", "--num-actors", 1, "--rows-per-shard", 20,
        )  # fmt: skip
        assert code == 0
        _CACHE["slides"] = {"output": str(output), "root": root}
    return _CACHE["slides"]


def tile_png(output: str, row: dict) -> bytes:
    """The PNG of a tile exactly as the run fed it to the model (read at its level, resized to the model's input)."""
    from PIL import Image

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.slide_readers import open_slide
    from pipeline.slides import tile_pixels
    from pipeline.write import OutputDir

    out = OutputDir(output)
    slide = next(s for s in out.read_table("_slides.parquet").to_pylist() if s["slide_id"] == row["slide_id"])
    identity = out.read_json("_dataset.json")["identity"]
    spec = preprocess_spec(resolve_model(identity["model"], trust_remote_code=True, dtype="float32"))
    with open_slide(row["uri"]) as handle:
        region = handle.read(row["x"], row["y"], row["level"], slide["read_px"], slide["read_px"])
    buffer = io.BytesIO()
    Image.fromarray(tile_pixels(region, slide["tile_px"], spec)).save(buffer, "PNG")
    return buffer.getvalue()


def stored(output: str, storage_options: dict | None = None) -> tuple[pa.Table, np.ndarray]:
    """The current ok rows (read_features) and their features, L2-normalised float32."""
    import pyarrow.compute as pc

    from pipeline import read_features

    table = read_features(output, storage_options)
    table = table.filter(pc.equal(table.column("status"), "ok"))
    features = np.array(table.column("image_features").to_pylist(), np.float32)
    return table, features / np.linalg.norm(features, axis=1, keepdims=True)


def one_line_error(capsys, *fragments: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("featurize: error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]
