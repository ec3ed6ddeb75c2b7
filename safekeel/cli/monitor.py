"""`safekeel monitor ...`: hidden-state monitors (harm probes, refusal directions, sparse autoencoders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from safekeel.cli.common import fail as _fail, setup as _setup
from safekeel.defaults import DEFAULT_MODEL

monitor_app = typer.Typer(no_args_is_help=True, help="Hidden-state monitors: harm probes, refusal directions, sparse autoencoders.")


def _default_monitor_dir(model: str) -> Path:
    from safekeel.paths import safekeel_home

    return safekeel_home() / "monitors" / model


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"expected comma-separated integers, got {text!r}")


@monitor_app.command("train-probe")
def monitor_train_probe_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose hidden states are probed."),
    layers: str = typer.Option("3,6,9,12,15,18,21,24,27", help="Candidate hookpoints layers.N (stream entering block N)."),
    poolings: str = typer.Option("last,mean,max", help="Candidate poolings."),
    target_fpr: float = typer.Option(0.01, help="Calibrate each threshold to flag this fraction of benign traffic."),
    output: Optional[Path] = typer.Option(None, help="Where to save (default $SAFEKEEL_HOME/monitors/<model>, which the service loads)."),
    seed: int = typer.Option(0),
) -> None:
    """Train harm probes and the refusal direction (AdvBench vs Alpaca; layer and pooling chosen on dev),
    calibrate thresholds, and test in and out of distribution (HarmBench, JBB, XSTest)."""
    _setup()
    from safekeel.monitors.suite import ProbeSuiteConfig, train_probe_suite

    config = ProbeSuiteConfig(model=model, layers=_int_list(layers), poolings=[p for p in poolings.split(",") if p],
                              target_fpr=target_fpr, seed=seed)
    output = output or _default_monitor_dir(model)
    result = train_probe_suite(config, output)
    for role, chosen in result.report["chosen"].items():
        typer.echo(f"{role}: {chosen['probe']} (val AUROC {chosen['validation']['auroc']:.3f}, threshold {chosen['threshold']:.3f})")
        for name, metrics in chosen["tests"].items():
            typer.echo(f"  {name}: AUROC {metrics['auroc']:.3f}, TPR {metrics['tpr_at_threshold']:.3f} at FPR "
                       f"{metrics['fpr_at_threshold']:.3f} (n={metrics['n_harmful']}+{metrics['n_benign']})")
    typer.echo(f"saved to {output} ({result.report['seconds']:.0f} s)")


def _sae_stream(model: str, hookpoints: list[str], epochs: int):
    """(model fingerprint, d_in, token stream) over the SAE corpus (suite.sae_corpus) at the hookpoints."""
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.monitors.capture import ActivationReader, model_fingerprint
    from safekeel.monitors.suite import ProbeSuiteConfig, activation_stream, reference_splits, sae_corpus

    network, tokenizer = load_model_and_tokenizer(model)
    network.eval()
    texts = sae_corpus(tokenizer, reference_splits(ProbeSuiteConfig().n_benign))
    reader = ActivationReader(network, tokenizer, hookpoints)
    return model_fingerprint(resolve_model(model)), network.config.hidden_size, activation_stream(reader, texts, epochs=epochs)


@monitor_app.command("train-sae")
def monitor_train_sae_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose residual stream is encoded."),
    hookpoints: str = typer.Option("layers.15", help="Comma-separated layers.N (one SAE per hookpoint and size, all from one forward)."),
    expansion: str = typer.Option("8", help="Comma-separated expansion factors (latents = factor x hidden size)."),
    k: int = typer.Option(32, help="Active latents per token."),
    tokens: int = typer.Option(600_000, help="Training tokens per SAE."),
    dead_tokens: int = typer.Option(200_000, help="A latent is dead after this many tokens without firing."),
    output: Optional[Path] = typer.Option(None, help="Folder for the SAEs (one sub-folder each; default $SAFEKEEL_HOME/saes/<model>)."),
) -> None:
    """Train TopK SAEs (AuxK for dead latents) on activations streamed from the model over a corpus that
    shares no prompt with the probe evaluation splits; no activation dump is written."""
    _setup()
    from safekeel.monitors.sae import SaeConfig, SaeTrainer
    from safekeel.paths import safekeel_home

    points = [h for h in hookpoints.split(",") if h]
    try:
        fingerprint, d_in, stream = _sae_stream(model, points, epochs=10)
        configs = [SaeConfig(hookpoint=h, d_in=d_in, expansion_factor=factor, k=k, batch_size=2048, max_tokens=tokens,
                             dead_tokens=dead_tokens) for h in points for factor in _int_list(expansion)]
    except ValueError as error:
        _fail(str(error))
    output = output or safekeel_home() / "saes" / model
    for result in SaeTrainer(configs, output, model_hash=fingerprint, progress=True, extra={"model": model}).fit(stream):
        typer.echo(f"{result.name}: {result.status}, {result.stats.tokens} tokens, FVU (EMA) {result.stats.fvu_ema:.3f}, "
                   f"dead {result.stats.dead_fraction:.3f} -> {result.folder}")


@monitor_app.command("sweep")
def monitor_sweep_command(
    plan: Path = typer.Argument(..., help='JSON: {"model": ..., "parallel": 2, "configs": [SaeConfig fields...], '
                                          '"kill_rules": [{"metric": "fvu_ema", "above": 0.5, "after_steps": 20}]}'),
    output: Path = typer.Option(..., help="Folder for sweep.json and the surviving SAEs."),
) -> None:
    """Run a queue of SAE configurations a few at a time on one activation stream; a run whose loss curve
    breaks a kill rule is stopped and its slot goes to the next configuration."""
    _setup()
    from safekeel.monitors.sae import SaeConfig
    from safekeel.monitors.sweep import KillRule, run_sweep

    try:
        spec = json.loads(plan.read_text())
        model = spec.get("model", DEFAULT_MODEL)
        hookpoints = sorted({c["hookpoint"] for c in spec["configs"]})
        fingerprint, d_in, stream = _sae_stream(model, hookpoints, epochs=10)
        configs = [SaeConfig(**{"d_in": d_in, **c}) for c in spec["configs"]]
        rules = [KillRule(**r) for r in spec.get("kill_rules", [])]
    except (OSError, KeyError, TypeError, ValueError) as error:
        _fail(f"{plan}: {error}")
    result = run_sweep(configs, stream, output, kill_rules=rules, parallel=int(spec.get("parallel", 2)),
                       model_hash=fingerprint, progress=True, extra={"model": model})
    for record in result.records:
        reason = f" ({record.kill_reason})" if record.kill_reason else ""
        typer.echo(f"{record.name}: {record.status}{reason}, {record.steps} steps")
    typer.echo(f"summary: {result.path}")


@monitor_app.command("eval")
def monitor_eval_command(
    monitors: Path = typer.Argument(..., help="A monitor folder (e.g. $SAFEKEEL_HOME/monitors/<model>)."),
    model: str = typer.Option(DEFAULT_MODEL, help="The model the monitors were trained on."),
    adapter: Optional[Path] = typer.Option(None, help="Also read the model with this LoRA adapter and report the drift."),
    harmful: Optional[str] = typer.Option(None, help="Harmful prompts: advbench-{dev,test} or a dataset file (default: the shift sets)."),
    benign: Optional[str] = typer.Option(None, help="Benign prompts: xstest-{dev,test,all} or a dataset file."),
) -> None:
    """Score prompt sets with saved monitors: AUROC and TPR/FPR at the calibrated thresholds; with
    --adapter, the fine-tune's drift (refusal-direction cosine, probe AUROC base vs fine-tuned)."""
    _setup()
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.monitors.capture import model_fingerprint
    from safekeel.monitors.probes import ProbeMismatchError, detection_metrics
    from safekeel.monitors.runtime import load_monitors
    from safekeel.monitors.suite import probe_scores

    try:
        loaded = load_monitors(monitors, expected_model=model_fingerprint(resolve_model(model)))
    except (FileNotFoundError, ProbeMismatchError) as error:
        _fail(str(error))
    network, tokenizer = load_model_and_tokenizer(model)
    network.eval()
    if harmful or benign:
        from safekeel.eval.harness import load_prompt_set

        if not (harmful and benign):
            _fail("give both --harmful and --benign")
        pairs = {f"{harmful}_vs_{benign}": (load_prompt_set(harmful)[1], load_prompt_set(benign)[1])}
    else:
        from safekeel.monitors.suite import reference_splits

        splits = reference_splits({"test": 500})
        pairs = {name: (splits.sets[h], splits.sets[b]) for name, (h, b) in splits.pairs.items() if h != "harmful_test"}
    report = {}
    for name, monitor in loaded.items():
        report[name] = {}
        for pair, (h, b) in pairs.items():
            metrics = detection_metrics(probe_scores(monitor, network, tokenizer, h), probe_scores(monitor, network, tokenizer, b),
                                        monitor.threshold)
            report[name][pair] = metrics
            typer.echo(f"{name} {pair}: AUROC {metrics['auroc']:.3f}, TPR {metrics.get('tpr_at_threshold', float('nan')):.3f} "
                       f"at FPR {metrics.get('fpr_at_threshold', float('nan')):.3f} (n={metrics['n_harmful']}+{metrics['n_benign']})")
    if adapter:
        from peft import PeftModel

        from safekeel.monitors.drift import drift_report, summarise

        h, b = next(iter(pairs.values()))
        drift = drift_report(loaded, network, PeftModel.from_pretrained(network, str(adapter)).eval(), tokenizer, h, b)
        report["drift"] = drift
        typer.echo(summarise(drift))
    typer.echo(json.dumps(report, indent=2))
