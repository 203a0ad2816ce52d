"""`featurize search`: queries embedded exactly as the run embeds prompts and images, answered by the index or an
exact scan, written as Parquet, CSV or an offline HTML gallery; on real OUTPUTs of real runs (images, slides,
features-only, hidden states, loopback S3)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
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
    tile_png,
)

from pipeline.search import embed_query, search


@pytest.fixture(scope="module")
def photos(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return photos_output(tmp_path_factory, conceptclip_model, prompts_file)


def test_a_text_query_is_embedded_as_the_run_embedded_its_prompts(photos):
    output = photos["output"]
    prompts = pq.read_table(Path(output) / "_prompts.parquet")
    recorded = dict(zip(prompts.column("concept").to_pylist(), prompts.column("text_embedding").to_pylist()))
    for concept in ("tumor", "necrosis"):
        query = embed_query(output, text=concept, templates=["a histopathology image of {}"], trust_remote_code=True)
        np.testing.assert_allclose(query.vector[0], recorded[concept], atol=1e-6)
    bare = embed_query(output, text="tumor", trust_remote_code=True).vector[0]
    assert float(bare @ np.asarray(recorded["tumor"])) < 0.9999  # without the template: another text

    # the scores are the cosine of the stored features with that embedding, best first
    query = embed_query(output, text="tumor", templates=["a histopathology image of {}"], trust_remote_code=True)
    table, info = search(output, query.vector, k=5, exact=True)
    rows, features = stored(output)
    expected = features @ query.vector[0]
    order = np.argsort(-expected, kind="stable")[:5]
    assert info["source"] == "exact" and table.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("uri").to_pylist() == [rows.column("uri")[int(i)].as_py() for i in order]
    np.testing.assert_allclose(table.column("score").to_numpy(), expected[order], atol=1e-6)


def test_an_image_query_is_embedded_as_the_run_embedded_the_image(photos):
    output = photos["output"]
    rows, features = stored(output)
    uris = rows.column("uri").to_pylist()
    for name in ("img_00004.jpg", "img_00009.jpg", "dup_shift.png"):
        path = str(photos["photos"] / name)
        query = embed_query(output, image=path, trust_remote_code=True)
        cosine = float(query.vector[0] @ features[uris.index(path)])
        assert cosine >= 1 - 1e-3, (name, cosine)  # equal up to the float16 the features are stored in
        table, _ = search(output, query.vector, k=1, exact=True)
        assert table.column("uri").to_pylist() == [path]


def test_the_index_and_the_exact_scan_agree(photos, tmp_path, capsys):
    output = photos["output"]
    index_dir = tmp_path / "index"
    assert featurize("index", output, "--out", index_dir) == 0
    query = embed_query(output, text="stroma", trust_remote_code=True).vector
    from_index, info = search(output, query, k=6, index_dir=str(index_dir))
    exact, _ = search(output, query, k=6, exact=True)
    assert info["source"] == "index" and info["factory"] == "Flat"
    np.testing.assert_allclose(from_index.column("score").to_numpy(), exact.column("score").to_numpy(), atol=1e-5)
    # k larger than the rows: every row once, in the same order up to ties
    everything, _ = search(output, query, k=100, index_dir=str(index_dir))
    assert everything.num_rows == 17 and len(set(everything.column("uri").to_pylist())) == 17
    assert ranked(everything) == ranked(search(output, query, k=100, exact=True)[0])
    capsys.readouterr()
    path = str(photos["photos"] / "img_00002.jpg")
    assert featurize("search", output, "--image", path, "--index", index_dir, "--k", 3, "--trust-remote-code") == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "rank\tscore\turi" and lines[1].split("\t")[2] == path and len(lines) == 4
    assert "3 nearest of 17 rows" in captured.err and "index Flat" in captured.err


def ranked(table) -> list[tuple]:
    """(score to 4 places, uri) best first: the order up to ties (a byte-identical copy scores as its original)."""
    rows = zip(np.round(table.column("score").to_numpy(), 4).tolist(), table.column("uri").to_pylist())
    return sorted(rows, key=lambda r: (-r[0], r[1]))


def test_results_as_parquet_csv_and_a_self_contained_gallery(photos, tmp_path):
    output = photos["output"]
    args = ["search", output, "--text", "tumor", "--template", "a histopathology image of {}", "--k", 4]
    for suffix in ("parquet", "csv", "html"):
        assert featurize(*args, "--out", tmp_path / f"r.{suffix}", "--trust-remote-code") == 0
    parquet = pq.read_table(tmp_path / "r.parquet")
    assert parquet.column_names == ["rank", "score", "uri", "image_id"]
    csv = pacsv.read_csv(tmp_path / "r.csv")
    assert csv.column("uri").to_pylist() == parquet.column("uri").to_pylist()
    page = Gallery.parse(tmp_path / "r.html")
    assert page.figures == 4 and len(page.images) == 4
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    assert page.external == [] and "img-src data:" in page.policy
    assert parquet.column("uri")[0].as_py() in page.text
    # an image query shows the query too
    query = str(photos["photos"] / "img_00001.jpg")
    assert featurize("search", output, "--image", query, "--out", tmp_path / "q.html", "--trust-remote-code") == 0
    page = Gallery.parse(tmp_path / "q.html")
    assert len(page.images) == page.figures + 1 == 18 and page.external == []


class Gallery(HTMLParser):
    """What a page references: img sources, any other URL in an attribute or a style, the CSP, the figures."""

    def __init__(self):
        super().__init__()
        self.images, self.external, self.figures, self.policy, self.chunks = [], [], 0, "", []

    @classmethod
    def parse(cls, path) -> Gallery:
        page = cls()
        page.feed(Path(path).read_text(encoding="utf-8"))
        page.text = " ".join(page.chunks)
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.figures += tag == "figure"
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
            self.policy = attrs["content"]
        for name, value in attrs.items():
            if name in ("src", "href", "srcset", "action", "poster", "data") and not str(value).startswith("data:"):
                self.external.append(value)
            if name == "style" and "url(" in str(value):
                self.external.append(value)
        if tag in ("link", "iframe", "object", "embed"):
            self.external.append(tag)

    def handle_data(self, data):
        self.chunks.append(data)
        if "url(" in data or "http://" in data or "https://" in data or "@import" in data:
            self.external.append(data.strip()[:80])


def browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(browser() is None, reason="no Chromium here (apt-get install chromium, then run this test)")
def test_the_gallery_renders_offline_in_headless_chromium(photos, tmp_path):
    output = photos["output"]
    query = str(photos["photos"] / "img_00005.jpg")
    page = tmp_path / "gallery.html"
    assert featurize("search", output, "--image", query, "--k", 5, "--out", page, "--trust-remote-code") == 0
    dom = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    # the page's own script counted the images the browser decoded: the query and the five results, all of them
    assert 'data-thumbnails="6"' in dom and 'data-decoded="6"' in dom, dom[:400]


@pytest.fixture(scope="module")
def features_only(photos, ray_session, clip_model, tmp_path_factory):
    """A features-only OUTPUT of an image tower without text (CLIPVisionModel), and one of a full model without
    prompts (a copy of the photos OUTPUT without its logits and prompts)."""
    from transformers import AutoProcessor, CLIPVisionModel

    root = tmp_path_factory.mktemp("features-only")
    tower = root / "clip-vision"
    CLIPVisionModel.from_pretrained(clip_model).save_pretrained(tower)
    AutoProcessor.from_pretrained(clip_model).image_processor.save_pretrained(tower)
    vision = images_output(photos["root"], tower, None, "vision-out")
    plain = root / "plain"
    shutil.copytree(photos["output"], plain, ignore=shutil.ignore_patterns("_index", "_prompts.parquet"))
    for shard in plain.glob("part-*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["concept_logits"]), shard)
    dataset = json.loads((plain / "_dataset.json").read_text())
    dataset["identity"]["prompt_set_hash"] = None
    (plain / "_dataset.json").write_text(json.dumps(dataset))
    return {"vision": vision, "plain": str(plain)}


def test_features_only_outputs(photos, features_only, capsys):
    vision = features_only["vision"]
    query = str(photos["photos"] / "img_00006.jpg")
    assert featurize("search", vision, "--text", "a tumor") == 2
    one_line_error(capsys, "an image tower without a text tower", "--image")
    assert featurize("search", vision, "--image", query, "--k", 2) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[2] == query
    # a model with a text tower answers text queries without a prompt set
    assert featurize("search", features_only["plain"], "--text", "tumor", "--trust-remote-code", "--k", 3) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_hidden_state_features_take_image_queries_of_their_own_kind(photos, capsys):
    from pipeline.checkpoint import parse_features

    output = images_output(photos["root"], photos_model(photos), None, "hidden-out", "--features", "hidden:-2:mean")
    capsys.readouterr()
    assert featurize("search", output, "--text", "tumor", "--trust-remote-code") == 2
    one_line_error(capsys, "hidden-state features (hidden:-2:mean)", "--image")
    rows, features = stored(output)
    path = str(photos["photos"] / "img_00007.jpg")
    query = embed_query(output, image=path, trust_remote_code=True)
    assert query.vector.shape == (1, features.shape[1]) and parse_features("hidden:-2:mean").pool == "mean"
    assert float(query.vector[0] @ features[rows.column("uri").to_pylist().index(path)]) >= 1 - 1e-3
    assert featurize("index", output) == 0
    assert featurize("search", output, "--image", path, "--k", 1, "--trust-remote-code") == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[2] == path


def photos_model(photos) -> str:
    return json.loads((Path(photos["output"]) / "_dataset.json").read_text())["identity"]["model"]


def test_refusals_are_one_line(photos, ray_session, tmp_path_factory, conceptclip_model, tmp_path, capsys):
    output = photos["output"]
    assert featurize("search", output, "--text", "tumor") == 2
    one_line_error(capsys, "runs its own Python code", "--trust-remote-code")
    assert featurize("search", output, "--image", tmp_path / "nope.jpg", "--trust-remote-code") == 2
    one_line_error(capsys, "nope.jpg does not exist")
    assert featurize("search", output, "--image", photos["photos"] / "broken.jpg", "--trust-remote-code") == 2
    one_line_error(capsys, "broken.jpg: not a readable image")
    assert featurize("search", output, "--text", "x", "--template", "no braces", "--trust-remote-code") == 2
    one_line_error(capsys, "--template 'no braces' has no '{}'")
    assert featurize("search", output, "--text", "x", "--out", tmp_path / "r.txt", "--trust-remote-code") == 2
    one_line_error(capsys, "write a .parquet, .csv or .html file")
    assert featurize("search", output, "--text", "x", "--index", tmp_path, "--trust-remote-code") == 2
    one_line_error(capsys, "holds no index")
    assert featurize("search", tmp_path, "--text", "x") == 2
    one_line_error(capsys, "holds no featurised output")
    # an OUTPUT without ok rows answers with no rows
    errors = errors_only_output(tmp_path_factory, conceptclip_model)
    assert featurize("search", errors, "--text", "x", "--trust-remote-code", "--out", tmp_path / "none.parquet") == 0
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    assert "0 nearest of 0 rows" in capsys.readouterr().err


def test_slide_tiles_answer_an_image_of_a_tile_and_show_in_the_gallery(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    run = slides_run(tmp_path_factory, conceptclip_model, prompts_file)
    output = run["output"]
    rows, _ = stored(output)
    row = rows.to_pylist()[7]
    (tmp_path / "tile.png").write_bytes(tile_png(output, row))
    for exact in (True, False):
        if not exact:
            assert featurize("index", output) == 0
        flag = ["--exact"] if exact else []
        out = tmp_path / f"r{int(exact)}.parquet"
        args = ["search", output, "--image", tmp_path / "tile.png", "--k", 3, "--out", out, *flag]
        assert featurize(*args, "--trust-remote-code") == 0
        table = pq.read_table(out)
        assert table.column_names == ["rank", "score", "slide_id", "uri", "x", "y", "level"]
        top = table.to_pylist()[0]
        assert [top[k] for k in ("slide_id", "x", "y", "level")] == [row[k] for k in ("slide_id", "x", "y", "level")]
        assert top["score"] >= 1 - 1e-3
    page = tmp_path / "tiles.html"
    args = ["search", output, "--image", tmp_path / "tile.png", "--k", 4, "--out", page, "--trust-remote-code"]
    assert featurize(*args) == 0
    gallery = Gallery.parse(page)
    assert len(gallery.images) == 5 and gallery.external == []  # the query and four tiles cropped from the slide
    assert f"{row['slide_id']} x={row['x']} y={row['y']} level={row['level']}" in gallery.text


def test_search_on_object_storage(photos, s3_server, s3_bucket, capsys):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(photos["output"] + "/", f"{s3_bucket}/out/", recursive=True)
    if fs.exists(f"{s3_bucket}/out/_index"):
        fs.rm(f"{s3_bucket}/out/_index", recursive=True)
    remote, flags = f"s3://{s3_bucket}/out", ["--storage-options", json.dumps(options), "--trust-remote-code"]
    image = f"s3://{s3_bucket}/query.jpg"
    fs.put(str(photos["photos"] / "img_00008.jpg"), image.removeprefix("s3://"))
    out = f"s3://{s3_bucket}/results.parquet"
    assert featurize("search", remote, "--image", image, "--k", 3, "--out", out, *flags) == 0  # an exact scan
    exact = pq.read_table(out.removeprefix("s3://"), filesystem=fs)
    assert featurize("index", remote, "--storage-options", json.dumps(options)) == 0
    assert featurize("search", remote, "--image", image, "--k", 3, "--out", out, *flags) == 0  # the index
    indexed = pq.read_table(out.removeprefix("s3://"), filesystem=fs)
    assert ranked(exact) == ranked(indexed)
    assert exact.column("uri")[0].as_py() == str(photos["photos"] / "img_00008.jpg")
    err = capsys.readouterr().err
    assert "index Flat" in err and options["secret"] not in err and options["key"] not in err
