"""The reference log-probability cache of preference training and its held-out evaluation (tiny model): it trains as
trl does without it, computes each pair once per backbone, is really read (a changed value changes the result), and
keys a peft-wrapped model by its base weights."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from safekeel.data.preference import load_preferences
from safekeel.models.registry import load_model_and_tokenizer
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import PreferenceConfig, train_preference
from safekeel.training.reference_cache import ReferenceCache, open_reference_cache, reference_identity, reference_sha256
from safekeel.training.sft import TrainingCancelled


def _pairs(tmp_path: Path, n: int = 8):
    rows = [{"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}, as {i} and {i} make {2 * i}."}],
             "non_preferred_output": [{"role": "assistant", "content": "I don't know."}]} for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_preferences(path, strict=True).pairs


def _train(tiny_model_dir, pairs, out: Path, cache: ReferenceCache | None, should_stop=None):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    config = LoraSFTConfig(max_steps=3, batch_size=2, lora_r=8, learning_rate=1e-2, logging_steps=1, seed=0)
    return train_preference(model, tokenizer, pairs, config, PreferenceConfig(("sigmoid",)), out, show_progress=False,
                            reference_cache=cache, should_stop=should_stop)


def _losses(result) -> list[float]:
    return [entry["loss"] for entry in result.log_history if "loss" in entry]


def test_training_with_the_cache_matches_training_without_it_and_reads_it(tiny_model_dir, tmp_path, caplog):
    pairs = _pairs(tmp_path)
    plain = _train(tiny_model_dir, pairs, tmp_path / "plain", None)
    cache = ReferenceCache(tmp_path / "ref.sqlite")
    with caplog.at_level(logging.INFO, logger="safekeel.training.preference"):
        first = _train(tiny_model_dir, pairs, tmp_path / "first", cache)
    assert "8 cached" not in caplog.text and "0 cached, 8 to compute" in caplog.text
    assert cache.counts()["pairs"] == 8
    assert len(_losses(first)) == 3 and _losses(first) == pytest.approx(_losses(plain), rel=1e-4, abs=1e-5)
    assert _losses(first)[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step: ln 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="safekeel.training.preference"):
        again = _train(tiny_model_dir, pairs, tmp_path / "again", cache)
    assert "8 cached, 0 to compute" in caplog.text and cache.counts()["pairs"] == 8
    assert _losses(again) == _losses(first)  # the same stored values: the same run

    with sqlite3.connect(cache.path) as db:  # a reference that likes the chosen replies far more: DPO's margin drops
        db.execute("UPDATE pairs SET chosen = chosen + 5")
    db.close()
    tampered = _train(tiny_model_dir, pairs, tmp_path / "tampered", cache)
    assert _losses(tampered)[0] > _losses(first)[0] + 0.1


def test_the_held_out_evaluation_reads_the_reference_from_the_cache(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from safekeel.eval.preference import preference_metrics

    pairs = _pairs(tmp_path, 4)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    base_sha = reference_sha256(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert reference_sha256(model) == base_sha  # a peft model keys as its base: LoRA's parameters are left out
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    assert reference_sha256(model) == base_sha
    cache = ReferenceCache(tmp_path / "ref.sqlite")
    plain = preference_metrics(model, tokenizer, pairs, beta=0.1, max_length=64)
    first = preference_metrics(model, tokenizer, pairs, beta=0.1, max_length=64, reference_cache=cache)
    assert cache.counts()["replies"] == 8 and first == plain
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE replies SET logprob = logprob + 100")
    db.close()
    shifted = preference_metrics(model, tokenizer, pairs, beta=0.1, max_length=64, reference_cache=cache)
    # both replies' reference moved alike: the summed margin stays, the per-token one moves (the replies' lengths differ)
    assert shifted["summed"]["reward_margin"] == pytest.approx(plain["summed"]["reward_margin"], abs=1e-6)
    assert shifted["per_token"]["reward_margin"] > plain["per_token"]["reward_margin"] + 0.1
    with torch.no_grad():  # other base weights: another reference, so nothing stored applies
        next(p for n, p in model.named_parameters() if "lora_" not in n).add_(1.0)
    assert reference_sha256(model) != base_sha


def test_a_stop_while_the_cache_fills_keeps_what_was_computed_and_a_bad_path_falls_back(tiny_model_dir, tmp_path, caplog):
    pairs = _pairs(tmp_path)
    cache = ReferenceCache(tmp_path / "ref.sqlite")
    asked = []

    def stop_on_third_question():
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(TrainingCancelled, match="2 of 8 pairs"):
        _train(tiny_model_dir, pairs, tmp_path / "stopped", cache, should_stop=stop_on_third_question)
    assert cache.counts()["pairs"] == 2  # the two computed before the stop are kept
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="safekeel.training.reference_cache"):
        assert open_reference_cache(tmp_path / "a_file" / "ref.sqlite") is None
    assert "the reference is computed in every step" in caplog.text


def test_the_identity_separates_precision_configuration_and_device(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    float32 = reference_identity(model, "float32")
    assert float32 == reference_identity(model, "float32", "cpu") != reference_identity(model, "bfloat16 autocast")
    assert float32 != reference_identity(model, "float32", "cuda")
    model.config.rms_norm_eps = model.config.rms_norm_eps * 10  # same weights, another model
    assert reference_identity(model, "float32") != float32


def test_the_service_keeps_one_reference_cache_per_tenant(tmp_path):
    from safekeel.service.settings import ServiceSettings

    settings = ServiceSettings(service_dir=tmp_path / "service")
    assert settings.reference_cache("acme") != settings.reference_cache("globex")
    assert settings.reference_cache("acme").parent == settings.files_root / "reference_logps"
