"""Hidden-state capture: the residual stream of a transformers decoder at named hookpoints.

The one place that reads a model's hidden states; the monitors (safekeel.monitors.capture: pooled
features for probes, token streams for SAEs) and the hidden-state selectors
(safekeel.selectors.model_aware) both build their batches and call `residual_stream`.

Hookpoint names follow the house convention `layers.N`, and mean exactly one thing: the residual
stream ENTERING decoder block N, i.e. transformers' `hidden_states[N]` (`hidden_states[0]` is the
embedding output; the output of block N is `layers.{N+1}`). Capture uses forward pre-hooks on the
blocks and stops the forward pass after the deepest hookpoint, so reading `layers.6` of a 30-block
model pays for 6 blocks, not 30.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Hookpoint:
    layer: int

    @classmethod
    def parse(cls, name: str) -> "Hookpoint":
        parts = name.split(".")
        if len(parts) != 2 or parts[0] != "layers" or not parts[1].isdigit():
            raise ValueError(f"hookpoint {name!r} is not of the form 'layers.N'")
        return cls(int(parts[1]))

    @property
    def name(self) -> str:
        return f"layers.{self.layer}"

    @property
    def meaning(self) -> str:
        return f"residual stream entering decoder block {self.layer} (transformers hidden_states[{self.layer}])"


def decoder_layers(model):
    """The model's list of decoder blocks (works through a peft wrapper): the decoder's `layers`, else the
    first ModuleList named `...layers`."""
    import torch  # deferred on purpose: heavy, and only needed once a model is given

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(base).__name__}: hidden-state capture needs a "
                     "decoder-only transformer")


class _ReachedDeepest(Exception):
    """Raised by the deepest pre-hook once every wanted stream is captured: later blocks are not run."""


def residual_stream(model, input_ids, attention_mask, layers: Sequence[int]) -> dict:
    """{layer: (batch, tokens, d) float32 tensor}: the residual stream entering each decoder block in `layers`
    for one batch (inference mode, no KV cache). The forward pass stops after the deepest block wanted."""
    import torch  # deferred on purpose (see decoder_layers)

    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    for layer in wanted:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
    deepest = wanted[-1]
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer] = hidden.detach().float()
            if layer == deepest:
                raise _ReachedDeepest

        return pre_hook

    handles = [blocks[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in wanted]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _ReachedDeepest:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def length_batches(items: Sequence[tuple[list[int], object]], batch_size: int):
    """(positions, items) batches in order of length (less padding); positions index the input."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), i))
    for begin in range(0, len(order), batch_size):
        positions = order[begin:begin + batch_size]
        yield positions, [items[i] for i in positions]


def request_hidden_states(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 16,
                          max_length: int = 512) -> np.ndarray:
    """Unit-normalised mean of the residual stream entering decoder block `layer` (hidden_states[layer],
    read by safekeel.models.capture) over each text's tokens, the text rendered by the chat template as a
    lone user turn. Batches are right-padded here whatever the tokenizer's padding side, padding masked out
    of the mean. A text the template does not reproduce verbatim (or an empty one) is pooled over its whole
    rendered turn."""
    import torch  # deferred on purpose (see decoder_layers)

    items = []
    for text in texts:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                            max_length=max_length)
        begin = rendered.rfind(text.strip()) if text.strip() else -1
        end = begin + len(text.strip())
        span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin] if begin >= 0 else []
        ids = list(encoded["input_ids"])
        items.append((ids, span or list(range(len(ids)))))
    vectors = np.zeros((len(items), model.config.hidden_size), dtype=np.float32)
    for positions, batch in length_batches(items, batch_size):
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        pooled = torch.zeros((len(batch), width), dtype=torch.float32)
        for row, (ids, span) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            pooled[row, span] = 1.0
        hidden = residual_stream(model, input_ids, attention, [layer])[layer]
        mean = (hidden * pooled[..., None]).sum(dim=1) / pooled.sum(dim=1, keepdim=True)
        vectors[positions] = torch.nn.functional.normalize(mean, dim=1).numpy()
    return vectors
