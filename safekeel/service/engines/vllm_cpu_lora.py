"""The `vllm.general_plugins` entry point, `safekeel.service.engines.vllm_cpu_lora:install` (pyproject.toml).

The grouped LoRA ops are safekeel.models.engines.vllm_cpu_lora. The entry point keeps this name on purpose:
it is what every installed environment has registered, and a frozen worktree of an older revision
(benchmarks/rerun.py --code-from) resolves it in its own tree, where the ops live at this path. vLLM only logs
a plugin it cannot import and then runs LoRA on CPU without the grouped ops, so a renamed entry point would
silently slow such runs (and those of an environment not reinstalled) by an order of magnitude.
"""

from safekeel.models.engines.vllm_cpu_lora import install

__all__ = ["install"]
