"""`featurize dedup`: near-duplicate groups are the connected components of the pairs at or above the threshold,
found exactly (one partition) or out of core (k-means partitions), within an OUTPUT or against another; on real
OUTPUTs of real runs, checked against a brute-force computation from read_features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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

from pipeline.dedup import components, dedup

THRESHOLD = 0.99  # the tiny random model scores distinct photos up to ~0.97 and the planted copies above 0.99


@pytest.fixture(scope="module")
def photos(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return photos_output(tmp_path_factory, conceptclip_model, prompts_file)


def brute_force(keys: list, features: np.ndarray, threshold: float, other=None) -> dict:
    """{key: (its group as a frozenset of keys, nearest key, similarity)} from all pairs, by plain Python."""
    other_keys, other_features = other if other is not None else (keys, features)
    sims = features @ other_features.T
    edges = {k: set() for k in keys}
    best = {}
    for i, key in enumerate(keys):
        for j, partner in enumerate(other_keys):
            if (other is None and i == j) or sims[i, j] < threshold:
                continue
            edges[key].add(partner)
            if key not in best or sims[i, j] > best[key][1] + 1e-7:
                best[key] = (partner, float(sims[i, j]))
    result = {}
    for key in best:
        group, todo = set(), [key]
        while todo and other is None:  # within one OUTPUT: the connected component
            k = todo.pop()
            if k not in group:
                group.add(k)
                todo += [p for p in edges[k] if p not in group]
        result[key] = (frozenset(group), *best[key])
    return result


def groups_of(table) -> dict:
    rows = table.to_pylist()
    members: dict = {}
    for row in rows:
        members.setdefault(row["group"], set()).add(row["uri"])
    return {r["uri"]: (frozenset(members[r["group"]]), r["nearest_uri"], r["similarity"]) for r in rows}


def assert_same(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for key, (group, nearest, similarity) in expected.items():
        assert found[key][0] == group, key
        assert found[key][2] == pytest.approx(similarity, abs=1e-5), key
        assert found[key][1] == nearest or found[key][2] == pytest.approx(similarity, abs=1e-5), key


@pytest.mark.parametrize("partitioned", [False, True])
def test_groups_are_the_connected_components_of_the_pairs(photos, partitioned, tmp_path, capsys):
    output = photos["output"]
    rows, features = stored(output)
    uris = rows.column("uri").to_pylist()
    expected = brute_force(uris, features, THRESHOLD)
    planted = {
        ("dup_copy.jpg", "img_00000.jpg"),
        ("dup_reencode.jpg", "img_00001.jpg"),
        ("dup_shift.png", "img_00002.jpg"),
    }
    for copy, original in planted:
        assert expected[str(photos["photos"] / copy)][0] == {str(photos["photos"] / n) for n in (copy, original)}
    if partitioned:  # k-means partitions of 4 rows: the out-of-core path on a small OUTPUT
        table, counts = dedup(output, THRESHOLD, exact_rows=0, partition_rows=4)
    else:
        assert featurize("dedup", output, "--threshold", THRESHOLD, "--out", tmp_path / "g.parquet") == 0
        table = pq.read_table(tmp_path / "g.parquet")
        err = capsys.readouterr().err
        groups = len({g for g, _, _ in expected.values()})
        assert f"{groups} groups of near-duplicates hold {len(expected)} of 17 rows (cosine >= 0.99" in err
    assert table.column_names == ["group", "group_size", "uri", "image_id", "nearest_uri", "similarity"]
    assert_same(groups_of(table), expected)
    sizes = dict(zip(table.column("group").to_pylist(), table.column("group_size").to_pylist()))
    assert all(sizes[g] == table.column("group").to_pylist().count(g) for g in sizes)


def test_a_lower_threshold_merges_groups_and_csv_works(photos, tmp_path):
    output = photos["output"]
    rows, features = stored(output)
    expected = brute_force(rows.column("uri").to_pylist(), features, 0.95)
    assert featurize("dedup", output, "--threshold", 0.95, "--out", tmp_path / "g.csv") == 0
    import pyarrow.csv as pacsv

    assert_same(groups_of(pacsv.read_csv(tmp_path / "g.csv")), expected)


@pytest.fixture(scope="module")
def test_set(photos, conceptclip_model, prompts_file):
    """Another OUTPUT of the same model: copies of two training photos among three new ones."""
    from pipeline.demo import make_images

    root = photos["root"] / "test-set"
    make_images(root / "photos", 3, seed=21, sizes=((96, 72), (200, 150)))
    for name in ("img_00005.jpg", "img_00010.jpg"):
        shutil.copyfile(photos["photos"] / name, root / "photos" / f"leaked_{name}")
    return images_output(root, conceptclip_model, prompts_file)


def test_against_another_output_reports_the_rows_found_there(photos, test_set, tmp_path, capsys):
    output = photos["output"]
    rows, features = stored(output)
    other_rows, other_features = stored(test_set)
    expected = brute_force(
        rows.column("uri").to_pylist(), features, THRESHOLD, (other_rows.column("uri").to_pylist(), other_features)
    )
    assert {Path(k).name for k in expected} == {"img_00005.jpg", "img_00010.jpg"}
    out = tmp_path / "leaks.parquet"
    assert featurize("dedup", output, "--against", test_set, "--threshold", THRESHOLD, "--out", out) == 0
    assert f"2 of 17 rows near-duplicate rows of {test_set} (5 rows; cosine >= 0.99" in capsys.readouterr().err
    table = pq.read_table(out)
    assert table.column_names == ["group", "uri", "image_id", "nearest_uri", "similarity", "matches"]
    found = {r["uri"]: (r["nearest_uri"], r["similarity"], r["matches"]) for r in table.to_pylist()}
    for uri, (_, nearest, similarity) in expected.items():
        assert Path(found[uri][0]).name == f"leaked_{Path(uri).name}" == Path(nearest).name
        assert found[uri][1] == pytest.approx(similarity, abs=1e-5) and found[uri][2] == 1
    partitioned, _ = dedup(output, THRESHOLD, against=test_set, exact_rows=0, partition_rows=3)
    assert partitioned.select(["uri", "nearest_uri"]).equals(table.select(["uri", "nearest_uri"]))


def test_against_an_output_of_other_features_is_refused(photos, test_set, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(test_set, other)
    dataset = json.loads((other / "_dataset.json").read_text())
    dataset["identity"]["model"] = "openai/clip-vit-base-patch32"
    (other / "_dataset.json").write_text(json.dumps(dataset))
    assert featurize("dedup", photos["output"], "--against", other, "--out", tmp_path / "g.parquet") == 2
    one_line_error(capsys, f"--against {other} was made with other features", "model")
    assert featurize("dedup", photos["output"], "--threshold", 1.5, "--out", tmp_path / "g.parquet") == 2
    one_line_error(capsys, "--threshold 1.5")
    assert featurize("dedup", photos["output"], "--out", tmp_path / "g.txt") == 2
    one_line_error(capsys, "write a .parquet or .csv file")
    assert not (tmp_path / "g.parquet").exists()


def test_an_output_without_rows_has_no_groups(
    ray_session, tmp_path_factory, conceptclip_model, photos, tmp_path, capsys
):
    errors = errors_only_output(tmp_path_factory, conceptclip_model)
    assert featurize("dedup", errors, "--out", tmp_path / "g.parquet") == 0
    assert "0 groups of near-duplicates hold 0 of 0 rows" in capsys.readouterr().err
    table = pq.read_table(tmp_path / "g.parquet")
    assert table.num_rows == 0 and table.column_names == [
        "group",
        "group_size",
        "uri",
        "image_id",
        "nearest_uri",
        "similarity",
    ]
    assert featurize("dedup", photos["output"], "--against", errors, "--out", tmp_path / "a.parquet") == 0
    assert "0 of 17 rows near-duplicate rows of" in capsys.readouterr().err


def test_slide_tiles_are_grouped_by_their_coordinates(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    run = slides_run(tmp_path_factory, conceptclip_model, prompts_file)
    rows, features = stored(run["output"])
    keys = list(zip(*(rows.column(c).to_pylist() for c in ("slide_id", "x", "y", "level"))))
    threshold = float(np.quantile((features @ features.T)[np.triu_indices(len(keys), 1)], 0.99))  # some pairs
    expected = brute_force(keys, features, threshold)
    table, counts = dedup(run["output"], threshold)
    assert table.column_names == [
        "group", "group_size", "slide_id", "uri", "x", "y", "level",
        "nearest_slide_id", "nearest_uri", "nearest_x", "nearest_y", "nearest_level", "similarity",
    ]  # fmt: skip
    assert counts["pairs"] > 0
    members: dict = {}
    rows_out = table.to_pylist()
    for r in rows_out:
        members.setdefault(r["group"], set()).add((r["slide_id"], r["x"], r["y"], r["level"]))
    found = {
        (r["slide_id"], r["x"], r["y"], r["level"]): (
            frozenset(members[r["group"]]),
            (r["nearest_slide_id"], r["nearest_x"], r["nearest_y"], r["nearest_level"]),
            r["similarity"],
        )
        for r in rows_out
    }
    assert_same(found, expected)


def test_dedup_on_object_storage(photos, s3_server, s3_bucket, tmp_path):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(photos["output"] + "/", f"{s3_bucket}/out/", recursive=True)
    out = f"s3://{s3_bucket}/groups.parquet"
    flags = ["--storage-options", json.dumps(options), "--threshold", THRESHOLD]
    assert featurize("dedup", f"s3://{s3_bucket}/out", "--out", out, *flags) == 0
    assert featurize("dedup", photos["output"], "--out", tmp_path / "local.parquet", "--threshold", THRESHOLD) == 0
    remote = pq.read_table(out.removeprefix("s3://"), filesystem=fs)
    assert remote.equals(pq.read_table(tmp_path / "local.parquet"))


def test_components_by_hooking_and_pointer_jumping():
    rng = np.random.default_rng(0)
    n = 300
    a, b = rng.integers(0, n, 240), rng.integers(0, n, 240)
    a, b = np.r_[a, np.arange(100, 149)], np.r_[b, np.arange(101, 150)]  # and a long chain
    root = components(n, a, b)
    neighbours = {i: set() for i in range(n)}
    for x, y in zip(a.tolist(), b.tolist()):
        neighbours[x].add(y)
        neighbours[y].add(x)
    for start in range(n):  # breadth-first: the smallest node of each component is its root
        seen, todo = {start}, [start]
        while todo:
            todo += [m for m in neighbours[todo.pop()] if m not in seen and not seen.add(m)]
        assert root[start] == min(seen)
    assert (components(5, np.zeros(0, np.int64), np.zeros(0, np.int64)) == np.arange(5)).all()
