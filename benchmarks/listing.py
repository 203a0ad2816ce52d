"""Listing speed: `featurize manifest` on N local files and on the loopback S3 server.

    python -m benchmarks.listing --files 100000 [--s3-files 10000]

Local files are empty placeholders named .jpg (listing never opens them); S3 objects are tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.sources import write_manifest


def make_local_tree(root: Path, n: int, per_dir: int = 1000) -> None:
    for i in range(n):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:07d}.jpg").touch()


def time_manifest(source: str, storage_options: dict | None = None) -> tuple[int, float]:
    out = tempfile.mktemp(suffix=".parquet")
    t = time.perf_counter()
    table = write_manifest(source, out, storage_options)
    seconds = time.perf_counter() - t
    os.unlink(out)
    return table.num_rows, seconds


def s3_listing(n: int, per_prefix: int = 1000) -> tuple[int, float]:
    import socket
    import urllib.request

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
        )
        client.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: client.put_object(
                        Bucket="bench", Key=f"p{i // per_prefix:04d}/img_{i:07d}.jpg", Body=b"x"
                    ),
                    range(n),
                )
            )
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        return time_manifest("s3://bench", options)
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listing", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--s3-files", type=int, default=10_000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_local_tree(Path(tmp), args.files)
        n, s = time_manifest(tmp)
        results["local"] = {"files": n, "seconds": round(s, 2), "files_per_s": round(n / s)}
    if args.s3_files:
        n, s = s3_listing(args.s3_files)
        results["s3_loopback"] = {"files": n, "seconds": round(s, 2), "files_per_s": round(n / s)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
