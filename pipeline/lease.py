"""One writer per OUTPUT: an exclusive lease file, `OUTPUT/_lease.json`, kept alive by a heartbeat thread.

A run acquires the lease before it writes anything into OUTPUT and releases it at the end. A second run into the
same OUTPUT is refused with one line that names the holder, unless the lease is dead, in which case it is taken
over:

* its heartbeat (`heartbeat_unix`, written by the holder's own clock) is older than `stale_after_s`: clocks of the
  machines that share an OUTPUT are assumed to be roughly in sync (NTP; a skew of seconds, not minutes); or
* it was written on this host (same host name and, when both sides know them, the same kernel boot id and PID
  namespace: containers and look-alike host names never judge each other's pids) by a process that is no longer
  running, or whose pid now belongs to a process with a different start time (pid reuse).

How exclusive the create is depends on the store:

* local disks: the lease is written whole to a temp file and hard-linked into place (`os.link` fails if the name
  exists), so a reader never sees a half-written lease; on filesystems without hard links it falls back to
  `O_CREAT | O_EXCL`. A dead lease is removed by renaming it aside and checking that what was moved is, byte for
  byte, the dead lease (otherwise it is put back), so two simultaneous takers cannot both win.
* S3 (s3fs): a conditional PUT (`If-None-Match: *`) creates the lease, a conditional DELETE (`If-Match: <etag>`)
  removes a dead one, and heartbeats are conditional PUTs on the lease's own ETag. On a conflict s3fs raises
  `FileExistsError` (from the `PreconditionFailed` S3 error; an `OSError` naming PreconditionFailed or
  ConditionalRequestConflict is treated the same). An S3-compatible store that ignores these headers gets no
  more than the guarantee of the other stores below.
* other fsspec stores (gs://, az://, memory://, ...): no conditional create is used; the lease is created by
  exists-check + write + read-back. Two runs that start within the same moment can both pass the check; the
  read-back catches most such races, and the heartbeat and `check()` catch the rest before the next shard is
  committed, but the guarantee is weaker than on local disks and S3.

Heartbeats re-read the lease and rewrite it only if it is unchanged: atomically on S3 (If-Match), as a
read-compare-replace on local disks and other stores. `check()` reads the lease again, so a run that lost it stops
before its next shard rather than at its next heartbeat.

The holder sweeps temporary files (`.tmp-*`, left by writers that died mid-write) on local OUTPUTs when it
acquires the lease: as the sole writer it may remove them all.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from .errors import UserError
from .lease_store import LEASE_NAME, Current, lease_store
from .storage import join

log = logging.getLogger(__name__)

# The documented limit: a run whose heartbeat is older than this is presumed dead and its lease is taken over.
LEASE_STALE_S = 300.0
# How often the holder rewrites its heartbeat: 20 beats within the stale limit, so slow storage never lets it lapse.
LEASE_HEARTBEAT_S = 15.0

_ACQUIRE_ATTEMPTS = 20
_VANISHED_RECHECK_S = 0.2


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- processes ------------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks since boot) of a process from /proc/<pid>/stat, or (None, None)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None, None
    fields = stat[stat.rfind(")") + 2 :].split()  # fields[0] is field 3 (state); the command may contain spaces
    try:
        return fields[0], int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None, None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_alive(pid: Any, pid_start: Any) -> bool:
    """Whether pid (on this host) is still the process that wrote the lease; True when in doubt."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: rely on the heartbeat there
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return True
    state, start = _proc_stat(pid)
    if state in ("Z", "X"):
        return False  # exited, not yet reaped
    if pid_start is not None and start is not None:
        try:
            return int(pid_start) == start
        except (TypeError, ValueError):
            return True
    return True


# -- the lease ------------------------------------------------------------------------------------------------------
class Lease:
    """An exclusive lease on an OUTPUT folder, held by one run; see the module docstring.

    Attributes: `url` (OUTPUT), `lease_url`, `run_id`, `holder` (this acquisition's uuid), `swept` (temp files
    removed on acquisition), `previous` (the dead lease's record when this acquisition took one over, else None),
    `lost` (why the lease was lost, else None).
    """

    def __init__(
        self, output_url: str, storage_options: dict | None, run_id: str, stale_after_s: float, heartbeat_s: float
    ):
        if not heartbeat_s > 0 or not stale_after_s > heartbeat_s:
            raise ValueError(
                f"lease heartbeat ({heartbeat_s} s) must be positive and shorter than the stale limit "
                f"({stale_after_s} s)"
            )
        self.url = output_url.rstrip("/")
        self.storage_options = storage_options or {}
        self.lease_url = join(self.url, LEASE_NAME)
        self.run_id = run_id
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s)
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _proc_stat(self.pid)[1]
        self.pid_ns = _pid_namespace()
        self.boot_id = _boot_id()
        self.started_unix = time.time()
        self.swept = 0
        self.previous: dict | None = None
        self.lost: str | None = None
        self._lost_by: dict | None = None
        self._backend = lease_store(self.url, self.storage_options)
        self._last_beat_unix = self.started_unix
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquisition ----------------------------------------------------------------------------------------------
    @classmethod
    def acquire(
        cls,
        output_url: str,
        storage_options: dict | None,
        run_id: str,
        stale_after_s: float = LEASE_STALE_S,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
    ) -> Lease:
        """Take the lease on OUTPUT (creating the folder if local), or raise UserError naming the run holding it.

        Takes over a dead lease (see the module docstring), sweeps temp files of dead writers (`swept`), and starts
        the heartbeat thread.
        """
        lease = cls(output_url, storage_options, run_id, stale_after_s, heartbeat_s)
        lease._acquire()
        lease._thread = threading.Thread(target=lease._heartbeat_loop, name=f"lease-heartbeat-{run_id}", daemon=True)
        try:
            lease.swept = lease._backend.sweep()
            if lease.swept:
                log.info("removed %d temporary file(s) left in %s by earlier writers", lease.swept, lease.url)
            lease._thread.start()
        except BaseException:
            lease.release()  # do not leave a lease without a heartbeat behind
            raise
        return lease

    def _record(self, now: float) -> dict:
        return {
            "run_id": self.run_id,
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "pid_ns": self.pid_ns,
            "boot_id": self.boot_id,
            "started_at": _now_iso(self.started_unix),
            "heartbeat_at": _now_iso(now),
            "heartbeat_unix": now,
        }

    @staticmethod
    def _encode(record: dict) -> bytes:
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def _acquire(self) -> None:
        for _ in range(_ACQUIRE_ATTEMPTS):
            current = self._backend.read()
            if current is None:
                now = time.time()
                data = self._encode(self._record(now))
                token = self._backend.create(data)
                if token is not None:
                    self._last_beat_unix = now
                    return
                current = self._backend.read()  # someone else was quicker (or our own retried PUT landed)
                if current is None:
                    continue
                if current.record is not None and current.record.get("holder") == self.holder:
                    self._last_beat_unix = now
                    return
            why_dead = self._dead_reason(current)
            if why_dead is None:
                raise UserError(self._refusal(current))
            if self._backend.delete_if(current.token):
                record = current.record or {}
                self.previous = current.record
                log.warning(
                    "taking over the lease on %s from run %s (host %s, pid %s): %s",
                    self.url,
                    record.get("run_id", "?"),
                    record.get("host", "?"),
                    record.get("pid", "?"),
                    why_dead,
                )
            # Read again: create ours if the lease is gone; if another taker was quicker, its lease is alive.
        raise UserError(
            f"could not take the lease on output {self.url}: {self.lease_url} kept changing while "
            "this run tried to take it; another run is starting there: try again in a minute"
        )

    def _dead_reason(self, current: Current) -> str | None:
        """Why the lease is dead, or None if it may be alive."""
        now = time.time()
        record = current.record
        if record is None:
            if current.mtime is not None and now - current.mtime > self.stale_after_s:
                return f"its lease file is unreadable and {now - current.mtime:.0f} s old"
            return None
        try:
            beat = float(record.get("heartbeat_unix"))
        except (TypeError, ValueError):
            beat = None
        if beat is None or now - beat > self.stale_after_s:
            age = "unknown" if beat is None else f"{now - beat:.0f} s old"
            return f"its heartbeat is {age} (limit {self.stale_after_s:g} s)"
        if self._same_pid_space(record) and not _pid_alive(record.get("pid"), record.get("pid_start")):
            return f"its process {record.get('pid')} on this host is no longer running"
        return None

    def _same_pid_space(self, record: dict) -> bool:
        """Whether the lease's pid can be looked up here: same host name, boot and PID namespace (when known)."""

        def same(key: str, ours: str | None) -> bool:
            return record.get(key) is None or ours is None or record.get(key) == ours

        return record.get("host") == self.host and same("boot_id", self.boot_id) and same("pid_ns", self.pid_ns)

    def _refusal(self, current: Current) -> str:
        record = current.record
        if record is None:
            return (
                f"output {self.url} has an unreadable lease file {self.lease_url}, written less than "
                f"{self.stale_after_s:g} s ago; if no run is writing there, delete it"
            )
        try:
            ago = f"{max(0.0, time.time() - float(record.get('heartbeat_unix'))):.0f} s ago"
        except (TypeError, ValueError):
            ago = "at an unknown time"
        return (
            f"output {self.url} is being written by run {record.get('run_id', '?')} (host "
            f"{record.get('host', '?')}, pid {record.get('pid', '?')}), last heartbeat {ago}; wait for it to "
            f"finish or stop it (a lease whose heartbeat is older than {self.stale_after_s:g} s is taken over)"
        )

    # -- heartbeat ------------------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._lock:
                    if self._stop.is_set() or self.lost:
                        return
                    self._beat()
                    if self.lost:
                        log.error("%s", self._lost_message())
                        return
            except Exception as exc:  # storage trouble: try again at the next beat; check() notices a lapse
                log.warning("could not renew the lease on %s: %s: %s", self.url, type(exc).__name__, exc)

    def _read_ours(self) -> Current | None:
        """The lease if it is still ours, else None with `lost` set. A missing lease is read twice (a concurrent
        taker may have it renamed aside for a moment)."""
        current = self._backend.read()
        if current is None:
            time.sleep(_VANISHED_RECHECK_S)
            current = self._backend.read()
        if current is None:
            self.lost = "vanished"
            self._lost_by = None
            return None
        record = current.record or {}
        if record.get("holder") != self.holder:
            self.lost = "taken over"
            self._lost_by = record
            return None
        return current

    def _beat(self) -> None:
        for _ in range(3):
            current = self._read_ours()
            if current is None:
                return
            now = time.time()
            data = self._encode(self._record(now))
            token = self._backend.replace_if(data, current.token)
            if token is not None:
                self._last_beat_unix = now
                return
        # the lease kept changing under us: the next read decides

    def _lost_message(self) -> str:
        if self.lost == "vanished":
            return (
                f"the lease on output {self.url} ({self.lease_url}) was deleted by someone else; this run stops; "
                "rerun to resume"
            )
        by = self._lost_by or {}
        return (
            f"the lease on output {self.url} was taken over by run {by.get('run_id', '?')} (host "
            f"{by.get('host', '?')}, pid {by.get('pid', '?')}); this run stops; rerun to resume"
        )

    # -- public -----------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise UserError unless this run still holds the lease (read now, not only at the last heartbeat).

        Call before committing each shard. Also raises when the heartbeat could not be renewed for longer than the
        stale limit (another run may take the lease over at any moment).
        """
        with self._lock:
            if not self.lost and self._thread is not None and not self._stop.is_set():
                self._read_ours()
            if self.lost:
                raise UserError(self._lost_message())
            if self._stop.is_set():
                raise UserError(f"the lease on output {self.url} was released; this run stops; rerun to resume")
            lapse = time.time() - self._last_beat_unix
            if lapse > self.stale_after_s:
                raise UserError(
                    f"this run could not renew its lease on output {self.url} for {lapse:.0f} s "
                    f"(limit {self.stale_after_s:g} s), so another run may take it over; this run "
                    "stops; rerun to resume"
                )

    def update(self, run_id: str) -> None:
        """Record another run id (a run that resumes an older run id) and beat now; UserError if the lease is lost."""
        with self._lock:
            self.run_id = run_id
            if self._stop.is_set() and not self.lost:
                raise UserError(f"the lease on output {self.url} was released; this run stops; rerun to resume")
            if not self.lost:
                self._beat()
            if self.lost:
                raise UserError(self._lost_message())

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Never raises for a vanished lease; other
        storage errors are logged (a lease left behind is taken over once it goes stale or its process is gone)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=60)
        with self._lock:
            if self.lost or self._thread is None:
                self._thread = None
                return
            self._thread = None
            try:
                current = self._backend.read()
                if current is not None and (current.record or {}).get("holder") == self.holder:
                    self._backend.delete_if(current.token)
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("could not remove the lease %s: %s: %s", self.lease_url, type(exc).__name__, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.url!r}, run_id={self.run_id!r}, holder={self.holder!r}, lost={self.lost!r})"
