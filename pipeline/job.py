"""The job interface: what a featurisation command (images, slides) supplies to the driver in pipeline/run.py, and
the model side they share.

The driver runs every job through the same phases (acquire, list, plan, stream, finish); a job says what is listed,
how it is planned into work units, which CPU stage turns a plan row into model input, how result rows become shard
rows, and what it does once every unit is committed. Images and slides are two implementations of `Job`, siblings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pyarrow as pa

from .checkpoint import (
    FeatureSpec,
    ModelSpec,
    crop_px,
    hidden_shape,
    parse_features,
    preprocess_spec,
    resolve_model,
    row_widths,
    with_views,
)
from .config import JobConfig
from .decode import PreprocessSpec
from .encode import batch_row_bytes
from .errors import UserError
from .plan import Listing, Workspace, open_listing, shard_rows
from .prompts import PromptSet, load_prompts
from .sources import write_listing
from .write import OutputDir


@dataclass
class ModelJob:
    """The model side of a run: the checkpoint, the prompt set (None: features only) and what the features are."""

    spec: ModelSpec
    prompt_set: PromptSet | None
    features: FeatureSpec
    feature_shape: tuple[int, ...] | None  # hidden-state features: one row's shape before flattening (crops: largest)
    fast_decode: bool = False  # approximate JPEG decoding changes the numbers a little
    crop_px: int = 0  # multi-crop runs: the side of a crop (the image tower's input)

    def identity(self) -> dict:
        """What the numbers depend on (features, crops and merge only when not the default, so older OUTPUTs keep
        theirs)."""
        identity = {**self.spec.identity(), "prompt_set_hash": self.prompt_set.set_hash if self.prompt_set else None}
        if self.features.hidden:
            identity["features"] = self.features.name
        identity.update(self._views())
        if self.fast_decode:
            identity["fast_decode"] = True
        return identity

    def _views(self) -> dict:
        views = {"crops": f"hd:{self.features.crops}"} if self.features.crops else {}
        return {**views, "merge": "2x2"} if self.features.merge else views

    def described(self) -> dict:
        """For provenance and the run record. With crops every row has its own shape (its feature_shape column):
        view_feature_shape is one view's."""
        out = {"features": self.features.name, "fast_decode": self.fast_decode, **self._views()}
        if self.features.crops:
            out["view_feature_shape"] = list(self.feature_shape[1:])
        elif self.feature_shape is not None:
            out["feature_shape"] = list(self.feature_shape)
        return out

    def preprocessing(self) -> PreprocessSpec:
        """The checkpoint's preprocessing; with crops, the multi-crop recipe's at the tower's input size (the
        processor's rescale and normalisation kept)."""
        spec = preprocess_spec(self.spec)
        if not self.features.crops:
            return spec
        return replace(spec, height=self.crop_px, width=self.crop_px, crops=self.features.crops)

    def batch_row_bytes(self, preprocess: PreprocessSpec) -> int:
        """What one row of a model batch holds in the actor (pixels and features), to size batches of large rows."""
        return batch_row_bytes(preprocess, math.prod(self.feature_shape) if self.feature_shape else 0)


def resolve_job(cfg: JobConfig) -> ModelJob:
    """Load and check what the run's numbers come from, before anything starts."""
    features = with_views(parse_features(cfg.features), getattr(cfg, "crops", ""), getattr(cfg, "merge", ""))
    prompt_set = load_prompts(cfg.prompts) if cfg.prompts else None
    spec = resolve_model(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.dtype, cfg.device)
    if prompt_set is not None and not spec.family.has_text:
        raise UserError(
            f"model {cfg.model} is an image tower without a text tower: it cannot score prompts; drop "
            "--prompts for a features-only run"
        )
    if prompt_set is not None and features.hidden:
        raise UserError(
            f"--prompts scores concepts against the model's embedding, so it cannot go with --features "
            f"{features.name}: drop one of them"
        )
    shape = hidden_shape(spec, features) if features.hidden else None
    side = crop_px(spec) if features.crops else 0
    return ModelJob(spec, prompt_set, features, shape, bool(getattr(cfg, "fast_decode", False)), side)


@dataclass
class Planned:
    """A run's plan: the work units (unit -> rows) and counts; the driver holds nothing per input."""

    run_id: str
    resumed: bool
    counts: dict
    units: dict[int, int]
    plan_path: str | None = None  # the plan file in OUTPUT's filesystem (a resumed run's, or once uploaded)
    local_plan: str | None = None  # a new plan, in the workspace until the run uploads it
    extra: dict = field(default_factory=dict)  # what the job kind needs later (slides: the slide table)


class Job(Protocol):
    """What a featurisation command supplies to the driver (pipeline/run.py). Members, in the order the driver uses
    them:"""

    command: str
    """The command's name ("images", "slides"): the run record's `command`."""
    inputs: str
    """What the listing lists ("images", "slides"), for messages."""
    noun: str
    """What the stream processes ("images", "tiles"): progress lines and the record's `<noun>_per_s`."""
    plans_in_ray_tasks: bool
    """Whether planning runs Ray tasks (slides open every slide): planning then needs Ray, and the CPUs the model
    actors would take, so the stream does not open before the plan."""
    stage_columns: list[str]
    """The plan columns the CPU stage reads (the plan readers send only these)."""
    cfg: JobConfig
    """The command's options."""
    model: ModelJob
    """The model side: checkpoint, prompt set, features."""
    preprocess: PreprocessSpec | None
    """The checkpoint's preprocessing, set by `prepare`."""

    def prepare(self, ws: Workspace) -> Listing:
        """On a thread while Ray starts (or after, for inputs listed in Ray tasks): the preprocessing, and the listing
        streamed into the workspace."""

    def identity(self) -> dict:
        """What the numbers depend on: model, revision, dtype, prompt set, and the job's own settings (tiling)."""

    def provenance_extra(self) -> dict:
        """What the job adds to every file's provenance."""

    def plan(
        self,
        ws: Workspace,
        out: OutputDir,
        listing: Listing,
        version: int,
        run_id: str,
        runs: list[dict],
        dry: bool = False,
    ) -> Planned:
        """Resume the unfinished run over this input, or plan what is not committed yet into work units. A dry run
        plans the same way and writes nothing to OUTPUT."""

    def save_plan(self, out: OutputDir, planned: Planned) -> None:
        """Write into OUTPUT what a resumed run needs besides the plan file (slides: the slide table); called once,
        before the first shard."""

    def stage(self) -> tuple[Callable[..., dict], dict[str, Any]]:
        """The CPU stage: a Ray Data batch function that adds `pixels`, `status`, `error`, `error_class` to plan
        rows, and its keyword arguments."""

    def encode_kwargs(self) -> dict:
        """Extra constructor arguments of the model actors (slides: concept maps)."""

    def table_builder(self, run_id: str, version: int) -> Callable[[dict], pa.Table]:
        """Result rows (numpy columns) -> shard rows (one Arrow schema)."""

    def finish(self, ws: Workspace, out: OutputDir, planned: Planned, prov: dict, record: dict) -> None:
        """After the last unit is committed (slides: summarise each slide into _slides.parquet); may add counts to
        the record."""

    def planned_text(self, planned: Planned) -> str:
        """What the plan will process, in words."""

    def summary(self, listing: Listing, planned: Planned) -> str:
        """What the listing and the plan found, in words."""


# -- what both jobs share -------------------------------------------------------------------------------------------
def list_inputs(
    cfg: JobConfig, model: ModelJob, ws: Workspace, suffixes, group: Callable | None = None
) -> tuple[PreprocessSpec, Listing]:
    """The checkpoint's preprocessing, and INPUT's listing (files with `suffixes`) streamed into the workspace;
    group(chunk files, storage_options) -> (chunk files, rows) may merge rows into inputs first (DICOM series)."""
    preprocess = model.preprocessing()
    files, rows = write_listing(cfg.input, ws.path("listing"), cfg.storage_options, suffixes)
    if group is not None:
        files, rows = group(files, cfg.storage_options)
    return preprocess, open_listing(ws, files, rows)


def model_rows_per_shard(cfg: JobConfig, model: ModelJob, concept_maps: bool = False) -> int:
    """Rows per shard: the option, or about SHARD_BYTES of the rows this model writes."""
    concepts = len(model.prompt_set.names) if model.prompt_set else 0
    widths = row_widths(model.spec, model.features, model.feature_shape, concepts, concept_maps)
    return shard_rows(cfg.rows_per_shard, widths)
