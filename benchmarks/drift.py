"""Drift of the approximate `--fast-decode` mode: cosine of its image features to the exact ones, and its speed.

    python -m benchmarks.drift --size tiny --images 200

Same corpus and model as `benchmarks.run`; both modes decode the same JPEGs (one thread) and the same model encodes
them, so the only difference is the decoding.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common
from pipeline.checkpoint import preprocess_spec, resolve_model
from pipeline.decode import decode_one
from pipeline.models import Encoder


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "so400m"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--work", type=common.Path, default=common.DEFAULT_WORK)
    args = ap.parse_args()
    common.set_quiet_env()
    paths = common.photo_corpus(args.work, args.images)
    spec = resolve_model(
        str(common.bench_model(args.work, args.size)), trust_remote_code=True, dtype="float32", device="cpu"
    )
    pre = preprocess_spec(spec)
    encoder = Encoder(spec, pre)
    blobs = [open(p, "rb").read() for p in paths]
    results = {}
    pixels = {}
    for mode, fast in (("exact", False), ("fast", True)):
        t = time.perf_counter()
        pixels[mode] = np.stack([decode_one(b, pre, 10**9, fast)[0] for b in blobs])
        results[f"{mode}_decode_ms_per_image"] = round((time.perf_counter() - t) / len(blobs) * 1000, 3)
    feats = {
        m: np.concatenate([encoder.encode_images(p[i : i + 32]) for i in range(0, len(p), 32)])
        for m, p in pixels.items()
    }
    cos = (feats["exact"] * feats["fast"]).sum(1)
    results.update(
        images=len(blobs),
        size=args.size,
        cosine_min=round(float(cos.min()), 5),
        cosine_mean=round(float(cos.mean()), 5),
        cosine_p01=round(float(np.quantile(cos, 0.01)), 5),
        pixel_mean_abs_diff=round(float(np.abs(pixels["exact"].astype(int) - pixels["fast"].astype(int)).mean()), 3),
    )
    record = {
        "name": "drift",
        "timestamp": common.timestamp(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": common.command_line(),
        **results,
    }
    common.save_result(record, f"drift-{args.size}")
    print(results)


if __name__ == "__main__":
    main()
