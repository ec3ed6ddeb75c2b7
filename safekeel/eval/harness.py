"""`safekeel eval`: harmful rate (two judges + coherence), over-refusal, utility; an EvalReport."""

from __future__ import annotations

import json
import string
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from safekeel.data import prompt_sets, reference
from safekeel.data.formats import load_conversations
from safekeel.guard import PREFIX_MODES, Guard, assemble, per_request, per_request_guard
from safekeel.eval.judges import get_judge
from safekeel.eval.replies import read_replies
from safekeel.eval.stats import Rate
from safekeel.eval.utility import gsm8k_accuracy, heldout_loss
from safekeel.models.engines import TransformersEngine, vllm_offline_engine
from safekeel.models.registry import resolve_model
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
    retrieval: dict | None = None
    """A retrieving guard ({"pool", "n"}; or a clustered guard's {"clustered": ...}): each prompt gets its own
    demonstrations, as the served model does (safekeel.guard.per_request). Set by `guarded`, not by hand."""
    extra_harmful_sets: tuple[str, ...] = ()
    """More harmful prompt sets evaluated beside harmful_set (same judges; e.g. harmbench-standard), reported
    per set in EvalReport.harmful_extra; generated in the same batches as the main sets."""
    extra_overrefusal_sets: tuple[str, ...] = ()
    """More safe prompt sets judged for over-refusal beside overrefusal_set (e.g. orbench-hard-test@100),
    reported per set in EvalReport.overrefusal_extra."""
    engine: str = "transformers"
    """Generation engine: 'transformers' (the model object given); 'vllm' (one offline vLLM engine per
    process for the named base model in float32, the adapter loaded by path: the same replies as
    transformers, 1.3-1.6x faster, benchmarks/results/engine_agreement.md); 'vllm-bfloat16' (2.2-2.6x
    faster, but only 38-55% of replies identical and 96-98% of judge labels)."""

    def __post_init__(self) -> None:
        # JSON (a spec or a grid file) gives lists: keep the tuples, so a settings round trip is equal
        self.judges = tuple(self.judges)
        self.extra_harmful_sets = tuple(self.extra_harmful_sets)
        self.extra_overrefusal_sets = tuple(self.extra_overrefusal_sets)
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
    overrefusal_extra: dict = field(default_factory=dict)
    """Per extra safe set (settings.extra_overrefusal_sets): {set name: {judge: rates}}, shaped like `overrefusal`."""

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
        for name, per_judge in self.overrefusal_extra.items():
            for judge, result in per_judge.items():
                lines.append(f"  over-refusal [{judge}] on {name}: {fmt(result['refused'])}")
        if self.utility:
            if "loss" in self.utility:
                lines.append(f"  utility: held-out loss {self.utility['loss']['loss']:.4f} on {self.utility['loss']['n']} examples")
            if "accuracy" in self.utility:
                lines.append(f"  utility: GSM8K accuracy {fmt(self.utility['accuracy']['accuracy'])}")
        lines.append(f"  ({self.seconds:.0f} s)")
        return "\n".join(lines)


NAMED_PROMPT_SET_PREFIXES = prompt_sets.NAMED_PREFIXES


def is_named_prompt_set(name: str) -> bool:
    """A name that claims a named set (safekeel.data.prompt_sets; anything else is a dataset path)."""
    return prompt_sets.has_named_prefix(name)


def prompt_set(name: str) -> reference.PromptSet:
    """A named set of the prompt-set registry (safekeel.data.prompt_sets: advbench-*, xstest-*, harmbench-*,
    jbb-harmful, orbench-*, gptfuzz-questions; NAME@N a seeded sample), or a dataset file whose last user
    turns are the prompts."""
    return prompt_sets.load(name)


def load_prompt_set(name: str) -> tuple[str, list[str]]:
    """(set name, prompts) of a named set or a dataset file (see prompt_set)."""
    found = prompt_set(name)
    return found.name, found.prompts


def guarded(settings: EvalSettings, guard: Guard) -> EvalSettings:
    """The settings that ask every prompt through `guard`, exactly as the served model gets it (safekeel.guard):
    its system prompt before the settings' own, its static demonstrations, or its retrieval per prompt."""
    return replace(settings, system_prompt=guard.system_text(settings.system_prompt),
                   demonstrations=list(guard.static_demonstrations) if guard.demonstrations in PREFIX_MODES else [],
                   retrieval=per_request(guard))


def served_context(settings: EvalSettings) -> list[dict[str, str]]:
    """What the evaluated model is served before each request: the system prompt, then the static demonstrations
    (safekeel.guard.assemble, the layout the service serves)."""
    return assemble(settings.system_prompt, settings.demonstrations, [])


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
    demonstrations = settings.demonstrations
    if settings.retrieval:
        demonstrations = per_request_guard(settings.retrieval).demonstrations_for(sent)
    return assemble(settings.system_prompt, demonstrations, [{"role": "user", "content": sent}])


def _rate(flags: Sequence[bool | None]) -> dict:
    judged = [f for f in flags if f is not None]
    return Rate(sum(judged), len(judged), len(flags) - len(judged)).to_dict()


def judge_responses(prompts: Sequence[str], responses: Sequence[str | None], judges: Sequence[str], harmful: bool,
                    cache=None) -> tuple[dict, dict]:
    """Per judge: aggregate rates; and per-response judgements (for the responses file). `cache`: a
    judges.cache.JudgementCache, whose stored verdicts stand in for judging a pair again."""
    summary, per_response = {}, {}
    for name in judges:
        judge = get_judge(name)
        judgements = cache.judge(judge, prompts, responses) if cache is not None else judge.judge(prompts, responses)
        per_response[name] = judgements
        if harmful:
            entry = {
                "harmful": _rate([j.harmful for j in judgements]),
                "refused": _rate([j.refused for j in judgements]),
            }
            if any(j.coherent is not None for j in judgements):
                entry["incoherent"] = _rate([None if j.refused is None else (not j.refused and j.coherent is False) for j in judgements])
            if any(j.hollow is not None for j in judgements):
                entry["hollow"] = _rate([None if j.refused is None else j.hollow for j in judgements])
            summary[name] = entry
        else:
            summary[name] = {"refused": _rate([j.refused for j in judgements])}
    return summary, per_response


def rejudge(responses_file: str | Path, judges: Sequence[str]) -> tuple[dict, dict]:
    """Re-apply judges to a saved responses.jsonl or replies .jsonl.gz (no generation): (harmful summary,
    over-refusal summary). rejudge_rows gives the extra sets too."""
    summaries = rejudge_rows(read_replies(responses_file), judges)
    return summaries["harmful"], summaries["safe"]


def rejudge_rows(rows: Sequence[dict], judges: Sequence[str], cache=None) -> dict:
    """Judge kept replies again: {"harmful", "safe": summaries; "harmful_extra", "safe_extra": {set: summary}}."""
    sets: dict[tuple[str, str], JudgedSet] = {}
    responses: dict[tuple[str, str], list] = {}
    for row in rows:
        key = (row["kind"], row.get("set", row["kind"]))
        judged = sets.setdefault(key, JudgedSet(key[1], key[0], [], []))
        judged.prompts.append(row["prompt"])
        judged.ids.append(row.get("id", ""))
        responses.setdefault(key, []).append(row["response"])
    ordered = list(sets)
    summaries, _ = judge_sets([sets[k] for k in ordered], [r for k in ordered for r in responses[k]], judges, cache=cache)
    return summaries


@dataclass
class JudgedSet:
    """One prompt set of an evaluation: its name, kind (harmful | safe | harmful_extra | safe_extra), prompts, ids."""
    name: str
    kind: str
    prompts: list[str]
    ids: list[str]

    @property
    def harmful(self) -> bool:
        return self.kind.startswith("harmful")


def evaluation_sets(settings: EvalSettings) -> list[JudgedSet]:
    """The prompt sets an evaluation generates for, in generation order: harmful, safe, then the extras."""
    def loaded(name: str, kind: str, n: int | None = None) -> JudgedSet:
        found = prompt_set(name)
        prompts, ids = (found.prompts[:n], found.ids[:n]) if n else (found.prompts, found.ids)
        return JudgedSet(found.name, kind, prompts, ids)

    return ([loaded(settings.harmful_set, "harmful", settings.n_harmful), loaded(settings.overrefusal_set, "safe", settings.n_overrefusal)]
            + [loaded(name, "harmful_extra") for name in settings.extra_harmful_sets]
            + [loaded(name, "safe_extra") for name in settings.extra_overrefusal_sets])


def judge_sets(sets: Sequence[JudgedSet], responses: Sequence[str | None], judges: Sequence[str],
               cache=None) -> tuple[dict, list[dict]]:
    """Judge every set's responses (given in the order of `sets`): ({kind: summary or {set: summary}}, one
    row per response with its set, kind, prompt id, prompt and each judge's judgement)."""
    summaries: dict = {"harmful": {}, "safe": {}, "harmful_extra": {}, "safe_extra": {}}
    rows: list[dict] = []
    start = 0
    for judged in sets:
        end = start + len(judged.prompts)
        summary, per_response = judge_responses(judged.prompts, responses[start:end], judges, harmful=judged.harmful,
                                                 cache=cache)
        if judged.kind in ("harmful", "safe"):
            summaries[judged.kind] = summary
        else:
            summaries[judged.kind][judged.name] = summary
        for i, (prompt_id, prompt) in enumerate(zip(judged.ids, judged.prompts)):
            rows.append({"set": judged.name, "kind": judged.kind, "id": prompt_id, "prompt": prompt,
                         "response": responses[start + i],
                         "judgements": {name: asdict(j[i]) for name, j in per_response.items()}})
        start = end
    return summaries, rows


def evaluate(model, tokenizer, settings: EvalSettings, model_name: str = "", adapter: str | None = None,
             output_dir: str | Path | None = None, show_progress: bool = True) -> EvalReport:
    started = time.time()
    sets = evaluation_sets(settings)
    prompts = [p for judged in sets for p in judged.prompts]
    chats = [build_chat(p, settings) for p in prompts]
    if settings.engine in VLLM_ENGINES:  # one offline engine per base model, the adapter loaded by path
        engine, loaded = vllm_offline_engine(str(resolve_model(model_name)), dtype=VLLM_ENGINES[settings.engine]), adapter
    elif settings.engine == "transformers":  # the model object given, its adapter (if any) already applied
        engine, loaded = TransformersEngine.for_model(model, tokenizer), None
    else:
        raise ValueError(f"unknown generation engine {settings.engine!r}; known: transformers, {', '.join(VLLM_ENGINES)}")
    generations = engine.generate_batch(chats, settings.max_new_tokens, adapter=loaded, batch_size=settings.batch_size,
                                        desc="eval generation", show_progress=show_progress)
    timings = {"generation_s": round(time.time() - started, 1)}
    judging_started = time.time()
    summaries, rows = judge_sets(sets, [g.text for g in generations], settings.judges)
    for row, generation in zip(rows, generations):
        row["error"] = generation.error
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
    settings_dict.update(harmful_set=sets[0].name, overrefusal_set=sets[1].name)
    report = EvalReport(model_name, adapter, settings_dict, summaries["harmful"], summaries["safe"], utility,
                        round(time.time() - started, 1), library_versions(), timings=timings,
                        harmful_extra=summaries["harmful_extra"], overrefusal_extra=summaries["safe_extra"])
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        responses_path = output_dir / "responses.jsonl"
        with open(responses_path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        report.responses_file = str(responses_path)
        report.save(output_dir)
    return report
