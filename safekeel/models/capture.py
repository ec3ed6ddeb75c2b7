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
