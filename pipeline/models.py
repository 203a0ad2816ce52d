"""Models behind one small interface: resolve a checkpoint, load it once, encode prompts once, encode images, score.

What differs between model families (how to load, encode and score) lives in `pipeline/families/`, one adapter per
family; this module keeps what they share: resolving a checkpoint (hub or folder, revision, remote-code consent),
the preprocessing it declares, and the `Encoder` (device, pixel buffers, micro-batches, the logit formula).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from . import families
from .decode import PreprocessSpec, spec_from_image_processor
from .errors import UserError, first_line
from .families import Family
from .prompts import PromptSet, ensemble

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class Secret:
    """A value (the HF token) that never shows itself in reprs, logs or errors."""

    def __init__(self, value: str | None):
        self._value = value or None

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)" if self._value else "Secret(None)"

    __str__ = __repr__

    def __reduce__(self):
        return (Secret, (self._value,))


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, fallback notices) out of the output. The CLI calls it, and so does
    every model actor: actors on other nodes do not inherit the driver's environment."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # imported before the variables were set: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def hf_token() -> Secret:
    return Secret(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to load the model; built and checked on the driver."""

    model: str
    family: Family
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    token: Secret = field(default_factory=lambda: Secret(None), repr=False, compare=False)

    def identity(self) -> dict:
        """What makes two runs' numbers comparable (no secrets). `kind` is the family's key, as OUTPUTs store it."""
        return {"model": self.model, "kind": self.family.name, "revision": self.revision, "dtype": self.dtype}

    def placed(self, device: str) -> ModelSpec:
        """This spec on `device` with a concrete dtype (auto: bfloat16 on GPUs, float32 on CPUs)."""
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        return replace(self, dtype=dtype, device=device)


HIDDEN_POOLS = ("cls", "mean", "patch", "cls_patch")


@dataclass(frozen=True)
class FeatureSpec:
    """What `image_features` holds: the model's embedding (projected, L2-normalised; layer None), or a layer of the
    image tower's hidden states (`hidden_states[layer]`, as the model returns them) pooled as `pool`:
    cls (the class token), mean (of the patch tokens), patch (the patch tokens), cls_patch (the whole sequence)."""

    layer: int | None = None
    pool: str = ""

    @property
    def hidden(self) -> bool:
        return self.layer is not None

    @property
    def name(self) -> str:
        return f"hidden:{self.layer}:{self.pool}" if self.hidden else "embedding"


def parse_features(text: str) -> FeatureSpec:
    """`embedding` or `hidden:LAYER:POOL` (e.g. hidden:-2:patch); a bad value is a one-line error."""
    if text == "embedding":
        return FeatureSpec()
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == "hidden" and parts[2] in HIDDEN_POOLS:
        try:
            return FeatureSpec(int(parts[1]), parts[2])
        except ValueError:
            pass
    raise UserError(
        f"--features {text!r}: use 'embedding' or 'hidden:LAYER:POOL' with LAYER an index into the "
        f"image tower's hidden states (e.g. -2) and POOL one of {', '.join(HIDDEN_POOLS)}"
    )


def _load_config_json(model: str, revision: str | None, token: Secret, filename: str = "config.json") -> dict:
    path = Path(model)
    if path.is_dir():
        cfg = path / filename
        if not cfg.is_file():
            raise UserError(f"model folder {model} has no {filename}; is it a Hugging Face checkpoint?")
        return json.loads(cfg.read_text(encoding="utf-8"))
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model {model} is neither a folder with a checkpoint nor a hub id")
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    try:
        cfg = hf_hub_download(model, filename, revision=revision, token=token.get())
    except hf_errors.GatedRepoError:
        raise UserError(f"model {model} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"model {model} was not found on the hub (or HF_TOKEN lacks access)") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"model {model} has no revision {revision!r}") from None
    except hf_errors.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise UserError(
            f"model {model} is not in the local cache and the hub cannot be reached "
            "(check the network, or pass a local folder)"
        ) from None
    except hf_errors.EntryNotFoundError:
        raise UserError(f"model {model} has no {filename}") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"model {model}: cannot fetch {filename} ({type(exc).__name__})") from None
    return json.loads(Path(cfg).read_text(encoding="utf-8"))


def resolve_model(
    model: str, revision: str | None = None, trust_remote_code: bool = False, dtype: str = "auto", device: str = "auto"
) -> ModelSpec:
    """Check the checkpoint exists, recognise its family, and refuse remote code unless allowed. A local folder is
    named by its absolute path: `./m` and `/abs/m` are one model, and actors on other nodes get a usable path."""
    token = hf_token()
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    config = _load_config_json(model, revision, token)
    family = families.detect(config)
    if family is None:
        raise UserError(
            f"model {model} has model_type {config.get('model_type')!r}; supported: CLIPModel, SiglipModel, "
            "CLIPVisionModel, SiglipVisionModel (features only) and remote-code models with "
            "ConceptCLIP's interface"
        )
    if family.remote_code:
        if not trust_remote_code:
            raise UserError(
                f"model {model} ships its own Python code; review it, then pass --trust-remote-code "
                "(and pin --revision to a commit hash)"
            )
        if not Path(model).is_dir() and not (revision and _COMMIT_RE.match(revision)):
            log.warning(
                "model %s runs remote code from revision %r, which is not a commit hash: pin --revision "
                "to a commit for unattended runs",
                model,
                revision or "main",
            )
    return ModelSpec(model, family, _resolved_revision(model, revision, token), trust_remote_code, dtype, device, token)


def _resolved_revision(model: str, revision: str | None, token: Secret) -> str | None:
    """The commit a hub revision points at now, so a moved branch is seen as a changed model; local folders and
    unreachable hubs keep what was given."""
    if Path(model).is_dir() or (revision and _COMMIT_RE.match(revision)):
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(model, revision=revision, token=token.get()).sha or revision
    except Exception:
        return revision


def _vision_layout(vision_config) -> tuple[int, int, int]:
    """(patch tokens, width, layers) of an image tower's config."""
    try:
        patches = (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2
        return patches, int(vision_config.hidden_size), int(vision_config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        raise UserError(
            "cannot tell this model's image-tower layout (image_size, patch_size, hidden_size, "
            "num_hidden_layers); --features hidden:... needs a transformers vision tower"
        ) from None


def hidden_shape(spec: ModelSpec, features: FeatureSpec) -> tuple[int, ...]:
    """The shape of one row's hidden-state features (before flattening), from the checkpoint's configuration;
    refuses a layer out of range and `cls` for towers without a class token (SigLIP, ConceptCLIP)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        spec.model, revision=spec.revision, token=spec.token.get(), trust_remote_code=spec.family.remote_code
    )
    vision = spec.family.vision_config(config)
    if vision is None:
        raise UserError(
            f"model {spec.model} exposes no transformers image tower (vision_config): --features "
            "hidden:... is not available for it; use --features embedding"
        )
    patches, width, layers = _vision_layout(vision)
    has_cls = spec.family.has_class_token(vision)
    if not -(layers + 1) <= features.layer <= layers:
        raise UserError(
            f"--features {features.name}: model {spec.model} has {layers + 1} hidden states "
            f"(embeddings and {layers} layers): LAYER must be in {-(layers + 1)}..{layers}"
        )
    if features.pool == "cls" and not has_cls:
        raise UserError(
            f"--features {features.name}: model {spec.model}'s image tower has no class token; "
            "use mean, patch or cls_patch"
        )
    tokens = patches + has_cls
    return {"cls": (width,), "mean": (width,), "patch": (patches, width), "cls_patch": (tokens, width)}[features.pool]


def row_widths(
    spec: ModelSpec,
    features: FeatureSpec,
    feature_shape: tuple[int, ...] | None,
    concepts: int,
    concept_maps: bool = False,
) -> dict[str, tuple[int, int]]:
    """Per list column of a result row, (values, bytes a value), read from the checkpoint's config.json without
    loading the model: what sizes shards by bytes."""
    config = _load_config_json(spec.model, spec.revision, spec.token)
    width = int(np.prod(feature_shape)) if feature_shape is not None else spec.family.embedding_width(config)
    widths = {"image_features": (width, 2)}
    if concepts:
        widths["concept_logits"] = (concepts, 4)
    if concept_maps:
        vision = spec.family.vision_config_json(config)
        patches = (int(vision.get("image_size", 384)) // int(vision.get("patch_size", 14))) ** 2
        widths["concept_maps"] = (concepts * patches, 2)
    return widths


def load_processor(spec: ModelSpec):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            spec.model, revision=spec.revision, token=spec.token.get(), trust_remote_code=spec.family.remote_code
        )
    except Exception as exc:
        raise UserError(
            f"model {spec.model}: cannot load its processor ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def preprocess_spec(spec: ModelSpec) -> PreprocessSpec:
    """The checkpoint's preprocessing, read from its saved processor configuration when that is complete (fast:
    the driver need not import transformers); otherwise from the loaded processor."""
    for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            config = _load_config_json(spec.model, spec.revision, spec.token, filename)
        except (UserError, ValueError):
            continue
        config = config.get(key, {}) if key else config
        if isinstance(config, dict) and _complete(config):
            return spec_from_image_processor(
                SimpleNamespace(**config), name=config.get("image_processor_type", filename)
            )
    processor = load_processor(spec)
    return spec_from_image_processor(getattr(processor, "image_processor", processor))


# A saved image-processor configuration that names all of these says everything the resize needs; one that
# leaves some to its class's defaults is read through the processor class instead.
COMPLETE_PROCESSOR_KEYS = frozenset(
    {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"}
)
NEVER_CROPPING_PROCESSORS = ("SiglipImageProcessor",)  # classes without a centre crop: none to leave to defaults


def _complete(config: dict) -> bool:
    if not COMPLETE_PROCESSOR_KEYS <= set(config):
        return False
    return "do_center_crop" in config or str(config.get("image_processor_type", "")).startswith(
        NEVER_CROPPING_PROCESSORS
    )


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
        return buffer.permute(0, 3, 1, 2).to(self.dtype)

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
        return self.pixel_values(np.zeros((1, *self.preprocess.out_shape), dtype=np.uint8))

    def encode_images(self, pixels) -> np.ndarray:
        """uint8 [B,H,W,3] -> L2-normalised image features [B,D] float32.

        On a GPU the batch goes through in pieces of `pipeline_rows`, all queued before the one copy back: the host
        copies (into pinned memory, then to the device) of a piece overlap the device's work on the one before,
        instead of leaving the device idle while the whole batch is copied (pieces run in order on one stream, so
        reusing the pixel buffer between them is safe)."""
        import torch

        step = self.pipeline_rows or max(1, len(pixels))
        starts = range(0, len(pixels), step) or [0]  # an empty batch goes through as it is
        with torch.inference_mode():
            pieces = [self._image_features(pixels[start : start + step]) for start in starts]
            features = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return features.cpu().numpy()

    def _image_features(self, pixels) -> torch.Tensor:
        import torch

        embedding = self._image_fn(pixel_values=self.pixel_values(pixels))
        return torch.nn.functional.normalize(embedding.float(), dim=-1)

    def encode_hidden(self, pixels, features: FeatureSpec) -> np.ndarray:
        """uint8 [B,H,W,3] -> the image tower's `hidden_states[layer]`, pooled, flattened [B, F] float32, as the
        model returns them (not normalised)."""
        import torch

        tower = self.family.image_tower(self.model)
        if tower is None:
            raise UserError(f"model {self.spec.model} exposes no image tower (vision_model) for --features hidden")
        has_cls = self.family.has_class_token(tower.config)
        with torch.inference_mode():
            states = tower(pixel_values=self.pixel_values(pixels), output_hidden_states=True).hidden_states
            h = states[features.layer].float()
            patches = h[:, 1:] if has_cls else h
            pooled = {
                "cls": lambda: h[:, 0],
                "mean": lambda: patches.mean(dim=1),
                "patch": lambda: patches,
                "cls_patch": lambda: h,
            }[features.pool]()
        return pooled.reshape(len(h), -1).cpu().numpy()

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

    def encode_images_with_maps(self, pixels, concept_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,H,W,3] -> (image features [B,D] as `encode_images` gives, local concept scores [B,K,P,P]):
        concept_logit_scale * cos(image_proj(patch token), concept) + concept_logit_bias on the P x P patch grid."""
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
            features = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return features.cpu().numpy(), maps.cpu().numpy()


def micro_batch_for_memory(encoder: Encoder, limit: int, headroom: float = 0.7) -> int:
    """On CUDA: the largest power-of-two batch whose activations fit in `headroom` of the free device memory,
    measured with a probe batch (out-of-memory later still halves it)."""
    import torch

    if encoder.device.type != "cuda":
        return limit
    probe = 4
    pixels = np.zeros((probe, *encoder.preprocess.out_shape), dtype=np.uint8)
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
