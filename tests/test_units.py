"""Unit tests without Ray: SlideReader's openslide interface (read_region, `with`), the shard writer's exactly-once
commits, the dataset identity check, and the model actor's out-of-memory and per-image fallbacks."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slide_fixtures import draw_slide, pyramid, write_slide

from pipeline.dataset import check_identity
from pipeline.errors import UserError
from pipeline.slide_readers import SlideReader, open_slide, openslide_available
from pipeline.write import OutputDir, ShardWriter, shard_name

READERS = [
    "tiffslide",
    pytest.param("openslide", marks=pytest.mark.skipif(not openslide_available(), reason="openslide is not installed")),
]


# -- SlideReader.read_region and `with` -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """A 512 x 384 slide in 64-pixel tiles, lossless (zlib), so every level's pixels are known exactly."""
    drawn = draw_slide(512, 384, shapes=[("rect", 64, 48, 300, 200), ("ellipse", 380, 260, 90, 70)], seed=5)
    path = write_slide(
        tmp_path_factory.mktemp("units_slide") / "small.tif", drawn, 0.25, compression="zlib", levels=2, tile=64
    )
    return path, pyramid(drawn.rgb, 2)


def expected_rgba(levels, x, y, level, w, h) -> np.ndarray:
    """openslide's answer for a region whose corner lies on a pixel of `level`: the level's pixels, opaque, and
    (0, 0, 0, 0) outside the slide."""
    ds = 2**level
    lx, ly = x // ds, y // ds
    pixels = levels[level]
    out = np.zeros((h, w, 4), np.uint8)
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + w, pixels.shape[1]), min(ly + h, pixels.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx, :3] = pixels[y0:y1, x0:x1]
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx, 3] = 255
    return out


@pytest.mark.parametrize("reader", READERS)
def test_read_region_inside_the_slide_is_opaque_and_agrees_with_read(small_slide, reader):
    path, levels = small_slide
    slide = open_slide(str(path), reader)
    try:
        assert slide.name == reader
        # (x, y) level-0, level, (w, h) at that level: tile-aligned, across tile seams, whole level, coarsest level.
        for (x, y), level, (w, h) in [
            ((0, 0), 0, (64, 64)),
            ((40, 30), 0, (100, 70)),
            ((0, 0), 1, (256, 192)),
            ((64, 32), 1, (90, 50)),
            ((100, 60), 2, (20, 12)),
        ]:
            img = slide.read_region((x, y), level, (w, h))
            assert img.mode == "RGBA" and img.size == (w, h)
            rgba = np.asarray(img)
            np.testing.assert_array_equal(rgba, expected_rgba(levels, x, y, level, w, h))
            np.testing.assert_array_equal(rgba[..., :3], slide.read(x, y, level, w, h))
    finally:
        slide.close()


@pytest.mark.parametrize("reader", READERS)
def test_read_region_outside_the_slide_is_transparent(small_slide, reader):
    path, levels = small_slide
    slide = open_slide(str(path), reader)
    try:
        for (x, y), level, (w, h) in [
            ((-16, -8), 0, (48, 40)),  # straddles the top-left corner
            ((480, 360), 0, (64, 40)),  # straddles the bottom-right corner
            ((-32, 300), 1, (40, 60)),  # left edge and bottom edge at level 1
            ((496, -8), 1, (30, 20)),  # right edge and top edge at level 1
            ((600, 500), 0, (16, 16)),
        ]:  # wholly outside
            rgba = np.asarray(slide.read_region((x, y), level, (w, h)))
            expected = expected_rgba(levels, x, y, level, w, h)
            assert (expected[..., 3] == 0).any()
            np.testing.assert_array_equal(rgba, expected)
    finally:
        slide.close()


@pytest.mark.parametrize("reader", READERS)
def test_read_region_edge_cases_follow_openslide(small_slide, reader):
    path, _ = small_slide
    slide = open_slide(str(path), reader)
    try:
        missing_level = slide.read_region((0, 0), slide.level_count, (8, 6))  # a level the slide does not have
        assert missing_level.mode == "RGBA" and missing_level.size == (8, 6)
        assert not np.asarray(missing_level).any()
        empty = slide.read_region((10, 10), 0, (0, 5))
        assert empty.mode == "RGBA" and empty.size == (0, 5)
        with pytest.raises(Exception, match="negative"):
            slide.read_region((0, 0), 0, (-1, 4))
    finally:
        slide.close()


def _open_fds(path) -> int:
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return count


@pytest.mark.parametrize("reader", READERS)
def test_with_closes_the_slide(small_slide, reader):
    path, levels = small_slide
    with open_slide(str(path), reader) as slide:
        assert isinstance(slide, SlideReader)
        np.testing.assert_array_equal(slide.read(0, 0, 0, 8, 8), levels[0][:8, :8])
    assert _open_fds(path) == 0
    with pytest.raises(Exception):  # noqa: B017 (each library raises its own type)
        slide.read(0, 0, 0, 8, 8)  # the library refuses a closed slide

    with pytest.raises(RuntimeError, match="inside"):  # an error inside the block closes it too
        with open_slide(str(path), reader) as slide:
            slide.read(0, 0, 0, 8, 8)
            raise RuntimeError("inside")
    assert _open_fds(path) == 0
    with pytest.raises(Exception):  # noqa: B017
        slide.read(0, 0, 0, 8, 8)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_tiffslide_holds_its_file_open_until_the_with_block_ends(small_slide):
    """The fd check above is meaningful: tiffslide keeps the file open while the slide is."""
    path, _ = small_slide
    with open_slide(str(path), "tiffslide"):
        assert _open_fds(path) >= 1
    assert _open_fds(path) == 0


# -- ShardWriter ----------------------------------------------------------------------------------------------------
class CountingOutput(OutputDir):
    """An OutputDir that counts shard writes (a second write of one unit would overwrite it unseen)."""

    def __init__(self, url):
        super().__init__(url)
        self.writes: list[str] = []

    def write_table(self, table, *names):
        self.writes.append(names[-1])
        super().write_table(table, *names)


def build_table(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table(
        {
            "row": pa.array(cols["row"], pa.int64()),
            "value": pa.array(cols["value"], pa.int64()),
            "status": pa.array([str(s) for s in cols["status"]], pa.string()),
        }
    )


def result_batch(unit, rows, status=None) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64)
    units = np.broadcast_to(np.asarray(unit, np.int32), rows.shape).copy()
    return {
        "unit": units,
        "row": rows,
        "value": rows * 10 + units,
        "status": np.array(status or ["ok"] * len(rows), dtype=object),
        "error_class": np.array(
            [None if s == "ok" else "corrupt" for s in (status or ["ok"] * len(rows))], dtype=object
        ),
    }


def shards(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".parquet")) if folder.exists() else []


def test_a_batch_delivered_twice_is_committed_once(tmp_path):
    out = CountingOutput(str(tmp_path))
    writer = ShardWriter(out, {0: 3}, build_table, {"run": "r1"})
    batch = result_batch(0, [0, 1, 2], ["ok", "error", "ok"])
    assert writer.add(batch) == [0]
    assert writer.add(result_batch(0, [0, 1, 2], ["ok", "error", "ok"])) == []  # Ray delivered it again
    assert out.writes == [shard_name(0)] and writer.committed == [0] and writer.pending == 0
    assert writer.counts == {"ok": 2, "error": 1, "duplicates_dropped": 3}
    assert writer.error_classes == {"corrupt": 1} and writer.rows_taken == 3
    assert pq.read_table(tmp_path / shard_name(0)).column("row").to_pylist() == [0, 1, 2]


def test_rows_repeated_before_the_unit_completes_are_dropped(tmp_path):
    out = CountingOutput(str(tmp_path))
    writer = ShardWriter(out, {2: 4}, build_table, {})
    assert writer.add(result_batch(2, [0, 1])) == []
    assert writer.add(result_batch(2, [1, 0, 2])) == []  # two retried rows and one new
    assert out.writes == [] and writer.rows_taken == 3
    assert writer.add(result_batch(2, [3])) == [2]
    assert pq.read_table(tmp_path / shard_name(2)).column("row").to_pylist() == [0, 1, 2, 3]
    assert writer.counts == {"ok": 4, "error": 0, "duplicates_dropped": 2}


def test_a_batch_for_an_unknown_unit_is_dropped_and_counted(tmp_path):
    out = CountingOutput(str(tmp_path))
    writer = ShardWriter(out, {0: 2}, build_table, {})
    mixed = {
        k: np.concatenate([a, b])
        for (k, a), b in zip(result_batch(7, [0, 1, 2]).items(), result_batch(0, [0, 1]).values())
    }
    assert writer.add(mixed) == [0]
    assert shards(tmp_path) == [shard_name(0)] and out.writes == [shard_name(0)]
    assert writer.counts == {"ok": 2, "error": 0, "duplicates_dropped": 3}
    assert writer.rows_taken == 2 and 7 not in writer.committed


@pytest.mark.parametrize("spilled", [False, True])
def test_a_unit_delivered_out_of_order_across_batches_is_committed_once_sorted_by_row(tmp_path, spilled):
    """In memory, or spilled to a local file (the run's way: the driver's memory does not grow with the unit)."""
    out = CountingOutput(str(tmp_path / "out"))
    spill = dict(spill_dir=str(tmp_path), first_rows={3: 0, 4: 0}) if spilled else {}
    writer = ShardWriter(out, {3: 5, 4: 1}, build_table, {"run_id": "abc"}, **spill)
    assert writer.add(result_batch(3, [4, 1])) == []
    assert writer.add(result_batch(3, [3, 4, 3])) == []  # 4 again, and 3 twice in one batch
    assert shards(tmp_path / "out") == []  # nothing until the unit is complete
    both = {
        k: np.concatenate([a, b]) for (k, a), b in zip(result_batch(3, [2, 0]).items(), result_batch(4, [0]).values())
    }
    assert sorted(writer.add(both)) == [3, 4]
    assert shards(tmp_path / "out") == [shard_name(3), shard_name(4)]
    table = pq.read_table(tmp_path / "out" / shard_name(3))
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4]  # sorted by row however they arrived, each once
    assert table.column("value").to_pylist() == [3, 13, 23, 33, 43]  # each row kept its own values
    assert "__row" not in table.column_names
    assert json.loads(table.schema.metadata[b"pipeline.provenance"]) == {"run_id": "abc"}
    assert writer.counts["duplicates_dropped"] == 2 and writer.counts["ok"] == 6 and writer.pending == 0
    assert not list(tmp_path.glob("unit-*"))  # spill files are gone once committed


def test_a_spilled_unit_larger_than_a_row_group_is_sorted_window_by_window(tmp_path, monkeypatch):
    import pipeline.write as write

    monkeypatch.setattr(write, "SHARD_ROW_GROUP", 7)
    out = OutputDir(str(tmp_path / "out"))
    writer = ShardWriter(out, {0: 30}, build_table, {}, spill_dir=str(tmp_path), first_rows={0: 100})
    order = np.random.default_rng(0).permutation(30) + 100
    for part in np.array_split(order, 6):
        writer.add(result_batch(0, part))
    shard = pq.ParquetFile(tmp_path / "out" / shard_name(0))
    assert shard.read().column("row").to_pylist() == list(range(100, 130))
    assert shard.metadata.num_row_groups == 5  # 30 rows in windows of 7


def test_a_spilled_unit_of_wide_rows_is_written_in_row_groups_sized_by_bytes(tmp_path, monkeypatch):
    """Wide rows (features of a big model, concept maps) make smaller row groups: the commit holds about
    SHARD_ROW_GROUP_BYTES of rows at a time, whatever the width; each window reads only the batches it overlaps."""
    import pipeline.write as write

    monkeypatch.setattr(write, "SHARD_ROW_GROUP_BYTES", 64 * 1024)

    def wide(cols):  # ~1 KiB a row: 64 KiB windows hold 64 rows
        return build_table(cols).append_column(
            "features",
            pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(cols["value"], 128).astype(np.float64)), 128),
        )

    out = OutputDir(str(tmp_path / "out"))
    writer = ShardWriter(out, {0: 300}, wide, {}, spill_dir=str(tmp_path), first_rows={0: 0})
    order = np.random.default_rng(1).permutation(300)
    added = [writer.add(result_batch(0, part)) for part in np.array_split(order, 30)]
    assert added == [[]] * 29 + [[0]]  # committed with its last row
    shard = pq.ParquetFile(tmp_path / "out" / shard_name(0))
    assert shard.metadata.num_row_groups == 5  # 300 rows in windows of 64
    assert max(shard.metadata.row_group(i).num_rows for i in range(5)) == 64
    table = shard.read()
    assert table.column("row").to_pylist() == list(range(300))
    assert table.column("features").to_pylist()[7] == [70.0] * 128  # each row kept its own values
    assert not list(tmp_path.glob("unit-*"))


def test_before_commit_raising_writes_no_shard(tmp_path):
    out = CountingOutput(str(tmp_path))
    calls = []

    def lease_lost():
        calls.append(1)
        raise UserError("another run holds OUTPUT")

    writer = ShardWriter(out, {0: 2}, build_table, {}, before_commit=lease_lost)
    assert writer.add(result_batch(0, [0])) == []
    assert calls == []  # only a complete unit asks
    with pytest.raises(UserError, match="another run"):
        writer.add(result_batch(0, [1]))
    assert calls == [1]
    assert out.writes == [] and list(tmp_path.iterdir()) == []  # no shard and no temp file
    assert writer.committed == [] and writer.counts["ok"] == 0 and writer.counts["error"] == 0


# -- check_identity -------------------------------------------------------------------------------------------------
IDENTITY = {"model": "/models/clip", "revision": None, "dtype": "float32", "prompt_set": "sha256:aaa"}


def test_identity_first_run_is_version_1(tmp_path):
    assert check_identity(OutputDir(str(tmp_path / "new")), IDENTITY, False) == 1
    assert check_identity(OutputDir(str(tmp_path / "new")), IDENTITY, True) == 1


def test_identity_unchanged_keeps_the_version(tmp_path):
    out = OutputDir(str(tmp_path))
    out.write_json({"identity": IDENTITY, "version": 3}, "_dataset.json")
    assert check_identity(out, dict(IDENTITY), False) == 3


def test_identity_changed_needs_new_version_and_names_the_keys(tmp_path):
    out = OutputDir(str(tmp_path))
    out.write_json({"identity": IDENTITY, "version": 3}, "_dataset.json")
    changed = {**IDENTITY, "dtype": "bfloat16", "prompt_set": "sha256:bbb", "features": "embedding"}
    with pytest.raises(UserError) as info:
        check_identity(out, changed, False)
    message = str(info.value)
    assert "different dtype, features, prompt_set (" in message
    assert "'float32' -> 'bfloat16'" in message and "None -> 'embedding'" in message
    assert "--new-version" in message
    assert "model:" not in message and "revision" not in message  # unchanged keys are not blamed
    assert check_identity(out, changed, True) == 4


# -- EncodeBatch: out of memory and per-image fallback --------------------------------------------------------------
N_IMAGES = 10


@pytest.fixture(scope="module")
def actor(clip_model, prompts_file):
    from pipeline.checkpoint import preprocess_spec, resolve_model
    from pipeline.encode import EncodeBatch
    from pipeline.prompts import load_prompts

    spec = resolve_model(str(clip_model), dtype="float32", device="cpu")
    return EncodeBatch(spec, preprocess_spec(spec), load_prompts(str(prompts_file)), micro_batch=8)


@pytest.fixture(scope="module")
def images(actor):
    """Noise images, and the same set with image 5 replaced by a flat grey one (the 'poisoned' image)."""
    shape = actor.encoder.preprocess.out_shape
    pixels = np.random.default_rng(0).integers(0, 200, size=(N_IMAGES, *shape), dtype=np.uint8)
    poisoned = pixels.copy()
    poisoned[5] = 128
    return pixels, poisoned


def encode_batch(pixels) -> dict[str, np.ndarray]:
    n = len(pixels)
    return {
        "uri": np.array([f"img{i}" for i in range(n)], dtype=object),
        "pixels": pixels.copy(),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }


@pytest.fixture(scope="module")
def reference(actor, images):
    """What an unfailing run gives, at micro-batch 8, for both image sets."""
    assert actor.micro_batch == 8
    return {name: actor(encode_batch(p)) for name, p in zip(("clean", "poisoned"), images)}


@pytest.fixture
def failing_model(actor, monkeypatch):
    """Wrap this actor's image forward: OOM above `limit` images, and `poison_error` for any batch holding a flat
    image; records every batch size the model was asked for. Restores the forward and micro-batch afterwards."""
    import torch

    real = actor.encoder._image_fn
    monkeypatch.setattr(actor, "micro_batch", 8)
    sizes: list[int] = []

    def install(limit=None, poison_error=None):
        def forward(*args, pixel_values, **kwargs):
            sizes.append(len(pixel_values))
            if limit is not None and len(pixel_values) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            flat = (pixel_values.flatten(2).std(dim=2).amax(dim=1) == 0).any()
            if poison_error is not None and bool(flat):
                raise poison_error
            return real(*args, pixel_values=pixel_values, **kwargs)

        monkeypatch.setattr(actor.encoder, "_image_fn", forward)
        return sizes

    return install


def assert_same_rows(out, ref, rows):
    np.testing.assert_allclose(
        out["image_features"][rows].astype(np.float32), ref["image_features"][rows].astype(np.float32), atol=2e-3
    )
    np.testing.assert_allclose(out["concept_logits"][rows], ref["concept_logits"][rows], atol=0.05)


def test_out_of_memory_halves_the_micro_batch_and_loses_nothing(actor, images, reference, failing_model):
    sizes = failing_model(limit=2)
    out = actor(encode_batch(images[0]))
    assert sizes == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 ran out of memory; halved to 2, all ten rows in twos
    assert actor.micro_batch == 2
    assert list(out["status"]) == ["ok"] * N_IMAGES and list(out["uri"]) == [f"img{i}" for i in range(N_IMAGES)]
    assert_same_rows(out, reference["clean"], slice(None))
    sizes.clear()
    actor(encode_batch(images[0]))
    assert sizes == [2] * 5  # the halved micro-batch is kept: no second round of out-of-memory


def test_an_image_out_of_memory_alone_becomes_an_error_row(actor, images, reference, failing_model):
    import torch

    sizes = failing_model(poison_error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"))
    out = actor(encode_batch(images[1]))
    assert sizes == [8, 4, 4, 2, 1, 1, 1, 1, 1, 1]  # halved to single images at the poisoned one (and kept)
    assert actor.micro_batch == 1
    assert len(out["status"]) == N_IMAGES
    others = [i for i in range(N_IMAGES) if i != 5]
    assert list(out["status"][others]) == ["ok"] * (N_IMAGES - 1)
    assert out["status"][5] == "error" and out["error_class"][5] == "model"
    assert "out of device memory" in out["error"][5]
    assert not out["image_features"][5].any() and not out["concept_logits"][5].any()
    assert_same_rows(out, reference["poisoned"], others)


def test_an_image_the_model_rejects_alone_becomes_an_error_row(actor, images, reference, failing_model):
    sizes = failing_model(poison_error=RuntimeError("expected a non-constant input"))
    out = actor(encode_batch(images[1]))
    assert sizes == [8, 1, 1, 1, 1, 1, 1, 1, 1, 2]  # the failed chunk image by image, then the rest as a batch
    assert actor.micro_batch == 8  # only out-of-memory shrinks the micro-batch
    others = [i for i in range(N_IMAGES) if i != 5]
    assert list(out["status"][others]) == ["ok"] * (N_IMAGES - 1)
    assert out["status"][5] == "error" and out["error_class"][5] == "model"
    assert out["error"][5] == "model failed on this image (RuntimeError: expected a non-constant input)"
    assert not out["image_features"][5].any() and not out["concept_logits"][5].any()
    assert_same_rows(out, reference["poisoned"], others)
