"""The local job executor: worker processes that claim queued jobs from the database and run them.

A worker beats a heartbeat while it runs a job. A job whose worker died (kill -9, crash, reboot) is
taken over: at once when its worker was on this host and its pid is gone, otherwise after
`worker_stale_seconds` without a heartbeat. It is requeued and resumes from its last training
checkpoint, or fails with `worker_lost` after `max_job_attempts`.

A graceful stop (SIGTERM or SIGINT, e.g. the server shutting down) is not a crash: training stops at
the end of its current step and saves a checkpoint there, and the worker requeues the job without
counting the attempt (`Store.release_job`). A stage that does not watch for the stop (selection, the
gate's evaluation) runs to its end first; a worker killed before it gets there counts as a crash.

The Ray executor (safekeel.service.ray_executor, `SAFEKEEL_EXECUTOR=ray`) replaces these processes: it claims
jobs the same way and runs `execute_job` in a Ray actor; `recover_jobs` and `interrupt_job` serve both.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from safekeel.service.jobs import execute_job
from safekeel.service.settings import ServiceSettings
from safekeel.service.store import Store

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def worker_is_dead(worker: str | None) -> bool:
    """True if `worker` (host:pid:token) ran on this host and its process no longer exists."""
    if not worker:
        return True
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def recover_jobs(store: Store, settings: ServiceSettings) -> list[str]:
    """Requeue (or fail) running jobs whose worker is gone. Returns the ids acted on."""
    acted = []
    for job in store.running_jobs():
        dead = worker_is_dead(job["worker"])
        stale = job["heartbeat"] is None or job["heartbeat"] < time.time() - settings.worker_stale_seconds
        if not (dead or stale):
            continue
        why = "its worker process is gone" if dead else f"no heartbeat for over {settings.worker_stale_seconds:.0f} s"
        if interrupt_job(store, settings, job, why):
            acted.append(job["id"])
    return acted


def interrupt_job(store: Store, settings: ServiceSettings, job: dict, why: str) -> str | None:
    """A running job whose runner died (`why`): cancelled if a cancel was requested, failed with `worker_lost` after
    `max_job_attempts`, else requeued to resume from its last checkpoint. The new status, or None if the job was
    no longer running on `job["worker"]` (someone else acted first). Used by any executor."""
    if store.cancel_requested(job["id"]):
        if store.set_status(job["id"], "cancelled", expected=("running",)):
            store.add_event(job["id"], f"Job cancelled ({why} after cancellation was requested)")
            return "cancelled"
        return None
    if job["attempts"] >= settings.max_job_attempts:
        error = {"code": "worker_lost", "param": None,
                 "message": f"The job was interrupted {job['attempts']} times ({why}); giving up"}
        if store.set_status(job["id"], "failed", expected=("running",), error=error):
            store.add_event(job["id"], f"Job failed: {error['message']}", level="error", type="error", data=error)
            return "failed"
        return None
    with store.connect(immediate=True) as db:
        moved = db.execute("UPDATE jobs SET status='queued', worker=NULL WHERE id=? AND status='running' AND worker IS ?",
                           (job["id"], job["worker"])).rowcount == 1
    if moved:
        store.add_event(job["id"], f"Job interrupted ({why}); requeued to resume from its last checkpoint", level="warn")
        return "queued"
    return None


class Worker:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.stopping = threading.Event()

    def run_forever(self) -> None:
        log.info("worker %s polling %s", self.id, self.settings.db_path)
        while not self.stopping.is_set():
            recover_jobs(self.store, self.settings)
            job = self.store.claim_job(self.id)
            if job is None:
                self.stopping.wait(self.settings.worker_poll_seconds)
                continue
            self.run_one(job)

    def run_one(self, job: dict) -> None:
        lost = threading.Event()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.worker_heartbeat_seconds):
                if not self.store.heartbeat(job["id"], self.id):
                    lost.set()  # cancelled and finalised elsewhere, or taken over
                    return

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            # on abort, execute_job returns with the job still running (and this worker's)
            execute_job(self.store, self.settings, job, should_abort=lambda: self.stopping.is_set() or lost.is_set())
        finally:
            done.set()
            beater.join(timeout=5)
        if self.stopping.is_set() and not lost.is_set():
            self.release(job["id"])

    def release(self, job_id: str) -> None:
        """Requeue the job this worker stops running (no-op if it finished or is no longer this worker's)."""
        status = self.store.release_job(job_id, self.id)
        if status == "queued":
            self.store.add_event(job_id, "Server stopping: job requeued from its last checkpoint")
            log.info("job %s requeued (graceful stop)", job_id)
        elif status == "cancelled":
            self.store.add_event(job_id, "Job cancelled")


class WorkerSupervisor:
    """Starts worker processes beside the API server and restarts any that die."""

    def __init__(self, settings: ServiceSettings, count: int) -> None:
        self.settings, self.count = settings, count
        self.processes: list[subprocess.Popen] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["SAFEKEEL_SERVICE_DIR"] = str(self.settings.root)
        env["SAFEKEEL_BASE_MODELS"] = json.dumps(self.settings.base_models)
        return subprocess.Popen([sys.executable, "-m", "safekeel.service.worker"], env=env)

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        self.thread.start()

    def alive(self) -> int:
        return sum(1 for p in self.processes if p.poll() is None)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _watch(self) -> None:
        while not self.stopping.wait(2.0):
            for index, process in enumerate(self.processes):
                if process.poll() is not None and not self.stopping.is_set():
                    log.warning("worker pid %s exited with %s; starting a new one", process.pid, process.returncode)
                    self.processes[index] = self._spawn()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(asctime)s %(levelname)s worker: %(message)s")
    worker = Worker(ServiceSettings())

    def stop(signum, frame) -> None:
        log.info("worker %s stopping (signal %s); a running job is checkpointed and requeued", worker.id, signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run_forever()


if __name__ == "__main__":
    main()
