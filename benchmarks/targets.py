"""Every performance target of issue 11, measured in one command, with a met/not met table at the end.

    python -m benchmarks.targets            (BENCHMARKS.md gives how long it takes)
    python -m benchmarks.targets --quick    (a few minutes: small inputs, for checking the benchmarks themselves)
    python -m benchmarks.targets --skip cclip,base,first-shard --gpu-args "--skip compile,pipeline-compiled"
                                            (the GPU part alone, for a short GPU lease)

Runs, one after the other (never in parallel: each is timed):
- the ConceptCLIP-shaped stand-in on 10,000 JPEGs: whole command vs the model-card loop (>= 1.5x), steady state vs
  the machine limit (>= 0.85);
- the base model: steady state vs the model-only ceiling (>= 0.9x);
- the demo: command to first committed shard (< 10 s), median of 3;
- with a GPU: so400m in bfloat16 (`benchmarks.gpu`): >= 1,000 images/s, busy >= 95%.
Each part writes its own record in benchmarks/results/ (see `benchmarks.run` and `benchmarks.gpu`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import common, gpu, run
from .common import log

PARTS = {  # name -> (full arguments, --quick arguments)
    "cclip": (
        ["--size", "cclip", "--images", "10000", "--marginal", "--no-first-shard"],
        ["--size", "cclip", "--images", "200", "--marginal", "--no-first-shard", "--limit-sample", "32"],
    ),
    "base": (
        ["--size", "base", "--images", "200", "--marginal", "--no-first-shard"],
        [
            "--size",
            "base",
            "--images",
            "16",
            "--marginal",
            "--no-first-shard",
            "--limit-sample",
            "8",
            "--ceiling-images",
            "32",
        ],
    ),
    "first-shard": (["--skip", "loop,ceiling,pipeline", "--repeats", "3"], ["--skip", "loop,ceiling,pipeline"]),
}


def rows(name: str, rec: dict) -> list[tuple[str, str, object, bool]]:
    """(part, target, value, pass) of one record's checks."""
    checks = rec.get("checks") if name == "gpu" else rec.get("targets")
    out = []
    for key, chk in (checks or {}).items():
        if isinstance(chk, dict):
            out.append((name, f"{key} {common.target_bound(chk)}", chk["value"], bool(chk["pass"])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs: checks the benchmarks, not the targets")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join([*PARTS, 'gpu'])}")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache/output folder [bench-out/]")
    ap.add_argument("--noisy", action="store_true", help="mark the results as taken on a busy machine")
    ap.add_argument(
        "--gpu-args",
        default="",
        help='extra `benchmarks.gpu` flags as one string (a short GPU lease: "--deadline-s 400 --skip '
        'compile,pipeline-compiled")',
    )
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {*PARTS, "gpu"}
    if unknown:
        ap.error(f"--skip: unknown part(s) {sorted(unknown)}; choose from {','.join([*PARTS, 'gpu'])}")
    # --quick writes no result files: its small inputs say nothing about the targets
    common_args = (
        ["--work", str(args.work)] + (["--noisy"] if args.noisy else []) + (["--no-save"] if args.quick else [])
    )
    table = []
    for name, (full, quick) in PARTS.items():
        if name not in skip:
            log(f"targets: {name}")
            table += rows(name, run.measure([*(quick if args.quick else full), *common_args]))
    if "gpu" not in skip and not common.gpu_info():
        log("targets: no GPU here (nvidia-smi finds none): the GPU target is not measured")
        table.append(
            (
                "gpu",
                f"so400m >= {gpu.TARGET_IMAGES_PER_S:g} images/s, busy >= {gpu.TARGET_BUSY}",
                "not measured: no GPU",
                False,
            )
        )
    elif "gpu" not in skip:
        log("targets: gpu")
        gpu_args = (
            ["--images", "2000", "--distinct", "500", "--skip", "compile,pipeline-compiled"] if args.quick else []
        )
        table += rows(
            "gpu",
            gpu.measure(
                [
                    *gpu_args,
                    *shlex.split(args.gpu_args),
                    "--work",
                    str(args.work),
                    *(["--no-save"] if args.quick else []),
                ]
            ),
        )
    print("\n| part | target | value | met |\n| --- | --- | --- | --- |")
    for part, target, value, ok in table:
        print(f"| {part} | {target} | {value} | {'yes' if ok else '**no**'} |")
    if args.quick:
        print("(--quick: small inputs; these values say the benchmarks run, not whether the targets are met)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
