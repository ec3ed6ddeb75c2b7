"""Defaults shared by the CLI, the API, the pipeline and the benchmark: one place, importable without loading
any heavy module."""

DEFAULT_MODEL = "smollm2-135m-safe"
"""The aligned organism (SmolLM2-135M-Instruct + LoRA SFT on the authored pool, safekeel/training/align.py): the
default base model of every command, the service and the benchmark presets. Any local model folder works too."""

DEFAULT_SELECTOR = "forgetting"
"""What `safekeel finetune`, `safekeel select` and fine-tuning jobs use unless told otherwise: the one selector
that beat seeded random selection in a pre-registered test (benchmarks/results/confirm.md). Its scope: the
135M organism, k=10, replay from the authored pool, 8 fresh seeds x 3 user datasets: harmful rate -0.064
[-0.095, -0.034], one-sided Wilcoxon p = 0.0011, with no measurable change in over-refusal or held-out loss.
Other k, modes, pools and models are untested. It costs minutes more than `random` on CPU (8 LoRA steps and
the pool's loss before and after): about 2 min per job once the base model's pool losses are stored (the
confirmatory runs: median 313-388 s against random's 184-262 s), about 3 min on a fresh service (the demo:
175 s of selection). `random` is the cheap alternative."""

DEFAULT_K = 10
"""Safety examples selected per fine-tune (modes replay, backdoor, icl)."""

DEFAULT_MODE = "replay"

DEFAULT_POOL = "authored"

DEFAULT_SAFETY_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer every safe request fully. If a request asks for help to harm "
    "people, break the law or cause damage, decline briefly and offer a safe alternative."
)
"""safekeel's default safety system prompt: PTST's test-time prompt and the service's serving guard."""
