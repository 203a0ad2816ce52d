"""jobs/rayjob.yaml (KubeRay RayJob) against the vendored RayJob schema, plus the rules that schema cannot express.

The schema (tests/kuberay/, KubeRay v1.7.0) checks field types and required fields. What it does not check:
KubeRay's own validation (its CEL rules and the operator's checks, e.g. ttlSecondsAfterFinished needs
shutdownAfterJobFinishes, activeDeadlineSeconds > 0), unknown (misspelt) field names, and this project's rules:
the entrypoint runs a valid job config, the GPU pool matches its num_actors, the image is cluster.yaml's, and
HF_TOKEN comes from a Kubernetes Secret, never from runtimeEnvYAML (which `ray job list` shows).
No Kubernetes and no Ray cluster needed.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from pydantic import ValidationError

from pipeline.cli import build_parser, options_from_args
from pipeline.config import RunConfig, load_config_file, make_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "jobs" / "rayjob.yaml"
SCHEMA = Path(__file__).resolve().parent / "kuberay" / "rayjob-v1.schema.json"

ENTRY_POINT = ["python", "jobs/featurize.py"]
SECRET_ENV = "HF_TOKEN"
# Words that must not appear anywhere in runtimeEnvYAML, nor as the name of an env var with a literal value.
SECRET_WORDS = re.compile(
    r"hf_token|token|secret|passw(or)?d|credential|api[_-]?key|private[_-]?key|"
    r"aws_access_key|aws_session",
    re.IGNORECASE,
)
# Remote URI schemes Ray's runtime env can download a working_dir from (ray/_private/runtime_env/protocol.py).
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "azure://", "abfss://")
MAX_RAYJOB_NAME = 47  # KubeRay: 53 (RayCluster name limit) minus the 6 characters it appends
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def load_manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def schema_errors(doc: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(load_schema())
    return [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(document)'}: {err.message}"
        for err in validator.iter_errors(doc)
    ]


def unknown_fields(doc: Any, schema: dict | None = None, path: str = "") -> list[str]:
    """Field names the schema does not declare (what the API server's strict field validation refuses).

    The schema itself lets them through: it never sets additionalProperties to false."""
    schema = load_schema() if schema is None else schema
    found: list[str] = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            where = f"{path}/{key}"
            if props is not None and key in props:
                found += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif props is not None:  # declared fields only ({"type": "object"} alone, e.g. metadata, takes any)
                found.append(where)
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            found += unknown_fields(item, schema["items"], f"{path}/{i}")
    return found


def cluster_image() -> str:
    return yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))["docker"]["image"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    rcs = spec.get("rayClusterSpec") or {}
    groups = [("head", rcs.get("headGroupSpec") or {})]
    groups += [(f"worker group {g.get('groupName', i)}", g) for i, g in enumerate(rcs.get("workerGroupSpecs") or [])]
    return groups


def _pod(group: dict) -> dict:
    return (group.get("template") or {}).get("spec") or {}


def _entrypoint_config(entrypoint: Any, repo: Path) -> tuple[RunConfig | None, list[str]]:
    """The effective RunConfig of the entrypoint (config file, then its command-line overrides), or problems."""
    try:
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else []
    except ValueError as exc:
        return None, [f"entrypoint is not a valid command line ({exc})"]
    if argv[:2] != ENTRY_POINT or "--config" not in argv[2:-1]:
        return None, [f"entrypoint must be `{' '.join(ENTRY_POINT)} --config FILE [options]`, not {entrypoint!r}"]
    args = argv[2:]
    i = args.index("--config") + 1
    config = repo / args[i]  # the job runs in working_dir = the repository root
    if not config.is_file() or repo not in config.resolve().parents:
        return None, [f"entrypoint's config file {args[i]} is not a file of the repository"]
    try:
        RunConfig(**load_config_file(config))
    except (UserError, ValidationError) as exc:
        return None, [f"entrypoint's config file {args[i]} is not a valid RunConfig: {exc}"]
    args[i] = str(config)
    try:  # what `featurize images` will run with: options after the config file win
        parsed = build_parser().parse_args(["images", *args])
        return make_config(RunConfig, options_from_args(parsed, RunConfig)), []
    except SystemExit:
        return None, [f"entrypoint's options are not valid `featurize images` options: {entrypoint!r}"]
    except UserError as exc:
        return None, [f"entrypoint's options do not make a valid RunConfig: {exc}"]


def _runtime_env_problems(text: Any) -> list[str]:
    if text is None:
        return [
            "runtimeEnvYAML is missing: the stock Ray image has neither the project's code (working_dir) nor "
            "its dependencies (pip)"
        ]
    if not isinstance(text, str):
        return ["runtimeEnvYAML must be a YAML string"]
    problems = [
        f"runtimeEnvYAML mentions {m.group(0)!r}: `ray job list` and the dashboard show the runtime env; "
        "secrets belong in a Kubernetes Secret through the containers' env"
        for m in SECRET_WORDS.finditer(text)
    ]
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return problems + [f"runtimeEnvYAML is not valid YAML: {str(exc).splitlines()[0]}"]
    if not isinstance(env, dict):
        return problems + ["runtimeEnvYAML must be a mapping"]
    working_dir = env.get("working_dir")
    if not isinstance(working_dir, str) or not working_dir.startswith(REMOTE_SCHEMES):
        problems.append(
            f"runtimeEnvYAML working_dir must be a remote zip URI (the submitter pod has no copy of "
            f"the repository, and the entrypoint's paths are relative to it), not {working_dir!r}"
        )
    pip = env.get("pip")
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if not isinstance(packages, list) or not any(str(p).startswith("pipeline-featurize") for p in packages):
        problems.append("runtimeEnvYAML pip must install pipeline-featurize (the project's dependencies)")
    return problems


def manifest_problems(doc: Any, repo: Path = REPO) -> list[str]:
    """Every rule of the RayJob the schema cannot express; an empty list when there is nothing to fix."""
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        return ["not a RayJob document with a spec"]
    problems: list[str] = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayJob"):
        problems.append("apiVersion/kind must be ray.io/v1 RayJob")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS1035.fullmatch(name) or len(name) > MAX_RAYJOB_NAME:
        problems.append(f"metadata.name must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    spec = doc["spec"]

    # Lifecycle (KubeRay's validation, and ours: all four set).
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (GPU pods must not outlive the job)")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        problems.append("ttlSecondsAfterFinished must be set to an integer >= 0")
    elif spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("ttlSecondsAfterFinished requires shutdownAfterJobFinishes: true")
    deadline = spec.get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline <= 0:
        problems.append("activeDeadlineSeconds must be set to an integer > 0")
    backoff = spec.get("backoffLimit")
    if not isinstance(backoff, int) or isinstance(backoff, bool) or backoff < 0:
        problems.append("backoffLimit must be set to an integer >= 0")

    cfg, entry_problems = _entrypoint_config(spec.get("entrypoint"), repo)
    problems += entry_problems
    # Required: the image is the stock Ray image (checked below), so the project comes through the runtime env.
    problems += _runtime_env_problems(spec.get("runtimeEnvYAML"))

    groups = _groups(spec)
    if not (spec.get("rayClusterSpec") or {}).get("headGroupSpec"):
        problems.append("rayClusterSpec.headGroupSpec is missing")

    # Secrets and images, on every container of every group.
    image = cluster_image()
    refs = set()
    for label, group in groups:
        containers = _pod(group).get("containers") or []
        if not containers:
            problems.append(f"{label}: no containers")
        for c in containers:
            where = f"{label}, container {c.get('name')}"
            env = c.get("env") or []
            hf = [e for e in env if e.get("name") == SECRET_ENV]
            ref = ((hf[0].get("valueFrom") or {}).get("secretKeyRef") or {}) if len(hf) == 1 else {}
            if len(hf) != 1 or "value" in hf[0] or not ref.get("name") or not ref.get("key"):
                problems.append(
                    f"{where}: {SECRET_ENV} must be set once, from a Secret (valueFrom.secretKeyRef "
                    "with name and key), never as a literal value"
                )
            else:
                refs.add((ref["name"], ref["key"]))
            for e in env:
                if "value" in e and SECRET_WORDS.search(str(e.get("name", ""))):
                    problems.append(f"{where}: env {e.get('name')} has a literal value; take it from a Secret")
            if c.get("image") != image:
                problems.append(f"{where}: image {c.get('image')!r} is not cluster.yaml's docker.image {image!r}")
    if len(refs) > 1:
        problems.append(f"{SECRET_ENV} comes from different Secrets in different containers: {sorted(refs)}")
    expected_image = f"rayproject/ray:{ray.__version__}-py311-gpu"
    if image != expected_image:
        problems.append(f"cluster.yaml's docker.image {image!r} is not {expected_image!r} (the installed Ray)")
    ray_version = (spec.get("rayClusterSpec") or {}).get("rayVersion")
    if ray_version is not None and ray_version != ray.__version__:
        problems.append(f"rayClusterSpec.rayVersion {ray_version!r} is not the installed Ray {ray.__version__}")

    # Ray start parameters (KubeRay refuses resources in both rayStartParams and the group's resources).
    for label, group in groups:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{label}: resources set in both rayStartParams and resources")
    head_params = groups[0][1].get("rayStartParams") or {}
    if head_params.get("num-cpus") != "0":
        problems.append('head rayStartParams num-cpus must be "0": no tasks next to the job driver')
    if head_params.get("dashboard-host") != "0.0.0.0":
        problems.append('head rayStartParams dashboard-host must be "0.0.0.0"')

    # The GPU pool: fixed, one GPU per pod, as many pods as the run's model actors.
    workers = groups[1:]
    if not workers:
        problems.append("no worker group")
    gpus = 0
    for label, group in workers:
        counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        if len(set(counts.values())) != 1 or not isinstance(counts["replicas"], int):
            problems.append(f"{label}: replicas, minReplicas and maxReplicas must be equal integers: {counts}")
            continue
        containers = _pod(group).get("containers") or [{}]
        limit = ((containers[0].get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
        if str(limit) != "1":
            problems.append(f"{label}: the Ray container must have limits nvidia.com/gpu: 1, not {limit!r}")
        gpus += counts["replicas"] * (group.get("numOfHosts") or 1)
    if cfg is not None:
        if cfg.num_actors < 1:
            problems.append("the entrypoint's num_actors must be pinned (> 0) to the GPU pool")
        elif gpus != cfg.num_actors:
            problems.append(f"the GPU worker pods ({gpus}) must equal the entrypoint's num_actors ({cfg.num_actors})")
    return problems


# -- the manifest ---------------------------------------------------------------------------------------------------
def test_rayjob_is_valid_against_the_kuberay_schema():
    assert schema_errors(load_manifest()) == []


def test_rayjob_has_no_unknown_fields():
    assert unknown_fields(load_manifest()) == []


def test_rayjob_follows_the_rules_the_schema_cannot_express():
    assert manifest_problems(load_manifest()) == []


def test_rayjob_image_is_cluster_yaml_image():
    doc = load_manifest()
    spec = doc["spec"]["rayClusterSpec"]
    images = {
        c["image"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {cluster_image()} == {f"rayproject/ray:{ray.__version__}-py311-gpu"}


# -- the checks bite ------------------------------------------------------------------------------------------------
def _schema_has_additional_properties_false(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("additionalProperties") is False or any(
            _schema_has_additional_properties_false(v) for v in node.values()
        )
    if isinstance(node, list):
        return any(_schema_has_additional_properties_false(v) for v in node)
    return False


def test_schema_lets_misspelt_fields_through_but_unknown_fields_does_not():
    # The CRD schema never sets additionalProperties: false (the API server prunes or refuses unknown fields
    # instead), so a misspelt key passes jsonschema; the negative schema tests below use wrong types, and
    # unknown_fields() covers misspellings.
    assert not _schema_has_additional_properties_false(load_schema())
    doc = load_manifest()
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envv"] = []
    assert schema_errors(doc) == []
    assert unknown_fields(doc) == [
        "/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/envv",
        "/spec/shutdownAfterJobFinish",
    ]
    assert any("shutdownAfterJobFinishes must be true" in p for p in manifest_problems(doc))


def _set(doc: dict, path: str, value: Any) -> dict:
    node = doc
    *parents, last = path.split("/")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


_DELETE = object()
WORKER = "spec/rayClusterSpec/workerGroupSpecs/0"
HEAD = "spec/rayClusterSpec/headGroupSpec"


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("spec/shutdownAfterJobFinishes", "true", "spec/shutdownAfterJobFinishes: 'true' is not of type 'boolean'"),
        ("spec/backoffLimit", "2", "spec/backoffLimit: '2' is not of type 'integer'"),
        (f"{WORKER}/replicas", 4.5, "replicas: 4.5 is not of type 'integer'"),
        (f"{WORKER}/groupName", _DELETE, "'groupName' is a required property"),
        (f"{HEAD}/rayStartParams/num-cpus", 0, "num-cpus: 0 is not of type 'string'"),
        (
            f"{HEAD}/template/spec/containers/0/env/0/valueFrom/secretKeyRef/key",
            _DELETE,
            "'key' is a required property",
        ),
    ],
    ids=["bool-as-string", "int-as-string", "float-replicas", "missing-required", "num-cpus-int", "secret-no-key"],
)
def test_schema_rejects_wrong_types_and_missing_fields(path, value, expected):
    errors = schema_errors(_set(load_manifest(), path, value))
    assert any(expected in e for e in errors), errors


def test_rules_reject_hf_token_moved_into_runtime_env():
    doc = load_manifest()
    spec = doc["spec"]
    for _, group in _groups(spec):
        for c in group["template"]["spec"]["containers"]:
            c["env"] = [e for e in c["env"] if e["name"] != SECRET_ENV]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["env_vars"] = {SECRET_ENV: "hf_not_a_real_token"}
    spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env)
    assert schema_errors(doc) == []  # valid as far as the schema can tell
    problems = manifest_problems(doc)
    assert any("runtimeEnvYAML mentions 'HF_TOKEN'" in p for p in problems), problems
    assert sum("HF_TOKEN must be set once, from a Secret" in p for p in problems) == 2, problems  # head and workers


def _worker_limits(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d: _set(d, "spec/shutdownAfterJobFinishes", False),
            "ttlSecondsAfterFinished requires shutdownAfterJobFinishes: true",
        ),
        (lambda d: _set(d, "spec/activeDeadlineSeconds", 0), "activeDeadlineSeconds must be set to an integer > 0"),
        (lambda d: _set(d, "spec/activeDeadlineSeconds", _DELETE), "activeDeadlineSeconds must be set"),
        (lambda d: _set(d, "spec/backoffLimit", -1), "backoffLimit must be set to an integer >= 0"),
        (
            lambda d: _set(d, "spec/entrypoint", "python jobs/featurize.py --config jobs/missing.yaml"),
            "is not a file of the repository",
        ),
        (
            lambda d: _set(d, "spec/entrypoint", "python jobs/featurize.py --config pyproject.toml"),
            "is not a valid RunConfig",
        ),
        (
            lambda d: _set(d, "spec/entrypoint", "python -m pipeline.cli images --config jobs/featurize.yaml"),
            "entrypoint must be",
        ),
        (
            lambda d: _set(
                d, "spec/entrypoint", "python jobs/featurize.py --config jobs/featurize.yaml --num-actors 8"
            ),
            "must equal the entrypoint's num_actors (8)",
        ),
        (
            lambda d: _set(d, "spec/runtimeEnvYAML", "working_dir: .\npip: [pipeline-featurize]\n"),
            "working_dir must be a remote zip URI",
        ),
        (
            lambda d: _set(
                d, "spec/runtimeEnvYAML", "working_dir: s3://b/r.zip\nenv_vars: {AWS_SECRET_ACCESS_KEY: x}\n"
            ),
            "runtimeEnvYAML mentions 'SECRET'",
        ),
        (
            lambda d: _set(d, f"{HEAD}/template/spec/containers/0/env/0", {"name": "HF_TOKEN", "value": "hf_x"}),
            "never as a literal value",
        ),
        (lambda d: _set(d, f"{HEAD}/rayStartParams/num-cpus", "1"), 'num-cpus must be "0"'),
        (lambda d: _set(d, f"{WORKER}/replicas", 3), "replicas, minReplicas and maxReplicas must be equal"),
        (lambda d: _worker_limits(d).update({"nvidia.com/gpu": 2}), "nvidia.com/gpu: 1"),
        (
            lambda d: _set(d, f"{WORKER}/template/spec/containers/0/image", "rayproject/ray:2.9.0-py311-gpu"),
            "is not cluster.yaml's",
        ),
        (lambda d: _set(d, "metadata/name", "Featurize_Pathology"), "DNS-1035"),
    ],
    ids=[
        "ttl-without-shutdown",
        "deadline-zero",
        "deadline-missing",
        "backoff-negative",
        "config-missing",
        "config-invalid",
        "other-entrypoint",
        "num-actors-override",
        "local-working-dir",
        "aws-key-in-runtime-env",
        "literal-hf-token",
        "head-cpus",
        "autoscaling-pool",
        "two-gpus",
        "other-image",
        "bad-name",
    ],
)
def test_rules_reject(mutate, expected):
    doc = load_manifest()
    mutate(doc)
    problems = manifest_problems(doc)
    assert any(expected in p for p in problems), problems
