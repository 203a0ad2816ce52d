"""The decode stage: bytes -> RGB uint8 at the model's input size, exactly as the checkpoint's processor does it.

Real files written to disk, real processors loaded from the tiny model folders; no mocks.
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from transformers import AutoProcessor

from pipeline.decode import PreprocessSpec, decode_batch, decode_one, open_image, spec_from_image_processor
from pipeline.demo import make_photo
from pipeline.errors import UserError

BIG = 10**9  # a max_pixels no test image comes near


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def processors(clip_model, siglip_model, conceptclip_model):
    """The real processors of the three tiny checkpoints, as the pipeline loads them."""
    return {
        "clip": AutoProcessor.from_pretrained(clip_model),
        "siglip": AutoProcessor.from_pretrained(siglip_model),
        "conceptclip": AutoProcessor.from_pretrained(conceptclip_model, trust_remote_code=True),
    }


@pytest.fixture(scope="module")
def specs(processors):
    return {name: spec_from_image_processor(p.image_processor) for name, p in processors.items()}


@pytest.fixture(scope="module")
def squash(specs) -> PreprocessSpec:
    return specs["siglip"]


def normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, the way the spec says (what models.Encoder.pixel_values does)."""
    x = pixels.astype(np.float32)
    if spec.do_rescale:
        x = x * np.float32(spec.rescale_factor)
    if spec.do_normalize:
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x.transpose(2, 0, 1)


def reference(processor, path: Path) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0])


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def batch_of(paths) -> dict:
    return {"uri": np.array([str(p) for p in paths], dtype=object)}


def png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR declares width x height (8-bit RGB) with a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def exif_jpeg(path: Path, orientation: int) -> Path:
    """A 120x60 stored JPEG, grey with a red block in its stored top-left corner, and an EXIF orientation."""
    img = Image.new("RGB", (120, 60), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([0, 0, 39, 19], fill=(255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif)
    return path


def is_red(px) -> bool:
    r, g, b = (int(v) for v in px)
    return r > 220 and g < 40 and b < 40


def is_grey(px) -> bool:
    return all(abs(int(v) - 128) < 12 for v in px)


# ------------------------------------------------------------------------------------------------- exactness
# (name, width, height, format, exif orientation): landscape, portrait, square, odd, smaller than the 64 target.
EXACT_IMAGES = [
    ("landscape.jpg", 160, 90, "JPEG", None),
    ("portrait.jpg", 90, 160, "JPEG", None),
    ("square.png", 64, 64, "PNG", None),
    ("square_big.jpg", 200, 200, "JPEG", None),
    ("odd_portrait.png", 37, 101, "PNG", None),
    ("odd_landscape.jpg", 101, 37, "JPEG", None),
    ("nearly_square.png", 65, 63, "PNG", None),
    ("small.png", 30, 20, "PNG", None),
    ("small_portrait.jpg", 20, 45, "JPEG", None),
    ("one_pixel.png", 1, 1, "PNG", None),
    ("sliver.png", 300, 7, "PNG", None),
    ("rotated.jpg", 150, 80, "JPEG", 6),
]


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exact")
    rng = np.random.default_rng(7)
    for i, (name, w, h, fmt, orientation) in enumerate(EXACT_IMAGES):
        # Noise stresses the resampling filter; photo-like content is what JPEGs usually hold.
        img = noise(w, h, seed=i) if fmt == "PNG" or min(w, h) < 40 else make_photo(rng, w, h)
        kwargs = {"quality": 90} if fmt == "JPEG" else {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif
        img.save(folder / name, fmt, **kwargs)
    return folder


@pytest.mark.parametrize("model", ["clip", "siglip", "conceptclip"])
@pytest.mark.parametrize("name", [e[0] for e in EXACT_IMAGES])
def test_decode_matches_processor(model, name, processors, specs, exact_dir):
    spec = specs[model]
    path = exact_dir / name
    pixels, width, height = decode_one(path.read_bytes(), spec, BIG)
    assert pixels.dtype == np.uint8 and pixels.shape == spec.out_shape
    ref_img = ImageOps.exif_transpose(Image.open(path))
    assert (width, height) == ref_img.size
    expected = reference(processors[model], path)
    got = normalise(pixels, spec)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_specs_read_from_real_processors(specs, processors):
    clip, siglip, concept = specs["clip"], specs["siglip"], specs["conceptclip"]
    assert clip.mode == "shortest_edge" and clip.shortest_edge == 64 and (clip.height, clip.width) == (64, 64)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    for spec in (siglip, concept):
        assert spec.mode == "squash" and (spec.height, spec.width) == (64, 64)
        assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    for spec in (clip, siglip, concept):
        assert spec.resample == Image.Resampling.BICUBIC
        assert spec.do_rescale and spec.rescale_factor == pytest.approx(1 / 255)
        assert spec.out_shape == (64, 64, 3)


@pytest.mark.parametrize("size", [(120, 90), (90, 120), (37, 101), (30, 20), (1, 1), (7, 300)])
def test_custom_rectangular_configs_match_processor(size):
    """Non-square crop and squash targets, bilinear: still the processor's pixels."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    for proc in (
        CLIPImageProcessorPil(
            size={"shortest_edge": 50}, crop_size={"height": 32, "width": 48}, do_center_crop=True, resample=2
        ),
        SiglipImageProcessorPil(size={"height": 40, "width": 72}, resample=2),
    ):
        spec = spec_from_image_processor(proc)
        img = noise(*size, seed=3)
        pixels, _, _ = decode_one(encode(img, "PNG"), spec, BIG)
        expected = np.asarray(proc(img, return_tensors="np")["pixel_values"][0])
        np.testing.assert_allclose(normalise(pixels, spec), expected, rtol=0, atol=1e-5)


def test_nearest_resample_is_kept():
    from transformers import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": 40, "width": 40}, resample=0)
    spec = spec_from_image_processor(proc)
    assert spec.resample == Image.Resampling.NEAREST
    img = noise(90, 70, seed=5)
    pixels, _, _ = decode_one(encode(img, "PNG"), spec, BIG)
    expected = np.asarray(proc(img, return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(normalise(pixels, spec), expected, rtol=0, atol=1e-5)


def test_crop_larger_than_resized_image_pads_like_processor():
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 48, "width": 56}, do_center_crop=True, resample=3
    )
    spec = spec_from_image_processor(proc)
    img = noise(120, 90, seed=9)  # resized to 53x40: 3 columns and 8 rows of padding
    pixels, _, _ = decode_one(encode(img, "PNG"), spec, BIG)
    expected = np.asarray(proc(img, return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(normalise(pixels, spec), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ unusual but valid images
def test_cmyk_jpeg(specs):
    data = encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    for spec in specs.values():
        pixels, w, h = decode_one(data, spec, BIG)
        assert pixels.shape == spec.out_shape and (w, h) == (80, 60)
        assert is_red(pixels[32, 32])


def test_16bit_grayscale_png_scaled_to_8bit(squash):
    arr = np.zeros((64, 64), np.uint16)
    arr[:, :32] = 65535
    arr[:, 32:] = 32768
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    pixels, w, h = decode_one(data, squash, BIG)
    assert pixels.shape == (64, 64, 3) and (w, h) == (64, 64)
    np.testing.assert_array_equal(pixels[:, :28], 255)
    assert np.all(np.abs(pixels[:, 36:].astype(int) - 128) <= 1)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_dark_16bit_png_is_scaled_by_bit_depth_not_content(squash):
    arr = np.full((64, 64), 200, np.uint16)  # 200/65535: practically black
    arr[:, 32:] = 255
    pixels, _, _ = decode_one(encode(Image.fromarray(arr), "PNG"), squash, BIG)
    assert pixels.max() <= 1


def test_palette_png_without_transparency(specs):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(img).rectangle([32, 0, 63, 63], fill=1)
    data = encode(img, "PNG")
    pixels, _, _ = decode_one(data, specs["siglip"], BIG)
    assert tuple(pixels[32, 8]) == (255, 0, 0)
    assert tuple(pixels[32, 56]) == (0, 0, 255)
    assert decode_one(data, specs["clip"], BIG)[0].shape == (64, 64, 3)


def test_palette_png_with_transparency_composited_on_white(squash):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(img).rectangle([32, 0, 63, 63], fill=1)
    data = encode(img, "PNG", transparency=0)  # palette entry 0 (the red half) is transparent
    pixels, _, _ = decode_one(data, squash, BIG)
    assert tuple(pixels[32, 8]) == (255, 255, 255)
    assert tuple(pixels[32, 56]) == (0, 0, 255)


def test_rgba_png_transparent_areas_become_white(specs):
    arr = np.zeros((64, 64, 4), np.uint8)  # left half: fully transparent black
    arr[:, 32:] = (0, 255, 0, 255)  # right half: opaque green
    arr[:8, :8] = (255, 0, 0, 128)  # a half-transparent red corner
    data = encode(Image.fromarray(arr, "RGBA"), "PNG")
    pixels, _, _ = decode_one(data, specs["siglip"], BIG)
    assert tuple(pixels[32, 16]) == (255, 255, 255)
    assert tuple(pixels[32, 48]) == (0, 255, 0)
    r, g, b = (int(v) for v in pixels[3, 3])
    assert r == 255 and abs(g - 127) <= 2 and abs(b - 127) <= 2
    assert decode_one(data, specs["clip"], BIG)[0].shape == (64, 64, 3)


def test_la_png(squash):
    arr = np.zeros((64, 64, 2), np.uint8)  # black everywhere; transparent on the left, opaque on the right
    arr[:, 32:, 1] = 255
    pixels, _, _ = decode_one(encode(Image.fromarray(arr, "LA"), "PNG"), squash, BIG)
    assert tuple(pixels[32, 16]) == (255, 255, 255)
    assert tuple(pixels[32, 48]) == (0, 0, 0)


def test_bilevel_tiff(squash):
    img = Image.new("1", (64, 64), 0)
    ImageDraw.Draw(img).rectangle([32, 0, 63, 63], fill=1)
    pixels, w, h = decode_one(encode(img, "TIFF"), squash, BIG)
    assert (w, h) == (64, 64)
    assert tuple(pixels[32, 16]) == (0, 0, 0)
    assert tuple(pixels[32, 48]) == (255, 255, 255)


@pytest.mark.parametrize("fmt, kwargs", [("WEBP", {"lossless": True}), ("BMP", {})])
def test_webp_and_bmp_equal_png(fmt, kwargs, specs):
    img = noise(90, 70, seed=11)
    for spec in specs.values():
        got, w, h = decode_one(encode(img, fmt, **kwargs), spec, BIG)
        want, _, _ = decode_one(encode(img, "PNG"), spec, BIG)
        assert (w, h) == (90, 70)
        np.testing.assert_array_equal(got, want)


def test_animated_gif_uses_first_frame(squash):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels, _, _ = decode_one(data, squash, BIG)
    assert (pixels == np.array([255, 0, 0], np.uint8)).all()
    # Also after someone moved the file object to another frame before us: open_image seeks back.
    img = open_image(data, BIG)
    assert img.getpixel((10, 10)) == (255, 0, 0)


@pytest.mark.parametrize("orientation, corner", [(6, "top_right"), (8, "bottom_left")])
def test_exif_rotated_jpeg(orientation, corner, tmp_path, squash, specs):
    path = exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    pixels, w, h = decode_one(path.read_bytes(), squash, BIG)
    assert (w, h) == (60, 120)  # the rotated size, not the stored 120x60
    where = {
        "top_left": pixels[5, 5],
        "top_right": pixels[5, 58],
        "bottom_left": pixels[58, 5],
        "bottom_right": pixels[58, 58],
    }
    for name, px in where.items():
        assert is_red(px) if name == corner else is_grey(px), (name, px)
    out = decode_batch(batch_of([path]), specs["clip"], BIG)
    assert out["status"][0] == "ok" and (out["width"][0], out["height"][0]) == (60, 120)


def test_png_named_jpg(tmp_path, specs):
    img = noise(50, 80, seed=2)
    (tmp_path / "really_a_png.jpg").write_bytes(encode(img, "PNG"))
    (tmp_path / "real.png").write_bytes(encode(img, "PNG"))
    for spec in specs.values():
        out = decode_batch(batch_of([tmp_path / "really_a_png.jpg", tmp_path / "real.png"]), spec, BIG)
        assert list(out["status"]) == ["ok", "ok"]
        np.testing.assert_array_equal(out["pixels"][0], out["pixels"][1])


def test_names_with_spaces_and_non_ascii(tmp_path, squash):
    names = ["my photo 1.jpg", "naïve café ñ.png", "日本 語/画像 テスト.jpeg", "emoji 🙂.webp"]
    imgs = [noise(40 + 10 * i, 50, seed=i) for i in range(len(names))]
    paths = []
    for name, img in zip(names, imgs):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        img.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        paths.append(path)
    out = decode_batch(batch_of(paths), squash, BIG)
    assert list(out["status"]) == ["ok"] * len(names), out["error"]
    assert list(out["width"]) == [img.width for img in imgs] and list(out["height"]) == [50] * len(names)
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(out["pixels"][i], decode_one(path.read_bytes(), squash, BIG)[0])


# --------------------------------------------------------------------------------------------- broken inputs
@pytest.fixture()
def broken_dir(tmp_path) -> Path:
    good_jpeg = encode(make_photo(np.random.default_rng(0), 200, 150), "JPEG", quality=90)
    good_png = encode(noise(120, 100, seed=4), "PNG")
    files = {
        "good1.jpg": good_jpeg,
        "empty.jpg": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "truncated.png": good_png[: len(good_png) // 2],
        "text.jpg": b"this is not an image, just some text\n" * 10,
        "huge_header.png": png_with_header(100_000, 100_000),
        "good2.png": good_png,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_broken_inputs_become_error_rows(broken_dir, specs):
    names = [
        "good1.jpg",
        "empty.jpg",
        "truncated.jpg",
        "truncated.png",
        "text.jpg",
        "huge_header.png",
        "missing.jpg",
        "good2.png",
    ]
    spec = specs["clip"]
    batch = batch_of([broken_dir / n for n in names])
    batch["extra"] = np.arange(len(names))  # other columns ride along untouched
    out = decode_batch(batch, spec, 178_956_970)
    status = dict(zip(names, out["status"]))
    error = dict(zip(names, out["error"]))
    assert status["good1.jpg"] == status["good2.png"] == "ok"
    assert error["good1.jpg"] is None and error["good2.png"] is None
    for name in names[1:-1]:
        assert status[name] == "error", name
        assert isinstance(error[name], str) and error[name].strip(), name
    assert "empty" in error["empty.jpg"]
    assert "decompression-bomb limit" in error["huge_header.png"]
    assert "not found" in error["missing.jpg"]
    assert "truncated" in error["truncated.jpg"].lower() or "decode" in error["truncated.jpg"]
    # Good rows: correct pixels and sizes; error rows: zeros.
    for i, name in enumerate(names):
        if status[name] == "ok":
            want, w, h = decode_one((broken_dir / name).read_bytes(), spec, BIG)
            np.testing.assert_array_equal(out["pixels"][i], want)
            assert (out["width"][i], out["height"][i]) == (w, h)
        else:
            assert not out["pixels"][i].any() and out["width"][i] == 0 and out["height"][i] == 0
    assert out["pixels"].shape == (len(names), 64, 64, 3) and out["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(out["extra"], np.arange(len(names)))
    assert list(out["uri"]) == list(batch["uri"])
    assert out["decode_s"].shape == (len(names),)


def test_small_max_pixels_is_a_decompression_bomb(tmp_path, squash):
    noise(100, 100).save(tmp_path / "small.png")
    noise(40, 40).save(tmp_path / "tiny.png")
    out = decode_batch(batch_of([tmp_path / "small.png", tmp_path / "tiny.png"]), squash, max_pixels=5000)
    assert list(out["status"]) == ["error", "ok"]
    assert "decompression-bomb limit" in out["error"][0] and "5000" in out["error"][0]
    with pytest.raises(ValueError, match="decompression-bomb"):
        decode_one((tmp_path / "small.png").read_bytes(), squash, 5000)


def test_decode_batch_never_raises_on_garbage(tmp_path, squash):
    """Every single-byte prefix and random bytes: error rows, no exceptions."""
    good = encode(noise(30, 30), "PNG")
    paths = []
    for i, data in enumerate(
        [
            good[:1],
            good[:8],
            good[:40],
            bytes(range(256)),
            b"\xff\xd8\xff" + b"\x00" * 50,
            b"GIF89a" + b"\x00" * 10,
            b"BM" + b"\x00" * 60,
            b"RIFF\x00\x00\x00\x00WEBP",
        ]
    ):
        path = tmp_path / f"garbage{i}.png"
        path.write_bytes(data)
        paths.append(path)
    paths.append(tmp_path)  # a folder where a file should be
    out = decode_batch(batch_of(paths), squash, BIG)
    assert list(out["status"]) == ["error"] * len(paths)
    assert all(isinstance(e, str) and e for e in out["error"])


# ------------------------------------------------------------------------------------ unsupported processors
@pytest.mark.parametrize(
    "model, changes",
    [
        ("siglip", {"do_resize": False}),
        ("clip", {"do_resize": False}),
        ("clip", {"do_center_crop": False}),  # shortest edge without a crop: no fixed size
        ("siglip", {"do_center_crop": True, "crop_size": {"height": 32, "width": 32}}),  # squash then crop
    ],
)
def test_unsupported_processor_config_is_user_error(model, changes, processors):
    ip = copy.deepcopy(processors[model].image_processor)
    for key, value in changes.items():
        setattr(ip, key, value)
    with pytest.raises(UserError, match=type(ip).__name__):
        spec_from_image_processor(ip)


def test_fast_decode_keeps_sizes_and_stays_close_to_exact(tmp_path):
    from pipeline.demo import make_images

    spec = PreprocessSpec("squash", 64, 64)
    for path in make_images(tmp_path, 4, seed=2, sizes=((800, 600), (1024, 768))):
        data = path.read_bytes()
        exact, w, h = decode_one(data, spec, BIG)
        fast, fw, fh = decode_one(data, spec, BIG, fast=True)
        assert (fw, fh) == (w, h) == Image.open(path).size
        assert fast.shape == exact.shape == (64, 64, 3)
        diff = np.abs(fast.astype(int) - exact.astype(int))
        assert diff.mean() < 3 and 0 < diff.max()  # approximate: close, not identical
