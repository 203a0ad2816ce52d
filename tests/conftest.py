"""Shared fixtures: one local Ray per test session, tiny real models saved to disk, generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)

PROMPTS_YAML = """\
concepts: [tumor, stroma, lymphocytes, necrosis]
templates: ["a histopathology image of {}"]
"""


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once; 3 logical CPUs so a test can run two model actors beside decode tasks."""
    import ray

    if not ray.is_initialized():
        # address="local": a private Ray, never a cluster that another process's address file names.
        ray.init(
            address="local",
            num_cpus=3,
            include_dashboard=False,
            logging_level="WARNING",
            configure_logging=False,
            object_store_memory=512 * 1024**2,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def conceptclip_model(models_dir) -> Path:
    from pipeline.tiny import build_tiny_conceptclip

    return build_tiny_conceptclip(models_dir / "conceptclip")


@pytest.fixture(scope="session")
def clip_model(models_dir) -> Path:
    from pipeline.tiny import build_tiny_clip

    return build_tiny_clip(models_dir / "clip")


@pytest.fixture(scope="session")
def siglip_model(models_dir) -> Path:
    from pipeline.tiny import build_tiny_siglip

    return build_tiny_siglip(models_dir / "siglip")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    path.write_text(PROMPTS_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Ordinary JPEGs of assorted sizes (landscape and portrait)."""
    from pipeline.demo import make_images

    folder = tmp_path_factory.mktemp("photos")
    make_images(folder, 24, seed=1, sizes=((120, 90), (400, 300)))
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on loopback (moto's server); yields storage_options for s3fs."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    # Distinctive credentials so tests can check they never reach an output or a log.
    options = {
        "key": "AKIAFEATURIZETEST",
        "secret": "sEcReT-do-not-leak-42",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }

    def create_bucket(name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"],
        ).create_bucket(Bucket=name)

    yield {"endpoint": endpoint, "storage_options": options, "create_bucket": create_bucket}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback server; returns its name."""
    import uuid

    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server["create_bucket"](name)
    return name
