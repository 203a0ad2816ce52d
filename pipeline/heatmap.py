"""`featurize heatmap`: where a concept lights up on a slide, drawn over the slide's thumbnail.

Reads what `featurize slides` wrote (OUTPUT/_slides.parquet, the tile shards, _prompts.parquet) and draws the tile
logits, or the patch-level concept maps when the run stored them, with matplotlib's Agg backend (no display).
The PNG has the slide's aspect ratio: the image fills it, the colour bar and title sit inside.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .dataset import read_prompts, readable_version
from .errors import UserError
from .schema import current_names
from .storage import is_remote
from .write import OutputDir

log = logging.getLogger(__name__)

LONG_SIDE_PX = 1200  # the PNG's longer side
DPI = 100
THUMBNAIL_PX = 2048  # the largest thumbnail read from the slide


# -- reading the output ---------------------------------------------------------------------------------------------
class SlideOutput:
    """One `featurize slides` OUTPUT: its slides, concepts and tile shards."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.out = OutputDir(output, storage_options)
        slides = current_names(self.out.read_table("_slides.parquet"), "slides")  # an older OUTPUT's too
        if slides is None:
            raise UserError(f"{output} has no _slides.parquet; is it the OUTPUT of `featurize slides`?")
        self.version = readable_version(self.out.read_json("_dataset.json"))
        if self.version is not None and "dataset_version" in slides.column_names:  # the readable version's slides
            slides = slides.filter(pc.equal(slides.column("dataset_version"), self.version))
        self.slides = slides
        self.concepts = self._concepts()

    def _concepts(self) -> list[str]:
        prompts = read_prompts(self.out, self.version)
        if prompts is not None:
            return prompts.column("concept").to_pylist()
        meta = (self.slides.schema.metadata or {}).get(b"pipeline.provenance")
        return list(json.loads(meta).get("concepts", [])) if meta else []

    @property
    def slide_ids(self) -> list[str]:
        return self.slides.column("slide_id").to_pylist()

    def slide(self, slide_id: str) -> dict:
        rows = self.slides.filter(pc.equal(self.slides.column("slide_id"), slide_id)).to_pylist()
        if not rows:
            raise UserError(f"no slide {slide_id!r} in {self.out.url}; available: {short_list(self.slide_ids)}")
        return rows[-1]

    def concept_index(self, concept: str) -> int:
        if concept not in self.concepts:
            raise UserError(f"no concept {concept!r} in {self.out.url}; available: {short_list(self.concepts)}")
        return self.concepts.index(concept)

    def tiles(self, slide: dict) -> pa.Table:
        """The slide's ok tiles from its latest run: x, y, concept_logits, and concept_maps when stored."""
        paths = sorted(self.out.shard_units().values())
        if not paths:
            return pa.table({"x": pa.array([], pa.int64()), "y": pa.array([], pa.int64())})
        import pyarrow.dataset as pads
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs = PyFileSystem(FSSpecHandler(self.out.fs)) if is_remote(self.out.url) else None
        dataset = pads.dataset(paths, format="parquet", filesystem=fs)
        columns = ["x", "y", "concept_logits"] + (["concept_maps"] if "concept_maps" in dataset.schema.names else [])
        where = (
            (pads.field("uri") == slide["uri"])
            & (pads.field("run_id") == slide["run_id"])
            & (pads.field("status") == "ok")
        )
        return dataset.to_table(columns=columns, filter=where)


def short_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return (shown + f", ... ({len(names)} in all)") if len(names) > limit else (shown or "none")


# -- the picture ----------------------------------------------------------------------------------------------------
def tile_grid_values(tiles: pa.Table, slide: dict, k: int, use_maps: bool) -> tuple[np.ndarray, tuple]:
    """The concept's values on a grid over the slide: (HxW float array, NaN where nothing was scored; matplotlib
    extent (left, right, bottom, top) in level-0 pixels)."""
    xs = tiles.column("x").to_numpy()
    ys = tiles.column("y").to_numpy()
    footprint, step = int(slide["footprint_px"]), int(slide["step_px"])
    if use_maps:
        n_concepts = len(tiles.column("concept_logits")[0].as_py())
        maps = np.asarray(tiles.column("concept_maps").to_pylist(), np.float32)
        side = int(round(math.sqrt(maps.shape[1] / n_concepts)))
        values = maps.reshape(len(xs), n_concepts, side, side)[:, k]
        cell = footprint / side  # level-0 pixels per map patch
        span = side
        offset = 0.0
    else:
        values = np.asarray(tiles.column("concept_logits").to_pylist(), np.float32)[:, k][:, None, None]
        cell = float(step)  # one cell per tile, centred on the tile
        span = 1
        offset = (footprint - step) / 2
    cols = int(math.ceil(slide["width"] / cell)) + span
    rows = int(math.ceil(slide["height"] / cell)) + span
    total = np.zeros((rows, cols), np.float64)
    count = np.zeros((rows, cols), np.int32)
    for x, y, v in zip(xs, ys, values):
        c, r = int(round(x / cell)), int(round(y / cell))
        total[r : r + span, c : c + span] += v
        count[r : r + span, c : c + span] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return grid, (offset, offset + cols * cell, offset + rows * cell, offset)


def thumbnail(slide: dict, storage_options: dict | None, reader: str | None = None) -> np.ndarray | None:
    """The slide at its coarsest convenient level (RGB uint8), or None (with a warning) if it cannot be read."""
    from PIL import Image

    from .slides import open_slide

    try:
        handle = open_slide(slide["uri"], reader or slide.get("reader") or "auto", storage_options)
    except ValueError as exc:
        log.warning(
            "slide %s (%s) cannot be opened for its thumbnail (%s); drawing on a blank background",
            slide["slide_id"],
            slide["uri"],
            exc,
        )
        return None
    try:
        fits = [i for i, (w, h) in enumerate(handle.level_dimensions) if max(w, h) <= THUMBNAIL_PX]
        level = min(fits, key=lambda i: handle.level_downsamples[i]) if fits else handle.level_count - 1
        w, h = handle.level_dimensions[level]
        img = Image.fromarray(handle.read(0, 0, level, w, h))
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        return np.asarray(img)
    finally:
        handle.close()


def draw(
    path: str | Path,
    slide: dict,
    concept: str,
    grid: np.ndarray,
    extent: tuple,
    background: np.ndarray | None,
    label: str,
) -> Path:
    """Write the PNG: thumbnail, the values on top (transparent where no tile was scored), title and colour bar."""
    from matplotlib.figure import Figure

    width, height = int(slide["width"]), int(slide["height"])
    scale = LONG_SIDE_PX / max(width, height)
    fig = Figure(figsize=(width * scale / DPI, height * scale / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    if background is not None:  # in grey, so the colour map alone carries the values
        grey = background.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0), interpolation="bilinear")
    else:
        ax.imshow(np.full((2, 2, 3), 255, np.uint8), extent=(0, width, height, 0))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        extent=extent,
        cmap="inferno",
        alpha=0.75,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.text(
        0.01,
        0.99,
        f"{slide['slide_id']}: {concept}",
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=11,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    if width >= height:
        cax = ax.inset_axes((0.55, 0.09, 0.42, 0.03))
        bar = fig.colorbar(image, cax=cax, orientation="horizontal")
    else:
        cax = ax.inset_axes((0.82, 0.3, 0.04, 0.4))
        bar = fig.colorbar(image, cax=cax, orientation="vertical")
    bar.solids.set_alpha(1.0)
    bar.set_label(label, fontsize=9, backgroundcolor=(1, 1, 1, 0.8))
    bar.ax.tick_params(labelsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_heatmap(
    result: SlideOutput,
    slide_id: str,
    concept: str,
    path: str | Path,
    storage_options: dict | None = None,
    reader: str | None = None,
    tile_logits: bool = False,
    background: np.ndarray | None = None,
) -> Path:
    """One slide, one concept -> PNG at `path`."""
    slide = result.slide(slide_id)
    k = result.concept_index(concept)
    tiles = result.tiles(slide)
    if tiles.num_rows == 0:
        why = f" (status {slide['status']}: {slide['error']})" if slide["status"] != "ok" else ""
        raise UserError(f"slide {slide_id!r} has no scored tiles{why}")
    use_maps = "concept_maps" in tiles.column_names and not tile_logits
    grid, extent = tile_grid_values(tiles, slide, k, use_maps)
    if background is None:
        background = thumbnail(slide, storage_options, reader)
    label = f"local concept score: {concept}" if use_maps else f"tile logit: {concept}"
    return draw(path, slide, concept, grid, extent, background, label)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "_"


def write_all(
    result: SlideOutput,
    folder: str | Path,
    storage_options: dict | None = None,
    reader: str | None = None,
    tile_logits: bool = False,
) -> list[Path]:
    """One PNG per slide with scored tiles and concept: FOLDER/<slide_id>.<concept>.png."""
    written = []
    for slide in result.slides.to_pylist():
        if not slide["n_tiles"] or slide["footprint_px"] is None:
            continue
        background = thumbnail(slide, storage_options, reader)
        for concept in result.concepts:
            path = Path(folder) / f"{_safe(slide['slide_id'])}.{_safe(concept)}.png"
            try:
                written.append(
                    write_heatmap(
                        result,
                        slide["slide_id"],
                        concept,
                        path,
                        storage_options,
                        reader,
                        tile_logits,
                        background=background if background is not None else np.full((2, 2, 3), 255, np.uint8),
                    )
                )
            except UserError as exc:  # a slide whose tiles all failed: say so, draw the others
                log.warning("%s", exc)
                break
    return written
