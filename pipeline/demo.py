"""`featurize demo`: the real pipeline end to end, offline, on generated images and a tiny random-weight model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from .config import RunConfig

DEMO_PROMPTS = """\
# Demo prompt set: three templates ensembled per concept.
concepts: [tumor, stroma, lymphocytes, necrosis, adipose tissue, normal mucosa]
templates: ["a histopathology image of {}", "{} tissue", "an image showing {}"]
"""


def make_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: a smooth colour gradient with soft shapes and a little noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / width * rng.uniform(0.3, 1) + y / height * rng.uniform(0.3, 1))[..., None] / 2
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        rx, ry = rng.integers(10, width // 3), rng.integers(10, height // 3)
        draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img.filter(ImageFilter.GaussianBlur(1.2))


def make_images(folder: str | Path, n: int, seed: int = 0, sizes=((500, 375), (1024, 768))) -> list[Path]:
    """n JPEGs of assorted photo sizes between sizes[0] and sizes[1]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (w0, h0), (w1, h1) = sizes
    paths = []
    for i in range(n):
        w, h = int(rng.integers(w0, w1 + 1)), int(rng.integers(h0, h1 + 1))
        if rng.random() < 0.3:
            w, h = h, w  # some portraits
        path = folder / f"img_{i:05d}.jpg"
        make_photo(rng, w, h).save(path, quality=90)
        paths.append(path)
    return paths


DEMO_MODEL = Path(__file__).parent / "demo_model"  # build_tiny_conceptclip(folder) at seed 0, less its code
REMOTE_CODE = Path(__file__).parent / "tiny_conceptclip"
REMOTE_CODE_FILES = ("configuration_conceptclip.py", "modeling_conceptclip.py", "processing_conceptclip.py")


def copy_demo_model(folder: str | Path) -> Path:
    """The demo's tiny random-weight ConceptCLIP-interface model, shipped as files: copying it needs neither torch
    nor transformers in the driver (building it imported both, seconds of the demo's start). The remote code comes
    from `pipeline/tiny_conceptclip/`, as `build_tiny_conceptclip` writes it; tests check the two agree."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for source in [*sorted(DEMO_MODEL.iterdir()), *(REMOTE_CODE / name for name in REMOTE_CODE_FILES)]:
        if source.is_file():
            shutil.copyfile(source, folder / source.name)
    return folder


def run_demo(output: str, n_images: int = 64, echo=print, command_started: float | None = None) -> dict:
    from .cluster import while_ray_starts
    from .images_job import run_images

    t = time.perf_counter()
    root = Path(output) / "_demo"
    images = root / "images"
    prompts = root / "prompts.yaml"

    def prepare():
        if not images.is_dir():
            make_images(images, n_images, sizes=((320, 240), (640, 480)))
        prompts.write_text(DEMO_PROMPTS, encoding="utf-8")
        return copy_demo_model(root / "model")

    started_ray, model = while_ray_starts(prepare)  # the demo's inputs are made while Ray starts
    echo(
        f"featurize demo: {n_images} generated images and a tiny RANDOM-WEIGHT model with ConceptCLIP's "
        f"interface in {root} ({time.perf_counter() - t:.1f} s, Ray started meanwhile)"
    )
    cfg = RunConfig(
        input=str(images),
        output=output,
        model=str(model),
        prompts=str(prompts),
        trust_remote_code=True,
        rows_per_shard=max(1, n_images // 4),
    )
    try:
        record = run_images(cfg, echo=echo, command_started=command_started)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    table = pq.read_table(Path(output) / "part-00000.parquet")
    names = pq.read_table(Path(output) / "_prompts.parquet").column("concept").to_pylist()
    c = record["counts"]
    echo(
        f"featurize demo: {c['processed']} images -> {c['ok']} ok, {c['error']} error in "
        f"{record['wall_s']:.1f} s ({record['images_per_s']} images/s over the stream, the model's start-up "
        f"included); shards and metadata in {output}"
    )
    first = table.slice(0, 1).to_pylist()[0]
    if first["status"] == "ok":
        scores = ", ".join(f"{n}={v:.2f}" for n, v in zip(names, first["concept_logits"]))
        echo(
            f"featurize demo: {Path(first['uri']).name}: {len(first['image_features'])}-d features; "
            f"concept logits {scores}"
        )
    echo(
        "featurize demo: the weights are RANDOM, so these numbers are meaningless; they only show the pipeline "
        "works. See README 'Running the real ConceptCLIP'."
    )
    return record
