"""Runs through a faulty object store: a proxy in front of the loopback S3 server answers 503 SlowDown, resets
connections, and performs some requests but answers 500 (tests/faulty_s3.py), at 10% and 30% of requests, the
lease's conditional writes included. Each run finishes in one command with every input exactly once, no error row,
and no temporary object in OUTPUT."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from faulty_s3 import FATES, FaultyS3Proxy
from slide_fixtures import draw_slide, write_slide

from pipeline import read_features
from pipeline.cli import main
from pipeline.errors import read_error_class
from pipeline.lease import LEASE_NAME, Lease
from pipeline.storage import filesystem, is_transient, with_retries

pytestmark = pytest.mark.s3  # the runs and the lease's loop are also `slow`; the classification test is quick

N_IMAGES = 200
RATES = [0.1, 0.3]


@pytest.fixture(scope="module")
def image_bucket(s3_server, tmp_path_factory) -> str:
    """N_IMAGES small JPEGs in a bucket of their own, uploaded straight to the server (not through a proxy)."""
    import uuid

    from pipeline.demo import make_images

    folder = tmp_path_factory.mktemp("fault-images")
    make_images(folder, N_IMAGES, seed=22, sizes=((64, 48), (96, 72)))
    bucket = f"in-{uuid.uuid4().hex[:12]}"
    s3_server["create_bucket"](bucket)
    fs, _ = filesystem(f"s3://{bucket}", s3_server["storage_options"])
    fs.put(str(folder) + "/", f"{bucket}/images/", recursive=True)
    return bucket


def model_args(model, prompts) -> list[str]:
    return ["--model", str(model), "--prompts", str(prompts), "--trust-remote-code", "--num-actors", "1"]


def assert_clean_output(fs, output_path: str) -> list[str]:
    """OUTPUT holds no temporary object, no leftover lease; returns its object names."""
    fs.invalidate_cache()
    names = [p[len(output_path) + 1 :] for p in fs.find(output_path)]
    assert names
    temporary = [n for n in names if n.rsplit("/", 1)[-1].startswith((".tmp-", ".lease-")) or "tmp" in n.lower()]
    assert not temporary, temporary
    assert LEASE_NAME not in names  # released, through the faults
    return names


def assert_faults_dealt(proxy: FaultyS3Proxy) -> None:
    assert all(proxy.counts[fate] > 0 for fate in FATES), proxy.counts
    assert proxy.conditional_faults["performed_500"] >= 1, proxy.conditional_faults  # the lease's create at least


def one_run_record(fs, output_path: str) -> dict:
    runs = [p for p in fs.find(f"{output_path}/_runs") if p.endswith(".json")]
    assert len(runs) == 1, runs
    return json.loads(fs.cat_file(runs[0]))


@pytest.mark.parametrize("fate", FATES)
def test_a_store_fault_that_outlasts_the_clients_retries_is_retried(fate, s3_server, s3_bucket):
    """s3fs and botocore give up (here after one attempt each) with errors of their own making: an OSError whose
    cause names the S3 error, or botocore's EndpointConnectionError for a reset. The storage layer retries them all,
    and decode classes them as the storage's fault."""
    direct = s3_server["storage_options"]
    fs_direct, _ = filesystem(f"s3://{s3_bucket}", direct)
    fs_direct.pipe_file(f"{s3_bucket}/in/a.jpg", b"abc")
    failing = {"left": 0}

    def decide(request):
        if failing["left"]:
            failing["left"] -= 1
            return fate
        return "pass"

    with FaultyS3Proxy(s3_server["endpoint"], 0.0, decide=decide) as proxy:
        options = {**proxy.storage_options(direct), "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        fs, _ = filesystem(f"s3://{s3_bucket}", options)
        fs.retries = 1
        for name, call in [
            ("get", lambda: fs.cat_file(f"{s3_bucket}/in/a.jpg")),
            ("put", lambda: fs.pipe_file(f"{s3_bucket}/out/b", b"x")),
            ("list", lambda: fs.ls(f"{s3_bucket}/in", refresh=True)),
        ]:
            failing["left"] = 3  # aiohttp itself retries a reset on a reused connection once
            with pytest.raises(Exception) as given_up:
                call()
            assert is_transient(given_up.value), (name, repr(given_up.value), repr(given_up.value.__cause__))
            assert read_error_class(given_up.value) == "storage"
            failing["left"] = 3
            assert with_retries(call, base_delay_s=0.01) is not None or name == "put"
            assert failing["left"] == 0
        assert proxy.counts[fate] >= 6


@pytest.mark.slow
def test_the_lease_through_a_faulty_store(s3_server, s3_bucket):
    """The lease's own conditional requests under faults: a create the store performed but answered 500 is
    recognised as this run's on the retry's 412; heartbeats, fenced writes and the release go through at 30%."""
    direct = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/out"
    fs, path = filesystem(out, direct)
    with FaultyS3Proxy(s3_server["endpoint"], 0.3, seed=7, first_conditional="performed_500") as proxy:
        options = proxy.storage_options(direct)
        lease = Lease.acquire(out, options, "run-faulty", heartbeat_s=2)
        assert proxy.conditional_faults["performed_500"] >= 1
        fs.invalidate_cache()
        assert json.loads(fs.cat_file(f"{path}/{LEASE_NAME}"))["holder"] == lease.holder
        for i in range(3):
            lease.update(run_id=f"run-faulty-{i}")
            with lease.fenced():
                fs_proxy, _ = filesystem(out, options)
                fs_proxy.pipe_file(f"{path}/_run.json", f"{i}".encode())
        lease.release()
        assert sum(proxy.conditional_faults.values()) > 1, proxy.conditional_faults
    assert lease.lost is None
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/{LEASE_NAME}")
    assert fs.cat_file(f"{path}/_run.json") == b"2"


@pytest.mark.slow
@pytest.mark.parametrize("rate", RATES)
def test_an_images_run_through_a_faulty_store(
    rate, ray_session, s3_server, image_bucket, conceptclip_model, prompts_file, capsys
):
    direct = s3_server["storage_options"]
    output = f"s3://{image_bucket}/out-{int(rate * 100)}"
    with FaultyS3Proxy(s3_server["endpoint"], rate, seed=int(rate * 100), first_conditional="performed_500") as proxy:
        args = [
            "images",
            f"s3://{image_bucket}/images",
            output,
            *model_args(conceptclip_model, prompts_file),
            "--rows-per-shard",
            "20",
            "--storage-options",
            json.dumps(proxy.storage_options(direct)),
        ]
        status = main(args)
        err = capsys.readouterr().err
        assert status == 0, err[-3000:]
        assert_faults_dealt(proxy)
    table = read_features(output, storage_options=direct)
    uris = table.column("uri").to_pylist()
    assert len(uris) == N_IMAGES == len(set(uris))
    assert sorted(uris) == [f"s3://{image_bucket}/images/img_{i:05d}.jpg" for i in range(N_IMAGES)]
    assert set(table.column("status").to_pylist()) == {"ok"}  # valid images: any error row is the store's
    fs, path = filesystem(output, direct)
    assert_clean_output(fs, path)
    record = one_run_record(fs, path)
    assert record["state"] == "complete"
    assert (record["counts"]["ok"], record["counts"]["error"]) == (N_IMAGES, 0)


@pytest.mark.slow
@pytest.mark.parametrize("rate", RATES)
def test_a_slides_run_through_a_faulty_store(
    rate, ray_session, s3_server, s3_bucket, conceptclip_model, prompts_file, tmp_path, capsys
):
    folder = tmp_path / "slides"
    write_slide(folder / "a.tif", draw_slide(1024, 768, seed=1), 0.25)
    write_slide(folder / "b.tif", draw_slide(1024, 768, seed=2), 0.5)
    direct = s3_server["storage_options"]
    fs, _ = filesystem(f"s3://{s3_bucket}", direct)
    fs.put(str(folder) + "/", f"{s3_bucket}/slides/", recursive=True)
    tiling = ["--tile-px", "64", "--rows-per-shard", "40", "--batch-size", "16", "--decode-batch-size", "16"]
    common = [*model_args(conceptclip_model, prompts_file), *tiling]
    assert main(["slides", str(folder), str(tmp_path / "plan"), *common, "--dry-run"]) == 0
    tiles = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tiles"]
    assert tiles > 0

    output = f"s3://{s3_bucket}/out"
    with FaultyS3Proxy(s3_server["endpoint"], rate, seed=int(rate * 100), first_conditional="performed_500") as proxy:
        args = ["slides", f"s3://{s3_bucket}/slides", output, *common]
        status = main([*args, "--storage-options", json.dumps(proxy.storage_options(direct))])
        err = capsys.readouterr().err
        assert status == 0, err[-3000:]
        assert_faults_dealt(proxy)
    table = read_features(output, storage_options=direct)
    keys = list(zip(*(table.column(c).to_pylist() for c in ("slide_id", "x", "y", "level"))))
    assert len(keys) == tiles == len(set(keys))
    assert set(table.column("slide_id").to_pylist()) == {"a", "b"}
    assert set(table.column("status").to_pylist()) == {"ok"}
    fs, path = filesystem(output, direct)
    assert_clean_output(fs, path)
    with fs.open(f"{path}/_slides.parquet", "rb") as f:
        slides = pq.read_table(f).to_pylist()
    assert sorted((s["slide_id"], s["status"]) for s in slides) == [("a", "ok"), ("b", "ok")]
    assert one_run_record(fs, path)["state"] == "complete"
