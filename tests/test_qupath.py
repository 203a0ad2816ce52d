"""`featurize heatmap --geojson`: QuPath detections, validated against a GeoJSON schema written from RFC 7946 and the
properties QuPath's GeoJSON reader takes (qupath-core's PathObjectTypeAdapters / GsonTools: `objectType`,
`classification` with both `name` and `color`, `measurements` as a map of numbers), on a slides OUTPUT written by
the driver's table builder over real slides. A real `featurize slides` run's GeoJSON is checked in test_dicom.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.compute as pc
import pytest
from slide_fixtures import draw_slide, write_slide
from test_heatmap import CONCEPTS, _fake_output

from pipeline import read_features
from pipeline.cli import main
from pipeline.heatmap import SlideOutput
from pipeline.qupath import feature_collection

POSITION = {"type": "array", "minItems": 2, "items": {"type": "number"}}
LINEAR_RING = {"type": "array", "minItems": 4, "items": POSITION}
GEOJSON_FEATURE_COLLECTION = {  # RFC 7946 sections 3.1.6 (Polygon), 3.2 (Feature), 3.3 (FeatureCollection)
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": ["string", "number"]},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {"type": "array", "items": LINEAR_RING},
                        },
                    },
                    "properties": {"type": ["object", "null"]},
                },
            },
        },
    },
}
QUPATH_PROPERTIES = {  # what QuPath reads from a Feature's properties
    "type": "object",
    "required": ["objectType", "classification", "measurements"],
    "properties": {
        "objectType": {"enum": ["annotation", "detection", "tile", "cell", "tmaCore"]},
        "classification": {
            "type": "object",
            "required": ["name", "color"],  # GsonTools' PathClassTypeAdapter reads a proxy only with both
            "properties": {
                "name": {"type": "string"},
                "color": {
                    "type": "array",
                    "minItems": 3,
                    "maxItems": 3,
                    "items": {"type": "integer", "minimum": 0, "maximum": 255},
                },
            },
        },
        "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def validate_for_qupath(collection: dict) -> None:
    """RFC 7946 structure, QuPath's properties, closed counter-clockwise rings (RFC 7946 section 3.1.6)."""
    jsonschema.validate(collection, GEOJSON_FEATURE_COLLECTION)
    for feature in collection["features"]:
        jsonschema.validate(feature["properties"], QUPATH_PROPERTIES)
        ring = np.asarray(feature["geometry"]["coordinates"][0], np.float64)
        assert (ring[0] == ring[-1]).all()
        shoelace = np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]) / 2
        assert shoelace > 0  # counter-clockwise


def squares(collection: dict) -> dict[tuple[int, int], dict]:
    """Each detection by its square's top-left corner (level-0 pixels), checking it is a square."""
    out = {}
    for feature in collection["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        (x0, y0), (x1, y1) = ring.min(axis=0), ring.max(axis=0)
        assert x1 - x0 == y1 - y0
        out[(int(x0), int(y0))] = feature
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("qupath")
    wide = write_slide(root / "wide.tif", draw_slide(1024, 512, shapes=[("rect", 128, 128, 768, 384)]), 0.25, levels=2)
    url = _fake_output(root, {"wide": (wide, 1024, 512)})
    (Path(url) / "_dataset.json").write_text(json.dumps({"identity": {"kind": "remote"}, "version": 1}))
    return url


def test_detections_validate_and_round_trip_to_the_tile_rows(output, tmp_path):
    path = tmp_path / "wide.geojson"
    assert main(["heatmap", output, "--slide", "wide", "--geojson", str(path)]) == 0
    collection = json.loads(path.read_text())
    validate_for_qupath(collection)
    tiles = read_features(output)
    tiles = tiles.filter(pc.equal(tiles.column("slide_id"), "wide"))
    by_corner = squares(collection)
    assert sorted(by_corner) == sorted(zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist()))
    footprint = SlideOutput(output).slide("wide")["footprint_px"]
    for (x, y), logits in zip(
        zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist()), tiles.column("concept_logits").to_pylist()
    ):
        feature = by_corner[(x, y)]
        ring = feature["geometry"]["coordinates"][0]
        assert ring[2] == [x + footprint, y + footprint]
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == CONCEPTS[int(np.argmax(logits))]
        for concept, logit in zip(CONCEPTS, logits):  # ConceptCLIP: sigmoid per concept
            assert props["measurements"][f"{concept} logit"] == pytest.approx(logit)
            assert props["measurements"][f"{concept} probability"] == pytest.approx(0.5 * (1 + np.tanh(logit / 2)))
    assert len({f["id"] for f in collection["features"]}) == len(collection["features"])
    again = feature_collection(SlideOutput(output), "wide", "remote")
    assert [f["id"] for f in again["features"]] == [f["id"] for f in collection["features"]]  # stable ids


def test_clip_probabilities_are_a_softmax_over_concepts(output, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(output, clip)
    (clip / "_dataset.json").write_text(json.dumps({"identity": {"kind": "clip"}, "version": 1}))
    collection = feature_collection(SlideOutput(str(clip)), "wide", "clip")
    for feature in collection["features"]:
        measurements = feature["properties"]["measurements"]
        assert sum(measurements[f"{c} probability"] for c in CONCEPTS) == pytest.approx(1.0)


def test_all_writes_one_file_per_slide_beside_the_pngs(output, tmp_path):
    assert main(["heatmap", output, "--all", "--out", str(tmp_path / "png"), "--geojson", str(tmp_path / "qp")]) == 0
    assert sorted(p.name for p in (tmp_path / "qp").iterdir()) == ["wide.geojson"]
    assert len(list((tmp_path / "png").glob("*.png"))) == len(CONCEPTS)
    validate_for_qupath(json.loads((tmp_path / "qp" / "wide.geojson").read_text()))
    assert main(["heatmap", output, "--slide", "wide"]) == 2  # neither --out nor --geojson
