"""A real local Ray cluster for tests: `ray start` processes (a head and worker nodes) on this machine.

Every node is its own `ray start --block` process in its own process group, so a test can kill a worker node
outright (SIGKILL to it and all its descendants: raylet, agents, every Ray worker process) the way a machine dies. Several
nodes on one host need their own ports (Ray's defaults collide), so each node gets fresh ones. Ray maps
127.0.0.1 to this machine's own interface address; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayNode:
    def __init__(self, process: subprocess.Popen, name: str, log_path: Path) -> None:
        self.process, self.name, self.log_path = process, name, log_path

    def pids(self) -> set[int]:
        """Every live process of this node: the `ray start` process and its descendants (raylet, agents, and the Ray
        worker processes the raylet started, which may sit in process groups of their own)."""
        table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
        children: dict[int, list[int]] = {}
        for pid, ppid in zip(table[::2], table[1::2]):
            children.setdefault(int(ppid), []).append(int(pid))
        found, todo = set(), [self.process.pid]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found if self.process.poll() is None else found - {self.process.pid}

    def node_id(self) -> str | None:
        """Ray's id of this node (its raylet's --node_id), None once the node is gone."""
        for pid in self.pids():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for arg in args:
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
        return None

    def kill9(self) -> None:
        """The node dies as a machine would: SIGKILL to every process of it at once."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        left = self.pids()
        os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        for pid in left:  # whatever outlived the stop
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(30)


class LocalRayCluster:
    """A head (no CPUs for jobs by default: it only coordinates) and `workers` worker nodes with `cpus_per_worker`."""

    def __init__(self, folder: Path, workers: int = 2, cpus_per_worker: int = 1, head_cpus: int = 0,
                 env: dict | None = None) -> None:
        self.folder = Path(folder)
        self.temp_dir: Path | None = None  # a short path under /tmp: Ray's socket paths must fit in 107 bytes
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.port = free_port()
        self.head_cpus, self.cpus_per_worker, self.n_workers = head_cpus, cpus_per_worker, workers
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> RayNode:
        ports = [free_port() for _ in range(6)]
        low = 20000 + 1000 * len(self.workers) + (500 if name == "head" else 0)
        command = [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                   "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                   "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                   "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
                   "--min-worker-port", str(low), "--max-worker-port", str(low + 400),
                   "--object-store-memory", str(100 * 1024 * 1024), *args]
        log_path = self.folder / f"{name}.log"
        process = subprocess.Popen(command, env=self.env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return RayNode(process, name, log_path)

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in [self.head, *self.workers]:
                if node is not None and node.process.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited:\n{node.log_path.read_text(errors='replace')[-3000:]}")
            if len(self.alive_nodes()) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout} s")

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, asked of the GCS by a short-lived `ray` driver process."""
        script = ("import json, ray; ray.init(address=%r, logging_level='error', log_to_driver=False); "
                  "print(json.dumps([n for n in ray.nodes() if n['Alive']]))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return []
        if out.returncode != 0:
            return []
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start(self) -> "LocalRayCluster":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.head = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                                         "--temp-dir", str(self.temp_dir), "--include-dashboard", "false"])
        try:
            self._wait_for_nodes(1)
            for index in range(self.n_workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self) -> RayNode:
        """One more worker node (started after the others registered: nodes on one host share a session folder)."""
        node = self._start(f"worker{len(self.workers)}", ["--address", self.address, "--num-cpus", str(self.cpus_per_worker)])
        self.workers.append(node)
        self._wait_for_nodes(1 + len(self.workers))
        return node

    def node_by_id(self, node_id: str) -> RayNode | None:
        """The live node Ray knows as `node_id` (e.g. where a job's actor ran)."""
        return next((node for node in [*self.workers, self.head] if node and node.node_id() == node_id), None)

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None:
                node.stop()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
