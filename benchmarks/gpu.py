"""GPU benchmark: the so400m image tower in bfloat16 from JPEGs, end to end, against a GPU model-only ceiling.

    python -m benchmarks.gpu                       (so400m, 20,000 photo-sized JPEGs, 4,000 of them distinct)
    python -m benchmarks.gpu --size base --images 4000 --skip compile,pipeline-compiled

Each part is recorded as it finishes (a part that fails records its error and the rest still run):
(1) decode:    the CPU stage's cost per image at the model's input (`decode_batch`: read + decode + EXIF + exact
               resize), on one thread, exact and `--fast-decode`; and the same over every core (one process per
               core), which is what can feed the GPU.
(2) ceiling:   the model alone on the GPU: `encode_image` in bfloat16 on normalised pixels already on the device,
               at the pipeline's batch (256), CUDA-synchronised; with its TFLOP/s for the size's FLOPs per image.
               Also the actor's whole callable (`EncodeBatch` on uint8 rows from host memory: copy to the device,
               normalise, forward, logits, copy back).
(3) pipeline:  the whole `featurize images LIST OUT` command (Ray start, model load, shutdown included) while
               `nvidia-smi` samples the GPU's utilisation every 100 ms: images/s end to end, the stream and steady
               rates from OUT/_run.json, and the busy fraction (mean utilisation from the first to the last sample
               with a kernel running; also the actor's own model-seconds / stream-seconds).
(4) parity:    the pipeline's rows against the model card's loop on the same GPU (processor + `model(**inputs)`
               in bfloat16) for the first images, and against float32 on the CPU for a few: feature cosine and
               the largest logit difference.
(5) gpu-decode: nvJPEG through `torchvision.io.decode_jpeg(device="cuda")` + an antialiased bicubic resize on the
               device, batched: images/s and its drift from the exact CPU decode (pixels and feature cosine). A
               measurement only: the pipeline decodes on the CPU.
(6) compile:   the ceiling's forward under `torch.compile(dynamic=True)` (as `--torch-compile` does it), timed
               after its first, compiling call.
(7) pipeline-compiled: part (3) again with `--torch-compile`.
Parts 6 and 7 run last: a short GPU lease may end before them (`--deadline-s` skips parts that would start late).

Writes benchmarks/results/<timestamp>-gpu-<size>.json after every part, and a row to benchmarks/results/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import common
from .common import log
from .compare import open_photo, run_featurize_images

# Image-tower GFLOPs per image (../shared/REFERENCE.md's compute figures; 2 x multiply-adds).
GFLOPS_PER_IMAGE = {"so400m": 670.0}
TARGET_IMAGES_PER_S = 1000.0  # issue 11: so400m on one H100
TARGET_BUSY = 0.95
PARTS = ("decode", "ceiling", "pipeline", "parity", "gpu-decode", "compile", "pipeline-compiled")
TABLE_HEADER = (
    "| date | machine | size | images | decode ms/img (1 thread) | decode img/s (all cores) | "
    "ceiling img/s | actor-callable img/s | pipeline whole-command img/s | pipeline after first batch img/s | "
    "GPU busy | parity (min cosine, max logit diff) | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


# -- (1) CPU decode ------------------------------------------------------------------------------------------------
def _decode_chunk(args) -> tuple[int, float]:
    paths, model_dir, fast = args
    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.decode import decode_batch

    pre = preprocess_spec(resolve_model(model_dir, trust_remote_code=True, device="cpu"))
    t = time.perf_counter()
    for start in range(0, len(paths), 32):
        out = decode_batch({"uri": np.array(paths[start : start + 32], dtype=object)}, pre, 10**9, fast=fast)
        assert (out["status"] == "ok").all(), out["error"]
    return len(paths), time.perf_counter() - t


def run_decode(paths: list[str], model_dir: Path, sample: int, cores: int) -> dict:
    """One thread over `sample` images (exact and fast), then every core over all the distinct images."""
    out = {"cores": cores, "sample_images": min(sample, len(paths))}
    for mode, fast in (("exact", False), ("fast", True)):
        n, secs = _decode_chunk((paths[:sample], str(model_dir), fast))
        out[f"{mode}_ms_per_image_one_thread"] = round(1000 * secs / n, 3)
        chunks = [(paths[i::cores], str(model_dir), fast) for i in range(cores)]
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
            timings = list(pool.map(_decode_chunk, chunks))
        done, slowest = sum(k for k, _ in timings), max(s for _, s in timings)
        # the processes decode at the same time; each times its own loop (its start-up and imports left out)
        out[f"{mode}_images_per_s_all_cores"] = round(done / slowest, 1)
        out[f"{mode}_all_cores_images"] = done
    return out


# -- (2) the GPU ceiling -------------------------------------------------------------------------------------------
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_loop(step, batch: int, min_s: float, warm: int = 2) -> dict:
    for _ in range(warm):
        step()
    _sync()
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_s:
        step()
        done += batch
    _sync()
    secs = time.perf_counter() - t
    return {"images": done, "seconds": round(secs, 3), "images_per_s": round(done / secs, 1)}


def run_ceiling(
    model_dir: Path, prompts_file: Path, pixels: np.ndarray, batch: int, min_s: float, size: str, compile: bool
) -> dict:
    import torch

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.encode import EncodeBatch
    from pipeline.prompts import load_prompts

    spec = resolve_model(str(model_dir), trust_remote_code=True)
    pre = preprocess_spec(spec)
    t = time.perf_counter()
    encode = EncodeBatch(spec, pre, load_prompts(str(prompts_file)))
    load_s = time.perf_counter() - t
    enc = encode.encoder
    rows = np.resize(pixels, (batch, *pixels.shape[1:]))  # the batch from the decoded pool (repeated if short)
    x = enc.pixel_values(rows).clone()
    model = enc.model
    out = {
        "device": str(enc.device),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "batch_size": batch,
        "model_load_s": round(load_s, 2),
        "micro_batch": encode.micro_batch,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    with torch.inference_mode():
        if not compile:
            out["forward"] = _timed_loop(lambda: model.encode_image(x, normalize=True), batch, min_s)
            piece = enc.pipeline_rows
            if piece and piece < batch:  # the piece the actor's encode_images sends at a time
                out[f"forward_at_{piece}"] = _timed_loop(
                    lambda: model.encode_image(x[:piece], normalize=True), piece, min_s
                )
        batch_rows = {
            "uri": np.array([f"x{i}" for i in range(batch)], dtype=object),
            "pixels": rows,
            "status": np.full(batch, "ok", dtype=object),
            "error": np.full(batch, None, dtype=object),
            "error_class": np.full(batch, None, dtype=object),
        }

        def actor():
            res = encode({**batch_rows})
            assert (res["status"] == "ok").all()

        if not compile:
            out["actor_callable"] = _timed_loop(actor, batch, min_s, warm=1)
        else:  # as the pipeline's --torch-compile does it (dynamic shapes), timed after its first call
            compiled = torch.compile(model.encode_image, dynamic=True)
            t = time.perf_counter()
            compiled(x, normalize=True)
            _sync()
            out["compile_s"] = round(time.perf_counter() - t, 1)
            out["forward_compiled"] = _timed_loop(lambda: compiled(x, normalize=True), batch, min_s)
    flops = GFLOPS_PER_IMAGE.get(size)
    if flops:
        for key in [k for k in out if k.startswith("forward")]:
            if isinstance(out[key], dict):
                out[key]["tflops"] = round(out[key]["images_per_s"] * flops / 1000, 1)
    if torch.cuda.is_available():
        out["memory_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.empty_cache()
    return out


# -- (3) the pipeline, with the GPU sampled ------------------------------------------------------------------------
class GpuSampler:
    """`nvidia-smi` utilisation samples every interval_ms, each stamped on arrival."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[tuple[float, float, float]] = []  # (t, utilisation %, memory used MiB)
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"-lms={interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        # nvidia-smi's utilisation averages over its own past period: the first samples can still show the work of
        # the part before. The run's samples start at the first idle one (Ray starting, the GPU untouched).
        idle = next((i for i, s in enumerate(self.samples) if s[1] == 0), len(self.samples))
        run = self.samples[idle:]
        busy = [i for i, s in enumerate(run) if s[1] > 0]
        raw = [[round(t - self.samples[0][0], 2), u] for t, u, _ in self.samples]
        if not busy:
            return {"samples": len(self.samples), "busy_fraction": 0.0, "raw": raw}
        window = run[busy[0] : busy[-1] + 1]
        util = np.array([s[1] for s in window]) / 100
        # streaming: from the first sample at least half busy (the first batch; the prompt encoding and the memory
        # probe before it are blips) to the last busy one
        first = next((i for i, u in enumerate(util) if u >= 0.5), 0)
        return {
            "samples": len(self.samples),
            "window_s": round(window[-1][0] - window[0][0], 2),
            "busy_fraction": round(float(util.mean()), 3),
            "streaming_s": round(window[-1][0] - window[first][0], 2),
            "busy_fraction_streaming": round(float(util[first:].mean()), 3),
            "memory_peak_mib": max(s[2] for s in self.samples),
            "raw": raw,
        }


def run_pipeline(
    list_file: Path, out: Path, model_dir: Path, prompts_file: Path, n: int, extra: list[str], timeout: float
) -> dict:
    sampler = GpuSampler()
    try:
        res = run_featurize_images(list_file, out, model_dir, prompts_file, extra, n, timeout)
    finally:
        gpu = sampler.stop()
    res["gpu_utilisation"] = gpu
    stages = res.get("stages") or {}
    stream, startup = stages.get("stream_s"), stages.get("startup_s")
    res["stream_images_per_s"] = round(n / stream, 1) if stream else None
    # the rate once the model actor is up: images / (stream time - wait for the first result)
    res["after_first_batch_images_per_s"] = round(n / (stream - startup), 1) if stream and startup else None
    return res


# -- (4) parity against the model card's loop ----------------------------------------------------------------------
def run_parity(out: Path, paths: list[str], model_dir: Path, prompts_file: Path, k: int, k_cpu: int) -> dict:
    import torch
    from transformers import AutoModel, AutoProcessor

    from pipeline.prompts import ensemble, load_prompts
    from pipeline.read import read_features

    uris = paths[:k]
    table = read_features(str(out), columns=["uri", "image_features", "concept_logits"]).to_pydict()
    index = {u: i for i, u in enumerate(table["uri"])}
    rows = [index[u] for u in uris]
    feats = np.array([table["image_features"][i] for i in rows], dtype=np.float32)
    logits = np.array([table["concept_logits"][i] for i in rows], dtype=np.float32)
    prompt_set = load_prompts(str(prompts_file))
    prompts = prompt_set.all_prompts
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    result = {"images": k}

    def loop(device: str, dtype, items: list[str]):
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
        f, lg = [], []
        with torch.inference_mode():
            for s in range(0, len(items), 32):
                inputs = processor(
                    images=[open_photo(p) for p in items[s : s + 32]],
                    text=prompts,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=77,
                )
                o = model(**{key: v.to(device) for key, v in inputs.items()})
                f.append(o["image_features"].float().cpu())
                # the documented formula over the prompt set's concepts (templates ensembled, as the pipeline does)
                concepts = torch.from_numpy(ensemble(o["text_features"].float().cpu().numpy(), prompt_set.counts))
                lg.append(float(o["logit_scale"]) * f[-1] @ concepts.T + float(o["logit_bias"]))
        del model
        return torch.cat(f).numpy(), torch.cat(lg).numpy()

    def compare(name, ref_f, ref_l, n):
        a = feats[:n] / np.linalg.norm(feats[:n], axis=1, keepdims=True)
        b = ref_f / np.linalg.norm(ref_f, axis=1, keepdims=True)
        cos = (a * b).sum(1)
        result[name] = {
            "images": n,
            "cosine_min": round(float(cos.min()), 5),
            "cosine_mean": round(float(cos.mean()), 5),
            "logit_max_abs_diff": round(float(np.abs(logits[:n] - ref_l).max()), 4),
            "logit_range": round(float(np.ptp(ref_l)), 3),
        }

    if torch.cuda.is_available():
        f, lg = loop("cuda", torch.bfloat16, uris)
        compare("vs_loop_gpu_bf16", f, lg, k)
        torch.cuda.empty_cache()
    if k_cpu:
        f, lg = loop("cpu", torch.float32, uris[:k_cpu])
        compare("vs_loop_cpu_fp32", f, lg, k_cpu)
    return result


# -- (5) nvJPEG decode on the GPU ----------------------------------------------------------------------------------
def run_gpu_decode(paths: list[str], model_dir: Path, n: int, batch: int, min_s: float) -> dict:
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.models import Encoder

    spec = resolve_model(str(model_dir), trust_remote_code=True)
    pre = preprocess_spec(spec)
    datas = []
    for p in paths[:n]:
        with open(p, "rb") as f:
            datas.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))

    def decode(items):
        images = decode_jpeg(items, device="cuda")
        return torch.stack(
            [
                F.interpolate(
                    im.unsqueeze(0).float(),
                    size=(pre.height, pre.width),
                    mode="bicubic",
                    antialias=True,
                    align_corners=False,
                )
                .round()
                .clamp(0, 255)[0]
                for im in images
            ]
        ).to(torch.uint8)

    batches = [datas[s : s + batch] for s in range(0, len(datas), batch)]
    state = {"i": 0}

    def step():
        decode(batches[state["i"] % len(batches)])
        state["i"] += 1

    timing = _timed_loop(step, batch, min_s, warm=1)
    timing["images"] = state["i"] * batch - batch  # the last batch may be short; close enough for a rate
    gpu_pixels = torch.cat([decode(b) for b in batches[:2]]).permute(0, 2, 3, 1).cpu().numpy()
    cpu_pixels = common.decoded_pixels(paths, pre, len(gpu_pixels))
    enc = Encoder(spec, pre)
    fa = np.concatenate([enc.encode_images(cpu_pixels[s : s + 64]) for s in range(0, len(cpu_pixels), 64)])
    fb = np.concatenate([enc.encode_images(gpu_pixels[s : s + 64]) for s in range(0, len(gpu_pixels), 64)])
    cos = (fa * fb).sum(1)
    return {
        **timing,
        "batch": batch,
        "resize": "bicubic, antialias, on the GPU",
        "pixel_mean_abs_diff": round(float(np.abs(cpu_pixels.astype(int) - gpu_pixels.astype(int)).mean()), 3),
        "feature_cosine_min": round(float(cos.min()), 5),
        "feature_cosine_mean": round(float(cos.mean()), 5),
        "compared_images": len(cos),
        "exif": "not applied (nvJPEG decodes the stored orientation)",
    }


# -- the record ----------------------------------------------------------------------------------------------------
def markdown_row(rec: dict) -> str:
    d, c, p, par = (rec.get(k) or {} for k in ("decode", "ceiling", "pipeline", "parity"))
    busy = (p.get("gpu_utilisation") or {}).get("busy_fraction")
    actor_busy = (p.get("stages") or {}).get("gpu_busy_fraction")
    par_cell = "-"
    if par.get("vs_loop_gpu_bf16"):
        v = par["vs_loop_gpu_bf16"]
        par_cell = f"{v['cosine_min']}, {v['logit_max_abs_diff']}"

    def f(v):
        return "-" if v is None else f"{v:g}"

    return (
        "| "
        + " | ".join(
            [
                f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}",
                common.machine_short(rec["machine"]),
                rec["size"],
                str(rec["images"]),
                f"{f(d.get('exact_ms_per_image_one_thread'))} (fast {f(d.get('fast_ms_per_image_one_thread'))})",
                f"{f(d.get('exact_images_per_s_all_cores'))} (fast {f(d.get('fast_images_per_s_all_cores'))})",
                f((c.get("forward") or {}).get("images_per_s")),
                f((c.get("actor_callable") or {}).get("images_per_s")),
                f(p.get("whole_command_images_per_s")),
                f(p.get("after_first_batch_images_per_s")),
                f"{f(busy)} (actor {f(actor_busy)})",
                par_cell,
                f"`{rec['command']}`" + (f" {rec['note']}" if rec.get("note") else ""),
            ]
        )
        + " |"
    )


def main(argv=None) -> int:
    measure(argv)
    return 0


def measure(argv=None) -> dict:
    """What `main` does, returning the record."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="so400m", choices=list(common.SIZES), help="model size [so400m]")
    ap.add_argument("--images", type=int, default=20000, help="JPEGs the pipeline processes [20000]")
    ap.add_argument(
        "--distinct",
        type=int,
        default=4000,
        help="distinct photo-sized JPEGs; the rest are hard links to them (own uri, same bytes) [4000]",
    )
    ap.add_argument("--batch-size", type=int, default=256, help="the ceiling's batch (the GPU default) [256]")
    ap.add_argument("--min-s", type=float, default=6.0, help="each timed GPU loop runs at least this long [6]")
    ap.add_argument("--decode-sample", type=int, default=200, help="images decoded on one thread [200]")
    ap.add_argument("--parity-images", type=int, default=64, help="images compared with the loop on the GPU [64]")
    ap.add_argument("--parity-cpu-images", type=int, default=8, help="of those, compared with float32 on CPU [8]")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    ap.add_argument("--pipeline-args", default="", help="extra `featurize images` flags as one string")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache/output folder [bench-out/]")
    ap.add_argument("--timeout", type=float, default=1200, help="the pipeline subprocess, seconds [1200]")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=0,
        help="parts not started this many seconds after the start are skipped (0: none) [0]",
    )
    ap.add_argument("--note", default="", help="a note for the result's table row")
    ap.add_argument("--no-save", action="store_true", help="print only; write no result files")
    args = ap.parse_args(argv)
    common.set_quiet_env()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        ap.error(f"--skip: unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    work = args.work.resolve()
    t_all = time.perf_counter()
    rec = {
        "benchmark": "gpu",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "size": args.size,
        "images": args.images,
        "distinct_images": args.distinct,
        "note": args.note,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "targets": {"images_per_s": TARGET_IMAGES_PER_S, "busy": TARGET_BUSY},
    }
    log(f"machine: {common.machine_short(rec['machine'])}")

    def save():
        rec["elapsed_s"] = round(time.perf_counter() - t_all, 1)
        if not args.no_save:
            common.save_result(rec, f"gpu-{args.size}")

    def part(name: str, fn):
        if name in skip:
            return None
        if args.deadline_s and time.perf_counter() - t_all > args.deadline_s:
            rec[name] = {"skipped": f"not started: past --deadline-s {args.deadline_s}"}
            save()
            return None
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            rec[name] = fn()
        except Exception as exc:  # one part's failure must not cost the others' numbers (device time is short)
            rec[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        rec.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {json.dumps(rec[name], default=str)[:1500]}")
        save()
        return rec[name]

    t = time.perf_counter()
    model_dir = common.bench_model(work, args.size)
    prompts_file = common.bench_prompts(work)
    distinct = common.photo_corpus(work, min(args.distinct, args.images))
    paths = common.linked_corpus(distinct, work / "corpus" / f"linked-{len(distinct)}", args.images, prefix="p")
    list_file = common.write_list(paths, work / "corpus" / f"linked-{len(distinct)}-{args.images}.txt")
    for p in distinct:  # into the page cache: every part reads from memory
        with open(p, "rb") as f:
            f.read()
    rec["setup_s"] = round(time.perf_counter() - t, 1)
    save()

    from pipeline.checkpoint import preprocess_spec, resolve_model

    pre = preprocess_spec(resolve_model(str(model_dir), trust_remote_code=True, device="cpu"))
    part("decode", lambda: run_decode(distinct, model_dir, args.decode_sample, common.usable_cpus()))
    pixels = common.decoded_pixels(distinct, pre, min(len(distinct), args.batch_size))
    part(
        "ceiling",
        lambda: run_ceiling(model_dir, prompts_file, pixels, args.batch_size, args.min_s, args.size, compile=False),
    )
    out = work / "out" / f"gpu-{args.size}-{args.images}"
    extra = args.pipeline_args.split()
    part("pipeline", lambda: run_pipeline(list_file, out, model_dir, prompts_file, args.images, extra, args.timeout))
    if "error" not in (rec.get("pipeline") or {"error": 1}):
        part(
            "parity",
            lambda: run_parity(out, paths, model_dir, prompts_file, args.parity_images, args.parity_cpu_images),
        )
    part("gpu-decode", lambda: run_gpu_decode(distinct, model_dir, 512, args.batch_size, args.min_s))
    # Last, as they may not fit a short lease: the compiled forward, then the pipeline with --torch-compile.
    part(
        "compile",
        lambda: run_ceiling(model_dir, prompts_file, pixels, args.batch_size, args.min_s, args.size, compile=True),
    )
    part(
        "pipeline-compiled",
        lambda: run_pipeline(
            list_file,
            work / "out" / f"gpu-{args.size}-{args.images}-c",
            model_dir,
            prompts_file,
            args.images,
            [*extra, "--torch-compile"],
            args.timeout,
        ),
    )

    p = rec.get("pipeline") or {}
    gpu = p.get("gpu_utilisation") or {}

    def check(value, minimum):
        return {"value": value, "minimum": minimum, "pass": value is not None and value >= minimum}

    rec["checks"] = {  # the run: Ray's start and the model load included; streaming: from the first batch on
        "images_per_s_whole_command": check(p.get("whole_command_images_per_s"), TARGET_IMAGES_PER_S),
        "images_per_s_after_first_batch": check(p.get("after_first_batch_images_per_s"), TARGET_IMAGES_PER_S),
        "busy_run": check(gpu.get("busy_fraction"), TARGET_BUSY),
        "busy_streaming": check(gpu.get("busy_fraction_streaming"), TARGET_BUSY),
    }
    rec["markdown_row"] = markdown_row(rec)
    save()
    if not args.no_save:
        common.append_row("gpu", TABLE_HEADER, rec["markdown_row"])
    print(json.dumps({k: rec.get(k) for k in (*PARTS, "checks")}, indent=1, default=str)[:20000])
    print(rec["markdown_row"])
    return rec


if __name__ == "__main__":
    sys.exit(main())
