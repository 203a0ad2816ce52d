"""Slide-tile throughput: the model-card loop vs the model-only ceiling vs `featurize slides`, on the same tiles.

    python -m benchmarks.slides --size tiny
    python -m benchmarks.slides --size base --slide-px 8192x6144

A synthetic pyramidal TIFF (generated once, cached): level 0 at 0.5 um/px, 256-px JPEG tiles, 3 reduced levels as
top-level pages (subfiletype=1) with CENTIMETER resolution tags; textured "tissue" ellipses over ~45% of blank
glass. Tiles are cut at 0.5 um/px and the model's input size, so a tile is read at level 0 with no resize.
(c) runs first: `featurize slides SLIDES OUT --model M --prompts P --trust-remote-code` as a subprocess
    (whole-command tiles/s) and `tiles_per_s` from OUT/_run.json (steady tiles/s).
(a) the loop a user writes, as its own script: for the tiles the pipeline kept (x, y from its shards), per batch:
    TiffSlide(path).read_region((x, y), 0, (tile, tile)).convert("RGB"), processor(images=..., text=prompts,
    return_tensors='pt', padding=True, truncation=True, max_length=77), model(**inputs) -> logits.
(b) forward-only ceiling on pre-read, pre-normalised tiles.
Writes benchmarks/results/<timestamp>-slides-<size>.json and a row in benchmarks/results/slides.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from . import common
from .common import log
from .compare import (
    TileOpener,
    loop_cell,
    model_preprocess,
    normalised_batches,
    ratios,
    repeat,
    run_ceiling,
    run_loop_script,
)

SLIDE_MPP = 0.5
TABLE_HEADER = (
    "| date | machine | size | tiles | loop tiles/s | ceiling tiles/s | pipeline steady tiles/s | "
    "pipeline whole-command tiles/s | ratios | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def make_slide(path: Path, width: int, height: int, seed: int = 0, levels: int = 3, tile: int = 256) -> Path:
    """A pyramidal TIFF that tiffslide and openslide read as a generic tiled slide at SLIDE_MPP."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 243, dtype=np.uint8)
    yy, xx = np.ogrid[:height, :width]
    colours = ((196, 96, 164), (150, 70, 180), (220, 140, 170))
    for i in range(6):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.12, 0.25) * width, rng.uniform(0.12, 0.25) * height
        region = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        for c, value in enumerate(colours[i % 3]):
            rgb[..., c][region] = value
    # texture: low-resolution noise upsampled (compresses like tissue, not like white noise)
    small = rng.integers(-30, 31, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.int16)
    texture = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, :width]
    tissue = (rgb != 243).any(axis=2, keepdims=True)
    rgb = np.where(tissue, np.clip(rgb.astype(np.int16) + texture, 0, 255), rgb).astype(np.uint8)
    pages = [rgb]
    for _ in range(levels):
        a = pages[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        pages.append(np.rint(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tiff")
    with tifffile.TiffWriter(tmp) as tw:
        for i, a in enumerate(pages):
            res = 1e4 / (SLIDE_MPP * 2**i)
            side = tile
            while side > 16 and min(a.shape[:2]) < side:
                side //= 2
            tw.write(
                a,
                tile=(side, side),
                photometric="rgb",
                compression="jpeg",
                metadata=None,
                subfiletype=0 if i == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    os.replace(tmp, path)
    return path


def slide_corpus(work: Path, width: int, height: int, count: int) -> Path:
    folder = work / "corpus" / f"slides-{width}x{height}"
    for i in range(count):
        path = folder / f"slide_{i:03d}.tiff"
        if not path.is_file():
            log(f"generating slide {path} (once)")
            make_slide(path, width, height, seed=i)
    # the input folder holds exactly `count` slides
    inp = work / "corpus" / f"slides-{width}x{height}-n{count}"
    inp.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = inp / f"slide_{i:03d}.tiff"
        if not link.exists():
            os.link(folder / f"slide_{i:03d}.tiff", link)
    return inp


def run_pipeline(inp: Path, out: Path, model_dir: Path, prompts: Path, extra: list[str], timeout: float) -> dict:
    common.fresh_dir(out)
    cmd = common.featurize_cmd() + [
        "slides",
        str(inp),
        str(out),
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--trust-remote-code",
        "--target-mpp",
        str(SLIDE_MPP),
        *extra,
    ]
    res = common.run_subprocess(cmd, out.parent / (out.name + ".log"), timeout=timeout)
    record = json.loads((out / "_run.json").read_text())
    c = record["counts"]
    n = c.get("processed") or 0
    return {
        "command": " ".join(shlex.quote(a) for a in cmd),
        "tiles": n,
        "ok": c.get("ok"),
        "whole_command_s": res["wall_s"],
        "whole_command_images_per_s": round(n / res["wall_s"], 2) if n else None,
        "steady_images_per_s": record.get("tiles_per_s"),
        "first_shard_s": record.get("first_shard_s"),
        "stages": record.get("stages"),
        "layout": record.get("layout"),
        "counts": c,
        "driver_rss": res["rss"],
        "log": res["log"],
    }


def pipeline_tiles(out: Path) -> list[tuple]:
    """(uri, x, y, tile_px) of every ok tile the pipeline committed, in a stable order."""
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(shard, columns=["uri", "x", "y", "tile_px", "level", "status"])
        for uri, x, y, px, _level, status in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if status == "ok":
                rows.append((uri, int(x), int(y), int(px)))
    rows.sort()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.slides", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "so400m"])
    ap.add_argument("--slide-px", default="4096x3072", help="level-0 WIDTHxHEIGHT of each slide [4096x3072]")
    ap.add_argument("--slides", type=int, default=1, help="how many slides [1]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ceiling-pool", type=int, default=256)
    ap.add_argument("--pipeline-args", default="", help="extra `featurize slides` flags, one string")
    ap.add_argument("--skip", default="", help="comma list: loop,ceiling")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--noisy", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []  # `... -- --fast-decode`: pipeline flags
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    common.set_quiet_env()
    try:
        import tiffslide  # noqa: F401

        import pipeline.slides_job  # noqa: F401
    except ImportError as exc:
        print(
            f"slides benchmark unavailable: {exc} (needs the `slides` extra)",
            file=sys.stderr,
        )
        return 2

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    width, height = (int(v) for v in args.slide_px.lower().split("x"))
    work = args.work.resolve()
    threads = args.threads or os.cpu_count() or 1
    extra = shlex.split(args.pipeline_args) + passthrough
    rec = {
        "benchmark": "slides",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "size": args.size,
        "slide_px": [width, height],
        "slides": args.slides,
        "batch_size": args.batch_size,
        "threads": threads,
        "pipeline_args": extra,
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
    }
    model_dir = common.bench_model(work, args.size)
    prompts_file = common.bench_prompts(work)
    inp = slide_corpus(work, width, height, args.slides)
    out = work / "out" / f"slides-{args.size}-{width}x{height}-n{args.slides}"

    pipe = repeat(
        lambda: run_pipeline(inp, out, model_dir, prompts_file, extra, args.timeout),
        args.repeats,
        "slides pipeline",
        "whole_command_images_per_s",
    )
    tiles = pipeline_tiles(out)
    n = len(tiles)
    rec["images"] = n
    log(f"slides: {n} tissue tiles")
    from pipeline.prompts import load_prompts

    prompts = load_prompts(str(prompts_file)).all_prompts
    loop = ceiling = None
    if "loop" not in skip and n:
        loop = repeat(
            lambda: run_loop_script(tiles, model_dir, prompts, args.batch_size, threads, work, opener="tile"),
            args.repeats,
            "slides loop",
            "images_per_s",
        )
    if "ceiling" not in skip and n:
        import numpy as np

        from pipeline.decode import resize_for_model

        spec = model_preprocess(model_dir)
        opener = TileOpener()
        k = max(args.batch_size, min(n, args.ceiling_pool))
        k = ((k + args.batch_size - 1) // args.batch_size) * args.batch_size
        pixels = [np.asarray(resize_for_model(opener(tiles[i % n]), spec)) for i in range(k)]
        batches = normalised_batches(pixels, spec, args.batch_size)
        ceiling = repeat(
            lambda: run_ceiling(batches, n, model_dir, args.batch_size, threads),
            args.repeats,
            "slides ceiling",
            "images_per_s",
        )
    rec.update(loop=loop, ceiling=ceiling, pipeline=pipe, ratios=ratios(loop, ceiling, pipe))
    rec["machine"]["loadavg_end"] = common.loadavg()

    print(
        f"\nslides: size={args.size} {args.slides} slide(s) of {width}x{height} -> {n} tiles "
        f"(machine: {common.machine_short(rec['machine'])}, load {rec['machine']['loadavg_start']} -> "
        f"{rec['machine']['loadavg_end']})"
    )
    if loop:
        print(f"  (a) model-card loop        {loop['images_per_s']:>9} tiles/s  (breakdown {loop['breakdown_s']})")
        print(
            f"      loop whole script      {loop['whole_script_images_per_s']:>9} tiles/s  ({loop['whole_script_s']} s)"
        )
    if ceiling:
        print(f"  (b) model-only ceiling     {ceiling['images_per_s']:>9} tiles/s")
    s = pipe["stages"] or {}
    print(
        f"  (c) pipeline steady        {pipe['steady_images_per_s']:>9} tiles/s  (stream {s.get('stream_s')} s, "
        f"planning {s.get('planning_s')} s, read {s.get('decode_s')} cpu-s, model {s.get('model_s')} actor-s)"
    )
    print(
        f"      pipeline whole command {pipe['whole_command_images_per_s']:>9} tiles/s  ({pipe['whole_command_s']} s)"
    )
    for key, val in rec["ratios"].items():
        print(f"      {key:<22} {val}x")
    labels = {
        "whole_over_loop": "whole/loop-script",
        "steady_over_loop": "steady/loop",
        "steady_over_ceiling": "steady/ceiling",
    }
    parts = [f"{labels[k]} {v:.2f}x" for k, v in rec["ratios"].items() if k in labels and v is not None]
    date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
    rec["markdown_row"] = (
        "| "
        + " | ".join(
            [
                date,
                common.machine_short(rec["machine"]),
                args.size,
                str(n),
                loop_cell(loop),
                str(ceiling["images_per_s"]) if ceiling else "-",
                str(pipe["steady_images_per_s"]),
                str(pipe["whole_command_images_per_s"]),
                "; ".join(parts) or "-",
                f"`{rec['command']}`" + (" (noisy)" if args.noisy else ""),
            ]
        )
        + " |"
    )
    print(rec["markdown_row"])
    if not args.no_save:
        path = common.save_result(rec, f"slides-{args.size}")
        common.append_row("slides", TABLE_HEADER, rec["markdown_row"])
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
