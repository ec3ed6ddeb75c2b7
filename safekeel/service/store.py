"""Durable state of the service in SQLite (WAL): files, fine-tuning jobs, their events and checkpoints,
and fine-tuned models. The jobs table is also the work queue: a worker claims a queued job in one
transaction, beats a heartbeat while it runs, and a job whose worker went silent is taken over.

Each call opens its own short-lived connection, so the API (threads) and workers (processes) share
the database safely; writes use BEGIN IMMEDIATE so two workers never claim the same job.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, format TEXT, n_examples INTEGER, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL,
    safety TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    started_at INTEGER, finished_at INTEGER, fine_tuned_model TEXT, error TEXT, result TEXT,
    trained_tokens INTEGER, worker TEXT, heartbeat REAL, cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL,
    created_at INTEGER NOT NULL, metrics TEXT, UNIQUE(job_id, step)
);
CREATE TABLE IF NOT EXISTS models (
    lora_int_id INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    parent TEXT NOT NULL, job_id TEXT NOT NULL, adapter_path TEXT NOT NULL, created_at INTEGER NOT NULL,
    guard TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
"""

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
JSON_COLUMNS = {"hyperparameters", "safety", "spec", "error", "result", "data", "metrics", "guard"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _row(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    out = dict(row)
    for key in JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()

    @contextmanager
    def connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # ---- files ----
    def add_file(self, record: dict) -> dict:
        with self.connect(immediate=True) as db:
            db.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, created_at, status, format, n_examples)"
                " VALUES (:id, :tenant, :filename, :purpose, :bytes, :sha256, :created_at, :status, :format, :n_examples)",
                record)
        return self.get_file(record["id"])

    def get_file(self, file_id: str, tenant: str | None = None) -> dict | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM files WHERE id=? AND deleted=0", (file_id,)).fetchone()
        found = _row(row)
        return found if found and (tenant is None or found["tenant"] == tenant) else None

    def list_files(self, tenant: str | None, purpose: str | None = None, limit: int = 10000) -> list[dict]:
        query, args = "SELECT * FROM files WHERE deleted=0", []
        if tenant is not None:
            query, args = query + " AND tenant=?", args + [tenant]
        if purpose:
            query, args = query + " AND purpose=?", args + [purpose]
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        with self.connect(immediate=True) as db:
            db.execute("UPDATE files SET deleted=1 WHERE id=?", (file_id,))

    def blob_in_use(self, sha256: str) -> bool:
        with self.connect() as db:
            return db.execute("SELECT 1 FROM files WHERE sha256=? AND deleted=0", (sha256,)).fetchone() is not None

    def file_used_by_job(self, file_id: str) -> bool:
        with self.connect() as db:
            return db.execute("SELECT 1 FROM jobs WHERE training_file=? OR validation_file=?", (file_id, file_id)).fetchone() is not None

    # ---- jobs ----
    def add_job(self, record: dict) -> dict:
        record = {**record, **{k: _dump(record[k]) for k in ("hyperparameters", "safety", "spec")}}
        with self.connect(immediate=True) as db:
            db.execute(
                "INSERT INTO jobs (id, tenant, model, training_file, validation_file, suffix, seed, hyperparameters,"
                " safety, spec, status, created_at) VALUES (:id, :tenant, :model, :training_file, :validation_file,"
                " :suffix, :seed, :hyperparameters, :safety, :spec, :status, :created_at)", record)
        return self.get_job(record["id"])

    def get_job(self, job_id: str, tenant: str | None = None) -> dict | None:
        with self.connect() as db:
            found = _row(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
        return found if found and (tenant is None or found["tenant"] == tenant) else None

    def list_jobs(self, tenant: str | None, after: str | None = None, limit: int = 20) -> list[dict]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if tenant is not None:
            query, args = query + " AND tenant=?", args + [tenant]
        if after:
            query += " AND rowid < (SELECT rowid FROM jobs WHERE id=?)"
            args.append(after)
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields = {k: _dump(v) if k in JSON_COLUMNS else v for k, v in fields.items()}
        assignments = ", ".join(f"{k}=:{k}" for k in fields)
        with self.connect(immediate=True) as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id=:job_id", {**fields, "job_id": job_id})

    def set_status(self, job_id: str, status: str, expected: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Move a job to `status` (only from one of `expected`, if given); True if it moved."""
        assert status in JOB_STATUSES, status
        if status in TERMINAL:
            fields.setdefault("finished_at", now())
        fields = {k: _dump(v) if k in JSON_COLUMNS else v for k, v in fields.items()}
        assignments = ", ".join(["status=:status"] + [f"{k}=:{k}" for k in fields])
        query = f"UPDATE jobs SET {assignments} WHERE id=:job_id"
        args = {**fields, "status": status, "job_id": job_id}
        if expected:
            query += " AND status IN (" + ", ".join(f"'{s}'" for s in expected) + ")"
        with self.connect(immediate=True) as db:
            return db.execute(query, args).rowcount == 1

    def request_cancel(self, job_id: str) -> str:
        """Cancel a job: at once if it has not started, else flag it for its worker. Returns the new status."""
        with self.connect(immediate=True) as db:
            status = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()["status"]
            if status in ("validating_files", "queued"):
                db.execute("UPDATE jobs SET status='cancelled', finished_at=?, cancel_requested=1 WHERE id=?", (now(), job_id))
                return "cancelled"
            if status == "running":
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return status

    def cancel_requested(self, job_id: str) -> bool:
        with self.connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def claim_job(self, worker: str) -> dict | None:
        """Atomically take the oldest queued job for `worker` (status -> running)."""
        with self.connect(immediate=True) as db:
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created_at, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status='running', worker=?, heartbeat=?, attempts=attempts+1,"
                       " started_at=COALESCE(started_at, ?) WHERE id=?", (worker, time.time(), now(), row["id"]))
        return self.get_job(row["id"])

    def release_job(self, job_id: str, worker: str) -> str | None:
        """Give back a job whose worker stops gracefully (its training checkpointed): queued again, and the
        attempt its claim counted is not counted, since nothing crashed; cancelled instead if a cancel was
        requested meanwhile. Returns the new status, or None if the job is no longer `worker`'s running job."""
        with self.connect(immediate=True) as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=? AND worker=? AND status='running'",
                             (job_id, worker)).fetchone()
            if row is None:
                return None
            if row["cancel_requested"]:
                db.execute("UPDATE jobs SET status='cancelled', finished_at=? WHERE id=?", (now(), job_id))
                return "cancelled"
            db.execute("UPDATE jobs SET status='queued', worker=NULL, heartbeat=NULL, attempts=MAX(attempts - 1, 0)"
                       " WHERE id=?", (job_id,))
            return "queued"

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Refresh a running job's heartbeat; False if the job is no longer this worker's."""
        with self.connect(immediate=True) as db:
            return db.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND worker=? AND status='running'",
                              (time.time(), job_id, worker)).rowcount == 1

    def running_jobs(self) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status='running'").fetchall()
        return [_row(r) for r in rows]

    def count_jobs_by_status(self) -> dict[str, int]:
        with self.connect() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        counts = {status: 0 for status in JOB_STATUSES}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    def job_timings(self) -> list[dict]:
        """Each finished job's stage timings (only that part of the result: the eval reports stay on disk)."""
        with self.connect() as db:
            rows = db.execute("SELECT json_extract(result, '$.timings') AS timings FROM jobs"
                              " WHERE json_extract(result, '$.timings') IS NOT NULL").fetchall()
        return [json.loads(r["timings"]) for r in rows]

    def count_events_by_level(self, event_type: str) -> dict[str, int]:
        """Events of one type by level (the data gate's: info passed, warn over the limit, error rejected)."""
        with self.connect() as db:
            rows = db.execute("SELECT level, COUNT(*) AS n FROM events WHERE type = ? GROUP BY level", (event_type,)).fetchall()
        return {r["level"]: r["n"] for r in rows}

    # ---- events ----
    def add_event(self, job_id: str, message: str, type: str = "message", level: str = "info", data: Any = None) -> dict:
        event = {"id": new_id("ftevent"), "job_id": job_id, "created_at": now(), "level": level, "type": type,
                 "message": message, "data": _dump(data)}
        with self.connect(immediate=True) as db:
            db.execute("INSERT INTO events (id, job_id, created_at, level, type, message, data)"
                       " VALUES (:id, :job_id, :created_at, :level, :type, :message, :data)", event)
        return {**event, "data": data}

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20, newest_first: bool = True) -> list[dict]:
        query, args = "SELECT * FROM events WHERE job_id=?", [job_id]
        if after:
            cmp = "<" if newest_first else ">"
            query += f" AND seq {cmp} (SELECT seq FROM events WHERE id=?)"
            args.append(after)
        query += " ORDER BY seq " + ("DESC" if newest_first else "ASC") + " LIMIT ?"
        with self.connect() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    # ---- checkpoints ----
    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict | None) -> None:
        with self.connect(immediate=True) as db:
            db.execute("INSERT OR REPLACE INTO checkpoints (id, job_id, step, path, created_at, metrics)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (new_id("ftckpt"), job_id, step, path, now(), _dump(metrics)))

    def list_checkpoints(self, job_id: str) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id=? ORDER BY step DESC", (job_id,)).fetchall()
        return [_row(r) for r in rows]

    # ---- fine-tuned models ----
    def add_model(self, model_id: str, tenant: str, parent: str, job_id: str, adapter_path: str, guard: dict) -> dict:
        with self.connect(immediate=True) as db:
            db.execute("INSERT INTO models (id, tenant, parent, job_id, adapter_path, created_at, guard)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", (model_id, tenant, parent, job_id, adapter_path, now(), _dump(guard)))
        return self.get_model(model_id)

    def get_model(self, model_id: str, tenant: str | None = None) -> dict | None:
        with self.connect() as db:
            found = _row(db.execute("SELECT * FROM models WHERE id=? AND deleted=0", (model_id,)).fetchone())
        return found if found and (tenant is None or found["tenant"] == tenant) else None

    def list_models(self, tenant: str | None) -> list[dict]:
        query, args = "SELECT * FROM models WHERE deleted=0", []
        if tenant is not None:
            query, args = query + " AND tenant=?", [tenant]
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY lora_int_id", args).fetchall()
        return [_row(r) for r in rows]

    def delete_model(self, model_id: str) -> None:
        with self.connect(immediate=True) as db:
            db.execute("UPDATE models SET deleted=1 WHERE id=?", (model_id,))
