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
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING", configure_logging=False,
                 object_store_memory=512 * 1024**2)
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
