"""One writer per OUTPUT: the lease on real local folders and on a real loopback S3 server (no Ray)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.errors import UserError
from pipeline.lease import LEASE_NAME, Lease, _boot_id, _pid_namespace, _proc_stat
from pipeline.storage import filesystem, write_bytes_atomic

DEADLINE_S = 30.0  # generous: polls end as soon as the condition holds


def poll(condition, what: str, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def lease_record(
    run_id: str, host: str = "other-host", pid: int = 4242, age_s: float = 0.0, pid_start: int | None = None
) -> dict:
    beat = time.time() - age_s
    return {
        "run_id": run_id,
        "holder": uuid.uuid4().hex,
        "host": host,
        "pid": pid,
        "pid_start": pid_start,
        "started_at": "2026-01-01T00:00:00.000Z",
        "heartbeat_at": "2026-01-01T00:00:00.000Z",
        "heartbeat_unix": beat,
    }


def write_lease(out, record: dict, storage_options=None) -> None:
    """Write a lease by hand (as another run would have left it)."""
    data = json.dumps(record).encode()
    if str(out).startswith("s3://"):
        fs, path = filesystem(f"{out}/{LEASE_NAME}", storage_options)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
    else:
        os.makedirs(out, exist_ok=True)
        write_bytes_atomic(os.path.join(out, LEASE_NAME), data)


def read_lease(out) -> dict:
    with open(os.path.join(out, LEASE_NAME), "rb") as f:
        return json.loads(f.read())


def dead_pid() -> tuple[int, int | None]:
    """(pid, start time) of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = _proc_stat(proc.pid)[1]  # read while it is alive: a reused pid then differs in start time
    proc.stdin.close()
    proc.wait(timeout=60)
    return proc.pid, start


# -- local folders --------------------------------------------------------------------------------------------------
def test_second_acquire_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "out")  # does not exist yet: acquire creates it
    first = Lease.acquire(out, None, "20261203T000000Z-aaaaaa")
    try:
        record = read_lease(out)
        assert record["run_id"] == "20261203T000000Z-aaaaaa" and record["holder"] == first.holder
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["pid_start"] == _proc_stat(os.getpid())[1]
        assert record["started_at"].endswith("Z") and record["heartbeat_at"].endswith("Z")
        assert abs(record["heartbeat_unix"] - time.time()) < 600
        with pytest.raises(UserError) as refused:
            Lease.acquire(out, None, "20261203T000001Z-bbbbbb")
        message = str(refused.value)
        assert "\n" not in message
        assert "20261203T000000Z-aaaaaa" in message and "heartbeat" in message
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "300 s" in message
        assert read_lease(out)["holder"] == first.holder  # the refused run changed nothing
    finally:
        first.release()
    assert not os.path.exists(os.path.join(out, LEASE_NAME))
    with Lease.acquire(out, None, "20261203T000002Z-cccccc") as second:
        assert read_lease(out)["holder"] == second.holder
        second.check()
    assert not os.path.exists(os.path.join(out, LEASE_NAME))
    assert sorted(os.listdir(out)) == []  # no temp files left behind


def test_other_host_fresh_lease_refused_and_stale_lease_taken_over(tmp_path):
    out = str(tmp_path / "out")
    write_lease(out, lease_record("run-elsewhere", age_s=5))
    with pytest.raises(UserError, match=r"run run-elsewhere \(host other-host, pid 4242\), last heartbeat \d+ s ago"):
        Lease.acquire(out, None, "run-mine")

    write_lease(out, lease_record("run-elsewhere", age_s=301))
    with Lease.acquire(out, None, "run-mine") as lease:
        assert lease.previous["run_id"] == "run-elsewhere"
        assert read_lease(out)["run_id"] == "run-mine"

    write_lease(out, lease_record("run-elsewhere", age_s=20))  # a shorter stale limit applies when asked for
    with Lease.acquire(out, None, "run-mine", stale_after_s=10, heartbeat_s=1) as lease:
        assert lease.previous["run_id"] == "run-elsewhere"


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    pid, start = dead_pid()
    write_lease(out, lease_record("run-crashed", host=socket.gethostname(), pid=pid, pid_start=start))
    with Lease.acquire(out, None, "run-mine") as lease:
        assert lease.previous["pid"] == pid
        assert read_lease(out)["holder"] == lease.holder

    # A live process on this host holds it: refused.
    write_lease(
        out, lease_record("run-alive", host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_stat(os.getpid())[1])
    )
    with pytest.raises(UserError, match="run-alive"):
        Lease.acquire(out, None, "run-mine")


@pytest.mark.parametrize("other", [{"boot_id": "another-machine-with-the-same-name"}, {"pid_ns": "pid:[1]"}])
def test_dead_pid_from_another_boot_or_pid_namespace_is_judged_by_heartbeat_only(tmp_path, other):
    if (_boot_id() if "boot_id" in other else _pid_namespace()) is None:
        pytest.skip("this system does not expose it")
    out = str(tmp_path / "out")
    pid, start = dead_pid()
    write_lease(out, {**lease_record("run-container", host=socket.gethostname(), pid=pid, pid_start=start), **other})
    with pytest.raises(UserError, match="run-container"):
        Lease.acquire(out, None, "run-mine")


@pytest.mark.skipif(_proc_stat(os.getpid())[1] is None, reason="needs /proc/<pid>/stat")
def test_reused_pid_counts_as_dead(tmp_path):
    out = str(tmp_path / "out")
    write_lease(
        out,
        lease_record(
            "run-old", host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_stat(os.getpid())[1] + 12345
        ),
    )
    with Lease.acquire(out, None, "run-mine") as lease:
        assert lease.previous["run_id"] == "run-old"


def test_acquisition_sweeps_temp_files_but_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "_runs").mkdir(parents=True)
    temps = [
        out / ".tmp-0123abcd-part-00003.parquet",
        out / ".tmp-ffff-_run.json",
        out / "_runs" / ".tmp-9999-r1.plan.parquet",
    ]
    keep = [
        out / "part-00000.parquet",
        out / "_dataset.json",
        out / ".hidden",
        out / "tmp-not-a-temp",
        out / "_runs" / "r1.json",
        out / "_runs" / "r1.plan.parquet",
    ]
    for p in temps + keep:
        p.write_bytes(b"x")
    (out / ".tmp-dir").mkdir()  # only files are swept
    write_lease(str(out), lease_record("run-crashed", age_s=1000))
    with Lease.acquire(str(out), None, "run-mine") as lease:
        assert lease.swept == 3
        assert not any(p.exists() for p in temps)
        assert all(p.read_bytes() == b"x" for p in keep)
        assert (out / ".tmp-dir").is_dir()
    # A fresh acquisition sweeps too (a writer may have died without a lease).
    (out / "_runs" / ".tmp-1-x.json").write_bytes(b"x")
    with Lease.acquire(str(out), None, "run-next") as lease:
        assert lease.swept == 1


def test_heartbeat_advances_and_reader_never_sees_a_partial_lease(tmp_path):
    out = str(tmp_path / "out")
    with Lease.acquire(out, None, "run-beat", heartbeat_s=0.05) as lease:
        first = read_lease(out)["heartbeat_unix"]
        later = poll(lambda: (r := read_lease(out))["heartbeat_unix"] > first and r, "a heartbeat")
        assert later["holder"] == lease.holder and later["heartbeat_at"] != first
        lease.check()
        assert lease.lost is None


def test_update_changes_the_recorded_run_id_at_once(tmp_path):
    out = str(tmp_path / "out")
    with Lease.acquire(out, None, "run-new") as lease:
        before = read_lease(out)["heartbeat_unix"]
        lease.update(run_id="run-resumed")
        record = read_lease(out)
        assert record["run_id"] == "run-resumed" and record["heartbeat_unix"] >= before
        assert lease.run_id == "run-resumed"


def test_lost_lease_makes_check_raise_and_release_leaves_the_new_holder(tmp_path):
    out = str(tmp_path / "out")
    lease = Lease.acquire(out, None, "run-mine")
    intruder = lease_record("run-intruder", host="h2", pid=77)
    write_lease(out, intruder)
    with pytest.raises(UserError) as lost:
        lease.check()
    message = str(lost.value)
    assert "\n" not in message and "taken over by run run-intruder (host h2, pid 77)" in message
    assert "rerun" in message
    with pytest.raises(UserError, match="run-intruder"):
        lease.update(run_id="run-other")
    lease.release()
    assert read_lease(out)["holder"] == intruder["holder"]  # not ours any more: left alone


def test_heartbeat_thread_notices_a_takeover_and_stops(tmp_path):
    out = str(tmp_path / "out")
    with Lease.acquire(out, None, "run-mine", heartbeat_s=0.05) as lease:
        intruder = lease_record("run-intruder")
        # Overwrite between two beats (the local heartbeat's read-compare-write is not atomic against a writer
        # that ignores the lease protocol, as this test's hand-written overwrite does).
        with lease._lock:
            write_lease(out, intruder)
        poll(lambda: lease.lost, "the heartbeat to notice the takeover")
        time.sleep(0.2)  # several heartbeat periods: the stopped heartbeat must not write again
        assert read_lease(out) == intruder
        with pytest.raises(UserError, match="run-intruder"):
            lease.check()


def test_release_never_raises_on_a_vanished_lease(tmp_path):
    out = str(tmp_path / "out")
    lease = Lease.acquire(out, None, "run-mine")
    os.unlink(os.path.join(out, LEASE_NAME))
    lease.release()
    lease.release()  # idempotent
    lease2 = Lease.acquire(out, None, "run-two")
    os.unlink(os.path.join(out, LEASE_NAME))
    with pytest.raises(UserError, match="deleted"):
        lease2.check()
    lease2.release()


def test_unreadable_lease_is_refused_until_old(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_bytes(b'{"run_id": "trunc')
    with pytest.raises(UserError, match="unreadable lease"):
        Lease.acquire(str(out), None, "run-mine")
    old = time.time() - 1000
    os.utime(out / LEASE_NAME, (old, old))
    with Lease.acquire(str(out), None, "run-mine") as lease:
        assert lease.previous is None and read_lease(str(out))["holder"] == lease.holder


def test_failed_sweep_leaves_no_lease_behind(tmp_path, monkeypatch):
    import pipeline.lease_store as lease_store

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lease_store.LocalStore, "sweep", denied)
    with pytest.raises(PermissionError):
        Lease.acquire(str(tmp_path / "out"), None, "run-mine")
    assert not os.path.exists(tmp_path / "out" / LEASE_NAME)


def test_heartbeat_must_be_shorter_than_the_stale_limit(tmp_path):
    with pytest.raises(ValueError):
        Lease.acquire(str(tmp_path / "out"), None, "r", stale_after_s=10, heartbeat_s=10)
    assert not os.path.exists(tmp_path / "out" / LEASE_NAME)


def race(out, storage_options, runs: int = 2) -> list:
    """`runs` threads acquire the same lease at once; returns each one's Lease or UserError."""
    barrier = threading.Barrier(runs)
    results: list = [None] * runs

    def take(i):
        barrier.wait()
        try:
            results[i] = Lease.acquire(out, storage_options, f"run-{i}")
        except UserError as exc:
            results[i] = exc

    threads = [threading.Thread(target=take, args=(i,)) for i in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


def test_two_simultaneous_takers_of_a_dead_lease_one_wins(tmp_path):
    pid, start = dead_pid()
    for attempt in range(20):
        out = str(tmp_path / f"out{attempt}")
        if attempt % 2:
            write_lease(out, lease_record("run-crashed", host=socket.gethostname(), pid=pid, pid_start=start))
        else:
            write_lease(out, lease_record("run-crashed", age_s=1000))
        results = race(out, None)
        winners = [r for r in results if isinstance(r, Lease)]
        losers = [r for r in results if isinstance(r, UserError)]
        assert len(winners) == 1 and len(losers) == 1, (attempt, results)
        assert read_lease(out)["holder"] == winners[0].holder
        assert "heartbeat" in str(losers[0])
        winners[0].check()
        winners[0].release()
        assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".lease-"))]


def test_two_simultaneous_fresh_acquisitions_one_wins(tmp_path):
    for attempt in range(20):
        out = str(tmp_path / f"out{attempt}")
        results = race(out, None)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, (attempt, results)
        winners[0].release()


# -- write_bytes_atomic ---------------------------------------------------------------------------------------------
def test_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "part-00000.parquet"
    write_bytes_atomic(str(target), b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as failed:
        write_bytes_atomic(str(target), b"new")
    assert failed.value.errno == 28
    assert os.listdir(target.parent) == ["part-00000.parquet"]
    assert target.read_bytes() == b"old"


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.json"

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(str(target), b"{}")
    assert os.listdir(target.parent) == []


# -- other stores ---------------------------------------------------------------------------------------------------
def test_memory_store_uses_the_weaker_fallback(tmp_path):
    out = f"memory://lease-test-{uuid.uuid4().hex}/out"
    with Lease.acquire(out, None, "run-a") as lease:
        with pytest.raises(UserError, match="run-a"):
            Lease.acquire(out, None, "run-b")
        lease.check()
    with Lease.acquire(out, None, "run-b"):
        pass


def test_s3_exclusive_create_refusal_heartbeat_and_release(s3_server, s3_bucket):
    options = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/out"
    fs, _ = filesystem(out, options)
    lease_path = f"{s3_bucket}/out/{LEASE_NAME}"

    def remote_record():
        fs.invalidate_cache(lease_path)
        return json.loads(fs.cat_file(lease_path))

    first = Lease.acquire(out, options, "run-s3-a", heartbeat_s=0.2)
    try:
        assert remote_record()["holder"] == first.holder
        with pytest.raises(UserError) as refused:
            Lease.acquire(out, options, "run-s3-b")
        assert "run-s3-a" in str(refused.value) and "heartbeat" in str(refused.value)
        beat = remote_record()["heartbeat_unix"]
        poll(lambda: remote_record()["heartbeat_unix"] > beat, "an S3 heartbeat")
        first.check()
    finally:
        first.release()
    assert not fs.exists(lease_path)
    with Lease.acquire(out, options, "run-s3-b") as second:
        assert remote_record()["run_id"] == "run-s3-b"
        second.update(run_id="run-s3-b2")
        assert remote_record()["run_id"] == "run-s3-b2"
    for secret in (options["key"], options["secret"]):
        assert secret not in json.dumps(remote_record() if fs.exists(lease_path) else {})


def test_s3_stale_lease_is_taken_over_and_lost_lease_detected(s3_server, s3_bucket):
    options = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/out"
    write_lease(out, lease_record("run-fresh", age_s=3), options)
    with pytest.raises(UserError, match="run-fresh"):
        Lease.acquire(out, options, "run-mine")
    write_lease(out, lease_record("run-stale", age_s=1000), options)
    lease = Lease.acquire(out, options, "run-mine")
    assert lease.previous["run_id"] == "run-stale"
    intruder = lease_record("run-intruder")
    write_lease(out, intruder, options)
    with pytest.raises(UserError, match="taken over by run run-intruder"):
        lease.check()
    lease.release()
    fs, _ = filesystem(out, options)
    fs.invalidate_cache(f"{s3_bucket}/out/{LEASE_NAME}")
    assert json.loads(fs.cat_file(f"{s3_bucket}/out/{LEASE_NAME}"))["holder"] == intruder["holder"]


def test_s3_two_simultaneous_takers_one_wins(s3_server, s3_bucket):
    options = s3_server["storage_options"]
    for attempt in range(8):
        out = f"s3://{s3_bucket}/out{attempt}"
        if attempt % 2:
            write_lease(out, lease_record("run-crashed", age_s=1000), options)
        results = race(out, options)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, (attempt, results)
        winners[0].release()


# -- two real commands into one OUTPUT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_command_into_a_busy_output_is_refused(
    where, s3_server, s3_bucket, conceptclip_model, prompts_file, photo_dir, tmp_path, capsys
):
    """Run A holds OUTPUT; run B, started meanwhile, exits 2 with one line naming A's run id and its heartbeat, and
    writes nothing. A finishes with exactly one row per input."""
    import yaml

    from pipeline import read_features
    from pipeline.cli import main

    options = s3_server["storage_options"] if where == "s3" else {}
    output = f"s3://{s3_bucket}/out" if where == "s3" else str(tmp_path / "out")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"storage_options": options}), encoding="utf-8")
    args = [
        "images",
        str(photo_dir),
        output,
        "--model",
        str(conceptclip_model),
        "--prompts",
        str(prompts_file),
        "--trust-remote-code",
        "--rows-per-shard",
        "4",
        "--config",
        str(config),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        fs, path = filesystem(output, options)
        lease_path = f"{path}/{LEASE_NAME}"
        holder = json.loads(poll(lambda: fs.exists(lease_path) and fs.cat_file(lease_path), "run A's lease", 120))
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and holder["run_id"] in err[0] and "last heartbeat" in err[0], err
        assert f"pid {first.pid}" in err[0]
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err[-2000:]
    n = len(list(photo_dir.glob("*.jpg")))
    table = read_features(output, storage_options=options)
    assert table.num_rows == n == len(set(table.column("uri").to_pylist()))
    runs = [p for p in fs.ls(f"{path}/_runs", detail=False) if p.endswith(".json")]
    assert len(runs) == 1, runs  # run B wrote no record
    assert not fs.exists(lease_path)  # A released it
