"""`featurize export`: CLAM and TRIDENT bags from a slides OUTPUT written by the driver's own table builder (real
Parquet shards, no Ray), read back with h5py and torch; streaming across shards, incremental updates, removal.

The end-to-end export of a real `featurize slides` run (with a MIL training loop on the bags) is in test_dicom.py."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from slide_fixtures import grid_plan, with_plan

from pipeline import read_features
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.export import NORM_COLUMN, export
from pipeline.prompts import Concept, PromptSet
from pipeline.schema import SLIDE_SCHEMA, prompts_table
from pipeline.slides_job import tile_table_builder
from pipeline.write import OutputDir

DIM = 8
RUN_1, RUN_2 = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"


class FakeSlides:
    """A slides OUTPUT as the driver writes it: shards of `rows_per_shard` tiles numbered in plan order (a slide can
    span shards), `_slides.parquet` naming each slide's run, `_dataset.json`, `_prompts.parquet`. A tile's features
    are (slide number, x, y, run number, 0...), so where every row went can be checked."""

    def __init__(self, root, rows_per_shard: int = 7):
        self.out = OutputDir(str(root))
        self.rows_per_shard = rows_per_shard
        self.unit = 0
        self.slides: dict[str, dict] = {}
        self.out.write_table(
            prompts_table(PromptSet((Concept("tumor", ("tumor",)),)), np.eye(1, 4, dtype=np.float32), {}),
            "_prompts.parquet",
        )
        (root / "_dataset.json").write_text(json.dumps({"identity": {"kind": "remote"}, "version": 1}))

    def run(self, run_id: str, slides: dict[str, int], failed: tuple = ()):
        """One run scoring `slides` (id -> number of tiles, on a 4-wide grid of 128 px); `failed` slides end with
        no tiles (an error row)."""
        parts = []
        for slide_id, n in slides.items():
            number = int(slide_id[1:])
            plan = grid_plan(slide_id, f"/slides/{slide_id}.svs", 512, 128 * (n // 4 + 1), 128).slice(0, n)
            parts.append((slide_id, number, plan))
            ok = slide_id not in failed
            self.slides[slide_id] = {
                "slide_id": slide_id,
                "uri": f"/slides/{slide_id}.svs",
                "status": "ok" if ok else "error",
                "slide_mpp": 0.25,
                "level": 1,
                "read_px": 64,
                "footprint_px": 128,
                "step_px": 128,
                "tile_px": 64,
                "tile_mpp": 0.5,
                "width": 512,
                "height": 1024,
                "n_tiles": n if ok else 0,
                "n_tile_errors": 0,
                "run_id": run_id,
                "dataset_version": 1,
            }
        plan = pa.concat_tables([p for s, _, p in parts if s not in failed])
        numbers = np.concatenate([np.full(p.num_rows, k) for s, k, p in parts if s not in failed])
        n = plan.num_rows
        features = np.zeros((n, DIM), np.float32)
        features[:, 0] = numbers
        features[:, 1] = plan.column("x").to_numpy() / 128
        features[:, 2] = plan.column("y").to_numpy() / 128
        features[:, 3] = int(run_id[7])  # the run's day: 1 or 2
        cols = {
            "row": np.arange(n),
            "status": np.array(["ok"] * n, dtype=object),
            "error": np.array([None] * n, dtype=object),
            "image_features": features.astype(np.float16),
            "concept_logits": np.zeros((n, 1), np.float32),
        }
        table = tile_table_builder(64, run_id, 1, False)(with_plan(cols, plan))
        for start in range(0, n, self.rows_per_shard):  # a unit: consecutive plan rows, in any order in its shard
            shard = table.slice(start, self.rows_per_shard)
            shuffled = np.random.default_rng(self.unit).permutation(shard.num_rows)
            self.out.write_table(shard.take(pa.array(shuffled)), f"part-{self.unit:05d}.parquet")
            self.unit += 1
        rows = [{f.name: r.get(f.name) for f in SLIDE_SCHEMA} for r in self.slides.values()]
        self.out.write_table(pa.Table.from_pylist(rows, schema=SLIDE_SCHEMA), "_slides.parquet")
        return self


def bag(path):
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f["coords"].attrs), dict(f["features"].attrs)


def test_clam_bags_hold_each_slides_current_tiles_once(tmp_path):
    fake = FakeSlides(tmp_path / "out").run(RUN_1, {"s1": 9, "s2": 13, "s3": 5}).run(RUN_2, {"s2": 10})
    manifest = export(str(tmp_path / "out"), str(tmp_path / "bags"), "clam", echo=lambda _: None)
    assert sorted(manifest["slides"]) == ["s1", "s2", "s3"] and manifest["features"] == "normalized"
    current = read_features(str(tmp_path / "out"))
    for slide_id, number in (("s1", 1), ("s2", 2), ("s3", 3)):
        features, coords, coords_attrs, _ = bag(tmp_path / "bags" / "h5_files" / f"{slide_id}.h5")
        rows = current.filter(pc.equal(current.column("slide_id"), slide_id))
        assert features.dtype == np.float32 and coords.dtype == np.int32 and coords.shape == (rows.num_rows, 2)
        expected = np.stack([rows.column("x").to_numpy(), rows.column("y").to_numpy()], axis=1)
        order = np.lexsort((expected[:, 0], expected[:, 1]))
        np.testing.assert_array_equal(coords, expected[order])  # row-major, each tile once
        np.testing.assert_array_equal(features[:, 0], number)
        np.testing.assert_array_equal(features[:, 1:3], coords / 128)  # each row's own features
        assert set(features[:, 3]) == {2.0 if slide_id == "s2" else 1.0}  # s2 from its second run only
        assert (coords_attrs["patch_size"], coords_attrs["patch_level"], coords_attrs["name"]) == (64, 1, slide_id)
        np.testing.assert_array_equal(coords_attrs["downsample"], [2.0, 2.0])
        tensor = torch.load(tmp_path / "bags" / "pt_files" / f"{slide_id}.pt")
        assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), features)
        assert manifest["slides"][slide_id]["tiles"] == rows.num_rows == fake.slides[slide_id]["n_tiles"]
    assert not [p for p in (tmp_path / "bags").rglob("*") if p.name.startswith(".tmp")]


def test_trident_bags_carry_tridents_attributes(tmp_path):
    FakeSlides(tmp_path / "out").run(RUN_1, {"s1": 9})
    export(str(tmp_path / "out"), str(tmp_path / "bags"), "trident", echo=lambda _: None)
    features, coords, coords_attrs, feature_attrs = bag(tmp_path / "bags" / "s1.h5")
    assert features.shape == (9, DIM) and features.dtype == np.float32 and coords.dtype == np.int64
    assert {k: coords_attrs[k] for k in ("patch_size", "patch_size_level0", "overlap", "name")} == {
        "patch_size": 64,
        "patch_size_level0": 128,
        "overlap": 0,
        "name": "s1",
    }
    assert (coords_attrs["level0_magnification"], coords_attrs["target_magnification"]) == (40.0, 20.0)
    # TRIDENT's own reading: patch_size * level0 / target magnification is the tile's level-0 size
    assert (
        coords_attrs["patch_size"] * coords_attrs["level0_magnification"] / coords_attrs["target_magnification"] == 128
    )
    assert feature_attrs["name"] == "s1" and "savetodir" in coords_attrs


def test_export_is_brought_up_to_date_incrementally(tmp_path):
    fake = FakeSlides(tmp_path / "out").run(RUN_1, {"s1": 9, "s2": 13, "s3": 5})
    bags = tmp_path / "bags"
    export(str(tmp_path / "out"), str(bags), "clam", echo=lambda _: None)
    stamp = {p: p.stat().st_mtime_ns for p in bags.rglob("*.h5")}
    os.utime(bags / "h5_files" / "s1.h5", ns=(1, 1))  # a file export would not touch again keeps this time
    fake.run(RUN_2, {"s2": 11, "s3": 5}, failed=("s3",))  # s2 rescored; s3 now fails: no tiles, no bag
    lines = []
    manifest = export(str(tmp_path / "out"), str(bags), "clam", echo=lines.append)
    assert sorted(manifest["slides"]) == ["s1", "s2"] and manifest["slides"]["s2"]["run_id"] == RUN_2
    assert (bags / "h5_files" / "s1.h5").stat().st_mtime_ns == 1  # unchanged: not rewritten
    assert (bags / "h5_files" / "s2.h5").stat().st_mtime_ns != stamp[bags / "h5_files" / "s2.h5"]
    assert not (bags / "h5_files" / "s3.h5").exists() and not (bags / "pt_files" / "s3.pt").exists()
    assert bag(bags / "h5_files" / "s2.h5")[0].shape == (11, DIM)
    assert "exported 1 slide(s) (1 unchanged, 1 removed)" in lines[-1]
    assert json.loads((bags / "_export.json").read_text()) == manifest


def test_projected_features_need_the_norm_column(tmp_path, capsys):
    FakeSlides(tmp_path / "out").run(RUN_1, {"s1": 9})
    assert (
        main(
            [
                "export",
                str(tmp_path / "out"),
                "--format",
                "clam",
                "--out",
                str(tmp_path / "b"),
                "--features",
                "projected",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no embedding_norm column" in err[0] and "rerun `featurize slides`" in err[0]
    # Default without the column: normalized, with a note.
    assert main(["export", str(tmp_path / "out"), "--format", "clam", "--out", str(tmp_path / "b")]) == 0
    assert "exporting the L2-normalised features" in capsys.readouterr().err
    # With the column (written by hand here: the arithmetic alone; tests/test_dicom.py exports a real run's).
    shard = tmp_path / "out" / "part-00000.parquet"
    table = pq.read_table(shard)
    norms = np.linspace(2.0, 3.0, table.num_rows).astype(np.float32)
    pq.write_table(table.append_column(NORM_COLUMN, pa.array(norms)), shard)
    for p in (tmp_path / "out").glob("part-*.parquet"):
        if p != shard:
            p.unlink()
    manifest = export(str(tmp_path / "out"), str(tmp_path / "p"), "trident", echo=lambda _: None)
    assert manifest["features"] == "projected"
    features, coords, _, _ = bag(tmp_path / "p" / "s1.h5")
    rows = {
        (x, y): (np.array(f, np.float32), n)
        for x, y, f, n in zip(
            table.column("x").to_pylist(),
            table.column("y").to_pylist(),
            table.column("image_features").to_pylist(),
            norms,
        )
    }
    for (x, y), got in zip(coords.tolist(), features):
        normalized, norm = rows[(x, y)]
        np.testing.assert_allclose(got, normalized * norm, rtol=1e-6)


def test_export_refuses_another_layout_in_the_same_folder(tmp_path):
    FakeSlides(tmp_path / "out").run(RUN_1, {"s1": 9})
    export(str(tmp_path / "out"), str(tmp_path / "bags"), "clam", echo=lambda _: None)
    with pytest.raises(UserError, match="holds a clam export"):
        export(str(tmp_path / "out"), str(tmp_path / "bags"), "trident", echo=lambda _: None)
