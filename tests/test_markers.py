"""The markers `-m "not cluster and not slow"` selects by: `cluster` and `s3` follow the fixtures a test uses,
`slow` the names in conftest's SLOW_TESTS; every one of those names is a test that exists."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_slow_test_named_in_conftest_exists():
    missing = []
    for module, names in SLOW_TESTS.items():
        path = TESTS / module
        assert path.is_file(), f"conftest SLOW_TESTS names {module}, which does not exist"
        defined = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        missing += [f"{module}::{name}" for name in sorted(names - defined)]
    assert not missing, f"conftest SLOW_TESTS names tests that do not exist: {missing}"


COLLECT = """
import json, sys, pytest

class Markers:
    def pytest_collection_finish(self, session):
        marks = {i.nodeid.split("::", 1)[1]: [m.name for m in i.iter_markers()] for i in session.items}
        print("MARKERS " + json.dumps(marks))

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Markers()]))
"""


def markers_of(*modules: str) -> dict[str, set[str]]:
    """Each collected test id of the modules -> its markers, from one `pytest --collect-only` (no test runs)."""
    proc = subprocess.run(
        [sys.executable, "-c", COLLECT, *(f"tests/{m}" for m in modules)],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MARKERS "))
    return {test: set(names) for test, names in json.loads(line.removeprefix("MARKERS ")).items()}


def test_markers_follow_the_fixtures_and_the_slow_list():
    marks = markers_of("test_cluster.py", "test_cluster_gpus.py", "test_jobs.py", "test_resume.py")
    assert {"cluster", "s3"} <= marks["test_slides_job_plans_on_the_worker_nodes_into_an_object_store"]
    assert {"cluster", "slow"} <= marks["test_one_actor_per_fake_gpu_across_nodes_and_a_lost_2_gpu_node_loses_nothing"]
    assert "cluster" in marks["test_hidden_dir_is_seen_by_the_head_only"]
    assert "s3" in marks["test_s3_in_s3_out_equals_local"]
    assert "slow" in marks["test_driver_killed_then_rerun_resumes_exactly_once"]  # by conftest's list
    assert "slow" in marks["test_nightly_job_second_run_processes_nothing"]  # by its own decorator
    quick = [t for t, m in marks.items() if not m & {"cluster", "slow"}]
    assert "test_changed_prompts_or_model_refused_without_new_version" in quick
    assert "test_cluster_yaml_is_valid_for_the_installed_ray" in quick
    assert not marks["test_incremental_processes_only_new_and_changed"] & {"cluster", "s3"}
