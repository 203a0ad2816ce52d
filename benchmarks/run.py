"""Throughput benchmark: the model-card loop vs the model-only ceiling vs the pipeline, on the same data and model.

    python -m benchmarks.run --size tiny --images 2000
    python -m benchmarks.run --size base --images 200
    python -m benchmarks.run --size tiny --images 2000 --pipeline-args='--fast-decode --batch-size 64'
    python -m benchmarks.run --size tiny --images 2000 -- --fast-decode        (the same passthrough)

(a) loop:     what a user writes from the model card, as its own script (a subprocess): import torch and
              transformers, AutoProcessor/AutoModel.from_pretrained, then per batch of --batch-size files, PIL open +
              EXIF transpose + convert RGB, `processor(images=..., text=prompts, return_tensors='pt', padding=True,
              truncation=True, max_length=77)`, `model(**inputs)`, logits = scale * img @ txt.T + bias.
              Two numbers: "loop img/s" is timed from the first batch to the last (imports and model loading
              excluded), "loop whole-script img/s" is the script's wall time, as the pipeline's whole command is.
(b) ceiling:  forward only, `model.encode_image(x, normalize=True)` on pre-decoded, pre-normalised float tensors,
              same batch size, same torch threads (a warm-up batch first, not timed).
(c) pipeline: the whole `featurize images LIST OUT ...` command as a subprocess (imports, Ray start, model load,
              shutdown included), wall-timed -> "whole-command images/s"; and `images_per_s` from OUT/_run.json
              `steady_images_per_s` from OUT/_run.json (rows after the first result batch / time since it)
              -> "steady images/s"; plus the driver's RSS and the run's stage timings.
(d) first shard: `featurize demo OUT` as a subprocess, `first_shard_s` from OUT/_run.json (--no-first-shard skips).
(e) machine limit: what the cores could do if they did nothing but the pipeline's necessary work, each part
              measured on ONE thread (torch.set_num_threads(1)) on a sample of the same images: decode ms per image
              (`pipeline.decode.decode_batch`: read + decode + EXIF + exact resize to the model input, the pipeline's
              CPU stage) and model ms per image (the forward, `encode_image`, on those pixels normalised as the
              ceiling's are, at the pipeline's batch size). Machine limit img/s = usable cores / (decode s + model s
              per image); steady/limit = the pipeline's steady rate (the marginal rate with --marginal, else
              images / stream time) over it. The record also has the actor path: the same bound with the model
              actor's whole callable (`EncodeBatch` on uint8 rows: normalise + forward + logits) as the model cost.

Writes benchmarks/results/<timestamp>-<size>.json and appends a row to benchmarks/results/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import common
from .common import log
from .compare import (
    loop_cell,
    model_preprocess,
    normalised_batches,
    ratios,
    repeat,
    run_ceiling,
    run_featurize_images,
    run_loop_script,
    steady_rate,
)

TARGETS = {
    # size -> {ratio: minimum}; see TARGET_IMAGES for the image counts they are defined on
    "tiny": {"whole_over_loop": 1.5, "steady_over_loop": 3.0},
    "base": {"steady_over_ceiling": 0.9},
    "cclip": {"whole_over_loop": 1.5},
}
TARGET_IMAGES = {"tiny": 2000, "cclip": 10000}  # the whole-command targets' image counts
STEADY_OVER_LIMIT_TARGET = 0.85  # every size: the steady state as a fraction of the machine limit
FIRST_SHARD_TARGET_S = 10.0

TABLE_HEADER = (
    "| date | machine | size | images | loop img/s | ceiling img/s | machine limit img/s | "
    "pipeline steady img/s | pipeline stream img/s | pipeline whole-command img/s | steady/limit | "
    "whole/loop-script | other ratios | first-shard s | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


# -- (a) the model-card loop, (b) the model-only ceiling, (c) the pipeline: benchmarks.compare; the ceiling's pool --
def prepare_ceiling_pool(paths: list[str], model_dir: Path, pool_size: int, batch: int):
    """Decode + resize (as the pipeline does) and normalise up to pool_size images, once, outside any timing."""
    spec = model_preprocess(model_dir)
    k = max(batch, min(len(paths), pool_size))
    k = ((k + batch - 1) // batch) * batch  # whole batches
    return normalised_batches(common.decoded_pixels(paths, spec, k), spec, batch)


# -- (d) first committed shard on the demo -------------------------------------------------------------------------
def run_first_shard(work: Path, timeout: float) -> dict:
    out = common.fresh_dir(work / "out" / "demo")
    cmd = common.featurize_cmd() + ["demo", str(out)]
    res = common.run_subprocess(cmd, work / "out" / "demo.log", timeout=timeout)
    record = json.loads((out / "_run.json").read_text())
    return {
        "command": " ".join(shlex.quote(a) for a in cmd),
        "first_shard_s": record.get("first_shard_s"),
        "demo_wall_s": res["wall_s"],
        "run_wall_s": record.get("wall_s"),
        "images": record["counts"].get("processed"),
        "stages": record.get("stages"),
        "target_s": FIRST_SHARD_TARGET_S,
        "meets_target": (record.get("first_shard_s") or 1e9) < FIRST_SHARD_TARGET_S,
    }


# -- (e) the machine limit -----------------------------------------------------------------------------------------
def pipeline_settings(extra: list[str]) -> dict:
    """The `featurize images` settings the limit must match, read from the passthrough flags (the defaults else)."""
    from pipeline.config import RunConfig

    fields = RunConfig.model_fields
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--batch-size", type=int, default=fields["batch_size"].default)
    ap.add_argument("--decode-batch-size", type=int, default=fields["decode_batch_size"].default)
    ap.add_argument("--max-image-pixels", type=int, default=fields["max_image_pixels"].default)
    ap.add_argument("--fast-decode", action="store_true", default=bool(fields["fast_decode"].default))
    known, _ = ap.parse_known_args(extra)
    return {
        "batch_size": known.batch_size,
        "decode_batch_size": known.decode_batch_size,
        "max_image_pixels": known.max_image_pixels,
        "fast_decode": known.fast_decode,
    }


def sample_evenly(items: list, k: int) -> list:
    """k items spread over the whole list (the first, then every len/k-th)."""
    k = max(1, min(k, len(items)))
    return [items[(i * len(items)) // k] for i in range(k)]


def run_limit(
    paths: list[str], model_dir: Path, prompts_file: Path, settings: dict, cores: int, model_min_s: float
) -> dict:
    """Decode and model seconds per image, each on one thread, in this process; cores / their sum.

    Decode: `decode_batch` (read + decode + EXIF + exact resize, as the CPU stage runs it) over the sample in the
    pipeline's decode batches, once, the files already in the page cache. Model: the forward alone,
    `encode_image(x, normalize=True)` of the model the actor loads, on the decoded sample normalised as the
    ceiling does it (outside the timing), in the pipeline's model batches. Also timed, not in the limit: the
    actor's whole callable (`EncodeBatch` on uint8 rows: normalise + forward + logits) and its normalisation
    alone. Each model timing follows a warm-up call and stops once every sample image went through or
    model_min_s passed (at least one batch), so a large model is timed on a whole batch, not the whole sample."""
    import numpy as np
    import torch

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.decode import decode_batch
    from pipeline.encode import EncodeBatch
    from pipeline.prompts import load_prompts

    torch.set_num_threads(1)
    spec = resolve_model(str(model_dir), trust_remote_code=True, device="cpu")
    pre = preprocess_spec(spec)
    dbs, mbs = settings["decode_batch_size"], settings["batch_size"] or 32  # 0 = the CPU layout's default, 32

    decoded = []
    t0 = time.perf_counter()
    for start in range(0, len(paths), dbs):
        uris = np.array(paths[start : start + dbs], dtype=object)
        decoded.append(
            decode_batch({"uri": uris}, pre, settings["max_image_pixels"], None, fast=settings["fast_decode"])
        )
    decode_s = time.perf_counter() - t0
    status = np.concatenate([b["status"] for b in decoded])
    if not (status == "ok").all():
        raise RuntimeError(f"decode failed on {(status != 'ok').sum()} of the sampled images")
    pixels = np.concatenate([b["pixels"] for b in decoded])
    del decoded
    n = len(pixels)

    def rows(a: int, b: int) -> dict:
        k = b - a
        return {
            "uri": np.array(paths[a:b], dtype=object),
            "pixels": pixels[a:b],
            "status": np.full(k, "ok", dtype=object),
            "error": np.full(k, None, dtype=object),
            "error_class": np.full(k, None, dtype=object),
        }

    def timed(step) -> tuple[int, float]:
        """step(a, b) -> seconds, over the sample in model batches; stops early after model_min_s."""
        done, secs = 0, 0.0
        while done < n and (done == 0 or secs < model_min_s):
            end = min(n, done + mbs)
            secs += step(done, end)
            done = end
        return done, secs

    t_load = time.perf_counter()
    encode = EncodeBatch(spec, pre, load_prompts(str(prompts_file)), torch_threads=1)
    load_s = time.perf_counter() - t_load
    model = encode.encoder.model

    def forward(a: int, b: int) -> float:  # the model alone, on the normalised floats the ceiling uses
        x = normalised_batches(list(pixels[a:b]), pre, b - a)[0]
        with torch.inference_mode():
            t = time.perf_counter()
            model.encode_image(x, normalize=True)
            return time.perf_counter() - t

    def actor(a: int, b: int) -> float:  # the actor's callable on decoded uint8 rows
        batch = rows(a, b)
        t = time.perf_counter()
        out = encode(batch)
        secs = time.perf_counter() - t
        assert (out["status"] == "ok").all() and "concept_logits" in out
        return secs

    def normalise(a: int, b: int) -> float:  # the actor's uint8 -> normalised float step alone
        with torch.inference_mode():
            t = time.perf_counter()
            encode.encoder.pixel_values(pixels[a:b])
            return time.perf_counter() - t

    warm = min(n, mbs, 8)
    forward(0, warm), actor(0, warm)  # warm-up (first-call allocations), not timed
    forward_n, forward_s = timed(forward)
    actor_n, actor_s = timed(actor)
    norm_n, norm_s = timed(normalise)
    decode_ms, model_ms = 1000 * decode_s / n, 1000 * forward_s / forward_n
    actor_ms = 1000 * actor_s / actor_n
    return {
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "sample_images": n,
        "decode_images": n,
        "model_images": forward_n,
        "actor_images": actor_n,
        "decode_batch_size": dbs,
        "model_batch_size": mbs,
        "fast_decode": settings["fast_decode"],
        "input_size": f"{pre.width}x{pre.height}",
        "resize_mode": pre.mode,
        "decode_ms_per_image": round(decode_ms, 3),
        # the model forward (encode_image on normalised float pixels): what the limit counts
        "model_ms_per_image": round(model_ms, 3),
        # the actor's whole callable on uint8 rows (normalise + forward + logits + copies), and its normalisation
        "actor_ms_per_image": round(actor_ms, 3),
        "normalise_ms_per_image": round(1000 * norm_s / norm_n, 3),
        "model_share": round(model_ms / (decode_ms + model_ms), 3),
        "model_load_s": round(load_s, 3),
        "images_per_s": round(cores * 1000 / (decode_ms + model_ms), 2),
        # the same bound with the actor's own per-image cost in place of the bare forward
        "actor_path_images_per_s": round(cores * 1000 / (decode_ms + actor_ms), 2),
        # what each stage alone would allow on all the cores (the other one free)
        "decode_only_images_per_s": round(cores * 1000 / decode_ms, 2),
        "model_only_images_per_s": round(cores * 1000 / model_ms, 2),
    }


# -- orchestration -------------------------------------------------------------------------------------------------


def check_targets(size: str, n: int, rat: dict, first: dict | None) -> dict:
    checks = {}
    for key, minimum in TARGETS.get(size, {}).items():
        # "steady state" excludes start-up: the marginal rate measures exactly that when it was taken
        source = "marginal_over_loop" if key == "steady_over_loop" and rat.get("marginal_over_loop") else key
        if rat.get(source) is not None:
            checks[key] = {
                "value": rat[source],
                "minimum": minimum,
                "pass": rat[source] >= minimum,
                "measured_as": source,
            }
    if rat.get("steady_over_limit") is not None:
        checks["steady_over_limit"] = {
            "value": rat["steady_over_limit"],
            "minimum": STEADY_OVER_LIMIT_TARGET,
            "pass": rat["steady_over_limit"] >= STEADY_OVER_LIMIT_TARGET,
            "measured_as": rat["steady_over_limit_measured_as"],
        }
    if size in TARGET_IMAGES and n != TARGET_IMAGES[size] and TARGETS.get(size):
        checks["note"] = (
            f"the {size} whole-command targets are defined on {TARGET_IMAGES[size]:,} images; this run used {n:,}"
        )
    if checks.get("steady_over_limit", {}).get("measured_as") == "stream":
        checks["note_limit"] = (
            "steady/limit used images / stream time (start-up inside); pass --marginal for the steady state"
        )
    if first:
        checks["first_shard_s"] = {
            "value": first["first_shard_s"],
            "maximum": FIRST_SHARD_TARGET_S,
            "pass": first["meets_target"],
        }
    return checks


def _fmt(v, unit=""):
    return "-" if v is None else f"{v:g}{unit}"


def _limit_cell(limit) -> str:
    if not limit:
        return "-"
    return (
        f"{limit['images_per_s']:g} ({limit['cores']} / ({limit['decode_ms_per_image']:.2f} + "
        f"{limit['model_ms_per_image']:.2f} ms))"
    )


def _ratio_cell(rat: dict, key: str, suffix: str = "") -> str:
    return "-" if rat.get(key) is None else f"{rat[key]:.2f}x{suffix}"


def markdown_row(rec: dict) -> str:
    loop, ceil, pipe, first = rec.get("loop"), rec.get("ceiling"), rec.get("pipeline"), rec.get("first_shard")
    rat = rec["ratios"]
    parts = []
    for key, label in (
        ("steady_over_loop", "steady/loop"),
        ("marginal_over_loop", "marginal/loop"),
        ("steady_over_ceiling", "stream/ceiling"),
    ):
        if rat.get(key) is not None:
            parts.append(f"{label} {rat[key]:.2f}x")
    note = " (noisy)" if rec.get("noisy") else ""
    marginal = ((pipe or {}).get("marginal") or {}).get("stream_images_per_s")
    limit_source = " (stream)" if rat.get("steady_over_limit_measured_as") == "stream" else ""
    return (
        "| "
        + " | ".join(
            [
                f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}",
                common.machine_short(rec["machine"]),
                rec["size"],
                str(rec["images"]),
                loop_cell(loop),
                _fmt(ceil and ceil["images_per_s"]),
                _limit_cell(rec.get("limit")),
                _fmt(marginal),
                _fmt(pipe and pipe["steady_images_per_s"]),
                _fmt(pipe and pipe["whole_command_images_per_s"]),
                _ratio_cell(rat, "steady_over_limit", limit_source),
                _ratio_cell(rat, "whole_over_loop"),
                "; ".join(parts) or "-",
                _fmt(first and first["first_shard_s"]),
                f"`{rec['command']}`{note}",
            ]
        )
        + " |"
    )


def main(argv=None) -> int:
    measure(argv)
    return 0


def measure(argv=None) -> dict:
    """What `main` does, returning the record."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size",
        default="tiny",
        choices=list(common.SIZES),
        help="model size [tiny]; cclip = ConceptCLIP's 384 px / patch-14 geometry, small tower",
    )
    ap.add_argument("--images", type=int, default=2000, help="photo-sized JPEGs to process [2000]")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the loop and the ceiling [32]")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the loop and the ceiling [all CPUs]")
    ap.add_argument(
        "--ceiling-pool", type=int, default=256, help="distinct pre-decoded images the ceiling cycles through [256]"
    )
    ap.add_argument(
        "--ceiling-images",
        type=int,
        default=2000,
        help="the ceiling forwards min(images, this) images (and at least 3 s): a rate, which more "
        "images of the same pool do not change [2000]",
    )
    ap.add_argument(
        "--limit-sample",
        type=int,
        default=256,
        help="images (spread over the corpus) the machine limit decodes on one thread [256]",
    )
    ap.add_argument(
        "--limit-model-s",
        type=float,
        default=10.0,
        help="the limit's model timing stops after this many seconds (at least one batch) [10]",
    )
    ap.add_argument(
        "--pipeline-args",
        default="",
        help="extra `featurize images` flags as one string; write it with '=' since it starts with "
        "'--': --pipeline-args='--fast-decode --batch-size 64' (or put them after a bare --)",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of parts to skip: loop,ceiling,pipeline,limit,first-shard (skipping the "
        "pipeline skips the limit too)",
    )
    ap.add_argument("--no-first-shard", action="store_true", help="same as --skip first-shard")
    ap.add_argument("--repeats", type=int, default=1, help="run each part N times, report the median [1]")
    ap.add_argument(
        "--marginal",
        action="store_true",
        help="also run the pipeline on half the images and report the marginal rate "
        "(n - n/2) / (stream_s(n) - stream_s(n/2)): steady state without start-up costs",
    )
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache/output folder [bench-out/]")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed [0]")
    ap.add_argument("--timeout", type=float, default=3600, help="per pipeline subprocess, seconds [3600]")
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true", help="print only; write no result files")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []  # `... -- --fast-decode`: pipeline flags
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    common.set_quiet_env()

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.no_first_shard:
        skip.add("first-shard")
    work = args.work.resolve()
    threads = args.threads or os.cpu_count() or 1
    extra = shlex.split(args.pipeline_args) + passthrough
    n = args.images

    rec = {
        "benchmark": "throughput",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "size": args.size,
        "images": n,
        "batch_size": args.batch_size,
        "threads": threads,
        "pipeline_args": extra,
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
    }
    log(f"machine: {common.machine_short(rec['machine'])}; load average {rec['machine']['loadavg_start']}")

    model_dir = common.bench_model(work, args.size)
    prompts_file = common.bench_prompts(work)
    paths, list_file = [], None
    if "pipeline" in skip:
        skip.add("limit")  # the limit is the pipeline's yardstick: measured with the pipeline part only
    if not {"loop", "ceiling", "pipeline"} <= skip:  # the demo's first-shard run needs no corpus
        paths = common.photo_corpus(work, n, seed=args.seed)
        list_file = common.write_list(paths, work / "corpus" / f"photos-s{args.seed}-{n}.txt")
        for p in paths:  # warm the page cache so every part reads from memory
            with open(p, "rb") as f:
                f.read()
        rec["corpus"] = {
            "list_file": str(list_file),
            "images": len(paths),
            "bytes": sum(os.path.getsize(p) for p in paths),
            "sizes": common.PHOTO_SIZES,
        }
    rec["model"] = {"folder": str(model_dir), "size": args.size}

    from pipeline.prompts import load_prompts

    prompts = load_prompts(str(prompts_file)).all_prompts

    loop = ceiling = pipe = first = None
    if "loop" not in skip:
        loop = repeat(
            lambda: run_loop_script(paths, model_dir, prompts, args.batch_size, threads, work),
            args.repeats,
            "loop",
            "images_per_s",
        )
    if "ceiling" not in skip:
        log("ceiling: pre-decoding the image pool")
        batches = prepare_ceiling_pool(paths, model_dir, args.ceiling_pool, args.batch_size)
        ceiling_n = min(n, args.ceiling_images) if args.ceiling_images > 0 else n
        ceiling = repeat(
            lambda: run_ceiling(batches, ceiling_n, model_dir, args.batch_size, threads),
            args.repeats,
            "ceiling",
            "images_per_s",
        )
        del batches
    if "pipeline" not in skip:
        out = work / "out" / f"images-{args.size}-{n}"
        pipe = repeat(
            lambda: run_featurize_images(list_file, out, model_dir, prompts_file, extra, n, args.timeout),
            args.repeats,
            "pipeline",
            "whole_command_images_per_s",
        )
        if args.marginal and n >= 4:
            half = n // 2
            half_list = common.write_list(paths[:half], work / "corpus" / f"photos-s{args.seed}-{half}.txt")
            small = repeat(
                lambda: run_featurize_images(
                    half_list,
                    work / "out" / f"images-{args.size}-{half}",
                    model_dir,
                    prompts_file,
                    extra,
                    half,
                    args.timeout,
                ),
                args.repeats,
                f"pipeline ({half} images, for the marginal rate)",
                "whole_command_images_per_s",
            )
            d_stream = pipe["stages"]["stream_s"] - small["stages"]["stream_s"]
            d_whole = pipe["whole_command_s"] - small["whole_command_s"]
            pipe["marginal"] = {
                "half_images": half,
                "half_stream_s": small["stages"]["stream_s"],
                "half_whole_command_s": small["whole_command_s"],
                "stream_images_per_s": round((n - half) / d_stream, 2) if d_stream > 0 else None,
                "whole_command_images_per_s": round((n - half) / d_whole, 2) if d_whole > 0 else None,
            }
    limit = None
    if "limit" not in skip:
        settings = pipeline_settings(extra)
        if pipe and (pipe.get("layout") or {}).get("batch_size"):
            settings["batch_size"] = pipe["layout"]["batch_size"]  # what the pipeline actually used
        if pipe and (pipe.get("layout") or {}).get("device") not in (None, "cpu"):
            log("limit: the pipeline ran its model on a GPU; the limit below is the CPU-only one")
        sample = sample_evenly(paths, args.limit_sample)
        cores = common.usable_cpus()
        limit = repeat(
            lambda: run_limit(sample, model_dir, prompts_file, settings, cores, args.limit_model_s),
            args.repeats,
            f"machine limit ({len(sample)} images, one thread)",
            "images_per_s",
        )
        log(
            f"limit: decode {limit['decode_ms_per_image']} ms + model {limit['model_ms_per_image']} ms per image "
            f"-> {cores} cores / sum = {limit['images_per_s']} img/s"
        )
    if "first-shard" not in skip:
        first = repeat(lambda: run_first_shard(work, args.timeout), args.repeats, "first shard", "first_shard_s")

    rec.update(loop=loop, ceiling=ceiling, pipeline=pipe, limit=limit, first_shard=first)
    steady, source = steady_rate(pipe)
    rec["steady"] = {"images_per_s": steady, "measured_as": source} if pipe else None
    rec["ratios"] = ratios(loop, ceiling, pipe, limit)
    rec["targets"] = check_targets(args.size, n, rec["ratios"], first)
    rec["machine"]["loadavg_end"] = common.loadavg()
    rec["markdown_row"] = markdown_row(rec)
    print(report(rec))
    if not args.no_save:
        path = common.save_result(rec, args.size)
        table = common.append_row("throughput", TABLE_HEADER, rec["markdown_row"])
        log(f"wrote {path} and a row in {table}")
    return rec


def report(rec: dict) -> str:
    lines = [
        f"\nsize={rec['size']} images={rec['images']} batch={rec['batch_size']} threads={rec['threads']} "
        f"machine: {common.machine_short(rec['machine'])} (load {rec['machine']['loadavg_start']} -> "
        f"{rec['machine'].get('loadavg_end')})"
    ]
    loop, ceil, pipe, first = rec.get("loop"), rec.get("ceiling"), rec.get("pipeline"), rec.get("first_shard")
    if loop:
        b = loop["breakdown_s"]
        lines.append(
            f"  (a) model-card loop        {loop['images_per_s']:>9.2f} img/s   ({loop['seconds']} s; open+exif+rgb "
            f"{b['open_exif_rgb']} s, processor {b['processor']} s, model {b['model_forward']} s)"
        )
        if loop.get("whole_script_s"):
            lines.append(
                f"      loop whole script      {loop['whole_script_images_per_s']:>9.2f} img/s   "
                f"({loop['whole_script_s']} s: imports {loop.get('imports_s')} s, model load "
                f"{loop['model_load_s']} s, loop {loop['seconds']} s)"
            )
    if ceil:
        lines.append(f"  (b) model-only ceiling     {ceil['images_per_s']:>9.2f} img/s   ({ceil['seconds']} s)")
    if pipe:
        s = pipe["stages"]
        lines.append(
            f"  (c) pipeline stream rate   {pipe['steady_images_per_s']:>9.2f} img/s   (stream {s.get('stream_s')} s; "
            f"decode {s.get('decode_s')} cpu-s, model {s.get('model_s')} actor-s, write {s.get('write_s')} s)"
        )
        lines.append(
            f"      pipeline whole command {pipe['whole_command_images_per_s']:>9.2f} img/s   "
            f"({pipe['whole_command_s']} s, of which {pipe['outside_stream_s']} s outside the stream; "
            f"driver RSS peak {(pipe['driver_rss'] or {}).get('peak_mb')} MB)"
        )
        if pipe.get("marginal"):
            m = pipe["marginal"]
            lines.append(
                f"      pipeline marginal      {m['stream_images_per_s']} img/s   (stream time of {rec['images']} "
                f"minus that of {m['half_images']} images; whole command: {m['whole_command_images_per_s']})"
            )
    lim = rec.get("limit")
    if lim:
        lines.append(
            f"  (e) machine limit          {lim['images_per_s']:>9.2f} img/s   ({lim['cores']} cores / (decode "
            f"{lim['decode_ms_per_image']} ms + model {lim['model_ms_per_image']} ms per image, one thread; "
            f"{lim['sample_images']} images, model on {lim['model_images']} at batch "
            f"{lim['model_batch_size']})"
        )
        lines.append(
            f"      actor path             {lim['actor_path_images_per_s']:>9.2f} img/s   (the actor's "
            f"callable {lim['actor_ms_per_image']} ms per image in place of the forward; of which "
            f"normalising uint8 -> float {lim['normalise_ms_per_image']} ms)"
        )
    if first:
        lines.append(
            f"  (d) demo first shard       {first['first_shard_s']} s (target < {FIRST_SHARD_TARGET_S} s; "
            f"demo command {first['demo_wall_s']} s)"
        )
    for key, val in rec["ratios"].items():
        lines.append(f"      {key:<30} {val}" + ("x" if isinstance(val, (int, float)) else ""))
    for key, chk in rec["targets"].items():
        if isinstance(chk, dict):
            lines.append(
                f"  target {key} {common.target_bound(chk)}: {chk['value']} -> {'PASS' if chk['pass'] else 'FAIL'}"
            )
        else:
            lines.append(f"  note: {chk}")
    lines.append(rec["markdown_row"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
