"""Decode/resize micro-benchmark: milliseconds per image, one thread, on the benchmark's photo-sized JPEGs.

    python -m benchmarks.decode --size base --images 100

The file bytes are read into memory first (no I/O in any timing). Per image:
  pil_decode            Image.open(bytes) + load()                     (iii: PIL decode only)
  pil_decode_draft      the same after img.draft("RGB", model size)    (libjpeg DCT scaling: what a fast
                                                                        approximate decode mode would do)
  exif_transpose        ImageOps.exif_transpose(img) on a loaded image (a full copy when there is no rotation)
  resize_only           img.resize(model size, the processor's resample) on a decoded image
  resize_gap3           the same with reducing_gap=3.0 (box-reduce first; approximate)
  decode_one            pipeline.decode.decode_one(bytes)              (ii: our CPU stage per image, uint8 out)
  decode_one_fast       decode_one(bytes, fast=True), where the checkout has the fast mode (else "-")
  draft_resize          draft decode + exif + resize                   (a sketch of the fast mode, uint8 out)
  processor_only        processor.image_processor(images=[img])        (i: transformers, on a decoded RGB image)
  loop_per_image        open + exif_transpose + convert("RGB") + processor.image_processor(images=[img])
                        (what the model-card loop pays per image, minus the model)
Writes benchmarks/results/<timestamp>-decode-<size>.json and a row in benchmarks/results/decode.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

from . import common
from .common import log

CASES = (
    "pil_decode",
    "pil_decode_draft",
    "exif_transpose",
    "resize_only",
    "resize_gap3",
    "decode_one",
    "decode_one_fast",
    "draft_resize",
    "processor_only",
    "loop_per_image",
)
TABLE_HEADER = (
    "| date | machine | size | input | images | " + " | ".join(f"{c} ms" for c in CASES) + " | command |\n"
    "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in CASES) + " | --- |\n"
)


def _time(fn, items, repeats: int) -> list[float]:
    """ms per call for each item (best of `repeats` per item, which trims scheduler noise on a busy machine)."""
    out = []
    for item in items:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(item)
            best = min(best, time.perf_counter() - t)
        out.append(best * 1000)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size",
        default="base",
        choices=list(common.SIZES),
        help="model whose processor/input size is used [base: 224]",
    )
    ap.add_argument("--images", type=int, default=100, help="JPEGs from the photo corpus [100]")
    ap.add_argument("--repeats", type=int, default=3, help="timings per image; the best counts [3]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    common.set_quiet_env()

    import torch
    from PIL import Image, ImageOps
    from transformers import AutoProcessor

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.decode import decode_one, open_image, resize_for_model

    torch.set_num_threads(1)
    work = args.work.resolve()
    model_dir = common.bench_model(work, args.size)
    paths = common.photo_corpus(work, args.images)
    blobs = [Path(p).read_bytes() for p in paths]
    spec = preprocess_spec(resolve_model(str(model_dir), trust_remote_code=True))
    ip = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True).image_processor
    target = (spec.width, spec.height) if spec.mode == "squash" else (spec.shortest_edge, spec.shortest_edge)
    big = 10**9

    def pil_decode(data):
        img = Image.open(io.BytesIO(data))
        img.load()
        return img

    def pil_decode_draft(data):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", target)
        img.load()
        return img

    def draft_resize(data):
        img = ImageOps.exif_transpose(pil_decode_draft(data))
        return resize_for_model(img.convert("RGB"), spec)

    def loop_per_image(data):
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        return ip(images=[img], return_tensors="pt")

    import inspect

    has_fast = "fast" in inspect.signature(decode_one).parameters
    decoded = [open_image(b, big) for b in blobs]
    loaded = [pil_decode(b) for b in blobs]
    cases = {
        "pil_decode": (pil_decode, blobs),
        "pil_decode_draft": (pil_decode_draft, blobs),
        "exif_transpose": (ImageOps.exif_transpose, loaded),
        "resize_only": (lambda img: img.resize((spec.width, spec.height), resample=spec.resample), decoded),
        "resize_gap3": (
            lambda img: img.resize((spec.width, spec.height), resample=spec.resample, reducing_gap=3.0),
            decoded,
        ),
        "decode_one": (lambda data: decode_one(data, spec, big), blobs),
        "decode_one_fast": (lambda data: decode_one(data, spec, big, fast=True), blobs) if has_fast else None,
        "draft_resize": (draft_resize, blobs),
        "processor_only": (lambda img: ip(images=[img], return_tensors="pt"), decoded),
        "loop_per_image": (loop_per_image, blobs),
    }
    cases = {k: v for k, v in cases.items() if v is not None}
    for fn, items in cases.values():  # warm-up (imports, first-call setup)
        fn(items[0])

    rec = {
        "benchmark": "decode",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "size": args.size,
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "input_size": f"{spec.width}x{spec.height}",
        "resize_mode": spec.mode,
        "resample": int(spec.resample),
        "images": len(blobs),
        "mean_file_kb": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
        "mean_megapixels": round(sum(i.size[0] * i.size[1] for i in decoded) / len(decoded) / 1e6, 3),
        "image_processor": type(ip).__name__,
        "cases": {},
    }
    log(
        f"decode: {len(blobs)} JPEGs (mean {rec['mean_megapixels']} MP, {rec['mean_file_kb']} KB) -> "
        f"{rec['input_size']} ({spec.mode}), {type(ip).__name__}"
    )
    for name, (fn, items) in cases.items():
        ms = _time(fn, items, args.repeats)
        ms_sorted = sorted(ms)
        rec["cases"][name] = {
            "mean_ms": round(statistics.mean(ms), 3),
            "median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(ms_sorted[int(0.9 * (len(ms) - 1))], 3),
            "images_per_s_per_core": round(1000 / statistics.mean(ms), 1),
        }
    rec["machine"]["loadavg_end"] = common.loadavg()

    print(
        f"\ndecode/resize per image, one thread, {rec['images']} JPEGs of {rec['mean_megapixels']} MP mean -> "
        f"{rec['input_size']} (machine: {common.machine_short(rec['machine'])}, load "
        f"{rec['machine']['loadavg_start']} -> {rec['machine']['loadavg_end']})"
    )
    print(f"  {'case':<18} {'mean ms':>9} {'median':>9} {'p90':>9} {'img/s/core':>11}")
    for name, c in rec["cases"].items():
        print(
            f"  {name:<18} {c['mean_ms']:>9.2f} {c['median_ms']:>9.2f} {c['p90_ms']:>9.2f} "
            f"{c['images_per_s_per_core']:>11.1f}"
        )
    if not args.no_save:
        path = common.save_result(rec, f"decode-{args.size}")
        date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
        note = " (noisy)" if args.noisy else ""
        common.append_row(
            "decode",
            TABLE_HEADER,
            f"| {date} | {common.machine_short(rec['machine'])} | {args.size} | {rec['input_size']} | "
            f"{rec['images']} | "
            + " | ".join(f"{rec['cases'][c]['mean_ms']:.2f}" if c in rec["cases"] else "-" for c in CASES)
            + f" | `{rec['command']}`{note} |",
        )
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
