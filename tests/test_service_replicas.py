"""Serving replicas routed by adapter: two real `safekeel replica` processes (transformers engine, the tiny model) on
loopback behind a real `safekeel serve` with SAFEKEEL_REPLICAS, through the official openai client.

Shown: requests for an adapter keep going to the replica that holds it; a new adapter goes to the least loaded
replica, which loads it; a holder at its batch limit is passed over (bounded affinity); replies equal the engine's
own greedy generation with the same adapter; a replica that is down is skipped, and with none left the API answers
503 naming each replica; a replica that comes back is used again. The adapters are random LoRA weights (no
training needed to route them), registered in the API's model store as a finished job would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from live_server import KEY_A, LiveServer, client, free_port, install_model, stop_process_group
from safekeel.service.store import Store

MODEL = "tiny-llama"
ASK = [{"role": "user", "content": "How do I fix a flat tyre?"}]


class ReplicaProcess:
    """A real `safekeel replica` process on loopback."""

    def __init__(self, home: Path, name: str, port: int | None = None) -> None:
        self.home, self.name, self.port = home, name, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "ReplicaProcess":
        env = {**os.environ, "SAFEKEEL_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.home / f"{self.name}.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "safekeel.cli", "replica", "--port", str(self.port),
                                         "--model", MODEL, "--engine", "transformers"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited with {self.process.returncode}: {(self.home / f'{self.name}.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"replica {self.name} did not start in {timeout} s")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def adapters(self) -> set[str]:
        """What the replica itself says it holds."""
        return {m["id"] for m in self.get("/v1/models")["data"] if m["parent"]}

    def served(self) -> dict[str, float]:
        """The replica's own count of generations served, by target (base or adapter)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return {target: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith(f'safekeel_engine_requests_total{{target="{target}"}}'))
                for target in ("base", "adapter")}

    def stop(self) -> None:
        stop_process_group(self.process)


def make_adapter(model_dir: Path, folder: Path, seed: int) -> Path:
    """A random LoRA on the tiny model, strong enough to change its greedy replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("replicas-home")
    install_model(path, MODEL, tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def adapters(home, tiny_model_dir):
    """Adapter model ids -> folders (on the 'shared dir' both replicas and the API see at the same path)."""
    names = ("a", "b", "c", "d")
    return {f"ft:{MODEL}:alice:{n}:0000000{i}": make_adapter(tiny_model_dir, home / "shared" / n, seed=i + 1)
            for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def replicas(home):
    started = [ReplicaProcess(home, "r1").start(), ReplicaProcess(home, "r2").start()]
    yield started
    for replica in started:
        replica.stop()


@pytest.fixture(scope="module")
def api(home, replicas, adapters, tiny_model_dir):
    install_model(home / "api", MODEL, tiny_model_dir)
    env = {"SAFEKEEL_REPLICAS": ",".join(r.url for r in replicas), "SAFEKEEL_REPLICA_PROBE_SECONDS": "1",
           "SAFEKEEL_REPLICA_BATCH_LIMIT": "4"}
    with LiveServer(home / "api", MODEL, "transformers", workers=0, extra_env=env) as live:
        store = Store(live.home / "service" / "safekeel.db")
        for model_id, folder in adapters.items():
            store.add_model(model_id, "alice", MODEL, "ftjob-registered-by-test", str(folder), {})
        yield live


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The engine's own greedy reply (in this process, no server) for a chat and an adapter folder."""
    from safekeel.models.engines import GenerationParams, TransformersEngine

    engine = TransformersEngine(str(tiny_model_dir))
    asyncio.run(engine.start())
    ids: dict[str, int] = {}

    def reply(messages, adapter_id: str | None, folder: Path | None, max_tokens: int = 12) -> str:
        from safekeel.models.engines import Adapter

        adapter = Adapter(adapter_id, ids.setdefault(adapter_id, len(ids) + 1), str(folder)) if adapter_id else None

        async def run() -> str:
            text = ""
            async for chunk in engine.generate(engine.render_chat(messages), GenerationParams(max_tokens=max_tokens, temperature=0),
                                               "reference", adapter):
                text += chunk.text
            return text

        return asyncio.run(run())

    return reply


def routed(api: LiveServer) -> dict[tuple[str, str], float]:
    """The API's safekeel_replica_routed_total by (replica url, outcome)."""
    with urllib.request.urlopen(api.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("safekeel_replica_routed_total{"):
            labels, value = line[len("safekeel_replica_routed_total{"):].rsplit("} ", 1)
            parts = dict(item.split("=", 1) for item in labels.split(","))
            counts[(parts["replica"].strip('"'), parts["outcome"].strip('"'))] = float(value)
    return counts


def chat(c, model: str, stream: bool = False, max_tokens: int = 12) -> str:
    if stream:
        pieces = c.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0, stream=True)
        return "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    return c.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0).choices[0].message.content


def test_requests_stay_with_the_replica_holding_their_adapter_and_replies_are_the_engines(api, replicas, adapters, reference):
    r1, r2 = replicas
    (a, a_dir), (b, b_dir) = list(adapters.items())[:2]
    c = client(api, KEY_A)
    health = api.health()
    assert health["engine"] == "replicas" and [r["url"] for r in health["replicas"]] == [r1.url, r2.url]
    assert all(r["up"] for r in health["replicas"])

    first_a = chat(c, a)        # nobody holds a: the least loaded (a tie: the first) loads it
    first_b = chat(c, b)        # nobody holds b: r2 is as idle as r1 and holds fewer adapters
    assert r1.adapters() == {a} and r2.adapters() == {b}
    again = [chat(c, a), chat(c, a, stream=True), chat(c, b)]
    assert r1.adapters() == {a} and r2.adapters() == {b}  # hits: nothing was loaded twice
    assert routed(api) == {(r1.url, "miss"): 1, (r1.url, "hit"): 2, (r2.url, "miss"): 1, (r2.url, "hit"): 1}
    assert r1.served()["adapter"] == 3 and r2.served()["adapter"] == 2  # the replicas' own counts agree

    # the replies are the engine's greedy generation with that adapter (streamed or not), and the adapters differ
    expected_a, expected_b = reference(ASK, a, a_dir), reference(ASK, b, b_dir)
    assert first_a == again[0] == again[1] == expected_a and first_b == again[2] == expected_b
    base = chat(c, MODEL)
    assert base == reference(ASK, None, None) and len({expected_a, expected_b, base}) == 3
    assert sum(v for (url, outcome), v in routed(api).items() if outcome == "base") == 1

    with urllib.request.urlopen(api.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert f'safekeel_replica_adapters{{replica="{r1.url}"}} 1.0' in metrics
    assert f'safekeel_replica_up{{replica="{r2.url}"}} 1.0' in metrics


def test_a_holder_at_its_batch_limit_is_passed_over_and_a_new_adapter_goes_to_the_least_loaded(home, api, replicas, adapters, reference,
                                                                                              tiny_model_dir):
    """The routing policy of the API's ReplicaPool, in this process, against the same two real replicas: a
    generation held open (its stream not yet read to the end) keeps its replica loaded, deterministically."""
    from safekeel.models.engines import Adapter, GenerationParams
    from safekeel.service.metrics import ServiceMetrics
    from safekeel.service.replicas import ReplicaPool
    from safekeel.service.settings import ServiceSettings

    r1, r2 = replicas
    (c_id, c_dir), (d_id, d_dir) = list(adapters.items())[2:]
    settings = ServiceSettings(base_models=[MODEL], replicas=[r1.url, r2.url], replica_batch_limit=1,
                               service_dir=home / "pool-test")
    metrics = ServiceMetrics(Store(settings.db_path))
    pool = ReplicaPool(str(tiny_model_dir), settings, metrics)
    adapter_c, adapter_d = Adapter(c_id, 3, str(c_dir)), Adapter(d_id, 4, str(d_dir))
    prompt = pool.render_chat(ASK)
    params = GenerationParams(max_tokens=12, temperature=0)

    async def collect(adapter) -> str:
        return "".join([chunk.text async for chunk in pool.generate(prompt, params, "t", adapter)])

    async def scenario():
        await pool.start()
        try:
            assert {r.url: r.adapters for r in pool.replicas} == {r1.url: r1.adapters(), r2.url: r2.adapters()}
            held = pool.generate(prompt, params, "held", adapter_c)
            pieces = [await held.__anext__()]      # c is loaded on one replica, which now has 1 request in flight
            holder = next(r for r in pool.replicas if c_id in r.adapters)
            other = next(r for r in pool.replicas if r is not holder)
            assert holder.in_flight == 1 and other.in_flight == 0
            assert pool.choose(c_id) == (other, "miss")  # the holder is at its batch limit (1)
            copy = await collect(adapter_c)             # so c goes to the other replica, which loads a copy
            assert c_id in other.adapters
            new = await collect(adapter_d)              # a new adapter: the least loaded replica, the other one
            assert d_id in other.adapters and d_id not in holder.adapters
            pieces += [chunk async for chunk in held]  # the held generation finishes, intact
            assert holder.in_flight == 0
            assert pool.choose(c_id)[1] == "hit"        # both hold c now and neither is busy
            return holder.url, other.url, "".join(p.text for p in pieces), copy, new
        finally:
            await pool.shutdown()

    holder, other, held_text, copy, new = asyncio.run(scenario())
    replica = {r1.url: r1, r2.url: r2}
    assert c_id in replica[holder].adapters() and {c_id, d_id} <= replica[other].adapters()  # the replicas' own view
    assert held_text == copy == reference(ASK, c_id, c_dir) and new == reference(ASK, d_id, d_dir)
    counts = dict(_samples(metrics, "safekeel_replica_routed_total"))
    assert counts == {(holder, "miss"): 1, (other, "miss"): 2}


def _samples(metrics, name: str):
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield (sample.labels["replica"], sample.labels["outcome"]), sample.value


def test_a_replica_that_is_down_is_skipped_and_none_left_is_a_clear_503(home, api, replicas, adapters, reference):
    r1, r2 = replicas
    a, a_dir = next(iter(adapters.items()))
    c = client(api, KEY_A)
    assert a in r1.adapters()
    r1.stop()                                   # a's holder goes away
    assert chat(c, a) == reference(ASK, a, a_dir)  # skipped: r2 loads a and answers
    assert a in r2.adapters()
    health = {r["url"]: r for r in api.health()["replicas"]}
    assert health[r1.url]["up"] is False and health[r1.url]["error"] and health[r2.url]["up"] is True

    r2.stop()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(c, a)
    error = caught.value
    assert error.status_code == 503 and error.body["code"] == "replicas_unavailable"
    assert "No serving replica is reachable" in error.message and r1.url in error.message and r2.url in error.message

    r1.start()                                  # back on its port, with no adapters: the probe finds it
    deadline = time.time() + 60
    while not {r["url"]: r for r in api.health()["replicas"]}[r1.url]["up"]:
        assert time.time() < deadline, api.health()
        time.sleep(0.5)
    assert chat(c, a) == reference(ASK, a, a_dir) and r1.adapters() == {a}  # loaded again on demand


def test_replica_settings_reject_what_is_not_a_url():
    from safekeel.service.settings import ServiceSettings

    with pytest.raises(ValueError, match="SAFEKEEL_REPLICAS entry 'r1:8001' is not an http"):
        ServiceSettings(replicas="http://r0:8001,r1:8001")
    with pytest.raises(ValueError, match="lists a replica twice"):
        ServiceSettings(replicas="http://r0:8001,http://r0:8001/")
    assert ServiceSettings(replicas=" http://r0:8001/ , http://r1:8001").replicas == ["http://r0:8001", "http://r1:8001"]
