"""What the driver shows: progress (a live bar on a terminal, a line every N seconds in a job's log), and nothing
of Ray's native log lines unless asked."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time

# Ray's C++ components (the driver's core worker) write lines like "[2026-12-03 17:37:25,823 E 2215 2524]
# core_worker.cc:2465: ..." straight to file descriptor 2, beyond the reach of Python's logging.
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] ")
_filter_lock = threading.Lock()
_filter_installed = False


def hide_native_log_lines() -> None:
    """Route this process's stderr through a filter that drops Ray's native log lines (fatal ones pass) and passes
    everything else through unchanged. Once per process; undone at exit."""
    global _filter_installed
    with _filter_lock:
        if _filter_installed:
            return
        try:
            sys.stderr.flush()
            original = os.dup(2)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
        except OSError:  # no real file descriptor 2 (embedded interpreters): nothing to filter
            return
        _filter_installed = True

    def pump():
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not NATIVE_LOG_LINE.match(line):
                        os.write(original, line + b"\n")
                if pending and not pending.startswith(b"["):  # a prompt or a progress bar without a newline
                    os.write(original, pending)
                    pending = b""
            if pending:
                os.write(original, pending)

    thread = threading.Thread(target=pump, name="featurize-stderr", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(original, 2)  # the pipe's last writer closes: the pump drains and ends
        thread.join(timeout=2)

    atexit.register(restore)


def stderr_is_terminal() -> bool:
    """Whether the user's stderr is a terminal (asked before the filter turns file descriptor 2 into a pipe)."""
    return _STDERR_TTY


_STDERR_TTY = sys.stderr.isatty() if hasattr(sys.stderr, "isatty") else False


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class Progress:
    """Counts rows done out of `total`. The rate is measured from the first row on, so start-up does not skew it."""

    BAR_WIDTH = 24
    TTY_REFRESH_S = 0.25

    def __init__(self, total: int, unit: str = "images", interval_s: float = 30.0, stream=None):
        self.total = max(0, int(total))
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = stderr_is_terminal() if stream is None else bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = self.TTY_REFRESH_S if self.tty else interval_s
        self.done = 0
        self.first_at: float | None = None  # the rate counts from the first rows on (their wait is start-up)
        self.first_done = 0
        self.shown_done = -1
        self.last_shown = time.perf_counter()

    def update(self, rows: int) -> None:
        if rows <= 0:
            return
        now = time.perf_counter()
        self.done += rows
        if self.first_at is None:
            self.first_at, self.first_done = now, self.done
        if now - self.last_shown >= self.interval_s:
            self.last_shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        elapsed = now - self.first_at if self.first_at is not None else 0.0
        rate = (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0  # from the first result on
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        speed = f", {rate:.1f} {self.unit}/s since the first result" if rate > 0 else ""
        text = f"{self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%){speed}{eta}"
        if self.tty:
            filled = int(self.BAR_WIDTH * min(1.0, self.done / self.total if self.total else 1.0))
            text = "[" + "#" * filled + "." * (self.BAR_WIDTH - filled) + "] " + text
        return "featurize: " + text

    def _show(self, now: float) -> None:
        self.shown_done = self.done
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Show the final count if it was not shown yet, and end the bar's line on a terminal."""
        if self.done and self.shown_done != self.done:
            self._show(time.perf_counter())
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
