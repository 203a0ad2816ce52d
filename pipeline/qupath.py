"""QuPath annotations: a slide's scored tiles as a GeoJSON FeatureCollection that QuPath imports as detections
(File > Import objects from file, or drag and drop), written by `featurize heatmap --geojson`.

One Feature per ok tile of the slide's current run:
- `geometry`: the tile's square as a Polygon in level-0 pixel coordinates (origin top-left, as QuPath's image
  coordinates), corners (x, y), (x + footprint, y), (x + footprint, y + footprint), (x, y + footprint), closed;
- `id`: a UUID derived from the slide and the tile's corner (the same tile gets the same id in every export);
- `properties.objectType`: "detection"; `properties.classification`: the top concept by logit, {"name", "color"} (QuPath
  needs both); `properties.measurements`: a map with "<concept> logit" and "<concept> probability" for each concept
  (probabilities as `featurize labels` computes them: sigmoid per concept for SigLIP and ConceptCLIP, softmax over
  the concepts for CLIP); `properties.metadata`: the slide id and the tile's corner and size.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np

from .errors import UserError
from .heatmap import SlideOutput, _safe
from .labels import probabilities
from .rescore import logits_matrix
from .storage import write_bytes_atomic

# Class colours (RGB), one per concept in order, repeating: matplotlib's tab10.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
log = logging.getLogger(__name__)

ID_NAMESPACE = uuid.UUID("8f0c6f5e-6a55-4d9a-9d43-5e2b1f6c0a11")  # fixed: tile ids are the same in every export


def model_kind(result: SlideOutput) -> str:
    """The model family the OUTPUT was made with (its probabilities' recipe), from _dataset.json."""
    dataset = result.out.read_json("_dataset.json") or {}
    kind = (dataset.get("identity") or {}).get("kind")
    if not kind:
        raise UserError(f"{result.out.url}/_dataset.json names no model kind; cannot turn logits into probabilities")
    return str(kind)


def tile_square(x: int, y: int, footprint: int) -> list[list[list[int]]]:
    """A closed ring, counter-clockwise in (x, y) as RFC 7946 asks of exterior rings."""
    x1, y1 = x + footprint, y + footprint
    return [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]


def feature_collection(result: SlideOutput, slide_id: str, kind: str) -> dict:
    """The slide's ok tiles as a GeoJSON FeatureCollection of QuPath detections (see the module docstring)."""
    slide = result.slide(slide_id)
    tiles = result.tiles(slide)
    if tiles.num_rows == 0:
        why = f" (status {slide['status']}: {slide['error']})" if slide["status"] != "ok" else ""
        raise UserError(f"slide {slide_id!r} has no scored tiles{why}")
    concepts = result.concepts
    if not concepts:
        raise UserError(f"{result.out.url} has no concepts (it was made without --prompts): nothing to classify")
    logits = logits_matrix(tiles.column("concept_logits"))
    if logits.shape[1] != len(concepts):
        raise UserError(f"slide {slide_id!r}'s tiles have {logits.shape[1]} logits but {len(concepts)} concepts")
    probs = probabilities(logits, kind)
    top = np.argmax(logits, axis=1)
    footprint = int(slide["footprint_px"])
    features = []
    for i, (x, y) in enumerate(zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist())):
        measurements = {}
        for k, concept in enumerate(concepts):
            measurements[f"{concept} logit"] = float(logits[i, k])
            measurements[f"{concept} probability"] = float(probs[i, k])
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(ID_NAMESPACE, f"{slide['uri']}\x1f{x}\x1f{y}")),
                "geometry": {"type": "Polygon", "coordinates": tile_square(int(x), int(y), footprint)},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": concepts[top[i]], "color": list(PALETTE[top[i] % len(PALETTE)])},
                    "measurements": measurements,
                    "metadata": {"slide_id": str(slide_id), "x": str(x), "y": str(y), "size": str(footprint)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    result: SlideOutput, slide_id: str, path: str | Path, storage_options: dict | None = None, kind: str | None = None
) -> str:
    """One slide's detections -> a .geojson file (local path or fsspec URL), written whole or not at all."""
    collection = feature_collection(result, slide_id, kind or model_kind(result))
    write_bytes_atomic(str(path), json.dumps(collection, allow_nan=False).encode("utf-8"), storage_options)
    return str(path)


def write_all_geojson(result: SlideOutput, folder: str | Path, storage_options: dict | None = None) -> list[str]:
    """One file per slide with scored tiles: FOLDER/<slide_id>.geojson."""
    kind = model_kind(result)
    written = []
    for slide in result.slides.to_pylist():
        if not slide["n_tiles"] or slide["footprint_px"] is None:
            continue
        path = f"{str(folder).rstrip('/')}/{_safe(slide['slide_id'])}.geojson"
        try:
            written.append(write_geojson(result, slide["slide_id"], path, storage_options, kind))
        except UserError as exc:  # a slide whose tiles all failed: skipped, as for the PNGs
            log.warning("%s", exc)
    return written
