"""`featurize`: the command line. Options are generated from the config models, so CLI and job files agree."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import typing
from typing import Any, Callable

from pydantic import BaseModel

COMMAND_STARTED = time.time()

from .config import RunConfig, load_config_file, make_config
from .errors import UserError

PROG = "featurize"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional=()) -> None:
    """One option per config field (positionals for the required ones named); defaults stay in the model."""
    for name in positional:
        parser.add_argument(name, metavar=name.upper(), nargs="?", default=None,
                            help=model.model_fields[name].description)
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
        if not field.is_required() and field.default not in (None, "") and not isinstance(field.default, dict):
            help_text += f" [default: {field.default}]"
        parser.add_argument(_flag(name), dest=name, default=None, type=kind, choices=choices, help=help_text,
                            required=False)


def options_from_args(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """Config file first, then every option given on the command line."""
    options: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def _cmd_images(args: argparse.Namespace) -> int:
    from .run import run_images

    cfg = make_config(RunConfig, options_from_args(args, RunConfig))
    record = run_images(cfg, echo=_echo, command_started=COMMAND_STARTED)
    _print_summary(record)
    return 1 if cfg.fail_on_error and record["counts"].get("error", 0) else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, n_images=args.images, echo=_echo, command_started=COMMAND_STARTED)
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    import json
    import time

    from .sources import write_manifest

    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"--storage-options is not valid JSON ({exc.msg})") from None
    t = time.perf_counter()
    table = write_manifest(args.input, args.manifest, options)
    seconds = time.perf_counter() - t
    _echo(f"featurize: listed {table.num_rows} inputs in {seconds:.1f} s "
          f"({table.num_rows / max(seconds, 1e-9):.0f} files/s) -> {args.manifest}")
    return 0


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_summary(record: dict) -> None:
    c = record["counts"]
    _echo(f"featurize: run {record['run_id']} {record['state']}: listed {c['listed']}, skipped {c['skipped']} "
          f"(already committed), processed {c['processed']}: {c['ok']} ok, {c['error']} error; "
          f"{record['images_per_s']} images/s; output {record['output']}")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that names the option and points at --help."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Featurise images and whole-slide images with "
                                                            "CLIP-family models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("images", help="featurise every image under INPUT into sharded Parquet in OUTPUT")
    p.add_argument("--config", help="YAML file with the same options (command-line options win)")
    add_model_options(p, RunConfig, positional=("input", "output"))
    p.set_defaults(func=_cmd_images)

    p = sub.add_parser("manifest", help="list INPUT once (uri, size, mtime, etag) into a Parquet manifest")
    p.add_argument("input", metavar="INPUT", help="folder, glob or list file; local path or fsspec URL")
    p.add_argument("manifest", metavar="MANIFEST", help="the .parquet file to write (local path or fsspec URL)")
    p.add_argument("--storage-options", help="fsspec storage options as JSON")
    p.set_defaults(func=_cmd_manifest)

    p = sub.add_parser("demo", help="run the whole pipeline offline on generated images and a tiny random model")
    p.add_argument("output", metavar="OUTPUT", help="output folder")
    p.add_argument("--images", type=int, default=64, help="how many images to generate [default: 64]")
    p.set_defaults(func=_cmd_demo)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Later subcommands (manifest, slides, heatmap) register themselves here.
from .heatmap import register_heatmap  # noqa: E402  (these import this module's helpers when called)
from .run_slides import register_slides  # noqa: E402

_EXTRA_COMMANDS: list[Callable[[Any], None]] = [register_slides, register_heatmap]


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, fallback notices) out of the output; inherited by local Ray workers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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
        print(f"{PROG}: error: {type(exc).__name__}: {first} (set FEATURIZE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
