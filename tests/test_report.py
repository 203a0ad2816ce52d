"""`featurize report`: one static HTML page, readable offline, with inlined figures."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import with_old_column_names
from test_rescore import colour_outputs, slides_output

from pipeline.cli import main

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


class _Checker(HTMLParser):
    """Balanced tags, every <img>'s data URI, and the text; any external reference is recorded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.text, self.external, self.errors = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
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


def check_page(path: Path) -> _Checker:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert not checker.external, checker.external  # offline: no external assets
    return checker


def png_pixels(img: dict) -> np.ndarray:
    assert img["src"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def colours(ray_session, tmp_path_factory, conceptclip_model, prompts_file):
    return colour_outputs(tmp_path_factory, conceptclip_model, prompts_file)


def test_images_report(colours, tmp_path):
    path = tmp_path / "report.html"
    assert main(["report", colours["output"], "--out", str(path)]) == 0
    page = check_page(path)
    text = " ".join(page.text)
    run = json.loads((Path(colours["output"]) / "_run.json").read_text())
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


def test_slides_report_escapes_and_draws_a_heatmap_per_slide(
    ray_session, tmp_path_factory, conceptclip_model, prompts_file, tmp_path
):
    slides = slides_output(tmp_path_factory, conceptclip_model, prompts_file)
    path = tmp_path / "slides.html"
    assert main(["report", slides["output"], "--out", str(path), "--concept", "stroma"]) == 0
    page = check_page(path)
    raw = path.read_text(encoding="utf-8")
    assert "cannot open slide &lt;b&gt;broken&lt;/b&gt;" in raw and "<b>broken</b>" not in raw
    heatmaps = [i for i in page.images if i.get("class") == "slide"]
    assert len(heatmaps) == 2  # the unreadable slide has none
    for img in heatmaps:
        pixels = png_pixels(img)
        assert max(pixels.shape[:2]) == 360 and pixels.std() > 0
    assert len([i for i in page.images if i.get("class") == "concept"]) == 4
    text = " ".join(page.text)
    assert "boom" in text and "tiles per s: 12.5" in text
    assert main(["report", slides["output"], "--out", str(tmp_path / "x.html"), "--concept", "nope"]) == 2


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
