"""An OUTPUT's dataset versions: which one readers read, what each was made with, and which one a run writes.

`_dataset.json` is written once per run, when the run completes:

    {"readable_version": 2, "version": 2, "identity": {...version 2's...}, "versions": {"1": {...}, "2": {...}}}

`readable_version` is the newest version whose run completed: every reader reads it (`readable_version()` below is
the one rule). `versions` keeps every version's identity (model, revision, dtype, prompt set, features, tiling), so a
version stays continuable after a newer one started. A run's own record (`_runs/<run-id>.json`) names its identity
and version from its start, so an unfinished `--new-version` run is resumed by rerunning its command while the
readable version goes on being read and extended.

Every version's prompt table is `_versions/<version>/prompts.parquet` (its concept names and their order);
`_prompts.parquet` holds the readable version's, for readers that open it directly.
"""

from __future__ import annotations

import pyarrow as pa

from .errors import UserError
from .write import OutputDir

# The keys a run record carries at its top level that make up its identity (records before "identity" was stored)
IDENTITY_KEYS = (
    "model",
    "kind",
    "revision",
    "dtype",
    "prompt_set_hash",
    "features",
    "fast_decode",
    "tiling",
    "concept_maps",
)


def readable_version(dataset: dict | None) -> int | None:
    """The version readers read: the newest completed one. Writers before `readable_version` recorded `version`."""
    if dataset is None:
        return None
    version = dataset.get("readable_version", dataset.get("version"))
    return int(version) if version is not None else 1


def _record_identity(record: dict) -> dict:
    if isinstance(record.get("identity"), dict):
        return record["identity"]
    return {k: record[k] for k in IDENTITY_KEYS if k in record}


def same_identity(a: dict, b: dict) -> bool:
    """Whether two identities describe the same numbers; a dtype not settled yet (`auto`, a dry run's) matches any."""
    keys = set(a) | set(b)
    if "auto" in (a.get("dtype"), b.get("dtype")):
        keys.discard("dtype")
    return all(a.get(k) == b.get(k) for k in keys)


class Versions:
    """What an OUTPUT knows of its versions: the readable one and each version's identity (from _dataset.json, and
    from the run records for versions still being written)."""

    def __init__(self, dataset: dict | None, runs: list[dict]):
        self.readable = readable_version(dataset)
        self.identities: dict[int, dict] = {}
        for record in sorted(runs, key=lambda r: str(r.get("run_id"))):  # the newest run of a version wins
            if record.get("dataset_version") is not None:
                self.identities[int(record["dataset_version"])] = _record_identity(record)
        dataset = dataset or {}
        for key, identity in (dataset.get("versions") or {}).items():
            self.identities[int(key)] = identity
        if self.readable is not None and self.readable not in (dataset.get("versions") or {}):
            # a writer before `versions`: its `identity` is the readable version's, unless a newer run overwrote it
            if int(dataset.get("version", self.readable)) == self.readable or self.readable not in self.identities:
                self.identities[self.readable] = dataset.get("identity", {})
        self.dataset = dataset

    @classmethod
    def read(cls, out: OutputDir, runs: list[dict] | None = None) -> Versions:
        return cls(out.read_json("_dataset.json"), out.runs() if runs is None else runs)

    @property
    def pending(self) -> int | None:
        """The newest version above the readable one that a run started (and did not complete), if any."""
        newer = [v for v in self.identities if self.readable is None or v > self.readable]
        return max(newer, default=None)

    def choose(self, url: str, identity: dict, new_version: bool) -> int:
        """The version a run with `identity` writes: the readable one, or the unfinished newer one, when it was made
        with the same identity; with `new_version` a new one; otherwise a one-line refusal naming what changed."""
        for version in (self.readable, self.pending):
            if version is not None and same_identity(self.identities.get(version, {}), identity):
                return version
        reference = self.readable if self.readable is not None else self.pending
        if reference is None:
            return 1
        if not new_version:
            old = self.identities.get(reference, {})
            changed = sorted(
                k for k in set(old) | set(identity) if not same_identity({k: old.get(k)}, {k: identity.get(k)})
            )
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed)
            what = "" if reference == self.readable else "an unfinished run that was "
            raise UserError(
                f"output {url} was {what}made with a different {', '.join(changed)} ({detail}); "
                "pass --new-version to start a new dataset version there, or use another OUTPUT"
            )
        return max(self.identities, default=0) + 1

    def completed(self, version: int, identity: dict) -> dict:
        """_dataset.json once `version` completed: it becomes the readable version; every version's identity is kept."""
        versions = {str(v): i for v, i in sorted({**self.identities, version: identity}.items())}
        return {"identity": identity, "version": version, "readable_version": version, "versions": versions}


def readable_identity(out: OutputDir, dataset: dict) -> dict:
    """The identity of the readable version (what readers' numbers were made with). Run records are read only for an
    OUTPUT written before `versions` whose newest run started another version."""
    readable = readable_version(dataset)
    if int(dataset.get("version", readable)) == readable and "identity" in dataset:
        return dict(dataset["identity"])  # written with the readable version, as every writer did
    if str(readable) in (dataset.get("versions") or {}):
        return dict(dataset["versions"][str(readable)])
    return dict(Versions(dataset, out.runs()).identities.get(readable, {}))


def prompts_file(version: int) -> tuple[str, ...]:
    """Where a version's prompt table lives in OUTPUT (every version keeps its own)."""
    return ("_versions", str(int(version)), "prompts.parquet")


def read_prompts(out: OutputDir, version: int | None) -> pa.Table | None:
    """The prompt table of `version` (concept names in logit order, text embeddings): its own, or for OUTPUTs written
    before versions kept their own, `_prompts.parquet`. None for a features-only version."""
    table = out.read_table(*prompts_file(version)) if version is not None else None
    return table if table is not None else out.read_table("_prompts.parquet")


def check_identity(out: OutputDir, identity: dict, new_version: bool) -> int:
    """The dataset version a run with `identity` writes into OUTPUT (see Versions.choose)."""
    return Versions.read(out).choose(out.url, identity, new_version)
