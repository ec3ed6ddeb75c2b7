"""Preference fine-tuning helpers of the CLI: the `safety-pairs` command (the harmful compliances behind safety
preference replay) and the method options `safekeel finetune --method dpo` turns into a MethodSpec."""

from __future__ import annotations

from typing import Optional

import typer

from safekeel.cli.common import fail, setup
from safekeel.defaults import DEFAULT_POOL
from safekeel.training.safety_pairs import COMPLIANCE_MAX_NEW_TOKENS, COMPLIANCE_MODEL


def method_spec(method: str, loss_type: list[str], loss_weight: list[float], beta: Optional[float],
                label_smoothing: Optional[float], rejected_model: str):
    """finetune's --method/--loss-type/--loss-weight/--beta/--label-smoothing/--rejected-model as a MethodSpec (a
    ValueError names a bad value or a preference option given to a supervised job)."""
    from safekeel.pipeline import MethodSpec

    if method == "dpo":
        return MethodSpec(type="dpo", rejected_model=rejected_model,
                          dpo={"loss_type": tuple(loss_type or ["sigmoid"]), "loss_weights": tuple(loss_weight) or None,
                               "beta": beta, "label_smoothing": label_smoothing})
    if loss_type or loss_weight or beta is not None or label_smoothing is not None:
        raise ValueError("--loss-type, --loss-weight, --beta and --label-smoothing are preference options: add --method dpo")
    return MethodSpec(type=method)


def safety_pairs_command(
    pool: str = typer.Option(DEFAULT_POOL, help="Safety pool whose every request gets a compliance: 'authored', "
                                                "'safety_tuned_llamas' or a file."),
    model: str = typer.Option(COMPLIANCE_MODEL, help="The model that writes the rejected side (the raw, not safety-aligned base)."),
    max_new_tokens: int = typer.Option(COMPLIANCE_MAX_NEW_TOKENS, min=8, help="Tokens per greedy compliance."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Generate every reply again and start the cache afresh."),
) -> None:
    """Build (or rebuild) the cache of harmful compliances that safety preference replay pairs with the pool's refusals:
    the raw model's greedy reply to each harmful request, with provenance (model, build hash, decoding, date). A dpo
    fine-tune generates the ones it needs on first use; this builds a whole pool ahead."""
    setup()
    from safekeel.data.formats import DatasetError
    from safekeel.data.safety import load_pool
    from safekeel.eval.judges.keyword import keyword_refusal
    from safekeel.models.registry import ModelNotFoundError
    from safekeel.training.safety_pairs import ComplianceCache, build_safety_pairs

    try:
        examples = load_pool(pool)
        cache = ComplianceCache(model, max_new_tokens)
        cache.replies([e.request for e in examples], rebuild=rebuild)
        pairs, record = build_safety_pairs(examples, cache, is_refusal=keyword_refusal, show_progress=False)
    except (DatasetError, ModelNotFoundError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    typer.echo(f"{len(pairs)} safety preference pairs from {len(examples)} pool examples; {len(record['dropped'])} dropped "
               f"(the raw model refused or gave nothing)\ncache: {cache.folder} (model {model}, build "
               f"{cache.build_sha256[:12]}, greedy {max_new_tokens} tokens)")
