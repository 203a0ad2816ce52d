"""Search results as a self-contained HTML gallery: every thumbnail is an inline JPEG (a data: URI), tiles are cropped
from their slides, and a Content-Security-Policy allows nothing but inline images, styles and the one inline script
(which counts the thumbnails the browser decoded: `data-decoded` on <body>, for checks in a headless browser), so
the page works offline and loads nothing from anywhere."""

from __future__ import annotations

import html

import pyarrow as pa

from .decode import open_image
from .thumbnails import MAX_PIXELS, Thumbnail, data_uri, row_thumbnails

THUMB_PX = 192
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } p.meta { color: #666; margin: 0 0 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 14px; }
figure { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; }
figure img, .missing { display: block; margin: 0 auto 6px; max-width: 192px; max-height: 192px; }
.missing { width: 192px; height: 120px; background: #eee; color: #999; text-align: center; line-height: 120px; }
figcaption { font-size: 12px; word-break: break-all; } .score { font-weight: 600; }
.query { margin-bottom: 18px; } .query img { max-width: 192px; max-height: 192px; display: block; }
"""
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-thumbnails", images.length);
  document.body.setAttribute("data-decoded", images.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length);
});
"""


def thumbnails(results: pa.Table, slides: pa.Table | None, storage_options: dict | None) -> list[Thumbnail]:
    """Each result's thumbnail: the image file, or the tile cropped from its slide (geometry from `slides`, the
    version's rows of _slides.parquet)."""
    is_tiles = "slide_id" in results.column_names
    known = (slides.to_pylist() if slides is not None else []) if is_tiles else None
    return row_thumbnails(results.to_pylist(), known, storage_options, THUMB_PX)


def _figure(row: dict, thumbnail: Thumbnail) -> str:
    picture = (
        f'<img src="{thumbnail.src}" alt="result {row["rank"]}">'
        if thumbnail.src
        else f'<div class="missing" title="{html.escape(thumbnail.reason or "")}">not readable</div>'
    )
    if "slide_id" in row:
        where = f"{row['slide_id']} x={row['x']} y={row['y']} level={row['level']}"
    else:
        where = row["uri"]
    return (
        f'<figure>{picture}<figcaption><span class="score">#{row["rank"]} {row["score"]:.4f}</span><br>'
        f'<span title="{html.escape(str(row["uri"]))}">{html.escape(str(where))}</span></figcaption></figure>'
    )


def gallery_html(results: pa.Table, pictures: list[Thumbnail], title: str, about: str, query_image: str | None) -> str:
    """The page: a title, a line about the search, the query image if any, then one figure per result."""
    figures = "\n".join(_figure(row, thumb) for row, thumb in zip(results.to_pylist(), pictures))
    query = f'<div class="query"><p>query</p><img src="{query_image}" alt="query"></div>' if query_image else ""
    empty = "" if results.num_rows else "<p>No rows matched.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<title>{html.escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>
<body><h1>{html.escape(title)}</h1><p class="meta">{html.escape(about)}</p>{query}
<div class="grid">
{figures}
</div>{empty}
</body></html>
"""


def write_gallery(
    results: pa.Table,
    path: str,
    title: str,
    about: str,
    slides: pa.Table | None = None,
    query_image: bytes | None = None,
    storage_options: dict | None = None,
) -> None:
    from .storage import write_bytes_atomic

    query = None
    if query_image is not None:
        try:
            query = data_uri(open_image(query_image, MAX_PIXELS, draft_px=2 * THUMB_PX), THUMB_PX)
        except Exception:  # the query was embedded already; a page without its picture is still the answer
            query = None
    page = gallery_html(results, thumbnails(results, slides, storage_options), title, about, query)
    write_bytes_atomic(path, page.encode("utf-8"), storage_options)
