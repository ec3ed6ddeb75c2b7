"""`safekeel audit`: look at a dataset before training (safekeel.audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from safekeel.cli.common import fail as _fail, setup as _setup
from safekeel.defaults import DEFAULT_MODEL, DEFAULT_POOL


def audit_command(
    data: Path = typer.Argument(..., help="User training data file."),
    pool: str = typer.Option(DEFAULT_POOL, help="The harmful reference: a safety pool's requests ('authored' or a file)."),
    flag_threshold: float = typer.Option(0.5, help="Flag an example nearer a harmful request than any safe one at this cosine or more."),
    permutations: int = typer.Option(1000, help="Permutations of the MMD test."),
    hidden_states: bool = typer.Option(False, "--hidden-states", help="Also measure the distances in the base model's own "
                                       "representation (the residual stream entering --layer, mean-pooled per request)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model for --hidden-states: registered name or local folder."),
    layer: Optional[int] = typer.Option(None, help="Decoder block for --hidden-states (default: the middle one)."),
    answers: bool = typer.Option(True, help="Judge the training answers with the content judge (the harmful_answer flag)."),
    shift: str = typer.Option("none", help="Plan a shift toward safe: none | drop | downweight the flagged examples "
                                           "(and the --shift-fraction nearest a harmful request)."),
    shift_fraction: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Also shift this share nearest a harmful request."),
    shift_weight: float = typer.Option(0.5, min=0.0, max=1.0, help="downweight: the probability that each target is kept."),
    seed: int = typer.Option(0, help="Seed of downweight's draws."),
    write_shifted: Optional[Path] = typer.Option(None, help="Write the examples the shift keeps here (chat JSONL)."),
    predictor: Optional[Path] = typer.Option(None, help="A harm predictor file (default: the one shipped, if any)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
) -> None:
    """Audit DATA before training, in sentence-embedding space, against a harmful reference (the pool's requests) and
    a safe one (the authored benign requests). Per example: flagged when nearer a harmful request than any safe one
    with cosine >= --flag-threshold (the report lists the most harmful-looking). As distributions: the Frechet
    distance to each reference with its size floor (the distance a same-size draw of the reference itself shows; the
    excess over it compares datasets of different sizes), MMD^2 with a permutation p-value (Gaussian kernel, bandwidth
    by the median heuristic over the two references, the same kernel for every dataset),
    and the share of examples on the harmful side of an LDA direction between the references (mean projection:
    0 = the safe mean, 1 = the harmful mean). Flags per example, with reasons: harmful_request, harmful_answer (the
    content judge on the answer), persona_override, duplicate, empty_turn, long_turn. The predicted no-replay
    increase, with its interval, of what the harm predictor learned (named by its metric and judge: compliance with
    harmful requests, 1 - refusal rate; or the harmful rate) when one is shipped (safekeel.audit.predict: the score it
    reads, its judge, metric and training datasets are in the report). --shift previews what a fine-tune's shift would drop.
    The same audit runs as a fine-tune's first stage (`safekeel finetune --audit`)."""
    _setup()
    from safekeel.audit import audit_dataset
    from safekeel.audit.act import apply_shift, shift_plan
    from safekeel.audit.predict import HarmPredictor, describe_prediction, shipped_predictor
    from safekeel.data.formats import DatasetError, load_conversations
    from safekeel.data.jsonl import write_jsonl
    from safekeel.data.safety import load_authored_benign, load_pool
    from safekeel.eval.judges.content import harmful_content_scorer

    try:
        conversations = load_conversations(data).conversations
        harmful, benign = load_pool(pool), load_authored_benign()
        score, threshold = harmful_content_scorer() if answers else (None, 0.5)
        report = audit_dataset(conversations, harmful, benign, flag_threshold=flag_threshold, n_permutations=permutations,
                               answer_judge=score, answer_threshold=threshold, answer_judge_name="content")
        if hidden_states:
            from safekeel.audit.shift import hidden_state_distances
            from safekeel.models.registry import load_model_and_tokenizer

            loaded, tokenizer = load_model_and_tokenizer(model)
            report.hidden_state_distances = {"model": model, **hidden_state_distances(
                loaded.eval(), tokenizer, conversations, harmful, benign, layer=layer, n_permutations=permutations)}
        out = report.to_dict()
        predictor = HarmPredictor.load(predictor) if predictor else shipped_predictor()
        try:
            out["prediction"] = {"available": True, **predictor.predict(out)} if predictor else {
                "available": False, "reason": "no harm predictor is shipped"}
        except ValueError as error:
            out["prediction"] = {"available": False, "reason": str(error)}
        plan = shift_plan(out, shift, shift_fraction, shift_weight, seed) if shift != "none" or write_shifted else None
    except (DatasetError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    if write_shifted is not None:
        write_jsonl(write_shifted, [{"messages": c.to_messages()} for c in apply_shift(conversations, plan)])
    if as_json:
        typer.echo(json.dumps({**out, "shift": plan}, indent=1))
        return
    hidden = report.hidden_state_distances
    typer.echo(report.summary())
    if report.distances:
        for name in ("harmful", "safe"):
            d = report.distances[name]
            typer.echo(f"  to {name:7s}: Frechet {d['frechet']:.3f} (size floor {d['frechet_size_null']:.3f}, excess "
                       f"{d['frechet_excess']:+.3f}); MMD^2 {d['mmd2']:.5f} (p {d['mmd_p_value']:.4f}, "
                       f"bandwidth {d['mmd_bandwidth']:.3f})")
        lda = report.distances["lda"]
        typer.echo(f"  LDA: {lda['harmful_side_share']:.1%} on the harmful side, mean projection {lda['mean_projection']:.3f} "
                   f"(references separated at {lda['reference_accuracy']:.1%})")
    if hidden:
        typer.echo(f"  hidden states ({hidden['model']}, block {hidden['layer']}): Frechet to harmful {hidden['harmful']['frechet']:.3f}, "
                   f"to safe {hidden['safe']['frechet']:.3f}; {hidden['lda']['harmful_side_share']:.1%} on the harmful side "
                   f"(references separated at {hidden['lda']['reference_accuracy']:.1%})")
    prediction = out["prediction"]
    if prediction["available"]:
        typer.echo(f"  {describe_prediction(prediction)}")
    else:
        typer.echo(f"  no prediction: {prediction['reason']}")
    for flag in report.flagged:
        typer.echo(f"  flagged #{flag['index']}: cosine {flag['harmful_similarity']:.3f} to {flag['nearest_harmful_id']}: {flag['text'][:100]}")
    for entry in (report.example_flags or [])[:10]:
        typer.echo(f"  #{entry['index']}: " + "; ".join(f"{flag}: {reason}" for flag, reason in entry["reasons"].items()))
    if plan is not None:
        typer.echo(f"  shift ({plan['action']}): {plan['reason']}" + (f"; kept examples written to {write_shifted}" if write_shifted else ""))
