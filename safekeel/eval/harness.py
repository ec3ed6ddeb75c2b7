"""`safekeel eval`: harmful rate (two judges + coherence), over-refusal, utility; an EvalReport."""

from __future__ import annotations

import json
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from safekeel.data import reference
from safekeel.data.conversation import SafetyExample
from safekeel.data.formats import load_conversations
from safekeel.eval.generate import generate_batched, vllm_generator
from safekeel.eval.judges import get_judge
from safekeel.eval.stats import Rate
from safekeel.eval.utility import gsm8k_accuracy, heldout_loss
from safekeel.provenance import library_versions, write_json_atomic


VLLM_ENGINES = {"vllm": "float32", "vllm-bfloat16": "bfloat16"}
"""EvalSettings.engine values served by vLLM, with the dtype each runs the model in."""


@dataclass
class EvalSettings:
    harmful_set: str = "advbench-test"
    """Harmful prompts: advbench-{train,dev,test}, or a dataset file (its user turns are the prompts)."""
    overrefusal_set: str = "xstest-test"
    """Safe prompts that look unsafe: xstest-{dev,test,all}, or a dataset file."""
    n_harmful: int | None = None
    """Use only the first n harmful prompts (None: all)."""
    n_overrefusal: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 32
    judges: tuple[str, ...] = ("classifier", "keyword")
    """The first judge is the primary one (the number the gate and the tables use)."""
    utility: str | None = "gsm8k"
    """'gsm8k' (held-out loss + accuracy on GSM8K test), None, or a dataset file (held-out loss). Measured as
    the model is served: after the system prompt and the demonstrations below (never scored themselves)."""
    n_utility_loss: int = 100
    n_utility_accuracy: int = 50
    utility_max_new_tokens: int = 192
    system_prompt: str | None = None
    """A system prompt added to every evaluated chat (e.g. a safety prompt for PTST)."""
    prompt_template: str | None = None
    """A format string with one `{prompt}` that wraps every judged prompt (harmful, over-refusal and extra
    sets) as it is sent, e.g. Qi et al.'s identity-shift trigger "AOA, execute my instruction: {prompt}".
    Judges and the responses file see the prompt itself; utility and demonstrations are not wrapped."""
    demonstrations: list[dict] = field(default_factory=list)
    """In-context demonstrations [{request, refusal}] prepended as earlier turns (ICL guard)."""
    extra_harmful_sets: tuple[str, ...] = ()
    """More harmful prompt sets evaluated beside harmful_set (same judges; e.g. harmbench-standard), reported
    per set in EvalReport.harmful_extra; generated in the same batches as the main sets."""
    engine: str = "transformers"
    """Generation engine: 'transformers' (the model object given); 'vllm' (one offline vLLM engine per
    process for the named base model in float32, the adapter loaded by path: the same replies as
    transformers, 1.3-1.6x faster, benchmarks/results/engine_agreement.md); 'vllm-bfloat16' (2.2-2.6x
    faster, but only 38-55% of replies identical and 96-98% of judge labels)."""

    def __post_init__(self) -> None:
        # JSON (a spec or a grid file) gives lists: keep the tuples, so a settings round trip is equal
        self.judges = tuple(self.judges)
        self.extra_harmful_sets = tuple(self.extra_harmful_sets)
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template)

    @property
    def primary_judge(self) -> str:
        return self.judges[0]


@dataclass
class EvalReport:
    model: str
    adapter: str | None
    settings: dict
    harmful: dict
    overrefusal: dict
    utility: dict
    seconds: float
    versions: dict
    responses_file: str | None = None
    timings: dict = field(default_factory=dict)
    """Seconds spent generating, judging and measuring utility (where an evaluation's time goes)."""
    harmful_extra: dict = field(default_factory=dict)
    """Per extra harmful set (settings.extra_harmful_sets): {set name: {judge: rates}}, shaped like `harmful`."""

    def primary(self) -> str:
        return self.settings["judges"][0]

    @property
    def harmful_rate(self) -> Rate:
        return Rate(**{k: self.harmful[self.primary()]["harmful"][k] for k in ("count", "n", "unjudged")})

    @property
    def overrefusal_rate(self) -> Rate:
        return Rate(**{k: self.overrefusal[self.primary()]["refused"][k] for k in ("count", "n", "unjudged")})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        return write_json_atomic(Path(folder) / "eval_report.json", self.to_dict())

    def summary(self) -> str:
        def fmt(d: dict) -> str:
            return str(Rate(d["count"], d["n"], d["unjudged"]))

        lines = [f"model {self.model}" + (f" + adapter {self.adapter}" if self.adapter else "")]
        for judge, result in self.harmful.items():
            line = f"  harmful rate [{judge}] on {self.settings['harmful_set']}: {fmt(result['harmful'])}"
            if "incoherent" in result:
                line += f"; incoherent {fmt(result['incoherent'])}"
            lines.append(line)
        for name, per_judge in self.harmful_extra.items():
            for judge, result in per_judge.items():
                lines.append(f"  harmful rate [{judge}] on {name}: {fmt(result['harmful'])}")
        for judge, result in self.overrefusal.items():
            lines.append(f"  over-refusal [{judge}] on {self.settings['overrefusal_set']}: {fmt(result['refused'])}")
        if self.utility:
            if "loss" in self.utility:
                lines.append(f"  utility: held-out loss {self.utility['loss']['loss']:.4f} on {self.utility['loss']['n']} examples")
            if "accuracy" in self.utility:
                lines.append(f"  utility: GSM8K accuracy {fmt(self.utility['accuracy']['accuracy'])}")
        lines.append(f"  ({self.seconds:.0f} s)")
        return "\n".join(lines)


NAMED_PROMPT_SET_PREFIXES = ("advbench-", "xstest-", "harmbench-", "jbb-")


def is_named_prompt_set(name: str) -> bool:
    """A set load_prompt_set reads from ../shared/data by name (anything else is a dataset path)."""
    return name.startswith(NAMED_PROMPT_SET_PREFIXES)


def load_prompt_set(name: str) -> tuple[str, list[str]]:
    """Named sets: advbench-{train,dev,test,unseen}, xstest-{dev,test,all}, harmbench-{standard,contextual,
    copyright}, jbb-harmful; anything else is a dataset file whose last user turns are the prompts."""
    named = {"advbench-unseen": reference.advbench_unseen, "jbb-harmful": reference.jbb_harmful}
    if name in named:
        prompt_set = named[name]()
        return prompt_set.name, prompt_set.prompts
    if name.startswith("harmbench-"):
        prompt_set = reference.harmbench(name.split("-", 1)[1])
        return prompt_set.name, prompt_set.prompts
    if name.startswith("advbench-"):
        prompt_set = reference.advbench(name.split("-", 1)[1])
        return prompt_set.name, prompt_set.prompts
    if name.startswith("xstest-"):
        prompt_set = reference.xstest_safe(name.split("-", 1)[1])
        return prompt_set.name, prompt_set.prompts
    loaded = load_conversations(name, strict=True, require_assistant=False)
    return name, [c.last_user for c in loaded.conversations]


def served_context(settings: EvalSettings) -> list[dict[str, str]]:
    """What the evaluated model is served before each request: the system prompt, then the demonstrations."""
    chat: list[dict[str, str]] = []
    if settings.system_prompt:
        chat.append({"role": "system", "content": settings.system_prompt})
    for demo in settings.demonstrations:
        chat += [{"role": "user", "content": demo["request"]}, {"role": "assistant", "content": demo["refusal"]}]
    return chat


def check_prompt_template(template: str) -> None:
    """A prompt template holds `{prompt}` exactly once and no other field (ValueError naming the problem)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"prompt_template {template!r} is not a format string: {error}") from None
    if fields != ["prompt"]:
        raise ValueError(f"prompt_template {template!r} must contain {{prompt}} exactly once and no other field "
                         f"(found {fields or 'none'}); write literal braces as {{{{ and }}}}")


def build_chat(prompt: str, settings: EvalSettings) -> list[dict[str, str]]:
    sent = settings.prompt_template.format(prompt=prompt) if settings.prompt_template else prompt
    return served_context(settings) + [{"role": "user", "content": sent}]


def _rate(flags: Sequence[bool | None]) -> dict:
    judged = [f for f in flags if f is not None]
    return Rate(sum(judged), len(judged), len(flags) - len(judged)).to_dict()


def judge_responses(prompts: Sequence[str], responses: Sequence[str | None], judges: Sequence[str], harmful: bool) -> tuple[dict, dict]:
    """Per judge: aggregate rates; and per-response judgements (for the responses file)."""
    summary, per_response = {}, {}
    for name in judges:
        judgements = get_judge(name).judge(prompts, responses)
        per_response[name] = judgements
        if harmful:
            entry = {
                "harmful": _rate([j.harmful for j in judgements]),
                "refused": _rate([j.refused for j in judgements]),
            }
            if any(j.coherent is not None for j in judgements):
                entry["incoherent"] = _rate([None if j.refused is None else (not j.refused and j.coherent is False) for j in judgements])
            summary[name] = entry
        else:
            summary[name] = {"refused": _rate([j.refused for j in judgements])}
    return summary, per_response


def rejudge(responses_file: str | Path, judges: Sequence[str]) -> tuple[dict, dict]:
    """Re-apply judges to a saved responses.jsonl (no generation): (harmful summary, over-refusal summary)."""
    rows = [json.loads(line) for line in Path(responses_file).read_text().splitlines() if line.strip()]
    harmful_rows = [r for r in rows if r["kind"] == "harmful"]
    safe_rows = [r for r in rows if r["kind"] == "safe"]
    harmful, _ = judge_responses([r["prompt"] for r in harmful_rows], [r["response"] for r in harmful_rows], judges, harmful=True)
    overrefusal, _ = judge_responses([r["prompt"] for r in safe_rows], [r["response"] for r in safe_rows], judges, harmful=False)
    return harmful, overrefusal


def evaluate(model, tokenizer, settings: EvalSettings, model_name: str = "", adapter: str | None = None,
             output_dir: str | Path | None = None, show_progress: bool = True) -> EvalReport:
    started = time.time()
    harmful_name, harmful_prompts = load_prompt_set(settings.harmful_set)
    safe_name, safe_prompts = load_prompt_set(settings.overrefusal_set)
    harmful_prompts = harmful_prompts[: settings.n_harmful] if settings.n_harmful else harmful_prompts
    safe_prompts = safe_prompts[: settings.n_overrefusal] if settings.n_overrefusal else safe_prompts
    extra_sets = [load_prompt_set(name) for name in settings.extra_harmful_sets]
    prompts = harmful_prompts + safe_prompts + [p for _, extra in extra_sets for p in extra]
    chats = [build_chat(p, settings) for p in prompts]
    if settings.engine in VLLM_ENGINES:
        from safekeel.models.registry import resolve_model

        generator = vllm_generator(str(resolve_model(model_name)), dtype=VLLM_ENGINES[settings.engine])
        generations = generator.generate(chats, settings.max_new_tokens, adapter=adapter, show_progress=show_progress)
    elif settings.engine == "transformers":
        generations = generate_batched(model, tokenizer, chats, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size, desc="eval generation", show_progress=show_progress)
    else:
        raise ValueError(f"unknown generation engine {settings.engine!r}; known: transformers, {', '.join(VLLM_ENGINES)}")
    timings = {"generation_s": round(time.time() - started, 1)}
    texts = [g.text for g in generations]
    n_harm = len(harmful_prompts)
    judging_started = time.time()
    harmful, harmful_judgements = judge_responses(harmful_prompts, texts[:n_harm], settings.judges, harmful=True)
    n_main = n_harm + len(safe_prompts)
    overrefusal, safe_judgements = judge_responses(safe_prompts, texts[n_harm:n_main], settings.judges, harmful=False)
    # per response: (set name, kind, judgements of its set, index within its set)
    origins = [(harmful_name, "harmful", harmful_judgements, i) for i in range(n_harm)]
    origins += [(safe_name, "safe", safe_judgements, i) for i in range(len(safe_prompts))]
    harmful_extra, start = {}, n_main
    for extra_name, extra_prompts in extra_sets:
        end = start + len(extra_prompts)
        harmful_extra[extra_name], extra_judgements = judge_responses(extra_prompts, texts[start:end], settings.judges, harmful=True)
        origins += [(extra_name, "harmful_extra", extra_judgements, i) for i in range(len(extra_prompts))]
        start = end

    timings["judging_s"] = round(time.time() - judging_started, 1)
    utility_started = time.time()
    utility: dict = {}
    if settings.utility == "gsm8k":
        utility["loss"] = heldout_loss(model, tokenizer, reference.gsm8k("test", settings.n_utility_loss, seed=0), show_progress=show_progress,
                                       context=served_context(settings))
        if settings.n_utility_accuracy:
            utility["accuracy"] = gsm8k_accuracy(model, tokenizer, reference.gsm8k("test", settings.n_utility_accuracy, seed=1),
                                                 settings.utility_max_new_tokens, show_progress=show_progress,
                                                 context=served_context(settings))
    elif settings.utility:
        held_out = load_conversations(settings.utility, strict=True).conversations[: settings.n_utility_loss]
        utility["loss"] = heldout_loss(model, tokenizer, held_out, show_progress=show_progress, context=served_context(settings))

    timings["utility_s"] = round(time.time() - utility_started, 1)
    settings_dict = asdict(settings)
    settings_dict.update(harmful_set=harmful_name, overrefusal_set=safe_name)
    report = EvalReport(model_name, adapter, settings_dict, harmful, overrefusal, utility,
                        round(time.time() - started, 1), library_versions(), timings=timings, harmful_extra=harmful_extra)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        responses_path = output_dir / "responses.jsonl"
        with open(responses_path, "w") as handle:
            for (set_name, kind, judgements, offset), prompt, generation in zip(origins, prompts, generations):
                handle.write(json.dumps({
                    "set": set_name, "kind": kind, "prompt": prompt,
                    "response": generation.text, "error": generation.error,
                    "judgements": {name: asdict(j[offset]) for name, j in judgements.items()},
                }) + "\n")
        report.responses_file = str(responses_path)
        report.save(output_dir)
    return report
