"""A content-judge candidate built on a causal LM: the bare transformer (AutoModel, no LM head) of a local model
reads "Request: {prompt}\nReply: {reply}", its last hidden state is mean-pooled over the attention mask, and a
linear layer gives the four logits (safekeel.eval.judges.pooled). Trained: LoRA adapters on the attention
projections and the linear layer; the base weights stay frozen.

The default backbone is the raw SmolLM2-135M-Instruct (`smollm2-135m-instruct`), not the aligned organism
(safekeel.defaults.DEFAULT_MODEL): the organism was fine-tuned on the authored pool, the texts the selectors
replay, and the judge must be trained on nothing a selector can replay (issue 28).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from safekeel.eval.judges.pooled import MAX_LENGTH, PooledHeadJudge, cap_prompt, read_judge_json
from safekeel.models.registry import resolve_model

BASE_MODEL = "smollm2-135m-instruct"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention projections adapted by LoRA (Llama-family names); those the model has are used."""
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05


def attention_projections(model) -> list[str]:
    """The names in ATTENTION_PROJECTIONS that name Linear layers of `model`; an error when it has none."""
    import torch  # deferred on purpose: heavy

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    found = [name for name in ATTENTION_PROJECTIONS if name in present]
    if not found:
        raise ValueError(f"{type(model).__name__} has none of the attention projections {list(ATTENTION_PROJECTIONS)} "
                         "that LoRA adapts here (its Linear layers: " + ", ".join(sorted(present)[:12]) + ")")
    return found


class LMHeadJudge(PooledHeadJudge):
    """A causal LM's transformer + LoRA on attention + a linear layer over the mean-pooled state, one logit per head.

    LMHeadJudge() starts from `base` (a registered model name or a local model folder); LMHeadJudge(folder) loads a
    saved judge (its judge.json names the base model, the folder holds the adapter, head.pt and the tokenizer)."""

    NAME = "lm-head"
    LEARNING_RATE = 2e-4
    """Higher than the cross-encoder's: only the LoRA adapters and the fresh linear layer learn."""

    def __init__(self, folder: str | Path | None = None, base: str | Path = BASE_MODEL, seed: int = 0):
        import torch  # deferred on purpose: heavy
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        saved = read_judge_json(folder)
        if folder and "base" not in saved:
            raise ValueError(f"{folder} is not a saved LM-head judge (no judge.json naming its base model)")
        base = saved.get("base", base)
        if Path(str(base)).expanduser().is_dir():
            base = str(Path(str(base)).expanduser().resolve())
        self.base = str(base)
        location = str(resolve_model(self.base))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder else location)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # causal attention: pads after the text leave the text's states unchanged
        model = AutoModel.from_pretrained(location, dtype=torch.float32)
        if folder:
            self.encoder = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        else:
            config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                target_modules=attention_projections(model), bias="none", task_type="FEATURE_EXTRACTION")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.encoder = get_peft_model(model, config)
        self.encoder.eval()
        self._init_head(folder, model.config.hidden_size, seed)

    def _batch(self, prompts: Sequence[str], replies: Sequence[str]):
        texts = [f"Request: {cap_prompt(self.tokenizer, p)}\nReply: {r}" for p, r in zip(prompts, replies)]
        return self.tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt",
                              return_token_type_ids=False)

    def save(self, folder: str | Path, meta: dict) -> None:
        """The LoRA adapter, the tokenizer, head.pt and judge.json (naming the base model); LMHeadJudge(folder) loads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        self._save_head(folder, meta, {"base": self.base, "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT,
                                                                     "target_modules": sorted(self.encoder.peft_config["default"].target_modules)}})
