"""The run's board: typed messages between the driver and the stream's workers, held by a tiny Ray actor.

Three messages, each posted once (the first post of a kind stays):
- `PromptEmbeddings`, from the first model actor before its first batch: the driver writes _prompts.parquet from it
  before the first shard.
- `ActorStart`, from the first model actor: the seconds of its start-up's steps, for the run record.
- `PlanPosted`, from the driver once the plan exists: the stream's plan readers wait for it (a stream may open
  while the driver still plans). `None` posted instead ends the readers (the run failed or has nothing to do).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PromptEmbeddings:
    """The prompt set as the model actor encoded it, and the scale and bias of its logits."""

    text_embeddings: np.ndarray  # [K, D] float32, L2-normalised
    logit_scale: float
    logit_bias: float
    device: str
    dtype: str
    pid: int


@dataclass(frozen=True)
class ActorStart:
    """A model actor's start-up: when its constructor began (wall clock) and the seconds of each step, in order."""

    started_at: float
    steps: dict[str, float]
    device: str
    pid: int


@dataclass(frozen=True)
class PlanPosted:
    """Where the stream's plan readers find the plan: `rows` to process, the `units` still to do (None: all), and
    either the plan file (`path` in OUTPUT's filesystem) or, when the workers cannot read OUTPUT, `refs`: range number
    -> an object with that range's rows, put by the driver."""

    rows: int
    units: list[int] | None
    output: str
    storage_options: dict
    path: str | None
    range_rows: int
    refs: dict | None = field(default=None, repr=False)


class RunBoard:
    """The board's actor (no CPU, threaded, on the driver's node: a lost worker node never takes it along)."""

    def __init__(self):
        self._posted: dict[str, object] = {}
        self._changed = threading.Condition()

    @classmethod
    def start(cls):
        """The board's actor handle, placed on this (the driver's) node."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return ray.remote(num_cpus=0, max_concurrency=64)(cls).options(scheduling_strategy=here).remote()

    def _post(self, kind: str, message) -> None:
        with self._changed:
            self._posted.setdefault(kind, message)
            self._changed.notify_all()

    def post_prompts(self, message: PromptEmbeddings) -> None:
        self._post("prompts", message)

    def prompts(self) -> PromptEmbeddings | None:
        return self._posted.get("prompts")

    def post_actor_start(self, message: ActorStart) -> None:
        self._post("actor_start", message)

    def actor_start(self) -> ActorStart | None:
        return self._posted.get("actor_start")

    def post_plan(self, message: PlanPosted | None) -> None:
        self._post("plan", message)

    def wait_plan(self) -> PlanPosted | None:
        """Blocks until the driver posts the plan (or None)."""
        with self._changed:
            self._changed.wait_for(lambda: "plan" in self._posted)
            return self._posted["plan"]
