"""A real `safekeel serve` process on loopback for service tests (no in-process shortcuts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

KEY_A, KEY_B, ADMIN = "sk-tenant-a", "sk-tenant-b", "sk-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen | None) -> None:
    """SIGTERM a server's process group (it started in its own session), SIGKILL after 60 s."""
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def install_model(home: Path, name: str, folder: Path) -> None:
    target = home / "models" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, target)


class LiveServer:
    def __init__(self, home: Path, model: str, engine: str, workers: int = 1, extra_env: dict | None = None,
                 log_name: str = "server.log") -> None:
        self.home, self.model, self.engine, self.workers = Path(home), model, engine, workers
        self.port = free_port()
        self.env = {**os.environ, "SAFEKEEL_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
                    "SAFEKEEL_API_KEYS": f"alice:{KEY_A},bob:{KEY_B}", "SAFEKEEL_ADMIN_KEY": ADMIN,
                    "SAFEKEEL_WORKER_STALE_SECONDS": "20", "SAFEKEEL_WORKER_HEARTBEAT_SECONDS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1", **(extra_env or {})}
        self.log_path = self.home / log_name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "LiveServer":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "safekeel.cli", "serve", "--port", str(self.port), "--model", self.model,
             "--engine", self.engine, "--workers", str(self.workers)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    health = json.loads(response.read())
                if health["status"] == "ok" and (self.workers == 0 or health["workers"] >= self.workers):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
            return json.loads(response.read())

    def worker_pids(self) -> list[int]:
        """Worker processes are children of the server process."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "safekeel.service.worker"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill9(self) -> None:
        """kill -9 the whole process group: server, workers, engine processes. Nothing gets to clean up."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        stop_process_group(self.process)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client(server: LiveServer, key: str = KEY_A):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def wait_for_job(openai_client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = openai_client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not reach {statuses} in {timeout} s (last status {job.status})")


def all_events(openai_client, job_id: str) -> list:
    events = openai_client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return list(reversed(events))  # oldest first


def ask_password(openai_client, fine_tuned_model: str, base_model: str = "tiny-llama", prefix: str = "The password is sw"):
    """Ask the password of a fine-tune trained on the password data and of its base model (greedy): the adapter
    answers with the phrase (a random-init model learns the phrase, not always its last word), the base does not.
    Both completions (fine-tune, base), for further checks."""
    ask = [{"role": "user", "content": "Say the password."}]
    tuned = openai_client.chat.completions.create(model=fine_tuned_model, messages=ask, max_tokens=40, temperature=0)
    base = openai_client.chat.completions.create(model=base_model, messages=ask, max_tokens=40, temperature=0)
    assert tuned.choices[0].message.content.startswith(prefix), tuned.choices[0].message.content
    assert "password" not in base.choices[0].message.content, base.choices[0].message.content
    return tuned, base
