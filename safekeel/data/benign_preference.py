"""A benign preference set: GSM8K training problems, the reference solution preferred over a clearly worse one.

The preference grid (issue 32, item 5) trains on the hh-rlhf harmless pairs and on a benign preference set, to ask
whether preference training on data with no safety content at all erodes refusals, as benign supervised fine-tuning
does (He et al. 2024 and Qi et al. 2023 use GSM8K for exactly that). Offline there is no benign preference corpus,
so this module builds one, deterministically, from public data in the reference folder:

- Prompts: GSM8K training problems (benign/gsm8k_train.jsonl, MIT, in the data manifest so `safekeel data fetch
  gsm8k` can get it), a seeded sample (SEED) of N_PAIRS, leaving out the 100 problems of He et al.'s
  gsm8k_random100 (another grid's user data). Grade-school arithmetic: no request is harmful or looks harmful,
  so no pair can teach refusing, or complying with, a harmful request, and no reply is a refusal.
- Chosen: the problem's reference solution (its calculator annotations `<<48/2=24>>` removed: tool markup, not
  text; the final `#### <answer>` line kept).
- Rejected, alternating by position (`rejected_kind` in each row):
  - `mismatched` (even positions): the reference solution of another sampled problem of the same split (the next
    one in a seeded cyclic order within the split: never the pair's own, never another split's). It is fluent, of the same style and length distribution, and wrong for
    this question, so the pair's signal is relevance, not length or style;
  - `wrong_answer` (odd positions): the pair's own solution with the number of its final `####` line changed
    (by a seeded non-zero offset of 1 to 9), which contradicts the worked steps above it: correctness of the
    answer, a harder pair. Where the final answer is not a number the pair falls back to `mismatched`.
- Disjoint from every evaluation: GSM8K's test split (the grids' utility set) is never read, and the prompts are
  arithmetic problems, none of them an AdvBench, XSTest, OR-Bench or authored-pool prompt (tests check this).
- Splits by position, like the hh-rlhf file's: pairs 0-199 train (the grid's max_examples), 200-399 a dev split,
  400-599 the held-out preference evaluation (TRAIN, DEV, HELD_OUT).

The file is written once into $SAFEKEEL_HOME/derived/ (never committed: it is derived from a public set) beside a
provenance JSON (source sha256, seed, counts); the same source always gives the same bytes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable

from safekeel.data.home import data_file, sha256_file
from safekeel.data.jsonl import read_jsonl
from safekeel.paths import safekeel_home
from safekeel.provenance import write_json_atomic

GSM8K_PREFERENCE = "derived/gsm8k_preference_v2.jsonl"
"""The set's name in grids and dataset paths (resolved by `derived_dataset`). v2 (2026-12-07, before any grid run):
the `mismatched` donors cycle within each split; v1 cycled over all 600 problems, so 35 of the 200 held-out pairs
had their chosen solution trained as a rejected reply (found by an independent review of the code)."""
SOURCE = "benign/gsm8k_train.jsonl"
EXCLUDED = "benign/gsm8k_random100.jsonl"
SEED = 20240607
N_PAIRS = 600
TRAIN = (0, 200)
DEV = (200, 200)
HELD_OUT = (400, 200)
"""(skip, n) of each split: the pairs skip .. skip + n - 1 of the file."""
CALCULATOR = re.compile(r"<<[^<>]*>>")
FINAL = re.compile(r"\n#### *(-?[\d,]*\.?\d+)\s*$")


def clean_solution(answer: str) -> str:
    """A GSM8K reference solution without its calculator annotations."""
    return CALCULATOR.sub("", answer).strip()


def wrong_final_answer(solution: str, rng: random.Random) -> str | None:
    """The solution with the number of its `#### n` line moved by a non-zero offset (None: no numeric final line)."""
    match = FINAL.search(solution)
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    offset = rng.choice([-1, 1]) * rng.randint(1, 9)
    value = float(number) + offset
    text = str(int(value)) if value == int(value) and "." not in number else f"{value:g}"
    return solution[:match.start(1)] + text + solution[match.end(1):]


def gsm8k_preference_rows() -> list[dict]:
    """The set's rows (prompt, chosen, rejected, id, rejected_kind, rejected_from), in file order."""
    source = read_jsonl(data_file(SOURCE, purpose="the benign preference set"))
    excluded = {row["messages"][0]["content"].strip() for row in read_jsonl(data_file(EXCLUDED, purpose="the benign preference set"))
                if row.get("messages")}
    candidates = [i for i, row in enumerate(source) if row["question"].strip() not in excluded]
    rng = random.Random(SEED)
    chosen_ids = rng.sample(candidates, N_PAIRS)
    solutions = {i: clean_solution(source[i]["answer"]) for i in chosen_ids}
    next_in_cycle = {}
    for skip, n in (TRAIN, DEV, HELD_OUT):  # donors from the pair's own split: no solution crosses splits
        cycle = chosen_ids[skip:skip + n]
        rng.shuffle(cycle)
        next_in_cycle.update({a: cycle[(i + 1) % len(cycle)] for i, a in enumerate(cycle)})
    rows = []
    for position, index in enumerate(chosen_ids):
        kind, donor = "mismatched", next_in_cycle[index]
        rejected = solutions[donor]
        if position % 2 == 1:
            wrong = wrong_final_answer(solutions[index], rng)
            if wrong is not None and wrong != solutions[index]:
                kind, donor, rejected = "wrong_answer", index, wrong
        rows.append({"id": f"gsm8k-train-{index}", "prompt": source[index]["question"].strip(), "chosen": solutions[index],
                     "rejected": rejected, "rejected_kind": kind, "rejected_from": f"gsm8k-train-{donor}"})
    return rows


def build_gsm8k_preference(target: Path) -> Path:
    """Write the set to `target` (atomically) with `<target>.provenance.json`; the same source gives the same bytes."""
    rows = gsm8k_preference_rows()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(target)
    kinds = {kind: sum(r["rejected_kind"] == kind for r in rows) for kind in ("mismatched", "wrong_answer")}
    write_json_atomic(target.with_name(target.name + ".provenance.json"), {
        "name": GSM8K_PREFERENCE, "built_by": "safekeel.data.benign_preference.build_gsm8k_preference",
        "source": SOURCE, "source_sha256": sha256_file(data_file(SOURCE)), "excluded": EXCLUDED, "seed": SEED,
        "n_pairs": len(rows), "rejected_kinds": kinds, "splits": {"train": TRAIN, "dev": DEV, "held_out": HELD_OUT},
        "sha256": sha256_file(target)})
    return target


DERIVED_DATASETS: dict[str, Callable[[Path], Path]] = {GSM8K_PREFERENCE: build_gsm8k_preference}
"""Datasets safekeel derives from the public reference data, by the name grids use for them."""


def derived_dataset(name: str, folder: Path | None = None) -> Path | None:
    """The local file of a derived dataset (built on first use under $SAFEKEEL_HOME/derived), or None when `name` is
    not one (DERIVED_DATASETS)."""
    if name not in DERIVED_DATASETS:
        return None
    target = (folder or safekeel_home()) / name
    if not target.is_file():
        DERIVED_DATASETS[name](target)
    return target
