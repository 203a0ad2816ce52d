"""The report's streaming pass: what it keeps of the rows is what a whole-table computation gives."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline.report_scan import ConceptTopK, MapSample, key_text, reason_key


def _chunks(n: int, sizes: list[int]) -> list[slice]:
    cuts = np.cumsum([0, *sizes])
    assert cuts[-1] == n
    return [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def test_top_k_per_concept_streamed_is_the_top_k_of_the_whole_table():
    rng = np.random.default_rng(1)
    n, k = 300, 7
    logits = np.round(rng.normal(size=(n, 5)), 1).astype(np.float32)  # rounded: many ties
    uris = [f"s3://b/img_{i:03d}.jpg" for i in range(n)]
    top = ConceptTopK(5, k)
    for part in _chunks(n, [1, 120, 3, 0, 176]):
        keys = pa.table({"uri": uris[part]})
        top.add(keys, logits[part], 1 / (1 + np.exp(-logits[part])), part.start)
    for j, picks in enumerate(top.best):
        expected = np.argsort(-logits[:, j], kind="stable")[:k]  # ties: the row seen first
        assert [p.key["uri"] for p in picks] == [uris[i] for i in expected]
        assert [p.logit for p in picks] == logits[expected, j].tolist()
        assert np.allclose([p.probability for p in picks], 1 / (1 + np.exp(-logits[expected, j])))


def test_the_map_sample_is_the_same_rows_however_the_shards_are_cut():
    rng = np.random.default_rng(2)
    n, points = 500, 64
    features = rng.normal(size=(n, 8)).astype(np.float16)
    keys = pa.table({"uri": [f"u{i}" for i in range(n)], "x": list(range(n)), "y": [0] * n, "level": [1] * n})
    text = key_text(keys)
    assert text[3] == "u3\x1f3\x1f0\x1f1"
    column = pa.array(list(features), pa.list_(pa.float16()))
    top = np.arange(n) % 3
    samples = []
    for sizes in ([500], [7, 93, 400], [250, 250]):
        sample = MapSample(points, seed=0)
        for part in _chunks(n, sizes):
            sample.add(text[part], column[part], top[part])
        samples.append(sample)
    digest = [hashlib.blake2b(b"0\x1f" + t.encode(), digest_size=8).digest() for t in text]
    chosen = sorted(sorted(range(n), key=lambda i: int.from_bytes(digest[i], "little"))[:points])
    for sample in samples:
        assert sample.offered == n and len(sample.features) == points
        assert np.array_equal(sample.features, features[chosen].astype(np.float32))
        assert np.array_equal(sample.top, top[chosen])
    other = MapSample(points, seed=1)
    other.add(text, column, top)
    assert not np.array_equal(other.features, samples[0].features)  # the seed picks the sample


def test_rows_of_different_widths_give_a_note_not_a_map():
    sample = MapSample(10)
    sample.add(["a", "b"], pa.array([[1.0, 0.0], [1.0, 0.0, 0.0]], pa.list_(pa.float16())), np.zeros(2, np.int64))
    assert sample.features is None and "different widths" in sample.note


def test_reasons_group_without_what_is_particular_to_the_input():
    a = reason_key("not a readable image (cannot identify s3://b/x/img_1.jpg at 0x7f12ab)", "s3://b/x/img_1.jpg")
    b = reason_key("not a readable image (cannot identify s3://b/y/img_22.jpg at 0x7f99cd)", "s3://b/y/img_22.jpg")
    assert a == b == "not a readable image (cannot identify … at 0x…)"
