"""`featurize search`: the rows of an OUTPUT nearest to a text or an image, by the cosine similarity of the features.

Queries are embedded as a run embeds, by the model OUTPUT's _dataset.json records (on CPU):
  - text by the text tower exactly as prompts are (`Encoder.encode_prompts` over a one-concept prompt set: the same
    tokenizer, padding, truncation and normalisation); templates wrap it, several are ensembled as a concept's are;
  - an image read and resized by `pipeline.decode` as the run's decode stage does (fast decoding when the run used
    it), then encoded by the image tower (`Encoder.encode_images`, or `encode_hidden` for hidden-state features).
Rows come from the index (OUTPUT/_index, or another folder) when there is one, else from an exact scan of the current
rows, shard by shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .dataset import readable_version
from .errors import UserError
from .index import Index, check_identity, coverage, default_index_dir, load_index, read_meta
from .prompts import Concept, PromptSet
from .rescore import IMAGE_KEYS, TILE_KEYS, identity_family, resolve_recorded
from .vectors import check_one_vector_a_row, feature_identity, normalised, open_vectors, read_dataset
from .write import OutputDir


@dataclass
class Query:
    """What was asked: `text` or `image`, and its L2-normalised float32 vector [1, D]."""

    text: str | None
    image: str | None
    vector: np.ndarray
    encode_s: float
    image_bytes: bytes | None = None

    @property
    def label(self) -> str:
        return f"text {self.text!r}" if self.text is not None else f"image {self.image}"


def query_encoder(output: str, identity: dict, text: bool, trust_remote_code: bool):
    """The model OUTPUT was made with, loaded on CPU; refuses text queries the features cannot answer."""
    from .rescore import load_encoder

    if "model" not in identity or "kind" not in identity:
        raise UserError(f"{output}/_dataset.json names no model (identity.model, identity.kind)")
    features = identity.get("features", "embedding")
    if text and features != "embedding":
        raise UserError(
            f"{output} stores hidden-state features ({features}), which have no text counterpart: search it with "
            "--image"
        )
    check_one_vector_a_row(identity, output)
    if text and not identity_family(identity, output).has_text:
        raise UserError(
            f"{output} was made with {identity['model']}, an image tower without a text tower: search it with --image"
        )
    return load_encoder(resolve_recorded(identity, output, trust_remote_code, "cpu"))


def text_vector(encoder, text: str, templates: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """[1, D]: the text as a concept of a prompt set, wrapped by each template ('{}' marks the text), ensembled."""
    if not text.strip():
        raise UserError("--text is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"--template {bad[0]!r} has no '{{}}' where the query goes")
    prompts = tuple(t.replace("{}", text) for t in templates) or (text,)
    return encoder.encode_prompts(PromptSet((Concept(text, prompts),)))


def image_vector(encoder, identity: dict, data: bytes, name: str) -> np.ndarray:
    """[1, D] from an image's bytes, decoded, resized and encoded as the run did (normalised for hidden states)."""
    from .checkpoint import parse_features, with_views
    from .config import RunConfig
    from .decode import decode_one

    max_pixels = RunConfig.model_fields["max_image_pixels"].default
    try:
        pixels, _, _ = decode_one(data, encoder.preprocess, max_pixels, bool(identity.get("fast_decode")))
    except ValueError as exc:
        raise UserError(f"--image {name}: {exc}") from None
    batch = np.array(pixels)[None]  # a writable copy: torch takes it as it is
    features = with_views(parse_features(identity.get("features", "embedding")), "", identity.get("merge", ""))
    if not features.hidden:
        return normalised(encoder.encode_images(batch))
    return normalised(encoder.encode_hidden(batch, features))


def embed_query(
    output: str,
    text: str | None = None,
    image: str | None = None,
    templates: list[str] | tuple[str, ...] = (),
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
) -> Query:
    """The query's vector, made with OUTPUT's model (exactly one of text and image)."""
    from .decode import read_input

    if (text is None) == (image is None):
        raise UserError("give one query: --text TEXT or --image PATH_OR_URI")
    identity = dict(read_dataset(OutputDir(output, storage_options)).get("identity", {}))
    data = None
    if image is not None:
        try:
            data = read_input(image, storage_options)
        except FileNotFoundError:
            raise UserError(f"--image {image} does not exist") from None
        except OSError as exc:
            raise UserError(f"--image {image} cannot be read ({type(exc).__name__}: {exc})") from None
    encoder = query_encoder(output, identity, text is not None, trust_remote_code)
    started = time.perf_counter()
    vector = text_vector(encoder, text, templates) if text is not None else image_vector(encoder, identity, data, image)
    return Query(text, image, np.asarray(vector, np.float32), time.perf_counter() - started, data)


# -- searching ------------------------------------------------------------------------------------------------------
def search(
    output: str,
    query: np.ndarray,
    k: int = 20,
    index_dir: str | None = None,
    exact: bool = False,
    nprobe: int | None = None,
    storage_options: dict | None = None,
    echo=print,
) -> tuple[pa.Table, dict]:
    """The k current rows nearest to `query` ([1, D], normalised): rank, score (cosine), the row's keys; and how
    they were found (`source`: 'index' or 'exact', `seconds`, index facts)."""
    if k < 1:
        raise UserError(f"--k must be at least 1, not {k}")
    dataset = read_dataset(OutputDir(output, storage_options))
    wanted = feature_identity(dict(dataset.get("identity", {})), readable_version(dataset))
    chosen = index_dir or default_index_dir(output)
    meta = None if exact else read_meta(chosen, storage_options)
    if meta is None and index_dir and not exact:
        raise UserError(f"--index {index_dir} holds no index (no _index.json); make one with `featurize index`")
    if meta is not None:
        fix = "make it again with `featurize index OUTPUT --rebuild`, or pass --exact"
        check_identity(meta, wanted, output, chosen, fix)
        loaded = load_index(chosen, storage_options)
        _warn_if_stale(loaded, output, storage_options, echo)
        started = time.perf_counter()
        table = _from_index(loaded, query, k, nprobe)
        info = {"source": "index", "factory": meta.get("factory"), "nprobe": nprobe or meta.get("nprobe")}
        return table, {**info, "rows": loaded.rows, "seconds": time.perf_counter() - started}
    started = time.perf_counter()
    vectors = open_vectors(output, storage_options)
    table = _exact(vectors, query, k)
    return table, {"source": "exact", "rows": vectors.rows.num_rows, "seconds": time.perf_counter() - started}


def _check_dim(query: np.ndarray, dim: int | None, where: str) -> None:
    if dim is not None and query.shape[1] != dim:
        raise UserError(
            f"the query has {query.shape[1]} dimensions but {where} has {dim}: the model behind its name changed"
        )


def _from_index(loaded: Index, query: np.ndarray, k: int, nprobe: int | None) -> pa.Table:
    _check_dim(query, loaded.meta.get("dim"), f"index {loaded.index_dir}")
    scores, ids = loaded.search(query, k, nprobe)
    found = ids[0] >= 0
    scores, ids = scores[0][found], ids[0][found]
    order = np.lexsort((ids, -scores))  # ties: the earlier row, as the exact scan orders them
    return _results(loaded.rows_of(ids[order]).select(loaded.meta["keys"]), scores[order])


def _exact(vectors, query: np.ndarray, k: int) -> pa.Table:
    """Every current row scored, the best k kept as the shards stream past (ties: the earlier row)."""
    best_scores = np.zeros(0, np.float32)
    best_rows = np.zeros(0, np.int64)
    done = 0
    for batch, features in vectors.batches():
        _check_dim(query, features.shape[1], vectors.url)
        scores = np.concatenate([best_scores, features @ query[0]])
        rows = np.concatenate([best_rows, np.arange(done, done + batch.num_rows)])
        keep = np.lexsort((rows, -scores))[:k]
        best_scores, best_rows = scores[keep], rows[keep]
        done += batch.num_rows
    return _results(vectors.rows.take(pa.array(best_rows, pa.int64())).select(vectors.keys), best_scores)


def _results(rows: pa.Table, scores: np.ndarray) -> pa.Table:
    n = rows.num_rows
    columns = {
        "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        "score": pa.array(np.asarray(scores, np.float32)),
    }
    return pa.table({**columns, **{c: rows.column(c) for c in rows.column_names}})


def _warn_if_stale(loaded: Index, output: str, storage_options: dict | None, echo) -> None:
    now = coverage(OutputDir(output, storage_options))
    made = loaded.meta.get("coverage", {})
    if now != made:
        newer = len(set(now["shards"]) - set(made.get("shards", [])))
        echo(
            f"featurize: warning: index {loaded.index_dir} is older than {output} ({newer} newer shard(s)"
            f"{', slides rescored' if now.get('slides') != made.get('slides') else ''}): `featurize index "
            f"{output}` brings it up to date"
        )


def results_text(table: pa.Table) -> str:
    """The results as tab-separated lines with a header (for a terminal)."""
    keys = [c for c in (TILE_KEYS if "slide_id" in table.column_names else IMAGE_KEYS) if c != "image_id"]
    if "slide_id" in table.column_names:
        keys = ["slide_id", "x", "y", "level", "uri"]
    lines = ["\t".join(["rank", "score", *keys])]
    for row in table.to_pylist():
        lines.append("\t".join([str(row["rank"]), f"{row['score']:.4f}", *(str(row[c]) for c in keys)]))
    return "\n".join(lines)
