"""Serving replicas behind the API, routed by adapter (SAFEKEEL_REPLICAS=url1,url2,...).

The API server keeps what needs its database and tokenizer (auth, model resolution, guards, monitors, the context
check, chat rendering) and sends the rendered prompt to one of several engine replicas: `safekeel replica`
processes (safekeel.service.replica) or stock vLLM OpenAI servers with runtime LoRA loading, which speak the same
`/v1/load_lora_adapter` and `/v1/completions`. `ReplicaPool` stands where the in-process engine would
(app.state.engine), so the completion routes do not change.

Routing (benchmarks/results/capacity.md, "affinity bounded by the batch limit"; Ray Serve's multi-LoRA router
does the same): a request for an adapter goes to the least loaded replica that already holds it, unless every
holder has `replica_batch_limit` requests in flight; then to the least loaded replica (ties: the one holding
fewer adapters, then the order of SAFEKEEL_REPLICAS), which loads the adapter from the shared dir first. Load is
the requests this API process has in flight on a replica. A base-model request goes to the least loaded replica.

Failures: a replica that refuses the connection is marked down and the request goes to the next choice; when none
is left the answer is a 503 that names each replica and its error. A probe (GET /health, then /v1/models) every
`replica_probe_seconds` brings replicas back and re-reads which adapters each holds, so a replica that restarted
(and lost its adapters) loads them again on demand; a 404 for an adapter the pool thought loaded does the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

import httpx

from safekeel.models.engines import Adapter, Engine, GenerationChunk, GenerationParams
from safekeel.service.protocol import APIError

log = logging.getLogger(__name__)


class ReplicaUnreachable(Exception):
    """The replica could not be reached (or dropped the connection before answering)."""


class AdapterMissing(Exception):
    """The replica answered 404 for an adapter the pool thought it held."""


@dataclass
class Replica:
    url: str
    adapters: set[str] = field(default_factory=set)
    in_flight: int = 0
    up: bool = True
    error: str | None = None

    def status(self) -> dict:
        return {"url": self.url, "up": self.up, "in_flight": self.in_flight, "adapters": len(self.adapters),
                "error": self.error}


class ReplicaPool(Engine):
    """The engine interface over remote replicas: generations are routed by adapter (module docstring)."""

    name = "replicas"

    def __init__(self, model_path: str, settings, metrics=None) -> None:
        super().__init__(model_path, settings)  # the tokenizer: chats are rendered and checked here
        if not settings.replicas:
            raise ValueError("ReplicaPool needs at least one replica URL (SAFEKEEL_REPLICAS)")
        self.served = settings.base_models[0]
        self.replicas = [Replica(url) for url in settings.replicas]
        self.batch_limit = settings.replica_batch_limit
        self.metrics = metrics
        self.client: httpx.AsyncClient | None = None
        self._probe: asyncio.Task | None = None
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        if metrics is not None:
            metrics.watch_replicas(self)

    # ---- lifecycle ----
    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.settings.replica_api_key}"} if self.settings.replica_api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.settings.replica_timeout_seconds, connect=5.0))
        await self.probe()
        up = [r.url for r in self.replicas if r.up]
        log.info("serving through %d replica(s), %d up: %s", len(self.replicas), len(up), ", ".join(up) or "none")
        self._probe = asyncio.create_task(self._probe_loop())

    async def shutdown(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def probe(self) -> None:
        """Check every replica (health, then the adapters it holds)."""
        await asyncio.gather(*(self._probe_one(r) for r in self.replicas))

    async def _probe_one(self, replica: Replica) -> None:
        try:
            response = await self.client.get(replica.url + "/v1/models", timeout=5.0)
            response.raise_for_status()
            models = response.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as error:
            self._mark_down(replica, f"probe failed: {_describe(error)}")
            return
        if not replica.up:
            log.info("replica %s is up again", replica.url)
        replica.up, replica.error = True, None
        replica.adapters = {m["id"] for m in models if m.get("parent")}

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.replica_probe_seconds)
            try:
                await self.probe()
            except Exception:  # a probe must never end the loop
                log.exception("replica probe failed")

    def _mark_down(self, replica: Replica, error: str) -> None:
        if replica.up:
            log.warning("replica %s is down: %s", replica.url, error)
        replica.up, replica.error = False, error
        if self.metrics is not None:
            self.metrics.replica_errors.labels(replica.url).inc()

    def status(self) -> list[dict]:
        return [r.status() for r in self.replicas]

    # ---- routing ----
    def choose(self, adapter: str | None, exclude: set[str] = frozenset()) -> tuple[Replica, str]:
        """(replica, outcome): hit (holds the adapter, below the batch limit), miss (will load it) or base."""
        candidates = [r for r in self.replicas if r.up and r.url not in exclude]
        if not candidates:
            raise self._unavailable(exclude)
        if adapter is None:
            return min(candidates, key=lambda r: r.in_flight), "base"
        holders = [r for r in candidates if adapter in r.adapters and r.in_flight < self.batch_limit]
        if holders:
            return min(holders, key=lambda r: r.in_flight), "hit"
        return min(candidates, key=lambda r: (r.in_flight, len(r.adapters))), "miss"

    def _unavailable(self, tried: set[str]) -> APIError:
        states = "; ".join(f"{r.url}: {r.error or 'failed'}" for r in self.replicas if not r.up or r.url in tried)
        return APIError(503, f"No serving replica is reachable ({len(self.replicas)} configured; {states})",
                        "replicas_unavailable", type="server_error")

    # ---- generation ----
    async def generate(self, prompt: str, params: GenerationParams, request_id: str,
                       adapter: Adapter | None = None) -> AsyncIterator[GenerationChunk]:
        tried: set[str] = set()
        while True:
            replica, outcome = self.choose(adapter.name if adapter else None, tried)
            if self.metrics is not None:
                self.metrics.replica_routed.labels(replica.url, outcome).inc()
            replica.in_flight += 1
            started = False
            try:
                for attempt in range(2):
                    try:
                        if adapter is not None and adapter.name not in replica.adapters:
                            await self._load(replica, adapter)
                        async with aclosing(self._stream(replica, prompt, params, adapter)) as chunks:
                            async for chunk in chunks:
                                started = True
                                yield chunk
                        return
                    except AdapterMissing:
                        replica.adapters.discard(adapter.name)  # the replica restarted since: load it again, once
                        if attempt:
                            raise APIError(502, f"Serving replica {replica.url} does not find adapter {adapter.name!r} "
                                                "right after loading it", "replica_error", type="server_error")
            except ReplicaUnreachable as error:
                if started:
                    raise APIError(502, f"Serving replica {replica.url} failed mid-generation: {error}", "replica_error",
                                   type="server_error") from error
                self._mark_down(replica, str(error))
                tried.add(replica.url)
            finally:
                replica.in_flight -= 1

    async def _load(self, replica: Replica, adapter: Adapter) -> None:
        """Load `adapter` on `replica` (concurrent requests for the same pair share one load)."""
        key = (replica.url, adapter.name)
        if key not in self._loading:
            self._loading[key] = asyncio.ensure_future(self._post_load(replica, adapter))
        try:
            await asyncio.shield(self._loading[key])
        finally:
            if self._loading.get(key) is not None and self._loading[key].done():
                self._loading.pop(key, None)

    async def _post_load(self, replica: Replica, adapter: Adapter) -> None:
        try:
            response = await self.client.post(replica.url + "/v1/load_lora_adapter",
                                              json={"lora_name": adapter.name, "lora_path": adapter.path})
        except httpx.TransportError as error:
            raise ReplicaUnreachable(_describe(error)) from error
        if response.status_code >= 400 and "already been loaded" not in response.text:
            raise APIError(502, f"Serving replica {replica.url} could not load adapter {adapter.name!r}: "
                                f"{_message(response)}", "replica_error", type="server_error")
        replica.adapters.add(adapter.name)

    async def _stream(self, replica: Replica, prompt: str, params: GenerationParams,
                      adapter: Adapter | None) -> AsyncIterator[GenerationChunk]:
        body = {"model": adapter.name if adapter else self.served, "prompt": prompt, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "stop": params.stop or None, "seed": params.seed,
                "stream": True, "stream_options": {"include_usage": True},
                "add_special_tokens": False}  # the prompt is rendered with the chat template already (vLLM's default adds BOS)
        finish, prompt_tokens, completion_tokens = None, 0, 0
        try:
            async with self.client.stream("POST", replica.url + "/v1/completions", json=body) as response:
                if response.status_code == 404 and adapter is not None:
                    raise AdapterMissing(adapter.name)
                if response.status_code >= 400:
                    await response.aread()
                    raise APIError(502, f"Serving replica {replica.url} answered {response.status_code}: {_message(response)}",
                                   "replica_error", type="server_error")
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    event = json.loads(line[5:])
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            yield GenerationChunk(choice["text"])
                        finish = choice.get("finish_reason") or finish
                    if event.get("usage"):
                        prompt_tokens = event["usage"].get("prompt_tokens", 0)
                        completion_tokens = event["usage"].get("completion_tokens", 0)
        except httpx.TransportError as error:
            raise ReplicaUnreachable(_describe(error)) from error
        yield GenerationChunk("", finish or "stop", prompt_tokens, completion_tokens)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return (body.get("error") or {}).get("message") or body.get("message") or response.text[:300]
    except ValueError:
        return response.text[:300]
