"""Featurise very large image collections and whole-slide images with CLIP-family models on Ray."""

__version__ = "0.1.0"


def read_features(output, storage_options=None, exclude_removed=False, columns=None):
    """One current row per input of a featurised OUTPUT, as a pyarrow Table (see pipeline.read)."""
    from .read import read_features as _read

    return _read(output, storage_options, exclude_removed, columns)


def top_k(table, k, concepts, *, kind, softmax=False):
    """The top k concepts of each ok row of a table with concept_logits: key columns, rank, concept, logit,
    probability (softmax over concepts for CLIP or with softmax=True, sigmoid otherwise; see pipeline.labels)."""
    from .labels import top_k as _top_k

    return _top_k(table, k, concepts, kind=kind, softmax=softmax)
