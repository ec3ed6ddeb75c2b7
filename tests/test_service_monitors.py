"""Runtime monitors in the service: per-request scores, the log/flag/block policies (server default and
per fine-tune), Prometheus metrics, the drift-check job event, and refusal of monitors trained on
another model. A real `safekeel serve` process with the tiny model and probes trained on it."""

from __future__ import annotations

import json
import urllib.request

import httpx
import pytest

from live_server import KEY_A, LiveServer, all_events, client, install_model, wait_for_job
from test_service import GATE_PROMPTS, write_jsonl

BLOCK_MESSAGE = "Blocked by the harm monitor."


def train_tiny_monitors(model_dir, output):
    from safekeel.data.safety import load_authored_benign, load_authored_pool
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.monitors.suite import ProbeSuiteConfig, PromptSplits, train_probe_suite

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    harmful = [e.request for e in load_authored_pool()]
    benign = [c.last_user for c in load_authored_benign()]
    sets = {"harmful_train": harmful[:150], "harmful_val": harmful[150:200], "harmful_test": harmful[200:260],
            "benign_train": benign[:150], "benign_val": benign[150:200], "benign_calibration": benign[200:300],
            "benign_test": benign[300:360]}
    config = ProbeSuiteConfig(model=str(model_dir), layers=[1], poolings=["last", "mean"], batch_size=32)
    train_probe_suite(config, output, splits=PromptSplits(sets, {"held_out": ("harmful_test", "benign_test")}),
                      model=model.eval(), tokenizer=tokenizer, show_progress=False)
    return harmful, benign


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, tiny_model_dir):
    """A server whose default policy is block, and one flagged and one passing request (scored offline)."""
    from safekeel.monitors.runtime import MonitorRuntime

    home = tmp_path_factory.mktemp("monitor-home")
    install_model(home, "tiny-llama", tiny_model_dir)
    harmful, benign = train_tiny_monitors(home / "models" / "tiny-llama", home / "monitors" / "tiny-llama")
    runtime = MonitorRuntime(home / "monitors" / "tiny-llama", home / "models" / "tiny-llama")
    flagged = next(text for text in harmful if runtime.score(text).flagged)
    passing = next(text for text in benign[300:] if not runtime.score(text).flagged)
    with LiveServer(home, "tiny-llama", "transformers", workers=1,
                    extra_env={"SAFEKEEL_MONITOR_POLICY": "block", "SAFEKEEL_MONITOR_BLOCK_MESSAGE": BLOCK_MESSAGE}) as live:
        yield live, flagged, passing, runtime


def chat(server, text, model="tiny-llama", stream=False):
    return httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 6, "stream": stream})


def metric(server, name: str, **labels) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_block_policy_refuses_flagged_requests_without_generating(monitored):
    server, flagged, passing, runtime = monitored
    blocked_before = metric(server, "safekeel_monitor_decisions_total", decision="blocked")
    response = chat(server, flagged)
    assert response.status_code == 200 and response.headers["x-safekeel-monitor"] == "blocked"
    body = response.json()
    assert body["choices"][0]["message"]["content"] == BLOCK_MESSAGE
    assert body["choices"][0]["finish_reason"] == "content_filter" and body["usage"]["completion_tokens"] == 0
    monitor = body["safekeel"]["monitor"]
    assert monitor["decision"] == "blocked" and monitor["flagged_by"] == ["harm_probe"]
    assert monitor["scores"]["harm_probe"] > monitor["thresholds"]["harm_probe"]
    assert abs(monitor["scores"]["harm_probe"] - runtime.score(flagged).scores["harm_probe"]) < 1e-3
    assert set(monitor["scores"]) == {"harm_probe", "refusal_direction", "token_probe"}

    allowed = chat(server, passing).json()
    assert allowed["safekeel"]["monitor"]["decision"] == "pass"
    assert allowed["choices"][0]["message"]["content"] != BLOCK_MESSAGE and allowed["usage"]["completion_tokens"] > 0

    streamed = chat(server, flagged, stream=True)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == BLOCK_MESSAGE
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert streamed.headers["x-safekeel-monitor"] == "blocked"

    assert metric(server, "safekeel_monitor_decisions_total", decision="blocked") == blocked_before + 2
    assert metric(server, "safekeel_monitor_score_count", monitor="harm_probe") >= 3
    assert metric(server, "safekeel_monitor_duration_seconds_count") >= 3


def test_completions_endpoint_cannot_bypass_the_block_policy(monitored):
    server = monitored[0]
    response = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                          json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "monitored_model"


def test_fine_tune_gets_its_own_policy_and_a_drift_event(monitored, tmp_path):
    server, flagged, passing, _ = monitored
    c = client(server)
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "Say hi."},
                                                              {"role": "assistant", "content": "Hi there!"}]}] * 8)
    gate = write_jsonl(tmp_path / "gate.jsonl", GATE_PROMPTS)
    training = c.files.create(file=data.open("rb"), purpose="fine-tune").id
    gate_id = c.files.create(file=gate.open("rb"), purpose="evals").id
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=training, hyperparameters={"n_epochs": 1},
                                    extra_body={"safety": {"k": 2, "guard": {"monitor_policy": "flag"},
                                                           "gate": {"harmful_set": gate_id, "overrefusal_set": gate_id, "max_new_tokens": 8,
                                                                    "max_harmful_increase": 1.0}}})  # a few prompts cannot bound the increase
    done = wait_for_job(c, job.id)
    assert done.status == "succeeded", done.error
    drift = [e for e in all_events(c, job.id) if e.type == "monitor_drift"]
    assert len(drift) == 1 and drift[0].message.startswith("Monitor drift: refusal direction cosine")
    data_ = drift[0].data
    assert -1.0 <= data_["refusal_direction"]["cosine_base_vs_fine_tuned"] <= 1.0
    assert data_["harm_probe"]["base"]["n_harmful"] == len(GATE_PROMPTS)

    flagged_reply = chat(server, flagged, model=done.fine_tuned_model)
    assert flagged_reply.headers["x-safekeel-monitor"] == "flagged"
    body = flagged_reply.json()
    assert body["safekeel"]["monitor"]["policy"] == "flag" and body["choices"][0]["message"]["content"] != BLOCK_MESSAGE
    assert body["choices"][0]["finish_reason"] != "content_filter"


def test_monitors_of_another_model_are_refused_at_startup(tmp_path, tiny_model_dir):
    from conftest import build_tiny_model

    home = tmp_path / "home"
    install_model(home, "tiny-llama", tiny_model_dir)
    other = build_tiny_model(tmp_path / "other-model", seed=1)
    train_tiny_monitors(other, home / "monitors" / "tiny-llama")
    server = LiveServer(home, "tiny-llama", "transformers", workers=0)
    with pytest.raises(RuntimeError, match="was trained on model"):
        server.start(timeout=120)
