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

import pipeline.lease as lease_module
from pipeline.errors import UserError
from pipeline.lease import LEASE_NAME, Clock, Lease, _boot_id, _monotonic, _pid_namespace, _proc_stat
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
    run_id: str,
    host: str = "other-host",
    pid: int = 4242,
    age_s: float = 0.0,
    pid_start: int | None = None,
    this_kernel: bool = False,
) -> dict:
    """A lease as another run would have left it, its heartbeat age_s old by the wall clock; with this_kernel, also by
    this machine's monotonic clock (a run on this kernel: judged at once; any other lease is watched)."""
    record = {
        "run_id": run_id,
        "holder": uuid.uuid4().hex,
        "host": host,
        "pid": pid,
        "pid_start": pid_start,
        "started_at": "2026-01-01T00:00:00.000Z",
        "heartbeat_at": "2026-01-01T00:00:00.000Z",
        "heartbeat_unix": time.time() - age_s,
    }
    if this_kernel:
        record.update(boot_id=_boot_id(), heartbeat_monotonic=_monotonic() - age_s)
    return record


class FakeClock(Clock):
    """Time that moves only when a lease sleeps (or a test advances it); each sleep then gives `on_sleep` its turn
    (the other party: a holder that beats or writes). The heartbeat thread never beats by itself: a test beats with
    update(). Views made by `skewed()` share the time but read other wall and monotonic clocks (another machine)."""

    def __init__(self, on_sleep=None):
        self._now = [0.0]
        self.wall_offset_s = time.time()
        self.mono_offset_s = 1000.0
        self.on_sleep = on_sleep

    def skewed(self, wall_s: float, mono_s: float = 5e5) -> FakeClock:
        view = FakeClock()
        view._now, view.on_sleep = self._now, None
        view.wall_offset_s, view.mono_offset_s = self.wall_offset_s + wall_s, self.mono_offset_s + mono_s
        return view

    @property
    def elapsed(self) -> float:
        return self._now[0]

    def advance(self, seconds: float) -> None:
        self._now[0] += seconds

    def monotonic(self) -> float:
        return self._now[0] + self.mono_offset_s

    def time(self) -> float:
        return self._now[0] + self.wall_offset_s

    def sleep(self, seconds: float) -> None:
        self._now[0] += seconds
        turn, self.on_sleep = self.on_sleep, None  # not re-entered when the other party sleeps in its turn
        try:
            if turn is not None:
                turn()
        finally:
            self.on_sleep = turn

    def wait(self, event: threading.Event, seconds: float) -> bool:
        event.wait()
        return True


def another_machine(monkeypatch, name: str) -> None:
    """Leases made from now on say they run on another kernel (so nobody compares their monotonic clocks)."""
    monkeypatch.setattr(lease_module, "_boot_id", lambda: f"boot-{name}")


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
    """Another machine's lease is watched on this machine's clock: refused when its heartbeat changes meanwhile,
    taken over once it stayed unchanged for the stale limit."""
    out = str(tmp_path / "out")
    write_lease(out, lease_record("run-elsewhere", age_s=5))
    beating = FakeClock(on_sleep=lambda: write_lease(out, lease_record("run-elsewhere")))  # its next heartbeat
    with pytest.raises(UserError, match=r"run run-elsewhere \(host other-host, pid 4242\), last heartbeat \d+ s ago"):
        Lease.acquire(out, None, "run-mine", clock=beating, notify=lambda line: None)
    assert beating.elapsed <= 1.0  # refused at the first change seen

    write_lease(out, lease_record("run-elsewhere", age_s=301))
    clock = FakeClock()
    with Lease.acquire(out, None, "run-mine", clock=clock, notify=lambda line: None) as lease:
        assert lease.previous["run_id"] == "run-elsewhere"
        assert read_lease(out)["run_id"] == "run-mine"
    assert 300 <= clock.elapsed <= 301

    write_lease(out, lease_record("run-elsewhere", age_s=20))  # a shorter stale limit applies when asked for
    clock = FakeClock()
    with Lease.acquire(out, None, "run-mine", stale_after_s=10, heartbeat_s=1, clock=clock, notify=print) as lease:
        assert lease.previous["run_id"] == "run-elsewhere"
    assert 10 <= clock.elapsed <= 10.5


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    pid, start = dead_pid()
    write_lease(out, lease_record("run-crashed", host=socket.gethostname(), pid=pid, pid_start=start))
    with Lease.acquire(out, None, "run-mine") as lease:
        assert lease.previous["pid"] == pid
        assert read_lease(out)["holder"] == lease.holder

    # A live process on this host holds it: refused.
    write_lease(
        out,
        lease_record(
            "run-alive",
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_proc_stat(os.getpid())[1],
            this_kernel=True,
        ),
    )
    with pytest.raises(UserError, match="run-alive"):
        Lease.acquire(out, None, "run-mine")


@pytest.mark.parametrize("other", [{"boot_id": "another-machine-with-the-same-name"}, {"pid_ns": "pid:[1]"}])
def test_dead_pid_from_another_boot_or_pid_namespace_is_judged_by_heartbeat_only(tmp_path, other):
    if (_boot_id() if "boot_id" in other else _pid_namespace()) is None:
        pytest.skip("this system does not expose it")
    out = str(tmp_path / "out")
    pid, start = dead_pid()

    def lease_of_the_container():
        record = lease_record("run-container", host=socket.gethostname(), pid=pid, pid_start=start, this_kernel=True)
        return {**record, **other}

    write_lease(out, lease_of_the_container())
    # Another boot is watched (its heartbeat goes on); another PID namespace on this kernel is judged at once.
    beating = FakeClock(on_sleep=lambda: write_lease(out, lease_of_the_container()))
    with pytest.raises(UserError, match="run-container"):
        Lease.acquire(out, None, "run-mine", clock=beating, notify=lambda line: None)


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
    write_lease(str(out), lease_record("run-crashed", age_s=1000, this_kernel=True))
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
    """An unreadable lease is watched: refused if it changes, taken over once unchanged for the stale limit (its
    mtime, another clock, is not consulted)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_bytes(b'{"run_id": "trunc')
    rewritten = FakeClock(on_sleep=lambda: (out / LEASE_NAME).write_bytes(b'{"run_id": "trunc2'))
    with pytest.raises(UserError, match="unreadable lease"):
        Lease.acquire(str(out), None, "run-mine", clock=rewritten, notify=lambda line: None)
    old = time.time() - 1000
    os.utime(out / LEASE_NAME, (old, old))
    clock = FakeClock()
    with Lease.acquire(str(out), None, "run-mine", clock=clock, notify=lambda line: None) as lease:
        assert lease.previous is None and read_lease(str(out))["holder"] == lease.holder
    assert clock.elapsed >= 300


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
    with pytest.raises(ValueError, match="margin"):  # the margin (6 heartbeats) leaves the holder one heartbeat
        Lease.acquire(str(tmp_path / "out"), None, "r", stale_after_s=7, heartbeat_s=1)
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
            write_lease(out, lease_record("run-crashed", age_s=1000, this_kernel=True))
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
    write_lease(out, lease_record("run-fresh", age_s=3, this_kernel=True), options)
    with pytest.raises(UserError, match="run-fresh"):
        Lease.acquire(out, options, "run-mine")
    write_lease(out, lease_record("run-stale", age_s=1000, this_kernel=True), options)
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
            write_lease(out, lease_record("run-crashed", age_s=1000, this_kernel=True), options)
        results = race(out, options)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, (attempt, results)
        winners[0].release()


# -- the margin, watched takeovers and fenced writes (time controlled: FakeClock) ------------------------------------
def output_for(where: str, tmp_path, request) -> tuple[str, dict | None]:
    if where == "local":
        return str(tmp_path / "out"), None
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", server["storage_options"]


def put_text(out: str, name: str, text: str, options) -> None:
    write_bytes_atomic(f"{out}/{name}", text.encode(), options)


def get_text(out: str, name: str, options) -> str | None:
    fs, path = filesystem(f"{out}/{name}", options)
    fs.invalidate_cache(path)
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_holder_stops_writing_a_margin_before_a_taker_may_take_over(where, tmp_path, request, monkeypatch):
    """The race of issue 22 (stale limit 2 s: the holder passed its check at 1.96 s and wrote, a taker took over at
    2.11 s). Here the holder's heartbeats stop landing after it acquired; whenever the taker (another machine)
    re-reads the lease, the holder tries to write its run record. Its writes stop a margin before the takeover."""
    out, options = output_for(where, tmp_path, request)
    clock = FakeClock()
    another_machine(monkeypatch, "holder")
    holder = Lease.acquire(out, options, "run-holder", stale_after_s=2.0, heartbeat_s=0.1, clock=clock.skewed(0.0))
    assert holder.margin_s == pytest.approx(0.6)  # 6 heartbeats: the holder writes until 1.4 s, no later
    another_machine(monkeypatch, "taker")
    written, refused = [], []

    def holder_writes():
        try:
            with holder.fenced():
                put_text(out, "_run.json", "holder", options)
            written.append(clock.elapsed)
        except UserError as exc:
            refused.append((clock.elapsed, str(exc)))

    clock.on_sleep = holder_writes
    notes: list[str] = []
    taker = Lease.acquire(
        out, options, "run-taker", stale_after_s=2.0, heartbeat_s=0.1, clock=clock, notify=notes.append
    )
    try:
        taken_at = clock.elapsed
        eps = 1e-6  # float sums of the fake sleeps
        assert 2.0 - eps <= taken_at <= 2.1, taken_at
        assert written and max(written) <= 1.4 + eps and max(written) <= taken_at - holder.margin_s + eps, written
        assert refused and min(t for t, _ in refused) > 1.4 and any(1.9 < t < 2.0 for t, _ in refused)
        assert "could not renew it for 1 s" in refused[0][1] and "0.6 s before another" in refused[0][1]
        assert len(notes) == 1 and "run-holder" in notes[0] and "watching it for up to 2 s" in notes[0]
        with taker.fenced():
            put_text(out, "_run.json", "taker", options)
        with pytest.raises(UserError, match="this run lost the lease"):
            with holder.fenced():
                put_text(out, "_run.json", "holder", options)
        assert get_text(out, "_run.json", options) == "taker"
    finally:
        taker.release()
        holder.release()
    assert get_text(out, LEASE_NAME, options) is None  # the taker removed its lease; the holder left it alone


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0])
def test_a_live_lease_is_never_taken_early_however_the_wall_clocks_differ(skew_s, tmp_path, monkeypatch):
    """The holder's wall clock an hour behind (its heartbeats look an hour old to the taker) or ahead: the taker
    watches on its own clock, sees the heartbeat change and refuses; the holder keeps its lease."""
    out = str(tmp_path / "out")
    clock = FakeClock()
    another_machine(monkeypatch, "holder")
    holder = Lease.acquire(out, None, "run-holder", stale_after_s=20, heartbeat_s=1, clock=clock.skewed(skew_s))
    another_machine(monkeypatch, "taker")
    beat_at = [0.0]

    def holder_beats():  # every heartbeat period
        if clock.elapsed - beat_at[0] >= 1.0:
            holder.update(holder.run_id)
            beat_at[0] = clock.elapsed

    clock.on_sleep = holder_beats
    try:
        assert abs(read_lease(out)["heartbeat_unix"] - time.time() - skew_s) < 60
        with pytest.raises(UserError, match=r"run run-holder .*last heartbeat \d+ s ago"):
            Lease.acquire(out, None, "run-taker", stale_after_s=20, heartbeat_s=1, clock=clock, notify=lambda m: None)
        assert clock.elapsed <= 1.5  # refused at the first heartbeat seen, not after the stale limit
        assert read_lease(out)["holder"] == holder.holder
        holder.check()
    finally:
        holder.release()


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0])
def test_a_dead_lease_is_taken_over_after_the_stale_limit_on_the_takers_clock(skew_s, tmp_path, caplog):
    """A dead run on another machine whose clock was an hour ahead (its heartbeat in the taker's future: never
    "old" by the wall clock) or behind (an hour "old" at once): taken over after exactly the stale limit watched,
    with one line said while watching."""
    out = str(tmp_path / "out")
    write_lease(out, lease_record("run-dead", age_s=-skew_s))
    clock = FakeClock()
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        with Lease.acquire(out, None, "run-mine", stale_after_s=20, heartbeat_s=1, clock=clock) as lease:
            assert lease.previous["run_id"] == "run-dead"
            assert read_lease(out)["holder"] == lease.holder
    assert 20 <= clock.elapsed <= 20.5
    watching = [r.getMessage() for r in caplog.records if "watching" in r.getMessage()]
    assert len(watching) == 1 and "\n" not in watching[0], watching
    assert "run run-dead (host other-host, pid 4242) that this machine's clock cannot time" in watching[0]
    assert "up to 20 s" in watching[0]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fenced_writes_refuse_once_the_lease_is_lost_and_write_nothing(where, tmp_path, request):
    out, options = output_for(where, tmp_path, request)
    clock = FakeClock()
    lease = Lease.acquire(out, options, "run-mine", stale_after_s=20, heartbeat_s=1, clock=clock)
    with lease.fenced():
        put_text(out, "_dataset.json", "mine", options)
    assert lease.holds()
    write_lease(out, lease_record("run-intruder", host="h2", pid=77), options)
    with pytest.raises(UserError, match=r"lost the lease .*taken over by run run-intruder \(host h2, pid 77\)"):
        with lease.fenced():
            put_text(out, "_run.json", "mine", options)
    assert get_text(out, "_run.json", options) is None
    assert not lease.holds()
    lease.release()

    # No heartbeat landed for longer than stale limit - margin (14 s): refused, though the lease is still its own.
    out2 = out + "2"
    lease = Lease.acquire(out2, options, "run-mine", stale_after_s=20, heartbeat_s=1, clock=clock)
    clock.advance(14.01)
    with pytest.raises(UserError, match="lost the lease .*could not renew it for 14 s"):
        with lease.fenced():
            put_text(out2, "_run.json", "mine", options)
    assert get_text(out2, "_run.json", options) is None
    assert json.loads(get_text(out2, LEASE_NAME, options))["holder"] == lease.holder
    assert not lease.holds()
    with pytest.raises(UserError, match="lost the lease"):
        lease.update(run_id="run-other")
    lease.release()

    # A write that outlived the margin while no heartbeat landed: it happened, and the run stops after it.
    out3 = out + "3"
    lease = Lease.acquire(out3, options, "run-mine", stale_after_s=20, heartbeat_s=1, clock=clock)
    clock.advance(13)
    with pytest.raises(UserError, match="could not renew it for 15 s"):
        with lease.fenced():
            clock.advance(2)
            put_text(out3, "_run.json", "slow", options)
    assert not lease.holds()
    lease.release()


def test_update_never_revives_a_lapsed_lease(tmp_path):
    out = str(tmp_path / "out")
    clock = FakeClock()
    with Lease.acquire(out, None, "run-mine", stale_after_s=20, heartbeat_s=1, clock=clock) as lease:
        before = read_lease(out)
        clock.advance(15)
        with pytest.raises(UserError, match="could not renew"):
            lease.update(run_id="run-later")
        assert read_lease(out) == before  # no heartbeat written after the lapse


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
