"""`featurize labels`: zero-shot labels, the top K concepts of each ok row by its stored concept logits.

Probabilities follow the model family's recipe: a softmax over all concepts for CLIP (its zero-shot
classification), a sigmoid per concept for SigLIP and ConceptCLIP (trained with a sigmoid loss); `softmax=True`
forces the softmax. Rank 1 is the argmax of the logits (the first concept among equal logits).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import families
from .errors import UserError
from .rescore import TILE_KEYS, ScoredOutput, logits_matrix

OUTPUT_SUFFIXES = (".parquet", ".csv")


def probability_rule(kind: str) -> str:
    """ "softmax" or "sigmoid": how the family an OUTPUT's identity names (`kind`) turns logits into probabilities."""
    try:
        family = families.named(kind)
    except KeyError:
        family = None
    if family is None or not family.has_text:
        scoring = ", ".join(f.name for f in families.FAMILIES if f.has_text)
        raise UserError(f"model kind {kind!r} has no concept logits to label (expected one of {scoring})")
    return family.probability


def probabilities(logits: np.ndarray, kind: str, softmax: bool = False) -> np.ndarray:
    """[N, K] logits -> [N, K] probabilities (float64): softmax over concepts for CLIP or when asked, else
    sigmoid per concept."""
    logits = np.asarray(logits, np.float64)
    if softmax or probability_rule(kind) == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, without overflow for large |logit|


def top_k(table: pa.Table, k: int, concepts: list[str], *, kind: str, softmax: bool = False) -> pa.Table:
    """The top k concepts of each ok row of `table` (a table with concept_logits, e.g. from read_features):
    the row's key columns (uri; slide_id, x, y, level for tiles), rank (1..k), concept, logit, probability.
    Rows with status error or null logits are left out."""
    if k < 1:
        raise UserError(f"--top-k must be at least 1, not {k}")
    if "concept_logits" not in table.column_names:
        raise UserError("the table has no concept_logits column")
    keep = pc.is_valid(table.column("concept_logits"))
    if "status" in table.column_names:
        keep = pc.and_(keep, pc.fill_null(pc.equal(table.column("status"), "ok"), False))
    table = table.filter(keep)
    keys = [c for c in (TILE_KEYS if "slide_id" in table.column_names else ["uri"]) if c in table.column_names]
    logits = logits_matrix(table.column("concept_logits"))
    n = table.num_rows
    if n and logits.shape[1] != len(concepts):
        raise UserError(f"the rows have {logits.shape[1]} concept logits but {len(concepts)} concepts are named")
    k = min(k, len(concepts))
    probs = probabilities(logits.reshape(n, len(concepts)), kind, softmax)
    order = np.argsort(-logits.reshape(n, len(concepts)), axis=1, kind="stable")[:, :k]  # ties: the first concept
    rows = np.repeat(np.arange(n), k)
    top = order.reshape(-1)
    columns = {c: table.column(c).take(pa.array(rows)) for c in keys}
    columns.update(
        rank=pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n), pa.int32()),
        concept=pa.array(np.asarray(concepts, dtype=object)[top] if n else [], pa.string()),
        logit=pa.array(logits.reshape(n, len(concepts))[rows, top], pa.float32()),
        probability=pa.array(probs[rows, top].astype(np.float32), pa.float32()),
    )
    return pa.table(columns)


def table_bytes(table: pa.Table, path: str) -> bytes:
    """The table as .parquet or .csv bytes, by the path's suffix."""
    check_suffix(path)
    sink = io.BytesIO()
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="zstd")
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sink)
    return sink.getvalue()


def check_suffix(path: str, option: str = "--out") -> None:
    if not path.lower().endswith(OUTPUT_SUFFIXES):
        raise UserError(f"{option} {path}: write a .parquet or .csv file")


def label_output(output: str, k: int, storage_options: dict | None = None, softmax: bool = False) -> pa.Table:
    """`top_k` over every current ok row of an OUTPUT (images, slides or a rescore)."""
    source = ScoredOutput(output, storage_options)
    if not source.shards:
        raise UserError(f"{output} holds no shards (part-*.parquet) yet: no run has committed a work unit there")
    if not source.has_logits:
        raise UserError(
            f"{output} has no concept logits (a features-only run); score it with `featurize rescore "
            f"{output} --prompts P.yaml --out OUT2`, then label OUT2"
        )
    kind = source.identity.get("kind", "")
    keys = [c for c in source.keys if c in source.columns] if source.is_slides else ["uri"]
    parts = [
        top_k(chunk, k, source.concepts, kind=kind, softmax=softmax)
        for chunk in source.chunks([*keys, "status", "concept_logits"])
    ]
    if parts:
        return pa.concat_tables(parts)
    return top_k(
        pa.table(
            {
                **{c: pa.array([], pa.string()) for c in keys},
                "status": pa.array([], pa.string()),
                "concept_logits": pa.array([], pa.list_(pa.float32())),
            }
        ),
        k,
        source.concepts,
        kind=kind,
        softmax=softmax,
    )
