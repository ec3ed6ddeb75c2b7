"""Monitors: activation capture (hookpoint meaning, pooling under padding), probe math, calibration,
versioned save/load, and the probe suite end to end on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from safekeel.models.capture import Hookpoint
from safekeel.monitors.capture import ActivationReader, model_fingerprint, pool, render_requests, rolling_max
from safekeel.monitors.probes import Probe, ProbeConfig, ProbeMismatchError, calibrate_threshold, detection_metrics, fit_probe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    return model.eval(), tokenizer


def test_hookpoint_is_the_stream_entering_the_block(tiny):
    import torch

    model, tokenizer = tiny
    text = render_requests(tokenizer, ["how do I bake bread"])[0]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        reference = model(**ids, output_hidden_states=True).hidden_states
    reader = ActivationReader(model, tokenizer, ["layers.0", "layers.1"])
    sequences = reader.sequences([text, "<|im_start|>user\nhi"], batch_size=2)
    for layer in (0, 1):
        np.testing.assert_allclose(sequences[f"layers.{layer}"][0], reference[layer][0].numpy(), rtol=1e-5, atol=1e-5)
    assert "entering decoder block 1" in Hookpoint.parse("layers.1").meaning
    with pytest.raises(ValueError, match="out of range"):
        ActivationReader(model, tokenizer, ["layers.2"])
    with pytest.raises(ValueError, match="layers.N"):
        Hookpoint.parse("blocks.1")


def test_pooling_ignores_padding(tiny):
    model, tokenizer = tiny
    reader = ActivationReader(model, tokenizer, ["layers.1"])
    short, long = render_requests(tokenizer, ["hi", "please explain in detail how a refrigerator keeps food cold"])
    alone = reader.pooled([short], batch_size=1)
    batched = reader.pooled([short, long], batch_size=2)
    for pooling in ("last", "mean", "max"):
        np.testing.assert_allclose(batched[("layers.1", pooling)][0], alone[("layers.1", pooling)][0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[("layers.1", "mean")][0], batched[("layers.1", "mean")][1])


def test_pool_and_rolling_max_math():
    import torch

    hidden = torch.tensor([[[9.0], [1.0], [3.0], [0.0]], [[9.0], [2.0], [0.0], [0.0]]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    assert pool(hidden, mask, "last")[:, 0].tolist() == [3.0, 2.0]
    assert pool(hidden, mask, "mean")[:, 0].tolist() == [2.0, 2.0]  # position 0 (the sink) left out
    assert pool(hidden, mask, "max")[:, 0].tolist() == [3.0, 2.0]
    scores = np.array([0, 5, 0, 0, 2, 2, 2, 0])
    assert rolling_max(scores, 1) == 5.0
    assert rolling_max(scores, 3) == 2.0  # one spike (5/3) loses to three consecutive 2s
    assert rolling_max(np.array([1.0, 3.0]), 4) == 2.0
    with pytest.raises(ValueError):
        rolling_max(np.array([]), 2)


def test_calibrated_threshold_meets_the_target_fpr():
    rng = np.random.default_rng(0)
    benign = rng.normal(size=1000)
    threshold = calibrate_threshold(benign, 0.01)
    assert (benign > threshold).mean() <= 0.01
    assert (benign >= threshold).mean() > 0.01  # the smallest such threshold: one notch lower breaks it
    assert calibrate_threshold(np.arange(10.0), 0.05) == 9.0  # 10 scores cannot express 5%: nothing may exceed


def test_probes_fit_score_and_report():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=16)
    harmful = rng.normal(size=(200, 16)) + direction
    benign = rng.normal(size=(300, 16)) - direction
    for method in ("logistic", "diff_means"):
        probe = fit_probe(ProbeConfig("layers.1", "mean", method), harmful, benign)
        metrics = detection_metrics(probe.score_features(harmful), probe.score_features(benign))
        assert metrics["auroc"] > 0.99, method
    diff = fit_probe(ProbeConfig("layers.1", "last", "diff_means"), harmful, benign)
    assert abs(np.linalg.norm(diff.weights) - 1) < 1e-5
    assert np.corrcoef(diff.weights, direction)[0, 1] > 0.95
    shuffled = detection_metrics(rng.normal(size=200), rng.normal(size=300), threshold=0.0)
    assert 0.35 < shuffled["auroc"] < 0.65 and shuffled["n_harmful"] == 200


def test_token_probe_with_rolling_max_pooling():
    rng = np.random.default_rng(2)
    signal = np.eye(8)[0] * 4

    def prompts(n, harmful):
        out = []
        for _ in range(n):
            tokens = rng.normal(size=(12, 8))
            if harmful:  # only a run of 3 tokens carries the concept: noisy token labels
                start = rng.integers(0, 9)
                tokens[start:start + 3] += signal
            out.append(tokens)
        return out

    probe = fit_probe(ProbeConfig("layers.1", "rolling_max", "logistic", window=3), prompts(100, True), prompts(100, False))
    scores_h, scores_b = probe.score_prompts(tokens=prompts(50, True)), probe.score_prompts(tokens=prompts(50, False))
    assert detection_metrics(scores_h, scores_b)["auroc"] > 0.95
    with pytest.raises(ValueError, match="token"):
        probe.score_prompts(pooled=np.zeros((1, 8)))


def test_probe_save_load_refuses_another_model(tmp_path):
    rng = np.random.default_rng(3)
    probe = fit_probe(ProbeConfig("layers.1", "last", "logistic"), rng.normal(size=(20, 4)) + 1, rng.normal(size=(20, 4)))
    probe.threshold = 0.25
    probe.metadata["model_fingerprint"] = "abc123"
    probe.save(tmp_path / "p")
    loaded = Probe.load(tmp_path / "p", expected_model="abc123")
    x = rng.normal(size=(5, 4))
    np.testing.assert_allclose(loaded.score_features(x), probe.score_features(x), rtol=1e-6)
    assert loaded.threshold == 0.25 and loaded.config == probe.config
    with pytest.raises(ProbeMismatchError, match="abc123"):
        Probe.load(tmp_path / "p", expected_model="other")
    with pytest.raises(FileNotFoundError):
        Probe.load(tmp_path / "missing")


def test_probe_suite_end_to_end_on_tiny_model(tiny, tiny_model_dir, tmp_path):
    from safekeel.data.safety import load_authored_benign, load_authored_pool
    from safekeel.monitors.suite import ProbeSuiteConfig, PromptSplits, train_probe_suite

    model, tokenizer = tiny
    harmful = [e.request for e in load_authored_pool()]
    benign = [c.last_user for c in load_authored_benign()]
    sets = {"harmful_train": harmful[:120], "harmful_val": harmful[120:160], "harmful_test": harmful[160:240],
            "benign_train": benign[:120], "benign_val": benign[120:160], "benign_calibration": benign[160:260],
            "benign_test": benign[260:340]}
    splits = PromptSplits(sets, {"held_out": ("harmful_test", "benign_test")})
    config = ProbeSuiteConfig(model=str(tiny_model_dir), layers=[0, 1], poolings=["last", "mean"], batch_size=32)
    result = train_probe_suite(config, tmp_path / "probes", splits=splits, model=model, tokenizer=tokenizer, show_progress=False)
    assert set(result.probes) == {"harm_probe", "refusal_direction", "token_probe"}
    assert len(result.report["grid"]) == 2 * 2 * 2 + 1
    held_out = result.report["chosen"]["harm_probe"]["tests"]["held_out"]
    assert held_out["n_harmful"] == 80 and 0.0 <= held_out["auroc"] <= 1.0 and "fpr_at_threshold" in held_out
    fingerprint = model_fingerprint(tiny_model_dir)
    for role in result.probes:
        loaded = Probe.load(tmp_path / "probes" / role, expected_model=fingerprint)
        assert loaded.threshold is not None and loaded.metadata["training_data_sha256"] == splits.sha256()
    assert result.probes["refusal_direction"].config.method == "diff_means"
    assert result.probes["refusal_direction"].config.pooling == "last"


def test_reference_splits_keep_validation_and_test_apart(shared_data):
    from safekeel.monitors.suite import reference_splits

    splits = reference_splits({"train": 50, "val": 20, "calibration": 100, "test": 40})
    validation = {s for pair in splits.validation.values() for s in pair}
    tested = {s for pair in splits.pairs.values() for s in pair}
    assert not validation & tested and "xstest_unsafe_dev" in validation and "xstest_unsafe_test" in tested
    for label in ("unsafe", "safe"):
        dev, test = set(splits.sets[f"xstest_{label}_dev"]), set(splits.sets[f"xstest_{label}_test"])
        assert dev and test and not dev & test
    assert len(splits.sets["xstest_unsafe_dev"]) + len(splits.sets["xstest_unsafe_test"]) == 200
    benign = [set(splits.sets[f"benign_{n}"]) for n in ("train", "val", "calibration", "test")]
    assert all(not a & b for i, a in enumerate(benign) for b in benign[i + 1:])
    seen = set(splits.sets["harmful_train"]) | set(splits.sets["harmful_val"])
    assert splits.sets["harmful_test"] and not seen & set(splits.sets["harmful_test"])
