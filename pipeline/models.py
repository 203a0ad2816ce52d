"""The loaded model: the `Encoder` encodes prompt sets once and batches of uint8 images, on any family (what a family
computes lives in pipeline/families/; this module keeps the device, the pixel buffers, the micro-batches and the logit
formula)."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import FeatureSpec, ModelSpec, load_processor
from .decode import PreprocessSpec
from .errors import UserError
from .prompts import PromptSet, ensemble

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Test-only (docs/cluster.md): a model actor placed on a GPU loads the model on the CPU instead, so GPU placement is
# tested on clusters whose nodes declare fake GPUs (`ray start --num-gpus 2`); the run record says so (device_override).
CUDA_AS_CPU_ENV = "FEATURIZE_TEST_CUDA_AS_CPU"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and os.environ.get(CUDA_AS_CPU_ENV) == "1":
        return "cpu"
    return device


def device_override(placed: str, ran: str) -> str | None:
    """The run record's note when the actors were placed on one device and ran the model on another (only the
    test-only switch does that), else None."""
    if ran.split(":")[0] == placed:
        return None
    return f"placed on {placed}, the model ran on {ran} ({CUDA_AS_CPU_ENV}=1: a test-only switch)"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return getattr(torch, dtype)


# A GPU batch is encoded in pieces of this many rows (Encoder.encode_images): the host copies of one piece overlap
# the device's work on the one before. 128 images at 384 px are 93k patch tokens of so400m per piece, enough to keep
# an H200 as busy as the whole 256-image batch does.
GPU_PIPELINE_ROWS = 128


class Encoder:
    """A loaded model: encode prompt sets once, then batches of uint8 images; compute logits. What the model computes
    comes from its family (pipeline/families/); this class keeps the device, the pixel buffers and the batching."""

    def __init__(self, spec: ModelSpec, preprocess: PreprocessSpec, compile: bool = False):
        import torch

        self.spec = spec
        self.family = spec.family
        self.preprocess = preprocess
        self.device = torch.device(pick_device(spec.device))
        self.dtype = pick_dtype(spec.dtype, self.device.type)
        self.processor = load_processor(spec)
        self.model = self._load_model()
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.logit_scale, self.logit_bias = 1.0, 0.0

        def image_fn(pixel_values):
            return self.family.image_embedding(self.model, pixel_values)

        self._image_fn = torch.compile(image_fn, dynamic=True) if compile else image_fn
        # rows per piece of a batch on a GPU (see encode_images); 0 = the whole batch at once (CPU)
        self.pipeline_rows = GPU_PIPELINE_ROWS if self.device.type == "cuda" else 0

    def _load_model(self):
        import torch

        spec = self.spec
        model = self.family.load(spec.model, spec.revision, spec.token.get(), self.dtype)
        model.to(self.device).eval()
        torch.set_grad_enabled(False)
        return model

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    # -- images -------------------------------------------------------------------------------------------------
    def pixel_values(self, pixels) -> torch.Tensor:
        """uint8 [B,H,W,3] (numpy or tensor) -> normalised [B,3,H,W] in the model dtype, on the device."""
        return self._normalised(pixels).to(self.dtype)

    def _normalised(self, pixels) -> torch.Tensor:
        """pixel_values in float32 (a view of the encoder's pixel buffer: valid until the next call)."""
        import torch

        x = torch.as_tensor(pixels)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # (x * rescale - mean) / std = x * (rescale / std) - mean / std, computed channel-last in a float32 buffer
        # the encoder keeps (no fresh tensor per batch), each image row seen as one W*3-long vector with the
        # per-channel factors repeated along it: the same arithmetic as a per-channel broadcast, but one the CPU
        # vectorises. The permuted view keeps channel-last strides, which suit the patch convolution.
        buffer = self._pixel_buffer(x.shape)
        buffer.copy_(x)
        batch, height, width, channels = buffer.shape
        scale, shift = self.pixel_affine_rows(width)
        rows = buffer.view(batch, height, width * channels)
        rows.mul_(scale)
        if shift is not None:
            rows.add_(shift)
        return buffer.permute(0, 3, 1, 2)

    def _pixel_buffer(self, shape) -> torch.Tensor:
        """A float32 tensor of `shape` (B, H, W, 3) on the device, reused from call to call (the first rows of a
        larger one for a smaller batch). What pixel_values returns is only valid until its next call."""
        import torch

        held = getattr(self, "_pixels", None)
        if held is None or held.shape[1:] != shape[1:] or held.shape[0] < shape[0]:
            held = self._pixels = torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
        return held[: shape[0]]

    def pixel_affine_rows(self, width: int):
        """(scale, shift) folding rescale and normalisation together, per channel and repeated `width` times: the
        factors for one channel-last row of pixels [R, G, B, R, G, B, ...]; shift is None without normalisation."""
        import torch

        held = getattr(self, "_affine_rows", None)
        if held is None or held[0] != width:
            rescale = self.preprocess.rescale_factor if self.preprocess.do_rescale else 1.0
            mean = self.mean.view(3) if self.preprocess.do_normalize else torch.zeros(3, device=self.device)
            std = self.std.view(3) if self.preprocess.do_normalize else torch.ones(3, device=self.device)
            scale = (rescale / std).to(torch.float32).repeat(width)
            shift = (-mean / std).to(torch.float32).repeat(width) if self.preprocess.do_normalize else None
            held = self._affine_rows = (width, scale, shift)
        return held[1], held[2]

    def _dummy_pixels(self) -> torch.Tensor:
        """One black image, normalised: for documented forwards that want an image beside the text."""
        return self.pixel_values(np.zeros((1, *self.preprocess.view_shape), dtype=np.uint8))

    def encode_images(self, pixels) -> np.ndarray:
        """uint8 [B,H,W,3] -> L2-normalised image features [B,D] float32 (see encode_embeddings)."""
        return self._encode_pixels(pixels, normalize=True)

    def encode_embeddings(self, pixels) -> np.ndarray:
        """uint8 [B,H,W,3] -> the projected image embeddings [B,D] float32, not normalised (ConceptCLIP's
        `encode_image(normalize=False)`, as its whole-slide recipe uses them)."""
        return self._encode_pixels(pixels, normalize=False)

    def _encode_pixels(self, pixels, normalize: bool) -> np.ndarray:
        """The image embeddings of a batch, normalised or not.

        On a GPU the batch goes through in pieces of `pipeline_rows`, all queued before the one copy back: the host
        copies (into pinned memory, then to the device) of a piece overlap the device's work on the one before,
        instead of leaving the device idle while the whole batch is copied (pieces run in order on one stream, so
        reusing the pixel buffer between them is safe)."""
        import torch

        step = self.pipeline_rows or max(1, len(pixels))
        starts = range(0, len(pixels), step) or [0]  # an empty batch goes through as it is
        with torch.inference_mode():
            pieces = [self._image_features(pixels[start : start + step], normalize) for start in starts]
            features = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return features.cpu().numpy()

    def _image_features(self, pixels, normalize: bool = True) -> torch.Tensor:
        import torch

        embedding = self._image_fn(pixel_values=self.pixel_values(pixels)).float()
        return torch.nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    def encode_hidden(self, pixels, features: FeatureSpec) -> np.ndarray:
        """uint8 [B,H,W,3] -> the image tower's `hidden_states[layer]`, pooled (and merged 2x2), flattened [B, F]
        float32, as the model returns them (not normalised)."""
        import torch

        with torch.inference_mode():
            views = self._hidden_views(self.pixel_values(pixels), features)
        return views.reshape(len(views), -1).cpu().numpy()

    def _hidden_views(self, pixel_values, features: FeatureSpec) -> torch.Tensor:
        """Normalised views [V,3,H,W] -> their hidden_states[layer] pooled as features.pool (and merged), float32."""
        tower = self.family.image_tower(self.model)
        if tower is None:
            raise UserError(f"model {self.spec.model} exposes no image tower (vision_model) for --features hidden")
        has_cls = self.family.has_class_token(tower.config)
        states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        h = states[features.layer].float()
        patches = h[:, 1:] if has_cls else h
        pooled = {
            "cls": lambda: h[:, 0],
            "mean": lambda: patches.mean(dim=1),
            "patch": lambda: patches,
            "cls_patch": lambda: h,
        }[features.pool]()
        return merge_2x2(pooled) if features.merge else pooled

    def encode_crops(self, pixels, grids, features: FeatureSpec) -> np.ndarray:
        """The multi-crop (HD) recipe's tower features: uint8 crops [B,N,S,S,3] (a row's first rows x columns used)
        with each row's grid [B,2] -> per row the views [global, crop 1, ...] pooled as `encode_hidden` pools one
        image, zero-padded to 1 + N views and flattened, float32 [B, (1 + N) * T * D]. The global view is the padded
        image (its crops laid out on their grid), normalised, resized to S x S by bicubic interpolation without
        antialiasing, as the recipe resizes its normalised tensor (torch's interpolate)."""
        import torch

        grids = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
        counts = grids.prod(axis=1)
        rows, crops, side = len(pixels), pixels.shape[1], pixels.shape[2]
        with torch.inference_mode():
            tiles = self._normalised(np.concatenate([pixels[i, : counts[i]] for i in range(rows)]))
            views, start = [], 0
            for (grid_rows, grid_cols), count in zip(grids.tolist(), counts.tolist()):
                image = tiles[start : start + count].reshape(grid_rows, grid_cols, 3, side, side)
                image = image.permute(2, 0, 3, 1, 4).reshape(1, 3, grid_rows * side, grid_cols * side)
                views.append(torch.nn.functional.interpolate(image, size=(side, side), mode="bicubic"))
                start += count
            tokens = self._hidden_views(torch.cat([*views, tiles]).to(self.dtype), features)  # globals, then crops
            out = torch.zeros((rows, 1 + crops, *tokens.shape[1:]), dtype=torch.float32, device=tokens.device)
            present = torch.arange(crops) < torch.as_tensor(counts)[:, None]  # [B, N]: the crops each row has
            out[:, 0] = tokens[:rows]
            out[:, 1:][present.to(out.device)] = tokens[rows:]
        return out.reshape(rows, -1).cpu().numpy()

    # -- prompts ------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompt_set: PromptSet) -> np.ndarray:
        """Ensembled, L2-normalised text embeddings [K,D] float32; also reads the model's logit scale and bias."""
        prompts = prompt_set.all_prompts
        chunks = [self._encode_text(prompts[start : start + 256]) for start in range(0, len(prompts), 256)]
        return ensemble(np.concatenate(chunks), prompt_set.counts)

    def _encode_text(self, prompts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features, self.logit_scale, self.logit_bias = self.family.text_embedding(
                self.model, self.tokenizer, prompts, self.device, self._dummy_pixels
            )
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    # -- scores -------------------------------------------------------------------------------------------------
    def logits(self, image_features: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """The model's own logit formula, in float32: scale * cos + bias."""
        cos = image_features.astype(np.float32) @ text_embeddings.astype(np.float32).T
        return (self.logit_scale * cos + self.logit_bias).astype(np.float32)

    # -- patch-level concept maps (ConceptCLIP's concept head) --------------------------------------------------
    def concept_embeddings(self, prompt_set: PromptSet) -> np.ndarray:
        """Per concept, the mean of `text_proj(tokens)` over its name's word pieces, L2-normalised [K,D] float32;
        also reads the concept head's scale and bias from the documented forward."""
        import torch

        if not self.family.concept_head or not hasattr(self.model, "image_proj"):
            raise UserError(
                f"model {self.spec.model} has no ConceptCLIP concept head (image_proj / text_proj); "
                "concept maps need one"
            )
        with torch.inference_mode():
            tokens, words, self.concept_logit_scale, self.concept_logit_bias = self.family.concept_tokens(
                self.model, self.tokenizer, prompt_set.names, self.device, self._dummy_pixels
            )
        tokens = tokens.float().cpu()
        mean = (tokens * words).sum(dim=1) / words.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()

    def encode_images_with_maps(
        self, pixels, concept_embeddings: np.ndarray, normalize: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,H,W,3] -> (image features [B,D] as `encode_images` gives, or as `encode_embeddings` gives when not
        normalize; local concept scores [B,K,P,P]): concept_logit_scale * cos(image_proj(patch token), concept) +
        concept_logit_bias on the P x P patch grid."""
        import torch

        with torch.inference_mode():
            pooled, projected = self.family.patch_tokens(self.model, self.pixel_values(pixels))
            patches = torch.nn.functional.normalize(projected.float(), dim=-1)
            side = int(round(patches.shape[1] ** 0.5))
            if side * side != patches.shape[1]:  # a class token ahead of the patch grid
                patches, side = patches[:, 1:], int(round((patches.shape[1] - 1) ** 0.5))
            concepts = torch.as_tensor(concept_embeddings, dtype=torch.float32, device=patches.device)
            scores = self.concept_logit_scale * patches @ concepts.T + self.concept_logit_bias  # [B, P*P, K]
            maps = scores.transpose(1, 2).reshape(len(scores), len(concepts), side, side)
            features = torch.nn.functional.normalize(pooled.float(), dim=-1) if normalize else pooled.float()
        return features.cpu().numpy(), maps.cpu().numpy()


def merge_2x2(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens [V, G*G, D] of a G x G grid (row-major) -> [V, (G/2)^2, 4D]: each 2x2 block of neighbours as one
    token, [top-left, top-right, bottom-left, bottom-right] end to end, as Phi-3-vision merges them before its
    projection."""
    views, count, width = tokens.shape
    half = math.isqrt(count) // 2
    blocks = tokens.reshape(views, half, 2, half, 2, width).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(views, half * half, 4 * width)


def micro_batch_for_memory(encoder: Encoder, limit: int, headroom: float = 0.7) -> int:
    """On CUDA: the largest power-of-two batch whose activations fit in `headroom` of the free device memory,
    measured with a probe batch (out-of-memory later still halves it)."""
    import torch

    if encoder.device.type != "cuda":
        return limit
    probe = 4
    pixels = np.zeros((probe, *encoder.preprocess.view_shape), dtype=np.uint8)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    encoder.encode_images(pixels)
    per_image = max(1, (torch.cuda.max_memory_allocated() - base) / probe)
    free = torch.cuda.mem_get_info()[0]
    fits = int(headroom * free / per_image)
    size = 1
    while size * 2 <= min(fits, limit):
        size *= 2
    return size
