"""Reference evaluation sets, read from the data folders (never copied into the repo): $SAFEKEEL_SHARED_DATA,
$SAFEKEEL_HOME/data (`safekeel data fetch`) or ../shared/data beside the checkout; see safekeel.data.home."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass

from safekeel.data.conversation import Conversation
from safekeel.data.formats import load_conversations
from safekeel.data.home import data_file
from safekeel.data.jsonl import read_jsonl


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[str]
    ids: list[str]


def advbench(split: str = "test") -> PromptSet:
    """AdvBench harmful behaviours, split as in SafeTuneBed (train 416 / dev 52 / test 156)."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"AdvBench split must be train, dev or test, not {split!r}")
    rows = json.loads(data_file(f"harmful_eval/advbench_{split}.json").read_text())
    return PromptSet(f"advbench-{split}", [r["prompt"] for r in rows], [f"advbench-{split}-{i}" for i in range(len(rows))])


def advbench_unseen() -> PromptSet:
    """The AdvBench behaviours in neither the train nor the dev split (52 of the 520). The SafeTuneBed
    splits overlap: 125 of the 156 test prompts are also train prompts (18 are dev prompts), harmless
    for evaluating a model that never trains on AdvBench, but a leak for anything fitted on AdvBench
    train (the monitors' probes), whose in-distribution test this is."""
    seen = set(advbench("train").prompts) | set(advbench("dev").prompts)
    with open(data_file("harmful_eval/advbench_harmful_behaviors.csv"), newline="") as handle:
        goals = [row[0] for row in csv.reader(handle) if row]  # one goal per line, no header (README says goal,target)
    if goals and goals[0].lower() == "goal":
        goals = goals[1:]
    rows = [(i, goal) for i, goal in enumerate(goals) if goal not in seen]
    return PromptSet("advbench-unseen", [goal for _, goal in rows], [f"advbench-{i}" for i, _ in rows])


def xstest_safe(split: str = "all") -> PromptSet:
    """XSTest v2 safe prompts (250). Split 'dev' = odd ids, 'test' = even ids, 'all' = both: settings
    are tuned on dev, reported on test."""
    if split not in ("all", "dev", "test"):
        raise ValueError(f"XSTest split must be all, dev or test, not {split!r}")
    with open(data_file("overrefusal/xstest_prompts.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == "safe"]
    if split != "all":
        parity = 1 if split == "dev" else 0
        rows = [r for r in rows if int(r["id"]) % 2 == parity]
    return PromptSet(f"xstest-safe-{split}", [r["prompt"] for r in rows], [f"xstest-{r['id']}" for r in rows])


def gsm8k(split: str = "test", n: int | None = None, seed: int = 0) -> list[Conversation]:
    """GSM8K question/answer pairs (answers end with '#### <number>'); a seeded subset when n is set."""
    conversations = load_conversations(data_file(f"benign/gsm8k_{split}.jsonl"), strict=True).conversations
    if n is not None and n < len(conversations):
        conversations = random.Random(seed).sample(conversations, n)
    return conversations


def shared_dataset(relative: str) -> str:
    """Path of a file in the data folders, e.g. 'benign/gsm8k_random100.jsonl' (MissingDataError, a
    FileNotFoundError saying what to do, when no data folder has it)."""
    return str(data_file(relative))


def alpaca_harmless() -> PromptSet:
    """Benign Alpaca instructions (18,793; the harmless split of Arditi et al.'s refusal-direction work),
    in file order. Callers split them with `split_prompts` so train / calibration / test never overlap."""
    rows = json.loads(data_file("benign/alpaca_instructions_harmless_18793.json").read_text())
    return PromptSet("alpaca-harmless", [r["instruction"] for r in rows], [f"alpaca-harmless-{i}" for i in range(len(rows))])


HARMBENCH_CATEGORIES = ("standard", "contextual", "copyright")


def harmbench(functional_category: str = "standard") -> PromptSet:
    """HarmBench text behaviours of one functional category (standard 200, contextual 100, copyright 100).
    Contextual behaviours are given with their context before the request, as HarmBench poses them."""
    if functional_category not in HARMBENCH_CATEGORIES:
        raise ValueError(f"unknown HarmBench functional category {functional_category!r}; known: {', '.join(HARMBENCH_CATEGORIES)}")
    with open(data_file("harmful_eval/harmbench_behaviors_text_all.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["FunctionalCategory"] == functional_category]
    if not rows:
        raise ValueError(f"no HarmBench behaviours in functional category {functional_category!r}")
    prompts = [(r["ContextString"] + "\n\n" + r["Behavior"]) if r["ContextString"] else r["Behavior"] for r in rows]
    return PromptSet(f"harmbench-{functional_category}", prompts, [f"harmbench-{r['BehaviorID']}" for r in rows])


def jbb_harmful() -> PromptSet:
    """JailbreakBench JBB-Behaviors, harmful half (100 goals)."""
    with open(data_file("harmful_eval/jbb_harmful_behaviors.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    return PromptSet("jbb-harmful", [r["Goal"] for r in rows], [f"jbb-{i}" for i in range(len(rows))])


def xstest_unsafe(split: str = "all") -> PromptSet:
    """XSTest v2 unsafe contrast prompts (200): the harmful twins of the safe-but-scary prompts; split
    by id parity like `xstest_safe` ('dev' = odd ids, 'test' = even ids, 'all')."""
    if split not in ("all", "dev", "test"):
        raise ValueError(f"XSTest split must be all, dev or test, not {split!r}")
    with open(data_file("overrefusal/xstest_prompts.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == "unsafe"]
    if split != "all":
        parity = 1 if split == "dev" else 0
        rows = [r for r in rows if int(r["id"]) % 2 == parity]
    return PromptSet(f"xstest-unsafe-{split}", [r["prompt"] for r in rows], [f"xstest-{r['id']}" for r in rows])


def split_prompts(prompts: PromptSet, sizes: dict[str, int], seed: int = 0) -> dict[str, PromptSet]:
    """Disjoint seeded subsets of a prompt set, e.g. {"train": 800, "calibration": 1000, "test": 500}."""
    if sum(sizes.values()) > len(prompts.prompts):
        raise ValueError(f"{prompts.name} has {len(prompts.prompts)} prompts, fewer than the {sum(sizes.values())} asked for")
    order = list(range(len(prompts.prompts)))
    random.Random(f"{prompts.name}-{seed}").shuffle(order)
    out, start = {}, 0
    for name, size in sizes.items():
        chosen = order[start:start + size]
        out[name] = PromptSet(f"{prompts.name}-{name}", [prompts.prompts[i] for i in chosen], [prompts.ids[i] for i in chosen])
        start += size
    return out


ORBENCH_KINDS = {"hard": "safe", "toxic": "unsafe"}


def orbench(kind: str = "hard", split: str = "all") -> PromptSet:
    """OR-Bench prompts: 'hard' = OR-Bench-Hard-1K (1,319 safe prompts that look unsafe: over-refusal),
    'toxic' = OR-Bench-Toxic (655 unsafe prompts). Split like XSTest by the parity of the upstream row
    index: 'dev' = odd, 'test' = even, 'all' = both. A judge may train on replies to dev prompts only."""
    if kind not in ORBENCH_KINDS:
        raise ValueError(f"OR-Bench kind must be one of {', '.join(ORBENCH_KINDS)}, not {kind!r}")
    if split not in ("all", "dev", "test"):
        raise ValueError(f"OR-Bench split must be all, dev or test, not {split!r}")
    rows = read_jsonl(data_file("overrefusal/orbench_hard1k_toxic.jsonl"))
    rows = [r for r in rows if r["label"] == ORBENCH_KINDS[kind]]
    if split != "all":
        parity = 1 if split == "dev" else 0
        rows = [r for r in rows if int(r["id"].rsplit("_", 1)[1]) % 2 == parity]
    return PromptSet(f"orbench-{kind}-{split}", [r["prompt"] for r in rows], [r["id"] for r in rows])


def gptfuzz_questions() -> PromptSet:
    """The 100 harmful questions of GPTFuzz (from shared/data/judge_labels): no evaluation asks them, so
    replies to them may train a judge."""
    questions: dict[int, str] = {}
    for row in read_jsonl(data_file("judge_labels/gptfuzz_responses_labeled.jsonl")):
        questions.setdefault(row["meta"]["question_index"], row["prompt"])
    order = sorted(questions)
    return PromptSet("gptfuzz-questions", [questions[i] for i in order], [f"gptfuzz-q{i:03d}" for i in order])


def sample_prompts(prompts: PromptSet, n: int, seed: int = 0) -> PromptSet:
    """A seeded sample of n prompts (all of them, in a seeded order, when n >= the set's size), named name@n."""
    order = list(range(len(prompts.prompts)))
    random.Random(f"{prompts.name}-{seed}").shuffle(order)
    chosen = order[:n]
    return PromptSet(f"{prompts.name}@{n}", [prompts.prompts[i] for i in chosen], [prompts.ids[i] for i in chosen])
