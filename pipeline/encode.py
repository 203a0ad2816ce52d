"""GPU (or CPU) stage: the Ray Data actor that holds the model.

Thin on purpose: it loads the model once, encodes the prompt set once, and maps batches of uint8 pixels to
image features and concept logits. Out-of-memory halves the micro-batch and retries; an image the model still
cannot take becomes an error row, so no row is ever lost.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from .board import ActorStart, PromptEmbeddings
from .checkpoint import FeatureSpec, ModelSpec, quiet_libraries, view_shape
from .decode import PreprocessSpec
from .errors import first_line, is_device_error
from .models import Encoder, micro_batch_for_memory
from .prompts import PromptSet

log = logging.getLogger(__name__)


class StartPhases:
    """Seconds of each step of a model actor's start, in order (the run record's stages.actor_start)."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self.last, 3)
        self.last = now

    def seconds(self) -> dict[str, float]:
        return {**self.steps, "constructor_s": round(self.last - self.t0, 3)}


class EncodeBatch:
    """Ray Data callable class: decoded rows -> rows with `image_features` (and `concept_logits` when there is a
    prompt set)."""

    def __init__(
        self,
        model_spec: ModelSpec,
        preprocess: PreprocessSpec,
        prompt_set: PromptSet | None,
        torch_threads: int = 0,
        board=None,
        micro_batch: int = 0,
        concept_maps: bool = False,
        compile: bool = False,
        features: FeatureSpec | None = None,
    ):
        started, phases = time.time(), StartPhases()
        quiet_libraries()  # actors on other nodes do not inherit the driver's environment
        import torch

        phases.mark("torch_import_s")
        import transformers.modeling_utils  # noqa: F401  (what from_pretrained imports first: timed on its own)

        phases.mark("transformers_import_s")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.features = features or FeatureSpec()
        self.encoder = Encoder(model_spec, preprocess, compile=compile)
        phases.mark("model_load_s")
        # Without a prompt set (features-only runs) there are no text embeddings and no concept logits.
        self.text_embeddings = self.encoder.encode_prompts(prompt_set) if prompt_set is not None else None
        # With concept_maps, each encoded row is [features | flattened K x P x P local concept scores].
        self.concept_embeddings = self.encoder.concept_embeddings(prompt_set) if concept_maps else None
        phases.mark("prompts_s")
        # a micro-batch counts rows: a multi-crop row is up to features.views images for the tower
        self.micro_batch = micro_batch or max(1, micro_batch_for_memory(self.encoder, 1024) // self.features.views)
        self.concept_maps = concept_maps
        blank = model_input(np.zeros((1, *preprocess.out_shape), np.uint8), self.features)
        self.width = self.dim = self._encode_chunk(blank).shape[1]
        if self.features.crops:  # one view's feature shape, for each row's feature_shape
            tower = self.encoder.family.image_tower(self.encoder.model)
            self.view_shape = view_shape(self.encoder.family, tower.config, self.features)
        if concept_maps:
            self.dim = self.text_embeddings.shape[1]
        phases.mark("warmup_s")
        if board is not None:
            self._post_start(board, started, phases)

    def _post_start(self, board, started: float, phases: StartPhases) -> None:
        """Hand the driver the start-up's seconds and the prompt embeddings, and wait until they are posted: the
        driver writes _prompts.parquet before the first shard, and finds them on the board by then."""
        import ray

        device, pid = str(self.encoder.device), os.getpid()
        posts = [board.post_actor_start.remote(ActorStart(started, phases.seconds(), device, pid))]
        if self.text_embeddings is not None:
            dtype = str(self.encoder.dtype).replace("torch.", "")
            message = PromptEmbeddings(
                self.text_embeddings, self.encoder.logit_scale, self.encoder.logit_bias, device, dtype, pid
            )
            posts.append(board.post_prompts.remote(message))
        ray.get(posts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        pixels = model_input(batch.pop("pixels"), self.features, batch.get("crop_grid"))
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        error_class = np.asarray(batch.get("error_class", np.full(len(status), None, dtype=object)), dtype=object)
        error_class = error_class.copy()
        n, dim = len(status), self.dim
        encoded = np.zeros((n, self.width), dtype=np.float32)
        ok = np.flatnonzero(status == "ok")
        if len(ok):
            rows, failed = self._encode(pixels if len(ok) == n else pixels[ok])  # (indexing copies)
            encoded[ok] = rows
            for j, (reason, cls) in failed.items():
                status[ok[j]], error[ok[j]], error_class[ok[j]] = "error", reason, cls
        features, norms = (encoded[:, :dim], None) if self.features.hidden else normalised(encoded[:, :dim])
        maps = encoded[:, dim:].astype(np.float16)
        stored = features.astype(np.float16)
        for i, reason in non_finite(stored, maps, self.features).items():
            if status[i] == "ok":
                status[i], error[i], error_class[i] = "error", reason, "non_finite"
        bad = status != "ok"
        features[bad], stored[bad], maps[bad] = 0, 0, 0
        if self.text_embeddings is not None:
            logits = self.encoder.logits(features, self.text_embeddings)
            logits[bad] = 0
            batch["concept_logits"] = logits
        if self.concept_maps:
            batch["concept_maps"] = maps
        if norms is not None:
            batch["embedding_norm"] = np.where(bad, 0, norms).astype(np.float32)
        if self.features.crops:  # [1 + rows x columns, tokens, width]: how much of each row's padded block is its own
            views = 1 + np.asarray(batch["crop_grid"], np.int32).prod(axis=1)
            shapes = np.column_stack([views, np.tile(np.asarray(self.view_shape, np.int32), (n, 1))])
            batch["feature_shape"] = np.where(bad[:, None], 0, shapes).astype(np.int32)
        batch.update(status=status, error=error, error_class=error_class, image_features=stored,
                     model_s=np.full(n, (time.perf_counter() - t) / max(n, 1)))  # fmt: skip
        return batch

    def _encode(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
        """Encode in micro-batches; on OOM halve and retry; per-image fallback for other model errors.
        Returns the encoded rows and, per failed row, (reason, error class); a device fault fails the whole
        chunk as class "device" (the driver stops the run: it is not the images' fault)."""
        import torch

        n = len(pixels)
        step = self.micro_batch or n
        out = np.zeros((n, self.width), dtype=np.float32)
        failed: dict[int, tuple[str, str]] = {}
        start = 0
        while start < n:
            chunk = pixels[start : start + step]
            try:
                out[start : start + len(chunk)] = self._encode_chunk(chunk)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if step == 1:
                    failed[start] = ("model ran out of device memory on a single image", "model")
                    start += 1
                    continue
                step = max(1, step // 2)
                self.micro_batch = step
                log.warning("out of device memory: micro-batch halved to %d", step)
                continue
            except Exception as exc:  # one bad input must not sink its neighbours
                if is_device_error(exc):
                    reason = f"device fault in the model actor ({type(exc).__name__}: {first_line(exc)})"
                    failed.update({start + j: (reason, "device") for j in range(len(chunk))})
                    start += len(chunk)
                    continue
                for j in range(len(chunk)):
                    try:
                        out[start + j] = self._encode_chunk(chunk[j : j + 1])[0]
                    except Exception as one:
                        cls = "device" if is_device_error(one) else "model"
                        failed[start + j] = (f"model failed on this image ({type(one).__name__}: {one})"[:500], cls)
                if not failed:
                    log.warning("batch failed (%s) but every image passed alone", exc)
            start += len(chunk)
        return out, failed

    def _encode_chunk(self, pixels: np.ndarray) -> np.ndarray:
        """Encoded rows: the hidden states, or the embedding (not normalised yet), with the concept maps after it."""
        if self.features.crops:
            return self.encoder.encode_crops(pixels.pixels, pixels.grids, self.features)
        if self.features.hidden:
            return self.encoder.encode_hidden(pixels, self.features)
        if self.concept_embeddings is None:
            return self.encoder.encode_embeddings(pixels)
        embedding, maps = self.encoder.encode_images_with_maps(pixels, self.concept_embeddings, normalize=False)
        return np.concatenate([embedding, maps.reshape(len(maps), -1)], axis=1)


class CropRows:
    """The rows of a multi-crop batch as the micro-batching slices them: crops [B, N, S, S, 3] with each row's grid
    [B, 2] (rows, columns), indexed together."""

    def __init__(self, pixels: np.ndarray, grids: np.ndarray):
        self.pixels, self.grids = pixels, grids

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index) -> CropRows:
        return CropRows(self.pixels[index], self.grids[index])


def model_input(pixels: np.ndarray, features: FeatureSpec, grids=None):
    """A batch's pixels as the model takes them: with crops, paired with their grids (1 x 1 when not given)."""
    if not features.crops:
        return pixels
    grids = np.ones((len(pixels), 2), np.int32) if grids is None else np.asarray(grids, np.int32).reshape(-1, 2)
    return CropRows(pixels, grids)


# What one row of a model batch holds in the actor, per stored feature value: the float32 rows encoded, their float32
# copy into the batch, and the float16 values stored (EncodeBatch.__call__).
ACTOR_BYTES_PER_VALUE = 10


def batch_row_bytes(preprocess: PreprocessSpec, feature_values: int) -> int:
    """The actor's memory for one row of a model batch: its pixels and its features (see ACTOR_BYTES_PER_VALUE)."""
    return math.prod(preprocess.out_shape) + ACTOR_BYTES_PER_VALUE * feature_values


def normalised(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised embeddings, their norms): `image_features * embedding_norm` gives the embedding back."""
    norms = np.linalg.norm(embeddings, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return embeddings / np.maximum(norms, 1e-12)[:, None], norms


def non_finite(stored: np.ndarray, maps: np.ndarray, features: FeatureSpec) -> dict[int, str]:
    """Rows whose stored values are not finite (NaN, or beyond float16's range: 65504), with the reason: never an ok
    row, whose numbers every reader would take for real."""
    bad = ~np.isfinite(stored).all(axis=1) | ~np.isfinite(maps).all(axis=1)
    if features.hidden and not features.crops:
        hint = "; hidden states beyond float16's range: try --dtype float32, or a pooled --features (mean, cls)"
    elif features.hidden:
        hint = "; hidden states beyond float16's range: try --dtype float32"
    else:
        hint = "; the model's output overflowed: try --dtype float32"
    return {int(i): f"the model gave non-finite values for this input (NaN or inf){hint}" for i in np.flatnonzero(bad)}
