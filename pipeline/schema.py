"""The output contract: Parquet schemas, provenance, and the prompt table. Other tools read these."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
# With embedding features, after image_features: image_features * embedding_norm = the embedding before normalisation
EMBEDDING_NORM_FIELD = pa.field("embedding_norm", pa.float32())
SOURCE_COLUMNS = [  # what the listing knew of the input, so incremental runs can tell a changed file
    ("size", pa.int64()),
    ("mtime", pa.float64()),
    ("etag", pa.string()),
    ("run_id", pa.string()),
    ("dataset_version", pa.int32()),
]
IMAGE_SCHEMA = pa.schema(IMAGE_COLUMNS + RESULT_COLUMNS + SOURCE_COLUMNS)

# -- whole-slide images: tile shards, the per-slide table, the tile plan ------------------------------------------
TILE_COLUMNS = [
    ("slide_id", pa.string()),
    ("uri", pa.string()),
    ("x", pa.int64()),  # level-0 pixels, top-left corner
    ("y", pa.int64()),
    ("level", pa.int32()),  # the pyramid level the tile was read from
    ("tile_px", pa.int32()),
    ("tile_mpp", pa.float64()),  # the tile's microns per pixel at tile_px
    ("tissue_fraction", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
]
TILE_SCHEMA = pa.schema(TILE_COLUMNS + RESULT_COLUMNS + SOURCE_COLUMNS)
CONCEPT_MAPS_FIELD = pa.field("concept_maps", pa.list_(pa.float16()))  # [K, P, P] per tile, flattened

SLIDE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("reader", pa.string()),
        ("slide_mpp", pa.float64()),  # level-0 microns per pixel
        ("mpp_source", pa.string()),  # slide_mpp | aperio.MPP | tiff.XResolution | <reader>.mpp-x
        ("width", pa.int64()),  # level-0 pixels
        ("height", pa.int64()),
        ("level_count", pa.int32()),
        ("n_tiles", pa.int64()),
        ("n_tile_errors", pa.int64()),
        ("level", pa.int32()),
        ("read_px", pa.int32()),
        ("footprint_px", pa.int32()),  # a tile's side in level-0 pixels
        ("step_px", pa.int32()),  # level-0 pixels between neighbouring tiles
        ("tile_px", pa.int32()),
        ("tile_mpp", pa.float64()),  # a tile's microns per pixel at tile_px
        ("top_k", pa.int32()),
        ("concept_max", pa.list_(pa.float32())),  # per concept (the order of _prompts.parquet): the highest tile logit
        ("concept_topk_mean", pa.list_(pa.float32())),  # and the mean of the top_k highest
        ("plan_s", pa.float64()),
    ]
    + SOURCE_COLUMNS
)

# The run's tiles in work-unit order (plus `unit` and `row`): what read_tiles needs and the shards repeat.
PLAN_TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("reader", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("level", pa.int32()),
        ("read_px", pa.int32()),
        ("tile_mpp", pa.float64()),
        ("tissue_fraction", pa.float32()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("etag", pa.string()),
    ]
)

# Columns renamed since OUTPUTs were first written, per table: old name -> today's. The files of an OUTPUT are never
# rewritten, so every reader passes what it read through `current_names` (or DuckDB SQL through `current_names_sql`)
# and an OUTPUT written before a rename reads as a new one.
RENAMED_COLUMNS = {
    "tiles": {"mpp": "tile_mpp"},  # tile shards (TILE_SCHEMA)
    "slides": {"mpp": "slide_mpp"},  # _slides.parquet and _runs/<run-id>.slides.parquet (SLIDE_SCHEMA)
}


def current_names(table: pa.Table | None, kind: str) -> pa.Table | None:
    """`table` (rows of `kind`, "tiles" or "slides"; None stays None) with each renamed column under today's name.
    When it holds both names (shards from before and after a rename scanned together, a column a shard lacks read as
    nulls), the old column fills the new one's nulls and is dropped."""
    if table is None:
        return None
    for old, new in RENAMED_COLUMNS[kind].items():
        names = table.column_names
        if old not in names:
            continue
        if new not in names:
            table = table.rename_columns([new if name == old else name for name in names])
        else:
            table = table.set_column(names.index(new), new, pc.coalesce(table.column(new), table.column(old)))
            table = table.drop_columns([old])
    return table


def current_names_sql(columns: list[str], kind: str) -> str:
    """`current_names` for DuckDB: the select list that gives a relation with `columns` (shards read with
    union_by_name) today's column names."""
    select, renames = "*", []
    for old, new in RENAMED_COLUMNS[kind].items():
        if old in columns and new in columns:
            select += f" EXCLUDE ({old}) REPLACE (coalesce({new}, {old}) AS {new})"
        elif old in columns:
            renames.append(f"{old} AS {new}")
    return select + (f" RENAME ({', '.join(renames)})" if renames else "")


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
_SECRET_WORDS = frozenset(
    {"token", "secret", "secrets", "password", "passwd", "key", "keys", "credential", "credentials"}
)
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
        if (
            key.startswith("-")
            and name
            and (
                is_secret_dest(name) or (key.startswith("--") and "storage-options".startswith(name.replace("_", "-")))
            )
        ):
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
    if n * d > 2**31 - 1:  # int32 offsets would wrap: shards are sized to stay below (plan.shard_rows)
        raise ValueError(
            f"a list column of {n} rows x {d} values passes Arrow's 2^31 list offsets; use fewer rows per shard"
        )
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    mask = pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def ragged_list(values: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[N,W] numpy rows, each padded at its end -> list<float16> of each row's first lengths[i] values, null where not
    valid (error rows)."""
    valid = np.asarray(valid, dtype=bool)
    lengths = np.where(valid, np.asarray(lengths, dtype=np.int64), 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] > 2**31 - 1:  # int32 offsets would wrap: shards are sized to stay below (plan.shard_rows)
        raise ValueError(
            f"a list column of {offsets[-1]} values passes Arrow's 2^31 list offsets; use fewer rows per shard"
        )
    kept = values[np.arange(values.shape[1]) < lengths[:, None]]  # row-major: each row's values in order
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(kept, type=pa.float16()), mask=pa.array(~valid)
    )


# Multi-crop (HD) rows: the crops' grid (rows, columns; the global view not counted) and the row's feature shape
# [1 + rows * columns, tokens, width], inserted after image_features
MULTI_CROP_FIELDS = [pa.field("crop_grid", pa.list_(pa.int32())), pa.field("feature_shape", pa.list_(pa.int32()))]


def features_column(cols: dict, ok: np.ndarray) -> pa.Array:
    """The `image_features` column: rows of one width, or with crops each row's own length (its feature_shape)."""
    if "feature_shape" not in cols:
        return fixed_list(np.asarray(cols["image_features"], np.float16), pa.float16(), ok)
    lengths = np.prod(np.asarray(cols["feature_shape"], np.int64), axis=1)
    return ragged_list(np.asarray(cols["image_features"], np.float16), lengths, ok)


def with_crop_columns(cols: dict, ok: np.ndarray, table: pa.Table) -> pa.Table:
    """A shard of multi-crop rows gets crop_grid and feature_shape after image_features (null on error rows)."""
    if "feature_shape" not in cols:
        return table
    at = table.schema.get_field_index("image_features") + 1
    for offset, field in enumerate(MULTI_CROP_FIELDS):
        values = np.asarray(cols[field.name], np.int32)
        table = table.add_column(at + offset, field, fixed_list(values, pa.int32(), ok))
    return table


def error_column(errors) -> pa.Array:
    """The `error` column: the reason, or null. Ray Data hands an all-None object column back as float NaN, which
    must become null, never the string "nan"."""
    return pa.array(
        [None if e is None or (isinstance(e, (float, np.floating)) and e != e) else str(e) for e in errors], pa.string()
    )


def nullable(values, type_: pa.DataType) -> pa.Array:
    """A column that came through Ray Data's numpy batches: None, and the NaN Ray Data makes of nulls, become null."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        missing = np.isnan(values)
        return pa.array(np.where(missing, 0, values).astype(type_.to_pandas_dtype()), type_, mask=missing)
    if values.dtype.kind in "iu":
        return pa.array(values, type_)
    return pa.array(
        [
            None
            if v is None or (isinstance(v, (float, np.floating)) and v != v)
            else (str(v) if pa.types.is_string(type_) else v)
            for v in values
        ],
        type_,
    )


def source_columns(cols: dict) -> list[pa.Array]:
    """size, mtime and etag of each row, as the listing knew them."""
    return [
        nullable(cols["size"], pa.int64()),
        nullable(cols["mtime"], pa.float64()),
        nullable(cols["etag"], pa.string()),
    ]


def logits_column(cols: dict, ok: np.ndarray) -> pa.Array:
    """The `concept_logits` column of a shard; all nulls in features-only runs (then dropped by
    without_absent_logits)."""
    if "concept_logits" not in cols:
        return pa.nulls(len(ok), pa.list_(pa.float32()))
    return fixed_list(np.asarray(cols["concept_logits"], np.float32), pa.float32(), ok)


def without_absent_logits(cols: dict, table: pa.Table) -> pa.Table:
    """Features-only runs (no prompt set) have no `concept_logits` column at all; embedding features add
    `embedding_norm` after `image_features` (null on error rows)."""
    table = table if "concept_logits" in cols else table.drop_columns(["concept_logits"])
    if "embedding_norm" in cols:
        ok = np.asarray(cols["status"]) == "ok"
        norms = pa.array(np.asarray(cols["embedding_norm"], np.float32), pa.float32(), mask=~ok)
        table = table.add_column(table.column_names.index("image_features") + 1, EMBEDDING_NORM_FIELD, norms)
    return table


def prompts_table(prompt_set: PromptSet, text_embeddings: np.ndarray, prov: dict) -> pa.Table:
    table = pa.table(
        {
            "concept": pa.array(prompt_set.names, pa.string()),
            "prompts": pa.array([list(c.prompts) for c in prompt_set.concepts], pa.list_(pa.string())),
            "text_embedding": fixed_list(
                np.asarray(text_embeddings, np.float32), pa.float32(), np.ones(len(prompt_set.concepts), bool)
            ),
            "prompt_set_hash": pa.array([prompt_set.set_hash] * len(prompt_set.concepts), pa.string()),
        }
    )
    return table.replace_schema_metadata(metadata_bytes(prov))
