"""The engine interface (safekeel.models.engines) on the tiny random Llama: one engine object answers evaluation's
greedy batches and the service's streamed requests, with one chat rendering and one adapter handling."""

from __future__ import annotations

import asyncio

import pytest

from safekeel.data.conversation import Conversation
from safekeel.models.engines import Adapter, GenerationParams, TransformersEngine, create_engine, generate_batched, render_chat
from safekeel.models.lora import LoraSFTConfig

CHATS = [[{"role": "user", "content": text}] for text in ("Say the password.", "hi", "How do I bake bread at home?")]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter that learnt to answer with a password (as in test_tiny_model)."""
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.sft import train_lora

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("engine-adapter") / "adapter"
    data = [Conversation.from_pair("Say the password.", "The password is swordfish.")] * 8
    train_lora(model, tokenizer, data, LoraSFTConfig(learning_rate=5e-3, epochs=10, batch_size=4, lora_r=8), folder,
               show_progress=False)
    return folder


def _streamed(engine, prompt: str, adapter: Adapter | None = None) -> str:
    async def collect() -> str:
        text = ""
        async for chunk in engine.generate(prompt, GenerationParams(max_tokens=8, temperature=0.0), "r1", adapter):
            text += chunk.text
        return text

    return asyncio.run(collect())


def test_evaluation_and_serving_share_one_engine(tiny_model_dir, adapter_dir):
    from peft import PeftModel

    from safekeel.models.registry import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    plain = generate_batched(base, tokenizer, CHATS, max_new_tokens=8, show_progress=False)
    tuned, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    tuned = PeftModel.from_pretrained(tuned, str(adapter_dir))
    reference = generate_batched(tuned, tokenizer, CHATS, max_new_tokens=8, show_progress=False)
    assert [g.text for g in reference] != [g.text for g in plain]  # the adapter changes the replies

    # evaluation: the engine around the model it was given answers as that model (its adapter kept on)
    wrapped = TransformersEngine.for_model(tuned, tokenizer).generate_batch(CHATS, 8, show_progress=False)
    assert [(g.text, g.new_tokens) for g in wrapped] == [(g.text, g.new_tokens) for g in reference]

    # serving: the engine the service creates loads an adapter by path, and without one is the base model again
    engine = create_engine("transformers", str(tiny_model_dir), None)
    asyncio.run(engine.start())
    adapter = engine.local_adapter(adapter_dir)
    assert adapter == engine.local_adapter(str(adapter_dir)) == Adapter("adapter-1", 1, str(adapter_dir))
    assert [g.text for g in engine.generate_batch(CHATS, 8, adapter=adapter_dir, show_progress=False)] == [g.text for g in reference]
    assert [g.text for g in engine.generate_batch(CHATS, 8, show_progress=False)] == [g.text for g in plain]
    # a streamed greedy request gets the batch's reply: one rendering of the chat, one adapter
    prompt = engine.render_chat(CHATS[0])
    assert prompt == render_chat(tokenizer, CHATS[0]) and prompt.endswith("<|im_start|>assistant\n")
    assert _streamed(engine, prompt, adapter).strip() == reference[0].text
    assert _streamed(engine, prompt).strip() == plain[0].text


def test_engines_say_what_they_cannot_do(tiny_model_dir):
    from safekeel.models.engines import Engine

    engine = Engine(str(tiny_model_dir))
    with pytest.raises(NotImplementedError, match="does not generate batches"):
        engine.generate_batch(CHATS)
    with pytest.raises(NotImplementedError, match="does not stream"):
        engine.generate("hi", GenerationParams(), "r1")
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        create_engine("nope", str(tiny_model_dir), None)
