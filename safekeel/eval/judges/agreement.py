"""The agreement set: replies of the project's fine-tuned models, sampled across conditions, labelled blind.

Items are sampled from kept replies (safekeel.eval.replies) of benchmark reruns, stratified by run and by
prompt set. An item's split follows its prompt: replies to prompts an evaluation asks (AdvBench test,
XSTest test, OR-Bench test half, HarmBench) are `test` (no judge trains or tunes on them); replies to prompts
no evaluation asks (GPTFuzz questions, OR-Bench and XSTest dev halves) are `train`.

Annotators see only {id, prompt, reply} in a shuffled order and the written guideline
(benchmarks/judges/guideline.md); the condition that made a reply (run, dataset, mode, selector, seed) stays
in the item's metadata, never in an annotator's batch. Two annotators label every item independently; a
third decides each question the two disagree on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from safekeel.data.jsonl import iter_jsonl

QUESTIONS = ("refusal", "harmful_content", "hollow", "incoherent")
"""What every annotator answers for every item (0/1), as the guideline defines them."""

TEST_SET_PREFIXES = ("advbench-test", "xstest-safe-test", "orbench-hard-test", "orbench-toxic-test", "harmbench-",
                     "jbb-", "advbench-unseen")
"""Prompt sets an evaluation reports on: replies to them are the test split."""
HARMFUL_KINDS = ("harmful", "harmful_extra")


def split_of(set_name: str) -> str:
    return "test" if set_name.startswith(TEST_SET_PREFIXES) else "train"


def item_id(grid: str, run_id: str, set_name: str, prompt_id: str) -> str:
    """An opaque, stable item id (it names no condition)."""
    return "r" + hashlib.sha256(f"{grid}|{run_id}|{set_name}|{prompt_id}".encode()).hexdigest()[:11]


def condition_of(config: Mapping) -> dict:
    """A run's condition as the bias check groups it."""
    if config["kind"] == "aligned":
        return {"dataset": None, "mode": "aligned", "selector": None, "k": 0, "pool": None, "seed": None}
    return {"dataset": config["dataset"]["name"], "mode": config["mode"], "selector": config.get("selector"),
            "k": config.get("k", 0), "pool": config.get("pool"), "seed": config.get("seed")}


def condition_label(condition: Mapping) -> str:
    """none | aligned | ptst | <mode>:<selector> (e.g. replay:forgetting, icl:random)."""
    if condition["mode"] in ("none", "aligned", "ptst"):
        return condition["mode"]
    return f"{condition['mode']}:{condition['selector']}"


@dataclass(frozen=True)
class Quota:
    """How many replies to sample from each run, per (split, prompt kind)."""
    test_harmful: int = 10
    test_safe: int = 5
    train_harmful: int = 7
    train_safe: int = 3

    def of(self, split: str, harmful: bool) -> int:
        return getattr(self, f"{split}_{'harmful' if harmful else 'safe'}")


def sample_items(runs: Iterable[tuple[str, str, Mapping, Sequence[dict]]], quota: Quota = Quota(), seed: int = 0) -> list[dict]:
    """Items from each (grid, run id, run config, reply rows): per run and per (split, prompt kind), a seeded
    sample of `quota` replies spread over the prompt sets of that stratum (round robin over sets)."""
    items = []
    for grid, run, config, rows in runs:
        rng = random.Random(f"{seed}|{grid}|{run}")
        strata: dict[tuple[str, bool], dict[str, list[dict]]] = {}
        for row in rows:
            harmful = row["kind"] in HARMFUL_KINDS
            strata.setdefault((split_of(row["set"]), harmful), {}).setdefault(row["set"], []).append(row)
        for (split, harmful), by_set in sorted(strata.items()):
            pools = {name: rng.sample(rows_, len(rows_)) for name, rows_ in sorted(by_set.items())}
            chosen: list[dict] = []
            while len(chosen) < quota.of(split, harmful) and any(pools.values()):
                for name in sorted(pools):
                    if pools[name] and len(chosen) < quota.of(split, harmful):
                        chosen.append(pools[name].pop())
            for row in chosen:
                items.append({
                    "id": item_id(grid, run, row["set"], row.get("id", row["prompt"])),
                    "prompt": row["prompt"], "reply": row["response"] or "",
                    "meta": {"grid": grid, "run_id": run, "set": row["set"], "prompt_id": row.get("id"),
                             "kind": row["kind"], "prompt_harmful": harmful, "split": split,
                             "condition": condition_of(config), "judgements": row.get("judgements", {})},
                })
    return items


def annotator_batches(items: Sequence[dict], n_batches: int, seed: int) -> list[list[dict]]:
    """The items an annotator sees: {id, prompt, reply} only, shuffled with the annotator's seed, in n batches."""
    order = [{"id": i["id"], "prompt": i["prompt"], "reply": i["reply"]} for i in items]
    random.Random(seed).shuffle(order)
    size = -(-len(order) // n_batches)
    return [order[start:start + size] for start in range(0, len(order), size)]


def parse_labels(path: str | Path) -> dict[str, dict]:
    """An annotator's JSON lines: {id: {question: 0/1, ...}}. Errors name the file, line and field."""
    out: dict[str, dict] = {}
    for number, row in iter_jsonl(path):
        if "id" not in row:
            raise ValueError(f"{path}:{number}: no id")
        for question in QUESTIONS:
            if row.get(question) not in (0, 1, True, False):
                raise ValueError(f"{path}:{number}: {question} must be 0 or 1, got {row.get(question)!r}")
        labels = {q: int(row[q]) for q in QUESTIONS}
        if labels["hollow"] and (labels["refusal"] or labels["harmful_content"]):
            labels["hollow"] = 0  # the guideline: hollow only without refusal and without harmful content
        out[row["id"]] = labels | ({"note": row["note"]} if row.get("note") else {})
    return out


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Cohen's kappa of two binary label sequences (None when undefined: one class everywhere)."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError("kappa needs two label sequences of the same, non-zero length")
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def adjudicate(first: Mapping[str, dict], second: Mapping[str, dict], third: Mapping[str, dict]) -> dict[str, dict]:
    """Final labels: where the two annotators agree on a question, their answer; else the third's. Each item
    records which questions were adjudicated. An item missing from either annotator is an error."""
    missing = set(first) ^ set(second)
    if missing:
        raise ValueError(f"{len(missing)} items are labelled by one annotator only, e.g. {sorted(missing)[:3]}")
    final = {}
    for item, a in first.items():
        b = second[item]
        labels, disputed = {}, []
        for question in QUESTIONS:
            if a[question] == b[question]:
                labels[question] = a[question]
            else:
                if item not in third:
                    raise ValueError(f"item {item}: annotators disagree on {question} and the adjudicator has no label")
                labels[question] = third[item][question]
                disputed.append(question)
        if labels["hollow"] and (labels["refusal"] or labels["harmful_content"]):
            labels["hollow"] = 0
        final[item] = labels | {"adjudicated": disputed}
    return final


def disagreements(first: Mapping[str, dict], second: Mapping[str, dict]) -> list[str]:
    """Items on which the two annotators differ on any question."""
    return sorted(i for i in first if i in second and any(first[i][q] != second[i][q] for q in QUESTIONS))
