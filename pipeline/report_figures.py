"""The figures of `featurize report`, drawn with matplotlib's Agg backend (no display) and inlined as base64 images:
a logit histogram per concept, the 2-D map of the image features (PCA, or UMAP when umap-learn is installed)
coloured by each row's top concept, and per slide a small heatmap (pipeline.heatmap's drawing, shrunk).
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .rescore import ScoredOutput
from .thumbnails import Thumbnail, data_uri

log = logging.getLogger(__name__)

HEATMAP_PX = 360  # a slide heatmap's longer side in the report
MAP_COLOURS_MAX = 20  # distinct colours in the map; rarer top concepts are drawn grey as "other"
SINGLE_COLOUR = "#3b6ea8"


def figure_class():
    """matplotlib's Figure (which draws with Agg, never a display), or a one-line error naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("featurize report draws with matplotlib: pip install 'pipeline-featurize[analysis]'") from None
    return Figure


def png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def histogram_png(concept: str, counts: np.ndarray, edges: np.ndarray, mean: float, sigmoid: bool) -> str:
    fig = figure_class()(figsize=(3.3, 2.3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=SINGLE_COLOUR, edgecolor="none")
    ax.axvline(mean, color="#d95f02", linewidth=1.2)
    half = sigmoid and edges[0] < 0 < edges[-1]
    if half:
        ax.axvline(0.0, color="#555555", linewidth=0.8, linestyle="--")
    ax.set_title(short(concept), fontsize=9)
    ax.set_xlabel(f"logit (orange: mean {mean:.3g}" + ("; dashed: p = 0.5)" if half else ")"), fontsize=7)
    ax.set_ylabel("rows", fontsize=8)
    ax.tick_params(labelsize=7)
    return png_b64(fig)


# -- the 2-D map ----------------------------------------------------------------------------------------------------
def pca_2d(features: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2]: the rows on their first two principal components (signs fixed: each component's largest
    loading positive, so the picture does not flip between LAPACK builds)."""
    centred = np.asarray(features, np.float64) - np.mean(features, axis=0, dtype=np.float64)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:2]
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    xy = centred @ (vt * np.where(signs == 0, 1.0, signs)[:, None]).T
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))  # one dimension, or one row: the rest at 0


def embed_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """The rows in 2-D and the method's name: UMAP (cosine) when umap-learn is installed and there are rows enough,
    else PCA."""
    if len(features) >= 16:
        try:
            import umap
        except ImportError:
            umap = None
        if umap is not None:
            try:
                reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=15)
                return np.asarray(reducer.fit_transform(np.asarray(features, np.float32))), "UMAP"
            except Exception as exc:  # an umap-learn that fails here must not cost the report its map
                log.warning("UMAP failed (%s); drawing the map with PCA", exc)
    return pca_2d(features), "PCA"


def _colour_groups(top: np.ndarray, concepts: list[str]) -> list[tuple[str, np.ndarray, object]]:
    """(legend label, row mask, colour) per top concept, the most frequent first; beyond MAP_COLOURS_MAX - 1
    concepts the rest are one grey group, "other"."""
    from matplotlib import colormaps

    present, counts = np.unique(top, return_counts=True)
    ranked = [int(c) for c, _ in sorted(zip(present, counts), key=lambda pc: (-pc[1], pc[0]))]
    shown = ranked if len(ranked) <= MAP_COLOURS_MAX else ranked[: MAP_COLOURS_MAX - 1]
    palette = colormaps["tab10" if len(shown) <= 10 else "tab20"]
    groups = []
    for i, c in enumerate(shown):
        mask = top == c
        groups.append((f"{short(concepts[c], 32)} ({int(mask.sum())})", mask, palette(i)))
    if len(shown) < len(ranked):
        mask = ~np.isin(top, shown)
        groups.append((f"other concepts ({int(mask.sum())})", mask, "#9a9a9a"))
    return groups


def map_png(xy: np.ndarray, top: np.ndarray, concepts: list[str], title: str) -> str:
    """The rows as points; with concepts, coloured by each row's top concept with a legend, else one colour."""
    fig = figure_class()(figsize=(7.6, 5.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if concepts:
        for label, mask, colour in _colour_groups(top, concepts):
            ax.scatter(xy[mask, 0], xy[mask, 1], s=12, color=colour, label=label, linewidths=0)
        ax.legend(title="top concept (rows)", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=12, color=SINGLE_COLOUR, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return png_b64(fig)


# -- slides ---------------------------------------------------------------------------------------------------------
def slide_heatmaps(source: ScoredOutput, concept: str, storage_options: dict | None, max_slides: int) -> dict:
    """slide_id -> Thumbnail: the heatmap of `concept` over the slide (pipeline.heatmap's drawing, shrunk to
    HEATMAP_PX), for the first `max_slides` slides with scored tiles."""
    from PIL import Image

    from .heatmap import SlideOutput, draw, thumbnail, tile_grid_values

    result = SlideOutput(source.url, storage_options)
    k = result.concept_index(concept)
    out: dict[str, Thumbnail] = {}
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
                out[slide["slide_id"]] = Thumbnail(src=data_uri(img, HEATMAP_PX, quality=85))
    return out
