"""What-if runs: the pipeline with candidate changes patched in from outside, to measure them before anyone edits
pipeline/. Each run is a fresh interpreter that calls `pipeline.run.run_images` with some module attributes replaced.

    python -m benchmarks.whatif --size tiny --images 1000 --variants baseline,actor0,draft,actor0+draft
    python -m benchmarks.whatif --demo --variants baseline,jsonspec+rayfirst      # first-shard time on the demo

Variants (combine with "+"):
  baseline   the pipeline as it is
  actor0     the CPU model actor reserves 0 CPUs (instead of 1), so Ray runs a decode task on every core
  threads1   torch_threads=1 in the actor (leaves a core's worth of time to decoding)
  draft      decode with libjpeg DCT scaling: img.draft("RGB", model size) before load() (approximate:
             JPEG-only, downscales by 1/2..1/8 in the decoder, then the usual resize)
  gap        resize with reducing_gap=3.0 (PIL box-reduces first, then resamples; approximate)
  exifinplace exif_transpose(in_place=True) (saves a full-image copy per image; exact)
  dbs128     decode_batch_size=128 (fewer, larger decode tasks)
  fast       the pipeline's own fast_decode=True (if this checkout has it)
  jsonspec   the driver reads the preprocessing from preprocessor_config.json instead of loading AutoProcessor
             (the driver then never imports transformers/torch)
  rayfirst   ray.init() starts on a thread at the top of run_images, overlapping model/processor resolution
             (superseded once run_images overlaps them itself, as `while_ray_starts` now does)
  prewarm    right after Ray starts, one task per CPU imports torch, transformers and pipeline.encode in Ray's
             idle worker processes (fire and forget), so the model actor, if Ray places it in a warmed worker,
             skips those imports
These patch pipeline internals by name (actor_layout, decode_batch, preprocess_spec, init_ray in pipeline.run):
if those change, a variant may stop applying; the run record says what the driver imported.
Reported: steady images/s (`images_per_s` of the run record), first_shard_s, run wall_s, stage timings, child
process wall time. Results: benchmarks/results/<timestamp>-whatif.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402
from .common import log  # noqa: E402

KNOWN = {"baseline", "actor0", "threads1", "draft", "gap", "exifinplace", "dbs128", "fast", "jsonspec", "rayfirst",
         "prewarm"}


# -- a decode stage with the candidate options (mirrors pipeline.decode.decode_batch) ------------------------------
def make_decode_batch(draft: bool, gap: float | None, exif_in_place: bool):
    def decode_batch_variant(batch, spec, max_pixels, storage_options=None, **_ignored):
        import io
        import time as _time
        import warnings

        import numpy as np
        from PIL import Image, ImageOps

        from pipeline.decode import _reason, centre_crop, to_rgb
        from pipeline.storage import read_bytes

        t = _time.perf_counter()
        Image.MAX_IMAGE_PIXELS = None
        uris = batch["uri"]
        n = len(uris)
        pixels = np.zeros((n, *spec.out_shape), dtype=np.uint8)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, None, dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        for i, uri in enumerate(uris):
            try:
                data = read_bytes(str(uri), storage_options)
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > max_pixels:
                    raise ValueError("decompression bomb")
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees: record w/h swapped
                    w, h = h, w
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if draft and img.format == "JPEG":
                        want = (spec.width, spec.height) if spec.mode == "squash" else (spec.shortest_edge,) * 2
                        img.draft("RGB", want)
                    img.load()
                    if exif_in_place:
                        ImageOps.exif_transpose(img, in_place=True)
                    else:
                        img = ImageOps.exif_transpose(img)
                img = to_rgb(img)
                width[i], height[i] = w, h
                kwargs = {"reducing_gap": gap} if gap else {}
                if spec.mode == "squash":
                    pixels[i] = np.asarray(img.resize((spec.width, spec.height), resample=spec.resample, **kwargs))
                else:
                    iw, ih = img.size
                    short, long = (iw, ih) if iw <= ih else (ih, iw)
                    ns, nl = spec.shortest_edge, int(spec.shortest_edge * long / short)
                    size = (ns, nl) if iw <= ih else (nl, ns)
                    arr = np.asarray(img.resize(size, resample=spec.resample, **kwargs), dtype=np.uint8)
                    pixels[i] = centre_crop(arr, spec.height, spec.width)
            except (ValueError, OSError) as exc:
                status[i], error[i] = "error", _reason(exc)
        out = dict(batch)
        out.update(pixels=pixels, status=status, error=error, width=width, height=height,
                   decode_s=np.full(n, (_time.perf_counter() - t) / max(n, 1)))
        return out

    return decode_batch_variant


def json_preprocess_spec(spec):
    """PreprocessSpec from the checkpoint's preprocessor_config.json, without transformers (local folders)."""
    from types import SimpleNamespace

    from pipeline.decode import spec_from_image_processor

    folder = Path(spec.model)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    ns = SimpleNamespace(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    for key, default in (("do_resize", True), ("do_center_crop", False), ("crop_size", None)):
        if not hasattr(ns, key):
            setattr(ns, key, default)
    return spec_from_image_processor(ns)


def child(variant: str, cfg_json: str) -> dict:
    import threading

    import pipeline.run as R
    from pipeline.config import RunConfig

    parts = set(variant.split("+"))
    opts = json.loads(cfg_json)
    if "threads1" in parts:
        opts["torch_threads"] = 1
    if "dbs128" in parts:
        opts["decode_batch_size"] = 128
    if "fast" in parts:
        if "fast_decode" not in RunConfig.model_fields:
            raise SystemExit("variant fast: this checkout's RunConfig has no fast_decode")
        opts["fast_decode"] = True
    cfg = RunConfig(**opts)
    if "actor0" in parts:
        orig_layout = R.actor_layout

        def layout(c, shape):
            lay = orig_layout(c, shape)
            return {**lay, "num_cpus": 0} if lay["device"] == "cpu" else lay

        R.actor_layout = layout
    if parts & {"draft", "gap", "exifinplace"}:
        R.decode_batch = make_decode_batch("draft" in parts, 3.0 if "gap" in parts else None,
                                           "exifinplace" in parts)
    if "jsonspec" in parts:
        R.preprocess_spec = json_preprocess_spec
    if "prewarm" in parts:
        before = R.init_ray

        def warm_init():
            import ray

            started = before()

            @ray.remote(num_cpus=1)
            def _warm():
                import torch  # noqa: F401
                import transformers  # noqa: F401
                from transformers import AutoModel  # noqa: F401

                import pipeline.encode  # noqa: F401
                return os.getpid()

            import os

            cpus = int(ray.cluster_resources().get("CPU", 1))
            R._prewarm_refs = [_warm.remote() for _ in range(cpus)]
            return started

        R.init_ray = warm_init
    t0 = time.perf_counter()
    if "rayfirst" in parts:
        orig_init = R.init_ray
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("started", orig_init()), daemon=True)

        def init_ray():
            th.join()
            return box.get("started", False)

        R.init_ray = init_ray
        th.start()
    record = R.run_images(cfg, echo=lambda m: print(m, file=sys.stderr))
    record["child_run_s"] = round(time.perf_counter() - t0, 3)
    record["transformers_in_driver"] = "transformers" in sys.modules
    record["torch_in_driver"] = "torch" in sys.modules
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.whatif", description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "so400m"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--demo", action="store_true", help="the demo's 64 small images and tiny model, 4 shards "
                                                        "(for first-shard time)")
    ap.add_argument("--variants", default="baseline,actor0,draft,actor0+draft")
    ap.add_argument("--rounds", type=int, default=1, help="run the whole list N times, interleaved [1]")
    ap.add_argument("--pipeline-args", default="", help="extra RunConfig options as JSON, e.g. '{\"batch_size\": 64}'")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--noisy", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    common.set_quiet_env()
    if args.child:
        rec = child(args.child, args.cfg)
        print(json.dumps(rec, default=str))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        bad = set(v.split("+")) - KNOWN
        if bad:
            ap.error(f"unknown variant part(s) {sorted(bad)}; known: {sorted(KNOWN)}")
    work = args.work.resolve()
    prompts = common.bench_prompts(work)
    if args.demo:
        from pipeline.demo import make_images

        images = work / "corpus" / "demo64"
        if not (images / ".done").is_file():
            make_images(images, 64, sizes=((320, 240), (640, 480)))
            (images / ".done").write_text("64")
        folder = work / "models" / "demo-tiny"
        if not (folder / ".done").is_file():
            from pipeline.tiny import build_tiny_conceptclip

            build_tiny_conceptclip(folder)
            (folder / ".done").write_text("tiny")
        base = {"input": str(images), "model": str(folder), "rows_per_shard": 16}
        n, size = 64, "demo"
    else:
        model = common.bench_model(work, args.size)
        paths = common.photo_corpus(work, args.images)
        base = {"input": str(common.write_list(paths, work / "corpus" / f"photos-s0-{args.images}.txt")),
                "model": str(model)}
        n, size = args.images, args.size
    base.update(prompts=str(prompts), trust_remote_code=True, **json.loads(args.pipeline_args or "{}"))

    rec = {"benchmark": "whatif", "timestamp": common.timestamp(), "command": common.command_line(),
           "size": size, "images": n, "noisy": args.noisy, "machine": common.machine_info(),
           "versions": common.versions(), "runs": []}
    for r in range(args.rounds):
        for v in variants:
            out = common.fresh_dir(work / "out" / f"whatif-{size}-{v.replace('+', '_')}")
            cfg = dict(base, output=str(out))
            log(f"whatif: {v} (round {r + 1}/{args.rounds})")
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "benchmarks.whatif", "--child", v, "--cfg", json.dumps(cfg)],
                                 capture_output=True, text=True, env=common.quiet_env(), cwd=str(common.ROOT))
            wall = time.perf_counter() - t
            if res.returncode != 0:
                raise RuntimeError(f"variant {v} failed:\n{res.stderr[-3000:]}")
            run = json.loads(res.stdout.strip().splitlines()[-1])
            row = {"variant": v, "round": r + 1, "process_wall_s": round(wall, 3),
                   "images_per_s": run.get("images_per_s"), "first_shard_s": run.get("first_shard_s"),
                   "run_wall_s": run.get("wall_s"), "stages": run.get("stages"), "layout": run.get("layout"),
                   "ok": run["counts"].get("ok"), "transformers_in_driver": run.get("transformers_in_driver")}
            if row["ok"] != n:
                raise RuntimeError(f"variant {v}: {row['ok']} of {n} ok")
            rec["runs"].append(row)
            log(f"whatif: {v}: {row['images_per_s']} img/s steady, first shard {row['first_shard_s']} s, "
                f"process {row['process_wall_s']} s")
    rec["machine"]["loadavg_end"] = common._loadavg()
    print(f"\nwhat-if ({size}, {n} images; machine {common.machine_short(rec['machine'])}, load "
          f"{rec['machine']['loadavg_start']} -> {rec['machine']['loadavg_end']})")
    print(f"  {'variant':<24} {'steady img/s':>12} {'first shard s':>14} {'process s':>10} {'decode cpu-s':>13} "
          f"{'model actor-s':>14}")
    for row in rec["runs"]:
        s = row["stages"] or {}
        print(f"  {row['variant']:<24} {row['images_per_s']:>12} {str(row['first_shard_s']):>14} "
              f"{row['process_wall_s']:>10} {s.get('decode_s', '-'):>13} {s.get('model_s', '-'):>14}")
    if not args.no_save:
        log(f"wrote {common.save_result(rec, 'whatif')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
