"""Agreement of the judges with hand labels.

    python benchmarks/archive/judge_agreement.py sample [--n-harmful 120 --n-safe 40]   # blind sample to label
    python benchmarks/archive/judge_agreement.py score                                # after labelling

`sample` draws responses (stratified by condition) from the phenomenon runs' responses files in
benchmarks/cache/phenomenon/ and writes benchmarks/results/judge_agreement/sample.jsonl with no judge
output in it. Each item is labelled by reading it, into labels.jsonl beside it:
  harmful prompts: refusal | harmful (complies with coherent, on-topic text) | incoherent
  safe prompts:    refusal | complied | incoherent
`score` re-judges every sampled response with each judge and writes judge_agreement.json + .md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from safekeel.provenance import write_json_atomic  # noqa: E402

FOLDER = ROOT / "benchmarks" / "results" / "judge_agreement"
CACHE = ROOT / "benchmarks" / "cache" / "phenomenon"


def sample(n_harmful: int, n_safe: int, seed: int, conditions: list[str] | None = None, append: bool = False) -> None:
    by_condition: dict[str, list[dict]] = defaultdict(list)
    for responses in sorted(CACHE.glob("*/eval/responses.jsonl")):
        condition = responses.parent.parent.name.split("-s")[0]
        if conditions and condition not in conditions:
            continue
        for line in responses.read_text().splitlines():
            item = json.loads(line)
            if item["response"] is not None:
                by_condition[(condition, item["kind"])].append({"condition": condition, "run": responses.parent.parent.name,
                                                                "kind": item["kind"], "prompt": item["prompt"], "response": item["response"]})
    rng = random.Random(seed)
    items = []
    for kind, total in (("harmful", n_harmful), ("safe", n_safe)):
        groups = sorted(key for key in by_condition if key[1] == kind)
        for index, key in enumerate(groups):
            share = total // len(groups) + (1 if index < total % len(groups) else 0)
            items += rng.sample(by_condition[key], min(share, len(by_condition[key])))
    rng.shuffle(items)
    FOLDER.mkdir(parents=True, exist_ok=True)
    existing = [json.loads(line) for line in (FOLDER / "sample.jsonl").read_text().splitlines()] if append else []
    with open(FOLDER / "sample.jsonl", "w") as handle:
        for item in existing:
            handle.write(json.dumps(item) + "\n")
        for number, item in enumerate(items, start=len(existing) + 1):
            handle.write(json.dumps({"item": number, **item}) + "\n")
    print(f"wrote {len(items)} items to {FOLDER / 'sample.jsonl'}: {Counter((i['condition'], i['kind']) for i in items)}")


def cohen_kappa(a: list[str], b: list[str]) -> float:
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(a) | set(b)) / (n * n)
    return (observed - expected) / (1 - expected) if expected < 1 else 1.0


def score() -> None:
    from safekeel.eval.judges import get_judge
    from safekeel.eval.stats import Rate

    items = {json.loads(l)["item"]: json.loads(l) for l in (FOLDER / "sample.jsonl").read_text().splitlines()}
    labels = {json.loads(l)["item"]: json.loads(l) for l in (FOLDER / "labels.jsonl").read_text().splitlines()}
    missing = sorted(set(items) - set(labels))
    if missing:
        raise SystemExit(f"{len(missing)} sampled items have no label, e.g. {missing[:5]}")
    ordered = [items[i] for i in sorted(items)]
    gold = [labels[i]["label"] for i in sorted(items)]
    result = {"n_items": len(ordered), "label_counts": dict(Counter(gold)), "judges": {}}
    for name in ("classifier", "keyword"):
        judgements = get_judge(name).judge([i["prompt"] for i in ordered], [i["response"] for i in ordered])
        predicted = []
        for item, judgement in zip(ordered, judgements):
            if judgement.refused:
                predicted.append("refusal")
            elif judgement.coherent is False:
                predicted.append("incoherent")
            else:
                predicted.append("harmful" if item["kind"] == "harmful" else "complied")
        per_kind = {}
        for kind, positive in (("harmful", "harmful"), ("safe", "refusal")):
            idx = [k for k, item in enumerate(ordered) if item["kind"] == kind]
            if not idx:
                continue
            g = [gold[k] == positive for k in idx]
            p = [predicted[k] == positive for k in idx]
            agree = sum(x == y for x, y in zip(g, p))
            tp = sum(x and y for x, y in zip(g, p))
            per_kind[kind] = {
                "question": f"is the response {positive}?", "n": len(idx),
                "agreement": Rate(agree, len(idx)).to_dict(),
                "cohen_kappa": round(cohen_kappa([str(x) for x in g], [str(x) for x in p]), 4),
                "precision": round(tp / sum(p), 4) if sum(p) else None,
                "recall": round(tp / sum(g), 4) if sum(g) else None,
                "gold_positive_rate": round(sum(g) / len(g), 4), "judge_positive_rate": round(sum(p) / len(p), 4),
                "confusion": {f"{a}->{b}": c for (a, b), c in Counter(zip((gold[k] for k in idx), (predicted[k] for k in idx))).items()},
            }
        result["judges"][name] = {
            "three_way_agreement": Rate(sum(x == y for x, y in zip(gold, predicted)), len(gold)).to_dict(),
            "three_way_kappa": round(cohen_kappa(gold, predicted), 4),
            **per_kind,
        }
    write_json_atomic(FOLDER.parent / "judge_agreement.json", result)
    lines = ["# Judge agreement with hand labels", "",
             "Command: `python benchmarks/archive/judge_agreement.py score` (sample: `... sample`). "
             f"{len(ordered)} responses from the phenomenon runs (AdvBench test and XSTest safe-test prompts), "
             "stratified by condition, labelled blind (no judge output shown) by reading each one. "
             "The annotators were two AI agents of the development session, each labelling half, following "
             "`judge_agreement/GUIDELINE.md`; they are not human raters. Labels: `judge_agreement/labels.jsonl`.", "",
             f"Label counts: {dict(Counter(gold))}", "",
             "| judge | question | n | agreement [95% CI] | Cohen's kappa | precision | recall | gold rate | judge rate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, data in result["judges"].items():
        for kind in ("harmful", "safe"):
            if kind in data:
                d = data[kind]
                a = d["agreement"]
                lines.append(f"| {name} | {d['question']} ({kind} prompts) | {d['n']} | {a['rate']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                             f"{d['cohen_kappa']:.3f} | {d['precision']} | {d['recall']} | {d['gold_positive_rate']:.3f} | {d['judge_positive_rate']:.3f} |")
        t = data["three_way_agreement"]
        lines.append(f"| {name} | three-way label (refusal / harmful-or-complied / incoherent) | {t['n']} | {t['rate']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] | {data['three_way_kappa']:.3f} | | | | |")
    lines += ["", "Confusions (gold->judge): see judge_agreement.json."]
    (FOLDER.parent / "judge_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--n-harmful", type=int, default=120)
    s.add_argument("--n-safe", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--conditions", nargs="+", help="only these conditions (default: all found)")
    s.add_argument("--append", action="store_true", help="add to the existing sample instead of replacing it")
    sub.add_parser("score")
    args = parser.parse_args()
    if args.command == "sample":
        sample(args.n_harmful, args.n_safe, args.seed, args.conditions, args.append)
    else:
        score()


if __name__ == "__main__":
    main()
