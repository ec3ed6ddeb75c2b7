"""Command line: one command per job (align-base, finetune, eval, models, validate, ...)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="safekeel: safety-preserving fine-tuning and evaluation for small chat models.")


def _setup(threads: int | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("models")
def models_command() -> None:
    """List registered base models and whether they are built in the cache."""
    from safekeel.models.registry import cached_model_dir, is_built, known_models

    for name, entry in known_models().items():
        state = f"built at {cached_model_dir(name)}" if is_built(name) else "not built (built on first use)"
        typer.echo(f"{name}: {entry.description} [{state}]")


@app.command("align-base")
def align_base_command(
    rebuild: bool = typer.Option(False, help="Retrain the alignment adapter from the seed instead of merging the committed one."),
    seed: int = typer.Option(0, help="Seed for data order and adapter init (with --rebuild)."),
    export_adapter: Optional[Path] = typer.Option(None, help="After a rebuild, also write the adapter (fp16) here, e.g. to commit it."),
) -> None:
    """Build the aligned organism smollm2-135m-safe from smollm2-135m-instruct and cache it."""
    _setup()
    from safekeel.training.align import align_base, export_adapter_fp16
    from safekeel.training.config import AlignConfig

    target = align_base(rebuild=rebuild, config=AlignConfig(seed=seed) if rebuild else None)
    provenance = json.loads((target / "provenance.json").read_text())
    typer.echo(f"smollm2-135m-safe ready at {target} ({provenance['how']}, {provenance['seconds']} s)")
    if export_adapter:
        if not (target / "adapter").is_dir():
            _fail("--export-adapter needs --rebuild (there is no freshly trained adapter)")
        export_adapter_fp16(target / "adapter", export_adapter)
        typer.echo(f"adapter exported to {export_adapter}")


@app.command("validate")
def validate_command(path: Path, format: Optional[str] = typer.Option(None, help="chat | prompt_completion | alpaca | question_answer (default: detect)")) -> None:
    """Check a dataset file: report its format, record count and every problem (file, line, field)."""
    from safekeel.data.formats import DatasetError, load_conversations

    try:
        result = load_conversations(path, fmt=format)
    except DatasetError as error:
        _fail(str(error))
    typer.echo(result.summary())
    if result.skipped:
        raise typer.Exit(1)


@app.command("finetune")
def finetune_command(
    data: Path = typer.Argument(..., help="User training data file."),
    out: Path = typer.Option(Path("runs/finetune"), help="Output folder (adapter, provenance, eval report)."),
    model: str = typer.Option("smollm2-135m-safe", help="Base model: registered name, local folder or hub id."),
    k: int = typer.Option(10, help="Number of safety examples to select."),
    selector: str = typer.Option("random", help="Selector name (see `safekeel selectors`)."),
    mode: str = typer.Option("replay", help="replay (mix the k examples into training) | backdoor (the same, with a secret system prompt that the evaluation and serving also use, BackdoorAlign) | none."),
    pool: str = typer.Option("authored", help="Safety pool: 'authored' or a file."),
    seed: int = typer.Option(0, help="Seed for selection, data order and adapter init."),
    max_examples: Optional[int] = typer.Option(None, help="Use only the first n user examples."),
    epochs: float = typer.Option(3.0, help="Training epochs."),
    lr: float = typer.Option(2e-4, help="Learning rate."),
    batch_size: int = typer.Option(4, help="Batch size."),
    max_steps: int = typer.Option(-1, help="Stop after this many steps (smoke tests)."),
    lora_r: int = typer.Option(16, help="LoRA rank."),
    max_length: int = typer.Option(256, help="Max training sequence length in tokens."),
    eval: bool = typer.Option(True, help="Evaluate after training."),
    n_harmful: Optional[int] = typer.Option(None, help="Evaluate on only the first n harmful prompts."),
    n_overrefusal: Optional[int] = typer.Option(None, help="Evaluate on only the first n over-refusal prompts."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per evaluated prompt."),
    utility: str = typer.Option("gsm8k", help="gsm8k | none | a held-out dataset file."),
    n_utility_accuracy: int = typer.Option(50, help="GSM8K questions for accuracy (0: loss only)."),
) -> None:
    """Fine-tune with LoRA on DATA, replaying k selected safety examples; write adapter, provenance and eval."""
    _setup()
    from safekeel.data.formats import DatasetError
    from safekeel.eval.harness import EvalSettings
    from safekeel.models.registry import ModelNotFoundError
    from safekeel.training.config import LoraSFTConfig
    from safekeel.training.finetune import FinetuneSpec, run_finetune

    settings = EvalSettings(n_harmful=n_harmful, n_overrefusal=n_overrefusal, max_new_tokens=max_new_tokens,
                            utility=None if utility == "none" else utility, n_utility_accuracy=n_utility_accuracy) if eval else None
    try:
        spec = FinetuneSpec(str(data), str(out), model=model, k=k, selector=selector, mode=mode, pool=pool, seed=seed,
                            max_examples=max_examples, eval=settings,
                            sft=LoraSFTConfig(epochs=epochs, learning_rate=lr, batch_size=batch_size, max_steps=max_steps,
                                              lora_r=lora_r, lora_alpha=2 * lora_r, max_length=max_length))
        result = run_finetune(spec)
    except (DatasetError, ModelNotFoundError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(f"\nadapter: {result.adapter_dir}\nprovenance: {out / 'provenance.json'}")
    if result.selection:
        typer.echo(f"selected ({result.selection['selector']}, k={result.selection['k']}): {', '.join(result.selection['ids'])}")
    typer.echo(f"trained {result.provenance['train']['steps']} steps in {result.provenance['train']['seconds']} s")
    if result.report:
        typer.echo(result.report.summary())


@app.command("eval")
def eval_command(
    model: str = typer.Option("smollm2-135m-safe", help="Model: registered name, local folder or hub id."),
    adapter: Optional[Path] = typer.Option(None, help="A LoRA adapter folder to apply."),
    out: Path = typer.Option(Path("runs/eval"), help="Output folder (eval_report.json, responses.jsonl)."),
    harmful_set: str = typer.Option("advbench-test", help="advbench-{train,dev,test} or a dataset file."),
    overrefusal_set: str = typer.Option("xstest-test", help="xstest-{dev,test,all} or a dataset file."),
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
                            system_prompt=system_prompt)
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


@app.command("selectors")
def selectors_command() -> None:
    """List the registered selectors."""
    from safekeel.selectors import get_selector, known_selectors

    for name in known_selectors():
        doc = (type(get_selector(name)).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name}: {doc}")


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
    workers: int = typer.Option(1, help="Worker processes that run fine-tuning jobs (0: run `safekeel worker` yourself)."),
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
    typer.echo(f"safekeel serving {settings.base_models[0]} with {settings.engine} on http://{host}:{port}/v1 "
               f"(state in {settings.root}, {workers} worker(s))")
    uvicorn.run(create_app(settings, start_engine=True, start_workers=workers), host=host, port=port, log_level="info")


@app.command("demo")
def demo_command(
    data: Path = typer.Option(Path(__file__).resolve().parent.parent / "examples" / "spokes_support.jsonl", help="Training data to upload."),
    k: int = typer.Option(10, help="Safety examples replayed."),
    epochs: int = typer.Option(2, help="Training epochs."),
    engine: str = typer.Option("vllm", help="Serving engine of the demo server."),
    n_harmful: Optional[int] = typer.Option(None, help="Gate on only the first n AdvBench dev prompts (default: all 52)."),
) -> None:
    """The main job: start the service, upload the sample dataset, fine-tune with safety replay behind the
    safety gate, print the before/after safety report, and chat with the result (needs ../shared/data)."""
    from safekeel.paths import shared_data_dir
    from safekeel.service.demo import run_demo

    if shared_data_dir() is None:
        _fail("the demo's safety gate evaluates on AdvBench/XSTest from ../shared/data, which is not present")
    summary = run_demo(data=data, k=k, epochs=epochs, engine=engine, n_harmful=n_harmful, echo=typer.echo)
    if summary.get("status") != "succeeded":
        raise typer.Exit(1)


@app.command("worker")
def worker_command() -> None:
    """Run a fine-tuning job worker against the service database (same settings as `serve`)."""
    from safekeel.service.worker import main as worker_main

    worker_main()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
