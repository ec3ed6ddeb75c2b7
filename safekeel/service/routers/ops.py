"""/healthz and /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from safekeel.service.protocol import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, response_model_exclude_unset=True)
async def healthz(request: Request):
    engine = request.app.state.engine
    supervisor = request.app.state.supervisor
    health = {"status": "ok", "engine": engine.name if engine else None,
              "served_model": request.app.state.settings.base_models[0] if engine else None,
              "workers": supervisor.alive() if supervisor else 0,
              "jobs": request.app.state.store.count_jobs_by_status()}
    if hasattr(engine, "replicas"):
        health["replicas"] = engine.status()
    return health


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
