"""`featurize export`: per-slide bags of tile features for slide-level (multiple-instance) training, in CLAM's or
TRIDENT's layout, from the current tiles of a `featurize slides` OUTPUT.

DIR (--out), local or an fsspec URL:
  clam      h5_files/<slide_id>.h5   `features` [N, D] float32, `coords` [N, 2] int32 (level-0 x, y of each tile's
                                     top-left corner); `coords` attributes patch_size and patch_level (the tile's
                                     size in pixels of the level it was read from, and that level), downsample, name,
                                     as CLAM's patching writes them
            pt_files/<slide_id>.pt   the same features as one torch tensor [N, D] float32 (torch.save)
  trident   <slide_id>.h5            `features` [N, D] float32 (attributes name, savetodir), `coords` [N, 2] int64
                                     with TRIDENT's attributes patch_size (pixels at the target magnification),
                                     patch_size_level0, level0_magnification, target_magnification, overlap, name,
                                     savetodir; magnification = 10 / microns per pixel (0.5 um/px = 20x)
  _export.json                       what was exported: the source OUTPUT, layout, features, and per slide the run
                                     its tiles came from and how many; written last

Each file is written whole or not at all (a local temp name renamed, or one upload). Tiles are each slide's ok tiles
from the run `_slides.parquet` names (the rows `read_features` gives), in row-major order (y, then x).

Streamed slide by slide: the shards are read in unit order, a slide's rows are gathered while the shards holding
them pass (a run plans each slide's tiles into consecutive units) and written as soon as a shard without them comes;
only the slides under way are in memory. Incremental: a slide whose run is the one `_export.json` records is left
as it is (its shards are not even read), a slide no longer in OUTPUT loses its files.

Features: `normalized` are the stored L2-normalised image features; `projected` multiplies them by `embedding_norm`
(the norm of the model's projected image embedding before normalisation, stored by runs with `--features
embedding`), giving the unnormalised embedding ConceptCLIP's own whole-slide recipe trains on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .rescore import ScoredOutput, _join_keys
from .storage import exists, filesystem, join, with_retries, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

FORMATS = ("clam", "trident")
FEATURES = ("normalized", "projected")
MANIFEST = "_export.json"
NORM_COLUMN = "embedding_norm"


@dataclass(frozen=True)
class Bag:
    """One slide's bag: its features [N, D], level-0 coords [N, 2] and its `_slides.parquet` row."""

    slide: dict
    features: np.ndarray
    coords: np.ndarray


# -- the files of one bag -------------------------------------------------------------------------------------------
def bag_files(fmt: str, slide_id: str) -> list[str]:
    """The files (relative to DIR) that hold one slide's bag."""
    return [f"h5_files/{slide_id}.h5", f"pt_files/{slide_id}.pt"] if fmt == "clam" else [f"{slide_id}.h5"]


def magnification(mpp: float) -> float:
    """Objective magnification by the usual convention: 10 / microns per pixel (0.5 um/px is 20x)."""
    return 10.0 / float(mpp)


def overlap_px(slide: dict) -> int:
    """Pixels (at the tile size) a tile shares with its neighbour, from the footprint and the step."""
    footprint, step = int(slide["footprint_px"]), int(slide["step_px"])
    return int(round(int(slide["tile_px"]) * (footprint - step) / footprint))


def h5_bytes(bag: Bag, fmt: str, out: str) -> bytes:
    """The bag as an HDF5 file in `fmt`'s layout (see the module docstring)."""
    import h5py

    slide = bag.slide
    name = str(slide["slide_id"])
    with tempfile.TemporaryDirectory(prefix="featurize-export-") as scratch:
        path = os.path.join(scratch, "bag.h5")
        with h5py.File(path, "w") as f:
            features = f.create_dataset("features", data=bag.features.astype(np.float32))
            if fmt == "clam":
                coords = f.create_dataset("coords", data=bag.coords.astype(np.int32))
                downsample = float(slide["footprint_px"]) / float(slide["read_px"])
                coords.attrs.update(
                    patch_size=int(slide["read_px"]),
                    patch_level=int(slide["level"]),
                    downsample=np.array([downsample, downsample]),
                    name=name,
                    save_path=join(out, "h5_files"),
                )
            else:
                features.attrs.update(name=name, savetodir=out)
                coords = f.create_dataset("coords", data=bag.coords.astype(np.int64))
                coords.attrs.update(
                    patch_size=int(slide["tile_px"]),
                    patch_size_level0=int(slide["footprint_px"]),
                    level0_magnification=magnification(slide["slide_mpp"]),
                    target_magnification=magnification(slide["tile_mpp"]),
                    overlap=overlap_px(slide),
                    name=name,
                    savetodir=out,
                )
        with open(path, "rb") as f:
            return f.read()


def pt_bytes(features: np.ndarray) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), buffer)
    return buffer.getvalue()


def write_bag(bag: Bag, fmt: str, out: str, storage_options: dict | None) -> list[str]:
    """Write one slide's files, each atomically; returns their paths relative to DIR."""
    files = bag_files(fmt, _safe_id(bag.slide["slide_id"]))
    write_bytes_atomic(join(out, files[0]), h5_bytes(bag, fmt, out), storage_options)
    if fmt == "clam":
        write_bytes_atomic(join(out, files[1]), pt_bytes(bag.features), storage_options)
    return files


def _safe_id(slide_id: str) -> str:
    """A slide id as a relative file path (ids are relative paths when names collide): no '..', not absolute."""
    parts = [p for p in str(slide_id).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


# -- the slides and their rows --------------------------------------------------------------------------------------
def slides_to_export(source: ScoredOutput) -> pa.Table:
    """The current slide rows with ok tiles, sorted by slide_id."""
    slides = source.current_slides()
    ok = pc.greater(pc.subtract(slides.column("n_tiles"), pc.fill_null(slides.column("n_tile_errors"), 0)), 0)
    return slides.filter(pc.fill_null(ok, False)).sort_by("slide_id")


def feature_matrix(table: pa.Table, features: str) -> np.ndarray:
    """[N, D] float32 from image_features, times embedding_norm for `projected`."""
    column = table.column("image_features").combine_chunks()
    matrix = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(table.num_rows, -1)
    if features == "projected":
        matrix = matrix * np.asarray(table.column(NORM_COLUMN).to_numpy(zero_copy_only=False), np.float32)[:, None]
    return matrix


def iter_bags(source: ScoredOutput, slides: pa.Table, features: str) -> Iterator[Bag]:
    """Each slide's bag, streamed shard by shard (see the module docstring); shards holding none of the slides are
    skipped after reading their key columns."""
    rows = {r["slide_id"]: r for r in slides.to_pylist()}
    keys = _join_keys(slides.column("uri"), slides.column("run_id"))
    columns = ["slide_id", "x", "y", "level", "image_features"] + ([NORM_COLUMN] if features == "projected" else [])
    open_parts: dict[str, list[pa.Table]] = {}
    done: set[str] = set()
    for path in source.shards:
        present = set()
        table = _current_tiles(source, path, keys, columns)
        if table is not None:
            for slide_id in pc.unique(table.column("slide_id")).to_pylist():
                if slide_id in done:
                    raise RuntimeError(f"slide {slide_id}'s tiles are not in consecutive shards; export cannot stream")
                open_parts.setdefault(slide_id, []).append(table.filter(pc.equal(table.column("slide_id"), slide_id)))
                present.add(slide_id)
        for slide_id in [s for s in open_parts if s not in present]:
            done.add(slide_id)
            yield _bag(rows[slide_id], open_parts.pop(slide_id), features)
    for slide_id in list(open_parts):
        yield _bag(rows[slide_id], open_parts.pop(slide_id), features)


def _current_tiles(source: ScoredOutput, path: str, keys: pa.Array, columns: list[str]) -> pa.Table | None:
    """The ok tiles of the wanted (uri, run_id) pairs in one shard, or None: the key columns are read first, the
    features only when the shard holds some."""
    with source.out.fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        index = parquet.read(columns=["uri", "run_id", "dataset_version", "status"])
        mask = pc.and_(
            pc.and_(pc.equal(index.column("dataset_version"), source.version), pc.equal(index.column("status"), "ok")),
            pc.is_in(_join_keys(index.column("uri"), index.column("run_id")), value_set=keys),
        )
        mask = pc.fill_null(mask, False)
        if not pc.any(mask).as_py():
            return None
        return parquet.read(columns=columns).filter(mask)


def _bag(slide: dict, parts: list[pa.Table], features: str) -> Bag:
    table = pa.concat_tables(parts)
    order = np.lexsort((table.column("x").to_numpy(), table.column("y").to_numpy()))  # row-major: y, then x
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)[order]
    _, first = np.unique(xy, axis=0, return_index=True)  # a tile delivered twice is one tile
    keep = order[np.sort(first)]
    table = table.take(pa.array(keep))
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int64)
    return Bag(slide, feature_matrix(table, features), coords)


# -- the command ----------------------------------------------------------------------------------------------------
def resolve_features(source: ScoredOutput, features: str | None, echo: Callable[[str], None]) -> str:
    """The features to export: as asked, else projected when the OUTPUT stores embedding_norm, else normalized."""
    if features is not None and features not in FEATURES:
        raise UserError(f"--features must be one of {', '.join(FEATURES)}, not {features!r}")
    has_norm = NORM_COLUMN in source.columns
    if features == "projected" and not has_norm:
        raise UserError(
            f"{source.url} has no {NORM_COLUMN} column (it was made by a version of featurize that did not store "
            "it): rerun `featurize slides` into a new OUTPUT with this version for --features projected, or pass "
            "--features normalized"
        )
    if features is None:
        features = "projected" if has_norm else "normalized"
        if not has_norm:
            echo(
                f"featurize: note: {source.url} stores no {NORM_COLUMN}: exporting the L2-normalised features "
                "(rerun `featurize slides` with this version for the unnormalised embedding)"
            )
    return features


def read_manifest(out: str, storage_options: dict | None) -> dict | None:
    fs, path = filesystem(join(out, MANIFEST), storage_options)
    if not exists(join(out, MANIFEST), storage_options):
        return None
    return json.loads(with_retries(lambda: fs.cat_file(path)))


def export(
    output: str,
    out: str,
    fmt: str,
    features: str | None = None,
    storage_options: dict | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """`featurize export`: write or bring up to date DIR's bags; returns the manifest (also DIR/_export.json)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    source = ScoredOutput(output, storage_options)
    if not source.is_slides or source.rescore_record is not None:
        raise UserError(f"{output} is not the OUTPUT of `featurize slides` (export makes per-slide bags of tiles)")
    source.require("image_features", why="export writes the stored image features")
    features = resolve_features(source, features, echo)
    previous = read_manifest(out, storage_options) or {}
    same = {"output": source.url, "format": fmt, "features": features, "dataset_version": source.version}
    if previous and (previous.get("output"), previous.get("format")) != (source.url, fmt):
        raise UserError(
            f"{out} holds a {previous.get('format')} export of {previous.get('output')}; export {output} as {fmt} "
            "to another --out"
        )
    written_before = previous.get("slides", {})
    done = written_before if previous.get("features") == features else {}  # other features: every bag again
    slides = slides_to_export(source)
    current = _join_keys(slides.column("slide_id"), slides.column("run_id"))
    stale = slides.filter(pc.invert(pc.is_in(current, value_set=_manifest_keys(done))))
    unchanged = set(slides.column("slide_id").to_pylist()) - set(stale.column("slide_id").to_pylist())
    exported = {k: done[k] for k in unchanged}
    for bag in iter_bags(source, stale, features):
        files = write_bag(bag, fmt, out, storage_options)
        exported[bag.slide["slide_id"]] = {"run_id": bag.slide["run_id"], "tiles": len(bag.coords), "files": files}
        expected = int(bag.slide["n_tiles"]) - int(bag.slide["n_tile_errors"] or 0)
        if len(bag.coords) != expected:
            log.warning(
                "slide %s: %d ok tiles in the shards, _slides.parquet counts %d",
                bag.slide["slide_id"],
                len(bag.coords),
                expected,
            )
    missing = sorted(set(stale.column("slide_id").to_pylist()) - set(exported))
    if missing:
        log.warning("no tiles found in the shards for %d slide(s) (%s): no bags", len(missing), ", ".join(missing[:5]))
    removed = [k for k in written_before if k not in exported]
    for slide_id in removed:
        for name in written_before[slide_id].get("files", []):
            _remove(join(out, name), storage_options)
    manifest = {**same, "slides": dict(sorted(exported.items()))}
    write_json_atomic(join(out, MANIFEST), manifest, storage_options)
    echo(
        f"featurize: exported {stale.num_rows} slide(s) ({len(exported) - stale.num_rows} unchanged, "
        f"{len(removed)} removed) as {fmt} bags of {features} features to {out}"
    )
    return manifest


def _manifest_keys(done: dict) -> pa.Array:
    return _join_keys(pa.array(list(done), pa.string()), pa.array([v["run_id"] for v in done.values()], pa.string()))


def _remove(url: str, storage_options: dict | None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        with_retries(lambda: fs.rm(path))
    except FileNotFoundError:
        pass
