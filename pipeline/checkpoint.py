"""What a checkpoint is, resolved on the driver without loading it: where it comes from (hub id or folder, revision,
remote-code consent, the token kept secret), its family, what the features are, the preprocessing its processor
declares, and the widths of the rows it will produce."""

from __future__ import annotations

import functools
import json
import logging
import math
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

if TYPE_CHECKING:
    pass

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
    crops: int = 0  # Phi-3-vision's multi-crop (HD) recipe: a global view and at most this many crops (0: one view)
    merge: bool = False  # each 2x2 block of patch tokens merged into one token of 4x the width

    @property
    def hidden(self) -> bool:
        return self.layer is not None

    @property
    def name(self) -> str:
        return f"hidden:{self.layer}:{self.pool}" if self.hidden else "embedding"

    @property
    def views(self) -> int:
        """Images the tower sees per input at most: the global view and the crops, or the one view."""
        return 1 + self.crops if self.crops else 1


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


def with_views(features: FeatureSpec, crops: str, merge: str) -> FeatureSpec:
    """`features` with --crops (`hd:N`, or empty) and --merge (`2x2`, or empty), checked against each other; what
    depends on the model is checked by hidden_shape."""
    count = 0
    if crops:
        kind, _, n = crops.partition(":")
        if kind != "hd" or not n.isdigit() or not 1 <= int(n) <= MAX_CROPS:
            raise UserError(
                f"--crops {crops!r}: use 'hd:N' with N the most crops per image, 1..{MAX_CROPS} (e.g. hd:16), "
                "or leave it out"
            )
        count = int(n)
        if features.pool not in ("patch", "cls_patch"):
            raise UserError(
                f"--crops {crops} stores the image tower's tokens of every crop: it needs --features "
                f"hidden:LAYER:patch or hidden:LAYER:cls_patch, not {features.name}"
            )
    if merge and merge != "2x2":
        raise UserError(f"--merge {merge!r}: use '2x2' (each 2x2 block of patch tokens as one token), or leave it out")
    if merge and features.pool != "patch":
        why = " (the class token has no neighbours to merge with)" if features.pool == "cls_patch" else ""
        raise UserError(f"--merge 2x2 merges neighbouring patch tokens: it needs --features hidden:LAYER:patch{why}")
    return replace(features, crops=count, merge=bool(merge))


# The most crops --crops hd:N takes: a row then holds (1 + N) views' tokens (65 x 576 x 1024 float16 = 77 MB at 336 px)
MAX_CROPS = 64


@functools.lru_cache(maxsize=1)
def hub_answers(timeout_s: float = 10.0) -> bool:
    """Whether the hub answers one request, asked once per process: when it does not, the cache is used (or the
    model refused in one line) at once, instead of the hub client's five retries of every file over ~25 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # it answered, if not with 200
    except (OSError, ValueError):
        return False
    return True


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
        cfg = hf_hub_download(model, filename, revision=revision, token=token.get(), local_files_only=not hub_answers())
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
        check_remote_code_imports(model, revision, token, config)
        if not Path(model).is_dir() and not (revision and _COMMIT_RE.match(revision)):
            log.warning(
                "model %s runs remote code from revision %r, which is not a commit hash: pin --revision "
                "to a commit for unattended runs",
                model,
                revision or "main",
            )
    return ModelSpec(model, family, _resolved_revision(model, revision, token), trust_remote_code, dtype, device, token)


# What pip installs a module under, where the two names differ
PIP_NAMES = {"PIL": "pillow", "sklearn": "scikit-learn", "cv2": "opencv-python", "yaml": "pyyaml",
             "skimage": "scikit-image", "open_clip": "open_clip_torch"}  # fmt: skip
# The packages of OpenCLIP's runtime that ConceptCLIP's remote code may import, and what brings them
CONCEPTCLIP_EXTRA = "pip install 'pipeline-featurize[conceptclip]' brings timm, ftfy and regex"


def check_remote_code_imports(model: str, revision: str | None, token: Secret, config: dict) -> None:
    """Before anything runs, the packages the checkpoint's own Python imports must be installed: transformers would
    refuse the code on every actor, after the download. One line names the missing ones."""
    import importlib.util
    import sys

    modules = _remote_code_imports(model, revision, token, config)
    missing = sorted(
        {
            PIP_NAMES.get(m, m)
            for m in modules
            if m not in sys.builtin_module_names and importlib.util.find_spec(m) is None
        }
    )
    if missing:
        raise UserError(
            f"model {model}: its own Python code imports {', '.join(missing)}, which this environment lacks: "
            f"install {'it' if len(missing) == 1 else 'them'} ({CONCEPTCLIP_EXTRA}; timm also needs the torchvision "
            "that matches your torch)"
        )


def _remote_code_imports(model: str, revision: str | None, token: Secret, config: dict) -> set[str]:
    """The top-level modules the checkpoint's remote code imports outside try blocks (as transformers checks them):
    the files its auto_map names, and the sibling files they import."""
    import ast

    todo = [name for name in _auto_map_modules(config) if "--" not in name]  # another repository's code: not ours
    todo += [name for name in _auto_map_modules(_processor_config(model, revision, token)) if "--" not in name]
    seen, found = set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        source = _remote_code_file(model, revision, token, f"{module}.py")
        if source is None:
            continue
        tree = ast.parse(source)
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(node.module.split(".")[0])
    return found


def _auto_map_modules(config: dict) -> set[str]:
    names = set()
    for value in (config.get("auto_map") or {}).values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and "." in ref:
                names.add(ref.rsplit(".", 1)[0])
    return names


def _processor_config(model: str, revision: str | None, token: Secret) -> dict:
    try:
        return _load_config_json(model, revision, token, "processor_config.json")
    except UserError:
        return {}


def _remote_code_file(model: str, revision: str | None, token: Secret, filename: str) -> str | None:
    """A file of the checkpoint's remote code (from the folder, or the hub's cache), or None if it has none."""
    path = Path(model) / filename
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if Path(model).is_dir():
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(model, filename, revision=revision, token=token.get(), local_files_only=not hub_answers())
        ).read_text(encoding="utf-8")
    except Exception:  # not there, or the hub unreachable: transformers says so itself when it loads
        return None


def _resolved_revision(model: str, revision: str | None, token: Secret) -> str | None:
    """The commit a hub revision points at now, so a moved branch is seen as a changed model; local folders and
    unreachable hubs keep what was given."""
    if Path(model).is_dir() or (revision and _COMMIT_RE.match(revision)) or not hub_answers():
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


def _vision_config(spec: ModelSpec):
    """The image tower's transformers configuration; a model without one is refused for hidden-state features."""
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
    return vision


def hidden_shape(spec: ModelSpec, features: FeatureSpec) -> tuple[int, ...]:
    """The shape of one row's hidden-state features (before flattening), from the checkpoint's configuration; with
    crops, the largest (the global view and every crop). Refuses a layer out of range, `cls` for towers without a
    class token (SigLIP, ConceptCLIP), crops for towers that are not CLIP's, and a 2x2 merge of an odd patch grid."""
    vision = _vision_config(spec)
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
    if features.crops and not has_cls:
        raise UserError(
            f"--crops hd:{features.crops}: the image tower of model {spec.model} ({spec.family.title}) has no class "
            "token; the multi-crop recipe is for CLIP image towers (a class token, a square input): use a CLIP "
            "checkpoint"
        )
    side = math.isqrt(patches)
    if features.merge and (side * side != patches or side % 2):
        raise UserError(
            f"--merge 2x2: model {spec.model}'s patch grid is {side}x{side}, odd: 2x2 blocks need an even side; "
            "leave --merge out"
        )
    shape = view_shape(spec.family, vision, features)
    return (features.views, *shape) if features.crops else shape


def view_shape(family: Family, vision, features: FeatureSpec) -> tuple[int, ...]:
    """The shape of one view's hidden-state features (a view: the image, or one crop of it) for an image tower's
    configuration: pooled as features.pool, then merged 2x2 when features.merge."""
    patches, width, _ = _vision_layout(vision)
    if features.merge:
        return (patches // 4, 4 * width)
    tokens = patches + family.has_class_token(vision)
    return {"cls": (width,), "mean": (width,), "patch": (patches, width), "cls_patch": (tokens, width)}[features.pool]


def crop_px(spec: ModelSpec) -> int:
    """The side of a crop in the multi-crop recipe: the image tower's square input (336 for CLIP ViT-L/14-336)."""
    return int(_vision_config(spec).image_size)  # hidden_shape read it as one int (a square) already


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
    if features.crops:  # feature_shape above is the largest row's: every crop of the grid
        widths.update(crop_grid=(2, 4), feature_shape=(3, 4))
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
