"""Featurise very large image collections and whole-slide images with CLIP-family models on Ray."""

__version__ = "0.1.0"


def read_features(output, storage_options=None, exclude_removed=False, columns=None, version=None):
    """One current row per input of a featurised OUTPUT, as a pyarrow Table (see pipeline.read)."""
    from .read import read_features as _read

    return _read(output, storage_options, exclude_removed, columns, version)


def open_features(output, storage_options=None, version=None, exclude_removed=False):
    """The current rows as a lazy DuckDB relation, which DuckDB queries and Polars reads (see pipeline.read)."""
    from .read import open_features as _open

    return _open(output, storage_options, version, exclude_removed)


def read_prompts(output, storage_options=None, version=None):
    """The prompt table of a dataset version (default: the readable one): concept names in the order of every row's
    concept_logits, prompts and text embeddings (see pipeline.read)."""
    from .read import read_prompts as _read

    return _read(output, storage_options, version)


def top_k(table, k, concepts, *, kind, softmax=False):
    """The top k concepts of each ok row of a table with concept_logits: key columns, rank, concept, logit,
    probability (softmax over concepts for CLIP or with softmax=True, sigmoid otherwise; see pipeline.labels)."""
    from .labels import top_k as _top_k

    return _top_k(table, k, concepts, kind=kind, softmax=softmax)
