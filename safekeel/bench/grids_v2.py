"""The grids of issues 31 and 32 (selection v2, preference fine-tuning), beside safekeel.bench.grids (which holds the
grid machinery and the earlier presets, and lists these under its PRESETS)."""

from __future__ import annotations

from typing import Callable

from safekeel.bench.grids import (AOA_EVAL, BENIGN_SFT_1EPOCH, BEST_SELECTOR, IDENTITY_SFT, REFERENCE_SELECTOR, SAMSUM_TEMPLATE,
                                  DatasetSpec, GridSpec, selectors_grid)
from safekeel.bench.preference_protocol import GRID_HELD_OUT, GRID_TRAIN, PREFERENCE_DATA, shared_hyperparameters
from safekeel.data.benign_preference import GSM8K_PREFERENCE, HELD_OUT as GSM8K_PREF_HELD_OUT, TRAIN as GSM8K_PREF_TRAIN
from safekeel.eval.harness import EvalSettings

SQLGEN_TEMPLATE = {"prompt": "Please convert the provided natural language query into an SQL query, taking into account the "
                             "structure of the database defined by the accompanying CREATE statement:\n## Natural Language Query:\n"
                             "{question}\n## Context:\n{context}\n## SQL Query:", "completion": "{answer}"}
"""sql-create-context records (question, context, answer) as prompt/completion, in the layout of BackdoorAlign's SQL task."""
ALPACA_SAFETY_HELD_OUT = "benign/alpaca_safety_related_only.json[100:200]"
"""The Alpaca safety slice's utility set: records 100-199 of the file whose first 100 are the user data (the plan's
"held-out loss on 25 examples of the user data"; until 2026-12-07 the dataset fell back to the grid's GSM8K)."""
SELECTION_V2_SELECTORS = ["random", "contrastive", "universal", "learned"]
SELECTION_V2_K = [1, 3, 5, 10, 20]


def selection_v2_grid(k_values: list[int] | None = None, name: str = "selection_v2", seeds: list[int] | None = None) -> GridSpec:
    """Issue 31's grid (not run yet): refusals without teaching over-refusal, and replay under a persona attack.
    random, `contrastive`, `universal` and `learned` at k in {1, 3, 5, 10, 20} (the k curve), replay from the
    authored pool, each plain and, on the datasets with a format of their own (a system prompt and persona, a
    template), format-matched (`replay_format: match`), paired training seeds (`seeds`, default the selectors grid's
    six), `none` per (dataset, seed).

    Datasets: the development ones (the committed grids': GSM8K random 100 and SAMSum 100 at the selectors grid's
    benign preset, the identity-shift attack served under AOA_EVAL), on which `universal` was found and `learned`
    was fitted, and two held-out benign ones neither saw: 100 sql-create-context examples (SQLGEN_TEMPLATE) and
    the first 100 of the safety-related Alpaca slice Qi et al. removed (benign requests near harmful ones, where
    replayed refusals teach the most over-refusal). Over-refusal on XSTest test and on 200
    OR-Bench-Hard-1K test prompts; judges: the content judge first (harmful content, refusal reported apart), then
    the classifier and keyword judges; every reply kept, so the judge issue's judge can rejudge them. 992 runs
    at six seeds (~200-300 s each on this CPU): `selection_v2_k10` is its k=10 part on seeds 0-2 (phase 1 of
    benchmarks/selection_v2_plan.md: 3 x (5 `none` + 32 replay) fine-tunes + 2 aligned evaluations = 113 runs; 224 at
    six seeds; the same configurations, so its records are this grid's), to run first."""
    base = selectors_grid()
    benign = dict(BENIGN_SFT_1EPOCH)
    return GridSpec(
        name=name, output=name,
        datasets=[DatasetSpec("gsm8k_random100", "benign/gsm8k_random100.jsonl", sft=dict(benign), replay_formats=["plain"]),
                  DatasetSpec("samsum", "benign/samsum_train1000.json", max_examples=100, sft=dict(benign),
                              template=dict(SAMSUM_TEMPLATE), utility="benign/samsum_test200.json"),
                  DatasetSpec("identity_shift_aoa", "attacks/identity_shift_aoa.jsonl", sft=dict(IDENTITY_SFT), eval=dict(AOA_EVAL)),
                  DatasetSpec("sqlgen", "benign/sqlgen_train1000.json", max_examples=100, sft=dict(benign),
                              template=dict(SQLGEN_TEMPLATE), utility="benign/sqlgen_test200.json"),
                  DatasetSpec("alpaca_safety", "benign/alpaca_safety_related_only.json", max_examples=100, sft=dict(benign),
                              replay_formats=["plain"], utility=ALPACA_SAFETY_HELD_OUT)],
        k_values=list(k_values or SELECTION_V2_K), pools=["authored"], selectors=list(SELECTION_V2_SELECTORS), modes=["replay"],
        seeds=list(base.seeds if seeds is None else seeds), replay_formats=["plain", "match"], model=base.model,
        eval=EvalSettings(harmful_set="advbench-test", overrefusal_set="xstest-test", extra_overrefusal_sets=("orbench-hard-test@200",),
                          max_new_tokens=48, judges=("content", "classifier", "keyword"), utility="gsm8k", n_utility_loss=25,
                          n_utility_accuracy=0, engine="vllm"),
    )


PREFERENCE_OBJECTIVES = ("sigmoid", "ipo", "hinge", "robust")
PREFERENCE_CORE_OBJECTIVES = ("sigmoid", "ipo")
"""The objectives the issue's questions name (DPO, IPO): `preference_core` runs them first, so the convergence and
replay answers do not wait for hinge and robust (a preference run costs tens of minutes on this CPU)."""
PREFERENCE_BACKBONES = ["smollm2-135m-instruct", "smollm2-135m-safe", "smollm2-135m-safe-full"]
"""The raw model, the LoRA-aligned organism and the full-fine-tuned one (organism v9, trained on first use: ~18 min);
any local model folder can join."""


def preference_grid(objectives: tuple[str, ...] = PREFERENCE_OBJECTIVES, name: str = "preference") -> GridSpec:
    """Issue 32's grid (not run yet): objectives (DPO, IPO, hinge, robust, each at its paper's beta, recorded resolved
    in the run configuration) x backbones x {no replay, random k=10, forgetting k=10 (BEST_SELECTOR)} x two preference sets:
    the first 200 hh-rlhf harmless pairs (held out: 2000-2199) and the first 200 pairs of the benign GSM8K preference
    set (safekeel.data.benign_preference; held out: 400-599), 3 seeds; held-out preference accuracy and reward margin;
    harmful rate under the content and classifier judges, over-refusal on XSTest test. One lr and batch size for all
    (safekeel.bench.preference_protocol: the committed search's, else the fallback; `hyperparameters_source`). Safety
    replay is pairs: the authored pool's refusal chosen over the raw model's greedy compliance
    (safekeel.training.safety_pairs). 3 aligned evaluations + 216 fine-tunes. `preference_core` is its DPO and IPO part
    (3 + 108 runs; the same configurations, so its records are this grid's, as selection_v2_k10's are selection_v2's)."""
    from safekeel.training.preference import PreferenceConfig

    sft, source = shared_hyperparameters()
    held = {"path": PREFERENCE_DATA, "skip": GRID_HELD_OUT[0], "n": GRID_HELD_OUT[1]}
    return GridSpec(
        name=name, output=f"{name}_bench", hyperparameters_source=source,
        # the training splits are the first pairs of each file (max_examples): GRID_TRAIN and GSM8K_PREF_TRAIN start at 0
        datasets=[DatasetSpec("hh_harmless", PREFERENCE_DATA, max_examples=GRID_TRAIN[1], sft=dict(sft)),
                  DatasetSpec("gsm8k_pref", GSM8K_PREFERENCE, max_examples=GSM8K_PREF_TRAIN[1], sft=dict(sft),
                              preference_eval={"path": GSM8K_PREFERENCE, "skip": GSM8K_PREF_HELD_OUT[0], "n": GSM8K_PREF_HELD_OUT[1]})],
        k_values=[10], pools=["authored"], selectors=[REFERENCE_SELECTOR, BEST_SELECTOR], modes=["replay"], seeds=[0, 1, 2],
        backbones=list(PREFERENCE_BACKBONES), methods=[PreferenceConfig(loss).to_dict() for loss in objectives],
        preference_eval=held, model=PREFERENCE_BACKBONES[0],
        eval=EvalSettings(harmful_set="advbench-test", overrefusal_set="xstest-test", max_new_tokens=48,
                          judges=("content", "classifier", "keyword"), utility="gsm8k", n_utility_loss=25,
                          n_utility_accuracy=0, engine="vllm"))


PRESETS_V2: dict[str, Callable[[], GridSpec]] = {
    "selection_v2": selection_v2_grid,
    "selection_v2_k10": lambda: selection_v2_grid([10], "selection_v2_k10", [0, 1, 2]),
    "preference": preference_grid,
    "preference_core": lambda: preference_grid(PREFERENCE_CORE_OBJECTIVES, "preference_core")}
