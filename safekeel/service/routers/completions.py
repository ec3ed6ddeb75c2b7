"""/v1/chat/completions and /v1/completions, streaming (SSE) and not, through the serving engine.

A fine-tuned model is its base model plus its LoRA adapter; its guard (safety system prompt,
in-context demonstrations) is applied to chat requests before they reach the engine.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from openai.types import Completion

from safekeel.models.engines import Adapter, GenerationChunk, GenerationParams
from safekeel.service.auth import current_tenant
from safekeel.guard import GuardAction, apply_guard
from safekeel.service.protocol import (ERRORS, APIError, ChatCompletionRequest, CompletionRequest, GuardedChatCompletion, SamplingFields,
                                       error_responses, not_found)
from safekeel.service.settings import Tenant

router = APIRouter(prefix="/v1", tags=["completions"], responses=ERRORS | error_responses(503))
# with `"stream": true` the answer is server-sent events, each a chunk object (data: {...}), then data: [DONE]
STREAMED = {200: {"description": "The completion (JSON), or with `stream: true` its chunks as server-sent events",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def resolve(request: Request, model_id: str, tenant: Tenant) -> tuple[Adapter | None, dict | None]:
    """(adapter, guard) for a model id the caller may use; 404 for anything else."""
    settings, engine = request.app.state.settings, request.app.state.engine
    if engine is None:
        raise APIError(503, "No serving engine is running on this server", "engine_unavailable", type="server_error")
    served = settings.base_models[0]
    if model_id == served:
        return None, None
    record = request.app.state.store.get_model(model_id, None if tenant.admin else tenant.name)
    if record is None:
        raise not_found("model", model_id, "model")
    if record["parent"] != served:
        raise APIError(400, f"Model {model_id!r} is a fine-tune of {record['parent']!r}, which this server does not serve "
                            f"(it serves {served!r})", "model_not_served", "model")
    return Adapter(record["id"], int(record["lora_int_id"]), record["adapter_path"]), record["guard"]


def sampling(body: SamplingFields, settings) -> GenerationParams:
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    return GenerationParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            stop=body.stop_list(), seed=body.seed)


def check_context(request: Request, prompt: str, params: GenerationParams) -> int:
    """Reject (400, as OpenAI does) a request whose prompt plus max_tokens exceeds the context length;
    return the prompt's token count."""
    limit = request.app.state.settings.max_model_len
    n_prompt = len(request.app.state.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_prompt + params.max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; the request has {n_prompt} prompt tokens "
                            f"(guard included) + max_tokens {params.max_tokens}", "context_length_exceeded", "max_tokens")
    return n_prompt


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


async def _run(request: Request, prompt: str, params: GenerationParams, adapter: Adapter | None,
               model_id: str, request_id: str) -> AsyncIterator[GenerationChunk]:
    """The engine's chunks, with first-token and token metrics observed."""
    metrics, settings = request.app.state.metrics, request.app.state.settings
    label = metrics.model_label(model_id, settings.base_models)
    started, first = time.perf_counter(), True
    last = GenerationChunk("")
    async for chunk in request.app.state.engine.generate(prompt, params, request_id, adapter):
        if first and chunk.text:
            metrics.ttft.labels(label).observe(time.perf_counter() - started)
            first = False
        last = chunk
        yield chunk
    metrics.tokens.labels(label).inc(last.completion_tokens)
    metrics.prompt_tokens.labels(label).inc(last.prompt_tokens)


async def _trimmed(request: Request, prompt: str, params: GenerationParams, adapter: Adapter | None,
                   model_id: str, request_id: str) -> AsyncIterator[GenerationChunk]:
    """The generation with stop sequences cut (the stop string and what follows are dropped, as OpenAI
    does); text arrives in pieces, and a final empty chunk carries finish_reason and the token counts."""
    text, last, stopped = "", GenerationChunk(""), False
    async for chunk in _run(request, prompt, params, adapter, model_id, request_id):
        last = chunk
        if stopped:
            continue  # keep draining so the counts are the engine's
        new_text, stopped = _cut_at_stop(text + chunk.text, params.stop)
        delta, text = new_text[len(text):], new_text
        if delta:
            yield GenerationChunk(delta)
    yield GenerationChunk("", "stop" if stopped else (last.finish_reason or "stop"), last.prompt_tokens, last.completion_tokens)


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    text, last = "", GenerationChunk("")
    async for chunk in chunks:
        text += chunk.text
        last = chunk
    return text, last


async def _blocked(message: str, prompt_tokens: int) -> AsyncIterator[GenerationChunk]:
    """What a request blocked by a monitor gets instead of a generation (the engine is not called)."""
    yield GenerationChunk(message)
    yield GenerationChunk("", "content_filter", prompt_tokens, 0)


async def _monitor(request: Request, model_id: str, guard: dict | None, messages: list[dict]) -> dict | None:
    """Score the request's last user message with the loaded monitors and apply the model's policy.
    Returns the `safekeel.monitor` record (None when no monitor runs for this model)."""
    runtime, settings, metrics = request.app.state.monitors, request.app.state.settings, request.app.state.metrics
    if runtime is None:
        return None
    policy = (guard or {}).get("monitor_policy", "default")
    policy = settings.monitor_policy if policy == "default" else policy
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    if policy == "off" or not user_turns:
        return None
    result = await run_in_threadpool(runtime.score, user_turns[-1])
    label = metrics.model_label(model_id, settings.base_models)
    for name, score in result.scores.items():
        metrics.monitor_scores.labels(name, label).observe(score)
    decision = runtime.decide(policy, result)
    metrics.monitor_decisions.labels(label, decision).inc()
    for concept, record in result.concepts.items():
        metrics.monitor_concept_decisions.labels(concept, label, record["decision"]).inc()
    metrics.monitor_latency.observe(result.seconds)
    return {"policy": policy, **result.to_dict(decision)}


def _count_guard(request: Request, action: GuardAction) -> None:
    counter = request.app.state.metrics.guard_actions
    if action.system_prompt:
        counter.labels("system_prompt").inc()
    if action.demonstrations:
        counter.labels(f"{action.mode}_demonstrations").inc()


def _usage(chunk: GenerationChunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@router.post("/chat/completions", response_model=GuardedChatCompletion, response_model_exclude_unset=True, responses=STREAMED)
async def chat_completions(request: Request, response: Response, body: ChatCompletionRequest,
                           tenant: Tenant = Depends(current_tenant)):
    adapter, guard = resolve(request, body.model, tenant)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    # retrieval embeds the request (and builds the index on first use): off the event loop
    guarded, action = await run_in_threadpool(apply_guard, messages, guard)
    _count_guard(request, action)
    engine = request.app.state.engine
    try:
        prompt = engine.render_chat(guarded)
    except Exception as error:  # a template that rejects this message order, for example
        raise APIError(400, f"The messages cannot be rendered with the model's chat template: {error}", "invalid_messages", "messages")
    params = sampling(body, request.app.state.settings)
    n_prompt = check_context(request, prompt, params)
    monitor = await _monitor(request, body.model, guard, messages)
    request_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    meta = {"guard": {"system_prompt": action.system_prompt, "demonstrations": action.demonstrations, "mode": action.mode}}
    headers = {}
    if monitor is not None:
        meta["monitor"] = monitor
        headers["X-Safekeel-Monitor"] = monitor["decision"]

    def generation() -> AsyncIterator[GenerationChunk]:
        if monitor is not None and monitor["decision"] == "blocked":
            return _blocked(request.app.state.settings.monitor_block_message, n_prompt)
        return _trimmed(request, prompt, params, adapter, body.model, request_id)

    if not body.stream:
        text, last = await _collect(generation())
        response.headers.update(headers)
        return {"id": request_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "finish_reason": last.finish_reason, "logprobs": None}],
                "usage": _usage(last), "system_fingerprint": None, "safekeel": meta}

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model, "system_fingerprint": None}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}],
                    "safekeel": meta})
        async for chunk in generation():
            if chunk.finish_reason is None:
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": chunk.text}, "finish_reason": None, "logprobs": None}]})
            last = chunk
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": last.finish_reason, "logprobs": None}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(last)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post("/completions", response_model=Completion, response_model_exclude_unset=True, responses=STREAMED)
async def completions(request: Request, body: CompletionRequest, tenant: Tenant = Depends(current_tenant)):
    adapter, guard = resolve(request, body.model, tenant)
    if guard and (guard.get("system_prompt") or guard.get("demonstrations") != "none"):
        raise APIError(400, f"Model {body.model!r} has a test-time guard, which applies to chat messages: use /v1/chat/completions",
                       "guarded_model", "model")
    if request.app.state.monitors is not None:
        policy = (guard or {}).get("monitor_policy", "default")
        effective = request.app.state.settings.monitor_policy if policy == "default" else policy
        if effective == "block" or (effective != "off" and "block" in request.app.state.monitors.concept_policies.values()):
            raise APIError(400, f"Model {body.model!r} is served with monitor policy 'block', which scores chat messages: "
                                "use /v1/chat/completions", "monitored_model", "model")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, "Only one prompt per request is supported", "invalid_prompt", "prompt")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    params = sampling(body, request.app.state.settings)
    check_context(request, prompt, params)
    request_id = f"cmpl-{secrets.token_hex(12)}"
    created = int(time.time())

    if not body.stream:
        text, last = await _collect(_trimmed(request, prompt, params, adapter, body.model, request_id))
        return {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": (prompt if body.echo else "") + text, "logprobs": None,
                             "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    async def events() -> AsyncIterator[str]:
        base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
        async for chunk in _trimmed(request, prompt, params, adapter, body.model, request_id):
            yield _sse({**base, "choices": [{"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}]})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
