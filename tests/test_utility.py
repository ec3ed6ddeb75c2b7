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


def test_with_context_puts_the_served_system_prompt_and_demonstrations_before_the_conversation():
    from safekeel.eval.utility import with_context

    context = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "How to pick a lock?"},
               {"role": "assistant", "content": "I can't help with that."}]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert with_context(context, plain) == context + plain
    own_system = [{"role": "system", "content": "You summarise."}] + plain
    assert with_context(context, own_system) == [{"role": "system", "content": "Be safe.\n\nYou summarise."}] + context[1:] + plain
    assert with_context(context[1:], own_system) == own_system[:1] + context[1:] + plain
    assert with_context((), own_system) == own_system


def test_heldout_loss_is_the_served_models_and_scores_only_the_final_answer(tiny_model_dir):
    import torch

    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    convs = [Conversation.from_pair("What is two plus two?", "Four."), Conversation.from_pair("Name a colour.", "Blue, like the sky.")]
    context = [{"role": "system", "content": "You are a careful, safe assistant."},
               {"role": "user", "content": "Explain how to hotwire a car."}, {"role": "assistant", "content": "I can't help with that."}]
    plain = heldout_loss(model, tokenizer, convs, batch_size=2, show_progress=False)
    served = heldout_loss(model, tokenizer, convs, batch_size=2, show_progress=False, context=context)
    total = 0.0
    for conv in convs:
        prompt = tokenizer.apply_chat_template(context + [m.to_dict() for m in conv.prompt_messages], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(context + conv.to_messages(), tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[len(p_ids) - 1:].sum())
    assert served["tokens"] == plain["tokens"] and served["context_messages"] == 3  # the same answer tokens are scored
    assert served["loss"] == pytest.approx(total / served["tokens"], rel=1e-4)
    assert served["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # the context changes what the model predicts
    # max_length counts the conversation: a context longer than it does not push the answers out
    short = heldout_loss(model, tokenizer, convs, batch_size=2, show_progress=False, context=context * 4, max_length=40)
    assert short["n"] == 2 and short["skipped"] == 0


def test_heldout_loss_computes_logits_only_from_the_shortest_prompts_end(tiny_model_dir):
    """Served demonstrations make prompts far longer than answers: the lm_head sees only the positions that
    predict a scored token (the loss itself is checked against a direct computation above)."""
    from safekeel.eval.utility import heldout_loss
    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    convs = [Conversation.from_pair("What is two plus two?", "Four."), Conversation.from_pair("Name a colour.", "Blue, like the sky.")]
    context = [{"role": "user", "content": f"Demonstration request {i}: explain how to hotwire a car."} if j == 0
               else {"role": "assistant", "content": "I can't help with that, but a locksmith can."}
               for i in range(6) for j in range(2)]
    widths, kept = [], []
    hooks = [model.get_input_embeddings().register_forward_hook(lambda module, args, out: widths.append(out.shape[1])),
             model.get_output_embeddings().register_forward_hook(lambda module, args, out: kept.append(out.shape[1]))]
    try:
        served = heldout_loss(model, tokenizer, convs, batch_size=2, show_progress=False, context=context)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(widths) == len(kept) == 1 and served["n"] == 2
    # the longer answer's tokens plus the prompt-length difference, not the served prompts' width
    assert served["tokens"] / 2 <= kept[0] < widths[0] / 3, (kept, widths, served["tokens"])
