"""The FastAPI application: OpenAI-shaped routes, auth, errors, metrics; engines and workers wired in.

`create_app(settings)` builds the app; the lifespan starts the serving engine for the first base
model and (optionally) the job executor: supervised worker processes that run fine-tuning jobs from the
database, or with `SAFEKEEL_EXECUTOR=ray` the Ray executor (each job a Ray actor; `start_workers` jobs at once).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from safekeel.models.engines import create_engine
from safekeel.models.registry import resolve_model
from safekeel.monitors.runtime import MonitorRuntime
from safekeel.service.metrics import ServiceMetrics
from safekeel.service.protocol import APIError
from safekeel.service.replicas import ReplicaPool
from safekeel.service.routers import completions, files, fine_tuning, models, ops
from safekeel.service.settings import ServiceSettings
from safekeel.service.store import Store
from safekeel.service.worker import WorkerSupervisor

log = logging.getLogger(__name__)


class MetricsMiddleware:
    """Counts requests and observes latency to the last byte (streaming included), by route template."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def wrapped_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = scope.get("route")
                endpoint = getattr(route, "path", "unmatched")
                self.metrics.requests.labels(endpoint, scope["method"], str(status["code"])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        await self.app(scope, receive, wrapped_send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        first_param = first_param or param
        problems.append(f"{param or 'body'}: {item.get('msg')}")
    return "Invalid request: " + "; ".join(problems[:5]), first_param


def create_app(settings: ServiceSettings | None = None, start_engine: bool = True, start_workers: int = 0) -> FastAPI:
    settings = settings or ServiceSettings()
    store = Store(settings.db_path)
    metrics = ServiceMetrics(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        if start_engine:
            model_path = str(resolve_model(settings.base_models[0]))
            if settings.replicas:  # generations go to the serving replicas, routed by adapter
                engine = ReplicaPool(model_path, settings, metrics)
            else:
                engine = create_engine(settings.engine, model_path, settings)
            log.info("starting %s engine for %s", engine.name, settings.base_models[0])
            await engine.start()
            app.state.engine = engine
        app.state.monitors = None
        monitor_dir = settings.resolved_monitor_dir()
        if start_engine and monitor_dir is not None and settings.monitor_policy != "off":
            app.state.monitors = await run_in_threadpool(MonitorRuntime, monitor_dir, resolve_model(settings.base_models[0]),
                                                         tuple(settings.monitor_deciders), settings.monitor_concept_policies)
            log.info("monitors loaded from %s: %s", monitor_dir, sorted(app.state.monitors.monitors))
        supervisor = None
        if start_workers and settings.executor == "ray":
            from safekeel.service.ray_executor import RayExecutor  # deferred on purpose: ray is an optional extra

            supervisor = RayExecutor(settings, slots=start_workers)
        elif start_workers:
            supervisor = WorkerSupervisor(settings, start_workers)
        if supervisor:
            supervisor.start()
        app.state.supervisor = supervisor
        try:
            yield
        finally:
            if supervisor:
                supervisor.stop()
            if app.state.engine is not None:
                await app.state.engine.shutdown()

    app = FastAPI(title="safekeel", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning and serving that keeps fine-tuned models safe.")
    app.state.settings, app.state.store, app.state.metrics = settings, store, metrics
    app.state.tenants = settings.tenants_by_key()
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        """Starlette's own errors (no such route, method not allowed) in OpenAI's error shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(APIError(error.status_code, str(error.detail), code).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return JSONResponse(APIError(400, message, "invalid_request", param).body(), status_code=400)


    for router in (files.router, fine_tuning.router, models.router, completions.router, ops.router):
        app.include_router(router)

    def openapi() -> dict:
        """FastAPI's schema without its 422 responses: invalid requests get a 400 ErrorResponse here."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
    return app
