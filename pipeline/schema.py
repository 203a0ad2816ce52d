"""The output contract: Parquet schemas, provenance, and the prompt table. Other tools read these."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

import numpy as np
import pyarrow as pa

from .prompts import PromptSet

IMAGE_COLUMNS = [
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
]
RESULT_COLUMNS = [
    ("image_features", pa.list_(pa.float16())),
    ("concept_logits", pa.list_(pa.float32())),
]
SOURCE_COLUMNS = [  # what the listing knew of the input, so incremental runs can tell a changed file
    ("size", pa.int64()),
    ("mtime", pa.float64()),
    ("etag", pa.string()),
    ("run_id", pa.string()),
    ("dataset_version", pa.int32()),
]
IMAGE_SCHEMA = pa.schema(IMAGE_COLUMNS + RESULT_COLUMNS + SOURCE_COLUMNS)

_PACKAGES = ("pipeline-featurize", "torch", "transformers", "ray", "pyarrow", "pillow", "numpy", "fsspec")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(model_identity: dict, prompt_hash: str, run_id: str, extra: dict | None = None) -> dict:
    """What produced the numbers; repeated in every Parquet file's key-value metadata. Never holds secrets."""
    return {
        "extractor": "pipeline-featurize",
        **model_identity,
        "prompt_set_hash": prompt_hash,
        "run_id": run_id,
        "versions": package_versions(),
        "command": _COMMAND if _COMMAND is not None else " ".join(_safe_argv()),
        **(extra or {}),
    }


MASK = "****"
_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwd", "key", "keys", "credential",
                           "credentials"})
_COMMAND: str | None = None


def is_secret_dest(dest: str) -> bool:
    """True for an option whose value may carry credentials: storage_options, and any destination with
    token/secret/password/key/credentials as a whole word (hf_token, api_key, aws_secret)."""
    name = dest.lower().replace("-", "_").strip("_")
    return name == "storage_options" or bool(set(name.split("_")) & _SECRET_WORDS)


def set_command(command: str | None) -> None:
    """The command line as provenance records it, already masked (the CLI sets it from its parser, which knows
    each option's destination); None falls back to masking sys.argv by spelling (library use)."""
    global _COMMAND
    _COMMAND = command


def _safe_argv() -> list[str]:
    """sys.argv with the values of options that may carry credentials masked.

    Only a fallback for library use, where no parser says what an option is: an option is taken as secret when
    its name reads as a secret destination (see is_secret_dest) or is any prefix of --storage-options (another
    program's parser may accept abbreviations)."""
    out, mask_next = [], False
    for arg in sys.argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        key = arg.split("=", 1)[0]
        name = key.lstrip("-")
        if key.startswith("-") and name and (is_secret_dest(name) or
                                             (key.startswith("--") and "storage-options".startswith(
                                                 name.replace("_", "-")))):
            out.append(key + ("=" + MASK if "=" in arg else ""))
            mask_next = "=" not in arg
            continue
        out.append(arg)
    return out


def metadata_bytes(prov: dict) -> dict[bytes, bytes]:
    return {b"pipeline.provenance": json.dumps(prov, sort_keys=True, default=str).encode("utf-8")}


def fixed_list(values: np.ndarray, value_type: pa.DataType, valid: np.ndarray) -> pa.Array:
    """[N,D] numpy -> list<value_type> with nulls where not valid (error rows)."""
    n, d = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    mask = pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def error_column(errors) -> pa.Array:
    """The `error` column: the reason, or null. Ray Data hands an all-None object column back as float NaN, which
    must become null, never the string "nan"."""
    return pa.array([None if e is None or (isinstance(e, (float, np.floating)) and e != e) else str(e) for e in errors],
                    pa.string())


def logits_column(cols: dict, ok: np.ndarray) -> pa.Array:
    """The `concept_logits` column of a shard; all nulls in features-only runs (then dropped by
    without_absent_logits)."""
    if "concept_logits" not in cols:
        return pa.nulls(len(ok), pa.list_(pa.float32()))
    return fixed_list(np.asarray(cols["concept_logits"], np.float32), pa.float32(), ok)


def without_absent_logits(cols: dict, table: pa.Table) -> pa.Table:
    """Features-only runs (no prompt set) have no `concept_logits` column at all."""
    return table if "concept_logits" in cols else table.drop_columns(["concept_logits"])


def prompts_table(prompt_set: PromptSet, text_embeddings: np.ndarray, prov: dict) -> pa.Table:
    table = pa.table({
        "concept": pa.array(prompt_set.names, pa.string()),
        "prompts": pa.array([list(c.prompts) for c in prompt_set.concepts], pa.list_(pa.string())),
        "text_embedding": fixed_list(np.asarray(text_embeddings, np.float32), pa.float32(),
                                     np.ones(len(prompt_set.concepts), bool)),
        "prompt_set_hash": pa.array([prompt_set.set_hash] * len(prompt_set.concepts), pa.string()),
    })
    return table.replace_schema_metadata(metadata_bytes(prov))
