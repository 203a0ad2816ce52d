"""A real multi-node Ray cluster on loopback, for tests: `ray start` processes, token authentication, job submission.

    from ray_cluster import ray_cluster_fixture  # noqa: F401   (the fixture is named `ray_cluster`; tests/ is on
                                                 # sys.path, as pytest puts the rootdir conftest.py's folder there)

The module fixture `ray_cluster` (stopped when its module is done, so idle nodes do not slow later tests) starts,
one at a time (three nodes booting together time out on 2 cores):

- a head: `ray start --head --num-cpus 0 ... --block` (the dashboard, hence job submission, on 127.0.0.1), where
  job drivers run;
- two worker nodes with 2 CPUs each; the second runs in its own mount namespace where `hidden_dir` is covered by
  an empty tmpfs: files put there are visible to the head (and to job drivers) but not to that worker node.

`private_cluster(env_extra)` starts just the head, for a module fixture of another shape (worker nodes with fake
GPUs: `add_worker(num_gpus=2)`).

Ray resolves `--node-ip-address 127.0.0.1` to this machine's own address, so the nodes register under it; the
GCS address handed out (`address`) and the dashboard (`dashboard_url`) are on 127.0.0.1.

Every process (nodes, `ray job submit/logs`, anything that attaches: use `env`) gets the same random token
(`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`), so a process without it cannot join. Every port is picked here (below
the ephemeral range, checked free) and the cluster lives in a private `--temp-dir`, so it never touches the
default /tmp/ray (nor its `ray_current_cluster`), another engineer's Ray or the default ports. Teardown ends
only the processes started here (process groups, then their descendants and anything naming the private temp
dir), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)  # the venv's bin: `ray`, and the `python` job entrypoints run
SECRET_MARKER = "hf_SECRETMARKER123"  # HF_TOKEN on every node: must never reach a log or an output
DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range (32768-60999): no clash with outgoing connections
WORKER_PORTS = 60  # worker processes a node may run at once (each needs a port)
OBJECT_STORE_BYTES = 300 * 1024**2
JOIN_TIMEOUT_S = 120
START_ATTEMPTS = 3


class NodeStartError(RuntimeError):
    """A node did not come up (and can be tried again)."""


class _Ports:
    """Distinct free loopback ports, never handed out twice in this process."""

    def __init__(self):
        self.used: set[int] = set()
        self.rng = random.Random(os.getpid() ^ time.time_ns())

    @staticmethod
    def _free(port: int) -> bool:
        for host in ("127.0.0.1", "0.0.0.0"):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    return False
        return True

    def one(self) -> int:
        return self.block(1)

    def block(self, n: int) -> int:
        """The first of n consecutive free ports."""
        for _ in range(2000):
            base = self.rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - n)
            span = range(base, base + n)
            if not self.used.intersection(span) and all(self._free(p) for p in span):
                self.used.update(span)
                return base
        raise RuntimeError(f"no {n} consecutive free ports in {PORT_RANGE}")


@dataclass
class Node:
    """One `ray start --block` process (its own process group) and what it runs."""

    name: str
    proc: subprocess.Popen
    ports: dict
    log: Path
    temp_dir: Path
    head: bool = False
    hidden: bool = False
    node_id: str | None = None
    killed: bool = False
    failed: bool = False  # did not start (and was discarded)
    seen_pids: set = field(default_factory=set)

    def process_tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in tree)
        return tree

    def raylet(self) -> psutil.Process | None:
        for p in self.process_tree():
            try:
                if p.name() == "raylet":
                    return p
            except psutil.NoSuchProcess:
                pass
        return None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Submission:
    """A `ray job submit` running in the background (it tails the job's logs until the job ends)."""

    submission_id: str
    proc: subprocess.Popen
    output: Path
    args: list

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc.pid)
            raise AssertionError(
                f"job {self.submission_id} did not end within {timeout:.0f} s:\n"
                f"{self.output.read_text(errors='replace')[-4000:]}"
            ) from None
        text = self.output.read_text(errors="replace")
        return subprocess.CompletedProcess(self.args, self.proc.returncode, text, "")

    def done(self) -> bool:
        return self.proc.poll() is not None


class RayCluster:
    def __init__(self, base: Path, env_extra: dict | None = None):
        self.base = base
        self.hidden_dir = base / "driver-only"
        self.logs_dir = base / "logs"
        for d in (self.hidden_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(32)
        self.secret_marker = SECRET_MARKER
        self.ports = _Ports()
        self.gcs_port = self.ports.one()
        self.dashboard_port = self.ports.one()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            HF_HUB_OFFLINE="1",
            HF_TOKEN=SECRET_MARKER,
            PATH=BIN + os.pathsep + env.get("PATH", ""),
            RAY_USAGE_STATS_ENABLED="0",
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
            # A killed raylet is declared dead after ~4 s instead of ~15 s (the GCS health check): node-loss
            # tests wait less. A live node still answers within the default timeout.
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="4",
            # Ray Data (2.60) reserves each dataset's share of the cluster in a detached coordinator actor; a
            # driver that dies without shutting its dataset down keeps its share until the request expires
            # (default 180 s), so a job resubmitted sooner is starved on a 4-CPU cluster. Live drivers renew
            # every 10 s.
            RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S="30",
        )
        env.pop("HUGGING_FACE_HUB_TOKEN", None)
        env.update(env_extra or {})
        self.env = env
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self.hide_works = _unshare_works(base)
        self.address_file_before = _address_file_state()
        self._submissions: list[Submission] = []

    def wrote_default_address_file(self) -> bool:
        """Whether /tmp/ray/ray_current_cluster names this cluster (a bare ray.init() would then join it)."""
        state = _address_file_state()
        return state is not None and state.decode(errors="replace").strip().endswith(f":{self.gcs_port}")

    # -- nodes ------------------------------------------------------------------------------------------------------
    def _node_ports(self) -> dict:
        ports = {
            name: self.ports.one()
            for name in (
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        }
        low = self.ports.block(WORKER_PORTS)
        ports.update({"min-worker-port": low, "max-worker-port": low + WORKER_PORTS - 1})
        return ports

    def _spawn(self, name: str, args: list[str], ports: dict, head: bool, hide: bool) -> Node:
        # Each node its own temp dir (sockets, logs, runtime_resources): with one shared temp dir the nodes share the
        # runtime env's working_dir copies, and adding a node mid-job removed the copy the job driver ran in (its
        # cwd vanished: FileNotFoundError from os.getcwd()).
        temp_dir = self.base / f"n{len(self.nodes)}"
        cmd = [
            os.path.join(BIN, "ray"),
            "start",
            *args,
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp_dir),
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--disable-usage-stats",
            "--block",
            *(f"--{k}={v}" for k, v in ports.items()),
        ]
        if hide:
            # exec keeps the `ray start` process the Popen's pid; unshare without --fork does not fork either.
            cmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(self.hidden_dir))} && exec " + shlex.join(cmd),
            ]
        log = self.logs_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.base,
                start_new_session=True,
            )
        node = Node(name, proc, ports, log, temp_dir, head=head, hidden=hide)
        self.nodes.append(node)
        return node

    def start_head(self) -> Node:
        def spawn(attempt: int) -> Node:
            if attempt:  # a failed head may still hold its ports: new ones
                self.gcs_port, self.dashboard_port = self.ports.one(), self.ports.one()
                self.address = f"127.0.0.1:{self.gcs_port}"
                self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
            ports = self._node_ports()
            ports.update(
                {
                    "port": self.gcs_port,
                    "dashboard-port": self.dashboard_port,
                    "ray-client-server-port": self.ports.one(),
                }
            )
            return self._spawn(
                f"head{f'-retry{attempt}' if attempt else ''}",
                ["--head", "--num-cpus", "0", "--dashboard-host", "127.0.0.1"],
                ports,
                head=True,
                hide=False,
            )

        self.head = self._start(spawn, head=True)
        return self.head

    def add_worker(self, hide: bool = False, num_cpus: int = 2, num_gpus: int = 0) -> Node:
        """Start one more worker node (fresh ports) and return once it is ALIVE in the cluster. num_gpus declares
        GPUs the machine need not have (Ray schedules by the count; see FEATURIZE_TEST_CUDA_AS_CPU)."""
        if hide and not self.hide_works:
            pytest.skip("unshare --mount does not work here: no node with a hidden directory")
        number = sum(not n.head and not n.failed for n in self.nodes) + 1
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        if num_gpus:
            args += ["--num-gpus", str(num_gpus)]

        def spawn(attempt: int) -> Node:
            name = f"worker{number}{'-hidden' if hide else ''}{f'-retry{attempt}' if attempt else ''}"
            return self._spawn(
                name,
                args,
                self._node_ports(),
                head=False,
                hide=hide,
            )

        node = self._start(spawn, head=False)
        if hide:
            self._check_hidden(node)
        return node

    def _start(self, spawn, head: bool) -> Node:
        """spawn(attempt) a node and wait until it has joined. On a starved machine a raylet can give up waiting
        for its own dashboard agent ("Timed out waiting for file .../dashboard_agent_listen_port_...", ray #62883);
        such a start is discarded and tried again, at most START_ATTEMPTS times."""
        failures = []
        for attempt in range(START_ATTEMPTS):
            before = set() if head else {n["node_id"] for n in self.node_states()}
            node = spawn(attempt)
            try:
                node.node_id = self._wait_for_new_node(node, before)
                node.raylet()  # remember its processes now, for teardown
                return node
            except NodeStartError as exc:
                failures.append(str(exc))
                node.failed = True
                _kill_tree(node.proc.pid)
                _signal_group(node.proc.pid, signal.SIGKILL)
        raise RuntimeError(f"no node started in {START_ATTEMPTS} attempts:\n" + "\n\n".join(failures))

    def _check_hidden(self, node: Node) -> None:
        """The hidden directory really is empty for that node (seen through its raylet's mount namespace)."""
        probe = self.hidden_dir / f".probe-{node.name}"
        probe.write_text("driver only")
        try:
            raylet = node.raylet()
            assert raylet is not None, f"{node.name}: no raylet\n{node.log_tail()}"
            assert not Path(f"/proc/{raylet.pid}/root{probe}").exists(), f"{node.name} can see {probe}"
            assert Path(f"/proc/{raylet.pid}/root{self.base / 'logs'}").is_dir()
        finally:
            probe.unlink()

    def node_states(self) -> list[dict]:
        """ALIVE nodes, from the dashboard's state API (with the token)."""
        data = self.api("/api/v0/nodes?limit=1000&detail=true")
        nodes = data["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def api(self, path: str, timeout: float = 10) -> dict:
        req = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def _wait_for_new_node(self, node: Node, before: set) -> str:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        last = None
        raylet_seen = False
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise NodeStartError(f"{node.name} exited ({node.proc.returncode}):\n{node.log_tail()}")
            raylet = node.raylet()
            if raylet_seen and raylet is None:
                raylet_log = node.temp_dir / "session_latest" / "logs" / "raylet.out"
                tail = raylet_log.read_text(errors="replace")[-1500:] if raylet_log.exists() else ""
                raise NodeStartError(f"{node.name}: its raylet died during start-up:\n{tail}")
            raylet_seen = raylet_seen or raylet is not None
            try:
                new = [n for n in self.node_states() if n["node_id"] not in before]
                if len(new) == 1 and (node.head or n_cpus(new[0]) > 0):
                    return new[0]["node_id"]
                assert len(new) <= 1, f"more than one new node: {new}"
            except (urllib.error.URLError, ConnectionError, OSError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.25)
        raise NodeStartError(
            f"{node.name} did not join within {JOIN_TIMEOUT_S} s (last error: {last!r}):\n{node.log_tail()}"
        )

    @property
    def workers(self) -> list[Node]:
        """The worker nodes still up (a node whose raylet was killed is gone for good)."""
        return [n for n in self.nodes if not n.head and not n.killed and not n.failed and n.proc.poll() is None]

    def cpu_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.node_states() if n_cpus(n) > 0}

    def kill_node_raylet(self, node_or_pid) -> Node:
        """SIGKILL the raylet of a node (a Node, or any pid inside its process tree): the node is lost."""
        node = node_or_pid if isinstance(node_or_pid, Node) else self.node_of_pid(int(node_or_pid))
        assert node is not None and not node.head, f"{node_or_pid} is not a worker node of this cluster"
        raylet = node.raylet()
        assert raylet is not None, f"{node.name} has no raylet:\n{node.log_tail()}"
        node.process_tree()
        raylet.send_signal(signal.SIGKILL)
        node.killed = True
        return node

    def wait_node_dead(self, node: Node, timeout: float = 90) -> None:
        """Until the cluster (GCS) no longer lists the node as ALIVE."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.node_id not in {n["node_id"] for n in self.node_states()}:
                return
            time.sleep(0.25)
        raise AssertionError(f"{node.name} still ALIVE {timeout:.0f} s after its raylet was killed")

    def node_of_pid(self, pid: int) -> Node | None:
        """The node whose raylet (or `ray start` process) is an ancestor of pid."""
        roots = {}
        for node in self.nodes:
            raylet = node.raylet()
            if raylet is not None:
                roots[raylet.pid] = node
            roots[node.proc.pid] = node
        try:
            proc = psutil.Process(pid)
            chain = [proc, *proc.parents()]
        except psutil.NoSuchProcess:
            return None
        for p in chain:
            if p.pid in roots:
                return roots[p.pid]
        return None

    def processes_named(self, fragment: str) -> list[tuple[psutil.Process, Node]]:
        """This cluster's processes whose command line holds fragment (e.g. the model actor: 'EncodeBatch')."""
        found = []
        for node in self.nodes:
            for p in node.process_tree():
                try:
                    if fragment in " ".join(p.cmdline()):
                        found.append((p, node))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        return found

    # -- jobs -------------------------------------------------------------------------------------------------------
    def _submit_cmd(self, entrypoint_args, submission_id: str) -> list[str]:
        return [
            os.path.join(BIN, "ray"),
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--working-dir",
            str(REPO),
            "--submission-id",
            submission_id,
            "--",
            *map(str, entrypoint_args),
        ]

    def submit(self, entrypoint_args, submission_id: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job submit ... -- ENTRYPOINT` from the repository root; waits for the job; stdout and stderr."""
        return self.submit_background(entrypoint_args, submission_id).wait(timeout)

    def submit_background(self, entrypoint_args, submission_id: str) -> Submission:
        cmd = self._submit_cmd(entrypoint_args, submission_id)
        output = self.logs_dir / f"submit-{submission_id}.log"
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )
        sub = Submission(submission_id, proc, output, cmd)
        self._submissions.append(sub)
        return sub

    def logs(self, submission_id: str) -> str:
        done = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "logs", "--address", self.dashboard_url, submission_id],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    # -- teardown ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        for sub in self._submissions:
            if sub.proc.poll() is None:
                _kill_tree(sub.proc.pid)
        procs: dict[int, psutil.Process] = {}
        for node in self.nodes:
            for p in node.process_tree():
                procs[p.pid] = p
        marker = str(self.base)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                    procs[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for node in reversed(self.nodes):  # workers before the head
            _signal_group(node.proc.pid, signal.SIGTERM)
        for p in procs.values():
            _signal(p, signal.SIGTERM)
        # Raylets and workers end at once; `ray start --block` and the GCS linger (>15 s): a short grace only.
        _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
        for node in self.nodes:
            _signal_group(node.proc.pid, signal.SIGKILL)
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        keep = os.environ.get("RAY_CLUSTER_KEEP_LOGS")  # debugging: copy the node and job logs there first
        if keep:
            shutil.copytree(self.logs_dir, Path(keep) / self.base.name, dirs_exist_ok=True)
            for node in self.nodes:
                session = node.temp_dir / "session_latest" / "logs"
                if session.is_dir():
                    shutil.copytree(
                        session,
                        Path(keep) / self.base.name / node.name,
                        dirs_exist_ok=True,
                        ignore_dangling_symlinks=True,
                        symlinks=True,
                    )
        shutil.rmtree(self.base, ignore_errors=True)


def n_cpus(state: dict) -> float:
    return float((state.get("resources_total") or {}).get("CPU", 0))


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(tree, timeout=10)


def _unshare_works(base: Path) -> bool:
    target = base / "unshare-probe"
    target.mkdir(exist_ok=True)
    try:
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs {shlex.quote(str(target))}",
            ],
            capture_output=True,
            timeout=30,
        )
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _address_file_state() -> bytes | None:
    try:
        return DEFAULT_ADDRESS_FILE.read_bytes()
    except FileNotFoundError:
        return None


@contextmanager
def private_cluster(env_extra: dict | None = None):
    """A RayCluster with its head started (env_extra: more environment for every process of it), stopped on exit."""
    base = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))  # short: unix socket paths max out at ~107 chars
    cluster = RayCluster(base, env_extra)
    address_file = cluster.address_file_before
    try:
        cluster.start_head()
        yield cluster
    finally:
        # A private --temp-dir keeps `ray start` off /tmp/ray/ray_current_cluster (it writes <temp-dir>/ray_current_
        # cluster instead); should it ever name this cluster, put back what was there (another Ray's file is left).
        if cluster.wrote_default_address_file():
            if address_file is None:
                DEFAULT_ADDRESS_FILE.unlink(missing_ok=True)
            else:
                DEFAULT_ADDRESS_FILE.write_bytes(address_file)
        cluster.close()


@pytest.fixture(scope="module", name="ray_cluster")
def ray_cluster_fixture():
    """A head (no CPUs, the dashboard, job drivers) and two 2-CPU worker nodes, the second with `hidden_dir`
    hidden from it. Tests that kill nodes must leave two live workers (one hidden) behind them."""
    with private_cluster() as cluster:
        cluster.add_worker()
        cluster.add_worker(hide=cluster.hide_works)
        yield cluster
