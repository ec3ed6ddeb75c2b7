"""Per-concept monitor policies in the service: a real `safekeel serve` with the tiny model, the harm monitors
and two concept probes trained on it from the labelled probing data (toxicity: Jigsaw comments; cyber_hazard:
WMDP-cyber vs MMLU), each concept with its own policy; the response records every concept's decision and
/metrics counts them per concept."""

from __future__ import annotations

import json

import httpx
import pytest

from live_server import KEY_A, LiveServer, install_model
from test_service_monitors import metric, train_tiny_monitors

BLOCK_MESSAGE = "Blocked by a concept monitor."
POLICIES = {"toxicity": "block", "cyber_hazard": "flag"}


def train_tiny_concepts(model_dir, output) -> dict[str, list[str]]:
    """Toxicity and cyber-hazard probes on the tiny model; returns candidate texts (not used in training)."""
    from safekeel.data.probing import balanced_sample, load_probing
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.monitors.capture import model_fingerprint
    from safekeel.monitors.concepts import FeatureStore, calibrate_on, choose_probe, label_probe

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    store = FeatureStore(model.eval(), tokenizer, model_dir, None, [1], ["mean", "last"], max_tokens=64, progress=False)
    fingerprint = model_fingerprint(model_dir)
    jigsaw = balanced_sample(load_probing("jigsaw_wiki"), 250, seed=1)
    wmdp, mmlu = load_probing("wmdp_cyber"), load_probing("mmlu_benign")
    candidates = {}
    for concept, pos, neg in (("toxicity", [t for t, y in zip(jigsaw.texts, jigsaw.labels) if y], [t for t, y in zip(jigsaw.texts, jigsaw.labels) if not y]),
                              ("cyber_hazard", wmdp.texts[:250], mmlu.texts[::9][:250])):
        f_pos, f_neg = store.pooled(concept + "+", pos[:150]), store.pooled(concept + "-", neg[:150])
        dev = {"dev": (store.pooled(concept + "d+", pos[150:190]), store.pooled(concept + "d-", neg[150:190]))}
        best = choose_probe(f_pos, f_neg, dev, [1], ["mean", "last"])[0]
        probe = best.probe
        key = (probe.config.hookpoint, probe.config.pooling)
        calibrate_on(probe, {"held-out negatives": probe.score_features(store.pooled(concept + "c", neg[190:250])[key])})
        label_probe(probe, concept, str(model_dir), fingerprint, "test").save(output / concept)
        candidates[concept] = pos[190:250]
    return candidates


@pytest.fixture(scope="module")
def concept_server(tmp_path_factory, tiny_model_dir):
    from safekeel.monitors.runtime import MonitorRuntime
    from safekeel.paths import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent: the probing data is needed for this test")
    home = tmp_path_factory.mktemp("concept-home")
    install_model(home, "tiny-llama", tiny_model_dir)
    monitors, model_dir = home / "monitors" / "tiny-llama", home / "models" / "tiny-llama"
    harmful, benign = train_tiny_monitors(model_dir, monitors)
    candidates = train_tiny_concepts(model_dir, monitors)
    runtime = MonitorRuntime(monitors, model_dir, concept_policies=POLICIES)
    texts = candidates["toxicity"] + candidates["cyber_hazard"] + benign[300:]
    results = {text: runtime.score(text) for text in texts}
    decisions = {text: runtime.decide("log", r) for text, r in results.items()}

    def find(want_tox, want_cyber, want_harm=None):
        for text, r in results.items():
            over = {name: r.scores[name] > r.thresholds[name] for name in r.scores}
            if over["toxicity"] == want_tox and over["cyber_hazard"] == want_cyber and want_harm in (None, over["harm_probe"]):
                return text
        raise AssertionError(f"no candidate text with toxicity={want_tox}, cyber_hazard={want_cyber} among {len(results)}")

    chosen = {"toxic": find(True, False), "cyber": find(False, True, False), "clean": find(False, False, False)}
    assert decisions[chosen["toxic"]] == "blocked" and decisions[chosen["cyber"]] == "flagged" and decisions[chosen["clean"]] == "pass"
    with pytest.raises(ValueError, match="reads concept 'violence'"):
        MonitorRuntime(monitors, model_dir, concept_policies={"violence": "flag"})
    env = {"SAFEKEEL_MONITOR_POLICY": "log", "SAFEKEEL_MONITOR_CONCEPT_POLICIES": json.dumps(POLICIES),
           "SAFEKEEL_MONITOR_BLOCK_MESSAGE": BLOCK_MESSAGE}
    with LiveServer(home, "tiny-llama", "transformers", workers=0, extra_env=env) as live:
        yield live, chosen


def chat(server, text):
    return httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120,
                      json={"model": "tiny-llama", "messages": [{"role": "user", "content": text}], "max_tokens": 4})


def test_each_concept_decides_with_its_own_policy_and_is_counted(concept_server):
    server, chosen = concept_server
    before = {(c, d): metric(server, "safekeel_monitor_concept_decisions_total", concept=c, decision=d)
              for c in POLICIES for d in ("pass", "flagged", "blocked")}

    toxic = chat(server, chosen["toxic"])
    assert toxic.headers["x-safekeel-monitor"] == "blocked"
    body = toxic.json()
    assert body["choices"][0]["message"]["content"] == BLOCK_MESSAGE and body["usage"]["completion_tokens"] == 0
    concepts = body["safekeel"]["monitor"]["concepts"]
    assert concepts["toxicity"] == {"policy": "block", "flagged_by": ["toxicity"], "decision": "blocked"}
    assert concepts["cyber_hazard"]["decision"] == "pass"

    cyber = chat(server, chosen["cyber"])
    assert cyber.headers["x-safekeel-monitor"] == "flagged"
    body = cyber.json()
    assert body["choices"][0]["message"]["content"] != BLOCK_MESSAGE and body["usage"]["completion_tokens"] > 0
    assert body["safekeel"]["monitor"]["concepts"]["cyber_hazard"] == {"policy": "flag", "flagged_by": ["cyber_hazard"],
                                                                       "decision": "flagged"}
    assert body["safekeel"]["monitor"]["scores"]["cyber_hazard"] > body["safekeel"]["monitor"]["thresholds"]["cyber_hazard"]

    clean = chat(server, chosen["clean"])
    assert clean.headers["x-safekeel-monitor"] == "pass"
    assert {c: r["decision"] for c, r in clean.json()["safekeel"]["monitor"]["concepts"].items()} == {"toxicity": "pass",
                                                                                                       "cyber_hazard": "pass"}
    after = {(c, d): metric(server, "safekeel_monitor_concept_decisions_total", concept=c, decision=d)
             for c in POLICIES for d in ("pass", "flagged", "blocked")}
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert delta == {("toxicity", "blocked"): 1, ("toxicity", "pass"): 2, ("cyber_hazard", "pass"): 2,
                     ("cyber_hazard", "flagged"): 1}


def test_a_blocking_concept_closes_the_completions_endpoint(concept_server):
    server, _ = concept_server
    response = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                          json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "monitored_model"
