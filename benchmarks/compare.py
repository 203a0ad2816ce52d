"""What the throughput benchmarks compare the pipeline with, shared by `benchmarks.run`, `benchmarks.slides` and
`benchmarks.gpu`: the model card's loop (run as its own script), the model-only ceiling, the pipeline's whole
`featurize images` command, and the ratios between them.

    python -m benchmarks.compare ARGS.json      (the loop's own process; `run_loop_script` starts it)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import common
from .common import log


# -- the model-card loop -------------------------------------------------------------------------------------------
def open_photo(path):
    """What the model card's loop does with a file: open, apply EXIF orientation, convert to RGB."""
    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


class TileOpener:
    """The loop's tile reader: one TiffSlide handle per slide, read_region at level 0, RGB."""

    def __init__(self):
        self.handles = {}

    def __call__(self, item):
        from tiffslide import TiffSlide

        uri, x, y, px = item
        h = self.handles.get(uri)
        if h is None:
            h = self.handles[uri] = TiffSlide(uri)
        return h.read_region((x, y), 0, (px, px)).convert("RGB")


def run_loop_script(
    items: list, model_dir: Path, prompts: list[str], batch: int, threads: int, work: Path, opener: str = "photo"
) -> dict:
    """The loop as its own Python process (imports and model load included in its wall time)."""
    args_file = work / "out" / "loop-args.json"
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(
        json.dumps(
            {
                "items": items,
                "model_dir": str(model_dir),
                "prompts": prompts,
                "batch": batch,
                "threads": threads,
                "opener": opener,
            }
        )
    )
    out, wall = common.run_json_child(["benchmarks.compare", str(args_file)])
    out["whole_script_s"] = round(wall, 3)
    out["whole_script_images_per_s"] = round(len(items) / wall, 2)
    return out


def _loop_child(args_file: str) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (timed: a user's script pays these imports)
    import transformers  # noqa: F401

    imports_s = time.perf_counter() - t0
    a = json.loads(Path(args_file).read_text())
    if a["opener"] == "tile":
        opener, items = TileOpener(), [tuple(i) for i in a["items"]]
    else:
        opener, items = open_photo, a["items"]
    out = run_loop(items, Path(a["model_dir"]), a["prompts"], a["batch"], a["threads"], opener=opener)
    out["imports_s"] = round(imports_s, 3)
    return out


def run_loop(paths: list, model_dir: Path, prompts: list[str], batch: int, threads: int, opener=open_photo) -> dict:
    """`opener(item) -> PIL RGB image` is timed as "open" (a file path by default; a slide tile for slides)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    load_s = time.perf_counter() - t_load

    open_s = proc_s = model_s = 0.0
    n_out = 0
    t0 = time.perf_counter()
    for start in range(0, len(paths), batch):
        t = time.perf_counter()
        images = [opener(p) for p in paths[start : start + batch]]
        t1 = time.perf_counter()
        inputs = processor(
            images=images, text=prompts, return_tensors="pt", padding=True, truncation=True, max_length=77
        )
        t2 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T + out["logit_bias"]
        t3 = time.perf_counter()
        n_out += logits.shape[0]
        open_s, proc_s, model_s = open_s + t1 - t, proc_s + t2 - t1, model_s + t3 - t2
    seconds = time.perf_counter() - t0
    assert n_out == len(paths), (n_out, len(paths))
    return {
        "images": len(paths),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(paths) / seconds, 2),
        "model_load_s": round(load_s, 3),
        "batch_size": batch,
        "threads": threads,
        "breakdown_s": {
            "open_exif_rgb": round(open_s, 3),
            "processor": round(proc_s, 3),
            "model_forward": round(model_s, 3),
        },
    }


# -- the model-only ceiling --------------------------------------------------------------------------------------------
def model_preprocess(model_dir: Path):
    from pipeline.checkpoint import preprocess_spec, resolve_model

    return preprocess_spec(resolve_model(str(model_dir), trust_remote_code=True))


def normalised_batches(pixels: list, spec, batch: int):
    """uint8 HxWx3 arrays at the model's input size -> float batches normalised as the processor does."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(torch.float32)
    if spec.do_rescale:
        x = x * spec.rescale_factor
    if spec.do_normalize:
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        x = (x - mean) / std
    return [b.contiguous() for b in x.split(batch)]


def run_ceiling(batches, n: int, model_dir: Path, batch: int, threads: int, min_s: float = 3.0) -> dict:
    """Forward n images (cycling through the pool), and keep going until min_s has passed (a fast model on few
    images would otherwise be timed over milliseconds)."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    with torch.inference_mode():
        model.encode_image(batches[0], normalize=True)  # warm-up
        done, i = 0, 0
        t0 = time.perf_counter()
        while done < n or time.perf_counter() - t0 < min_s:
            xb = batches[i % len(batches)]
            take = min(len(xb), n - done) if done < n else len(xb)
            model.encode_image(xb[:take] if take < len(xb) else xb, normalize=True)
            done += take
            i += 1
        seconds = time.perf_counter() - t0
    return {
        "images": done,
        "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 2),
        "batch_size": batch,
        "threads": threads,
        "distinct_images": sum(len(b) for b in batches),
    }


# -- the pipeline, as a user runs it -----------------------------------------------------------------------------------
def run_featurize_images(
    list_file: Path, out: Path, model_dir: Path, prompts_file: Path, extra: list[str], n: int, timeout: float
) -> dict:
    """`featurize images LIST OUT --model M --prompts P --trust-remote-code EXTRA` as a subprocess, in a fresh OUT,
    wall-timed with its RSS sampled; every one of the n images must come back ok."""
    common.fresh_dir(out)
    cmd = common.featurize_images_cmd(list_file, out, model_dir, prompts_file, extra)
    res = common.run_subprocess(cmd, out.parent / (out.name + ".log"), timeout=timeout)
    record = json.loads((out / "_run.json").read_text())
    c = record["counts"]
    if c.get("processed") != n or c.get("ok") != n:
        raise RuntimeError(f"pipeline processed {c.get('processed')} / ok {c.get('ok')} of {n} images: {c}")
    stages = record.get("stages", {})
    return {
        "command": " ".join(shlex.quote(a) for a in cmd),
        "whole_command_s": res["wall_s"],
        "whole_command_images_per_s": round(n / res["wall_s"], 2),
        # images / stream time (actor start-up included); --marginal replaces it with the start-up-free rate
        "steady_images_per_s": record.get("images_per_s"),
        "first_shard_s": record.get("first_shard_s"),
        "run_wall_s": record.get("wall_s"),
        "outside_stream_s": round(res["wall_s"] - stages.get("stream_s", 0.0), 3),
        "stages": stages,
        "layout": record.get("layout"),
        "counts": c,
        "driver_rss": res["rss"],
        "log": res["log"],
    }


# -- repeats and ratios ------------------------------------------------------------------------------------------------
def repeat(fn, repeats: int, label: str, key: str) -> dict:
    """fn() `repeats` times; the run with the median `key` (its values kept in "repeats" when more than one)."""
    runs = []
    for i in range(repeats):
        log(f"{label}: run {i + 1}/{repeats}")
        runs.append(fn())
        log(f"{label}: {key} = {runs[-1].get(key)}")
    best = dict(runs[0]) if repeats == 1 else dict(sorted(runs, key=lambda r: r.get(key) or 0)[len(runs) // 2])
    if repeats > 1:
        best["repeats"] = [r.get(key) for r in runs]
    return best


def steady_rate(pipe) -> tuple[float | None, str | None]:
    """The pipeline's steady state: the marginal rate when it was taken, else images / stream time (which has
    the model actor's start-up inside, so it understates the steady state)."""
    if not pipe:
        return None, None
    marginal = (pipe.get("marginal") or {}).get("stream_images_per_s")
    if marginal:
        return marginal, "marginal"
    return pipe.get("steady_images_per_s"), "stream"


def ratios(loop, ceiling, pipe, limit=None) -> dict:
    def r(a, b):
        return round(a / b, 3) if a and b else None

    out = {}
    if pipe and limit:
        steady, source = steady_rate(pipe)
        out["steady_over_limit"] = r(steady, limit["images_per_s"])
        out["steady_over_limit_measured_as"] = source
        out["whole_over_limit"] = r(pipe["whole_command_images_per_s"], limit["images_per_s"])
    if pipe and loop:
        # whole command vs whole script (both pay imports and model loading); steady vs the loop's own rate
        out["whole_over_loop"] = r(
            pipe["whole_command_images_per_s"], loop.get("whole_script_images_per_s") or loop["images_per_s"]
        )
        out["steady_over_loop"] = r(pipe["steady_images_per_s"], loop["images_per_s"])
        out["whole_over_loop_only"] = r(pipe["whole_command_images_per_s"], loop["images_per_s"])
        if (pipe.get("marginal") or {}).get("stream_images_per_s"):
            out["marginal_over_loop"] = r(pipe["marginal"]["stream_images_per_s"], loop["images_per_s"])
    if pipe and ceiling:
        out["steady_over_ceiling"] = r(pipe["steady_images_per_s"], ceiling["images_per_s"])
        out["whole_over_ceiling"] = r(pipe["whole_command_images_per_s"], ceiling["images_per_s"])
    if loop and ceiling:
        out["loop_over_ceiling"] = r(loop["images_per_s"], ceiling["images_per_s"])
    return out


def loop_cell(loop) -> str:
    if not loop:
        return "-"
    if loop.get("whole_script_images_per_s"):
        return f"{loop['images_per_s']:g} (script {loop['whole_script_images_per_s']:g})"
    return f"{loop['images_per_s']:g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="The model card's loop as its own process (run_loop_script starts it); prints its record as JSON.",
    )
    ap.add_argument("args_file", help="JSON: items, model_dir, prompts, batch, threads, opener (photo or tile)")
    args = ap.parse_args(argv)
    common.set_quiet_env()
    print(json.dumps(_loop_child(args.args_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
