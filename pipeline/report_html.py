"""The HTML pieces of `featurize report`'s page: style, tables, sections, thumbnails. Every text from an OUTPUT goes
through `esc`; images are data: URIs only, and the page's Content-Security-Policy allows nothing else (no scripts,
no fetches), so it opens offline and loads nothing from anywhere."""

from __future__ import annotations

import html

from .thumbnails import Thumbnail

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;color:#222;
font-size:14px;line-height:1.4;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.bar{background:#3b6ea8;height:10px;display:inline-block;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{border:1px solid #eee}code{font-size:12px}
td.uris{font-size:12px;word-break:break-all;max-width:420px}td.reason{max-width:480px;word-break:break-word}
nav.toc{background:#f7f7f7;padding:8px 12px;margin:12px 0;font-size:13px}nav.toc a{margin-right:14px;color:#2a5d9f}
p.summary{font-size:15px}
.thumbs{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 8px}
figure.thumb{margin:0;width:120px;font-size:11px;line-height:1.3}
img.thumb{display:block;width:120px;height:120px;object-fit:contain}
.missing{width:112px;height:112px;padding:4px;display:flex;align-items:center;justify-content:center;
text-align:center;background:#fbf3f3;color:#8a3030;font-size:11px;overflow:hidden;word-break:break-word}
figcaption{margin-top:3px;word-break:break-all}figcaption b.n{white-space:nowrap;font-variant-numeric:tabular-nums}
figcaption .reason{color:#8a3030;word-break:break-word}
img.map{max-width:100%;border:1px solid #eee}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def img_b64(png_b64: str, alt: str, css: str = "") -> str:
    """A base64 PNG as an inline <img>."""
    return f'<img class="{css}" alt="{esc(alt)}" src="data:image/png;base64,{png_b64}">'


def thumb_img(thumb: Thumbnail, alt: str, css: str = "thumb") -> str:
    """A thumbnail, or a box with the reason it has none."""
    if thumb.src:
        return f'<img class="{css}" alt="{esc(alt)}" src="{esc(thumb.src)}">'
    return f'<div class="missing">{esc(thumb.reason or "no thumbnail")}</div>'


def thumb_figure(thumb: Thumbnail, caption_html: str, title: str) -> str:
    """A thumbnail with its caption (already HTML); `title` (the full uri) shows on hover."""
    return (
        f'<figure class="thumb" title="{esc(title)}">{thumb_img(thumb, title)}'
        f"<figcaption>{caption_html}</figcaption></figure>"
    )


def table(
    headers: list[str],
    rows: list[list],
    numeric: set[int] = frozenset(),
    raw: set[int] = frozenset(),
    css: dict[int, str] | None = None,
) -> str:
    """rows of values (escaped, unless their column is in `raw`: already HTML)."""
    css = css or {}
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = " ".join(filter(None, ["n" if i in numeric else "", css.get(i, "")]))
            cells.append(f'<td class="{cls}">{v if i in raw else esc(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value else "0"
    return f"{value:,}" if isinstance(value, int) else esc(value)


def section(anchor: str, title: str, body: str) -> str:
    """A section of the page with its heading; `anchor` is its id, linked from the table of contents."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}</section>'


def toc(sections: list[tuple[str, str]]) -> str:
    """Links to (anchor, title) of each section, in page order."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in sections)
    return f'<nav class="toc"><b>Contents:</b> {links}</nav>'


def page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
