"""The grouped LoRA ops installed into vLLM's CPU path compute what vLLM's own ops compute."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def ops():
    from safekeel.models.engines import vllm_cpu_lora

    assert vllm_cpu_lora.install()
    assert vllm_cpu_lora.install()  # idempotent: vLLM loads plugins once per process it starts
    return vllm_cpu_lora


def _case(seed: int, tokens: int, d_in: int, d_out: int, slots: int, four_dim: bool, indices: list[int] | None = None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=generator, dtype=torch.bfloat16)
    shape = (slots, 1, d_out, d_in) if four_dim else (slots, d_out, d_in)
    w = torch.randn(*shape, generator=generator, dtype=torch.bfloat16)
    idx = torch.tensor(indices) if indices is not None else torch.randint(-1, slots, (tokens,), generator=generator)
    return x, w, idx


@pytest.mark.parametrize("indices", [None, [0] * 7, [-1] * 7, [1, 0, -1, 1, 1, 0, 2]])
@pytest.mark.parametrize("four_dim", [False, True])
def test_grouped_ops_match_vllm_torch_ops(ops, indices, four_dim):
    from vllm.lora.ops.torch_ops import lora_ops

    assert lora_ops.bgmv_expand is ops.bgmv_expand  # installed where the sgmv ops look it up
    x, w, idx = _case(0, 7, 16, 40, 3, four_dim, indices)
    for name, args in (("bgmv_shrink", (0.5,)), ("bgmv_expand", (True,)), ("bgmv_expand", (False,)),
                       ("bgmv_expand_slice", (8, 40, True)), ("bgmv_expand_slice", (4, 40, False))):
        width = 48 if name == "bgmv_expand_slice" else 40
        expected = torch.randn(7, width, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        got = expected.clone()
        ops.ORIGINALS[name](x, w, expected, idx, *args)
        getattr(ops, name)(x, w, got, idx, *args)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # bf16 inputs, same products


def test_grouped_ops_reject_mismatched_indices(ops):
    x, w, _ = _case(0, 5, 8, 8, 2, False)
    with pytest.raises(ValueError, match="4 LoRA indices for 5 tokens"):
        ops.lora_products(x, w, torch.tensor([0, 0, 1, 1]), torch.float32)


def test_the_plugin_is_registered_for_vllm():
    from importlib.metadata import entry_points

    from safekeel.models.engines import vllm_cpu_lora

    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    # the entry point keeps its first name (safekeel/service/engines/vllm_cpu_lora.py says why) and loads the ops' install
    assert plugins["safekeel_cpu_lora"].value == "safekeel.service.engines.vllm_cpu_lora:install"
    assert plugins["safekeel_cpu_lora"].load() is vllm_cpu_lora.install
