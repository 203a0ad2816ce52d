"""DICOM whole-slide images, written by wsidicom (a real DICOM writer) from tifffile pyramids: series grouping, the
checks that make a broken series one error row, reading through the same code path a run uses (openslide locally,
wsidicom through fsspec), then `featurize slides` over a folder mixing SVS, generic TIFF and DICOM series."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydicom
import pytest
from dicom_fixtures import level0, write_dicom
from fsspec.implementations.local import LocalFileSystem
from slide_fixtures import draw_slide, true_fraction, write_slide
from test_slides import model_args as slides_model_args

from pipeline import read_features
from pipeline.cli import main
from pipeline.decode import PreprocessSpec
from pipeline.dicom import Header, group_listing, read_header, series_problem
from pipeline.slides import SLIDE_SUFFIXES, Tiling, open_slide, plan_slide, read_tiles, slide_ids
from pipeline.sources import list_inputs

TILING = Tiling(target_mpp=0.5, tile_px=64, overlap_px=0, min_tissue=0.25)
SPEC = PreprocessSpec("squash", 64, 64)


@pytest.fixture(scope="module")
def drawn():
    return draw_slide(1024, 768, shapes=[("rect", 128, 128, 512, 512), ("ellipse", 760, 500, 160, 140)], seed=5)


@pytest.fixture(scope="module")
def series(tmp_path_factory, drawn):
    """Two series in one folder (JPEG at 0.25 um/px; uncompressed at 0.25 um/px), and the same drawing as a
    zlib TIFF for comparison."""
    root = tmp_path_factory.mktemp("dicom")
    jpeg = write_dicom(root / "case", drawn, 0.25)
    raw = write_dicom(root / "case", drawn, 0.25, compression="raw", levels=1, label=False)
    tiff = write_slide(root / "same.tif", drawn, 0.25, compression="zlib", levels=2)
    return {"root": root, "jpeg": jpeg, "raw": raw, "tiff": tiff}


# -- the writer and the listing -------------------------------------------------------------------------------------
def test_the_writer_writes_one_series_of_instances_per_slide(series):
    jpeg = [pydicom.dcmread(p, stop_before_pixels=True) for p in series["jpeg"]]
    assert [d.ImageType[2] for d in jpeg] == ["VOLUME", "VOLUME", "VOLUME", "LABEL"]
    assert len({d.SeriesInstanceUID for d in jpeg}) == 1 and {d.SOPClassUID for d in jpeg} == {
        "1.2.840.10008.5.1.4.1.1.77.1.6"
    }
    assert [int(d.TotalPixelMatrixColumns) for d in jpeg[:3]] == [1024, 512, 256]
    assert sum(p.stat().st_size for p in series["jpeg"]) < 400_000  # small fixtures


def test_listing_groups_instances_into_one_row_per_series(series, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(series["root"], root)
    (root / "case" / "notes.dcm").write_bytes(b"not a DICOM file")
    listing = group_listing(list_inputs(str(root), None, SLIDE_SUFFIXES)).sort_by("uri")
    rows = {r["uri"]: r for r in listing.to_pylist()}
    jpeg, raw = (level0([root / "case" / p.name for p in series[k]]) for k in ("jpeg", "raw"))
    assert sorted(rows) == sorted([str(jpeg), str(raw), str(root / "case" / "notes.dcm"), str(root / "same.tif")])
    instances = [root / "case" / p.name for p in series["jpeg"]]
    assert rows[str(jpeg)]["size"] == sum(p.stat().st_size for p in instances)
    assert rows[str(jpeg)]["mtime"] == max(p.stat().st_mtime for p in instances)
    assert rows[str(jpeg)]["etag"] is None
    # A slide's uri is its level-0 instance, whatever the files are called; a lone series' id is its folder's name.
    assert pydicom.dcmread(jpeg, stop_before_pixels=True).ImageType[2] == "VOLUME"
    ids = dict(zip(listing.column("uri").to_pylist(), slide_ids(listing.column("uri").to_pylist())))
    assert len(set(ids.values())) == 4 and ids[str(root / "same.tif")] == "same"
    assert slide_ids(["/data/case7/1.2.3.dcm", "/data/b.svs"]) == ["case7", "b"]


def test_a_changed_instance_changes_the_slide_row(series, tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    for p in series["jpeg"]:
        shutil.copy(p, root / p.name)
    before = group_listing(list_inputs(str(root), None, SLIDE_SUFFIXES)).to_pylist()
    label = root / series["jpeg"][-1].name
    os.utime(label, (time.time() + 60, time.time() + 60))
    after = group_listing(list_inputs(str(root), None, SLIDE_SUFFIXES)).to_pylist()
    assert [r["uri"] for r in before] == [r["uri"] for r in after]  # the same slide ...
    assert after[0]["mtime"] > before[0]["mtime"]  # ... changed


# -- reading a DICOM slide ------------------------------------------------------------------------------------------
def test_a_dicom_slide_is_planned_like_the_same_tiff(series, drawn):
    row, tiles = plan_slide(str(level0(series["jpeg"])), TILING)
    tif_row, tif_tiles = plan_slide(str(series["tiff"]), TILING, reader="openslide")
    assert (row["status"], row["reader"], row["slide_mpp"], row["mpp_source"]) == (
        "ok",
        "openslide",
        0.25,
        "dicom.PixelSpacing",
    )
    assert (row["width"], row["height"], row["level_count"], row["level"]) == (1024, 768, 3, 1)
    assert row["n_tiles"] >= 10
    np.testing.assert_array_equal(tiles["x"], tif_tiles["x"])
    np.testing.assert_array_equal(tiles["y"], tif_tiles["y"])
    fractions = [true_fraction(drawn.truth, x, y, row["footprint_px"]) for x, y in zip(tiles["x"], tiles["y"])]
    assert min(fractions) >= 0.15  # on the drawn tissue


def test_dicom_tiles_have_the_pixels_of_the_pyramid(series):
    """Uncompressed DICOM against the zlib TIFF it was converted from: the same tile pixels, exactly."""
    uri = str(level0(series["raw"]))
    row, tiles = plan_slide(uri, TILING)
    batch = {
        "uri": np.array([uri] * 4, dtype=object),
        "reader": np.array([row["reader"]] * 4, dtype=object),
        "x": tiles["x"][:4],
        "y": tiles["y"][:4],
        "level": np.full(4, row["level"]),
        "read_px": np.full(4, row["read_px"]),
    }
    dicom = read_tiles(batch, SPEC, 64)
    tiff = read_tiles({**batch, "uri": np.array([str(series["tiff"])] * 4, dtype=object)}, SPEC, 64)
    assert list(dicom["status"]) == ["ok"] * 4
    np.testing.assert_array_equal(dicom["pixels"], tiff["pixels"])
    with open_slide(uri) as slide:
        region = slide.read_region((1000, 700), 0, (64, 64))  # partly outside: transparent there, as openslide
    alpha = np.asarray(region)[..., 3]
    assert alpha[:68, :24].min() == 255 and alpha[:, 24:].max() == 0


def test_broken_series_are_one_error_row_each_with_the_reason(series, tmp_path):
    def copy(name, paths):
        folder = tmp_path / name
        folder.mkdir()
        return [Path(shutil.copy(p, folder / p.name)) for p in paths]

    jpeg = series["jpeg"]
    copy("labels", [jpeg[-1]])
    truncated = copy("truncated", jpeg)
    data = truncated[0].read_bytes()
    truncated[0].write_bytes(data[: int(len(data) * 0.7)])
    twice = copy("twice", jpeg)
    shutil.copy(twice[1], twice[1].with_name("copy-of-level-1.dcm"))
    mismatched = copy("mismatched", jpeg)
    ds = pydicom.dcmread(mismatched[1])  # level 1 claims a pixel spacing that images a different area
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.0008, 0.0008]
    ds.save_as(mismatched[1])
    ct = tmp_path / "ct" / "slice.dcm"
    ct.parent.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), ct)

    listing = group_listing(list_inputs(str(tmp_path), None, SLIDE_SUFFIXES))
    assert listing.num_rows == 5  # one row per series, broken or not
    reasons = {}
    for uri in listing.column("uri").to_pylist():
        row, tiles = plan_slide(uri, TILING)
        assert row["status"] == "error" and len(tiles["x"]) == 0
        reasons[Path(uri).parent.name] = row["error"]
    assert "no pyramid level (VOLUME instance)" in reasons["labels"]
    assert "is truncated" in reasons["truncated"] and truncated[0].name in reasons["truncated"]
    assert "stored twice" in reasons["twice"]
    assert "inconsistent" in reasons["mismatched"] and mismatched[1].name in reasons["mismatched"]
    assert "not a whole-slide image" in reasons["ct"]
    assert all("\n" not in reason for reason in reasons.values())
    assert all(reason.startswith("DICOM series ") for reason in reasons.values())


def test_series_problem_accepts_a_whole_series(series):
    headers = [read_header(str(p), check_pixels=True) for p in series["jpeg"]]
    assert series_problem(headers) is None
    assert (
        series_problem([Header("x.dcm", error="not a readable DICOM file (bad)")]) == "not a readable DICOM file (bad)"
    )


# -- remote DICOM (wsidicom through fsspec) --------------------------------------------------------------------------
class CountingFileSystem(LocalFileSystem):
    """A local folder seen as a remote store (`counting://`), counting the bytes read: ranged reads or whole files."""

    protocol = "counting"
    root_marker = ""
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("counting://", "", 1))

    def _open(self, path, mode="rb", **kwargs):
        return CountingFile(super()._open(path, mode))


class CountingFile:
    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        data = self.f.read(n)
        CountingFileSystem.bytes_read += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_remote_dicom_reads_ranges_and_gives_the_local_tiles(series, drawn, tmp_path):
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    big = write_dicom(tmp_path / "big", draw_slide(2048, 1536, seed=5), 0.25, compression="raw", levels=2)
    uri = str(level0(big))
    remote = "counting://" + uri
    listing = group_listing(list_inputs(f"counting://{tmp_path / 'big'}", None, SLIDE_SUFFIXES))
    assert listing.column("uri").to_pylist() == [remote]
    local_row, local_tiles = plan_slide(uri, TILING)
    row, tiles = plan_slide(remote, TILING)
    assert (row["status"], row["reader"], row["slide_mpp"], row["mpp_source"]) == (
        "ok",
        "wsidicom",
        0.25,
        "dicom.PixelSpacing",
    )
    for key in ("width", "height", "level_count", "level", "read_px", "footprint_px", "n_tiles"):
        assert row[key] == local_row[key], key
    np.testing.assert_array_equal(tiles["x"], local_tiles["x"])
    batch = {
        "uri": np.array([remote] * 3, dtype=object),
        "reader": np.array(["wsidicom"] * 3, dtype=object),
        "x": tiles["x"][:3],
        "y": tiles["y"][:3],
        "level": np.full(3, row["level"]),
        "read_px": np.full(3, row["read_px"]),
    }
    CountingFileSystem.bytes_read = 0
    pixels = read_tiles(batch, SPEC, 64)
    assert list(pixels["status"]) == ["ok"] * 3, pixels["error"]
    local = read_tiles(
        {**batch, "uri": np.array([uri] * 3, dtype=object), "reader": np.array(["openslide"] * 3, dtype=object)},
        SPEC,
        64,
    )
    np.testing.assert_array_equal(pixels["pixels"], local["pixels"])
    # Three tiles of level 1 (a 2.4 MB instance of 256 px frames, 196 KB each): their frames, not whole files.
    level1 = sorted(p.stat().st_size for p in big)[-2]
    assert CountingFileSystem.bytes_read < min(1_000_000, level1 / 2)


def test_remote_dicom_with_openslide_is_a_one_line_error(series):
    row, _ = plan_slide("s3://bucket/case/x.dcm", TILING, reader="openslide")
    assert row["status"] == "error" and "openslide reads local files only" in row["error"]
    assert "copy the series folder" in row["error"]


def test_dicom_on_object_storage_is_listed_planned_and_read(series, s3_server, s3_bucket):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    for path in series["raw"]:
        fs.put(str(path), f"{s3_bucket}/slides/case/{path.name}")
    listing = group_listing(list_inputs(f"s3://{s3_bucket}/slides", options, SLIDE_SUFFIXES), options)
    uri = f"s3://{s3_bucket}/slides/case/{level0(series['raw']).name}"
    assert listing.column("uri").to_pylist() == [uri]
    assert listing.column("size").to_pylist() == [sum(p.stat().st_size for p in series["raw"])]
    assert listing.column("etag").to_pylist()[0] is not None  # the store's etags, hashed together
    row, tiles = plan_slide(uri, TILING, storage_options=options)
    local_row, local_tiles = plan_slide(str(level0(series["raw"])), TILING)
    assert (row["status"], row["reader"], row["n_tiles"]) == ("ok", "wsidicom", local_row["n_tiles"])
    np.testing.assert_array_equal(tiles["y"], local_tiles["y"])
    with open_slide(uri, storage_options=options) as remote, open_slide(str(level0(series["raw"]))) as local:
        np.testing.assert_array_equal(remote.read(256, 128, 1, 100, 80), local.read(256, 128, 1, 100, 80))


# -- `featurize slides` over a folder mixing SVS, generic TIFF and DICOM series ---------------------------------------
def model_args(conceptclip_model, prompts_file):
    return slides_model_args(conceptclip_model, prompts_file, "--rows-per-shard", 40)


def featurize(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """in/a.svs (Aperio, 0.5 um/px), in/b.tif (0.25), in/caseA (one DICOM series, JPEG), in/caseB (two series:
    JPEG at 0.5 um/px, uncompressed at 0.25), in/broken (a series left with its label only)."""
    root = tmp_path_factory.mktemp("mixed") / "in"
    drawings = {name: draw_slide(1024, 768, seed=seed) for seed, name in enumerate(["a", "b", "A", "B1", "B2"], 20)}
    write_slide(root / "a.svs", drawings["a"], 0.5, aperio=True, levels=2)
    write_slide(root / "b.tif", drawings["b"], 0.25, levels=2)
    case_a = write_dicom(root / "caseA", drawings["A"], 0.25)
    b1 = write_dicom(root / "caseB", drawings["B1"], 0.5)
    b2 = write_dicom(root / "caseB", drawings["B2"], 0.25, compression="raw", levels=1, label=False)
    broken = write_dicom(root / "broken", drawings["A"], 0.25)
    for path in broken[:-1]:  # the pyramid levels; the label stays
        path.unlink()
    return root, drawings, {"caseA": case_a, "B1": b1, "B2": b2}


@pytest.fixture(scope="module")
def mixed_run(ray_session, conceptclip_model, prompts_file, mixed, tmp_path_factory):
    root, _, _ = mixed
    output = tmp_path_factory.mktemp("mixed-out") / "out"
    args = ["slides", root, output, *model_args(conceptclip_model, prompts_file)]
    assert featurize(*args) == 0
    return output, args


def test_a_mixed_folder_lists_every_slide_once_and_scores_each(mixed, mixed_run):
    root, drawings, written = mixed
    output, _ = mixed_run
    slides = {r["slide_id"]: r for r in pq.read_table(output / "_slides.parquet").to_pylist()}
    b1, b2 = (f"caseB/{level0(written[k]).stem}" for k in ("B1", "B2"))
    assert sorted(slides) == sorted(["a", "b", "caseA", b1, b2, "broken"])
    assert {k: v["status"] for k, v in slides.items()} == {
        **dict.fromkeys(["a", "b", "caseA", b1, b2], "ok"),
        "broken": "error",
    }
    assert "no pyramid level" in slides["broken"]["error"]
    assert slides["caseA"]["uri"] == str(level0(written["caseA"]))
    for slide_id, mpp in (("caseA", 0.25), (b1, 0.5), (b2, 0.25)):
        row = slides[slide_id]
        assert (row["reader"], row["slide_mpp"], row["mpp_source"]) == ("openslide", mpp, "dicom.PixelSpacing")
    tiles = read_features(str(output))
    keys = list(zip(*(tiles.column(c).to_pylist() for c in ("slide_id", "x", "y", "level"))))
    assert len(keys) == len(set(keys))  # exactly once
    for slide_id, drawing in (("caseA", "A"), (b1, "B1"), (b2, "B2"), ("a", "a"), ("b", "b")):
        rows = tiles.filter(pc.equal(tiles.column("slide_id"), slide_id))
        assert rows.num_rows == slides[slide_id]["n_tiles"] > 0
        assert set(rows.column("status").to_pylist()) == {"ok"}
        fp = slides[slide_id]["footprint_px"]
        truth = drawings[drawing].truth
        assert (
            min(
                true_fraction(truth, x, y, fp)
                for x, y in zip(rows.column("x").to_pylist(), rows.column("y").to_pylist())
            )
            >= 0.15
        )
    record = json.loads((output / "_run.json").read_text())
    assert record["counts"]["listed"] == 6 and record["counts"]["slides_ok"] == 5


def test_a_rerun_skips_the_dicom_slides_and_a_changed_instance_is_rescored(
    mixed, mixed_run, conceptclip_model, prompts_file, capsys
):
    root, _, written = mixed
    output, _ = mixed_run
    args = ["slides", root, output, "--dry-run", *model_args(conceptclip_model, prompts_file)]
    capsys.readouterr()
    assert featurize(*args) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["listed"], counts["unchanged"], counts["new"]) == (6, 5, 1)  # only the broken series again
    label = written["caseA"][-1]  # a series' label instance changes: the slide changed
    later = label.stat().st_mtime + 10
    os.utime(label, (later, later))
    assert featurize(*args, "--incremental") == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["unchanged"], counts["new"]) == (4, 2)


def test_heatmaps_and_qupath_detections_of_dicom_slides(mixed, mixed_run, tmp_path):
    from test_qupath import squares, validate_for_qupath

    from pipeline.heatmap import SlideOutput, thumbnail

    output, _ = mixed_run
    result = SlideOutput(str(output))
    background = thumbnail(result.slide("caseA"), None)
    assert background is not None and background.shape[:2] == (768, 1024)  # read from the DICOM series itself
    assert (
        main(["heatmap", str(output), "--all", "--out", str(tmp_path / "png"), "--geojson", str(tmp_path / "qp")]) == 0
    )
    assert len(list((tmp_path / "png").glob("caseA.*.png"))) == len(result.concepts)
    collection = json.loads((tmp_path / "qp" / "caseA.geojson").read_text())
    validate_for_qupath(collection)
    tiles = read_features(str(output))
    tiles = tiles.filter(pc.equal(tiles.column("slide_id"), "caseA"))
    assert sorted(squares(collection)) == sorted(zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist()))


def test_exported_bags_train_an_attention_mil_model(mixed_run, tmp_path):
    """CLAM's layout as its loaders read it: pt_files/<slide_id>.pt is a [N, D] float tensor; h5_files/<slide_id>.h5
    holds `features` [N, D] and `coords` [N, 2]. A gated-attention MIL model (Ilse et al. 2018) trains on them."""
    import h5py
    import torch

    output, _ = mixed_run
    assert main(["export", str(output), "--format", "clam", "--out", str(tmp_path / "bags")]) == 0
    manifest = json.loads((tmp_path / "bags" / "_export.json").read_text())
    tiles = read_features(str(output))
    assert sorted(manifest["slides"]) == sorted(set(tiles.column("slide_id").to_pylist()))
    bags, labels = [], []
    for slide_id in sorted(manifest["slides"]):
        with h5py.File(tmp_path / "bags" / "h5_files" / f"{slide_id}.h5", "r") as f:
            features, coords = f["features"][:], f["coords"][:]
        rows = tiles.filter(pc.equal(tiles.column("slide_id"), slide_id))
        assert features.shape[0] == coords.shape[0] == rows.num_rows and coords.shape[1] == 2
        assert sorted(map(tuple, coords.tolist())) == sorted(
            zip(rows.column("x").to_pylist(), rows.column("y").to_pylist())
        )
        bag = torch.load(tmp_path / "bags" / "pt_files" / f"{slide_id}.pt")
        assert bag.dtype == torch.float32 and bag.ndim == 2 and np.array_equal(bag.numpy(), features)
        bags.append(bag)
        labels.append(float(slide_id.startswith("case")))  # DICOM or not: any label will do

    class AttentionMIL(torch.nn.Module):
        def __init__(self, dim: int, hidden: int = 16):
            super().__init__()
            self.embed = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU())
            self.attention_v = torch.nn.Linear(hidden, hidden)
            self.attention_u = torch.nn.Linear(hidden, hidden)
            self.attention_w = torch.nn.Linear(hidden, 1)
            self.classify = torch.nn.Linear(hidden, 1)

        def forward(self, bag):  # [N, D] -> a logit and the N attention weights
            h = self.embed(bag)
            scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
            weights = torch.softmax(scores.squeeze(1), dim=0)
            return self.classify(weights @ h).squeeze(), weights

    torch.manual_seed(0)
    model = AttentionMIL(bags[0].shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = sum(
            torch.nn.functional.binary_cross_entropy_with_logits(model(bag)[0], torch.tensor(label))
            for bag, label in zip(bags, labels)
        ) / len(bags)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    weights = model(bags[0])[1]
    assert weights.shape == (bags[0].shape[0],) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)


def test_projected_export_of_a_real_run(mixed_run, tmp_path):
    """A slides run stores each tile's embedding_norm; `export --features projected` (the default then) writes
    image_features * embedding_norm, the unnormalised embedding of ConceptCLIP's whole-slide recipe."""
    from pipeline.export import NORM_COLUMN

    output, _ = mixed_run
    assert main(["export", str(output), "--format", "trident", "--out", str(tmp_path / "bags")]) == 0
    tiles = read_features(str(output), columns=["slide_id", "x", "y", "image_features", NORM_COLUMN])
    rows = tiles.filter(pc.equal(tiles.column("slide_id"), "caseA"))
    norms = np.asarray(rows.column(NORM_COLUMN).to_pylist(), np.float32)
    assert (norms > 0).all() and len(set(norms.tolist())) > 1  # the model's own norms, tile by tile
    expected = {
        (x, y): np.asarray(f, np.float32) * n
        for x, y, f, n in zip(*(rows.column(c).to_pylist() for c in ("x", "y", "image_features", NORM_COLUMN)))
    }
    import h5py

    with h5py.File(tmp_path / "bags" / "caseA.h5", "r") as f:
        assert json.loads((tmp_path / "bags" / "_export.json").read_text())["features"] == "projected"
        for (x, y), got in zip(f["coords"][:].tolist(), f["features"][:]):
            np.testing.assert_allclose(got, expected[(x, y)], rtol=1e-6)
