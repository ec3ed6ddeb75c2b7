"""Shared fixtures: a tiny randomly initialised Llama with a tokenizer built offline, isolated caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with a 400-token BPE tokenizer trained on the authored data."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from safekeel.data.safety import load_authored_benign, load_authored_pool

    texts = [e.request + " " + e.refusal for e in load_authored_pool()] + [c.to_messages()[-1]["content"] for c in load_authored_benign()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each test gets its own SAFEKEEL_HOME unless it is the real-model integration test."""
    if "SAFEKEEL_TEST_HOME" in os.environ:
        monkeypatch.setenv("SAFEKEEL_HOME", os.environ["SAFEKEEL_TEST_HOME"])
    else:
        monkeypatch.setenv("SAFEKEEL_HOME", str(tmp_path / "home"))
    yield


@pytest.fixture
def shared_data():
    from safekeel.paths import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent: AdvBench/XSTest/GSM8K reference sets are needed for this test")
    return path
