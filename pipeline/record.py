"""The run record: `_runs/<run-id>.json` for every run and `_run.json` for the newest, written when the run has its
plan, when it fails and when it completes (see docs/output.md for its fields)."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone

from .errors import UserError, first_line
from .schema import package_versions
from .write import OutputDir, ShardWriter

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A run id that sorts by start time (UTC), unique across machines."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def started_record(
    run_id: str, job, cfg, identity: dict, version: int, planned, listing, started: float, layout, command_line: str
) -> dict:
    """The record of a run that has its plan: what it runs, with what, and what it plans to do."""
    counts = {"listed": listing.rows, "duplicates": listing.duplicates, **planned.counts}
    # skipped: listed, and processed neither by this run nor by the one after a resumed run (`after_plan`)
    in_plan = planned.counts.get("in_plan", planned.counts["planned"])
    counts["skipped"] = listing.unique - in_plan - planned.counts.get("after_plan", 0)
    return {
        "run_id": run_id,
        "command": job.command,
        "state": "running",
        "input": cfg.input,
        "output": cfg.output,
        "command_line": command_line,
        **identity,
        "identity": identity,
        "dataset_version": version,
        "resumed": planned.resumed,
        "started_at": iso(started),
        "versions": package_versions(),
        **job.model.described(),
        "counts": counts,
        "last_unit": max(planned.units, default=-1),
        "layout": layout.as_dict(),
    }


def finished_counts(writer: ShardWriter | None) -> dict:
    """The run record's result counts: ok and error rows (errors by class), and the rows Ray delivered twice."""
    if writer is None:
        return {"ok": 0, "error": 0, "error_classes": {}, "duplicates_dropped": 0}
    return {**writer.counts, "error_classes": dict(sorted(writer.error_classes.items()))}


def stage_summary(stats: dict, stream_started: float) -> dict:
    """Per-stage seconds for the run record; startup_s is the wait for the first result (actors starting)."""
    out = {k: round(v, 3) for k, v in stats.items() if k.endswith("_s")}
    if "first_batch_at" in stats:
        out["startup_s"] = round(stats["first_batch_at"] - stream_started, 3)
    return out


def save_run_record(out: OutputDir, record: dict) -> None:
    """The run's record under _runs/ and as the newest _run.json."""
    out.write_json(record, "_runs", f"{record['run_id']}.json")
    out.write_json(record, "_run.json")


def record_failure(out: OutputDir, record: dict, exc: BaseException, lease) -> None:
    """Mark the run record failed with the reason (a rerun still resumes it); never masks the original error, and
    writes nothing once another run holds OUTPUT."""
    if not record or not lease.holds():  # another run may hold OUTPUT now: its files are not ours to write
        return
    reason = first_line(exc, 1000) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"
    record.update(state="failed", ended_at=iso(time.time()), failure=reason)
    try:
        save_run_record(out, record)
    except Exception:
        log.warning("could not write the failed run's record", exc_info=True)
