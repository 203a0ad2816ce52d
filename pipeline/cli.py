"""`featurize`: the command line, every command of it. Options are generated from the config models, so CLI and job
files agree.

Every parser and command function lives here and imports run one way: the library modules never import this one, and
the command functions import them when they run, so `featurize --help` loads none of the analysis or driver code.
It is longer than the other modules for that reason: one small argument function and one command function per
command, all in one place (COMMANDS lists them), and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import typing
from typing import Any

from pydantic import BaseModel

COMMAND_STARTED = time.time()  # before the imports below: first_shard_s counts from here

from .checkpoint import quiet_libraries
from .config import (
    DEDUP_THRESHOLD,
    RESCORE_BATCH_ROWS,
    RESCORE_ROWS_PER_SHARD,
    RunConfig,
    SlidesConfig,
    load_config_file,
    make_config,
    parse_storage_options,
)
from .errors import EnvironmentFailure, UserError

PROG = "featurize"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional=()) -> None:
    """One option per config field (positionals for the required ones named); defaults stay in the model."""
    for name in positional:
        parser.add_argument(
            name, metavar=name.upper(), nargs="?", default=None, help=model.model_fields[name].description
        )
    for name, field in model.model_fields.items():
        if name in positional:
            continue
        annotation = field.annotation
        help_text = field.description or ""
        if annotation is bool:
            parser.add_argument(_flag(name), dest=name, action="store_true", default=None, help=help_text)
            continue
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        kind = {int: int, float: float}.get(annotation, str)
        if not field.is_required() and field.default_factory is None and field.default not in (None, ""):
            help_text += f" [default: {field.default}]"
        parser.add_argument(
            _flag(name), dest=name, default=None, type=kind, choices=choices, help=help_text, required=False
        )
    for old, new in getattr(model, "renamed", {}).items():  # hidden: only there to name the new spelling
        parser.add_argument(_flag(old), action=_RenamedOption, new=_flag(new))


class _RenamedOption(argparse.Action):
    """An option that was renamed: a usage error naming the new spelling (`--mpp is now --target-mpp`), whatever
    value follows it (never shown)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def options_from_args(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """Config file first, then every option given on the command line."""
    options: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def _cmd_images(args: argparse.Namespace) -> int:
    from .images_job import run_images

    cfg = make_config(RunConfig, options_from_args(args, RunConfig))
    record = run_images(cfg, echo=_echo, command_started=COMMAND_STARTED)
    if cfg.dry_run:
        return 0
    _print_summary(record)
    return 1 if cfg.fail_on_error and record["counts"].get("error", 0) else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, n_images=args.images, echo=_echo, command_started=COMMAND_STARTED)
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from .sources import write_manifest

    options = _storage_options(args, args.input, args.manifest)
    t = time.perf_counter()
    table = write_manifest(args.input, args.manifest, options)
    seconds = time.perf_counter() - t
    _echo(
        f"featurize: listed {table.num_rows} inputs in {seconds:.1f} s "
        f"({table.num_rows / max(seconds, 1e-9):.0f} files/s) -> {args.manifest}"
    )
    return 0


def _cmd_slides(args: argparse.Namespace) -> int:
    from .slides_job import run_slides

    cfg = make_config(SlidesConfig, options_from_args(args, SlidesConfig))
    record = run_slides(cfg, echo=_echo, command_started=COMMAND_STARTED)
    if cfg.dry_run:
        return 0
    c = record["counts"]
    _echo(
        f"featurize: run {record['run_id']} {record['state']}: {c['listed']} slides listed, {c['skipped']} "
        f"skipped (already done), {c['slides_ok']} ok, {c['slides_error']} error; {c['processed']} tiles scored "
        f"({c['ok']} ok, {c['error']} error) at {record['tiles_per_s']} tiles/s; output {record['output']}"
    )
    failed = c["slides_error"] or c["error"]
    return 1 if failed and cfg.fail_on_error else 0


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from .heatmap import SlideOutput, short_list, write_all, write_heatmap

    options = _storage_options(args, args.output)
    if not args.out and not args.geojson:
        raise UserError("pass --out FILE.png (with --all, a folder) or --geojson FILE, or both")
    result = SlideOutput(args.output, options)
    if args.all:
        if args.slide or args.concept:
            raise UserError("--all draws every slide and concept; leave out --slide and --concept")
        if args.out:
            written = write_all(result, args.out, options, args.reader, args.tile_logits)
            _echo(f"featurize: wrote {len(written)} heatmap(s) to {args.out}")
        _geojson(result, args, options)
        return 0
    if not args.slide or (args.out and not args.concept):
        raise UserError(
            "pass --slide ID and --concept NAME (or --all); slides: "
            f"{short_list(result.slide_ids)}; concepts: {short_list(result.concepts)}"
        )
    if args.out:
        path = write_heatmap(result, args.slide, args.concept, args.out, options, args.reader, args.tile_logits)
        _echo(f"featurize: wrote {path}")
    _geojson(result, args, options)
    return 0


def _geojson(result, args: argparse.Namespace, options) -> None:
    """heatmap --geojson: QuPath detections, one file for --slide, one per slide into a folder for --all."""
    if not args.geojson:
        return
    from .qupath import write_all_geojson, write_geojson

    if args.all:
        written = write_all_geojson(result, args.geojson, options)
        _echo(f"featurize: wrote {len(written)} GeoJSON file(s) to {args.geojson}")
    else:
        _echo(f"featurize: wrote {write_geojson(result, args.slide, args.geojson, options)}")


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    export(args.output, args.out, args.format, args.features, _storage_options(args, args.output, args.out), _echo)
    return 0


def _cmd_rescore(args: argparse.Namespace) -> int:
    from .rescore import rescore

    record = rescore(
        args.output,
        args.prompts,
        args.out,
        _storage_options(args, args.output, args.out),
        args.batch_size,
        args.rows_per_shard,
        args.trust_remote_code,
        args.device,
        echo=_echo,
    )
    c = record["counts"]
    _echo(
        f"featurize: rescored {c['ok']} ok rows ({c['error']} error rows kept) with {len(record['concepts'])} "
        f"concepts in {record['score_s']} s -> {args.out} ({record['shards']} shard(s))"
    )
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from .labels import check_suffix, label_output

    check_suffix(args.out)
    options = _storage_options(args, args.output, args.out)
    table = label_output(args.output, args.top_k, options, args.softmax)
    _write_rows(table, args.out, options)
    _echo(
        f"featurize: wrote {table.num_rows} labels ({int(pc.sum(pc.equal(table.column('rank'), 1)).as_py() or 0)} "
        f"rows x top {args.top_k}) -> {args.out}"
    )
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probe import metrics_table, run_probe

    metrics = run_probe(
        args.output,
        args.labels,
        args.seed,
        args.out,
        args.predict,
        _storage_options(args, args.output, args.labels, args.out or "", args.predict or ""),
        echo=_echo,
    )
    print(metrics_table(metrics), flush=True)
    for what, path in (("probe", args.out), ("predictions", args.predict)):
        if path:
            _echo(f"featurize: wrote {what} -> {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if not args.out.lower().endswith((".html", ".htm")):
        raise UserError(f"--out {args.out}: write a .html file")
    options = _storage_options(args, args.output, args.out)
    write_report(args.output, args.out, options, args.concept, args.max_slides, args.top_k)
    _echo(f"featurize: wrote {args.out}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .index import build_index, index_summary

    meta = build_index(
        args.output,
        args.out,
        _storage_options(args, args.output, args.out or ""),
        args.max_memory,
        args.index_type,
        args.rebuild,
        echo=_echo,
    )
    _echo(f"featurize: {index_summary(meta)} -> {args.out or args.output.rstrip('/') + '/_index'}")
    return 0


SEARCH_SUFFIXES = (".parquet", ".csv", ".html", ".htm")


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import embed_query, results_text, search

    if args.out and not args.out.lower().endswith(SEARCH_SUFFIXES):
        raise UserError(f"--out {args.out}: write a .parquet, .csv or .html file")
    options = _storage_options(args, args.output, args.image or "", args.index or "", args.out or "")
    query = embed_query(args.output, args.text, args.image, args.template or (), args.trust_remote_code, options)
    table, info = search(args.output, query.vector, args.k, args.index, args.exact, args.nprobe, options, echo=_echo)
    how = "exact scan" if info["source"] == "exact" else f"index {info['factory']}"
    how += f", nprobe {info['nprobe']}" if info.get("nprobe") else ""
    about = f"{query.label}: {table.num_rows} nearest of {info['rows']} rows of {args.output} ({how})"
    if not args.out:
        print(results_text(table), flush=True)
    elif args.out.lower().endswith((".html", ".htm")):
        from .gallery import write_gallery
        from .rescore import ScoredOutput

        slides = ScoredOutput(args.output, options).current_slides()
        write_gallery(table, args.out, f"featurize search: {query.label}", about, slides, query.image_bytes, options)
    else:
        _write_rows(table, args.out, options)
    _echo(
        f"featurize: {about}; query encoded in {query.encode_s * 1000:.0f} ms, searched in "
        f"{info['seconds'] * 1000:.1f} ms{' -> ' + args.out if args.out else ''}"
    )
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from .dedup import dedup, summary
    from .labels import check_suffix

    check_suffix(args.out)
    options = _storage_options(args, args.output, args.against or "", args.out)
    table, counts = dedup(args.output, args.threshold, args.against, options)
    _write_rows(table, args.out, options)
    _echo(summary(counts, args.threshold, args.against, args.out))
    return 0


def _write_rows(table, path: str, options: dict) -> None:
    """A command's result rows as `path` (.parquet or .csv, local or fsspec), written whole or not at all."""
    from .labels import table_bytes
    from .storage import write_bytes_atomic

    write_bytes_atomic(path, table_bytes(table, path), options)


def _storage_options(args: argparse.Namespace, *urls: str) -> dict:
    """The command's --storage-options, parsed, and checked against the filesystems of `urls` before any work."""
    from .storage import check_storage_options

    options = parse_storage_options(args.storage_options)
    check_storage_options(urls, options)
    return options


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_summary(record: dict) -> None:
    c = record["counts"]
    _echo(
        f"featurize: run {record['run_id']} {record['state']}: listed {c['listed']}, skipped {c['skipped']} "
        f"(already committed), processed {c['processed']}: {c['ok']} ok, {c['error']} error; "
        f"{record['images_per_s']} images/s over the stream (the model's start-up included); output {record['output']}"
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that names the option and points at --help, never showing a value.

    Options must be spelt in full (no abbreviations: `--storage-o` is an error, not --storage-options), and an
    unknown argument is an error of the (sub)command that met it; the error names only option tokens, cut at
    "=", because the values after them may be credentials."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # A token like `--storage-o={"a": 1}` holds a space, so argparse takes it for a positional value.
        swallowed = [
            getattr(namespace, a.dest, None)
            for a in self._actions
            if not a.option_strings and a.nargs != argparse.PARSER
        ]
        extras = extras + [v for v in swallowed if isinstance(v, str) and v.startswith("-") and " " in v]
        if extras:
            self.error(_unrecognized(extras, list(self._option_string_actions)))
        return namespace, extras

    def error(self, message: str):
        # argparse quotes the value it rejects (`--incremental=x`, a stray value taken for COMMAND, a bad int or
        # choice); any of them may be a credential, and the option's name says enough.
        message = re.sub(r"ignored explicit argument .*", "takes no value", message)
        message = re.sub(r"(invalid choice|invalid \S+ value): .*?( \(choose from .*)?$", r"\1\2", message)
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _unrecognized(tokens: list[str], known: list[str] | None = None) -> str:
    """'unrecognized arguments: --storage-o' for the options among tokens, with the closest known option where one
    is close ('did you mean --prompts?'); values are counted, never shown."""
    names, hidden = [], 0
    for token in tokens:
        if token.startswith("--") and re.fullmatch(r"--[A-Za-z0-9][\w.-]*", token.split("=", 1)[0]):
            names.append(token.split("=", 1)[0])
        elif re.fullmatch(r"-[A-Za-z0-9]", token[:2]) and not token.startswith("--"):
            names.append(token[:2] + ("..." if len(token) > 2 else ""))  # `-kSECRET`: the flag letter only
        else:
            hidden += 1
    shown = ", ".join(dict.fromkeys(names))
    if hidden:
        values = f"{hidden} value{'s' if hidden > 1 else ''} (not shown)"
        shown = f"{shown} and {values}" if shown else values
    import difflib

    close = [
        difflib.get_close_matches(n, [k for k in known or [] if k.startswith("--")], n=1, cutoff=0.75) for n in names
    ]
    hints = [
        f"{name}: did you mean {match[0]}?" for name, match in zip(names, close) if match and name.startswith("--")
    ]
    return f"unrecognized arguments: {shown}" + (f" ({'; '.join(hints)})" if hints else "")


def masked_command(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """`featurize ARGV` with the value of every option whose destination may carry credentials (storage_options,
    *_token, *_key, ...) replaced by ****, however it was written (`--opt VALUE`, `--opt=VALUE`).

    Options are exact spellings (abbreviations are off), looked up in the parser and in the subcommand's parser."""
    from .schema import MASK, is_secret_dest

    subcommands = _subparsers(parser)
    actions = parser._option_string_actions
    out, pending, in_subcommand, positional_only = [PROG], None, False, False
    for token in argv:
        if pending is not None:  # the value of the option before
            out.append(MASK if pending == "mask" else token)
            pending = None
            continue
        if positional_only or token == "--" or not token.startswith("-"):
            positional_only = positional_only or token == "--"
            if not positional_only and not in_subcommand and token in subcommands:
                in_subcommand, actions = True, subcommands[token]._option_string_actions
            out.append(token)
            continue
        key, eq, _ = token.partition("=")
        action = actions.get(key)
        secret = action is not None and is_secret_dest(action.dest)
        out.append(key + eq + MASK if secret and eq else token)
        if action is not None and not eq and action.nargs != 0:
            pending = "mask" if secret else "keep"
    return " ".join(out)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# -- the commands' arguments -----------------------------------------------------------------------------------------
def _args_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same options (command-line options win)")
    add_model_options(p, RunConfig, positional=("input", "output"))


def _args_manifest(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="folder, glob or list file; local path or fsspec URL")
    p.add_argument("manifest", metavar="MANIFEST", help="the .parquet file to write (local path or fsspec URL)")
    p.add_argument("--storage-options", help="fsspec storage options as JSON")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="output folder")
    p.add_argument("--images", type=int, default=64, help="how many images to generate [default: 64]")


def _args_slides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same options (command-line options win)")
    add_model_options(p, SlidesConfig, positional=("input", "output"))


def _args_heatmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT folder of `featurize slides` (local or fsspec URL)")
    p.add_argument("--slide", help="slide id (as in _slides.parquet)")
    p.add_argument("--concept", help="concept name (as in _prompts.parquet)")
    p.add_argument("--out", default=None, help="PNG file to write; with --all, a folder")
    p.add_argument("--all", action="store_true", help="one PNG per slide and concept into the --out folder")
    p.add_argument(
        "--geojson",
        default=None,
        help="also (or only) write QuPath detections: a .geojson file for --slide; with --all, a folder of them",
    )
    p.add_argument("--tile-logits", action="store_true", help="draw tile logits even when concept maps were stored")
    p.add_argument(
        "--reader",
        choices=("auto", "tiffslide", "openslide", "wsidicom"),
        default=None,
        help="slide reader for the thumbnail [default: the one that read the slide]",
    )
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT and slides")


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT of `featurize slides` (local or fsspec URL)")
    p.add_argument("--format", required=True, choices=("clam", "trident"), help="the bags' layout")
    p.add_argument("--out", required=True, help="DIR for the bags (local or fsspec URL); a rerun brings it up to date")
    p.add_argument(
        "--features",
        choices=("normalized", "projected"),
        default=None,
        help="the stored L2-normalised features, or the unnormalised projected embedding (needs embedding_norm) "
        "[default: projected when OUTPUT stores embedding_norm, else normalized]",
    )
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT and DIR")


def _args_rescore(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "output", metavar="OUTPUT", help="the OUTPUT of `featurize images` or `slides` (local or fsspec URL)"
    )
    p.add_argument("--prompts", required=True, help="the new prompt set (YAML or text, as for `images`)")
    p.add_argument("--out", required=True, help="OUT2: the folder for the rescored logits (not OUTPUT)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the checkpoint's own Python code (needed when OUTPUT was made with ConceptCLIP)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device for the text tower")
    p.add_argument(
        "--batch-size",
        type=int,
        default=RESCORE_BATCH_ROWS,
        help=f"rows scored per matrix product [default: {RESCORE_BATCH_ROWS}]",
    )
    p.add_argument(
        "--rows-per-shard",
        type=int,
        default=RESCORE_ROWS_PER_SHARD,
        help=f"rows per OUT2 shard [default: {RESCORE_ROWS_PER_SHARD}]",
    )
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT and OUT2")


def _args_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT of `images`, `slides` or `rescore` (local or fsspec)")
    p.add_argument("--top-k", type=int, default=5, help="concepts per row [default: 5]")
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.csv to write (local path or fsspec URL)")
    p.add_argument(
        "--softmax",
        action="store_true",
        help="softmax over concepts for every family [default: softmax for CLIP, sigmoid otherwise]",
    )
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT and --out")


def _args_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT of `featurize images` (local or fsspec URL)")
    p.add_argument("--labels", required=True, help="CSV with columns uri,label (uris as OUTPUT lists them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split [default: 0]")
    p.add_argument("--out", default=None, help="MODEL_DIR for probe.joblib, probe.json and metrics.json")
    p.add_argument(
        "--predict", default=None, help="FILE.parquet or .csv: uri, predicted label and p_<class> for every ok row"
    )
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for every path")


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT of `images`, `slides` or `rescore` (local or fsspec)")
    p.add_argument("--out", required=True, help="the .html file to write (local path or fsspec URL)")
    p.add_argument("--concept", default=None, help="slides: the concept of the heatmap thumbnails [default: the first]")
    p.add_argument("--max-slides", type=int, default=100, help="slides: heatmaps for at most this many [default: 100]")
    p.add_argument("--top-k", type=int, default=8, help="thumbnails per concept, 0 to 50 [default: 8]")
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT, slides, --out")


def _args_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT of `featurize images` or `slides` (local or fsspec)")
    p.add_argument("--out", default=None, help="the index folder [default: OUTPUT/_index]")
    p.add_argument(
        "--max-memory", default=None, help="memory the index may take, e.g. 4GB [default: a quarter of the machine's]"
    )
    p.add_argument(
        "--index-type", default=None, help="a faiss factory string: Flat or IVF... (e.g. IVF4096,SQ8) [default: chosen]"
    )
    p.add_argument("--rebuild", action="store_true", help="build it afresh (also for an OUTPUT's new features)")
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for OUTPUT and --out")


def _args_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT of `featurize images` or `slides` (local or fsspec)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", default=None, help="embedded by the model's text tower, as prompts are")
    query.add_argument("--image", default=None, help="PATH_OR_URI of an image, embedded as the run embeds images")
    p.add_argument(
        "--template", action="append", help="wrap the text ('a photo of {}'); several are ensembled [default: none]"
    )
    p.add_argument("--k", type=int, default=20, help="how many rows [default: 20]")
    p.add_argument("--out", default=None, help="FILE.parquet, .csv or .html (a gallery) [default: print the rows]")
    p.add_argument("--index", default=None, help="the index folder [default: OUTPUT/_index when there is one]")
    p.add_argument("--exact", action="store_true", help="scan every row instead of using the index")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit [default: calibrated at build time]")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for every path")


def _args_dedup(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the OUTPUT of `featurize images` or `slides` (local or fsspec)")
    p.add_argument("--against", default=None, help="OTHER_OUTPUT (same model): report OUTPUT's rows found there")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEDUP_THRESHOLD,
        help=f"cosine similarity at which two rows are near-duplicates [default: {DEDUP_THRESHOLD}]",
    )
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.csv to write (local path or fsspec URL)")
    p.add_argument("--storage-options", default=None, help="fsspec storage options (JSON) for every path")


COMMANDS = [  # name, one-line help, the function that adds its arguments, the function that runs it
    ("images", "featurise every image under INPUT into sharded Parquet in OUTPUT", _args_images, _cmd_images),
    ("manifest", "list INPUT once (uri, size, mtime, etag) into a Parquet manifest", _args_manifest, _cmd_manifest),
    ("demo", "run the whole pipeline offline on generated images and a tiny random model", _args_demo, _cmd_demo),
    ("slides", "score every tissue tile of every whole-slide image under INPUT into OUTPUT", _args_slides, _cmd_slides),
    ("heatmap", "draw where a concept lights up on a slide, from the OUTPUT of `slides`", _args_heatmap, _cmd_heatmap),
    ("export", "per-slide bags of tile features for MIL training (CLAM or TRIDENT layout)", _args_export, _cmd_export),
    (
        "rescore",
        "new concept logits from OUTPUT's stored image features (text tower only)",
        _args_rescore,
        _cmd_rescore,
    ),
    ("labels", "zero-shot labels: the top K concepts of each ok row, with probabilities", _args_labels, _cmd_labels),
    ("probe", "train and test a linear probe (logistic regression) on OUTPUT's features", _args_probe, _cmd_probe),
    (
        "report",
        "one offline HTML page about OUTPUT: top images per concept, a map, heatmaps, errors, runs",
        _args_report,
        _cmd_report,
    ),
    ("index", "an approximate nearest-neighbour index (faiss) over OUTPUT's features", _args_index, _cmd_index),
    ("search", "the rows of OUTPUT nearest to a text or an image", _args_search, _cmd_search),
    (
        "dedup",
        "near-duplicate groups in OUTPUT, or its rows that near-duplicate another's",
        _args_dedup,
        _cmd_dedup,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Featurise images and whole-slide images with CLIP-family models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import schema

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    schema.set_command(masked_command(parser, argv))  # provenance records this, never sys.argv
    try:
        return args.func(args)
    except EnvironmentFailure as exc:  # not the user's options: the environment failed; the rerun resumes
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a cluster failure: one line, the traceback only on request
        if os.environ.get("FEATURIZE_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        print(
            f"{PROG}: error: {type(exc).__name__}: {first} (set FEATURIZE_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1
    finally:
        schema.set_command(None)


if __name__ == "__main__":
    sys.exit(main())
