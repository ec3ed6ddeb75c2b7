"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request

from safekeel.service.auth import current_tenant
from safekeel.service.jobs import build_job
from safekeel.service.protocol import (ERRORS, APIError, CreateJobRequest, Job, JobCheckpointList, JobEventList, JobList,
                                       event_object, job_object, not_found)
from safekeel.service.settings import Tenant

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine_tuning"], responses=ERRORS)


def _owned(request: Request, job_id: str, tenant: Tenant) -> dict:
    job = request.app.state.store.get_job(job_id, None if tenant.admin else tenant.name)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


@router.post("", response_model=Job, response_model_exclude_unset=True)
async def create_job(request: Request, body: CreateJobRequest, tenant: Tenant = Depends(current_tenant)):
    job = build_job(body, tenant, request.app.state.store, request.app.state.settings)
    return job_object(job)


@router.get("", response_model=JobList, response_model_exclude_unset=True)
async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    tenant: Tenant = Depends(current_tenant)):
    jobs = request.app.state.store.list_jobs(None if tenant.admin else tenant.name, after, limit + 1)
    return {"object": "list", "data": [job_object(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@router.get("/{job_id}", response_model=Job, response_model_exclude_unset=True)
async def retrieve_job(request: Request, job_id: str, tenant: Tenant = Depends(current_tenant)):
    return job_object(_owned(request, job_id, tenant))


@router.post("/{job_id}/cancel", response_model=Job, response_model_exclude_unset=True)
async def cancel_job(request: Request, job_id: str, tenant: Tenant = Depends(current_tenant)):
    job = _owned(request, job_id, tenant)
    store = request.app.state.store
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise APIError(400, f"Job {job_id} has already finished ({job['status']}) and cannot be cancelled", "job_not_cancellable", "fine_tuning_job_id")
    new_status = store.request_cancel(job_id)
    store.add_event(job_id, "Cancellation requested" + ("" if new_status == "cancelled" else "; the worker stops at the next training step"))
    return job_object(store.get_job(job_id))


@router.get("/{job_id}/events", response_model=JobEventList, response_model_exclude_unset=True)
async def list_events(request: Request, job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                      tenant: Tenant = Depends(current_tenant)):
    _owned(request, job_id, tenant)
    events = request.app.state.store.list_events(job_id, after, limit + 1)
    return {"object": "list", "data": [event_object(e) for e in events[:limit]], "has_more": len(events) > limit}


@router.get("/{job_id}/checkpoints", response_model=JobCheckpointList, response_model_exclude_unset=True)
async def list_checkpoints(request: Request, job_id: str, tenant: Tenant = Depends(current_tenant)):
    job = _owned(request, job_id, tenant)
    checkpoints = [c for c in request.app.state.store.list_checkpoints(job_id) if Path(c["path"]).is_dir()]
    data = [{"id": c["id"], "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
             "fine_tuned_model_checkpoint": f"{job['spec']['fine_tuned_model']}:ckpt-step-{c['step']}",
             "fine_tuning_job_id": job_id, "metrics": c["metrics"] or {}, "step_number": c["step"]} for c in checkpoints]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
