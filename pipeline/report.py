"""`featurize report`: one static HTML page about an OUTPUT, readable offline (no external assets).

What people open a report for comes first: per concept the top k images (for slides, tiles cropped from their
slides) as thumbnails with their logits; a 2-D map of the image features coloured by each row's top concept; for
slides, a heatmap per slide. Then each concept's logit histogram, the error rows grouped by reason with thumbnails
where the bytes still decode, the counts, every run, and the newest run's seconds per stage.

The page stays one file of bounded size: at most `top_k` thumbnails (TOP_K by default, MAX_TOP_K at most) for each of
the first MAX_CONCEPTS_SHOWN concepts, ERROR_THUMBNAILS error rows and MAX_REASONS reasons, MAP_POINTS points in one
map image, `max_slides` heatmaps. Thumbnails are JPEGs of at most THUMB_PX a side, figures PNGs; every image is a
data: URI and every text from the OUTPUT is HTML-escaped. An input that cannot be read any more shows the reason
in place of its thumbnail. The rows are streamed shard by shard (report_scan.RowSummary): only what is shown is kept.
"""

from __future__ import annotations

import time

from . import families
from .errors import UserError
from .report_figures import embed_2d, figure_class, histogram_png, map_png, short, slide_heatmaps
from .report_html import esc, img_b64, number, page, section, table, thumb_figure, thumb_img, toc
from .report_runs import counts_section, runs_section, stages_section
from .report_scan import MAP_POINTS, MAP_SEED, TOP_K, RowSummary
from .rescore import ScoredOutput
from .storage import write_bytes_atomic
from .thumbnails import THUMB_PX, Thumbnail, row_thumbnails, slide_thumbnail

MAX_REASONS = 50  # error reasons in the table
ERROR_THUMBNAILS = 24  # error rows (and failed slides) shown with a thumbnail
MAX_CONCEPTS_SHOWN = 60  # concepts with thumbnails and a histogram
MAX_TOP_K = 50


def _family(identity: dict) -> families.Family | None:
    try:
        return families.named(identity.get("kind", ""))
    except KeyError:
        return None


# -- thumbnails of rows ---------------------------------------------------------------------------------------------
def _row_key(row: dict) -> tuple:
    return (row["uri"], row.get("x"), row.get("y"), row.get("level"))


def _thumbnails(source: ScoredOutput, rows: list[dict], storage_options: dict | None, partial: bool) -> dict:
    """_row_key -> Thumbnail for each row (images: the file; tiles: cropped from the slide its _slides.parquet
    row describes), each input read once."""
    unique = list({_row_key(r): r for r in rows}.values())
    slides = source.current_slides().to_pylist() if source.is_slides else None
    return dict(zip(map(_row_key, unique), row_thumbnails(unique, slides, storage_options, THUMB_PX, partial)))


def _where(row: dict) -> str:
    """A row's short name: the file name, or the slide and the tile's level-0 corner."""
    if row.get("x") is not None:
        return f"{row.get('slide_id') or row['uri'].rsplit('/', 1)[-1]} ({row['x']}, {row['y']})"
    return row["uri"].rstrip("/").rsplit("/", 1)[-1]


# -- sections -------------------------------------------------------------------------------------------------------
def _gallery_section(source: ScoredOutput, summary: RowSummary, storage_options: dict | None) -> str:
    what = "tiles" if source.is_slides else "images"
    if not summary.top.k:
        return ""  # --top-k 0
    if not source.has_logits:
        return f"<p>This OUTPUT has no concept logits (a features-only run): no {what} to rank.</p>"
    if not summary.n:
        return "<p>No ok rows.</p>"
    shown = summary.top.best[:MAX_CONCEPTS_SHOWN]
    thumbs = _thumbnails(source, [p.key for picks in shown for p in picks], storage_options, partial=False)
    parts = [
        f"<p>The {summary.top.k} {what} with the highest logit for each concept, of {summary.n:,} ok rows"
        + (" (cropped from their slides)" if source.is_slides else "")
        + ", with the logit and the probability (p). Hover over one for its full uri.</p>"
    ]
    for concept, picks in zip(source.concepts, shown):
        figures = []
        for rank, pick in enumerate(picks, 1):
            p = f"<br>p {pick.probability:.3g}" if pick.probability is not None else ""
            caption = f'<b class="n">#{rank} logit {pick.logit:.3f}</b>{p}<br>{esc(short(_where(pick.key), 48))}'
            figures.append(thumb_figure(thumbs[_row_key(pick.key)], caption, pick.key["uri"]))
        row = "".join(figures)
        parts.append(f'<h3>{esc(concept)}</h3><div class="thumbs" data-concept="{esc(concept)}">{row}</div>')
    if len(source.concepts) > len(shown):
        parts.append(f'<p class="muted">{len(source.concepts) - len(shown)} more concepts not shown.</p>')
    return "\n".join(parts)


def _map_section(source: ScoredOutput, summary: RowSummary) -> str:
    sample = summary.map
    if sample.note:
        return f"<p>No map: {esc(sample.note)}.</p>"
    if sample.features is None or not len(sample.features):
        return "<p>No ok rows with features.</p>"
    xy, method = embed_2d(sample.features, MAP_SEED)
    n, of = len(sample.features), sample.offered
    which = f"all {n:,}" if n == of else f"a seeded sample of {n:,} (of {of:,})"
    concepts = source.concepts if summary.with_logits else []
    colour = (
        "coloured by each row's top concept (the highest logit)"
        if concepts
        else "in one colour: this OUTPUT has no concept logits (a features-only run), so there is nothing to colour by"
    )
    title = f"{method} of {n:,} rows' image features"
    return (
        f"<p>{which} ok rows' image features in two dimensions ({method}{', cosine' if method == 'UMAP' else ''}), "
        f"{colour}. Points close together have similar features.</p>"
        + img_b64(map_png(xy, sample.top, concepts, title), f"map of the image features ({method})", "map")
    )


def _errors_section(source: ScoredOutput, summary: RowSummary, storage_options: dict | None) -> str:
    slides_errors = [s for s in source.current_slides().to_pylist() if s["status"] != "ok"] if source.is_slides else []
    groups = sorted(summary.reasons.values(), key=lambda g: (-g["count"], str(g["reason"])))
    if not groups and not slides_errors:
        return "<p>No error rows.</p>"
    parts = []
    if slides_errors:
        shots = [
            slide_thumbnail(s["uri"], s.get("reader"), storage_options) if i < ERROR_THUMBNAILS else None
            for i, s in enumerate(slides_errors)
        ]
        parts.append("<p>Slides that failed (<code>_slides.parquet</code>):</p>")
        parts.append(
            table(
                ["slide", "uri", "reason", "slide"],
                [
                    [s["slide_id"], s["uri"], s["error"], thumb_img(t, s["slide_id"]) if t else ""]
                    for s, t in zip(slides_errors, shots)
                ],
                raw={3},
                css={1: "uris", 2: "reason"},
            )
        )
    if groups:
        parts += _reason_table(groups)
        rows = summary.error_rows(ERROR_THUMBNAILS)
        thumbs = _thumbnails(source, rows, storage_options, partial=True)
        parts.append(
            f"<p>{_rows(len(rows), 'error row')} as they look now (what still decodes; where nothing does, why):</p>"
            f'<div class="thumbs errors">{"".join(_error_figure(r, thumbs[_row_key(r)]) for r in rows)}</div>'
        )
    return "\n".join(parts)


def _rows(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _error_figure(row: dict, thumb: Thumbnail) -> str:
    """An error row: what its bytes still show (or why nothing), its name, and its reason unless the box says it."""
    reason = row.get("error") or "(no reason given)"
    said = f'<br><span class="reason">{esc(short(reason, 90))}</span>' if reason != thumb.reason else ""
    return thumb_figure(thumb, esc(short(_where(row), 48)) + said, row["uri"])


def _reason_table(groups: list[dict]) -> list[str]:
    shown = groups[:MAX_REASONS]
    more = f" ({len(groups) - len(shown)} rarer reasons not shown)" if len(groups) > len(shown) else ""
    return [
        f"<p>Error rows by reason{more}:</p>",
        table(
            ["rows", "reason (an example)", "example uris"],
            [
                [number(g["count"]), g["reason"] or "(no reason given)", "<br>".join(esc(u) for u in g["examples"])]
                for g in shown
            ],
            numeric={0},
            raw={2},
            css={1: "reason", 2: "uris"},
        ),
    ]


def _concepts_section(source: ScoredOutput, summary: RowSummary) -> str:
    if not source.has_logits:
        return "<p>This OUTPUT has no concept logits (a features-only run).</p>"
    if not summary.histograms:
        return "<p>No ok rows.</p>"
    family = _family(source.identity)
    sigmoid = family is not None and family.probability == "sigmoid"
    scale_bias = source.scale_bias
    means = summary.total / max(summary.n, 1)
    figures = [
        img_b64(histogram_png(name, counts, edges, float(mean), sigmoid), f"logit histogram: {name}", "concept")
        for name, (counts, edges), mean in zip(
            source.concepts[:MAX_CONCEPTS_SHOWN], summary.histograms[:MAX_CONCEPTS_SHOWN], means
        )
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
        f"<p>Distribution of each concept's logit over {summary.n:,} ok rows "
        f'({esc(note)}).</p><div class="grid">' + "".join(figures) + "</div>"
    )


def _slides_section(source: ScoredOutput, concept: str, heatmaps: dict, max_slides: int) -> str:
    slides = source.current_slides().to_pylist()
    k = source.concepts.index(concept) if concept in source.concepts else None
    rows = []
    for s in slides:
        best = s.get("concept_max")
        rows.append(
            [
                s["slide_id"],
                s["status"],
                number(s.get("n_tiles") or 0),
                number(s.get("n_tile_errors") or 0),
                number(s.get("slide_mpp")) if s.get("slide_mpp") is not None else "",
                number(float(best[k])) if best is not None and k is not None and best[k] is not None else "",
                thumb_img(heatmaps[s["slide_id"]], f"heatmap {s['slide_id']}", "slide")
                if s["slide_id"] in heatmaps
                else '<span class="muted">no scored tiles</span>',
            ]
        )
    cut = len([s for s in slides if s["n_tiles"]]) > max_slides
    note = f" Heatmaps for the first {max_slides} slides with tiles (--max-slides)." if cut else ""
    return (
        f"<p>{len(slides)} slides; heatmaps of <b>{esc(concept)}</b> (tile logits over the "
        f"slide's thumbnail in grey).{esc(note)}</p>"
        + table(
            ["slide", "status", "tiles", "tile errors", "slide_mpp (µm/px)", f"max logit: {concept}", "heatmap"],
            rows,
            numeric={2, 3, 4, 5},
            raw={6},
        )
    )


# -- the page -------------------------------------------------------------------------------------------------------
def _identity_rows(source: ScoredOutput) -> list[list]:
    family = _family(source.identity)
    facts = [
        ["model family", family.title if family else v]
        if k == "kind"
        else [k, v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())]
        for k, v in source.identity.items()
    ]
    if source.version is not None:
        facts.append(["dataset version", source.version])
    if source.rescore_record:
        facts.append(["rescore of", source.rescore_record.get("source", {}).get("output")])
    if source.concepts:
        facts.append(["concepts", ", ".join(source.concepts)])
    return facts


def _summary_line(source: ScoredOutput, summary: RowSummary) -> str:
    total = sum(summary.counts.values())
    errors = total - summary.counts.get("ok", 0)
    what = "tile" if source.is_slides else "image"
    family = _family(source.identity)
    slides = f"{len(source.current_slides()):,} slides, " if source.is_slides else ""
    return (
        f'<p class="summary">{slides}{total:,} current {what} rows: {summary.counts.get("ok", 0):,} ok, '
        f"{errors:,} errors; {len(source.concepts)} concepts"
        + (f"; model family {esc(family.title)}" if family else "")
        + "</p>"
    )


def render(
    source: ScoredOutput,
    concept: str | None = None,
    storage_options: dict | None = None,
    max_slides: int = 100,
    top_k: int = TOP_K,
) -> str:
    """The whole page as a string."""
    figure_class()  # matplotlib is there, before any reading
    if source.is_slides:
        concept = concept if concept is not None else (source.concepts[0] if source.concepts else None)
        if concept is not None and concept not in source.concepts:
            raise UserError(f"no concept {concept!r} in {source.url}; available: {', '.join(source.concepts)}")
    summary = RowSummary(source, top_k, MAP_POINTS)
    run = source.out.read_json("_run.json")
    what = "tiles" if source.is_slides else "images"
    sections = [
        ("identity", "What the numbers depend on", table(["", ""], _identity_rows(source), css={1: "reason"})),
        ("top", f"Top {what} per concept", _gallery_section(source, summary, storage_options)),
        ("map", "Map of the image features", _map_section(source, summary)),
    ]
    if source.is_slides:
        heatmaps = slide_heatmaps(source, concept, storage_options, max_slides) if concept else {}
        sections.append(("slides", "Slides", _slides_section(source, concept or "", heatmaps, max_slides)))
    sections += [
        ("logits", "Concept logits", _concepts_section(source, summary)),
        ("errors", "Errors", _errors_section(source, summary, storage_options)),
        ("counts", "Counts", counts_section(source, run, summary.counts)),
        ("runs", "Runs", runs_section(source.out.runs())),
        ("stages", "Stages and throughput", stages_section(run)),
    ]
    sections = [(a, t, b) for a, t, b in sections if b]
    header = (
        f'<h1>featurize report</h1><p class="muted"><code>{esc(source.url)}</code>, '
        f"{esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>"
    )
    body = [header, _summary_line(source, summary), toc([(a, t) for a, t, _ in sections])]
    body += [section(a, t, b) for a, t, b in sections]
    return page(f"featurize report: {source.url}", body)


def write_report(
    output: str,
    path: str,
    storage_options: dict | None = None,
    concept: str | None = None,
    max_slides: int = 100,
    top_k: int = TOP_K,
) -> str:
    if max_slides < 0:
        raise UserError(f"--max-slides must be 0 or more, not {max_slides}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise UserError(f"--top-k must be 0 to {MAX_TOP_K}, not {top_k}")
    source = ScoredOutput(output, storage_options)
    if not source.shards:
        raise UserError(f"{output} holds no shards (part-*.parquet) yet: no run has committed a work unit there")
    page_text = render(source, concept, storage_options, max_slides, top_k)
    write_bytes_atomic(path, page_text.encode("utf-8"), storage_options)
    return path
