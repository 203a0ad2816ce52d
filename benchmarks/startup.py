"""Fixed-cost breakdown: where the seconds before the first committed shard go (imports, Ray, model, Ray Data).

    python -m benchmarks.startup

Each step runs in a fresh interpreter (so no step profits from another's imports) and reports its own seconds:
  interpreter         python -c pass
  import_cli          import pipeline.cli                 (what `featurize --help` pays)
  import_run          import pipeline.run                 (numpy, pyarrow, PIL, the pipeline's modules)
  import_torch        import torch
  import_transformers import transformers; AutoModel, AutoProcessor resolved
  import_ray_data     import ray, ray.data
  ray_init            ray.init() as the pipeline calls it, then one trivial task, then ray.shutdown()
  resolve_processor   resolve_model + preprocess_spec on the tiny model (the driver's AutoProcessor load)
  actor_init          EncodeBatch(...) in-process: model load + prompt encoding (what each actor pays)
  ray_data_first      ray.data.from_items -> task map_batches -> ActorPool map_batches (no-op) -> first batch
                      out of iter_batches, on a running Ray (the pipeline's streaming start-up, no model)
Writes benchmarks/results/<timestamp>-startup.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import common
from .common import log

STEPS = (
    "interpreter",
    "import_cli",
    "import_run",
    "import_torch",
    "import_transformers",
    "import_ray_data",
    "ray_init",
    "resolve_processor",
    "actor_init",
    "ray_data_first",
)


class _Noop:
    def __call__(self, batch):
        return batch


def _step(name: str, model: str, prompts: str) -> dict:
    """Runs inside the child interpreter."""
    t = time.perf_counter()
    out: dict = {}
    if name == "interpreter":
        pass
    elif name == "import_cli":
        import pipeline.cli  # noqa: F401
    elif name == "import_run":
        import pipeline.run  # noqa: F401
    elif name == "import_torch":
        import torch  # noqa: F401
    elif name == "import_transformers":
        from transformers import AutoModel, AutoProcessor  # noqa: F401
    elif name == "import_ray_data":
        import ray.data  # noqa: F401
    elif name == "ray_init":
        import ray

        from pipeline.cluster import init_ray

        t = time.perf_counter()
        init_ray()
        out["init_s"] = round(time.perf_counter() - t, 3)
        t1 = time.perf_counter()
        ray.get(ray.remote(lambda: 1).remote())
        out["first_task_s"] = round(time.perf_counter() - t1, 3)
        t2 = time.perf_counter()
        ray.shutdown()
        out["shutdown_s"] = round(time.perf_counter() - t2, 3)
    elif name == "resolve_processor":
        from pipeline.checkpoint import preprocess_spec, resolve_model

        t = time.perf_counter()
        preprocess_spec(resolve_model(model, trust_remote_code=True))
    elif name == "actor_init":
        from pipeline.checkpoint import preprocess_spec, resolve_model
        from pipeline.encode import EncodeBatch
        from pipeline.prompts import load_prompts

        spec = resolve_model(model, trust_remote_code=True, dtype="float32", device="cpu")
        pre = preprocess_spec(spec)
        ps = load_prompts(prompts)
        t = time.perf_counter()
        EncodeBatch(spec, pre, ps, torch_threads=0)
    elif name == "ray_data_first":
        import numpy as np
        import ray

        from pipeline.cluster import init_ray

        init_ray()
        t = time.perf_counter()
        ds = ray.data.from_items([{"i": i} for i in range(256)])
        ds = ds.map_batches(
            lambda b: {"i": b["i"], "x": np.zeros((len(b["i"]), 4))},
            batch_size=32,
            batch_format="numpy",
            num_cpus=1,
            memory=512 * 1024**2,
        )
        ds = ds.map_batches(
            _Noop, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=32, batch_format="numpy"
        )
        it = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        next(it)
        out["first_batch_s"] = round(time.perf_counter() - t, 3)
        for _ in it:
            pass
        out["all_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        ray.shutdown()
        out["shutdown_s"] = round(time.perf_counter() - t, 3)
        return out
    out["seconds"] = round(time.perf_counter() - t, 3)
    return out


def run_step(name: str, model: Path, prompts: Path) -> dict:
    if name == "interpreter":
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=common.quiet_env())
        return {"seconds": round(time.perf_counter() - t, 3)}
    out, wall = common.run_json_child(
        ["benchmarks.startup", "--child", name, "--model", str(model), "--prompts", str(prompts)]
    )
    out["process_wall_s"] = round(wall, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "so400m"], help="model for the model steps")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma list of steps [all]")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--noisy", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    common.set_quiet_env()
    if args.child:
        print(json.dumps(_step(args.child, args.model, args.prompts)))
        return 0

    work = args.work.resolve()
    model = common.bench_model(work, args.size)
    prompts = common.bench_prompts(work)
    rec = {
        "benchmark": "startup",
        "timestamp": common.timestamp(),
        "command": common.command_line(),
        "size": args.size,
        "noisy": args.noisy,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "steps": {},
    }
    for name in [s.strip() for s in args.steps.split(",") if s.strip()]:
        log(f"startup: {name}")
        rec["steps"][name] = run_step(name, model, prompts)
    rec["machine"]["loadavg_end"] = common.loadavg()
    print(
        f"\nstart-up costs, each step in a fresh interpreter (machine: {common.machine_short(rec['machine'])}, "
        f"load {rec['machine']['loadavg_start']} -> {rec['machine']['loadavg_end']})"
    )
    for name, r in rec["steps"].items():
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("seconds", "process_wall_s"))
        print(
            f"  {name:<20} {r.get('seconds', '-'):>8} s   (process {r.get('process_wall_s', '-')} s"
            f"{'; ' + extra if extra else ''})"
        )
    if not args.no_save:
        log(f"wrote {common.save_result(rec, 'startup')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
