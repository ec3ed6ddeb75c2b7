"""Command line: one command per job (align-base, finetune, eval, models, validate, ...); `audit`, `monitor`, `data`,
`safety-pairs` and `replica` in their own modules."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from safekeel.cli.audit import audit_command
from safekeel.cli.common import fail as _fail, setup as _setup
from safekeel.cli.data import data_app
from safekeel.cli.monitor import monitor_app
from safekeel.cli.preference import method_spec, safety_pairs_command
from safekeel.cli.replica import replica_command
from safekeel.defaults import DEFAULT_K, DEFAULT_MODE, DEFAULT_MODEL, DEFAULT_POOL, DEFAULT_SELECTOR
from safekeel.eval.gate import DEFAULT_ALPHA, DEFAULT_MARGIN
from safekeel.paths import REPO_ROOT
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import DPO_LEARNING_RATE, DPO_MAX_LENGTH

_SFT = LoraSFTConfig()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="safekeel: safety-preserving fine-tuning and evaluation for small chat models.")




@app.command("models")
def models_command() -> None:
    """List registered base models and whether they are built in the cache."""
    from safekeel.models.registry import cached_model_dir, is_built, known_models

    for name, entry in known_models().items():
        state = f"built at {cached_model_dir(name)}" if is_built(name) else "not built (built on first use)"
        typer.echo(f"{name}: {entry.description} [{state}]")


@app.command("align-base")
def align_base_command(
    rebuild: bool = typer.Option(False, help="Retrain from the seed: lora, the adapter instead of merging the committed one; full, even when built."),
    seed: int = typer.Option(0, help="Seed for data order and adapter init (with --rebuild)."),
    export_adapter: Optional[Path] = typer.Option(None, help="After a rebuild, also write the adapter (fp16) here, e.g. to commit it."),
    variant: str = typer.Option("lora", help="lora: smollm2-135m-safe (the committed LoRA adapter, merged); full: "
                                             "smollm2-135m-safe-full (every weight trained, ~18 min on 2 CPU cores, 517 MB)."),
) -> None:
    """Build an aligned organism from smollm2-135m-instruct and cache it (default: smollm2-135m-safe)."""
    _setup()
    from safekeel.training.align import VARIANTS, align_base, export_adapter_fp16, full_align_config
    from safekeel.training.config import AlignConfig

    if variant not in VARIANTS:
        _fail(f"--variant {variant!r}: known variants are {', '.join(VARIANTS)}")
    if variant == "full" and export_adapter:
        _fail("--export-adapter is for the lora variant (the full variant has no adapter)")
    config = (full_align_config(seed) if variant == "full" else AlignConfig(seed=seed)) if rebuild else None
    target = align_base(rebuild=rebuild, config=config, variant=variant)
    provenance = json.loads((target / "provenance.json").read_text())
    typer.echo(f"{VARIANTS[variant]} ready at {target} ({provenance['how']}, {provenance['seconds']} s)")
    if export_adapter:
        if not (target / "adapter").is_dir():
            _fail("--export-adapter needs --rebuild (there is no freshly trained adapter)")
        export_adapter_fp16(target / "adapter", export_adapter)
        typer.echo(f"adapter exported to {export_adapter}")


@app.command("validate")
def validate_command(path: Path, format: Optional[str] = typer.Option(None, help="chat | prompt_completion | alpaca | question_answer; preference: openai_preference | prompt_chosen_rejected | chosen_rejected (default: detect)")) -> None:
    """Check a dataset file (supervised or preference data): report its format, record count and every problem (file, line, field)."""
    from safekeel.data.formats import DatasetError, load_conversations
    from safekeel.data.preference import PREFERENCE_FORMATS, is_preference_file, load_preferences

    try:
        preference = format in PREFERENCE_FORMATS if format else is_preference_file(path)
        result = load_preferences(path, fmt=format) if preference else load_conversations(path, fmt=format)
    except DatasetError as error:
        _fail(str(error))
    typer.echo(result.summary())
    if result.skipped:
        raise typer.Exit(1)


@app.command("finetune")
def finetune_command(
    data: Path = typer.Argument(..., help="User training data file."),
    out: Path = typer.Option(Path("runs/finetune"), help="Output folder (adapter, provenance, audit, guard, eval, gate)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model: registered name or local model folder."),
    k: int = typer.Option(DEFAULT_K, help="Number of safety examples to select."),
    selector: str = typer.Option(DEFAULT_SELECTOR, help="Selector name (see `safekeel selectors`); why random is the default: safekeel.defaults.DEFAULT_SELECTOR."),
    mode: str = typer.Option(DEFAULT_MODE, help="replay (mix the k examples into training) | backdoor (the same, with a secret system prompt that the evaluation and serving also use, BackdoorAlign) | icl (train on the data alone; the k examples are in-context demonstrations at evaluation and serving) | ptst (train on the data alone, evaluate and serve with a safety system prompt; no selection, k recorded as 0) | none."),
    pool: str = typer.Option(DEFAULT_POOL, help="Safety pool: 'authored', 'safety_tuned_llamas' (../shared/data) or a file."),
    replay_format: str = typer.Option("plain", help="plain | match: rewrite the replayed examples into your data's format (its system prompt, persona, template, turns, length; recorded in selection.json). Mode replay only."),
    seed: int = typer.Option(0, help="Seed for selection, data order and adapter init."),
    max_examples: Optional[int] = typer.Option(None, help="Use only the first n user examples."),
    epochs: float = typer.Option(_SFT.epochs, help="Training epochs."),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate (default {_SFT.learning_rate:g} supervised, 5e-05 dpo)."),
    batch_size: int = typer.Option(_SFT.batch_size, help="Batch size."),
    max_steps: int = typer.Option(_SFT.max_steps, help="Stop after this many steps (smoke tests)."),
    lora_r: int = typer.Option(_SFT.lora_r, help="LoRA rank."),
    max_length: Optional[int] = typer.Option(None, help=f"Max training sequence length in tokens (default {_SFT.max_length} supervised, {DPO_MAX_LENGTH} dpo)."),
    bf16: bool = typer.Option(_SFT.bf16, help="Train with bfloat16 autocast (fast only on CPUs with native bf16, AVX512-BF16/AMX, or a GPU)."),
    audit: bool = typer.Option(True, help="Audit the dataset before selecting (`safekeel audit --help`; audit.json)."),
    data_gate: str = typer.Option("warn", help="What the audit's flags do: off | warn (recorded) | reject (exit code 4 before any training) "
                                               "when more than --max-flagged-fraction of the examples are flagged harmful_request, harmful_answer or persona_override."),
    max_flagged_fraction: float = typer.Option(0.1, min=0.0, max=1.0, help="The data gate's limit."),
    audit_hidden_states: bool = typer.Option(False, help="The audit also measures distances in the base model's own hidden states."),
    shift: str = typer.Option("none", help="Before training: none | drop | downweight the examples the audit flags "
                                           "(and the --shift-fraction nearest a harmful request); shift.json records what went."),
    shift_fraction: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Also shift this share of the data nearest a harmful request."),
    shift_weight: float = typer.Option(0.5, min=0.0, max=1.0, help="downweight: the probability that each target is kept."),
    policy: str = typer.Option("fixed", help="fixed (the given k and mode) | adaptive (k, mode and a safety system prompt "
                                             "from the harm predictor's predicted no-replay increase; policy.json says why)."),
    predictor: Optional[Path] = typer.Option(None, help="A harm predictor file (default: the one shipped, if any)."),
    eval: bool = typer.Option(True, help="Evaluate after training."),
    n_harmful: Optional[int] = typer.Option(None, help="Evaluate on only the first n harmful prompts."),
    n_overrefusal: Optional[int] = typer.Option(None, help="Evaluate on only the first n over-refusal prompts."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per evaluated prompt."),
    utility: str = typer.Option("gsm8k", help="gsm8k | none | a held-out dataset file."),
    n_utility_accuracy: int = typer.Option(50, help="GSM8K questions for accuracy (0: loss only)."),
    harmful_set: str = typer.Option("advbench-test", help="Harmful prompts judged (a named set, see `safekeel eval --help`, or a dataset file)."),
    overrefusal_set: str = typer.Option("xstest-test", help="Safe prompts judged for over-refusal (a named set or a dataset file)."),
    judge: list[str] = typer.Option(["classifier", "keyword"], help="Judges (repeatable); the first decides the gate and the summary."),
    gate: bool = typer.Option(True, help="Gate the adapter: the base model answers the same harmful prompts and the adapter passes only if "
                                         "the upper confidence bound of the harmful-rate increase is within --gate-margin "
                                         "(exit code 3 when it fails; gate.json in OUT)."),
    gate_margin: float = typer.Option(DEFAULT_MARGIN, min=0.0, max=1.0, help="The gate's margin on the paired harmful-rate increase."),
    gate_alpha: float = typer.Option(DEFAULT_ALPHA, min=0.001, max=0.49, help="One-sided error rate of the gate's upper bound."),
    gate_harmful_set: Optional[str] = typer.Option(None, help="The gate's own harmful prompts (default: the evaluation's, reusing its replies)."),
    gate_overrefusal_set: Optional[str] = typer.Option(None, help="The gate's own safe prompts (with --gate-harmful-set)."),
    guard_system_prompt: Optional[str] = typer.Option(None, help="Serve (and evaluate) with a safety system prompt: 'default' for safekeel's, or your own text."),
    guard_demonstrations: str = typer.Option("none", help="Serve (and evaluate) with safety demonstrations: none | static | retrieved | "
                                                          "contrastive (each refusal beside a borderline-safe helpful answer; one cached prefix) | "
                                                          "clustered (--guard-clusters cached prefixes, one per request by nearest cluster). "
                                                          "Mode icl takes static (its default), contrastive or clustered."),
    guard_n_demonstrations: int = typer.Option(3, help="Demonstrations per request (static, contrastive, retrieved; clustered: per prefix, k in mode icl)."),
    guard_clusters: int = typer.Option(6, help="Clustered demonstrations: the number of prefixes (2-16)."),
    guard_paired: bool = typer.Option(False, help="Clustered demonstrations: pair each refusal with a borderline-safe helpful answer."),
    method: str = typer.Option("supervised", help="supervised (LoRA SFT) | dpo (preference pairs in DATA, trl's DPOTrainer; "
                                                 "safety replay as refusal-vs-compliance pairs)."),
    loss_type: list[str] = typer.Option([], help="dpo objective, trl's names (repeat for a weighted sum): sigmoid (DPO) | ipo "
                                                 "| hinge | robust | sigmoid_norm | sft | ... (default sigmoid)."),
    loss_weight: list[float] = typer.Option([], help="One weight per --loss-type (default 1 each)."),
    beta: Optional[float] = typer.Option(None, help="dpo beta; its meaning depends on the objective (default: the "
                                                    "objective's paper's: sigmoid 0.1, ipo tau 0.1, hinge 1.0, robust 0.1)."),
    label_smoothing: Optional[float] = typer.Option(None, help="robust: label-flip rate (default 0.1); exo_pair: epsilon."),
    rejected_model: str = typer.Option("smollm2-135m-instruct", help="dpo: the model whose greedy compliances are the "
                                                                     "safety pairs' rejected side (`safekeel safety-pairs`)."),
) -> None:
    """Fine-tune with LoRA on DATA: audit, select k safety examples, train, evaluate through the guard, gate."""
    _setup()
    from safekeel.data.formats import DatasetError
    from safekeel.eval.harness import EvalSettings
    from safekeel.models.registry import ModelNotFoundError
    from safekeel.paths import safekeel_home
    from safekeel.pipeline import AuditSpec, DataGateSpec, DataRejected, GateSpec, GuardSpec, JobSpec, run_pipeline
    from safekeel.training.config import LoraSFTConfig

    settings = EvalSettings(harmful_set=harmful_set, overrefusal_set=overrefusal_set, judges=tuple(judge),
                            n_harmful=n_harmful, n_overrefusal=n_overrefusal, max_new_tokens=max_new_tokens,
                            utility=None if utility == "none" else utility, n_utility_accuracy=n_utility_accuracy) if eval else None
    system_prompt: bool | str = True if guard_system_prompt == "default" else (guard_system_prompt or False)
    if gate and not eval and gate_harmful_set is None:
        typer.secho("gate skipped: --no-eval and no --gate-harmful-set/--gate-overrefusal-set, so there are no replies to gate",
                    fg=typer.colors.YELLOW, err=True)
        gate = False
    try:
        training_method = method_spec(method, loss_type, loss_weight, beta, label_smoothing, rejected_model)
        lr = lr if lr is not None else DPO_LEARNING_RATE if method == "dpo" else _SFT.learning_rate
        max_length = max_length if max_length is not None else DPO_MAX_LENGTH if method == "dpo" else _SFT.max_length
        spec = JobSpec(str(data), str(out), model=model, k=k, selector=selector, mode=mode, pool=pool, seed=seed, method=training_method,
                       max_examples=max_examples, eval=settings, replay_format=replay_format,
                       audit=AuditSpec(enabled=audit, hidden_states=audit_hidden_states, shift=shift,
                                       shift_fraction=shift_fraction, shift_weight=shift_weight, policy=policy,
                                       predictor=str(predictor) if predictor else None),
                       data_gate=DataGateSpec(action=data_gate, max_flagged_fraction=max_flagged_fraction),
                       sft=LoraSFTConfig(epochs=epochs, learning_rate=lr, batch_size=batch_size, max_steps=max_steps,
                                         lora_r=lora_r, lora_alpha=2 * lora_r, max_length=max_length, bf16=bf16),
                       gate=GateSpec(enabled=gate, harmful_set=gate_harmful_set, overrefusal_set=gate_overrefusal_set,
                                     margin=gate_margin, alpha=gate_alpha, judges=tuple(judge), max_new_tokens=max_new_tokens),
                       guard=GuardSpec(system_prompt=system_prompt, demonstrations=guard_demonstrations,
                                       n_demonstrations=guard_n_demonstrations, n_clusters=guard_clusters, paired=guard_paired))
        result = run_pipeline(spec, baseline_cache=safekeel_home() / "gate_baselines")
    except DataRejected as rejected:
        typer.secho(f"data gate REJECTED the dataset: {rejected.decision['reason']} (audit.json lists the flagged examples)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(4)
    except (DatasetError, ModelNotFoundError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(f"\nadapter: {result.adapter_dir}\nprovenance: {out / 'provenance.json'}")
    if result.audit:
        typer.echo(f"audit: {result.audit.get('gated_fraction', 0):.1%} of the examples flagged harmful_request, harmful_answer or persona_override "
                   f"({json.dumps(result.audit.get('flag_counts') or {})}; audit.json)")
    if result.audit and result.audit.get("prediction", {}).get("available"):
        from safekeel.audit.predict import describe_prediction  # beside the job's other lazy imports

        typer.echo(describe_prediction(result.audit["prediction"]))
    for name in ("shift", "policy"):
        if (out / f"{name}.json").is_file():
            typer.echo(f"{name}: {json.loads((out / f'{name}.json').read_text())['reason']}")
    if result.data_gate and result.data_gate["over_limit"]:
        typer.secho(f"data gate WARNING: {result.data_gate['reason']}", fg=typer.colors.YELLOW, err=True)
    if result.selection:
        typer.echo(f"selected ({result.selection['selector']}, k={result.selection['k']}): {', '.join(result.selection['ids'])}")
    typer.echo(f"trained {result.provenance['train']['steps']} steps in {result.provenance['train']['seconds']} s")
    if result.guard.active:
        typer.echo(f"guard: {json.dumps({k: v for k, v in result.guard.to_dict().items() if k not in ('static_demonstrations', 'clusters')})}")
    if result.report:
        typer.echo(result.report.summary())
    if result.gate is not None:
        decision, paired = result.gate, result.gate["paired"]
        if paired:
            typer.echo(f"gate [{decision['judge']}]: harmful {paired['first_rate']:.3f} vs base {paired['second_rate']:.3f} on the same "
                       f"{decision['n_pairs']} prompts; {1 - gate_alpha:.0%} upper bound of the increase {paired['high']:+.3f} "
                       f"(margin {gate_margin:.2f})")
        if not decision["passed"]:
            typer.secho("gate FAILED: " + "; ".join(decision["reasons"]), fg=typer.colors.RED, err=True)
            raise typer.Exit(3)
        typer.echo("gate passed")


@app.command("select")
def select_command(
    data: Path = typer.Argument(..., help="User training data file (any format `safekeel validate` accepts)."),
    k: int = typer.Option(10, help="Number of safety examples to select."),
    selector: str = typer.Option(DEFAULT_SELECTOR, help="Selector name (see `safekeel selectors`)."),
    pool: str = typer.Option("authored", help="Safety pool: 'authored', 'safety_tuned_llamas' (../shared/data) or a file."),
    seed: int = typer.Option(0, help="Selection seed."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model the model-aware selectors (and *_hidden) look at."),
    max_examples: Optional[int] = typer.Option(None, min=1, help="Use only the first n user examples."),
    out: Optional[Path] = typer.Option(None, help="Write the selection record (ids, scores, rationale, provenance) as JSON."),
    examples_out: Optional[Path] = typer.Option(None, help="Write the selected examples as chat JSONL, ready to mix into your own training data."),
    replay_format: str = typer.Option("plain", help="plain | match: the examples written by --examples-out are rewritten into DATA's format (system prompt, persona, template, turns, length); what changed goes into the record."),
    store: Optional[Path] = typer.Option(None, help="Keep selectors' k-independent results here, so a later call (another k) reuses them."),
) -> None:
    """Select k safety examples from a pool for DATA, without training: prints them, and writes the selection
    record and the examples on request."""
    _setup()
    from safekeel.data.formats import DatasetError, load_conversations
    from safekeel.models.registry import ModelNotFoundError
    from safekeel.provenance import library_versions, sha256_file, write_json_atomic
    from safekeel.selectors.format_match import REPLAY_FORMATS, match_format
    from safekeel.selectors.select import select_safety

    try:
        if replay_format not in REPLAY_FORMATS:
            raise ValueError(f"unknown --replay-format {replay_format!r}; known: {', '.join(REPLAY_FORMATS)}")
        loaded = load_conversations(str(data))
        if loaded.skipped:
            typer.echo(loaded.summary(), err=True)
        user_data = loaded.conversations[:max_examples] if max_examples else loaded.conversations
        if not user_data:
            raise ValueError(f"{data}: no usable examples")
        record, examples = select_safety(user_data, pool, k, selector, seed, model, store=str(store) if store else None)
        conversations = [e.to_conversation() for e in examples]
        if replay_format == "match":
            conversations, record["replay_format"] = match_format(examples, user_data, seed)
    except (DatasetError, ModelNotFoundError, ValueError, OSError) as error:  # OSError: a hub id that cannot load offline
        _fail(str(error))
    record.update({"data": str(data), "data_sha256": sha256_file(data), "n_user_examples": len(user_data),
                   "versions": library_versions()})
    id_width = max(len(e["id"]) for e in record["examples"])
    category_width = max(len(e["category"]) for e in record["examples"])
    for example, score in zip(record["examples"], record["scores"]):
        request = example["request"].replace("\n", " ")
        typer.echo(f"{example['id']:<{id_width}}  {example['category']:<{category_width}}  {score:>10.4g}  {request[:70]}")
    typer.echo(f"{record['selector']} chose {len(examples)} of {record['pool_size']} ({record['pool']}) in {record['seconds']} s: "
               f"{record['rationale']}")
    if out is not None:
        write_json_atomic(out, record)
        typer.echo(f"selection: {out}")
    if examples_out is not None:
        examples_out.parent.mkdir(parents=True, exist_ok=True)
        examples_out.write_text("".join(json.dumps({"messages": c.to_messages()}, ensure_ascii=False) + "\n"
                                        for c in conversations), encoding="utf-8")
        typer.echo(f"examples: {examples_out}")


@app.command("rejudge")
def rejudge_command(
    targets: list[str] = typer.Argument(..., help="Grid names (benchmarks/results/bench_runs/<grid>), run records (.json) or replies files (.jsonl.gz)."),
    judge: str = typer.Option(..., help="The judge to apply (see `safekeel judges`)."),
    results_dir: Optional[Path] = typer.Option(None, help="Benchmark results folder (default: benchmarks/results of this checkout)."),
    out: Optional[Path] = typer.Option(None, help="Write the rejudged run records to OUT/bench_runs/<grid>/."),
) -> None:
    """Judge kept replies again (no generation): per run, the judge's harmful, refusal, incoherent and hollow rates and
    over-refusal, and whether they reproduce the rates the record holds for that judge."""
    _setup()
    from safekeel.bench.cli import RESULTS_DIR
    from safekeel.eval.judges import known_judges
    from safekeel.eval.rejudge import rejudge_table

    if judge not in known_judges():
        _fail(f"unknown judge {judge!r}; known: {', '.join(known_judges())}")
    try:
        table, results = rejudge_table(targets, judge, results_dir or RESULTS_DIR, out)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    typer.echo(table)
    checked = [r for r in results if r["reproduces"] is not None]
    if checked:
        typer.echo(f"\n{sum(r['reproduces'] for r in checked)}/{len(checked)} runs reproduce the rates their records hold for {judge}")
        if not all(r["reproduces"] for r in checked):
            raise typer.Exit(1)


@app.command("judges")
def judges_command() -> None:
    """The registered judges."""
    from safekeel.eval.judges import known_judges

    for name in known_judges():
        typer.echo(name)


@app.command("eval")
def eval_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Model: registered name, local folder or hub id."),
    adapter: Optional[Path] = typer.Option(None, help="A LoRA adapter folder to apply."),
    out: Path = typer.Option(Path("runs/eval"), help="Output folder (eval_report.json, responses.jsonl)."),
    harmful_set: str = typer.Option("advbench-test", help="advbench-{train,dev,test,unseen}, harmbench-{standard,contextual,copyright}, jbb-harmful or a dataset file."),
    overrefusal_set: str = typer.Option("xstest-test", help="xstest-{dev,test,all} or a dataset file."),
    extra_harmful_set: list[str] = typer.Option([], help="More harmful sets judged beside --harmful-set, each reported apart (repeatable)."),
    n_harmful: Optional[int] = typer.Option(None, help="Only the first n harmful prompts."),
    n_overrefusal: Optional[int] = typer.Option(None, help="Only the first n over-refusal prompts."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt (greedy)."),
    batch_size: int = typer.Option(32, help="Prompts per generation batch."),
    utility: str = typer.Option("gsm8k", help="gsm8k | none | a held-out dataset file."),
    n_utility_accuracy: int = typer.Option(50, help="GSM8K questions for accuracy (0: loss only)."),
    system_prompt: Optional[str] = typer.Option(None, help="System prompt for every evaluated chat."),
) -> None:
    """Evaluate harmful rate (classifier + keyword judges, coherence), over-refusal and utility."""
    _setup()
    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import ModelNotFoundError, load_model_and_tokenizer

    settings = EvalSettings(harmful_set=harmful_set, overrefusal_set=overrefusal_set, n_harmful=n_harmful,
                            n_overrefusal=n_overrefusal, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            utility=None if utility == "none" else utility, n_utility_accuracy=n_utility_accuracy,
                            system_prompt=system_prompt, extra_harmful_sets=tuple(extra_harmful_set))
    try:
        loaded, tokenizer = load_model_and_tokenizer(model)
        if adapter:
            from peft import PeftModel

            if not (adapter / "adapter_config.json").is_file():
                _fail(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
            loaded = PeftModel.from_pretrained(loaded, str(adapter))
        report = evaluate(loaded, tokenizer, settings, model_name=model, adapter=str(adapter) if adapter else None, output_dir=out)
    except (ModelNotFoundError, FileNotFoundError, ValueError) as error:
        _fail(str(error))
    typer.echo(report.summary())
    typer.echo(f"report: {out / 'eval_report.json'}")


@app.command("bench")
def bench_command(
    grid: Optional[str] = typer.Option(None, help="Grid: a preset (quick, selectors, modes, identity, full, selection_v2, selection_v2_k10, preference) or a grid file (.json, .yaml)."),
    quick: bool = typer.Option(False, "--quick", help="The quick preset (20 min on 2 CPU cores with smollm2-135m-safe, measured)."),
    commit: bool = typer.Option(False, help="git-commit each finished run record and the updated summary."),
    commit_every: int = typer.Option(1, metavar="N", help="With --commit: one commit per N finished runs (default 1: a commit per run); an interrupted batch is committed at the next start."),
    render_only: bool = typer.Option(False, help="Only re-analyse the runs in bench_<grid>.json and re-render the markdown and plots (no run is executed)."),
    results_dir: Optional[Path] = typer.Option(None, help="Results folder (default: benchmarks/results)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Adapters and responses (default: benchmarks/cache/bench)."),
    executor: str = typer.Option("local", help="local (runs one after another here) or ray (the runs as Ray tasks on a cluster; the cache dir must be on storage every node sees)."),
    ray_address: Optional[str] = typer.Option(None, envvar="SAFEKEEL_RAY_ADDRESS", help="With --executor ray: the cluster (default: RAY_ADDRESS or a cluster started here with `ray start`)."),
    ray_cpus_per_run: float = typer.Option(1.0, help="With --executor ray: CPUs each run asks for (its torch threads)."),
) -> None:
    """Benchmark selectors against random selection: a grid of fine-tuning runs paired by training seed,
    cached and resumable; writes bench_<grid>.json/.md and plots (the `selectors` preset: selectors.*)."""
    if quick == bool(grid):
        _fail("give exactly one of --quick and --grid")
    _setup()
    from safekeel.bench.cli import CACHE_DIR, RESULTS_DIR, main_command
    from safekeel.bench.runner import RunsFailed

    try:
        markdown = main_command("quick" if quick else grid, results_dir or RESULTS_DIR, cache_dir or CACHE_DIR, commit=commit,
                                render_only=render_only, command="safekeel bench " + " ".join(sys.argv[2:]),
                                commit_every=commit_every, executor=executor, ray_address=ray_address, ray_cpus_per_run=ray_cpus_per_run)
    except (FileNotFoundError, ValueError, RunsFailed) as error:
        _fail(str(error))
    typer.echo(markdown.read_text())


@app.command("selectors")
def selectors_command() -> None:
    """List the registered selectors."""
    from safekeel.selectors import get_selector, known_selectors

    for name in known_selectors():
        doc = (type(get_selector(name)).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name}: {doc}")
    typer.echo("\nwith any selector, --replay-format (finetune, select; safety.replay_format in the API): plain (the examples "
               "as they are) | match (rewritten into the user data's system prompt, persona, template, turns and length)")
    from safekeel.guard import DEMONSTRATION_HELP

    typer.echo("\nguard demonstrations (finetune --guard-demonstrations; safety.guard.demonstrations in the API; icl_guards in a "
               "bench grid):\n" + "\n".join(f"  {name}: {text}" for name, text in DEMONSTRATION_HELP.items()))


@app.command("build-judge")
def build_judge_command(
    output: Optional[Path] = typer.Option(None, help="Where to write the classifier (default: the packaged asset)."),
) -> None:
    """Rebuild the refusal classifier used by the `classifier` judge from the authored data."""
    _setup()
    from safekeel.eval.judges.build import build_classifier

    stats = build_classifier(output=output)
    typer.echo(json.dumps(stats, indent=2))


@app.command("serve")
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    model: Optional[str] = typer.Option(None, help="Base model to serve and fine-tune (default: $SAFEKEEL_BASE_MODELS or smollm2-135m-safe)."),
    engine: Optional[str] = typer.Option(None, help="Serving engine: vllm (default) or transformers."),
    workers: int = typer.Option(1, help="Worker processes that run fine-tuning jobs (0: run `safekeel worker` yourself); with SAFEKEEL_EXECUTOR=ray, the jobs run at once on the Ray cluster."),
    service_dir: Optional[Path] = typer.Option(None, help="Database, files and jobs folder (default: $SAFEKEEL_HOME/service)."),
) -> None:
    """Start the OpenAI-compatible API (files, fine-tuning jobs, models, chat) with job workers.

    API keys come from SAFEKEEL_API_KEYS ("tenant:key,..."; default one local key, sk-safekeel-local)."""
    logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from safekeel.service.app import create_app
    from safekeel.service.settings import ServiceSettings

    overrides = {}
    if model:
        overrides["base_models"] = [model]
    if engine:
        overrides["engine"] = engine
    if service_dir:
        overrides["service_dir"] = service_dir
    try:
        settings = ServiceSettings(**overrides)
        settings.tenants_by_key()
    except ValueError as error:
        _fail(str(error))
    from safekeel.models.registry import ModelNotFoundError, resolve_model

    try:
        resolve_model(settings.base_models[0])
    except ModelNotFoundError as error:
        _fail(str(error))
    engine = f"{len(settings.replicas)} replica(s)" if settings.replicas else settings.engine
    typer.echo(f"safekeel serving {settings.base_models[0]} with {engine} on http://{host}:{port}/v1 "
               f"(state in {settings.root}, {workers} worker(s))")
    uvicorn.run(create_app(settings, start_engine=True, start_workers=workers), host=host, port=port, log_level="info")


@app.command("demo")
def demo_command(
    data: Path = typer.Option(REPO_ROOT / "examples" / "spokes_support.jsonl", help="Training data to upload."),
    k: int = typer.Option(10, help="Safety examples replayed."),
    epochs: int = typer.Option(2, help="Training epochs."),
    engine: str = typer.Option("vllm", help="Serving engine of the demo server."),
    n_harmful: Optional[int] = typer.Option(None, help="Gate on only the first n HarmBench standard prompts (default: all 200)."),
) -> None:
    """The main job: start the service, upload the sample dataset, fine-tune with safety replay behind the
    safety gate, print the before/after safety report, and chat with the result (needs the gate's public prompt
    sets: `safekeel data status`)."""
    from safekeel.eval.harness import prompt_set
    from safekeel.service.demo import run_demo

    try:  # the gate's prompts, before a server starts: a missing set says which command or folder provides it
        for name in ("harmbench-standard", "xstest-dev"):
            prompt_set(name)
    except FileNotFoundError as error:
        _fail(str(error))
    summary = run_demo(data=data, k=k, epochs=epochs, engine=engine, n_harmful=n_harmful, echo=typer.echo)
    if summary.get("status") != "succeeded" and not summary.get("blocked_by_gate"):
        raise typer.Exit(1)  # a gate decision, either way, is the job done; anything else failed


@app.command("worker")
def worker_command() -> None:
    """Run a fine-tuning job worker against the service database (same settings as `serve`)."""
    from safekeel.service.worker import main as worker_main

    worker_main()


app.command("audit")(audit_command)
app.add_typer(monitor_app, name="monitor")
app.command("safety-pairs")(safety_pairs_command)
app.command("replica")(replica_command)
app.add_typer(data_app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
