"""Soak: a long run and a month of nightly runs, with the driver's and the model actor's memory and the throughput
sampled throughout, and every image exactly once at the end.

    python -m benchmarks.soak                                   # 200,000 images; then 20 nights of 10,000
    python -m benchmarks.soak --images 4000 --increments 4      # a quick check (indicative only)

Inputs: --distinct (300) generated 64x48 JPEGs (`pipeline.demo.make_images`; 30% portrait), hard-linked under
--images distinct names in folders of 1,000 (each name is its own uri and input). The model is the demo's tiny
ConceptCLIP-interface model (`pipeline.demo.copy_demo_model`, 64 px input) with the benchmark prompt set; every
command is `featurize images` as a subprocess with `--progress-interval-s 1` and `--rows-per-shard 10000`, the
pipeline's defaults otherwise. Shards of 10,000 rows commit all along, as a real model's ~128 MB shards do; the tiny
model's default shard (~466k rows) would commit once, at the very end, and its one commit's buffers would read as
growth (as in benchmarks.scale's streaming part).

Parts:
  one      one command over the whole folder of --images images into a fresh OUTPUT.
  nightly  --increments commands with `--incremental` into one OUTPUT, over a folder that gains --images /
           --increments new images (hard links) before each: each run must process exactly its new images.

Every second the harness samples the RSS of the driver (the `featurize` process) and of each model actor (the
driver's descendants whose command line names EncodeBatch), with the count of images done from the last progress
line. Figures of the long run:
  - memory growth, driver and each actor: the highest RSS after the run reached 10% of its images minus the RSS
    sampled then; target <= 50 MB each;
  - throughput by tenths of the images, from the progress lines' times (the first tenth counted from the first
    result, so the model's start-up is not in it); target: the last tenth within 10% of the first;
  - exactly once: `pipeline.read_features(OUTPUT)` has one row per image, every one `ok`.
Of the nights: images processed and wall time per night, each night's driver and actor peak RSS, and exactly once
at the end. Writes benchmarks/results/<timestamp>-soak.json and rows in benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

from . import common
from .common import log
from .scale import PROGRESS_RE, Measured

MB = 1024**2
TARGET_IMAGES, TARGET_INCREMENTS = 200_000, 20
GROWTH_MB = 50.0  # driver and actor RSS growth after the first 10%
# the last tenth's rate at least 90% of the first's: within 10%, or faster (a faster end is no slowdown; the first
# tenth still has the stream's warm-up in it)
TENTH_RATIO = 0.90
TABLE_HEADER = (
    "| date | machine | part | images | wall s | images/s | driver RSS MB (at 10%, growth after) | "
    "actor RSS MB (at 10%, growth after) | last/first tenth | exactly once | met | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


# -- inputs ---------------------------------------------------------------------------------------------------------
def soak_corpus(work: Path, n: int, distinct: int) -> list[str]:
    """n distinct names (folders of 1,000) hard-linked to `distinct` generated 64x48 JPEGs, made once."""
    from pipeline.demo import make_images

    pool = work / "corpus" / f"soak-pool-{distinct}"
    if not (pool / ".done").is_file():
        log(f"generating {distinct} 64x48 JPEGs in {pool} (once)")
        make_images(pool, distinct, seed=7, sizes=((64, 48), (64, 48)))
        (pool / ".done").write_text(str(distinct))
    sources = sorted(str(p) for p in pool.glob("*.jpg"))
    return common.linked_corpus(sources, work / "corpus" / f"soak64-{n}", n, prefix="s")


def link_night(paths: list[str], corpus: Path, folder: Path) -> None:
    """Hard-link one night's new images into the nightly input folder, under the same relative names."""
    for path in paths:
        target = folder / Path(path).relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)


def shard_args(args) -> list[str]:
    return ["--rows-per-shard", str(args.rows_per_shard)] if args.rows_per_shard else []


def model_args(work: Path) -> list[str]:
    from pipeline.demo import copy_demo_model

    model = copy_demo_model(work / "models" / "demo")
    return ["--model", str(model), "--trust-remote-code", "--prompts", str(common.bench_prompts(work))]


# -- sampling -------------------------------------------------------------------------------------------------------
class Sampler:
    """Every `interval` s: (s since start, images done, driver RSS, {actor pid: RSS}) of the command Measured runs;
    actors are the driver's descendants whose command line names EncodeBatch."""

    def __init__(self, measured: Measured, interval: float):
        self.measured, self.interval = measured, interval
        self.done = 0
        self.points: list[dict] = []  # progress lines: {"t_s", "done"}
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def on_line(self, line: str, m: Measured) -> None:
        match = PROGRESS_RE.search(line)
        if match:
            self.done = int(match.group(1).replace(",", ""))
            self.points.append({"t_s": round(time.perf_counter() - m.t0, 2), "done": self.done})

    def _actors(self, driver) -> list:
        found = []
        for child in driver.children(recursive=True):
            try:
                if "EncodeBatch" in " ".join(child.cmdline()):
                    found.append(child)
            except Exception:  # gone meanwhile
                continue
        return found

    def _run(self) -> None:
        import psutil

        while getattr(self.measured, "proc", None) is None and not self._stop.is_set():
            time.sleep(0.05)
        actors, scanned = [], 0.0
        while not self._stop.is_set():
            try:
                driver = psutil.Process(self.measured.proc.pid)
                now = time.perf_counter()
                if now - scanned >= 5 or not actors:  # actors appear after start-up, and may be restarted
                    actors, scanned = self._actors(driver), now
                sizes = {}
                for actor in actors:
                    try:
                        sizes[actor.pid] = round(actor.memory_info().rss / MB, 1)
                    except Exception:
                        continue
                sample = {"t_s": round(now - self.measured.t0, 2), "done": self.done}
                self.samples.append({**sample, "driver_mb": round(driver.memory_info().rss / MB, 1), "actors": sizes})
            except Exception:  # the driver has exited
                pass
            self._stop.wait(self.interval)

    def run(self, timeout: float) -> dict:
        self._thread.start()
        try:
            return self.measured.run(timeout)
        finally:
            self._stop.set()
            self._thread.join(timeout=10)


def featurize(cmd: list[str], log_path: Path, interval: float, timeout: float) -> tuple[dict, Sampler]:
    measured = Measured(cmd, log_path, interval=interval)
    sampler = Sampler(measured, interval)
    measured.on_line = sampler.on_line
    return sampler.run(timeout), sampler


# -- figures --------------------------------------------------------------------------------------------------------
def time_at(points: list[dict], done: float) -> float | None:
    """When the progress lines reached `done` images (linear between two lines)."""
    for a, b in zip(points, points[1:]):
        if a["done"] <= done <= b["done"] and b["done"] > a["done"]:
            return a["t_s"] + (b["t_s"] - a["t_s"]) * (done - a["done"]) / (b["done"] - a["done"])
    return None


def tenths(points: list[dict], n: int) -> list[float | None]:
    """Images/s over each tenth of the n images; the first tenth from the first result on."""
    started = [p for p in points if p["done"] > 0]
    if not started:
        return [None] * 10
    rates = []
    for k in range(10):
        lo, hi = max(k * n / 10, started[0]["done"]), (k + 1) * n / 10
        t_lo, t_hi = time_at(started, lo), time_at(started, hi)
        ok = t_lo is not None and t_hi is not None and t_hi > t_lo
        rates.append(round((hi - lo) / (t_hi - t_lo), 1) if ok else None)
    return rates


def growth(samples: list[dict], t10: float | None, value) -> dict:
    """RSS (MB) sampled when the run reached 10%, the highest after it, and the difference."""
    series = [(s["t_s"], value(s)) for s in samples if value(s) is not None]
    if t10 is None or not series:
        return {"at_10pct_mb": None, "peak_after_mb": None, "growth_mb": None}
    at = min(series, key=lambda s: abs(s[0] - t10))[1]
    after = [v for t, v in series if t >= t10] or [at]
    return {"at_10pct_mb": at, "peak_after_mb": max(after), "growth_mb": round(max(after) - at, 1)}


def actor_series(samples: list[dict]) -> list:
    """One RSS series per actor pid seen: a value function for each."""
    pids = sorted({pid for s in samples for pid in s["actors"]})
    return [(pid, lambda s, pid=pid: s["actors"].get(pid)) for pid in pids]


def exactly_once(out: Path, n: int) -> dict:
    import pyarrow.compute as pc

    import pipeline

    table = pipeline.read_features(str(out))
    uris = table.column("uri")
    ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    unique = pc.count_distinct(uris).as_py()
    return {"rows": table.num_rows, "unique_uris": unique, "ok": ok, "pass": table.num_rows == unique == ok == n}


def long_run_figures(res: dict, sampler: Sampler, n: int) -> dict:
    started = [p for p in sampler.points if p["done"] > 0]
    t10 = time_at(started, n / 10) if started and started[0]["done"] < n / 10 else (started or [{}])[0].get("t_s")
    rates = tenths(sampler.points, n)
    ratio = round(rates[-1] / rates[0], 3) if rates[0] and rates[-1] else None
    return {
        "driver": growth(sampler.samples, t10, lambda s: s["driver_mb"]),
        "actors": {str(pid): growth(sampler.samples, t10, value) for pid, value in actor_series(sampler.samples)},
        "tenths_images_per_s": rates,
        "last_over_first_tenth": ratio,
        "at_10pct_s": round(t10, 1) if t10 is not None else None,
    }


def checks(figures: dict, once: dict) -> dict:
    """Each target: measured and pass."""
    actor_growth = [a["growth_mb"] for a in figures["actors"].values()]
    ratio = figures["last_over_first_tenth"]
    out = {
        "driver_growth_mb": (figures["driver"]["growth_mb"], figures["driver"]["growth_mb"] is not None
                             and figures["driver"]["growth_mb"] <= GROWTH_MB),
        "actor_growth_mb": (max(actor_growth, default=None), bool(actor_growth) and
                            all(g is not None and g <= GROWTH_MB for g in actor_growth)),
        "last_over_first_tenth": (ratio, ratio is not None and ratio >= TENTH_RATIO),
        "exactly_once": (once["rows"], once["pass"]),
    }  # fmt: skip
    return {k: {"measured": v, "pass": ok} for k, (v, ok) in out.items()}


def part_one(args, work: Path) -> dict:
    n = args.images
    soak_corpus(work, n, args.distinct)
    out = common.fresh_dir(work / "soak" / "out-one")
    cmd = common.featurize_cmd() + ["images", str(work / "corpus" / f"soak64-{n}"), str(out), *model_args(work)]
    cmd += ["--progress-interval-s", "1", *shard_args(args), *args.extra]
    log(f"one: featurize images over {n:,} images")
    res, sampler = featurize(cmd, work / "soak" / "one.log", args.interval, args.timeout)
    record = json.loads((out / "_run.json").read_text())
    figures = long_run_figures(res, sampler, n)
    once = exactly_once(out, n)
    return {
        "part": "one",
        "images": n,
        "command": shlex.join(cmd),
        **res,
        "images_per_s": round(n / res["wall_s"], 1),
        "stream_images_per_s": record.get("images_per_s"),
        "counts": record["counts"],
        **figures,
        "exactly_once": once,
        "checks": checks(figures, once),
        "progress": sampler.points,
        "samples": sampler.samples,
    }


def one_night(args, work: Path, folder: Path, out: Path, night: int, per: int) -> dict:
    cmd = common.featurize_cmd() + ["images", str(folder), str(out), *model_args(work), "--incremental"]
    cmd += ["--progress-interval-s", "1", *shard_args(args), *args.extra]
    res, sampler = featurize(cmd, work / "soak" / f"night-{night:02d}.log", args.interval, args.timeout)
    c = json.loads((out / "_run.json").read_text())["counts"]
    actors = [
        max(v for s in sampler.samples if (v := value(s)) is not None) for _, value in actor_series(sampler.samples)
    ]
    row = {
        "night": night,
        "wall_s": res["wall_s"],
        "images_per_s": round(per / res["wall_s"], 1),
        "listed": c.get("listed"),
        "processed": c.get("processed"),
        "ok": c.get("ok"),
        "driver_at_first_result_mb": next((x["driver_mb"] for x in sampler.samples if x["done"]), None),
        "driver_peak_mb": res["peak_rss_mb"],
        "actor_peak_mb": max(actors, default=None),
        "command": shlex.join(cmd),
    }
    log(
        f"night {night}: {row['processed']} processed ({row['ok']} ok) of {row['listed']} listed in {res['wall_s']} s; "
        f"driver peak {row['driver_peak_mb']} MB, actor peak {row['actor_peak_mb']} MB"
    )
    return row


def part_nightly(args, work: Path) -> dict:
    n, nights = args.images, args.increments
    per = n // nights
    paths = soak_corpus(work, per * nights, args.distinct)
    corpus = work / "corpus" / f"soak64-{per * nights}"
    folder = common.fresh_dir(work / "soak" / "nightly-in")
    out = common.fresh_dir(work / "soak" / "out-nightly")
    rows = []
    for night in range(1, nights + 1):
        link_night(paths[(night - 1) * per : night * per], corpus, folder)
        rows.append(one_night(args, work, folder, out, night, per))
    once = exactly_once(out, per * nights)
    tenth = max(1, nights // 10)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ratio = round(mean([r["images_per_s"] for r in rows[-tenth:]]) / mean([r["images_per_s"] for r in rows[:tenth]]), 3)
    figures = {
        "driver": _night_growth(rows, tenth, "driver_peak_mb"),
        "actors": {"all": _night_growth(rows, tenth, "actor_peak_mb")},
        "last_over_first_tenth": ratio,
    }
    exact = all(r["processed"] == per and r["ok"] == per for r in rows)
    result = {"part": "nightly", "images": per * nights, "increments": nights, "per_night": per, "nights": rows}
    result.update(figures, exactly_once=once, each_night_exact=exact, wall_s=round(sum(r["wall_s"] for r in rows), 1))
    result["checks"] = checks(figures, once)
    result["checks"]["each_night_exactly_its_new_images"] = {"measured": exact, "pass": exact}
    result["images_per_s"] = round(per * nights / result["wall_s"], 1)
    result["command"] = rows[-1]["command"]
    return result


def _night_growth(rows: list[dict], tenth: int, key: str) -> dict:
    """Per-night peak RSS: the peak of the night that ends the first tenth of nights, the highest after, the rise."""
    peaks = [r[key] for r in rows if r[key] is not None]
    if len(peaks) <= tenth:
        return {"at_10pct_mb": None, "peak_after_mb": None, "growth_mb": None}
    at, after = peaks[tenth - 1], max(peaks[tenth:])
    return {"at_10pct_mb": at, "peak_after_mb": after, "growth_mb": round(after - at, 1)}


# -- the record -----------------------------------------------------------------------------------------------------
def summary_row(rec: dict, r: dict, at_size: bool) -> str:
    c = r["checks"]
    met = all(v["pass"] for v in c.values())
    verdict = ("yes" if met else "no") if at_size else f"({'yes' if met else 'no'}; indicative only)"
    d = r["driver"]
    actors = list(r["actors"].values())
    a = actors[0] if actors else {}
    size = f"{r['images']:,}" + (f" ({r['increments']} x {r['per_night']:,})" if r["part"] == "nightly" else "")
    date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
    return (
        f"| {date} | {common.machine_short(rec['machine'])}{' (noisy)' if rec['noisy'] else ''} | {r['part']} | "
        f"{size} | {r['wall_s']} | {r['images_per_s']} | {d['at_10pct_mb']}, +{d['growth_mb']} | "
        f"{a.get('at_10pct_mb')}, +{a.get('growth_mb')} | {r['last_over_first_tenth']} | "
        f"{r['exactly_once']['rows']:,} rows, {r['exactly_once']['unique_uris']:,} uris, "
        f"{r['exactly_once']['ok']:,} ok | {verdict} | `{rec['command']}` |"
    )


def report(rec: dict, at_size: bool) -> None:
    m = rec["machine"]
    print(f"\nsoak (machine: {common.machine_short(m)}, load {m['loadavg_start']} -> {m.get('loadavg_end')})")
    for r in rec["parts"]:
        if "error" in r:
            print(f"  {r['part']}: FAILED: {r['error'].splitlines()[0]}")
            continue
        print(f"  {r['part']}: {r['images']:,} images in {r['wall_s']} s ({r['images_per_s']} images/s)")
        print(f"    driver RSS {r['driver']}; actors {r['actors']}")
        if r["part"] == "one":
            print(f"    images/s by tenth {r['tenths_images_per_s']}; last/first {r['last_over_first_tenth']}")
        else:
            print("    night  processed  ok      wall s  images/s  driver MB at first result, peak  actor peak MB")
            for n in r["nights"]:
                print(
                    f"    {n['night']:>5}  {n['processed']:>9}  {n['ok']:>6}  {n['wall_s']:>6.1f}  "
                    f"{n['images_per_s']:>8}  {n['driver_at_first_result_mb']:>20}, {n['driver_peak_mb']:>7}  "
                    f"{n['actor_peak_mb']:>13}"
                )
        for name, check in r["checks"].items():
            print(f"    {name}: {check['measured']} -> {'PASS' if check['pass'] else 'FAIL'}")
    if not at_size:
        print("  (below the targets' size: indicative only)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=TARGET_IMAGES, help=f"images in all [{TARGET_IMAGES}]")
    ap.add_argument("--increments", type=int, default=TARGET_INCREMENTS, help=f"nights [{TARGET_INCREMENTS}]")
    ap.add_argument("--only", default="one,nightly", help="comma list of parts [one,nightly]")
    ap.add_argument("--distinct", type=int, default=300, help="distinct JPEGs behind the links [300]")
    ap.add_argument(
        "--rows-per-shard",
        type=int,
        default=10_000,
        help="--rows-per-shard of every command (0 = the pipeline's default) [10000]",
    )
    ap.add_argument("--pipeline-args", default="", help="extra `featurize images` flags, one string")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval, seconds [1.0]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="per featurize command, seconds [14400]")
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    args.extra = shlex.split(args.pipeline_args)
    common.set_quiet_env()
    work = args.work.resolve()
    rec = {
        "benchmark": "soak",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "targets": {"growth_mb": GROWTH_MB, "last_over_first_tenth_min": TENTH_RATIO, "images": TARGET_IMAGES},
        "parts": [],
    }
    for name, run in (("one", part_one), ("nightly", part_nightly)):
        if name in args.only.split(","):
            try:
                rec["parts"].append(run(args, work))
            except Exception as exc:
                log(f"{name}: FAILED: {exc}")
                rec["parts"].append({"part": name, "error": f"{type(exc).__name__}: {exc}"[:4000]})
    rec["machine"]["loadavg_end"] = common.loadavg()
    at_size = args.images >= TARGET_IMAGES and args.increments >= TARGET_INCREMENTS
    report(rec, at_size)
    if not args.no_save:
        path = common.save_result(rec, "soak")
        for r in rec["parts"]:
            if "error" not in r:
                common.append_row("soak", TABLE_HEADER, summary_row(rec, r, at_size))
        log(f"record: {path}")
    failed = any("error" in r or not all(c["pass"] for c in r["checks"].values()) for r in rec["parts"])
    return 1 if failed and at_size else 0


if __name__ == "__main__":
    sys.exit(main())
