"""A serving replica (`safekeel replica`): one engine for one base model behind the part of vLLM's OpenAI server that
the API's router uses, so a replica is either this process or a stock vLLM server (`vllm serve MODEL --enable-lora
--served-model-name NAME` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true):

- `POST /v1/load_lora_adapter` {lora_name, lora_path}: register an adapter (a folder on storage this replica
  mounts); 400 if it is already loaded, as vLLM answers.
- `POST /v1/completions` {model, prompt, max_tokens, temperature, top_p, stop, seed, stream}: `model` is the base
  model's name or a loaded adapter's; an unknown one is a 404, which tells the router to load it again (a replica
  that restarted has lost its adapters).
- `GET /v1/models` (the base model and the loaded adapters, `parent` set on adapters), `GET /health`, `GET /metrics`.

The API server (safekeel.service.replicas) renders chats, applies guards and monitors and decides who serves;
a replica only generates. It holds no tenant data: keep it on the cluster's internal network, and set
SAFEKEEL_REPLICA_API_KEY on both sides to require a bearer key on /v1.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from safekeel.models.engines import Adapter, GenerationChunk, GenerationParams, create_engine
from safekeel.service.protocol import APIError


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class ReplicaCompletion(BaseModel):
    """vLLM's completion request, the fields a replica uses (others, e.g. add_special_tokens, are accepted and ignored:
    the transformers engine never adds special tokens to a rendered prompt)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = None
    seed: int | None = None
    stream: bool = False


class ReplicaState:
    def __init__(self, model: str) -> None:
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.registry = CollectorRegistry()
        self.running = Gauge("safekeel_engine_requests_running", "Generations running (or waiting for the engine) on "
                             "this replica", registry=self.registry)
        self.loaded = Gauge("safekeel_engine_adapters_loaded", "LoRA adapters loaded on this replica", registry=self.registry)
        self.served = Counter("safekeel_engine_requests_total", "Generations served by this replica, base or adapter",
                              ["target"], registry=self.registry)


def _error(status: int, message: str, code: str, param: str | None = None) -> APIError:
    return APIError(status, message, code, param, type="invalid_request_error" if status < 500 else "server_error")


def create_replica_app(model: str, model_path: str, engine_kind: str, settings, api_key: str | None = None) -> FastAPI:
    """The replica's app: `model` is the name it serves the base model under (the API's base_models[0])."""
    state = ReplicaState(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = create_engine(engine_kind, model_path, settings)
        await app.state.engine.start()
        try:
            yield
        finally:
            await app.state.engine.shutdown()

    app = FastAPI(title="safekeel replica", lifespan=lifespan,
                  description="One serving engine behind the subset of vLLM's OpenAI server that safekeel's router uses.")
    app.state.replica = state

    def authorized(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise _error(401, "This replica needs its key (SAFEKEEL_REPLICA_API_KEY) as a bearer token", "invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        base = [{"id": model, "object": "model", "owned_by": "safekeel", "root": model_path, "parent": None}]
        return {"object": "list", "data": base + [
            {"id": name, "object": "model", "owned_by": "safekeel", "root": adapter.path, "parent": model}
            for name, adapter in state.adapters.items()]}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)], response_class=PlainTextResponse)
    async def load_adapter(body: LoadAdapter):
        if body.lora_name in state.adapters or body.lora_name == model:
            raise _error(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "already_loaded", "lora_name")
        if not (Path(body.lora_path) / "adapter_config.json").is_file():
            raise _error(404, f"No LoRA adapter at {body.lora_path} on this replica (adapter_config.json is missing): is the "
                              "shared dir mounted here at the same path as on the API server?", "adapter_not_found", "lora_path")
        # engines load an adapter on its first use; ids are this replica's own (vLLM numbers them the same way)
        state.adapters[body.lora_name] = Adapter(body.lora_name, len(state.adapters) + 1, body.lora_path)
        state.loaded.set(len(state.adapters))
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request, body: ReplicaCompletion):
        if body.model != model and body.model not in state.adapters:
            raise _error(404, f"The model `{body.model}` does not exist.", "model_not_found", "model")
        adapter = state.adapters.get(body.model)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = GenerationParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=stops, seed=body.seed)
        request_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}

        async def chunks() -> AsyncIterator[GenerationChunk]:
            state.running.inc()
            state.served.labels("adapter" if adapter else "base").inc()
            try:
                async for chunk in request.app.state.engine.generate(body.prompt, params, request_id, adapter):
                    yield chunk
            finally:
                state.running.dec()

        def usage(last: GenerationChunk) -> dict:
            return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                    "total_tokens": last.prompt_tokens + last.completion_tokens}

        if not body.stream:
            text, last = "", GenerationChunk("")
            async for chunk in chunks():
                text, last = text + chunk.text, chunk
            return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                    "usage": usage(last)}

        async def events() -> AsyncIterator[str]:
            last = GenerationChunk("")
            async for chunk in chunks():
                last = chunk
                if chunk.text or chunk.finish_reason:
                    choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
                    yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(last)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
