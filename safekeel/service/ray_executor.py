"""The Ray executor (`SAFEKEEL_EXECUTOR=ray`): each fine-tuning job runs as a Ray actor on a cluster.

The server stays the only writer of its database and of every job's state machine. It claims a queued job as
a local worker does (`Store.claim_job`), starts a `JobRunner` actor that asks Ray for the job's resources, and
the actor runs the very same `execute_job` as a local worker, with a `Recorder` in place of the database: each
write (events, checkpoints, the published model, the final status) is recorded in order, and the server drains
and applies them about once a second (`JobRunner.sync`), handing the cancel and stop flags over on the same call.

Files: a job's inputs and outputs are paths under `settings.files_root` (SAFEKEEL_SHARED_DIR), which every node
and the server mount at the same place; the checkpoints a resumed job continues from are there too.

Failures: an actor that dies (its worker process or its whole node killed) surfaces on the server as a
RayActorError; the job is then requeued (`worker.interrupt_job`: cancelled if a cancel was requested, failed with
`worker_lost` after `max_job_attempts`) and, claimed again, resumes from its last checkpoint on whichever node Ray
picks. Writes the dead actor recorded after the last drain are lost (at most about a second of events); files
are not. Cancel: the flag reaches the actor, whose training stops at the next step; an actor that has not
stopped `ray_cancel_grace_seconds` later, or had not started, is killed. A graceful server stop asks every actor
to stop at its next step (training checkpoints there) and requeues its job without counting an attempt, as a
local worker does; an actor still running when the stop times out is killed and its job recovered at the next
start (its worker, this server's pid, is gone).

ray is imported where it is used, on purpose: it is an optional extra (`pip install 'safekeel[ray]'`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from safekeel.service.jobs import execute_job
from safekeel.service.settings import ServiceSettings
from safekeel.service.store import Store
from safekeel.service.worker import interrupt_job, recover_jobs

log = logging.getLogger(__name__)

RECORDED = ("add_event", "add_checkpoint", "add_model", "set_status")
"""The Store writes execute_job makes; the only ones a Recorder records and the server applies."""


def import_ray():
    """ray, or a clear error naming the extra that provides it."""
    try:
        import ray  # deferred on purpose: an optional extra, imported only when the Ray executor is chosen
    except ImportError as error:
        raise RuntimeError("SAFEKEEL_EXECUTOR=ray needs the ray package: pip install 'safekeel[ray]' "
                           "(make install includes it)") from error
    return ray


class Recorder:
    """What `execute_job` writes to the database, recorded in order inside the actor for the server to apply;
    `cancel_requested` answers from the flag the server last handed over."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[tuple[str, tuple, dict]] = []
        self.cancel = False
        self.abort = False

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        with self.lock:
            self.ops.append((name, args, kwargs))

    def add_event(self, job_id: str, message: str, type: str = "message", level: str = "info", data: Any = None) -> None:
        self._record("add_event", (job_id, message), {"type": type, "level": level, "data": data})

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict | None) -> None:
        self._record("add_checkpoint", (job_id, step, path, metrics), {})

    def add_model(self, model_id: str, tenant: str, parent: str, job_id: str, adapter_path: str, guard: dict) -> None:
        self._record("add_model", (model_id, tenant, parent, job_id, adapter_path, guard), {})

    def set_status(self, job_id: str, status: str, expected: tuple[str, ...] | None = None, **fields: Any) -> bool:
        self._record("set_status", (job_id, status), {"expected": expected, **fields})
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return self.cancel

    def drain(self) -> list[tuple[str, tuple, dict]]:
        with self.lock:
            ops, self.ops = self.ops, []
        return ops


class JobRunner:
    """One job in a Ray worker process (a threaded actor: `run` in one thread, the server's `sync` calls in another)."""

    def __init__(self, settings: dict, job: dict) -> None:
        logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = ServiceSettings(**settings)
        self.job = job
        self.recorder = Recorder()

    def where(self) -> dict:
        ray = import_ray()
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def run(self) -> None:
        execute_job(self.recorder, self.settings, self.job, should_abort=lambda: self.recorder.abort)

    def sync(self, cancel: bool, abort: bool) -> list[tuple[str, tuple, dict]]:
        """Take the server's flags; hand back what was recorded since the last call."""
        self.recorder.cancel = self.recorder.cancel or cancel
        self.recorder.abort = self.recorder.abort or abort
        return self.recorder.drain()


def job_resources(settings: ServiceSettings) -> dict:
    """What each job asks of Ray: CPUs (its torch threads), GPUs, and a memory reservation when one is set."""
    resources: dict[str, float] = {"num_cpus": settings.ray_job_cpus, "num_gpus": settings.ray_job_gpus}
    if settings.ray_job_memory_gb:
        resources["memory"] = int(settings.ray_job_memory_gb * 2**30)
    return resources


def _describe(resources: dict) -> str:
    parts = [f"{resources['num_cpus']:g} CPU"]
    if resources["num_gpus"]:
        parts.append(f"{resources['num_gpus']:g} GPU")
    if "memory" in resources:
        parts.append(f"{resources['memory'] / 2**30:.1f} GB memory")
    return ", ".join(parts)


def _fits(node: dict, resources: dict) -> bool:
    offered = node.get("Resources", {})
    return (offered.get("CPU", 0) >= resources["num_cpus"] and offered.get("GPU", 0) >= resources["num_gpus"]
            and offered.get("memory", 0) >= resources.get("memory", 0))


@dataclass
class Dispatch:
    """A claimed job and the actor running it."""

    job: dict
    actor: Any
    run_ref: Any
    where_ref: Any
    sync_ref: Any = None
    started: dict | None = None
    cancel_seen_at: float | None = None


class RayExecutor:
    """Runs up to `slots` jobs at once on the Ray cluster; the app's lifespan starts and stops it."""

    def __init__(self, settings: ServiceSettings, slots: int) -> None:
        self.settings, self.slots = settings, slots
        self.store = Store(settings.db_path)
        self.id = f"{socket.gethostname()}:{os.getpid()}:ray-{os.urandom(3).hex()}"
        self.dispatches: dict[str, Dispatch] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="safekeel-ray-executor")
        self.nodes: list[dict] = []
        self._nodes_at = 0.0
        self.ray: Any = None
        self.runner: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ray = self.ray = import_ray()
        env = {name: os.environ[name] for name in self.settings.ray_env_vars if name in os.environ}
        address = self.settings.ray_address or "auto"
        # ray.init makes SIGTERM exit the process at once; the server's own handler (uvicorn's graceful shutdown,
        # which stops this executor and requeues running jobs) is put back
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            ray.init(address=address, namespace="safekeel", log_to_driver=False, logging_level="warning",
                     runtime_env={"env_vars": env} if env else None)
        except ConnectionError as error:
            raise RuntimeError(f"SAFEKEEL_EXECUTOR=ray: no Ray cluster at {address!r} (SAFEKEEL_RAY_ADDRESS): {error}") from error
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.runner = ray.remote(JobRunner)
        self._refresh_nodes(force=True)
        log.info("ray executor %s on %s: %d node(s) can run jobs, up to %d job(s) at once", self.id, address,
                 self.alive(), self.slots)
        self.thread.start()

    def alive(self) -> int:
        """Live nodes that can run a job (the health endpoint's `workers`)."""
        return sum(1 for node in self.nodes if _fits(node, job_resources(self.settings)))

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every running job to stop at its next step and requeue it (no attempt counted); kill what is left."""
        self.stopping.set()
        self.thread.join(timeout=15)
        deadline = time.time() + timeout
        for dispatch in list(self.dispatches.values()):
            if dispatch.started is None:  # not running yet: nothing to checkpoint
                self._kill(dispatch)
                self._release(dispatch.job["id"])
                continue
            try:
                self._sync(dispatch, abort=True, wait=10)
            except Exception as error:  # a dead or unreachable actor: handled below
                log.warning("could not ask job %s to stop: %s", dispatch.job["id"], error)
        while self.dispatches and time.time() < deadline:
            for dispatch in list(self.dispatches.values()):
                if self._ready(dispatch.run_ref):
                    self._finish(dispatch)
            time.sleep(0.2)
        for dispatch in list(self.dispatches.values()):
            log.warning("job %s did not stop in %.0f s: its actor is killed; the next start requeues it",
                        dispatch.job["id"], timeout)
            self._kill(dispatch)
        self.ray.shutdown()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._tick()
            except Exception:  # the loop must outlive a bad tick (a database lock, a Ray hiccup)
                log.exception("ray executor tick failed")
            self.stopping.wait(self.settings.worker_poll_seconds)

    def _tick(self) -> None:
        recover_jobs(self.store, self.settings)  # jobs a previous server process left running
        self._refresh_nodes()
        for dispatch in list(self.dispatches.values()):
            self._follow(dispatch)
        while len(self.dispatches) < self.slots and not self.stopping.is_set():
            job = self.store.claim_job(self.id)
            if job is None:
                break
            self._submit(job)

    def _refresh_nodes(self, force: bool = False) -> None:
        if force or time.time() - self._nodes_at > 5:
            self.nodes = [node for node in self.ray.nodes() if node.get("Alive")]
            self._nodes_at = time.time()

    def _ready(self, ref: Any) -> bool:
        return bool(self.ray.wait([ref], timeout=0)[0])

    def _submit(self, job: dict) -> None:
        job_id, resources = job["id"], job_resources(self.settings)
        options = {key: value for key, value in resources.items() if value or key == "num_cpus"}
        actor = self.runner.options(**options, max_restarts=0, max_task_retries=0, max_concurrency=4).remote(
            self.settings.model_dump(), job)
        self.dispatches[job_id] = Dispatch(job, actor, actor.run.remote(), actor.where.remote())
        self.store.add_event(job_id, f"Submitted to the Ray cluster (attempt {job['attempts']}), asking for {_describe(resources)}",
                             data={"resources": resources, "attempt": job["attempts"]})
        if not any(_fits(node, resources) for node in self.nodes):
            self.store.add_event(job_id, f"No live Ray node offers {_describe(resources)} now: the job waits for one "
                                         "(an autoscaler may add it)", level="warn")

    def _follow(self, dispatch: Dispatch) -> None:
        job_id = dispatch.job["id"]
        if not self.store.heartbeat(job_id, self.id):  # finalised or taken over elsewhere: not ours any more
            log.warning("job %s is no longer this server's; its actor is killed", job_id)
            self._kill(dispatch)
            return
        if dispatch.where_ref is not None and self._ready(dispatch.where_ref):
            try:
                dispatch.started = self.ray.get(dispatch.where_ref)
                self.store.add_event(job_id, f"Running on Ray node {dispatch.started['node_ip']} "
                                             f"({dispatch.started['node_id'][:12]}), worker pid {dispatch.started['pid']}",
                                     data=dispatch.started)
            except self.ray.exceptions.RayActorError:
                pass  # the run's own reference says so below
            dispatch.where_ref = None
        cancel = self.store.cancel_requested(job_id)
        if cancel and dispatch.cancel_seen_at is None:
            dispatch.cancel_seen_at = time.time()
        if self._ready(dispatch.run_ref):
            self._finish(dispatch)
            return
        try:
            self._sync(dispatch, cancel=cancel)
        except self.ray.exceptions.RayActorError:
            pass  # died: the run's reference is ready with the error at the next tick
        if cancel and (dispatch.started is None
                       or time.time() - dispatch.cancel_seen_at > self.settings.ray_cancel_grace_seconds):
            self._kill(dispatch)
            waited = "before it started" if dispatch.started is None else \
                f"after it did not stop within {self.settings.ray_cancel_grace_seconds:.0f} s"
            if self.store.set_status(job_id, "cancelled", expected=("running",)):
                self.store.add_event(job_id, f"Job cancelled (its Ray actor was stopped {waited})")

    def _sync(self, dispatch: Dispatch, cancel: bool = False, abort: bool = False, wait: float = 0.0) -> None:
        """Apply what the actor recorded: the outstanding drain if it came back, then ask for the next one (handing
        over the flags); with `wait`, block up to that long for both (the final drain)."""
        if dispatch.sync_ref is not None:
            if not (wait or self._ready(dispatch.sync_ref)):
                return
            ops = self.ray.get(dispatch.sync_ref, timeout=wait or None)
            dispatch.sync_ref = None
            self._apply(dispatch.job["id"], ops)
        dispatch.sync_ref = dispatch.actor.sync.remote(cancel, abort or self.stopping.is_set())
        if wait:
            ops = self.ray.get(dispatch.sync_ref, timeout=wait)
            dispatch.sync_ref = None
            self._apply(dispatch.job["id"], ops)

    def _apply(self, job_id: str, ops: list[tuple[str, tuple, dict]]) -> None:
        for name, args, kwargs in ops:
            if name not in RECORDED:
                raise ValueError(f"job {job_id}: unexpected recorded write {name!r}")
            if name == "add_model" and self.store.get_model(args[0]) is not None:
                continue  # published by an earlier attempt whose final status was lost with its actor
            getattr(self.store, name)(*args, **kwargs)

    def _finish(self, dispatch: Dispatch) -> None:
        """The actor's run returned (or its actor died): apply its last writes, then settle the job."""
        job_id, ray = dispatch.job["id"], self.ray
        died = crashed = None
        try:
            ray.get(dispatch.run_ref)
        except ray.exceptions.RayActorError as error:
            died = error
        except ray.exceptions.RayTaskError as error:  # a bug outside execute_job's own error handling
            crashed = error
        if died is None:
            try:
                self._sync(dispatch, wait=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                died = error
        self._kill(dispatch)
        job = self.store.get_job(job_id)
        if job is None or job["status"] != "running" or job["worker"] != self.id:
            return  # settled by the actor's own writes (succeeded, failed, cancelled)
        if died is not None:
            reason = "its Ray worker died" + (f" on node {dispatch.started['node_ip']}" if dispatch.started else "")
            log.warning("job %s: %s (%s)", job_id, reason, type(died).__name__)
            interrupt_job(self.store, self.settings, job, reason)
        elif crashed is not None:
            error = {"code": "internal_error", "param": None, "message": f"the job's Ray actor failed: {crashed}"[:2000]}
            if self.store.set_status(job_id, "failed", expected=("running",), error=error):
                self.store.add_event(job_id, f"Job failed: {error['message']}", level="error", type="error", data=error)
        else:  # execute_job returned with the job still running: the server is stopping
            self._release(job_id)

    def _release(self, job_id: str) -> None:
        status = self.store.release_job(job_id, self.id)
        if status == "queued":
            self.store.add_event(job_id, "Server stopping: job requeued from its last checkpoint")
        elif status == "cancelled":
            self.store.add_event(job_id, "Job cancelled")

    def _kill(self, dispatch: Dispatch) -> None:
        self.dispatches.pop(dispatch.job["id"], None)
        try:
            self.ray.kill(dispatch.actor, no_restart=True)
        except Exception as error:  # already gone
            log.debug("kill of job %s's actor: %s", dispatch.job["id"], error)
