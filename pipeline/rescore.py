"""`featurize rescore`: new concept logits from an OUTPUT's stored image features, with the text tower only.

Also the reader the analysis commands (labels, probe, report) share: `ScoredOutput` opens an OUTPUT of `images`,
of `slides`, or of `rescore` (OUT2) and yields its current rows shard by shard, never the whole table at once.

OUT2, written by `rescore`:
  part-NNNNN.parquet   uri, image_id (slides: slide_id, uri, x, y, level), status, concept_logits, run_id (of the
                       source row); ok rows rescored, error rows keep status error and null logits
  _prompts.parquet     the new prompt set and its text embeddings (schema.prompts_table)
  _slides.parquet      slides OUTPUTs: the source's slide rows, concept_max and concept_topk_mean from the new logits
  _rescore.json        the source OUTPUT, the identity (with the new prompt-set hash), counts; written last

Logits are the run's own formula (`Encoder.logits`: scale * cos + bias with the model's scale and bias) on the
stored float16 features. A run computes them from the float32 features before they are rounded to float16, so the
two differ by at most scale * ||f16 - f32|| <= scale * (2^-11 + sqrt(D) * 2^-25) for a unit feature vector of
dimension D (float16's relative rounding 2^-11 for normal numbers, absolute 2^-25 below 2^-14); see
`float16_logit_bound`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import families
from .checkpoint import ModelSpec
from .config import RESCORE_BATCH_ROWS as BATCH_ROWS
from .config import RESCORE_ROWS_PER_SHARD as ROWS_PER_SHARD
from .dataset import read_prompts, readable_identity, readable_version
from .errors import UserError
from .lease import Lease
from .prompts import Concept, PromptSet
from .schema import current_names, fixed_list
from .storage import filesystem, with_retries
from .write import OutputDir, newest_per_uri, shard_name

log = logging.getLogger(__name__)

IMAGE_KEYS = ["uri", "image_id"]
TILE_KEYS = ["slide_id", "uri", "x", "y", "level"]


def float16_logit_bound(scale: float, dim: int) -> float:
    """The most a logit from float16-stored features can differ from the run's (float32 features), scale * ||df||:
    float16 rounds a normal number to within 2^-11 of its value and a subnormal (below 2^-14) to within 2^-25, so
    for a unit vector ||df|| <= 2^-11 + sqrt(dim) * 2^-25."""
    return abs(scale) * (2.0**-11 + math.sqrt(dim) * 2.0**-25)


# -- reading any OUTPUT -----------------------------------------------------------------------------------------------
class ScoredOutput:
    """An OUTPUT of `featurize images`, `slides` or `rescore`: its identity, concepts and current rows."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.url = output
        self.out = OutputDir(output, storage_options)
        self.rescore_record = self.out.read_json("_rescore.json")
        dataset = self.out.read_json("_dataset.json")
        if self.rescore_record is not None and self.rescore_record.get("state") != "complete":
            raise UserError(
                f"{output} is a rescore that has not finished (being written, or stopped): rerun "
                "`featurize rescore` into it"
            )
        if self.rescore_record is not None:
            self.identity, self.version = dict(self.rescore_record["identity"]), None
        elif dataset is not None:
            self.version = readable_version(dataset)
            self.identity = readable_identity(self.out, dataset)
        else:
            raise UserError(
                f"{output} holds no featurised output (no _dataset.json); is it the OUTPUT of "
                "`featurize images`, `slides` or `rescore`?"
            )
        self.shards = [p for _, p in sorted(self.out.shard_units().items())]
        self.slides = current_names(self.out.read_table("_slides.parquet"), "slides")  # an older OUTPUT's too
        self.prompts = (
            self.out.read_table("_prompts.parquet")
            if self.rescore_record is not None
            else read_prompts(self.out, self.version)
        )
        self.columns = self._columns()

    @property
    def is_slides(self) -> bool:
        return self.slides is not None

    @property
    def keys(self) -> list[str]:
        """The columns that name a row: the image, or the tile."""
        return TILE_KEYS if self.is_slides else IMAGE_KEYS

    @property
    def concepts(self) -> list[str]:
        return self.prompts.column("concept").to_pylist() if self.prompts is not None else []

    @property
    def has_logits(self) -> bool:
        return "concept_logits" in self.columns and self.prompts is not None

    @property
    def scale_bias(self) -> tuple[float, float] | None:
        """The logit scale and bias the concept logits were made with (from _prompts.parquet's metadata)."""
        meta = (self.prompts.schema.metadata or {}).get(b"pipeline.provenance") if self.prompts is not None else None
        if not meta:
            return None
        prov = json.loads(meta)
        if prov.get("logit_scale") is None:
            return None
        return float(prov["logit_scale"]), float(prov.get("logit_bias") or 0.0)

    def _columns(self) -> list[str]:
        if not self.shards:
            return []
        with self.out.fs.open(self.shards[-1], "rb") as f:  # the newest shard: the current version's columns
            return pq.read_schema(f).names

    def current_slides(self) -> pa.Table | None:
        """The slide rows of the current dataset version (all of them in a rescore)."""
        if self.slides is None or self.version is None:
            return self.slides
        return self.slides.filter(pc.equal(self.slides.column("dataset_version"), self.version))

    def require(self, *columns: str, why: str) -> None:
        missing = [c for c in columns if c not in self.columns]
        if not self.shards:
            raise UserError(f"{self.url} holds no shards (part-*.parquet) yet")
        if missing:
            raise UserError(f"{self.url} has no {', '.join(missing)} column ({why})")

    def _current_keys(self) -> pa.Array | None:
        """uri + run_id of the current rows, or None when every row is current (a rescore)."""
        if self.rescore_record is not None:
            return None
        if self.is_slides:
            slides = self.current_slides()
            return _join_keys(slides.column("uri"), slides.column("run_id"))
        index = self.out.committed_index(columns=("uri", "run_id", "dataset_version"))
        index = newest_per_uri(index.filter(pc.equal(index.column("dataset_version"), self.version)))
        return _join_keys(index.column("uri"), index.column("run_id"))

    def chunks(self, columns: list[str]) -> Iterator[pa.Table]:
        """The current rows, shard by shard, with `columns`: for images exactly `pipeline.read_features`' rows (the
        current version, each uri's newest); for slides each slide's tiles from the run in _slides.parquet."""
        keys = self._current_keys()
        extra = [] if keys is None else ["run_id", "dataset_version"]
        for path in self.shards:
            with self.out.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=list(dict.fromkeys([*columns, "uri", *extra])))
            if keys is not None:
                mask = pc.and_(
                    pc.equal(table.column("dataset_version"), self.version),
                    pc.is_in(_join_keys(table.column("uri"), table.column("run_id")), value_set=keys),
                )
                table = table.filter(mask)
            if table.num_rows:
                yield table.select(columns)


def _join_keys(uri, run_id) -> pa.Array:
    joined = pc.binary_join_element_wise(uri, run_id, "\x1f")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def logits_matrix(column) -> np.ndarray:
    """A list<float> column without nulls -> [N, K] float32."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.min_max(pc.list_value_length(column)).as_py()
    if lengths["min"] != lengths["max"]:  # a reshape could succeed and mix rows up: never
        raise UserError(
            f"the rows hold {lengths['min']} to {lengths['max']} values each (multi-crop features: --crops); this "
            "needs one vector of one width per row (--features embedding, or a pooled hidden layer)"
        )
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(column), -1)


def same_location(a: str, b: str, storage_options: dict | None = None) -> bool:
    fs_a, path_a = filesystem(a, storage_options)
    fs_b, path_b = filesystem(b, storage_options)
    return type(fs_a) is type(fs_b) and path_a.rstrip("/") == path_b.rstrip("/")


# -- the model, as the OUTPUT recorded it -----------------------------------------------------------------------------
def recorded_family(source: ScoredOutput) -> families.Family:
    """The model family an OUTPUT's identity names (`kind`)."""
    return identity_family(source.identity, source.url)


def identity_family(identity: dict, url: str) -> families.Family:
    name = identity.get("kind", "")
    try:
        return families.named(name)
    except KeyError:
        raise UserError(f"{url} was made with a model family this version does not know ({name!r})") from None


def recorded_spec(source: ScoredOutput, trust_remote_code: bool, device: str = "auto") -> ModelSpec:
    """The ModelSpec of the run that made `source`: its model, kind, revision and dtype; refuses what cannot be
    rescored (hidden-state features, image towers without text, a model that is not there any more)."""
    identity = source.identity
    if source.rescore_record is not None:
        raise UserError(
            f"{source.url} is itself a rescore (it stores no image_features); rescore its source "
            f"{source.rescore_record.get('source', {}).get('output', '')}".rstrip()
        )
    if "model" not in identity or "kind" not in identity:
        raise UserError(f"{source.url}/_dataset.json names no model (identity.model, identity.kind)")
    family = recorded_family(source)
    features = identity.get("features", "embedding")
    if features != "embedding":
        raise UserError(
            f"{source.url} stores hidden-state features ({features}), not the model's embedding: "
            "concept logits need the embedding (`--features embedding`)"
        )
    if not family.has_text:
        raise UserError(
            f"{source.url} was made with {identity['model']}, an image tower without a text tower: it "
            "cannot score prompts"
        )
    return resolve_recorded(identity, source.url, trust_remote_code, device)


def resolve_recorded(identity: dict, url: str, trust_remote_code: bool, device: str = "auto") -> ModelSpec:
    """The model an OUTPUT's identity records (model, kind, revision, dtype), resolved again on `device`; refuses
    remote code without consent, a model that cannot be loaded here, and a checkpoint of another family now."""
    from .checkpoint import resolve_model

    family = identity_family(identity, url)
    if family.remote_code and not trust_remote_code:
        raise UserError(
            f"{url} was made with {identity['model']}, which runs its own Python code: review it, then pass "
            "--trust-remote-code"
        )
    try:
        spec = resolve_model(
            identity["model"], identity.get("revision"), trust_remote_code, identity.get("dtype") or "auto", device
        )
    except UserError as exc:
        raise UserError(f"{url} was made with model {identity['model']}, which cannot be loaded here: {exc}") from None
    if spec.family is not family:
        raise UserError(
            f"model {identity['model']} is now a {spec.family.title} checkpoint, but {url} was made with a "
            f"{family.title} one: it is not the same model"
        )
    return spec


def load_encoder(spec: ModelSpec):
    """The model as the run loaded it (Encoder also loads the image tower; no image is read)."""
    from .checkpoint import preprocess_spec
    from .models import Encoder

    return Encoder(spec, preprocess_spec(spec))


def check_same_weights(encoder, source: ScoredOutput) -> None:
    """The recorded prompt set must give the recorded text embeddings and scale: otherwise the weights behind the
    model's name changed since the run, and new logits would not be comparable with the old."""
    if source.prompts is None:
        return
    prompts = source.prompts
    recorded = logits_matrix(prompts.column("text_embedding"))
    old = PromptSet(
        tuple(
            Concept(name, tuple(texts))
            for name, texts in zip(prompts.column("concept").to_pylist(), prompts.column("prompts").to_pylist())
        )
    )
    again = encoder.encode_prompts(old)
    cos = float(np.min(np.sum(again * recorded, axis=1))) if len(recorded) else 1.0
    least = 0.999 if str(encoder.dtype).endswith("float32") else 0.99  # bfloat16 differs between devices
    recorded_scale = (source.scale_bias or (None, None))[0]
    scale_moved = recorded_scale is not None and not math.isclose(
        recorded_scale, encoder.logit_scale, rel_tol=1e-3, abs_tol=1e-6
    )
    if cos < least or scale_moved:
        scale = f", logit scale {encoder.logit_scale:g} vs {recorded_scale:g}" if scale_moved else ""
        raise UserError(
            f"model {encoder.spec.model} does not give the text embeddings {source.url} recorded "
            f"(least cosine {cos:.4f} over its {len(recorded)} concepts{scale}): its weights changed "
            "since the run; rescoring needs the same weights"
        )


# -- rescore ----------------------------------------------------------------------------------------------------------
class _ShardSink:
    """Rows in, part-NNNNN.parquet shards of about rows_per_shard rows out (each written atomically)."""

    def __init__(self, out: OutputDir, rows_per_shard: int, metadata: dict):
        self.out, self.rows_per_shard, self.metadata = out, rows_per_shard, metadata
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.written: list[str] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> None:
        if self.pending_rows or not self.written:
            self._flush(self.pending_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending) if self.pending else None
        if table is None:
            return
        head, rest = table.slice(0, rows), table.slice(rows)
        name = shard_name(len(self.written))
        self.out.write_table(head.combine_chunks().replace_schema_metadata(self.metadata), name)
        self.written.append(name)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


class _SlideTopK:
    """Per slide, the top_k highest new logits of each concept seen so far (memory: top_k x K per slide)."""

    def __init__(self, top_k: dict[str, int]):
        self.top_k = top_k
        self.best: dict[str, np.ndarray] = {}

    def add(self, uris: np.ndarray, logits: np.ndarray) -> None:
        for uri in np.unique(uris):
            rows = logits[uris == uri]
            if uri in self.best:
                rows = np.concatenate([self.best[uri], rows])
            self.best[uri] = -np.sort(-rows, axis=0)[: max(1, int(self.top_k.get(uri) or 1))]


def _rescored_slides(slides: pa.Table, tops: _SlideTopK) -> pa.Table:
    from .summary import slide_scores

    rows = slides.to_pylist()
    for row in rows:
        best = tops.best.get(row["uri"])
        if best is None:
            row.update(concept_max=None, concept_topk_mean=None)
            continue
        maxima, topk = slide_scores(best, int(row["top_k"] or 1))
        row.update(concept_max=maxima.tolist(), concept_topk_mean=topk.tolist())
    return pa.Table.from_pylist(rows, schema=slides.schema.remove_metadata())


def _prepare_out2(out2: OutputDir, record: dict) -> list[str]:
    """OUT2 must be empty or an earlier rescore, which this one replaces; marks it unfinished until the end (readers
    refuse it meanwhile) and returns its old shard paths."""
    old = sorted(out2.shard_units().values())
    if out2.read_json("_dataset.json") is not None or (old and out2.read_json("_rescore.json") is None):
        raise UserError(
            f"{out2.url} holds another featurised output; --out needs an empty folder or an earlier rescore's OUT2"
        )
    out2.write_json({**record, "state": "running"}, "_rescore.json")
    return old


def rescore(
    output: str,
    prompts: str,
    out2: str,
    storage_options: dict | None = None,
    batch_rows: int = BATCH_ROWS,
    rows_per_shard: int = ROWS_PER_SHARD,
    trust_remote_code: bool = False,
    device: str = "auto",
    echo=print,
) -> dict:
    """New concept logits for OUTPUT's current rows with the prompt set in `prompts`, into OUT2; returns the
    _rescore.json record."""
    from .prompts import load_prompts
    from .record import iso, new_run_id
    from .schema import metadata_bytes, package_versions, prompts_table, provenance

    started = time.time()
    if batch_rows < 1 or rows_per_shard < 1:
        raise UserError("--batch-size and --rows-per-shard must be at least 1")
    if same_location(output, out2, storage_options):
        raise UserError(f"--out {out2} is OUTPUT itself; rescored logits go to a folder of their own")
    prompt_set = load_prompts(prompts)
    source = ScoredOutput(output, storage_options)
    spec = recorded_spec(source, trust_remote_code, device)
    source.require("image_features", "status", *source.keys, why="rescoring reads the stored image features")
    encoder = load_encoder(spec)
    check_same_weights(encoder, source)
    text = encoder.encode_prompts(prompt_set)
    scale, bias = encoder.logit_scale, encoder.logit_bias
    run_id = new_run_id()
    record = {
        "source": {"output": output, "dataset_version": source.version,
                   "prompt_set_hash": source.identity.get("prompt_set_hash")},
        "identity": {**source.identity, "prompt_set_hash": prompt_set.set_hash},
        "prompt_set_hash": prompt_set.set_hash, "concepts": prompt_set.names, "logit_scale": scale,
        "logit_bias": bias, "run_id": run_id, "started_at": iso(started), "output": out2,
    }  # fmt: skip
    with Lease.acquire(out2, storage_options, run_id):  # one writer per OUT2, as for every OUTPUT
        target = OutputDir(out2, storage_options)
        old_shards = _prepare_out2(target, record)
        extra = {"rescore_of": output, "source_dataset_version": source.version, "logit_scale": scale,
                 "logit_bias": bias}  # fmt: skip
        prov = provenance(spec.identity(), prompt_set.set_hash, run_id, extra)
        sink = _ShardSink(target, rows_per_shard, metadata_bytes(prov))
        slides = source.current_slides()
        tops = None if slides is None else _SlideTopK(
            dict(zip(slides.column("uri").to_pylist(), slides.column("top_k").to_pylist()))
        )  # fmt: skip
        t = time.perf_counter()
        counts = _rescore_rows(source, encoder, text, batch_rows, sink, tops)
        sink.close()
        for path in old_shards:  # an earlier rescore's shards beyond this one's
            if path.rsplit("/", 1)[-1] not in sink.written:
                with_retries(lambda path=path: target.fs.rm(path))
        target.write_table(prompts_table(prompt_set, text, prov), "_prompts.parquet")
        if slides is not None:
            slide_table = _rescored_slides(slides, tops)
            target.write_table(
                slide_table.replace_schema_metadata(metadata_bytes({**prov, "concepts": prompt_set.names})),
                "_slides.parquet",
            )
        record.update(state="complete", counts=counts, shards=len(sink.written), ended_at=iso(time.time()),
                      score_s=round(time.perf_counter() - t, 3), versions=package_versions())  # fmt: skip
        target.write_json(record, "_rescore.json")  # last: OUT2 is complete
        return record


def _rescore_rows(source: ScoredOutput, encoder, text: np.ndarray, batch_rows: int, sink: _ShardSink, tops) -> dict:
    """Every current row of `source`, `batch_rows` at a time: its stored float16 features scored against `text` with
    the model's own formula, error rows kept with null logits, into `sink` (and each slide's top logits into
    `tops`). Returns the counts."""
    counts = {"rows": 0, "ok": 0, "error": 0}
    for chunk in source.chunks([*source.keys, "status", "image_features", "run_id"]):
        for start in range(0, chunk.num_rows, batch_rows):
            part = chunk.slice(start, batch_rows).combine_chunks()
            ok = pc.fill_null(
                pc.and_(pc.equal(part.column("status"), "ok"), pc.is_valid(part.column("image_features"))), False
            )
            ok_np = ok.to_numpy(zero_copy_only=False)
            logits = np.zeros((part.num_rows, len(text)), np.float32)
            if ok_np.any():
                features = logits_matrix(part.column("image_features").filter(ok)).astype(np.float16)
                logits[ok_np] = encoder.logits(features, text)
                if tops is not None:
                    tops.add(np.asarray(part.column("uri").filter(ok).to_pylist(), dtype=object), logits[ok_np])
            columns = {k: part.column(k) for k in source.keys}
            columns.update(
                status=pa.array(np.where(ok_np, "ok", "error").tolist(), pa.string()),
                concept_logits=fixed_list(logits, pa.float32(), ok_np),
                run_id=part.column("run_id"),  # the source row that was rescored
            )
            sink.add(pa.table(columns))
            counts["rows"] += part.num_rows
            counts["ok"] += int(ok_np.sum())
            counts["error"] += int((~ok_np).sum())
    return counts
