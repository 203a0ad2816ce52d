"""`featurize report`: one static HTML page about an OUTPUT, readable offline (no external assets).

The page: what made the numbers (identity), the newest run's counts and every run, the current rows' counts, the
error reasons grouped (with example uris), the newest run's per-stage seconds and throughput, each concept's logit
distribution (one histogram per concept), and for slides OUTPUTs the slide list with a heatmap thumbnail per slide
(drawn by pipeline.heatmap). Figures are PNGs drawn with matplotlib's Agg backend, inlined as base64; every text
from the OUTPUT is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from . import families
from .errors import UserError
from .rescore import ScoredOutput, logits_matrix
from .storage import write_bytes_atomic

log = logging.getLogger(__name__)

HIST_BINS = 40
EXAMPLES_PER_REASON = 3
MAX_REASONS = 50
THUMBNAIL_PX = 360


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("featurize report draws with matplotlib: pip install 'pipeline-featurize[analysis]'") from None
    return Figure


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(png_b64: str, alt: str, css: str = "") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64}">'


# -- what the rows say ------------------------------------------------------------------------------------------------
def reason_key(reason: str, uri: str) -> str:
    """An error reason with what is particular to the input (its uri, file name, long numbers) taken out, so
    the same failure on many inputs is one group."""
    text = reason or "(no reason given)"
    for part in sorted({uri, uri.rsplit("/", 1)[-1]} - {""}, key=len, reverse=True):
        text = text.replace(part, "…")
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text)  # object addresses (<_io.BytesIO object at 0x7f...>)
    return re.sub(r"\d{4,}", "N", text)


class RowSummary:
    """Counts, grouped error reasons and per-concept logit histograms over an OUTPUT's current rows."""

    def __init__(self, source: ScoredOutput):
        self.source = source
        self.counts: Counter = Counter()
        self.reasons: dict[str, dict] = {}
        self.with_logits = source.has_logits
        columns = (
            ["uri", "status"]
            + (["error"] if "error" in source.columns else [])
            + (["concept_logits"] if self.with_logits else [])
        )
        k = len(source.concepts)
        self.low, self.high = np.full(k, np.inf), np.full(k, -np.inf)
        self.total, self.n = np.zeros(k), 0
        for chunk in source.chunks(columns) if source.shards else ():
            self._first_pass(chunk)
        self.histograms = self._histograms() if self.with_logits and self.n else []

    def _first_pass(self, chunk) -> None:
        status = chunk.column("status").to_pylist()
        self.counts.update(status)
        failed = [i for i, s in enumerate(status) if s != "ok"]
        if failed:
            uris = chunk.column("uri").to_pylist()
            errors = chunk.column("error").to_pylist() if "error" in chunk.column_names else [None] * len(uris)
            for i in failed:
                group = self.reasons.setdefault(
                    reason_key(errors[i], uris[i]), {"count": 0, "examples": [], "reason": errors[i]}
                )
                group["count"] += 1
                if len(group["examples"]) < EXAMPLES_PER_REASON:
                    group["examples"].append(uris[i])
        if self.with_logits:
            logits = self._ok_logits(chunk)
            if len(logits):
                self.low = np.minimum(self.low, logits.min(axis=0))
                self.high = np.maximum(self.high, logits.max(axis=0))
                self.total += logits.sum(axis=0, dtype=np.float64)
                self.n += len(logits)

    @staticmethod
    def _ok_logits(chunk) -> np.ndarray:
        ok = pc.fill_null(
            pc.and_(pc.equal(chunk.column("status"), "ok"), pc.is_valid(chunk.column("concept_logits"))), False
        )
        return logits_matrix(chunk.column("concept_logits").filter(ok))

    def _histograms(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Second pass: per concept, counts over HIST_BINS equal bins between its lowest and highest logit."""
        edges = []
        for lo, hi in zip(self.low, self.high):
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges.append(np.linspace(lo, hi, HIST_BINS + 1))
        counts = [np.zeros(HIST_BINS, np.int64) for _ in edges]
        for chunk in self.source.chunks(["uri", "status", "concept_logits"]):
            logits = self._ok_logits(chunk)
            for j, e in enumerate(edges):
                counts[j] += np.histogram(logits[:, j], bins=e)[0] if len(logits) else 0
        return list(zip(counts, edges))


# -- figures ----------------------------------------------------------------------------------------------------------
def histogram_png(concept: str, counts: np.ndarray, edges: np.ndarray, mean: float, sigmoid: bool) -> str:
    Figure = _matplotlib()
    fig = Figure(figsize=(3.3, 2.3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#3b6ea8", edgecolor="none")
    ax.axvline(mean, color="#d95f02", linewidth=1.2)
    half = sigmoid and edges[0] < 0 < edges[-1]
    if half:
        ax.axvline(0.0, color="#555555", linewidth=0.8, linestyle="--")
    ax.set_title(concept if len(concept) <= 40 else concept[:39] + "…", fontsize=9)
    ax.set_xlabel(f"logit (orange: mean {mean:.3g}" + ("; dashed: p = 0.5)" if half else ")"), fontsize=7)
    ax.set_ylabel("rows", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def slide_thumbnails(source: ScoredOutput, concept: str, storage_options: dict | None, max_slides: int) -> dict:
    """slide_id -> base64 PNG heatmap of `concept` over the slide (pipeline.heatmap's drawing, shrunk)."""
    from PIL import Image

    from .heatmap import SlideOutput, draw, thumbnail, tile_grid_values

    result = SlideOutput(source.url, storage_options)
    k = result.concept_index(concept)
    out: dict[str, str] = {}
    slides = [s for s in source.current_slides().to_pylist() if s["n_tiles"] and s["footprint_px"] is not None]
    with tempfile.TemporaryDirectory() as tmp:
        for slide in slides[:max_slides]:
            tiles = result.tiles(slide)
            if tiles.num_rows == 0:
                continue
            grid, extent = tile_grid_values(tiles, slide, k, use_maps=False)
            try:
                background = thumbnail(slide, storage_options)
            except Exception as exc:  # a reader that is not installed, a slide gone: draw on white
                log.warning("slide %s: no thumbnail (%s)", slide["slide_id"], type(exc).__name__)
                background = None
            path = draw(Path(tmp) / "h.png", slide, concept, grid, extent, background, f"tile logit: {concept}")
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
            out[slide["slide_id"]] = base64.b64encode(buf.getvalue()).decode("ascii")
    return out


# -- the page ---------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;color:#222;
font-size:14px;line-height:1.4;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.bar{background:#3b6ea8;height:10px;display:inline-block;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{border:1px solid #eee}code{font-size:12px}
td.uris{font-size:12px;word-break:break-all;max-width:420px}td.reason{max-width:480px;word-break:break-word}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(
    headers: list[str],
    rows: list[list],
    numeric: set[int] = frozenset(),
    raw: set[int] = frozenset(),
    css: dict[int, str] | None = None,
) -> str:
    """rows of values (escaped, unless their column is in `raw`: already HTML)."""
    css = css or {}
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = " ".join(filter(None, ["n" if i in numeric else "", css.get(i, "")]))
            cells.append(f'<td class="{cls}">{v if i in raw else _e(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value else "0"
    return f"{value:,}" if isinstance(value, int) else _e(value)


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


def _counts_section(source: ScoredOutput, run: dict | None, summary: RowSummary) -> str:
    rows = [
        ["current rows", sum(summary.counts.values())],
        ["ok", summary.counts.get("ok", 0)],
        ["error", sum(v for k, v in summary.counts.items() if k != "ok")],
    ]
    which = (
        "each slide's tiles from its newest run"
        if source.is_slides
        else "every row"
        if source.rescore_record
        else "each input's newest row"
    )
    parts = [
        "<h2>Counts</h2>",
        f"<p>Current {'tile' if source.is_slides else 'image'} rows (the current dataset version, {which}):</p>",
        _table(["", "rows"], [[k, _number(v)] for k, v in rows], numeric={1}),
    ]
    if run:
        counts = run.get("counts", {})
        flat = [[k, _number(v)] for k, v in _ordered(counts, COUNT_ORDER) if not isinstance(v, dict)]
        classes = counts.get("error_classes") or {}
        flat += [[f"error class: {k}", _number(v)] for k, v in classes.items()]
        parts += [
            f"<p>The newest run, <code>{_e(run.get('run_id'))}</code> ({_e(run.get('command', ''))}, "
            f"{_e(run.get('state', ''))}), from <code>_run.json</code>:</p>",
            _table(["count", "value"], flat, numeric={1}),
        ]
    return "\n".join(parts)


def _runs_section(runs: list[dict]) -> str:
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
                _number(r.get("wall_s", "")),
                _number(c.get("processed", "")),
                _number(c.get("ok", "")),
                _number(c.get("error", "")),
                _number(speed if speed is not None else ""),
            ]
        )
    return "<h2>Runs</h2>" + _table(
        ["run", "command", "state", "started", "wall s", "processed", "ok", "error", "per s"],
        rows,
        numeric={4, 5, 6, 7, 8},
    )


def _errors_section(summary: RowSummary, slides_errors: list[dict]) -> str:
    parts = ["<h2>Errors</h2>"]
    groups = sorted(summary.reasons.values(), key=lambda g: (-g["count"], str(g["reason"])))
    if not groups and not slides_errors:
        return "<h2>Errors</h2><p>No error rows.</p>"
    if slides_errors:
        parts.append("<p>Slides that failed (<code>_slides.parquet</code>):</p>")
        parts.append(
            _table(
                ["slide", "uri", "reason"],
                [[s["slide_id"], s["uri"], s["error"]] for s in slides_errors],
                css={1: "uris", 2: "reason"},
            )
        )
    if groups:
        shown = groups[:MAX_REASONS]
        more = f" ({len(groups) - len(shown)} rarer reasons not shown)" if len(groups) > len(shown) else ""
        parts.append(f"<p>Error rows by reason{more}:</p>")
        parts.append(
            _table(
                ["rows", "reason (an example)", "example uris"],
                [
                    [_number(g["count"]), g["reason"] or "(no reason given)", "<br>".join(_e(u) for u in g["examples"])]
                    for g in shown
                ],
                numeric={0},
                raw={2},
                css={1: "reason", 2: "uris"},
            )
        )
    return "\n".join(parts)


def _stages_section(run: dict | None) -> str:
    if not run or not run.get("stages"):
        return ""
    numbers = {k: v for k, v in run["stages"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    stages = dict(_ordered(numbers, STAGE_ORDER))
    seconds = {k: v for k, v in stages.items() if k.endswith("_s")}
    longest = max(seconds.values(), default=0) or 1
    rows = [
        [
            k.removesuffix("_s").replace("_", " "),
            _number(float(v)),
            f'<span class="bar" style="width:{int(240 * v / longest)}px"></span>',
        ]
        for k, v in seconds.items()
    ]
    rows += [[k.replace("_", " "), _number(float(v)), ""] for k, v in stages.items() if k not in seconds]
    speed = [(k, run[k]) for k in ("images_per_s", "tiles_per_s", "first_shard_s", "wall_s") if run.get(k) is not None]
    facts = ", ".join(f"{k.replace('_', ' ')}: {_number(v)}" for k, v in speed)
    if run["stages"].get("actors_started_before_plan"):
        facts += ("; " if facts else "") + "the model loaded while the driver planned"
    return (
        "<h2>Stages and throughput</h2>"
        + (f"<p>{_e(facts)}</p>" if facts else "")
        + '<p class="muted">Seconds per stage of the newest run (decode, model and write are summed over '
        "batches, so they can exceed the wall time).</p>" + _table(["stage", "seconds", ""], rows, numeric={1}, raw={2})
    )


def _family(identity: dict) -> families.Family | None:
    try:
        return families.named(identity.get("kind", ""))
    except KeyError:
        return None


def _concepts_section(source: ScoredOutput, summary: RowSummary) -> str:
    if not source.has_logits:
        return "<h2>Concept logits</h2><p>This OUTPUT has no concept logits (a features-only run).</p>"
    if not summary.histograms:
        return "<h2>Concept logits</h2><p>No ok rows.</p>"
    sigmoid = _family(source.identity) is not None and _family(source.identity).probability == "sigmoid"
    scale_bias = source.scale_bias
    means = summary.total / max(summary.n, 1)
    figures = [
        _img(histogram_png(name, counts, edges, float(mean), sigmoid), f"logit histogram: {name}", "concept")
        for name, (counts, edges), mean in zip(source.concepts, summary.histograms, means)
    ]
    formula = (
        f"logit = {scale_bias[0]:.4g} * cos"
        + (f" {'+-'[scale_bias[1] < 0]} {abs(scale_bias[1]):.4g}" if scale_bias and scale_bias[1] else "")
        if scale_bias
        else ""
    )
    note = (formula + "; " if formula else "") + (
        "sigmoid(logit) is the probability" if sigmoid else "compare concepts with a softmax"
    )
    return (
        f"<h2>Concept logits</h2><p>Distribution of each concept's logit over {summary.n:,} ok rows "
        f'({_e(note)}).</p><div class="grid">' + "".join(figures) + "</div>"
    )


def _slides_section(source: ScoredOutput, concept: str, thumbnails: dict, max_slides: int) -> str:
    slides = source.current_slides().to_pylist()
    k = source.concepts.index(concept) if concept in source.concepts else None
    rows = []
    for s in slides:
        best = s.get("concept_max")
        rows.append(
            [
                s["slide_id"],
                s["status"],
                _number(s.get("n_tiles") or 0),
                _number(s.get("n_tile_errors") or 0),
                _number(s.get("slide_mpp")) if s.get("slide_mpp") is not None else "",
                _number(float(best[k])) if best is not None and k is not None and best[k] is not None else "",
                _img(thumbnails[s["slide_id"]], f"heatmap {s['slide_id']}", "slide")
                if s["slide_id"] in thumbnails
                else '<span class="muted">no scored tiles</span>',
            ]
        )
    cut = len([s for s in slides if s["n_tiles"]]) > max_slides
    note = f" Heatmaps for the first {max_slides} slides with tiles (--max-slides)." if cut else ""
    return (
        f"<h2>Slides</h2><p>{len(slides)} slides; heatmaps of <b>{_e(concept)}</b> (tile logits over the "
        f"slide's thumbnail in grey).{_e(note)}</p>"
        + _table(
            ["slide", "status", "tiles", "tile errors", "slide_mpp (µm/px)", f"max logit: {concept}", "heatmap"],
            rows,
            numeric={2, 3, 4, 5},
            raw={6},
        )
    )


def render(
    source: ScoredOutput, concept: str | None = None, storage_options: dict | None = None, max_slides: int = 100
) -> str:
    """The whole page as a string."""
    _matplotlib()
    summary = RowSummary(source)
    run = source.out.read_json("_run.json")
    runs = source.out.runs()
    identity = source.identity
    family = _family(identity)
    facts = [
        ["model family", family.title if family else v]
        if k == "kind"
        else [k, v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())]
        for k, v in identity.items()
    ]
    if source.version is not None:
        facts.append(["dataset version", source.version])
    if source.rescore_record:
        facts.append(["rescore of", source.rescore_record.get("source", {}).get("output")])
    if source.concepts:
        facts.append(["concepts", ", ".join(source.concepts)])
    body = [
        f'<h1>featurize report</h1><p class="muted"><code>{_e(source.url)}</code>, '
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
        "<h2>What the numbers depend on</h2>" + _table(["", ""], facts, css={1: "reason"}),
        _counts_section(source, run, summary),
        _runs_section(runs),
    ]
    slides_errors = []
    if source.is_slides:
        slides_errors = [s for s in source.current_slides().to_pylist() if s["status"] != "ok"]
    body += [_errors_section(summary, slides_errors), _stages_section(run), _concepts_section(source, summary)]
    if source.is_slides:
        if concept is None and source.concepts:
            concept = source.concepts[0]
        if concept is not None and concept not in source.concepts:
            raise UserError(f"no concept {concept!r} in {source.url}; available: {', '.join(source.concepts)}")
        thumbs = slide_thumbnails(source, concept, storage_options, max_slides) if concept else {}
        body.append(_slides_section(source, concept or "", thumbs, max_slides))
    title = f"featurize report: {source.url}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )


def write_report(
    output: str, path: str, storage_options: dict | None = None, concept: str | None = None, max_slides: int = 100
) -> str:
    if max_slides < 0:
        raise UserError(f"--max-slides must be 0 or more, not {max_slides}")
    source = ScoredOutput(output, storage_options)
    if not source.shards:
        raise UserError(f"{output} holds no shards (part-*.parquet) yet: no run has committed a work unit there")
    page = render(source, concept, storage_options, max_slides)
    write_bytes_atomic(path, page.encode("utf-8"), storage_options)
    return path
