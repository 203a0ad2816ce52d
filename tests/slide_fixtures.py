"""Synthetic whole-slide images written with tifffile: tissue drawn at known places on a blank background.

Level 0 is tiled (JPEG or zlib); each reduced level is its own top-level page (subfiletype=1 for generic pyramidal
TIFF, as openslide expects; Aperio's layout for the .svs variant: baseline, stripped thumbnail, tiled levels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BACKGROUND = 243
TISSUE_COLOURS = ((196, 96, 164), (150, 70, 180), (220, 140, 170))


@dataclass
class SyntheticSlide:
    """Level-0 RGB pixels and the true tissue mask (level-0 resolution) they were drawn from."""

    rgb: np.ndarray
    truth: np.ndarray
    shapes: list = field(default_factory=list)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def draw_slide(width: int = 2048, height: int = 1536, shapes=None, seed: int = 0) -> SyntheticSlide:
    """Blank glass with slight noise, and tissue (textured, saturated) in rectangles ("rect", x0, y0, x1, y1) and
    ellipses ("ellipse", cx, cy, rx, ry), level-0 pixel coordinates."""
    if shapes is None:
        shapes = [("rect", 256, 256, 896, 768), ("ellipse", 1500, 1000, 320, 256)]
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), BACKGROUND, dtype=np.int16)
    rgb += rng.integers(-4, 5, size=rgb.shape, dtype=np.int16)
    truth = np.zeros((height, width), dtype=bool)
    yy, xx = np.ogrid[:height, :width]
    for i, shape in enumerate(shapes):
        kind, a, b, c, d = shape
        if kind == "rect":
            region = (xx >= a) & (xx < c) & (yy >= b) & (yy < d)
        else:
            region = ((xx - a) / c) ** 2 + ((yy - b) / d) ** 2 <= 1
        region = np.broadcast_to(region, truth.shape)
        colour = np.array(TISSUE_COLOURS[i % len(TISSUE_COLOURS)], dtype=np.int16)
        texture = rng.integers(-25, 26, size=(height, width, 1), dtype=np.int16)
        rgb[region] = (colour + texture)[region]
        truth |= region
    return SyntheticSlide(np.clip(rgb, 0, 255).astype(np.uint8), truth, list(shapes))


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level 0 and `levels` 2x box-filtered reductions."""
    out = [rgb]
    for _ in range(levels):
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        out.append(np.rint(a).astype(np.uint8))
    return out


def write_slide(
    path,
    slide: SyntheticSlide | np.ndarray,
    slide_mpp: float | None = 0.25,
    *,
    compression: str = "jpeg",
    aperio: bool = False,
    resolution_tags: bool = True,
    levels: int = 3,
    tile: int = 256,
) -> Path:
    """Write a pyramidal slide of `slide_mpp` level-0 microns per pixel. `aperio`: an Aperio-style description
    carries it as `MPP` (and no resolution tags); otherwise resolution tags in CENTIMETER carry it (unless
    `resolution_tags` is False or slide_mpp is None)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = slide.rgb if isinstance(slide, SyntheticSlide) else slide
    pages = pyramid(rgb, levels)
    h, w = rgb.shape[:2]
    common = dict(photometric="rgb", compression=compression, metadata=None)

    def tiles_for(a):
        side = tile
        while side > 16 and min(a.shape[:2]) < side:
            side //= 2
        return (side, side)

    with tifffile.TiffWriter(path) as tw:
        if aperio:
            head = f"Aperio Image Library v12.0.15\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90"
            description = head + "|AppMag = 20" + (f"|MPP = {slide_mpp}" if slide_mpp is not None else "")
            tw.write(pages[0], tile=(tile, tile), description=description, **common)
            tw.write(pages[-1], description=head, **common)  # Aperio's page 1: a stripped thumbnail
            for a in pages[1:]:
                tw.write(a, tile=tiles_for(a), description=head, **common)
            return path
        for i, a in enumerate(pages):
            extra = {}
            if resolution_tags and slide_mpp is not None:
                res = 1e4 / (slide_mpp * 2**i)
                extra = dict(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(a, tile=tiles_for(a), subfiletype=0 if i == 0 else 1, **extra, **common)
    return path


def truncate(src, dst, fraction: float = 0.6) -> Path:
    """A copy of `src` cut off after `fraction` of its bytes (a failed upload or copy)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def true_fraction(truth: np.ndarray, x: int, y: int, footprint: int) -> float:
    """The tissue fraction of the level-0 square at (x, y) according to the drawing."""
    return float(truth[y : y + footprint, x : x + footprint].mean())


def grid_plan(slide_id: str, uri: str, width: int, height: int, footprint_px: int = 128, every: int = 1):
    """A slide's tile plan (the columns tile_table_builder reads) on a plain grid of footprint_px level-0 pixels,
    every `every`-th tile, read from level 1 at 0.5 um/px, all tissue: for shard tests that need no planning."""
    import pyarrow as pa

    xs, ys = np.meshgrid(
        np.arange(0, width - footprint_px + 1, footprint_px), np.arange(0, height - footprint_px + 1, footprint_px)
    )
    xs, ys = xs.reshape(-1)[::every], ys.reshape(-1)[::every]
    n = len(xs)
    return pa.table(
        {
            "slide_id": [slide_id] * n,
            "uri": [uri] * n,
            "x": pa.array(xs, pa.int64()),
            "y": pa.array(ys, pa.int64()),
            "level": pa.array(np.ones(n), pa.int32()),
            "tile_mpp": pa.array(np.full(n, 0.5)),
            "tissue_fraction": pa.array(np.ones(n), pa.float32()),
            "size": pa.array([1] * n, pa.int64()),
            "mtime": pa.array([0.0] * n),
            "etag": pa.array([None] * n, pa.string()),
        }
    )


def with_plan(cols: dict, plan) -> dict:
    """Result columns plus the plan's columns, as they reach tile_table_builder through the stages (by `row`)."""
    rows = np.asarray(cols["row"])
    return {
        **{name: np.asarray(plan.column(name).to_numpy(zero_copy_only=False))[rows] for name in plan.column_names},
        **cols,
    }


def with_old_column_names(src, dst) -> Path:
    """A copy of a slides OUTPUT as it was written before the columns were renamed: `mpp` in the tile shards (today's
    tile_mpp) and in _slides.parquet (today's slide_mpp), in the same place."""
    import shutil

    import pyarrow.parquet as pq

    dst = Path(dst)
    shutil.copytree(src, dst)
    for path, new in [*((p, "tile_mpp") for p in dst.glob("part-*.parquet")), (dst / "_slides.parquet", "slide_mpp")]:
        table = pq.read_table(path)
        pq.write_table(table.rename_columns(["mpp" if name == new else name for name in table.column_names]), path)
    return dst
