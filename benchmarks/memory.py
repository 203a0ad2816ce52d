"""Driver-memory check: the driver's RSS while `featurize images` runs over 10k and 100k small images.

    python -m benchmarks.memory                 # 1k and 10k images (a few minutes on 2 cores)
    python -m benchmarks.memory --with-100k     # adds 100k: the target is < 300 MB growth from 10k to 100k

Each count is a fresh `featurize images LIST OUT` subprocess (tiny model) on a list file of distinct paths (64x64
JPEGs, hard links to a pool of 512 real images, folders of 1,000). The harness samples the subprocess's RSS (the
Ray driver: Ray's workers are other processes) every 0.2 s and reports its peak. Growth = peak RSS at the larger
count minus peak RSS at the smaller one. Writes benchmarks/results/<timestamp>-memory.json and a row in
benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import common
from .common import log

TARGET_MB = 300.0
TABLE_HEADER = (
    "| date | machine | images | driver peak RSS MB | images/s | growth | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- |\n"
)


def run_count(work: Path, n: int, extra: list[str], timeout: float, interval: float) -> dict:
    paths = common.small_corpus(work, n)
    list_file = common.write_list(paths, work / "corpus" / f"small64-{n}.txt")
    model_dir = common.bench_model(work, "tiny")
    prompts = common.bench_prompts(work)
    out = common.fresh_dir(work / "out" / f"memory-{n}")
    cmd = common.featurize_images_cmd(list_file, out, model_dir, prompts, extra)
    log(f"memory: {n} images")
    res = common.run_subprocess(cmd, work / "out" / f"memory-{n}.log", timeout=timeout)
    record = json.loads((out / "_run.json").read_text())
    c = record["counts"]
    if c.get("ok") != n:
        raise RuntimeError(f"{n} images: only {c.get('ok')} ok ({c})")
    row = {
        "images": n,
        "command": " ".join(shlex.quote(a) for a in cmd),
        "wall_s": res["wall_s"],
        "driver_rss": res["rss"],
        "images_per_s": record.get("images_per_s"),
        "stages": record.get("stages"),
        "first_shard_s": record.get("first_shard_s"),
    }
    log(f"memory: {n} images: driver peak RSS {res['rss'].get('peak_mb')} MB, {res['wall_s']} s")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,10000", help="comma list of image counts [1000,10000]")
    ap.add_argument("--with-100k", action="store_true", help="add 100,000 images (the target's end point)")
    ap.add_argument("--pipeline-args", default="", help="extra `featurize images` flags, one string")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval, seconds [0.2]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []  # `... -- --fast-decode`: pipeline flags
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    common.set_quiet_env()

    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()} | ({100_000} if args.with_100k else set()))
    work = args.work.resolve()
    extra = shlex.split(args.pipeline_args) + passthrough
    rec = {
        "benchmark": "driver_memory",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "target_growth_mb_10k_to_100k": TARGET_MB,
        "runs": [],
    }
    for n in counts:
        rec["runs"].append(run_count(work, n, extra, args.timeout, args.interval))
    rec["machine"]["loadavg_end"] = common.loadavg()

    peaks = {r["images"]: (r["driver_rss"] or {}).get("peak_mb") for r in rec["runs"]}
    growth = {}
    ordered = sorted(peaks)
    for a, b in zip(ordered, ordered[1:]):
        if peaks[a] is not None and peaks[b] is not None:
            growth[f"{a}->{b}"] = round(peaks[b] - peaks[a], 1)
    rec["growth_mb"] = growth
    if 10_000 in peaks and 100_000 in peaks:
        g = growth.get("10000->100000")
        rec["target"] = {"growth_mb": g, "maximum": TARGET_MB, "pass": g is not None and g < TARGET_MB}
    elif len(ordered) >= 2 and ordered[-2] >= 1000:
        a, b = ordered[-2], ordered[-1]
        per_image = (peaks[b] - peaks[a]) / (b - a)
        rec["extrapolated_growth_10k_to_100k_mb"] = round(per_image * 90_000, 1)

    print(
        f"\ndriver memory (machine: {common.machine_short(rec['machine'])}, load "
        f"{rec['machine']['loadavg_start']} -> {rec['machine']['loadavg_end']})"
    )
    for r in rec["runs"]:
        rss = r["driver_rss"] or {}
        print(
            f"  {r['images']:>7} images: driver RSS first {rss.get('first_mb')} MB, peak {rss.get('peak_mb')} MB, "
            f"last {rss.get('last_mb')} MB; {r['wall_s']} s whole command, {r['images_per_s']} img/s steady"
        )
    for k, v in growth.items():
        print(f"  growth {k}: {v} MB")
    if "target" in rec:
        t = rec["target"]
        print(f"  target growth 10k->100k < {TARGET_MB} MB: {t['growth_mb']} -> {'PASS' if t['pass'] else 'FAIL'}")
    elif "extrapolated_growth_10k_to_100k_mb" in rec:
        print(
            f"  linear extrapolation to 10k->100k: {rec['extrapolated_growth_10k_to_100k_mb']} MB (indicative "
            f"only; run --with-100k for the target)"
        )
    if not args.no_save:
        path = common.save_result(rec, "memory")
        date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
        for i, r in enumerate(rec["runs"]):
            key = f"{ordered[i - 1]}->{r['images']}" if i else None
            g = f"{growth[key]} MB" if key in growth else "-"
            note = " (noisy)" if args.noisy else ""
            common.append_row(
                "memory",
                TABLE_HEADER,
                f"| {date} | {common.machine_short(rec['machine'])} | {r['images']} | "
                f"{(r['driver_rss'] or {}).get('peak_mb')} | {r['images_per_s']} | {g} | "
                f"`{rec['command']}`{note} |",
            )
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
