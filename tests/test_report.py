"""`featurize report`: one static HTML page, readable offline, with inlined figures."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from slide_fixtures import with_old_column_names
from test_rescore import colour_outputs, slides_output

from pipeline import read_features
from pipeline.cli import main

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}
SECTIONS = ["identity", "top", "map", "logits", "errors", "counts", "runs", "stages"]
CONCEPTS = ["tumor", "stroma", "lymphocytes", "necrosis"]  # conftest's prompt set


class _Checker(HTMLParser):
    """Balanced tags, every <img>'s data URI, section ids, the table of contents' links, the text; any reference
    that is neither a data: URI nor a link within the page is recorded as external."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.text, self.external, self.errors = [], [], [], [], []
        self.ids, self.links, self.policy = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "section":
            self.ids.append(attrs["id"])
        if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
            self.policy = attrs["content"]
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


class _Figures(HTMLParser):
    """The thumbnails of each div.thumbs (keyed by its data-concept, or "errors"): each figure's title (the uri),
    its image's src or the text of the box that stands in for it, and its caption."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.groups: dict[str, list[dict]] = {}
        self.group, self.figure, self.into = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class", "").split()
        if tag == "div" and "thumbs" in classes:
            self.group = attrs.get("data-concept", "errors")
            self.groups[self.group] = []
        elif tag == "figure":
            self.figure = {"title": attrs["title"], "src": None, "missing": "", "caption": ""}
        elif self.figure is not None and tag == "img":
            self.figure["src"] = attrs["src"]
        elif self.figure is not None and tag == "div" and "missing" in classes:
            self.into = "missing"
        elif self.figure is not None and tag == "figcaption":
            self.into = "caption"

    def handle_endtag(self, tag):
        if tag == "figure":
            self.groups[self.group].append(self.figure)
            self.figure = None
        if tag in ("div", "figcaption"):
            self.into = None

    def handle_data(self, data):
        if self.figure is not None and self.into:
            self.figure[self.into] += data


def check_page(path: Path) -> _Checker:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert not checker.external, checker.external  # offline: no external assets
    assert checker.policy and "default-src 'none'" in checker.policy and "img-src data:" in checker.policy
    assert checker.links == checker.ids  # the table of contents names every section, in page order
    return checker


def figures(path: Path) -> dict[str, list[dict]]:
    parser = _Figures()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.groups


def decoded(src: str) -> np.ndarray:
    assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def png_pixels(img: dict) -> np.ndarray:
    assert img["src"].startswith("data:image/png;base64,")
    return decoded(img["src"])


@pytest.fixture(scope="module")
def colours(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return colour_outputs(tmp_path_factory, conceptclip_model, prompts_file)


@pytest.fixture(scope="module")
def images_page(colours, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", colours["output"], "--out", str(path)]) == 0
    return path


def ok_logits(output: str) -> tuple[list[str], np.ndarray]:
    table = read_features(output, columns=["uri", "status", "concept_logits"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    return table.column("uri").to_pylist(), np.asarray(table.column("concept_logits").to_pylist(), np.float32)


def test_images_report(colours, images_page):
    page = check_page(images_page)
    assert page.ids == SECTIONS
    text = " ".join(page.text)
    run = json.loads((Path(colours["output"]) / "_run.json").read_text())
    assert "62 current image rows: 60 ok, 2 errors; 4 concepts" in text
    assert re.search(r"current rows\s+62\b", text) and re.search(r"\bok\s+60\b", text)
    assert re.search(r"\berror\s+2\b", text) and run["run_id"] in text
    for stage in ("listing", "decode", "model", "write"):
        assert stage in text
    assert "actors started before plan" not in text  # a yes/no fact, not a number of seconds
    assert "model family" in text and "ConceptCLIP interface" in text and "kind remote" not in text
    # The error table: both broken files, as example uris, with their reasons.
    assert "broken_1.jpg" in text and "broken_2.jpg" in text
    concept_images = [i for i in page.images if i.get("class") == "concept"]
    assert len(concept_images) == 4  # one histogram per concept
    for img in concept_images:
        assert png_pixels(img).std() > 0


def test_the_top_images_of_each_concept_are_its_highest_logits(colours, images_page):
    uris, logits = ok_logits(colours["output"])
    groups = figures(images_page)
    assert list(groups) == [*CONCEPTS, "errors"]
    for j, concept in enumerate(CONCEPTS):
        best = np.argsort(-logits[:, j], kind="stable")[:8]
        shown = groups[concept]
        assert [f["title"] for f in shown] == [uris[i] for i in best]
        for rank, (figure, i) in enumerate(zip(shown, best), 1):
            assert f"#{rank} logit {logits[i, j]:.3f}" in figure["caption"]
            assert f"p {1 / (1 + np.exp(-logits[i, j])):.3g}" in figure["caption"]  # ConceptCLIP: sigmoid
            thumb = decoded(figure["src"])
            with Image.open(figure["title"]) as original:  # small images are shown at their own size
                assert thumb.shape == (original.height, original.width, 3)
                assert np.abs(thumb.mean(axis=(0, 1)) - np.asarray(original).mean(axis=(0, 1))).max() < 4


def test_error_rows_say_why_they_have_no_thumbnail(images_page):
    errors = figures(images_page)["errors"]
    assert sorted(f["title"].rsplit("/", 1)[-1] for f in errors) == ["broken_1.jpg", "broken_2.jpg"]
    for figure in errors:
        assert figure["src"] is None and "image" in figure["missing"]  # the decoder's reason, in place of pixels
        assert figure["caption"].startswith(figure["title"].rsplit("/", 1)[-1])


def tab10(i: int) -> np.ndarray:
    from matplotlib import colormaps

    return np.round(np.asarray(colormaps["tab10"](i)[:3]) * 255).astype(np.uint8)


def colour_pixels(pixels: np.ndarray, colour) -> int:
    """Pixels of exactly `colour` inside the plot's frame (between its left and right spines, the columns that are
    dark for most of the figure's height; the legend stands right of the frame)."""
    spines = np.nonzero((pixels.sum(axis=2) < 100).sum(axis=0) > pixels.shape[0] // 2)[0]
    plot = pixels[:, spines.min() + 1 : spines.max()]
    return int(np.all(plot == np.asarray(colour, np.uint8), axis=2).sum())


def test_the_map_colours_each_row_by_its_top_concept(colours, images_page):
    page = check_page(images_page)
    (img,) = [i for i in page.images if i.get("class") == "map"]
    pixels = png_pixels(img)
    _, logits = ok_logits(colours["output"])
    top = np.argmax(logits, axis=1)
    present, counts = np.unique(top, return_counts=True)
    ranked = [c for c, _ in sorted(zip(present, counts), key=lambda pc: (-pc[1], pc[0]))]  # legend order
    for rank, concept in enumerate(ranked):
        assert colour_pixels(pixels, tab10(rank)) >= 10, CONCEPTS[concept]
    for rank in set(range(len(ranked), 10)) - {7}:  # tab10's grey (7) is also the grey of antialiased text
        assert colour_pixels(pixels, tab10(rank)) == 0
    text = " ".join(page.text)
    assert "all 60 ok rows' image features in two dimensions" in text
    assert "coloured by each row's top concept" in text


def test_a_features_only_output_is_mapped_in_one_colour(colours, tmp_path):
    source = tmp_path / "features_only"
    shutil.copytree(colours["output"], source)
    for shard in source.glob("part-*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["concept_logits"]), shard)
    (source / "_prompts.parquet").unlink()
    shutil.rmtree(source / "_versions")  # a features-only run writes no prompt table
    dataset = json.loads((source / "_dataset.json").read_text())
    dataset["identity"]["prompt_set_hash"] = None
    (source / "_dataset.json").write_text(json.dumps(dataset))
    path = tmp_path / "report.html"
    assert main(["report", str(source), "--out", str(path)]) == 0
    page = check_page(path)
    text = " ".join(page.text)
    assert "in one colour: this OUTPUT has no concept logits (a features-only run)" in text
    assert "no images to rank" in text
    (img,) = [i for i in page.images if i.get("class") == "map"]
    pixels = png_pixels(img)
    assert colour_pixels(pixels, (0x3B, 0x6E, 0xA8)) >= 100
    assert all(colour_pixels(pixels, tab10(i)) == 0 for i in range(10) if i != 7)
    assert list(figures(path)) == ["errors"]


def test_a_rescore_is_reported_with_its_new_concepts_and_without_a_map(colours, tmp_path):
    out2 = tmp_path / "out2"
    args = ["rescore", colours["output"], "--prompts", colours["new_prompts"], "--out", str(out2)]
    assert main([*args, "--trust-remote-code"]) == 0
    path = tmp_path / "r.html"
    assert main(["report", str(out2), "--out", str(path), "--top-k", "2"]) == 0
    page = check_page(path)
    text = " ".join(page.text)
    assert "No map: this OUTPUT stores no image features (a rescore's OUT2 holds logits only)." in text
    groups = figures(path)
    assert list(groups) == ["red things", "sky", "grass", "glass", "errors"]
    assert all(len(groups[c]) == 2 and groups[c][0]["src"] for c in ["red things", "sky", "grass", "glass"])
    assert sorted(f["caption"] for f in groups["errors"]) == [f"broken_{i}.jpg(no reason given)" for i in (1, 2)]
    assert main(["report", str(out2), "--out", str(path), "--top-k", "0"]) == 0
    assert "top" not in check_page(path).ids and list(figures(path)) == ["errors"]


def test_slides_report_escapes_and_draws_a_heatmap_per_slide(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    path = tmp_path / "slides.html"
    assert main(["report", slides["output"], "--out", str(path), "--concept", "stroma"]) == 0
    page = check_page(path)
    assert page.ids == ["identity", "top", "map", "slides", *SECTIONS[3:]]
    raw = path.read_text(encoding="utf-8")
    assert "cannot open slide &lt;b&gt;broken&lt;/b&gt;" in raw and "<b>broken</b>" not in raw
    heatmaps = [i for i in page.images if i.get("class") == "slide"]
    assert len(heatmaps) == 2  # the unreadable slide has none
    for img in heatmaps:
        pixels = decoded(img["src"])
        assert max(pixels.shape[:2]) == 360 and pixels.std() > 0
    assert len([i for i in page.images if i.get("class") == "concept"]) == 4
    text = " ".join(page.text)
    assert "boom" in text and "tiles per s: 12.5" in text
    assert main(["report", slides["output"], "--out", str(tmp_path / "x.html"), "--concept", "nope"]) == 2


def test_slides_report_shows_the_top_tiles_cropped_from_their_slides(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    from pipeline.slide_readers import open_slide

    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    path = tmp_path / "slides.html"
    assert main(["report", slides["output"], "--out", str(path), "--top-k", "3"]) == 0
    tiles = pq.read_table(Path(slides["output"]) / "part-00000.parquet").to_pylist()
    ok = [t for t in tiles if t["status"] == "ok"]
    groups = figures(path)
    for j, concept in enumerate(CONCEPTS):
        best = sorted(ok, key=lambda t: -t["concept_logits"][j])[:3]
        shown = groups[concept]
        assert [re.search(r"logit (-?\d+\.\d{3})", f["caption"]).group(1) for f in shown] == [
            f"{t['concept_logits'][j]:.3f}" for t in best
        ]
        for figure, tile in zip(shown, best):
            assert f"{tile['slide_id']} ({tile['x']}, {tile['y']})" in figure["caption"]
            with open_slide(tile["uri"]) as reader:  # footprint 128 at level 0: the thumbnail is the tile itself
                region = reader.read(tile["x"], tile["y"], 0, 128, 128).astype(np.float32)
            thumb = decoded(figure["src"]).astype(np.float32)
            assert np.abs(thumb - region).mean() < 10  # JPEG, twice (the slide's, the thumbnail's)
            centred = [(a - a.mean(axis=(0, 1))).ravel() for a in (thumb, region)]
            assert np.corrcoef(*centred)[0, 1] > 0.8  # the random texture of this very tile
    (boom,) = groups["errors"]  # the failed tile, cropped from its slide, and its reason
    assert boom["src"] is not None and "boom" in boom["caption"]
    raw = path.read_text(encoding="utf-8")
    start = raw.index("Slides that failed")
    table = raw[start : raw.index("</table>", start)]
    assert table.count('<img class="thumb"') == 1  # the slide with a failed tile opens; "broken" does not
    assert "slide not readable" in table


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(page: Path, folder: Path, width: int = 1280, height: int = 5000) -> np.ndarray:
    """The page as headless Chromium draws it in a window of width x height CSS pixels (one device pixel each)."""
    out = folder / "shot.png"
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # as root (CI containers); the page is our own and loads nothing
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={folder / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.exists(), done.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def boxes(mask: np.ndarray) -> list[tuple[int, int, int, int, float]]:
    """(top, left, height, width, filled fraction) of each 4-connected region of `mask`."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    found = []
    for i, (rows, cols) in enumerate(ndimage.find_objects(labels), 1):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        found.append((rows.start, cols.start, h, w, float((labels[rows, cols] == i).sum()) / (h * w)))
    return found


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary on PATH (apt-get install chromium): the page is "
    "checked as a browser draws it only where one is installed",
)
def test_the_page_as_chromium_draws_it(colours, images_page, tmp_path):
    pixels = screenshot(images_page, tmp_path)
    ink = pixels.min(axis=2) < 200  # thumbnails, points, lines and text; not the page's pale boxes and borders
    # Thumbnails: solid regions 120 px on their longer side, 8 to a row in 4 rows (one per concept), 130 px apart.
    thumbs = [b for b in boxes(ink) if 116 <= max(b[2], b[3]) <= 124 and min(b[2], b[3]) >= 40 and b[4] > 0.9]
    assert len(thumbs) == 32, thumbs
    rows: dict[int, list[int]] = {}
    for top, left, h, w, _ in thumbs:
        centre = top + h // 2
        key = next((k for k in rows if abs(k - centre) <= 2), centre)
        rows.setdefault(key, []).append(left + w // 2)
    assert len(rows) == 4 and all(len(xs) == 8 for xs in rows.values())
    for xs in rows.values():
        assert np.all(np.abs(np.diff(sorted(xs)) - 130) <= 2)  # 120 px boxes, 10 px gaps: nothing overlaps
    for top, left, h, w, _ in thumbs:  # the noisy colour images themselves, not flat boxes
        assert pixels[top : top + h, left : left + w].std() > 10
    # The map: the one plot frame wider than 400 px, with each top concept's colour inside it.
    (frame,) = [b for b in boxes(pixels.sum(axis=2) < 100) if b[3] > 400]
    top, left, h, w, _ = frame
    plot = pixels[top + 2 : top + h - 2, left + 2 : left + w - 2]
    _, logits = ok_logits(colours["output"])
    for rank in range(len(np.unique(np.argmax(logits, axis=1)))):
        assert (np.abs(plot - tab10(rank)).max(axis=2) <= 12).sum() >= 10
    # The two broken files: a pale red box each, with the reason in it, where a thumbnail would be.
    pale = np.abs(pixels - (0xFB, 0xF3, 0xF3)).max(axis=2) <= 2
    assert len([b for b in boxes(pale) if 110 <= b[2] <= 124 and 110 <= b[3] <= 124]) == 2


def test_slides_report_reads_an_output_with_the_old_mpp_columns(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    """An OUTPUT written before `mpp` became tile_mpp (shards) and slide_mpp (_slides.parquet): the same slides."""
    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    old = with_old_column_names(slides["output"], tmp_path / "old")
    sections = {}
    for name, output in (("new", slides["output"]), ("old", str(old))):
        path = tmp_path / f"{name}.html"
        assert main(["report", output, "--out", str(path), "--concept", "stroma"]) == 0
        page = check_page(path)
        raw = path.read_text(encoding="utf-8")
        start = raw.index("<h2>Slides</h2>")
        sections[name] = raw[start : raw.index("</table>", start)]
        assert len([i for i in page.images if i.get("class") == "slide"]) == 2
    assert "slide_mpp (µm/px)" in sections["new"] and re.search(r">0\.25<", sections["new"])
    assert sections["old"] == sections["new"]


def test_report_from_object_storage(colours, s3_server, s3_bucket, tmp_path, capsys):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(colours["output"] + "/", f"{s3_bucket}/out/", recursive=True)
    url = f"s3://{s3_bucket}/report.html"
    assert main(["report", f"s3://{s3_bucket}/out", "--out", url, "--storage-options", json.dumps(options)]) == 0
    page = fs.cat_file(f"{s3_bucket}/report.html").decode()
    captured = capsys.readouterr()
    assert "broken_1.jpg" in page
    for text in (page, captured.out, captured.err):
        assert options["secret"] not in text and options["key"] not in text
    assert main(["report", f"s3://{s3_bucket}/out", "--out", str(tmp_path / "r.txt")]) == 2
