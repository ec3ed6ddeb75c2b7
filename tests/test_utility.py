import math

import pytest

from safekeel.data.conversation import Conversation
from safekeel.eval.utility import extract_final_number, heldout_loss


@pytest.mark.parametrize("text,expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is 12.5.", "12.5"),
    ("so 10 then 20 then 30", "30"),
    ("no numbers here", None),
    (None, None),
    ("#### 18.0", "18"),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_heldout_loss_matches_a_direct_computation(tiny_model_dir):
    import torch

    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    convs = [Conversation.from_pair("What is two plus two?", "Four."), Conversation.from_pair("Name a colour.", "Blue, like the sky.")]
    result = heldout_loss(model, tokenizer, convs, batch_size=2, show_progress=False)
    # direct, one conversation at a time, no padding
    total, count = 0.0, 0
    for conv in convs:
        prompt = tokenizer.apply_chat_template([m.to_dict() for m in conv.prompt_messages], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conv.to_messages(), tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(nll[len(p_ids) - 1:].sum())
        count += ids.shape[1] - len(p_ids)
    assert result["tokens"] == count and result["n"] == 2
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
