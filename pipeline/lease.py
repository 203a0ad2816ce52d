"""One writer per OUTPUT: an exclusive lease file, `OUTPUT/_lease.json`, kept alive by a heartbeat thread.

A run acquires the lease before it writes anything into OUTPUT, writes every shared file through `fenced()`, and
releases the lease at the end. Three durations rule it (the defaults, and any a caller passes, keep this order):

* `stale_after_s` (S, 300 s): a taker takes a lease over only after seeing its heartbeat unchanged for S on its own
  monotonic clock;
* `heartbeat_s` (H, 10 s): how often the holder rewrites the lease;
* `margin_s` (M, 6 heartbeats: 60 s): the holder stops writing once its last successful heartbeat began more than
  S - M ago (240 s). It then counts the lease as lost for good: `check()` and `fenced()` refuse, the heartbeat stops.

No decision compares two machines' clocks. The record keeps `heartbeat_at`/`heartbeat_unix` (wall clock) for
people; the decisions use monotonic clocks (CLOCK_BOOTTIME where there is one: it counts time spent suspended).

A second run into an OUTPUT whose lease exists decides, without waiting where it can:

* written on this host by a process that is no longer running (same host name and, when both sides know them, the
  same kernel boot id and PID namespace; a reused pid is told apart by its start time): taken over at once;
* written on this kernel (same boot id): the record's `heartbeat_monotonic` is on this machine's own clock, so it
  is judged at once: older than S, taken over; otherwise refused, naming the holder and its last heartbeat;
* otherwise (another machine, or an unreadable lease): watched. It says so in one line (a warning on stderr: "output
  ... has a lease of run R (host h, pid p) that this machine's clock cannot time; watching it for up to 300 s ..."),
  re-reads the lease every second or so, and refuses as soon as the lease changes (its holder is alive: within about
  one heartbeat), or takes it over once it stayed unchanged for S. So a run that arrives while another machine's
  lease is dead waits S from its arrival, however long that lease has been dead; the wait is bounded by S plus one
  re-read. A lease that vanishes meanwhile is created; of several runs watching one dead lease, the conditional
  delete lets one win, and the others then find its fresh lease.

Why the holder's check can trust the margin: a taker's S starts when it first read the holder's last heartbeat,
which was after the holder began writing it (a same-kernel taker counts from that beginning itself), and the
takeover is a conditional delete of exactly what was watched. So no run takes the lease over until S after the
holder's last successful heartbeat began, and the holder writes only while less than S - M has passed since.

Fencing (`fenced()`): every write of a shared file in OUTPUT (the dataset and run records, the slides and prompt
tables, the listing, a failure record; each shard, through `check()` before its commit) runs inside

    with lease.fenced():
        out.write_json(record, "_runs", f"{run_id}.json")

which reads the lease (it must still be this run's) and checks the lapse before the block, and checks the lapse
again after it (a write that outlived the margin stops the run). A run asks `holds()` (reads the lease, never
raises) before writing anything on its way out. What this guarantees, and what it cannot:

* guaranteed: a fenced write that completes within M of its check lands before any other run that follows this
  protocol holds the lease (its check passed, so a takeover was at least M away);
* not guaranteed: a write that takes longer than M while the heartbeat also fails (the run stops after it, but the
  write happened); a writer that ignores the protocol (`_lease.json` deleted or rewritten by hand) between the
  check's read and the write. Between the two there is no atomic tie: on S3 a conditional PUT can name only the
  object it writes, never the lease's ETag, and a local rename cannot be made conditional on another file either.
  The margin, not the store, makes the read-then-write safe.

How exclusive the lease's own writes are depends on the store (`pipeline/lease_store.py`):

* local disks: the lease is written whole to a temp file and hard-linked into place (`os.link` fails if the name
  exists), so a reader never sees a half-written lease; on filesystems without hard links it falls back to
  `O_CREAT | O_EXCL`. A dead lease is removed by renaming it aside and checking that what was moved is, byte for
  byte, the one watched (otherwise it is put back), so two simultaneous takers cannot both win. A heartbeat is a
  read-compare-replace: it is itself a fenced write (it starts only within S - M).
* S3 (s3fs): a conditional PUT (`If-None-Match: *`) creates the lease, a conditional DELETE (`If-Match: <etag>`)
  removes a dead one, and heartbeats are conditional PUTs on the lease's own ETag. A request the store performed
  but answered with an error is retried by the client and then fails its condition: the creator reads the lease
  back and recognises its own, a heartbeat reads it again and rewrites it. An S3-compatible store that ignores
  these headers gets no more than the guarantee of the other stores below.
* other fsspec stores (gs://, az://, memory://, ...): no conditional create is used; the lease is created by
  exists-check + write + read-back. Two runs that start within the same moment can both pass the check; the
  read-back catches most such races, and the heartbeat and `check()` catch the rest before the next shard is
  committed, but the guarantee is weaker than on local disks and S3.

The holder sweeps temporary files (`.tmp-*`, left by writers that died mid-write) on local OUTPUTs when it
acquires the lease: as the sole writer it may remove them all.

(Longer than most modules: the guarantees above and the code that keeps them are one piece, read together; the
storage backends are in lease_store.py.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from .errors import UserError
from .lease_store import LEASE_NAME, Current, lease_store
from .storage import join

log = logging.getLogger(__name__)

# A taker takes over a lease whose heartbeat it has seen unchanged this long on its own clock.
LEASE_STALE_S = 300.0
# How often the holder rewrites its heartbeat; a taker watching another machine's lease sees a live one change
# within about this long.
LEASE_HEARTBEAT_S = 10.0
# The holder stops writing this many heartbeats before a taker may take over: the longest a fenced write (a shard
# upload with its retries) may take while the heartbeat is failing.
LEASE_MARGIN_BEATS = 6

_ACQUIRE_ATTEMPTS = 20
_VANISHED_RECHECK_S = 0.2
_WATCH_POLL_S = 1.0  # a taker re-reads a watched lease this often (or every half heartbeat, if shorter)


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _monotonic() -> float:
    """This machine's monotonic clock, counting time suspended where the kernel can (a holder whose machine slept
    must not think its last heartbeat recent)."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


class Clock:
    """The lease's sense of time: `monotonic()` for every decision, `time()` only to stamp the record people read,
    `sleep()` to pace a taker's watch, `wait(event, s)` to pace the heartbeat thread. Tests pass their own."""

    def monotonic(self) -> float:
        return _monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)


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
    `lost` (why the lease was lost: "taken over", "vanished" or "lapsed"; else None).
    """

    def __init__(
        self,
        output_url: str,
        storage_options: dict | None,
        run_id: str,
        stale_after_s: float,
        heartbeat_s: float,
        margin_s: float | None = None,
        clock: Clock | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        margin_s = LEASE_MARGIN_BEATS * heartbeat_s if margin_s is None else margin_s
        if not heartbeat_s > 0 or not margin_s >= heartbeat_s or not stale_after_s - margin_s >= 2 * heartbeat_s:
            raise ValueError(
                f"the lease's heartbeat ({heartbeat_s} s) must be positive, its margin ({margin_s} s) at least one "
                f"heartbeat, and the stale limit ({stale_after_s} s) must leave the holder two heartbeats beyond "
                "the margin"
            )
        self.url = output_url.rstrip("/")
        self.storage_options = storage_options or {}
        self.lease_url = join(self.url, LEASE_NAME)
        self.run_id = run_id
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s)
        self.margin_s = float(margin_s)
        self.clock = clock or Clock()
        self.notify = notify or log.warning
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _proc_stat(self.pid)[1]
        self.pid_ns = _pid_namespace()
        self.boot_id = _boot_id()
        self.started_unix = self.clock.time()
        self.swept = 0
        self.previous: dict | None = None
        self.lost: str | None = None
        self._lost_by: dict | None = None
        self._lapse_s = 0.0
        self._store = lease_store(self.url, self.storage_options)
        self._last_beat = self.clock.monotonic()  # when the last successful heartbeat began (monotonic)
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
        margin_s: float | None = None,
        clock: Clock | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> Lease:
        """Take the lease on OUTPUT (creating the folder if local), or raise UserError naming the run holding it.

        Takes over a dead lease (see the module docstring; watching another machine's lease, it tells `notify`,
        by default a warning, in one line), sweeps temp files of dead writers (`swept`), and starts the heartbeat.
        """
        lease = cls(output_url, storage_options, run_id, stale_after_s, heartbeat_s, margin_s, clock, notify)
        lease._acquire()
        lease._thread = threading.Thread(target=lease._heartbeat_loop, name=f"lease-heartbeat-{run_id}", daemon=True)
        try:
            lease.swept = lease._store.sweep()
            if lease.swept:
                log.info("removed %d temporary file(s) left in %s by earlier writers", lease.swept, lease.url)
            lease._thread.start()
        except BaseException:
            lease.release()  # do not leave a lease without a heartbeat behind
            raise
        return lease

    def _record(self, beat: float) -> dict:
        now = self.clock.time()
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
            "heartbeat_monotonic": beat,
            "stale_after_s": self.stale_after_s,
        }

    @staticmethod
    def _encode(record: dict) -> bytes:
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def _acquire(self) -> None:
        for _ in range(_ACQUIRE_ATTEMPTS):
            current = self._store.read()
            if current is None:
                if self._create():
                    return
                continue  # someone else was quicker: judge theirs
            why_dead = self._judge(current)
            if why_dead is None:
                continue  # it vanished while watched
            if self._store.delete_if(current.token):
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

    def _create(self) -> bool:
        beat = self.clock.monotonic()
        if self._store.create(self._encode(self._record(beat))) is not None:
            self._last_beat = beat
            return True
        current = self._store.read()  # the store may have performed our create but answered with an error
        if current is not None and (current.record or {}).get("holder") == self.holder:
            self._last_beat = beat
            return True
        return False

    def _judge(self, current: Current) -> str | None:
        """Why the lease is dead; UserError naming its holder if it is alive; None if it vanished while watched."""
        record = current.record
        if record is not None:
            if self._same_pid_space(record) and not _pid_alive(record.get("pid"), record.get("pid_start")):
                return f"its process {record.get('pid')} on this host is no longer running"
            age = self._same_clock_age(record)
            if age is not None:
                if age > self.stale_after_s:
                    return f"its heartbeat is {age:.0f} s old on this machine's clock (limit {self.stale_after_s:g} s)"
                raise UserError(self._refusal(record, age))
        return self._watch(current)

    def _same_clock_age(self, record: dict) -> float | None:
        """Seconds since the lease's last heartbeat began, when it was written on this kernel (one monotonic clock);
        None otherwise."""
        if self.boot_id is None or record.get("boot_id") != self.boot_id:
            return None
        try:
            age = self.clock.monotonic() - float(record["heartbeat_monotonic"])
        except (KeyError, TypeError, ValueError):
            return None
        return age if age >= 0 else None  # a beat in this clock's future: not this clock (a time namespace)

    def _watch(self, current: Current) -> str | None:
        """Re-read the lease until it stays unchanged for the stale limit on this machine's clock (dead: why) or
        changes (alive: UserError naming its holder); None if it vanished."""
        first_seen = last_seen = self.clock.monotonic()
        self.notify(self._watching(current))
        poll_s = min(_WATCH_POLL_S, self.heartbeat_s / 2)
        while True:
            unchanged = self.clock.monotonic() - first_seen
            if unchanged >= self.stale_after_s:
                return f"it stayed unchanged for {unchanged:.0f} s (limit {self.stale_after_s:g} s)"
            self.clock.sleep(min(poll_s, self.stale_after_s - unchanged))
            seen = self._store.read()
            if seen is None:
                return None
            if seen.token != current.token:
                raise UserError(self._refusal(seen.record, self.clock.monotonic() - last_seen))
            last_seen = self.clock.monotonic()

    def _watching(self, current: Current) -> str:
        what = (
            f"an unreadable lease file {self.lease_url}"
            if current.record is None
            else "a lease of " + self._holder_text(current.record) + " that this machine's clock cannot time"
        )
        return (
            f"output {self.url} has {what}; watching it for up to {self.stale_after_s:g} s: if it changes, that "
            "run is alive and this one stops; if not, it is taken over"
        )

    def _same_pid_space(self, record: dict) -> bool:
        """Whether the lease's pid can be looked up here: same host name, boot and PID namespace (when known)."""

        def same(key: str, ours: str | None) -> bool:
            return record.get(key) is None or ours is None or record.get(key) == ours

        return record.get("host") == self.host and same("boot_id", self.boot_id) and same("pid_ns", self.pid_ns)

    @staticmethod
    def _holder_text(record: dict) -> str:
        return f"run {record.get('run_id', '?')} (host {record.get('host', '?')}, pid {record.get('pid', '?')})"

    def _refusal(self, record: dict | None, ago_s: float) -> str:
        if record is None:
            return (
                f"output {self.url} has an unreadable lease file {self.lease_url} that changed while this run "
                "watched it: another run is writing there; if none is, delete it"
            )
        return (
            f"output {self.url} is being written by {self._holder_text(record)}, last heartbeat "
            f"{max(0.0, ago_s):.0f} s ago; wait for it to finish or stop it (a lease whose heartbeat stays "
            f"unchanged for {self.stale_after_s:g} s is taken over)"
        )

    # -- heartbeat ------------------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self.clock.wait(self._stop, self.heartbeat_s):
            with self._lock:
                if self._stop.is_set() or self.lost:
                    return
                try:
                    self._beat()
                except Exception as exc:  # storage trouble: try again at the next beat, until the margin
                    log.warning("could not renew the lease on %s: %s: %s", self.url, type(exc).__name__, exc)
                if not self.lost:
                    self._lapsed()
                if self.lost:
                    log.error("%s", self._lost_message())
                    return

    def _lapsed(self, now: float | None = None) -> bool:
        """Whether the last successful heartbeat began too long ago to write again; if so the lease is lost."""
        lapse = (self.clock.monotonic() if now is None else now) - self._last_beat
        if lapse <= self.stale_after_s - self.margin_s:
            return False
        self.lost, self._lost_by, self._lapse_s = "lapsed", None, lapse
        return True

    def _read_ours(self) -> Current | None:
        """The lease if it is still ours, else None with `lost` set. A missing lease is read twice (a concurrent
        taker may have it renamed aside for a moment)."""
        current = self._store.read()
        if current is None:
            self.clock.sleep(_VANISHED_RECHECK_S)
            current = self._store.read()
        if current is None:
            self.lost, self._lost_by = "vanished", None
            return None
        record = current.record or {}
        if record.get("holder") != self.holder:
            self.lost, self._lost_by = "taken over", record
            return None
        return current

    def _beat(self) -> None:
        """Rewrite the lease if it is still ours; the rewrite is itself fenced (it starts only within the margin)."""
        for _ in range(3):
            current = self._read_ours()
            if current is None:
                return
            beat = self.clock.monotonic()
            if self._lapsed(beat):
                return
            if self._store.replace_if(self._encode(self._record(beat)), current.token) is not None:
                self._last_beat = beat
                return
        # the lease kept changing under us (or the store answered our own rewrite with an error): the next read decides

    def _lost_message(self) -> str:
        where = f"this run lost the lease on output {self.url}"
        if self.lost == "lapsed":
            return (
                f"{where}: it could not renew it for {self._lapse_s:.0f} s, and a run stops writing "
                f"{self.margin_s:g} s before another may take its lease over ({self.stale_after_s:g} s); "
                "rerun to resume"
            )
        if self.lost == "vanished":
            return f"{where}: {self.lease_url} was deleted by someone else; this run stops; rerun to resume"
        return (
            f"{where}: it was taken over by {self._holder_text(self._lost_by or {})}; this run stops; rerun to resume"
        )

    # -- public -----------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise UserError unless this run still holds the lease (read now, not only at the last heartbeat) and its
        last successful heartbeat began less than `stale_after_s - margin_s` ago. Call before committing each
        shard; `fenced()` calls it before every other write."""
        with self._lock:
            if not self.lost and not self._stop.is_set():
                if self._read_ours() is not None:
                    self._lapsed()
            if self.lost:
                raise UserError(self._lost_message())
            if self._stop.is_set():
                raise UserError(f"the lease on output {self.url} was released; this run stops; rerun to resume")

    @contextmanager
    def fenced(self) -> Iterator[None]:
        """Run the block (one write of a shared file in OUTPUT) only if this run holds the lease: `check()` before
        it; after it, UserError if the lease lapsed or was lost meanwhile. See the module docstring for what a
        fenced write is guaranteed.

        >>> with lease.fenced():  # doctest: +SKIP
        ...     save_run_record(out, record)
        """
        self.check()
        yield
        with self._lock:
            if not self.lost and not self._stop.is_set():
                self._lapsed()
            if self.lost:
                raise UserError(self._lost_message())

    def holds(self) -> bool:
        """Whether this run still holds the lease, read now; False, never an exception, when it is lost, released
        or cannot be read. For writes on the way out (a failure record), which must not raise over the error."""
        try:
            self.check()
        except Exception:
            return False
        return True

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
                current = self._store.read()
                if current is not None and (current.record or {}).get("holder") == self.holder:
                    self._store.delete_if(current.token)
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
