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

# The longest end-to-end tests (each over ~20 s on 2 cores: whole commands, jobs, kills and reruns), by module and
# function name; `-m "not cluster and not slow"` leaves them out. tests/test_markers.py checks every name exists.
SLOW_TESTS = {
    "test_cluster_gpus.py": {"test_one_actor_per_fake_gpu_across_nodes_and_a_lost_2_gpu_node_loses_nothing"},
    "test_contract.py": {"test_versions_duplicates_prompts_and_fast_decode"},
    "test_environment.py": {
        "test_retry_errors_reprocesses_committed_error_rows",
        "test_stale_address_file_ignored_and_a_run_is_quiet",
    },
    "test_features.py": {
        "test_hidden_states_of_clip_follow_the_recipe_for_every_pool",
        "test_hidden_states_of_siglip_and_conceptclip_and_no_class_token",
        "test_features_only_runs_and_vision_only_checkpoints",
        "test_non_finite_features_become_error_rows_never_ok_rows",
    },
    "test_lease.py": {"test_second_command_into_a_busy_output_is_refused"},
    "test_multicrop.py": {
        "test_multi_crop_patch_tokens_merged_follow_the_recipe",
        "test_multi_crop_with_the_class_token_follows_the_recipe",
    },
    "test_pipeline.py": {
        "test_same_input_gives_identical_features_whatever_the_batching",
        "test_cli_run_with_broken_and_unusual_files",
    },
    "test_resume.py": {
        "test_s3_in_s3_out_equals_local",
        "test_driver_killed_then_rerun_resumes_exactly_once",
        "test_actor_killed_mid_run_gives_exactly_one_row_per_input",
        "test_incremental_processes_only_new_and_changed",
        "test_manifest_input_and_object_vanished_after_listing",
        "test_inputs_listed_after_a_crash_are_processed_by_the_same_command",
    },
    "test_slides.py": {"test_a_slide_whose_read_hangs_does_not_hold_the_run"},
    "test_stream.py": {"test_a_stream_that_ends_with_work_missing_fails_the_run_and_the_rerun_resumes_it"},
    "test_versions.py": {
        "test_every_version_keeps_its_concept_names",
        "test_an_aborted_new_version_run_locks_nothing_out",
    },
}
# A test that uses one of these fixtures, directly or through another fixture, gets the marker.
FIXTURE_MARKERS = {"ray_cluster": "cluster", "gpu_cluster": "cluster", "s3_server": "s3"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in FIXTURE_MARKERS.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(FIXTURE_MARKERS[fixture])
        if getattr(item, "originalname", item.name) in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker("slow")


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
def paced_model(models_dir) -> Path:
    """The tiny ConceptCLIP with a heavier image tower (224 px, 6 layers of width 384: ~0.1 s an image on one CPU
    thread), for the cluster kill tests: the run must still have seconds of model work left when a kill lands, and
    with the 64 px model the whole input takes under a second once the actor is up."""
    from pipeline.tiny import build_tiny_conceptclip

    return build_tiny_conceptclip(
        models_dir / "conceptclip-paced",
        image_size=224,
        patch_size=16,
        vision_width=384,
        vision_layers=6,
        vision_heads=6,
    )


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
