"""The sections of `featurize report` that come from the run records and the row counts: the current rows' counts,
the newest run's counts (`_run.json`), every run (`_runs/`), and the newest run's seconds per stage and throughput."""

from __future__ import annotations

from collections import Counter

from .report_html import esc, number, table
from .rescore import ScoredOutput

COUNT_ORDER = (
    "listed",
    "skipped",
    "planned",
    "slides_ok",
    "slides_error",
    "slide_errors_at_planning",
    "tiles",
    "processed",
    "ok",
    "error",
    "duplicates_dropped",
)
STAGE_ORDER = (
    "listing_s",
    "processor_s",
    "ray_start_and_prepare_s",
    "planning_s",
    "startup_s",
    "read_s",
    "decode_s",
    "model_s",
    "write_s",
    "stream_s",
    "gpu_busy_fraction",
)


def _ordered(mapping: dict, order: tuple) -> list:
    """Items in `order`, then the others as they come."""
    return sorted(mapping.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def counts_section(source: ScoredOutput, run: dict | None, status_counts: Counter) -> str:
    """The current rows by status, and the newest run's own counts."""
    rows = [
        ["current rows", sum(status_counts.values())],
        ["ok", status_counts.get("ok", 0)],
        ["error", sum(v for k, v in status_counts.items() if k != "ok")],
    ]
    which = (
        "each slide's tiles from its newest run"
        if source.is_slides
        else "every row"
        if source.rescore_record
        else "each input's newest row"
    )
    parts = [
        f"<p>Current {'tile' if source.is_slides else 'image'} rows (the current dataset version, {which}):</p>",
        table(["", "rows"], [[k, number(v)] for k, v in rows], numeric={1}),
    ]
    if run:
        counts = run.get("counts", {})
        flat = [[k, number(v)] for k, v in _ordered(counts, COUNT_ORDER) if not isinstance(v, dict)]
        classes = counts.get("error_classes") or {}
        flat += [[f"error class: {k}", number(v)] for k, v in classes.items()]
        parts += [
            f"<p>The newest run, <code>{esc(run.get('run_id'))}</code> ({esc(run.get('command', ''))}, "
            f"{esc(run.get('state', ''))}), from <code>_run.json</code>:</p>",
            table(["count", "value"], flat, numeric={1}),
        ]
    return "\n".join(parts)


def runs_section(runs: list[dict]) -> str:
    """Every run's record (`_runs/`), one row each."""
    if not runs:
        return ""
    rows = []
    for r in runs:
        c = r.get("counts", {})
        speed = r.get("images_per_s", r.get("tiles_per_s"))
        rows.append(
            [
                r.get("run_id"),
                r.get("command", ""),
                r.get("state"),
                r.get("started_at", ""),
                number(r.get("wall_s", "")),
                number(c.get("processed", "")),
                number(c.get("ok", "")),
                number(c.get("error", "")),
                number(speed if speed is not None else ""),
            ]
        )
    return table(
        ["run", "command", "state", "started", "wall s", "processed", "ok", "error", "per s"],
        rows,
        numeric={4, 5, 6, 7, 8},
    )


def stages_section(run: dict | None) -> str:
    """The newest run's seconds per stage, as numbers and bars, and its throughput."""
    if not run or not run.get("stages"):
        return ""
    numbers = {k: v for k, v in run["stages"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    stages = dict(_ordered(numbers, STAGE_ORDER))
    seconds = {k: v for k, v in stages.items() if k.endswith("_s")}
    longest = max(seconds.values(), default=0) or 1
    rows = [
        [
            k.removesuffix("_s").replace("_", " "),
            number(float(v)),
            f'<span class="bar" style="width:{int(240 * v / longest)}px"></span>',
        ]
        for k, v in seconds.items()
    ]
    rows += [[k.replace("_", " "), number(float(v)), ""] for k, v in stages.items() if k not in seconds]
    speed = [(k, run[k]) for k in ("images_per_s", "tiles_per_s", "first_shard_s", "wall_s") if run.get(k) is not None]
    facts = ", ".join(f"{k.replace('_', ' ')}: {number(v)}" for k, v in speed)
    if run["stages"].get("actors_started_before_plan"):
        facts += ("; " if facts else "") + "the model loaded while the driver planned"
    return (
        (f"<p>{esc(facts)}</p>" if facts else "")
        + '<p class="muted">Seconds per stage of the newest run (decode, model and write are summed over '
        "batches, so they can exceed the wall time).</p>" + table(["stage", "seconds", ""], rows, numeric={1}, raw={2})
    )
