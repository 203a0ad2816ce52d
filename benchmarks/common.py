"""Shared pieces of the benchmarks: cached corpora and models, machine facts, RSS sampling, result files.

Everything generated (corpora, models, pipeline outputs) lives under a work folder (default `bench-out/`, which
git ignores) and is reused by later runs; results go to `benchmarks/results/`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = ROOT / "bench-out"

# Photo corpus: generated in chunks (one seed per chunk, so chunks are independent and can be made in parallel);
# the first n images of a corpus are always the same files, whatever n was asked for before.
PHOTO_CHUNK = 250
PHOTO_SIZES = ((500, 375), (1024, 768))

# The model sizes of `pipeline.tiny.build_conceptclip_sized` (random weights, built once per work folder).
SIZES = ("tiny", "base", "cclip", "so400m")

BENCH_PROMPTS = """\
# Benchmark prompt set (the demo's): 6 concepts x 3 templates = 18 prompts.
concepts: [tumor, stroma, lymphocytes, necrosis, adipose tissue, normal mucosa]
templates: ["a histopathology image of {}", "{} tissue", "an image showing {}"]
"""


def quiet_env() -> dict:
    """Environment for the benchmarks and the pipeline subprocesses: offline, no progress bars, local Ray."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def set_quiet_env() -> None:
    os.environ.update({k: v for k, v in quiet_env().items() if k != "RAY_ADDRESS"})
    os.environ.pop("RAY_ADDRESS", None)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- psutil (Ray vendors a copy; /proc is the last resort) ---------------------------------------------------------
def _psutil():
    try:
        import psutil  # noqa: F401

        return psutil
    except ImportError:
        pass
    try:
        import psutil
        import ray  # noqa: F401  (puts ray/thirdparty_files, which holds psutil, on sys.path)

        return psutil
    except ImportError:
        return None


def rss_bytes(pid: int) -> int | None:
    ps = _psutil()
    try:
        if ps is not None:
            return int(ps.Process(pid).memory_info().rss)
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


class RssSampler:
    """Samples one process's RSS on a thread (every `interval` s) until stopped: first, peak, last, samples."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.perf_counter() - self._t0, rss))
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples = [(t, r) for t, r in self.samples if r >= 20 * 1024**2]  # drop fork/exit instants
        rss = [r for _, r in self.samples]
        if not rss:
            return {"samples": 0}
        mb = 1024**2
        return {
            "samples": len(rss),
            "first_mb": round(rss[0] / mb, 1),
            "peak_mb": round(max(rss) / mb, 1),
            "last_mb": round(rss[-1] / mb, 1),
            "peak_at_s": round(self.samples[rss.index(max(rss))][0], 2),
        }


# -- machine and versions ------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": None,
        "logical_cpus": os.cpu_count(),
        "physical_cores": None,
        "ram_gb": None,
        "gpu": None,
        "loadavg_start": loadavg(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu_model"] = platform.processor() or None
    ps = _psutil()
    if ps is not None:
        info["physical_cores"] = ps.cpu_count(logical=False)
        info["ram_gb"] = round(ps.virtual_memory().total / 1024**3, 1)
    try:
        if hasattr(os, "sched_getaffinity"):
            info["usable_cpus"] = len(os.sched_getaffinity(0))
    except OSError:
        pass
    info["gpu"] = gpu_info()
    return info


def gpu_info():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return [line.strip() for line in out.stdout.strip().splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in (
        "pipeline-featurize",
        "torch",
        "transformers",
        "ray",
        "pillow",
        "numpy",
        "pyarrow",
        "tokenizers",
        "safetensors",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_threads_default"] = torch.get_num_threads()
        out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except ImportError:
        pass
    out["source_commit"] = _source_commit()
    return out


def _source_commit():
    """The checkout's commit, read from .git files (no git command)."""
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            path = ROOT / ".git" / name
            if path.is_file():
                return path.read_text().strip()
            packed = ROOT / ".git" / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + name):
                        return line.split()[0]
            return name
        return ref
    except OSError:
        return None


def command_line() -> str:
    """The command as typed: `python -m benchmarks.x ...` or `python benchmarks/x.py ...`."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name]
    else:
        script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        try:
            head = ["python", str(script.relative_to(ROOT))] if script else ["python"]
        except ValueError:
            head = ["python", str(script)]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


# -- cached inputs -------------------------------------------------------------------------------------------------
def _make_chunk(args) -> int:
    folder, count, seed, sizes = args
    from pipeline.demo import make_images

    tmp = Path(str(folder) + ".tmp")
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    make_images(tmp, count, seed=seed, sizes=sizes)
    (tmp / ".done").write_text(str(count))
    os.replace(tmp, folder)
    return count


def photo_corpus(work: Path, n: int, seed: int = 0, workers: int | None = None) -> list[str]:
    """The first n images of the photo corpus (generated JPEGs, 500x375 to 1024x768, 30% portrait), made once."""
    root = work / "corpus" / f"photos-s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    chunks = (n + PHOTO_CHUNK - 1) // PHOTO_CHUNK
    todo = [
        (root / f"c{i:04d}", PHOTO_CHUNK, seed * 100_003 + i, PHOTO_SIZES)
        for i in range(chunks)
        if not (root / f"c{i:04d}" / ".done").is_file()
    ]
    if todo:
        t = time.perf_counter()
        log(f"generating {len(todo) * PHOTO_CHUNK} photo-sized JPEGs in {root} (once; reused later)")
        workers = workers or max(1, min(len(todo), usable_cpus()))
        step = max(1, len(todo) // 10)  # about ten progress lines however large the corpus

        def progress(done: int) -> None:
            if done % step == 0 or done == len(todo):
                elapsed = time.perf_counter() - t
                log(
                    f"  {done * PHOTO_CHUNK} / {len(todo) * PHOTO_CHUNK} images ({elapsed:.0f} s, "
                    f"~{elapsed / done * (len(todo) - done):.0f} s left)"
                )

        if workers == 1:
            for done, item in enumerate(todo, 1):
                _make_chunk(item)
                progress(done)
        else:
            with ProcessPoolExecutor(workers) as pool:  # chunks are independent: any order, any interruption
                for done, _ in enumerate(pool.map(_make_chunk, todo), 1):
                    progress(done)
        log(f"corpus ready in {time.perf_counter() - t:.1f} s")
    paths = []
    for i in range(chunks):
        paths.extend(sorted(str(p) for p in (root / f"c{i:04d}").glob("*.jpg")))
    return paths[:n]


def small_corpus(work: Path, n: int, size: int = 64, distinct: int = 512) -> list[str]:
    """n distinct files of tiny JPEGs (size x size): `distinct` real images, the rest hard links to them (each
    file has its own path, so its own uri and id). Folders of 1,000 files, made once."""
    import numpy as np
    from PIL import Image

    root = work / "corpus" / f"small{size}"
    pool = root / "_pool"
    if not (pool / ".done").is_file():
        pool.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(distinct):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(pool / f"p{i:04d}.jpg", quality=85)
        (pool / ".done").write_text(str(distinct))
    return linked_corpus(sorted(str(p) for p in pool.glob("*.jpg")), root, n, prefix="s")


def linked_corpus(sources: list[str], root: Path, n: int, prefix: str = "s", per_dir: int = 1000) -> list[str]:
    """n distinct file names under root (folders of per_dir files), each a hard link to sources[i % len(sources)]
    (a copy where links fail): a corpus of n uris and n ids at the decode cost of the sources. Made once."""
    paths = []
    t = time.perf_counter()
    made = 0
    for d in range((n + per_dir - 1) // per_dir):
        folder = root / f"d{d:04d}"
        count = min(per_dir, n - d * per_dir)
        marker = folder / ".done"
        names = [folder / f"{prefix}{d:04d}_{j:04d}{Path(sources[0]).suffix}" for j in range(per_dir)]
        if not (marker.is_file() and int(marker.read_text() or 0) >= count):
            folder.mkdir(parents=True, exist_ok=True)
            for j, path in enumerate(names[:count]):
                if not path.exists():
                    src = sources[(d * per_dir + j) % len(sources)]
                    try:
                        os.link(src, path)
                    except OSError:
                        path.write_bytes(Path(src).read_bytes())
                    made += 1
            marker.write_text(str(count))
        paths.extend(str(p) for p in names[:count])
    if made:
        log(f"made {made} linked files under {root} in {time.perf_counter() - t:.1f} s")
    return paths


def decoded_pixels(paths: list[str], pre, n: int):
    """n images decoded and resized as the pipeline's CPU stage does it (cycling through paths if n is larger):
    uint8 [n, H, W, 3], outside any timing."""
    import numpy as np

    from pipeline.decode import decode_one

    out = []
    for i in range(n):
        with open(paths[i % len(paths)], "rb") as f:
            out.append(decode_one(f.read(), pre, 10**9)[0])
    return np.stack(out)


def target_bound(check: dict) -> str:
    """A target check's bound as text: '>= 1.5' or '< 10.0'."""
    return f">= {check['minimum']}" if "minimum" in check else f"< {check['maximum']}"


def write_list(paths: list[str], path: Path) -> Path:
    """A .txt list file (one absolute path a line): the pipeline's input for an exact subset of a corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(p + "\n" for p in paths)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def bench_model(work: Path, size: str) -> Path:
    """A random-weight ConceptCLIP-interface model of a named size (see SIZES), built once (seed 0). Its `.done`
    marker keeps the size's configuration: a folder built from another configuration of the same name is rebuilt
    (an older marker holding only the name is trusted)."""
    folder = work / "models" / f"conceptclip-{size}"
    marker = folder / ".done"
    config = _size_config(size)
    if marker.is_file():
        text = marker.read_text()
        if not text.startswith("{") or config is None or json.loads(text) == config:
            return folder
        log(f"the cached {size} model was built from another configuration: rebuilding it")
        fresh_dir(folder)
    from pipeline.tiny import build_conceptclip_sized

    t = time.perf_counter()
    log(f"building the {size} model in {folder} (once)")
    build_conceptclip_sized(folder, size, seed=0)
    marker.write_text(json.dumps(config, sort_keys=True) if config is not None else size)
    log(f"model built in {time.perf_counter() - t:.1f} s")
    return folder


def _size_config(size: str) -> dict | None:
    try:
        from pipeline.tiny import _SIZED

        return dict(_SIZED[size])
    except (ImportError, KeyError):
        return None


def bench_prompts(work: Path) -> Path:
    path = work / "prompts.yaml"
    if not path.is_file() or path.read_text() != BENCH_PROMPTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BENCH_PROMPTS)
    return path


# -- running the pipeline as a user would --------------------------------------------------------------------------
def featurize_cmd() -> list[str]:
    """The `featurize` console script of this interpreter's environment (else `python -m pipeline.cli`)."""
    script = Path(sys.executable).parent / "featurize"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "pipeline.cli"]


def featurize_images_cmd(input_path: Path, out: Path, model_dir: Path, prompts: Path, extra: list[str]) -> list[str]:
    """`featurize images INPUT OUT --model M --prompts P --trust-remote-code EXTRA` (the benchmark models are remote
    code)."""
    return featurize_cmd() + [
        "images", str(input_path), str(out), "--model", str(model_dir), "--prompts", str(prompts),
        "--trust-remote-code", *extra,
    ]  # fmt: skip


def run_json_child(module_args: list[str]) -> tuple[dict, float]:
    """`python -m MODULE ARGS` from the repository root, quietly: (its last stdout line as JSON, its wall seconds);
    RuntimeError with the end of its stderr if it fails."""
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", *module_args], capture_output=True, text=True, env=quiet_env(), cwd=str(ROOT)
    )
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(module_args[:2])} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), wall


def run_subprocess(cmd: list[str], log_path: Path, timeout: float | None = None, sample_rss: bool = True) -> dict:
    """Run a command, wall-timed, its stdout+stderr to log_path, its RSS sampled. Raises on a non-zero exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=quiet_env(), cwd=str(ROOT))
        sampler = RssSampler(proc.pid).start() if sample_rss else None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise RuntimeError(f"timed out after {timeout} s: {' '.join(cmd)} (log: {log_path})") from None
        finally:
            rss = sampler.stop() if sampler else None
        wall = time.perf_counter() - t
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit {rc}: {' '.join(shlex.quote(c) for c in cmd)}\n--- log tail ({log_path}) ---\n{tail}")
    return {"wall_s": round(wall, 3), "rss": rss, "log": str(log_path)}


def fresh_dir(path: Path) -> Path:
    import shutil

    if path.exists():
        shutil.rmtree(path)
    return path


# -- results -------------------------------------------------------------------------------------------------------
def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def save_result(record: dict, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{record['timestamp']}-{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def append_row(table: str, header: str, row: str) -> Path:
    """Append a Markdown row to benchmarks/results/<table>.md (with its header the first time). When the table's
    columns changed since the file's last header, a new table with the new header starts below the old rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{table}.md"
    if not path.is_file():
        path.write_text(header, encoding="utf-8")
    elif _last_header(path.read_text(encoding="utf-8")) != header.splitlines()[0].strip():
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + header)
    with open(path, "a", encoding="utf-8") as f:
        f.write(row + "\n")
    return path


def _last_header(text: str) -> str | None:
    """The header line of the last Markdown table in text (the line above its `| --- |` separator)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, 0, -1):
        if lines[i].startswith("| ---"):
            return lines[i - 1].strip()
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_short(info: dict) -> str:
    gpu = f", {info['gpu'][0].split(',')[0]}" if info.get("gpu") else ""
    ram = f", {info['ram_gb']:.0f} GB" if info.get("ram_gb") else ""
    return f"{info.get('cpu_model') or '?'} x{info.get('usable_cpus') or info.get('logical_cpus')}{ram}{gpu}"
