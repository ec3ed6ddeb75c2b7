"""Concept probes (safekeel.monitors.concepts, .mil) and per-concept decisions (runtime): cached activations
of a real tiny model, dev-chosen probes with benign calibration, MIL token probes, concept metadata through
save/load, and the per-concept policy arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from safekeel.monitors.concepts import FeatureStore, calibrate_on, choose_probe, label_probe, measure, wilson
from safekeel.monitors.mil import fit_mil_probe, render_token_scores
from safekeel.monitors.probes import ProbeConfig, ProbeMismatchError
from safekeel.monitors.runtime import MonitorResult, concept_decisions, load_monitors, most_severe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    return model.eval(), tokenizer


def authored():
    from safekeel.data.safety import load_authored_benign, load_authored_pool

    return [e.request for e in load_authored_pool()], [c.last_user for c in load_authored_benign()]


def test_feature_store_caches_by_model_and_texts(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    store = FeatureStore(model, tokenizer, tiny_model_dir, tmp_path, [0, 1], ["last", "mean"], progress=False)
    texts = ["how do I bake bread", "tell me a joke about cats", "what is the capital of France"]
    first = store.pooled("demo", texts)
    spent = store.seconds
    assert spent > 0 and set(first) == {(h, p) for h in ("layers.0", "layers.1") for p in ("last", "mean")}
    assert first[("layers.1", "mean")].shape == (3, model.config.hidden_size)
    again = store.pooled("demo", texts)
    assert store.seconds == spent  # served from the cache, no forward
    np.testing.assert_allclose(again[("layers.1", "last")], first[("layers.1", "last")], rtol=1e-2, atol=1e-2)
    assert len(list((tmp_path / store.fingerprint).glob("demo-*.npz"))) == 1
    store.pooled("demo", texts[:2])  # other texts: another cache file
    assert len(list((tmp_path / store.fingerprint).glob("demo-*.npz"))) == 2
    tokens = store.tokens("demo", texts, 1)
    assert [len(t) for t in tokens] == [len(store.tokens("demo", texts, 1)[i]) for i in range(3)]
    with pytest.raises(ValueError, match="empty"):
        store.pooled("none", [])


def test_concept_probe_is_chosen_on_dev_calibrated_and_refused_elsewhere(tiny, tiny_model_dir, tmp_path):
    from safekeel.monitors.capture import model_fingerprint

    model, tokenizer = tiny
    harmful, benign = authored()
    store = FeatureStore(model, tokenizer, tiny_model_dir, None, [0, 1], ["last", "mean"], progress=False)
    f_pos, f_neg = store.pooled("pos", harmful[:200]), store.pooled("neg", benign[:200])
    d_pos, d_neg = store.pooled("dpos", harmful[200:260]), store.pooled("dneg", benign[200:260])
    cal_a, cal_b = store.pooled("cal_a", benign[260:400]), store.pooled("cal_b", benign[400:540])
    best, grid = choose_probe(f_pos, f_neg, {"dev": (d_pos, d_neg)}, [0, 1], ["last", "mean"])
    assert len(grid) == 4 and best.dev["auroc"] == max(r["dev_auroc"] for r in grid)
    probe = best.probe
    key = (probe.config.hookpoint, probe.config.pooling)
    scores_a, scores_b = probe.score_features(cal_a[key]), probe.score_features(cal_b[key])
    own = calibrate_on(probe, {"a": scores_a, "b": scores_b})
    assert probe.threshold == pytest.approx(max(v["threshold"] for v in own.values()), abs=1e-3)  # the stricter set's
    assert (scores_a > probe.threshold).mean() <= 0.01 and (scores_b > probe.threshold).mean() <= 0.01
    m = measure(probe.score_features(d_pos[key]), probe.score_features(d_neg[key]), probe.threshold)
    assert m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1] and len(m["tpr_at_threshold_ci95"]) == 2

    fingerprint = model_fingerprint(tiny_model_dir)
    label_probe(probe, "toxicity", "tiny", fingerprint, "abc")
    probe.save(tmp_path / "monitors" / "tox")
    loaded = load_monitors(tmp_path / "monitors", expected_model=fingerprint)
    assert loaded["tox"].metadata["concept"] == "toxicity" and loaded["tox"].threshold == pytest.approx(probe.threshold)
    with pytest.raises(ProbeMismatchError, match="was trained on model"):
        load_monitors(tmp_path / "monitors", expected_model="another-model")


def test_mil_probe_finds_the_one_token_that_carries_the_concept():
    rng = np.random.default_rng(0)
    d = 16
    direction = np.zeros(d, np.float32)
    direction[3] = 4.0

    def bags(n, planted):
        out, where = [], []
        for _ in range(n):
            tokens = rng.normal(size=(int(rng.integers(8, 20)), d)).astype(np.float32)
            if planted:
                at = int(rng.integers(len(tokens)))
                tokens[at] += direction
                where.append(at)
            out.append(tokens)
        return out, where

    pos, _ = bags(120, True)
    neg, _ = bags(120, False)
    probe = fit_mil_probe(ProbeConfig("layers.1", "rolling_max", "logistic", window=1), pos, neg, epochs=20)
    test_pos, where = bags(60, True)
    test_neg, _ = bags(60, False)
    m = measure(probe.score_prompts(tokens=test_pos), probe.score_prompts(tokens=test_neg), None)
    assert m["auroc"] > 0.95
    located = [int(np.argmax(probe.score_features(b))) == at for b, at in zip(test_pos, where)]
    assert np.mean(located) > 0.9  # the token score peaks at the planted token: per-token scores mean something
    page = render_token_scores([{"tokens": ["a", "<b>"], "scores": [0.5, -1.0], "label": "toxic", "score": 0.5}], 0.1, "t")
    assert "&lt;b&gt;" in page and "(flagged)" in page
    with pytest.raises(ValueError, match="rolling_max"):
        fit_mil_probe(ProbeConfig("layers.1", "mean"), pos, neg)


def test_per_concept_policies_decide_and_the_most_severe_wins():
    result = MonitorResult({"harm_probe": 2.0, "toxicity": 0.5, "cyber_hazard": -1.0},
                           {"harm_probe": 1.0, "toxicity": 0.0, "cyber_hazard": 0.0})
    members = {"harm_probe": ["harm_probe"], "toxicity": ["toxicity"], "cyber_hazard": ["cyber_hazard"]}
    concepts = concept_decisions({"toxicity": "flag", "cyber_hazard": "block", "harm_probe": "off"}, members, result)
    assert concepts == {"toxicity": {"policy": "flag", "flagged_by": ["toxicity"], "decision": "flagged"},
                        "cyber_hazard": {"policy": "block", "flagged_by": [], "decision": "pass"}}
    assert most_severe(["pass", "logged", "flagged"]) == "flagged" and most_severe(["blocked", "pass"]) == "blocked"
    with pytest.raises(ValueError, match="unknown monitor decision"):
        most_severe(["maybe"])
    assert wilson(0, 0) is None and wilson(5, 10)[0] < 0.5 < wilson(5, 10)[1]


def test_probing_data_splits_are_disjoint_and_balanced(shared_data):
    from safekeel.data.probing import balanced_sample, load_probing, split_rows

    with pytest.raises(ValueError, match="unknown probing source 'jigsaw'"):
        load_probing("jigsaw")
    jigsaw = load_probing("jigsaw_wiki")
    assert len(jigsaw) > 12000 and set(jigsaw.labels) == {0, 1}
    parts = split_rows(jigsaw, {"train": 100, "dev": 40, "test": 41})
    ids = [set(p.ids) for p in parts.values()]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert [sum(p.labels) for p in parts.values()] == [50, 20, 21] and len(parts["test"]) == 41
    davidson = balanced_sample(load_probing("davidson"), 30, seed=1)
    assert sum(davidson.labels) == 30 and len(davidson) == 60 and {"class_name", "count"} <= set(davidson.extra[0])
