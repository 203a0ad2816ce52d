"""Scale: the driver's memory and time when planning 10M inputs, streaming 200k images and planning 1M slide tiles.

    python -m benchmarks.scale                                  # all four parts at the targets' sizes (long)
    python -m benchmarks.scale --only dry,incremental           # the two image dry runs (10M uris)
    python -m benchmarks.scale --only streaming --streaming 200000
    python -m benchmarks.scale --only slides --tiles 1000000
    python -m benchmarks.scale --uris 200000 --streaming 5000 --tiles 100000 --slide-px 8192 --noisy   # quick check

Parts (each a `featurize` subprocess; the harness measures that process only, never Ray's workers):
  dry          `featurize images MANIFEST OUT --dry-run` over a Parquet manifest of N synthetic uris (uri, size,
               mtime, etag; s3-style or local paths that need not exist: a dry run never reads them) into an empty
               OUTPUT. Targets at 10M: driver peak RSS <= 1.5 GB, wall <= 90 s on 2 cores.
  incremental  `featurize images MANIFEST OUT --dry-run --incremental`: an N-row manifest against an OUTPUT of N
               committed rows (synthetic part-NNNNN.parquet shards of --shard-rows rows with the columns planning
               reads, and _dataset.json with the run's identity); the manifest drops --new committed uris, adds
               --new new ones and changes the size (and etag) of --changed others. Asserts planned == new + changed.
               Targets at 10M: peak RSS <= 2 GB, wall <= 120 s.
  streaming    a real `featurize images LIST OUT` with the tiny model over N distinct 32x32 JPEGs (hard links to
               a pool of 512, made once): the driver's RSS read at the progress line that first reaches N/10 and
               at the end (`--progress-interval-s 1`). Target at 200k: peak RSS growth from 20k to 200k <= 50 MB.
               Shards of --streaming-shard-rows rows (10,000: units commit all along, the first before N/10, as
               in a long run; the tiny model's default shard, ~466k rows, would commit once, at the end, and the
               growth would be that one commit's buffers, not a cost per input; 0 = the default).
  slides       `featurize slides SLIDES OUT --dry-run` (Ray starts for the planning tasks; no model runs) over
               all-tissue pyramidal TIFFs (one file, hard-linked --slides times) cut so the plan has >= --tiles
               tiles. Target at 1M tiles: driver peak RSS <= 1 GB.

Peak RSS is the kernel's high-water mark of the featurize process itself (VmHWM of /proc/self/status, written by
an exit hook in that process; see HOOK), not of Ray's workers; the harness also samples VmRSS and VmHWM every
--interval s (the fallback, and the streaming part's reading at N/10). MB here are MiB and the GB targets GiB.
Writes benchmarks/results/<timestamp>-scale.json and one row per part in benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import common
from .common import log

MB = 1024**2
PARTS = ("dry", "incremental", "streaming", "slides")
TARGETS = {  # part: (the size the target is stated at, {metric: maximum})
    "dry": (10_000_000, {"peak_rss_mb": 1.5 * 1024, "wall_s": 90.0}),
    "incremental": (10_000_000, {"peak_rss_mb": 2.0 * 1024, "wall_s": 120.0}),
    "streaming": (200_000, {"growth_mb": 50.0}),
    "slides": (1_000_000, {"peak_rss_mb": 1.0 * 1024}),
}
GEN_CHUNK = 1_000_000  # manifest rows generated (and written as a row group) at a time
RUN_ID = "20260101T000000Z-scale0"  # the synthetic committed run
SLIDE_MPP = 0.5
TISSUE_RGB = (196, 96, 164)  # one saturated colour: every mask pixel is tissue (saturation 130 > 20, Otsu 0)
PROGRESS_RE = re.compile(r"featurize: (?:\[[#.]*\] )?([\d,]+)/([\d,]+) (\w+) \(")
TABLE_HEADER = (
    "| date | machine | part | size | driver peak RSS MB | wall s | counts | target | met | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


# -- measuring one featurize process --------------------------------------------------------------------------------
# The featurize process's own high-water mark as it exits: a sitecustomize module (on PYTHONPATH for the command
# only) registers, first and so run last, an atexit hook that writes VmHWM from /proc/self/status to a file, in the
# process whose parent is this harness only (Ray's workers inherit the environment but have other parents).
# getrusage's ru_maxrss (wait4, RUSAGE_CHILDREN, /usr/bin/time) is no substitute here: a child that Python spawns
# with vfork keeps the harness's high-water mark across exec, and Ray's processes reaped by the driver count too.
HOOK = """\
import atexit as _atexit, os as _os, sys as _sys


def _scale_hwm():
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    values[line.split(":")[0]] = int(line.split()[1]) * 1024
        with open(_os.environ["SCALE_BENCH_HWM_FILE"], "w", encoding="ascii") as f:
            f.write("%d %d\\n" % (values.get("VmHWM", 0), values.get("VmRSS", 0)))
    except Exception:
        pass


if _os.environ.get("SCALE_BENCH_HWM_FILE") and _os.environ.get("SCALE_BENCH_PARENT") == str(_os.getppid()):
    _atexit.register(_scale_hwm)
# a sitecustomize of the environment's own still runs
try:
    import importlib.machinery as _machinery, importlib.util as _util

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _spec = _machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
    if _spec is not None and _spec.loader is not None:
        _spec.loader.exec_module(_util.module_from_spec(_spec))
except Exception:
    pass
"""


def _proc_status(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes from /proc/PID/status (psutil's rss where /proc is missing; no high-water mark)."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        rss = common.rss_bytes(pid) if not os.path.exists("/proc") else None
    return rss, hwm


class Measured:
    """Runs one command: stdout kept (its last line is the dry run's JSON), stderr to a log and, line by line, to
    on_line(line, measured); VmRSS and VmHWM sampled every `interval` s, and VmHWM read at exit (HOOK)."""

    def __init__(self, cmd: list[str], log_path: Path, interval: float = 0.2, on_line=None):
        self.cmd, self.log_path, self.interval, self.on_line = cmd, log_path, interval, on_line
        self.samples: list[tuple[float, int]] = []  # (s since start, VmRSS bytes)
        self.hwm = 0
        self.stdout: list[str] = []
        self._stop = threading.Event()

    def now(self) -> dict:
        """The process's RSS and high-water mark right now (MB), for a progress line."""
        rss, hwm = _proc_status(self.proc.pid)
        if hwm:
            self.hwm = max(self.hwm, hwm)
        return {"rss_mb": round(rss / MB, 1) if rss else None, "hwm_mb": round(self.hwm / MB, 1) if self.hwm else None}

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, hwm = _proc_status(self.proc.pid)
            if rss:
                self.samples.append((time.perf_counter() - self.t0, rss))
            if hwm:
                self.hwm = max(self.hwm, hwm)
            self._stop.wait(self.interval)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line.rstrip("\n"))

    def _read_stderr(self, out) -> None:
        for line in self.proc.stderr:
            out.write(line)
            out.flush()
            if self.on_line is not None:
                try:
                    self.on_line(line.rstrip("\n"), self)
                except Exception as exc:  # a harness bug must not hang the run
                    log(f"progress callback failed: {exc!r}")

    def _env(self, hook_dir: Path, hwm_file: Path) -> dict:
        hook_dir.mkdir(parents=True, exist_ok=True)
        if not (hook_dir / "sitecustomize.py").is_file() or (hook_dir / "sitecustomize.py").read_text() != HOOK:
            (hook_dir / "sitecustomize.py").write_text(HOOK)
        hwm_file.unlink(missing_ok=True)
        env = common.quiet_env()
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(SCALE_BENCH_HWM_FILE=str(hwm_file), SCALE_BENCH_PARENT=str(os.getpid()))
        return env

    def run(self, timeout: float) -> dict:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        hwm_file = self.log_path.with_suffix(".hwm")
        env = self._env(self.log_path.parent / "_hook", hwm_file)
        with open(self.log_path, "w", encoding="utf-8") as out:
            out.write("$ " + " ".join(shlex.quote(c) for c in self.cmd) + "\n")
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=str(common.ROOT),
                bufsize=1,
            )
            threads = [
                threading.Thread(target=self._sample, daemon=True),
                threading.Thread(target=self._read_stdout, daemon=True),
                threading.Thread(target=self._read_stderr, args=(out,), daemon=True),
            ]
            for t in threads:
                t.start()
            timer = threading.Timer(timeout, self.proc.kill)
            timer.start()
            try:
                rc = self.proc.wait()
            finally:
                timer.cancel()
            wall = time.perf_counter() - self.t0
            self._stop.set()
            for t in threads:
                t.join(timeout=10)
            if self.stdout:
                out.write("--- stdout ---\n" + "\n".join(self.stdout) + "\n")
        if rc != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            why = f"killed after {timeout} s" if rc == -9 and wall >= timeout else f"exit {rc}"
            raise RuntimeError(
                f"{why}: {' '.join(shlex.quote(c) for c in self.cmd)}\n--- log tail ({self.log_path}) ---\n{tail}"
            )
        exit_hwm = None
        try:
            exit_hwm = int(hwm_file.read_text().split()[0]) or None
        except (OSError, ValueError, IndexError):
            log(f"no exit high-water mark from {self.cmd[0]} (hook not run): the sampled peak is used")
        rss = [r for _, r in self.samples]
        sampled_peak = max(rss) if rss else 0
        # (the kernel's counters are per-thread caches, so a sample can read a little above the exit value)
        peak = max(exit_hwm or 0, self.hwm, sampled_peak)
        return {
            "wall_s": round(wall, 3),
            "peak_rss_mb": round(peak / MB, 1),
            "peak_source": "VmHWM at exit" if exit_hwm else "sampled",
            "exit_hwm_mb": round(exit_hwm / MB, 1) if exit_hwm else None,
            "sampled_hwm_mb": round(self.hwm / MB, 1) if self.hwm else None,
            "sampled_peak_rss_mb": round(sampled_peak / MB, 1),
            "samples": len(rss),
            "first_rss_mb": round(rss[0] / MB, 1) if rss else None,
            "last_rss_mb": round(rss[-1] / MB, 1) if rss else None,
            "peak_rss_at_s": round(self.samples[rss.index(sampled_peak)][0], 2) if rss else None,
            "log": str(self.log_path),
        }


def last_json(lines: list[str]) -> dict:
    """The dry run's JSON object: the last non-empty line of stdout."""
    for line in reversed(lines):
        if line.strip():
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"the last stdout line is not a JSON object: {line[:200]}")
            return obj
    raise ValueError("the dry run printed nothing on stdout")


def expect(counts: dict, wanted: dict, what: str) -> None:
    wrong = {k: (counts.get(k), v) for k, v in wanted.items() if counts.get(k) != v}
    if wrong:
        raise AssertionError(f"{what}: unexpected counts (got, wanted): {wrong}; all: {counts}")


# -- synthetic manifests and committed shards -----------------------------------------------------------------------
def synthetic(ids, style: str, changed=None):
    """LISTING columns for integer ids: uri (s3-style or a local path, 1,000 a folder, sorted as the ids), size,
    mtime, etag (s3 only). `changed`: a bool mask of rows whose object was rewritten (size + 1, new etag, mtime +
    60 s)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = np.asarray(ids, dtype=np.int64)
    pad = lambda a, n: pc.utf8_lpad(pc.cast(pa.array(a), pa.string()), n, "0")  # noqa: E731
    prefix = "s3://scale-bench/images/d" if style == "s3" else "/data/scale-bench/images/d"
    uri = pc.binary_join_element_wise(prefix, pad(ids // 1000, 6), "/img_", pad(ids, 9), ".jpg", "")
    size = 20_000 + (ids * 7919) % 80_000
    mtime = 1.7e9 + (ids % 86_400).astype(np.float64)
    etag = (
        pc.binary_join_element_wise(pad((ids * 2654435761) % 4294967296, 10), pad(ids, 10), "")
        if style == "s3"
        else pa.nulls(len(ids), pa.string())
    )
    if changed is not None and changed.any():
        size = size + changed.astype(np.int64)
        mtime = mtime + 60.0 * changed
        if style == "s3":
            etag = pc.if_else(pa.array(changed), pc.binary_join_element_wise("c", etag, ""), etag)
    return {
        "uri": uri,
        "size": pa.array(size, pa.int64()),
        "mtime": pa.array(mtime, pa.float64()),
        "etag": etag.cast(pa.string()),
    }


def write_manifest(path: Path, ranges: list[tuple[int, int]], style: str, changed_ids=None) -> Path:
    """A Parquet manifest (uri, size, mtime, etag) of the ids in `ranges` ([start, stop) pairs), written in row
    groups of GEN_CHUNK rows; made once (a marker file beside it names what it holds)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sources import LISTING_SCHEMA

    marker = path.with_suffix(".done")
    key = json.dumps(
        {
            "ranges": ranges,
            "style": style,
            "changed": None if changed_ids is None else [len(changed_ids), int(changed_ids[0]), int(changed_ids[-1])],
        }
    )
    if path.is_file() and marker.is_file() and marker.read_text() == key:
        return path
    t = time.perf_counter()
    rows = sum(b - a for a, b in ranges)
    log(f"writing a {rows:,}-row manifest {path.name} (once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, LISTING_SCHEMA, compression="zstd") as writer:
        for a, b in ranges:
            for start in range(a, b, GEN_CHUNK):
                ids = np.arange(start, min(b, start + GEN_CHUNK), dtype=np.int64)
                mask = np.isin(ids, changed_ids) if changed_ids is not None else None
                writer.write_table(pa.table(synthetic(ids, style, mask), schema=LISTING_SCHEMA))
    os.replace(tmp, path)
    marker.write_text(key)
    log(f"manifest written in {time.perf_counter() - t:.1f} s ({path.stat().st_size / MB:.0f} MB)")
    return path


def write_committed(out: Path, n: int, shard_rows: int, style: str) -> Path:
    """OUTPUT holding n committed rows (ids 0..n-1, status ok, dataset version 1, one run) in part-NNNNN.parquet
    shards of shard_rows rows, with the columns planning reads (uri, status, size, mtime, etag, run_id,
    dataset_version; no features), and that run's record. Made once; _dataset.json is written by the caller."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import IMAGE_SCHEMA

    cols = ["uri", "status", "size", "mtime", "etag", "run_id", "dataset_version"]
    schema = pa.schema([IMAGE_SCHEMA.field(c) for c in cols])
    marker = out.with_name(out.name + ".done")
    key = json.dumps({"rows": n, "shard_rows": shard_rows, "style": style})
    if out.is_dir() and marker.is_file() and marker.read_text() == key:
        return out
    t = time.perf_counter()
    units = math.ceil(n / shard_rows)
    log(f"writing {n:,} committed rows in {units} shards under {out} (once)")
    common.fresh_dir(out)
    (out / "_runs").mkdir(parents=True)
    for unit in range(units):
        ids = np.arange(unit * shard_rows, min(n, (unit + 1) * shard_rows), dtype=np.int64)
        c = synthetic(ids, style)
        table = pa.table(
            {
                "uri": c["uri"],
                "status": pa.repeat(pa.scalar("ok"), len(ids)),
                "size": c["size"],
                "mtime": c["mtime"],
                "etag": c["etag"],
                "run_id": pa.repeat(pa.scalar(RUN_ID), len(ids)),
                "dataset_version": pa.array(np.ones(len(ids), np.int32)),
            },
            schema=schema,
        )
        pq.write_table(table, out / f"part-{unit:05d}.parquet", compression="zstd")
    (out / "_runs" / f"{RUN_ID}.json").write_text(
        json.dumps(
            {
                "run_id": RUN_ID,
                "command": "images",
                "state": "complete",
                "input": "scale-bench",
                "dataset_version": 1,
                "last_unit": units - 1,
                "counts": {"listed": n, "processed": n, "ok": n, "error": 0},
            }
        )
    )
    marker.write_text(key)
    log(f"committed shards written in {time.perf_counter() - t:.1f} s")
    return out


def run_identity(manifest: Path, out: Path, model_dir: Path, prompts: Path) -> dict:
    """The identity a run of this model and prompt set records in _dataset.json (dtype as a CPU run settles it)."""
    from pipeline.config import RunConfig
    from pipeline.job import resolve_job

    cfg = RunConfig(
        input=str(manifest), output=str(out), model=str(model_dir), prompts=str(prompts), trust_remote_code=True
    )
    identity = resolve_job(cfg).identity()
    if identity.get("dtype") == "auto":
        identity["dtype"] = "float32"
    return identity


def model_args(work: Path) -> list[str]:
    return [
        "--model",
        str(common.bench_model(work, "tiny")),
        "--prompts",
        str(common.bench_prompts(work)),
        "--trust-remote-code",
    ]


# -- the parts ------------------------------------------------------------------------------------------------------
def part_dry(args, work: Path) -> dict:
    n = args.uris
    manifest = write_manifest(work / "scale" / f"manifest-{n}-{args.uri_style}.parquet", [(0, n)], args.uri_style)
    out = common.fresh_dir(work / "scale" / "out-dry-empty")
    out.mkdir(parents=True)
    cmd = common.featurize_cmd() + ["images", str(manifest), str(out), "--dry-run", *model_args(work), *args.extra]
    log(f"dry: featurize images --dry-run over {n:,} uris")
    m = Measured(cmd, work / "scale" / f"dry-{n}.log", args.interval)
    res = m.run(args.timeout)
    counts = last_json(m.stdout)
    expect(
        counts,
        {"listed": n, "duplicates": 0, "unique": n, "new": n, "changed": 0, "unchanged": 0, "planned": n},
        "dry run",
    )
    rps = counts.get("rows_per_shard")
    if rps and counts.get("work_units") != math.ceil(n / rps):
        raise AssertionError(f"dry run: {counts.get('work_units')} work units for {n} rows of {rps} a shard")
    if any(out.iterdir()):
        raise AssertionError(f"the dry run wrote into {out}: {sorted(p.name for p in out.iterdir())}")
    return {"part": "dry", "size": n, "uri_style": args.uri_style, "command": _quoted(cmd), **res, "dry_run": counts}


def part_incremental(args, work: Path) -> dict:
    import numpy as np

    n, new, changed = args.uris, args.new, args.changed
    if new + changed > n:
        raise SystemExit(f"--new {new} + --changed {changed} is more than --uris {n}")
    kept = n - new  # the manifest drops the last `new` committed uris and adds `new` uris after them
    stride = max(1, kept // max(1, changed))
    changed_ids = (np.arange(changed, dtype=np.int64) * stride + stride // 2) if changed else None
    manifest = write_manifest(
        work / "scale" / f"manifest-incr-{n}-{new}-{changed}-{args.uri_style}.parquet",
        [(0, kept), (n, n + new)],
        args.uri_style,
        changed_ids,
    )
    out = write_committed(
        work / "scale" / f"out-committed-{n}-{args.shard_rows}-{args.uri_style}", n, args.shard_rows, args.uri_style
    )
    identity = run_identity(manifest, out, common.bench_model(work, "tiny"), common.bench_prompts(work))
    (out / "_dataset.json").write_text(json.dumps({"identity": identity, "version": 1}))
    before = sorted(p.name for p in out.iterdir())
    cmd = common.featurize_cmd() + [
        "images",
        str(manifest),
        str(out),
        "--dry-run",
        "--incremental",
        *model_args(work),
        *args.extra,
    ]
    log(
        f"incremental: featurize images --dry-run --incremental, {n:,} uris against {n:,} committed rows "
        f"({new} new, {changed} changed)"
    )
    m = Measured(cmd, work / "scale" / f"incremental-{n}.log", args.interval)
    res = m.run(args.timeout)
    counts = last_json(m.stdout)
    expect(
        counts,
        {
            "listed": n,
            "duplicates": 0,
            "new": new,
            "changed": changed,
            "unchanged": n - new - changed,
            "planned": new + changed,
            "dataset_version": 1,
        },
        "incremental dry run",
    )
    if sorted(p.name for p in out.iterdir()) != before:
        raise AssertionError(f"the dry run changed {out}")
    return {
        "part": "incremental",
        "size": n,
        "new": new,
        "changed": changed,
        "uri_style": args.uri_style,
        "committed_shards": math.ceil(n / args.shard_rows),
        "shard_rows": args.shard_rows,
        "command": _quoted(cmd),
        **res,
        "dry_run": counts,
    }


def part_streaming(args, work: Path) -> dict:
    n = args.streaming
    checkpoint = args.streaming_from or max(1, n // 10)
    paths = common.small_corpus(work, n, size=32)
    list_file = common.write_list(paths, work / "corpus" / f"small32-{n}.txt")
    del paths
    out = common.fresh_dir(work / "scale" / f"out-streaming-{n}")
    cmd = common.featurize_cmd() + [
        "images",
        str(list_file),
        str(out),
        *model_args(work),
        "--progress-interval-s",
        "1",
        "--rows-per-shard",
        str(args.streaming_shard_rows),
        *args.extra,
    ]
    points: list[dict] = []

    def on_line(line: str, m: Measured) -> None:
        match = PROGRESS_RE.search(line)
        if match:
            points.append(
                {"done": int(match.group(1).replace(",", "")), "t_s": round(time.perf_counter() - m.t0, 2), **m.now()}
            )

    log(f"streaming: featurize images over {n:,} 32x32 JPEGs (RSS at >= {checkpoint:,} and at the end)")
    m = Measured(cmd, work / "scale" / f"streaming-{n}.log", args.interval, on_line)
    res = m.run(args.timeout)
    record = json.loads((out / "_run.json").read_text())
    c = record["counts"]
    if c.get("ok") != n:
        raise RuntimeError(f"streaming: {c.get('ok')} of {n} images ok ({c})")
    at = next((p for p in points if p["done"] >= checkpoint), None)
    end = points[-1] if points else None
    growth = rss_growth = None
    if at is not None and at["hwm_mb"] is not None:
        growth = round(res["peak_rss_mb"] - at["hwm_mb"], 1)
    if at is not None and end is not None and at["rss_mb"] is not None and end["rss_mb"] is not None:
        rss_growth = round(end["rss_mb"] - at["rss_mb"], 1)
    if at is None:
        log(f"streaming: no progress line reached {checkpoint:,} (got {len(points)} lines): no growth figure")
    return {
        "part": "streaming",
        "size": n,
        "checkpoint": checkpoint,
        "command": _quoted(cmd),
        **res,
        "at_checkpoint": at,
        "at_end": end,
        "growth_mb": growth,
        "rss_growth_mb": rss_growth,
        "progress": points,
        "images_per_s": record.get("images_per_s"),
        "stages": record.get("stages"),
        "rows_per_shard": c.get("rows_per_shard"),
        "work_units": len(set(p.name for p in out.glob("part-*"))),
        "counts": c,
    }


def write_slide(path: Path, side: int, levels: int = 3, tile: int = 256) -> Path:
    """An all-tissue pyramidal TIFF, side x side at SLIDE_MPP (resolution tags in centimetres), zlib tiles of one
    colour (exact after decoding, so the Otsu tissue mask is the whole slide), reduced levels as subfiletype=1
    pages. Written tile by tile: no full-size array in memory."""
    import numpy as np
    import tifffile

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tiff")
    block = np.empty((tile, tile, 3), np.uint8)
    block[...] = TISSUE_RGB
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i in range(levels + 1):
            s = max(1, side >> i)
            t = tile
            while t > 16 and s < t:
                t //= 2
            count = math.ceil(s / t) ** 2
            res = 1e4 / (SLIDE_MPP * 2**i)
            tw.write(
                (block[:t, :t] for _ in range(count)),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(t, t),
                photometric="rgb",
                compression="zlib",
                metadata=None,
                subfiletype=0 if i == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    os.replace(tmp, path)
    return path


def part_slides(args, work: Path) -> dict:
    side, tile_px = args.slide_px, args.tile_px
    per_slide = (side // tile_px) ** 2
    count = args.slides or math.ceil(args.tiles / per_slide)
    folder = work / "scale" / "slides"
    source = write_slide(folder / f"tissue-{side}.tiff", side)
    inp = folder / f"in-{side}-n{count}"
    inp.mkdir(parents=True, exist_ok=True)
    for i in range(count):  # one file, `count` slides (distinct uris, so distinct slides to the pipeline)
        link = inp / f"slide_{i:04d}.tiff"
        if not link.exists():
            os.link(source, link)
    out = common.fresh_dir(work / "scale" / "out-slides-empty")
    out.mkdir(parents=True)
    cmd = common.featurize_cmd() + [
        "slides",
        str(inp),
        str(out),
        "--dry-run",
        *model_args(work),
        "--target-mpp",
        str(SLIDE_MPP),
        "--tile-px",
        str(tile_px),
        *args.extra,
    ]
    log(
        f"slides: featurize slides --dry-run over {count} slide(s) of {side}x{side} px, {tile_px}-px tiles "
        f"({count * per_slide:,} expected)"
    )
    m = Measured(cmd, work / "scale" / f"slides-{side}-n{count}.log", args.interval)
    res = m.run(args.timeout)
    counts = last_json(m.stdout)
    expect(counts, {"slides": count, "slide_errors_at_planning": 0, "tiles": count * per_slide}, "slides dry run")
    return {
        "part": "slides",
        "size": counts["tiles"],
        "slides": count,
        "slide_px": side,
        "tile_px": tile_px,
        "command": _quoted(cmd),
        **res,
        "dry_run": counts,
    }


# -- the record -----------------------------------------------------------------------------------------------------
def _quoted(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def judge(result: dict) -> dict:
    """Each target of the part: measured, maximum, pass; `at_size` says whether the run was at the target's size
    (a smaller run's PASS/FAIL is indicative only)."""
    size, limits = TARGETS[result["part"]]
    checks = {
        k: {"measured": result.get(k), "maximum": v, "pass": result.get(k) is not None and result[k] <= v}
        for k, v in limits.items()
    }
    return {
        "at_size": result["size"] >= size,
        "target_size": size,
        "checks": checks,
        "pass": all(c["pass"] for c in checks.values()),
    }


def counts_cell(r: dict) -> str:
    d = r.get("dry_run") or {}
    if r["part"] == "dry":
        return f"planned {d.get('planned'):,} in {d.get('work_units')} units"
    if r["part"] == "incremental":
        return f"new {d.get('new')}, changed {d.get('changed')}, planned {d.get('planned')}"
    if r["part"] == "streaming":
        at, end = r.get("at_checkpoint") or {}, r.get("at_end") or {}
        return (
            f"RSS {at.get('rss_mb')} MB at {at.get('done', 0):,}, {end.get('rss_mb')} MB at "
            f"{end.get('done', 0):,}; peak growth {r.get('growth_mb')} MB"
        )
    return f"{d.get('tiles'):,} tiles from {d.get('slides')} slides"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts [{','.join(PARTS)}]")
    ap.add_argument("--uris", type=int, default=10_000_000, help="manifest rows (dry, incremental) [10000000]")
    ap.add_argument(
        "--uri-style",
        choices=["s3", "local"],
        default="s3",
        help="s3://... uris with etags, or local paths without [s3]",
    )
    ap.add_argument("--new", type=int, default=500, help="incremental: new uris [500]")
    ap.add_argument("--changed", type=int, default=500, help="incremental: committed uris whose size changed [500]")
    ap.add_argument("--shard-rows", type=int, default=40_000, help="incremental: rows per committed shard [40000]")
    ap.add_argument("--streaming", type=int, default=200_000, help="streaming: images [200000]")
    ap.add_argument(
        "--streaming-from",
        type=int,
        default=0,
        help="streaming: the processed count the growth is measured from [streaming / 10]",
    )
    ap.add_argument(
        "--streaming-shard-rows",
        type=int,
        default=10_000,
        help="streaming: --rows-per-shard (0 = by bytes, the pipeline's default) [10000]",
    )
    ap.add_argument("--tiles", type=int, default=1_000_000, help="slides: tiles to plan at least [1000000]")
    ap.add_argument("--slide-px", type=int, default=16384, help="slides: level-0 side of each slide [16384]")
    ap.add_argument("--tile-px", type=int, default=64, help="slides: --tile-px (at 0.5 um/px) [64]")
    ap.add_argument("--slides", type=int, default=0, help="slides: how many (0 = enough for --tiles)")
    ap.add_argument("--pipeline-args", default="", help="extra `featurize` flags for every part, one string")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval, seconds [0.2]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--timeout", type=float, default=3600, help="per featurize command, seconds [3600]")
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = shlex.split(args.pipeline_args) + passthrough
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    common.set_quiet_env()
    work = args.work.resolve()

    rec = {
        "benchmark": "scale",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "targets": {k: {"size": s, **lim} for k, (s, lim) in TARGETS.items()},
        "parts": [],
    }
    runners = {"dry": part_dry, "incremental": part_incremental, "streaming": part_streaming, "slides": part_slides}
    failed = []
    for part in PARTS:
        if part not in only:
            continue
        try:
            result = runners[part](args, work)
        except Exception as exc:
            log(f"{part}: FAILED: {exc}")
            failed.append(part)
            rec["parts"].append({"part": part, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            continue
        result["target"] = judge(result)
        rec["parts"].append(result)
        log(f"{part}: peak RSS {result['peak_rss_mb']} MB, {result['wall_s']} s; {counts_cell(result)}")
    rec["machine"]["loadavg_end"] = common.loadavg()

    print(
        f"\nscale (machine: {common.machine_short(rec['machine'])}, load {rec['machine']['loadavg_start']} -> "
        f"{rec['machine']['loadavg_end']})"
    )
    date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
    rows = []
    for r in rec["parts"]:
        if "error" in r:
            print(f"  {r['part']:<12} FAILED: {r['error'].splitlines()[0]}")
            continue
        t = r["target"]
        verdicts = ", ".join(
            f"{k} {c['measured']} <= {c['maximum']:g}: {'PASS' if c['pass'] else 'FAIL'}"
            for k, c in t["checks"].items()
        )
        scope = "" if t["at_size"] else f" (indicative only: size {r['size']:,} < the target's {t['target_size']:,})"
        print(
            f"  {r['part']:<12} {r['size']:>11,}  driver peak RSS {r['peak_rss_mb']} MB ({r['peak_source']}), "
            f"{r['wall_s']} s; {counts_cell(r)}"
        )
        print(f"  {'':<12} target: {verdicts}{scope}")
        target_text = "; ".join(f"{k} <= {c['maximum']:g}" for k, c in t["checks"].items())
        met = ("yes" if t["pass"] else "no") if t["at_size"] else ("(yes)" if t["pass"] else "(no)")
        rows.append(
            "| "
            + " | ".join(
                [
                    date,
                    common.machine_short(rec["machine"]),
                    r["part"],
                    f"{r['size']:,}",
                    str(r["peak_rss_mb"]),
                    str(r["wall_s"]),
                    counts_cell(r),
                    target_text + ("" if t["at_size"] else " (at full size)"),
                    met,
                    f"`{rec['command']}`" + (" (noisy)" if args.noisy else ""),
                ]
            )
            + " |"
        )
    for row in rows:
        print(row)
    rec["markdown_rows"] = rows
    if not args.no_save:
        path = common.save_result(rec, "scale")
        for row in rows:
            common.append_row("scale", TABLE_HEADER, row)
        log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
