"""One typed configuration shared by the CLI and the cluster job files.

A misspelt key is an error that names it (``extra="forbid"``); every field says what it does and in which unit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError, first_line

DType = Literal["auto", "float32", "bfloat16", "float16"]

# `featurize rescore`'s defaults: here, so that the command line shows them without importing the rescorer
RESCORE_ROWS_PER_SHARD = 40000
RESCORE_BATCH_ROWS = 8192
DEDUP_THRESHOLD = 0.95  # `featurize dedup`'s default cosine similarity


def parse_storage_options(value: Any) -> dict[str, Any]:
    """--storage-options as every command takes it: a JSON object (text, or already a mapping from a config file) of
    fsspec options; nothing or an empty string is {}. Whether the filesystems accept its keys is checked by
    `storage.check_storage_options` before any work starts."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise UserError("--storage-options is not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # a JSONDecodeError, or a number longer than Python's limit on digits
            raise UserError(f"--storage-options is not valid JSON ({getattr(exc, 'msg', first_line(exc))})") from None
    if not isinstance(value, dict):
        raise UserError(
            f'--storage-options must be a JSON object of fsspec options (e.g. {{"key": ..., "secret": ...}}), '
            f"not a {type(value).__name__}"
        )
    return {str(k): v for k, v in value.items()}


class JobConfig(BaseModel):
    """Options every featurisation job shares (images and slides)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}  # old option name -> new: refused, naming the new one (see SlidesConfig)

    input: str = Field(
        description="Folder (recursive), glob, list file (.txt/.csv/.parquet with a `uri` column), "
        "or a manifest; local path or fsspec URL."
    )
    output: str = Field(description="Output folder (local path or fsspec URL).")
    model: str = Field(description="Hugging Face hub id or local folder of the checkpoint.")
    prompts: str | None = Field(
        None,
        description="Prompt set: YAML with `concepts` and `templates`, or a text file, "
        "one prompt a line; without it, a features-only run (no "
        "concept_logits).",
    )
    features: str = Field(
        "embedding",
        description="What image_features holds: `embedding` (projected, "
        "L2-normalised) or `hidden:LAYER:POOL`, the image tower's "
        "hidden_states[LAYER] pooled as cls, mean, patch or cls_patch "
        "(float16, not normalised; no prompts).",
    )
    revision: str | None = Field(None, description="Hub revision; pin a commit hash for unattended runs.")
    trust_remote_code: bool = Field(False, description="Allow the checkpoint's own Python code (ConceptCLIP needs it).")
    dtype: DType = Field("auto", description="Model dtype; auto = float32 on CPU, bfloat16 on GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto = cuda if present.")
    batch_size: int = Field(0, ge=0, description="Images per model batch; 0 = chosen from the device.")
    num_actors: int = Field(0, ge=0, description="Model actors; 0 = one per GPU, else sized from the CPUs.")
    decode_batch_size: int = Field(32, ge=1, description="Images per decode task batch.")
    rows_per_shard: int = Field(
        0,
        ge=0,
        description="Rows per Parquet shard (one work unit); 0 = about 128 MB of "
        "row data a shard, from the row's width.",
    )
    torch_threads: int = Field(0, ge=0, description="Torch CPU threads per actor; 0 = the CPUs of its node / actors.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for input and output."
    )
    stall_timeout_s: float = Field(900.0, gt=0, description="Fail the run when nothing progresses this long, seconds.")
    incremental: bool = Field(False, description="Process only new or changed inputs into an existing OUTPUT.")
    new_version: bool = Field(
        False, description="Allow a changed model/revision/dtype/prompt set in an existing OUTPUT."
    )
    dry_run: bool = Field(
        False,
        description="List and plan only: print what a run would do (last line JSON); "
        "start no model, write nothing to OUTPUT.",
    )
    fail_on_error: bool = Field(False, description="Exit with status 1 when any input became an error row.")
    torch_compile: bool = Field(
        False, description="torch.compile the image encoder (GPU; the first batches are slow while it compiles)."
    )
    verbose: bool = Field(
        False, description="Show Ray's own logs and progress bars and the workers' output (quiet by default)."
    )
    progress_interval_s: float = Field(
        30.0, gt=0, description="Seconds between progress lines when the output is not a terminal (job logs)."
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _parse_storage_options(cls, value: Any) -> Any:
        try:
            return parse_storage_options(value)
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("--storage-options ")) from None


class RunConfig(JobConfig):
    """Options of `featurize images` (and the job entry points that run the same thing)."""

    max_image_pixels: int = Field(178_956_970, ge=1, description="Decompression-bomb limit, in pixels.")
    retry_errors: bool = Field(False, description="Also reprocess inputs whose newest committed row is an error row.")
    fast_decode: bool = Field(
        False,
        description="Approximate but faster: JPEGs decode at a reduced scale (at least "
        "twice the model input); features drift slightly from the "
        "processor's (see BENCHMARKS.md).",
    )
    crops: str = Field(
        "",
        description="`hd:N`: Phi-3-vision's multi-crop (HD) recipe, a global view and at most N crops of the CLIP "
        "tower's input size per image, each crop's tokens stored (needs --features hidden:LAYER:patch or "
        "cls_patch); empty: one view.",
    )
    merge: str = Field(
        "",
        description="`2x2`: merge each 2x2 block of patch tokens into one token of 4x the width, as Phi-3-vision does "
        "(needs --features hidden:LAYER:patch); empty: no merge.",
    )


class SlidesConfig(JobConfig):
    """Options of `featurize slides`: whole-slide images cut into tissue tiles (see pipeline/slides.py)."""

    # Options renamed so that their unit is in the name (old -> new): the old spelling, on the command line or in a
    # config file, is refused with one line that names the new one (cli.add_model_options, make_config).
    renamed: ClassVar[dict[str, str]] = {"mpp": "target_mpp", "overlap": "overlap_px"}

    target_mpp: float = Field(0.5, gt=0, description="Target microns per pixel of the tiles (0.5 um/px is about 20x).")
    tile_px: int = Field(0, ge=0, description="Tile side in pixels at --target-mpp; 0 = the model's input size.")
    overlap_px: int = Field(0, ge=0, description="Pixels (at --target-mpp) each tile shares with its neighbours.")
    min_tissue: float = Field(0.25, ge=0, le=1, description="Minimum tissue fraction of a tile for it to be scored.")
    slide_mpp: float | None = Field(
        None, gt=0, description="Level-0 microns per pixel of every slide, overriding their metadata."
    )
    reader: Literal["auto", "tiffslide", "openslide"] = Field(
        "auto", description="Slide reader; auto = tiffslide (local or remote), openslide for what only it reads."
    )
    top_k: int = Field(16, ge=1, description="Per slide and concept, the mean of the k highest tile logits.")
    concept_maps: bool = Field(
        False,
        description="Also store each tile's patch-level concept scores (float16; "
        "models with ConceptCLIP's concept head).",
    )


POSITIONAL = ("input", "output")  # given as arguments on the command line, not as --options


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad option and why."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "config"
        name = name if name.isprintable() else repr(name)  # a key with a line break stays on the one line
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option (check its spelling)"
        elif err["type"] == "missing" and name in POSITIONAL:
            msg = f"required (give {name.upper()} as an argument, or `{name}:` in the config file)"
        elif err["type"] == "missing":
            msg = f"required (pass --{name.replace('_', '-')} or set it in the config file)"
        parts.append(f"{name}: {msg}")
    return "invalid configuration: " + "; ".join(parts)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON config file into a dict of options."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    except RecursionError:  # nested deeper than the parser goes
        raise UserError(f"config file {path} is not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls: type[BaseModel], options: dict[str, Any]) -> Any:
    """Build a config model, turning validation errors into a one-line UserError (a renamed option: its new name)."""
    renamed = getattr(cls, "renamed", {})
    old = [name for name in options if name in renamed]
    if old:
        raise UserError(
            "; ".join(f"option {name} is now {renamed[name]} (--{renamed[name].replace('_', '-')})" for name in old)
        )
    try:
        return cls(**options)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
