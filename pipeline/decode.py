"""CPU stage: bytes -> RGB uint8 at the model's input size, exactly as the checkpoint's processor would resize it.

Rescaling and normalisation are left to the model's device (see `models.py`): uint8 travels all the way there.
Every row gets a status; a file that cannot be decoded becomes an error row with a reason, never an exception.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ENVIRONMENT_ERROR_CLASSES, InputError, UserError, first_line, read_error_class
from .storage import read_bytes

# Keep truncated files as errors (PIL's default); never let PIL decide bomb limits on its own.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class PreprocessSpec:
    """What the checkpoint's image processor does, in the order it does it."""

    mode: str  # "squash" (resize to height x width) or "shortest_edge" (resize shortest edge, then centre crop)
    height: int  # squash target, or crop height
    width: int
    shortest_edge: int = 0
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crops: int = 0  # the multi-crop (HD) recipe instead of the processor's resize: at most this many crops (hd_crops)

    @property
    def view_shape(self) -> tuple[int, int, int]:
        """One image the model takes: the processor's output, or one crop."""
        return (self.height, self.width, 3)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One row's pixels: one view, or `crops` crops (those past the image's grid left empty)."""
        return (self.crops, *self.view_shape) if self.crops else self.view_shape


def _size_field(size, name):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(name)
    return getattr(size, name, None)


def spec_from_image_processor(ip, name: str | None = None) -> PreprocessSpec:
    """Read a transformers image processor (or its saved configuration, as attributes) into a PreprocessSpec."""
    name = name or type(ip).__name__
    size = getattr(ip, "size", None)
    resample = getattr(ip, "resample", None)
    resample = int(Image.Resampling.BICUBIC if resample is None else resample)  # 0 is NEAREST, not "unset"
    common = dict(
        resample=resample,
        do_rescale=bool(getattr(ip, "do_rescale", True)),
        rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
        do_normalize=bool(getattr(ip, "do_normalize", True)),
        mean=_triple(getattr(ip, "image_mean", None) or (0.0, 0.0, 0.0)),
        std=_triple(getattr(ip, "image_std", None) or (1.0, 1.0, 1.0)),
    )
    if not getattr(ip, "do_resize", True):
        raise UserError(f"image processor {name} does not resize; the pipeline needs a fixed input size")
    h, w, short = _size_field(size, "height"), _size_field(size, "width"), _size_field(size, "shortest_edge")
    crop = getattr(ip, "crop_size", None)
    do_crop = bool(getattr(ip, "do_center_crop", False))
    if short and not _size_field(size, "longest_edge"):
        if not do_crop or not crop:
            raise UserError(
                f"image processor {name} resizes the shortest edge without a centre crop; "
                "the pipeline needs a fixed input size"
            )
        return PreprocessSpec(
            "shortest_edge",
            int(_size_field(crop, "height")),
            int(_size_field(crop, "width")),
            shortest_edge=int(short),
            **common,
        )
    if h and w:
        if do_crop and crop:
            raise UserError(f"image processor {name}: resize to {h}x{w} followed by a crop is not supported")
        return PreprocessSpec("squash", int(h), int(w), **common)
    raise UserError(f"image processor {name} has a size setting the pipeline does not support: {size}")


def _triple(values) -> tuple[float, float, float]:
    vals = [float(v) for v in (values if hasattr(values, "__len__") else [values])]
    if len(vals) == 1:
        vals = vals * 3
    return (vals[0], vals[1], vals[2])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha on white, 16-bit scaled, palette and bilevel expanded."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("P", "PA"):
        img = img.convert("RGBA") if ("transparency" in img.info or mode == "PA") else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            arr = np.nan_to_num(arr.astype(np.float64))
            arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        elif mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr.astype(np.float64) / 257.0  # 16-bit full range -> 8-bit (by bit depth, not content)
        arr8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if arr8.ndim == 2:
            arr8 = np.repeat(arr8[:, :, None], 3, axis=2)
        return Image.fromarray(arr8[:, :, :3], "RGB")
    return img.convert("RGB")


def resize_for_model(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize (and crop) an RGB image as the processor does; returns HxWx3 uint8."""
    if spec.mode == "squash":
        out = img.resize((spec.width, spec.height), resample=spec.resample)
        return np.asarray(out, dtype=np.uint8)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    arr = np.asarray(img.resize((new_w, new_h), resample=spec.resample), dtype=np.uint8)
    return centre_crop(arr, spec.height, spec.width)


def hd_layout(width: int, height: int, crops: int, side: int) -> tuple[int, int, int, bool]:
    """Phi-3-vision's HD transform, as sizes: a portrait image is transposed; the scale s is the largest integer with
    s * ceil(s / aspect) <= crops (aspect = width / height >= 1); the image is resized to s * side wide and
    int(s * side / aspect) high, then padded to a multiple of side in height. Returns (resized width, resized height,
    padded height) of the landscape image, and whether it was transposed."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= crops:
        scale += 1
    new_width = int((scale - 1) * side)
    new_height = int(new_width / ratio)  # the recipe's own arithmetic, float division included
    return new_width, new_height, math.ceil(new_height / side) * side, transposed


def hd_crops(img: Image.Image, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """The multi-crop (HD) recipe's crops of an RGB image: transposed if portrait, resized as torchvision resizes a PIL
    image (PIL's antialiased bilinear), padded white top and bottom (the extra row at the bottom), transposed back,
    cut into its grid of side x side crops, row-major. Returns the crops in a [spec.crops, side, side, 3] block (the
    rest empty) and the grid (rows, columns)."""
    side = spec.height
    new_width, new_height, padded_height, transposed = hd_layout(*img.size, spec.crops, side)
    if new_height < 1:
        raise InputError(
            f"image is {img.width}x{img.height}, too elongated for --crops hd:{spec.crops}: its short side would be "
            "resized to 0 pixels",
            "unsupported",
        )
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    top = (padded_height - new_height) // 2
    padded = np.full((padded_height, new_width, 3), 255, dtype=np.uint8)
    padded[top : top + new_height] = np.asarray(img.resize((new_width, new_height), Image.Resampling.BILINEAR))
    if transposed:
        padded = padded.transpose(1, 0, 2)
    rows, cols = padded.shape[0] // side, padded.shape[1] // side
    block = np.zeros(spec.out_shape, dtype=np.uint8)
    block[: rows * cols] = padded.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4).reshape(-1, side, side, 3)
    return block, (rows, cols)


def centre_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < height or w < width:  # pad with zeros around the image, the larger half first, as transformers does
        ph, pw = max(height, h), max(width, w)
        padded = np.zeros((ph, pw, 3), dtype=arr.dtype)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, ph, pw
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


def open_image(data: bytes, max_pixels: int, draft_px: int = 0) -> Image.Image:
    """Decode bytes to an RGB image with EXIF orientation applied; raises ValueError with a reason.

    draft_px > 0 lets a JPEG decode at a reduced DCT scale, no smaller than draft_px on either side (fast, and
    no longer exactly what the processor sees). `img.info["original_size"]` keeps the full size either way.
    """
    if not data:
        raise InputError("empty file", "empty")
    Image.MAX_IMAGE_PIXELS = None  # our own limit applies, checked from the header before decoding
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(f"decompression bomb: {exc}", "too_large") from None
    except Exception as exc:  # PIL raises many types for unknown formats
        raise InputError(f"not a readable image ({type(exc).__name__}: {first_line(exc)})", "unsupported") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(
            f"image is {w}x{h} = {w * h} pixels, above the decompression-bomb limit of "
            f"{max_pixels} (raise max_image_pixels if it is genuine)",
            "too_large",
        )
    try:
        img.seek(0)  # first frame of animations
        if draft_px and img.format == "JPEG":
            img.draft(None, (draft_px, draft_px))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            transposed = ImageOps.exif_transpose(img)
        if transposed.size != img.size:  # rotated by 90 degrees
            w, h = h, w
        img = to_rgb(transposed)
        img.info["original_size"] = (w, h)
        return img
    except Exception as exc:
        reason = f"cannot decode {img.format or 'image'} ({type(exc).__name__}: {first_line(exc)})"
        raise InputError(reason, "corrupt") from None


def draft_px(spec: PreprocessSpec) -> int:
    """For fast decoding: keep at least twice the model's input on every side, so the resize still antialiases (with
    crops, twice the widest the HD resize can make it)."""
    return 2 * max(spec.height, spec.width, spec.shortest_edge) * max(1, spec.crops)


def decode_one(data: bytes, spec: PreprocessSpec, max_pixels: int, fast: bool = False) -> tuple[np.ndarray, int, int]:
    """Bytes -> (pixels HxWx3 uint8, original width, original height). Raises ValueError with a reason."""
    pixels, _, width, height = decode_views(data, spec, max_pixels, fast)
    return pixels, width, height


def decode_views(
    data: bytes, spec: PreprocessSpec, max_pixels: int, fast: bool = False
) -> tuple[np.ndarray, tuple[int, int], int, int]:
    """Bytes -> (pixels: spec.out_shape uint8, the crop grid (rows, columns; (1, 1) for one view), original width,
    original height). Raises ValueError with a reason."""
    img = open_image(data, max_pixels, draft_px(spec) if fast else 0)
    width, height = img.info["original_size"]
    try:
        if spec.crops:
            return (*hd_crops(img, spec), width, height)
        return resize_for_model(img, spec), (1, 1), width, height
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot resize ({type(exc).__name__}: {first_line(exc)})", "corrupt") from None


# Environment faults (permission denied, storage errors that outlasted the storage layer's own retries) are read
# again after these pauses before the row is given up; the driver then stops the run rather than commit it.
ENVIRONMENT_RETRY_DELAYS_S = (0.5, 2.0)


def read_input(uri: str, storage_options: dict | None = None) -> bytes:
    """An input's bytes; environment faults are retried here (a vanished file is not: it is the input's fault)."""
    for delay in (*ENVIRONMENT_RETRY_DELAYS_S, None):
        try:
            return read_bytes(uri, storage_options)
        except Exception as exc:  # storage clients raise their own types too (botocore's connection errors)
            if delay is None or read_error_class(exc) not in ENVIRONMENT_ERROR_CLASSES:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def decode_batch(
    batch: dict[str, np.ndarray],
    spec: PreprocessSpec,
    max_pixels: int,
    storage_options: dict | None = None,
    fast: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: rows with `uri` -> the same rows plus pixels, status, error, error_class, width,
    height (and with crops, crop_grid: [rows, columns] per row, [0, 0] on error rows)."""
    t = time.perf_counter()
    uris = batch["uri"]
    n = len(uris)
    pixels = np.zeros((n, *spec.out_shape), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    error_class = np.full(n, None, dtype=object)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    grid = np.zeros((n, 2), dtype=np.int32)
    read_s = 0.0
    fault = None  # after an environment fault that outlasted the retries, the rest of the batch is not tried
    for i, uri in enumerate(uris):
        if fault is not None:
            status[i], error[i], error_class[i] = (
                "error",
                f"not read after an earlier fault in its batch: {fault[0]}",
                fault[1],
            )
            continue
        try:
            t_read = time.perf_counter()
            data = read_input(str(uri), storage_options)
            read_s += time.perf_counter() - t_read
            pixels[i], grid[i], width[i], height[i] = decode_views(data, spec, max_pixels, fast)
        except Exception as exc:  # one input's failure (or the storage's, classed so) must not sink its batch
            status[i], error[i], error_class[i] = "error", _reason(exc), read_error_class(exc)
            if error_class[i] in ENVIRONMENT_ERROR_CLASSES:
                fault = (error[i], error_class[i])
    out = dict(batch)
    per_row = max(n, 1)
    out.update(
        pixels=pixels,
        status=status,
        error=error,
        error_class=error_class,
        width=width,
        height=height,
        read_s=np.full(n, read_s / per_row),
        decode_s=np.full(n, (time.perf_counter() - t - read_s) / per_row),
    )
    if spec.crops:
        out["crop_grid"] = grid
    return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found (removed after listing?)"
    text = first_line(exc, 1000) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"
