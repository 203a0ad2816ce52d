"""Listing an object-store folder: `featurize manifest s3://bucket/ OUT.parquet` over N keys on the loopback S3
server, with the driver's peak memory.

    python -m benchmarks.s3listing                      # 1,000,000 keys; target: driver peak RSS <= 1 GB
    python -m benchmarks.s3listing --keys 100000        # a quick check

The server is moto's, in this process on loopback (ThreadedMotoServer), filled through moto's own backend (one
`put_object` call per key, no HTTP): one flat bucket of N empty `.jpg` keys. `featurize manifest` runs as a
subprocess with `--storage-options` naming the endpoint, and pages through the bucket with ListObjectsV2 (1,000
keys a page, as real S3 returns them); the harness measures its peak RSS (VmHWM at exit, see benchmarks.scale) and
wall time, and checks the manifest has N rows.

moto's ListObjectsV2 collects and sorts the whole bucket for every page (seconds a page at 1M keys, so the listing
would be bound by the test server at O(N^2)); the server here keeps each listing's sorted result between pages
(moto's own code computes it, the continuation token picks the page), so one listing costs what one page did.
keys/s therefore measures the client, the HTTP round trips and moto's per-page response, not real S3.

Writes benchmarks/results/<timestamp>-s3listing.json and a row in benchmarks/results/s3listing.md.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import socket
import sys
import time
from pathlib import Path

from . import common
from .common import log
from .scale import Measured

TARGET_MB = 1024.0  # driver peak RSS at 1M keys
TARGET_KEYS = 1_000_000
BUCKET = "listing-bench"
TABLE_HEADER = (
    "| date | machine | keys | fill s | listing wall s | keys/s | driver peak RSS MB | target | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def start_server() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, in this process; (the server, its endpoint)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def s3_backend():
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def keep_sorted_listings(backend) -> None:
    """Make the backend's ListObjectsV2 sort a listing once, not once per page (see the module docstring): the
    result of moto's own `list_objects` for (bucket, prefix, delimiter) is kept, sorted, while the bucket's key
    count is unchanged, and each page is cut from it after the continuation token's key."""
    cache: dict = {}

    def list_objects_v2(bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        key = (bucket.name, prefix, delimiter, len(bucket.keys))
        if key not in cache:
            cache.clear()
            keys, folders, _, _ = backend.list_objects(bucket, prefix, delimiter, marker=None, max_keys=None)
            entries = sorted([*keys, *folders], key=backend._get_name)
            cache[key] = (entries, [backend._get_name(e) for e in entries])
        entries, names = cache[key]
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        start = bisect.bisect_right(names, after) if after else 0
        return backend._truncate_result(entries[start : start + max_keys + 1], max_keys)

    backend.list_objects_v2 = list_objects_v2


def fill(backend, n: int) -> float:
    """N empty keys in one flat bucket, through moto's backend; seconds taken. The keys' objects are then frozen out
    of the garbage collector's sight: each full collection would otherwise walk the millions of them while the
    server answers (seconds, again and again)."""
    t = time.perf_counter()
    gc.disable()
    try:
        backend.create_bucket(BUCKET, "us-east-1")
        step = max(1, n // 10)
        for i in range(n):
            backend.put_object(BUCKET, f"img_{i:08d}.jpg", b"")
            if (i + 1) % step == 0:
                log(f"  filled {i + 1:,} / {n:,} keys ({time.perf_counter() - t:.0f} s)")
    finally:
        gc.freeze()
        gc.enable()
    return time.perf_counter() - t


def measure(n: int, work: Path, timeout: float, interval: float) -> dict:
    server, endpoint = start_server()
    try:
        backend = s3_backend()
        keep_sorted_listings(backend)
        log(f"s3listing: filling {n:,} keys into s3://{BUCKET}/ on {endpoint}")
        fill_s = fill(backend, n)
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        manifest = common.fresh_dir(work / "s3listing") / "manifest.parquet"
        cmd = common.featurize_cmd() + [
            "manifest",
            f"s3://{BUCKET}/",
            str(manifest),
            "--storage-options",
            json.dumps(options),
        ]
        log(f"s3listing: featurize manifest over {n:,} keys")
        res = Measured(cmd, work / "s3listing.log", interval).run(timeout)
    finally:
        server.stop()
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(manifest).metadata.num_rows
    if rows != n:
        raise RuntimeError(f"the manifest has {rows:,} rows, not {n:,}")
    return {
        "keys": n,
        "fill_s": round(fill_s, 1),
        "fill_keys_per_s": round(n / fill_s),
        "keys_per_s": round(n / res["wall_s"]),
        "command": " ".join(cmd[:-1] + ["'<options: the loopback endpoint>'"]),
        **res,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.s3listing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=TARGET_KEYS, help=f"keys in the bucket [{TARGET_KEYS}]")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval, seconds [0.2]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--timeout", type=float, default=7200, help="for the featurize command, seconds [7200]")
    ap.add_argument("--noisy", action="store_true", help="mark the result as taken on a busy machine")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    common.set_quiet_env()
    rec = {
        "benchmark": "s3listing",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "target": {"keys": TARGET_KEYS, "peak_rss_mb": TARGET_MB},
    }
    result = measure(args.keys, args.work.resolve(), args.timeout, args.interval)
    rec["machine"]["loadavg_end"] = common.loadavg()
    met = result["peak_rss_mb"] <= TARGET_MB
    at_size = args.keys >= TARGET_KEYS
    rec.update(result=result, met=met, at_size=at_size)
    verdict = ("yes" if met else "no") if at_size else f"({'yes' if met else 'no'}; indicative only)"
    print(
        f"\ns3listing (machine: {common.machine_short(rec['machine'])}, load {rec['machine']['loadavg_start']} -> "
        f"{rec['machine']['loadavg_end']}{', noisy' if args.noisy else ''})\n"
        f"  keys {result['keys']:,}: fill {result['fill_s']} s ({result['fill_keys_per_s']:,} keys/s); "
        f"featurize manifest {result['wall_s']} s ({result['keys_per_s']:,} keys/s), driver peak RSS "
        f"{result['peak_rss_mb']} MB ({result['peak_source']}); target <= {TARGET_MB:.0f} MB at "
        f"{TARGET_KEYS:,} keys: {verdict}"
    )
    if not args.no_save:
        path = common.save_result(rec, "s3listing")
        date = f"{rec['timestamp'][:4]}-{rec['timestamp'][4:6]}-{rec['timestamp'][6:8]}"
        row = (
            f"| {date} | {common.machine_short(rec['machine'])}{' (noisy)' if args.noisy else ''} | "
            f"{result['keys']:,} | {result['fill_s']} | {result['wall_s']} | {result['keys_per_s']:,} | "
            f"{result['peak_rss_mb']} | {verdict} | `{rec['command']}` |"
        )
        common.append_row("s3listing", TABLE_HEADER, row)
        log(f"record: {path}")
    return 0 if met or not at_size else 1


if __name__ == "__main__":
    sys.exit(main())
