"""`featurize index`: a faiss index over an OUTPUT's current ok rows, on real OUTPUTs of real runs: exact and IVF
builds, Ray tasks, incremental updates after a nightly run, refusals, empty OUTPUTs, slides and loopback S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from search_fixtures import (
    errors_only_output,
    featurize,
    images_output,
    one_line_error,
    photos_output,
    slides_run,
    stored,
)

from pipeline.index import build_index, choose_factory, load_index, parse_size
from pipeline.vectors import row_keys


@pytest.fixture(scope="module")
def photos(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return photos_output(tmp_path_factory, conceptclip_model, prompts_file)


def indexed_rows(index_dir) -> set[tuple]:
    ids = load_index(str(index_dir)).ids
    return set(zip(ids.column("uri").to_pylist(), ids.column("run_id").to_pylist()))


def current_rows(output) -> set[tuple]:
    table, _ = stored(output)
    return set(zip(table.column("uri").to_pylist(), table.column("run_id").to_pylist()))


def finds_every_row_itself(index_dir, output, least: float = 0.995) -> None:
    """Each stored row, as a query, comes back at cosine ~1 (at least `least`: 8-bit codes score a row a little less
    than exactly), first or behind only a near-identical row (a copy, or a re-encode that a quantised index scores as
    high)."""
    table, features = stored(output)
    index = load_index(str(index_dir))
    scores, ids = index.search(features, 2)
    uris = table.column("uri").to_pylist()
    for uri, top, found in zip(uris, scores, ids):
        hits = index.rows_of(found).column("uri").to_pylist()
        assert uri in hits, (uri, hits, top)
        assert top[hits.index(uri)] >= least and top[0] - top[hits.index(uri)] <= 2e-3, (uri, hits, top)


def test_the_index_holds_the_current_ok_rows_and_finds_each_one(photos, tmp_path, capsys):
    output = photos["output"]
    assert featurize("index", output) == 0
    assert "indexed 17 rows (Flat): 17 added, 0 removed" in capsys.readouterr().err  # 14 + 3 planted; broken left out
    meta = json.loads((Path(output) / "_index" / "_index.json").read_text())
    dataset = json.loads((Path(output) / "_dataset.json").read_text())
    assert meta["factory"] == "Flat" and meta["rows"] == 17 and meta["dim"] == 32
    assert meta["feature_identity"]["model"] == dataset["identity"]["model"]
    assert meta["feature_identity"]["dataset_version"] == 1 and "prompt_set_hash" not in meta["feature_identity"]
    assert meta["coverage"]["shards"] == sorted(p.name for p in Path(output).glob("part-*.parquet"))
    assert indexed_rows(Path(output) / "_index") == current_rows(output)
    finds_every_row_itself(Path(output) / "_index", output)
    # the ids table keeps each row's keys beside its id
    ids = load_index(str(Path(output) / "_index")).ids
    assert ids.column_names == ["id", "uri", "image_id", "run_id"]


def test_ivf_adds_in_ray_tasks_merge_into_the_same_index(photos, tmp_path):
    output = photos["output"]
    local = build_index(output, str(tmp_path / "local"), index_type="IVF4,SQ8", use_ray=False, echo=lambda m: None)
    ray = build_index(output, str(tmp_path / "ray"), index_type="IVF4,SQ8", use_ray=True, echo=lambda m: None)
    assert local["nlist"] == ray["nlist"] == 4 and local["rows"] == ray["rows"] == 17
    assert local["nprobe"] == ray["nprobe"] and local["calibration"] == ray["calibration"]
    _, features = stored(output)
    a, b = load_index(str(tmp_path / "local")), load_index(str(tmp_path / "ray"))
    assert a.ids.equals(b.ids)
    for nprobe in (1, 4):
        scores_a, ids_a = a.search(features, 5, nprobe)
        scores_b, ids_b = b.search(features, 5, nprobe)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(scores_a, scores_b)
    finds_every_row_itself(tmp_path / "ray", output)


@pytest.fixture(scope="module")
def nightly(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    """A first run and its indexes (exact and IVF), then a nightly --incremental run that changes two images and
    adds three; the indexes are not updated yet."""
    from PIL import Image

    from pipeline.demo import make_images

    root = tmp_path_factory.mktemp("nightly")
    output = images_output(root, conceptclip_model, prompts_file)
    photos = root / "photos"
    # IVF with full vectors: what is checked here is the update (ids kept, added, removed), not 8-bit codes, whose
    # ranges, learnt from 17 rows of a random model, clip the new pictures' values
    for kind, index_type in (("flat", None), ("ivf", "IVF2,Flat")):
        build_index(output, str(root / kind), index_type=index_type, echo=lambda m: None)
    before = current_rows(output)
    fresh = make_images(root / "fresh", 5, seed=11, sizes=((96, 72), (200, 150)))
    for target, source in zip(["img_00003.jpg", "img_00004.jpg"], fresh[:2]):
        with Image.open(source) as img:
            img.save(photos / target, quality=90)  # a different picture under the same name
    for i, source in enumerate(fresh[2:]):
        shutil.copyfile(source, photos / f"new_{i}.jpg")
    common = ["--prompts", prompts_file, "--trust-remote-code", "--dtype", "float32", "--rows-per-shard", 6]
    assert featurize("images", photos, output, "--model", conceptclip_model, *common, "--incremental") == 0
    return {"output": output, "root": root, "before": before, "photos": photos}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_nightly_run_is_indexed_incrementally(nightly, kind, capsys):
    output, index_dir = nightly["output"], nightly["root"] / kind
    after = current_rows(output)
    changed = {row for row in nightly["before"] if row not in after}
    assert {Path(uri).name for uri, _ in changed} == {"img_00003.jpg", "img_00004.jpg"}
    old = load_index(str(index_dir))
    # searching the stale index warns that it is older than OUTPUT
    query = str(nightly["photos"] / "new_0.jpg")
    assert featurize("search", output, "--image", query, "--index", index_dir, "--trust-remote-code", "--k", 1) == 0
    assert "is older than" in capsys.readouterr().err

    assert featurize("index", output, "--out", index_dir) == 0
    assert "indexed 20 rows" in (err := capsys.readouterr().err) and "5 added, 2 removed" in err, err
    meta = json.loads((index_dir / "_index.json").read_text())
    now = load_index(str(index_dir))
    assert indexed_rows(index_dir) == after and not changed & indexed_rows(index_dir)
    # rows that stayed keep their ids; the new rows got new ones; the old generation's files are gone
    kept = set(row_keys(old.ids, ["uri", "image_id"])) & set(row_keys(now.ids, ["uri", "image_id"]))
    assert len(kept) == 17 - 2
    new_ids = now.ids.column("id").to_numpy()[-5:]
    assert sorted(new_ids) == list(range(17, 22))  # 3 new images and the new rows of the 2 changed ones
    assert sorted(p.name for p in index_dir.iterdir()) == sorted(
        ["_index.json", "ids-00002.parquet", "index-00002.faiss"]
    )
    assert meta["coverage"]["shards"] == sorted(p.name for p in Path(output).glob("part-*.parquet"))
    finds_every_row_itself(index_dir, output)
    # the same rows as an index built from scratch
    again = nightly["root"] / f"{kind}-rebuilt"
    rebuilt = build_index(output, str(again), index_type=meta["factory"], echo=lambda m: None)
    assert rebuilt["rows"] == meta["rows"] == 20
    assert indexed_rows(again) == indexed_rows(index_dir)
    # and again: nothing to do
    assert featurize("index", output, "--out", index_dir) == 0
    assert "0 added, 0 removed" in capsys.readouterr().err


def test_an_index_for_other_features_is_refused(photos, ray_session, clip_model, prompts_file, tmp_path, capsys):
    output = photos["output"]
    index_dir = tmp_path / "index"
    assert featurize("index", output, "--out", index_dir) == 0
    capsys.readouterr()
    other = images_output(photos["root"], clip_model, prompts_file, "clip-out")
    capsys.readouterr()
    assert featurize("index", other, "--out", index_dir) == 2
    one_line_error(capsys, f"index {index_dir} was made for other features", "model", "--rebuild")
    query = str(photos["photos"] / "img_00000.jpg")
    assert featurize("search", other, "--image", query, "--index", index_dir) == 2
    one_line_error(capsys, "was made for other features", "--exact")
    # a new dataset version of the same OUTPUT (new prompts) needs --rebuild
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("_index"))
    assert featurize("index", copy) == 0
    prompts = tmp_path / "other.yaml"
    prompts.write_text("concepts: [grass, sky]\ntemplates: ['a photo of {}']\n")
    model = json.loads((copy / "_dataset.json").read_text())["identity"]["model"]
    common = ["--prompts", prompts, "--trust-remote-code", "--dtype", "float32"]
    assert featurize("images", photos["photos"], copy, "--model", model, *common, "--new-version") == 0
    capsys.readouterr()
    assert featurize("index", copy) == 2
    one_line_error(capsys, "dataset_version 1 (index) vs 2 (OUTPUT)", "--rebuild")
    assert featurize("index", copy, "--rebuild") == 0
    assert load_index(str(copy / "_index")).meta["feature_identity"]["dataset_version"] == 2
    capsys.readouterr()
    assert featurize("index", output, "--out", tmp_path / "hnsw", "--index-type", "HNSW32") == 2
    one_line_error(capsys, "--index-type 'HNSW32'", "IVF")
    assert featurize("index", output, "--out", tmp_path / "tiny", "--max-memory", "1KB") == 2
    one_line_error(capsys, "--max-memory", "cannot hold an index of 17 rows")


def test_outputs_without_rows(ray_session, tmp_path_factory, conceptclip_model, tmp_path, capsys):
    errors = errors_only_output(tmp_path_factory, conceptclip_model)
    assert featurize("index", errors) == 0
    assert "indexed 0 rows (empty)" in capsys.readouterr().err
    assert load_index(str(Path(errors) / "_index")).rows == 0
    assert featurize("search", errors, "--text", "x", "--trust-remote-code") == 0  # through the empty index
    assert "0 nearest of 0 rows" in capsys.readouterr().err
    # an OUTPUT whose first run committed no shard yet, and a folder that is no OUTPUT
    started = tmp_path / "started"
    started.mkdir()
    shutil.copyfile(Path(errors) / "_dataset.json", started / "_dataset.json")
    assert featurize("index", started) == 0
    assert "indexed 0 rows" in capsys.readouterr().err
    assert featurize("index", tmp_path) == 2
    one_line_error(capsys, "holds no featurised output")


def test_slide_tiles_are_indexed_with_their_coordinates(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    run = slides_run(tmp_path_factory, conceptclip_model, prompts_file)
    output = run["output"]
    meta = build_index(output, echo=lambda m: None)
    assert meta["is_slides"] and meta["keys"] == ["slide_id", "uri", "x", "y", "level"]
    table, features = stored(output)
    ids = load_index(str(Path(output) / "_index")).ids
    assert ids.column_names == ["id", "slide_id", "uri", "x", "y", "level", "run_id"]
    expected = set(zip(*(table.column(c).to_pylist() for c in ("slide_id", "x", "y", "level"))))
    assert set(zip(*(ids.column(c).to_pylist() for c in ("slide_id", "x", "y", "level")))) == expected
    assert len(expected) == table.num_rows > 10


def test_index_on_object_storage(photos, s3_server, s3_bucket, tmp_path, capsys):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(photos["output"] + "/", f"{s3_bucket}/out/", recursive=True)
    fs.rm(f"{s3_bucket}/out/_index", recursive=True)
    remote = f"s3://{s3_bucket}/out"
    assert featurize("index", remote, "--storage-options", json.dumps(options), "--index-type", "IVF2,SQ8") == 0
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/_index")) == [
        "_index.json", "ids-00001.parquet", "index-00001.faiss"
    ]  # fmt: skip
    index = load_index(remote + "/_index", options)
    assert set(zip(index.ids.column("uri").to_pylist(), index.ids.column("run_id").to_pylist())) == current_rows(
        photos["output"]
    )
    err = capsys.readouterr().err
    for text in (err, fs.cat_file(f"{s3_bucket}/out/_index/_index.json").decode()):
        assert options["secret"] not in text and options["key"] not in text


def test_index_type_follows_rows_and_memory():
    assert choose_factory(99_999, 1152, 8 * 2**30) == "Flat"
    assert choose_factory(1_000_000, 1152, 4 * 2**30) == "IVF4096,SQ8"
    assert choose_factory(1_000_000, 1152, 600 * 2**20) == "IVF4096,PQ576"  # 576 bytes a row fit, 1152 do not
    assert choose_factory(10_000_000, 1152, 2 * 2**30) == "IVF16384,PQ192"
    assert choose_factory(50_000, 1152, 100 * 2**20) == "IVF1024,SQ8"  # too big to be exact within the budget
    assert parse_size("4GB") == 4 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


def test_a_sample_is_random_rows_of_random_row_groups(photos):
    from pipeline.vectors import open_vectors

    vectors = open_vectors(photos["output"])
    keys = list(zip(vectors.rows.column("shard").to_pylist(), vectors.rows.column("row").to_pylist()))
    for seed in range(3):
        sample = vectors.sample(4, seed)
        chosen = list(zip(sample.column("shard").to_pylist(), sample.column("row").to_pylist()))
        assert len(set(chosen)) == 4 and set(chosen) <= set(keys) and chosen == sorted(chosen)
        features = np.concatenate([x for _, x in vectors.batches(sample)])
        _, stored_features = stored(photos["output"])
        uris = vectors.rows.column("uri").to_pylist()
        order = [uris.index(u) for u in sample.column("uri").to_pylist()]
        table, _ = stored(photos["output"])
        expected = stored_features[[table.column("uri").to_pylist().index(uris[i]) for i in order]]
        np.testing.assert_allclose(features, expected, atol=1e-6)
    assert vectors.sample(100).equals(vectors.rows)
