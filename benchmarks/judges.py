"""Judges against blind labels: sample the agreement set, build the content judge, measure every judge.

    python benchmarks/judges.py sample [--plan benchmarks/judges/rerun_plan_agreement.json]
    python benchmarks/judges.py batches --annotator a --seed 1 --n 2 --out /tmp/annotation/a
    python benchmarks/judges.py enrich --wave 7 --n 100   # a positive-enriched test stratum, reported apart
    python benchmarks/judges.py census --wave 13          # the confirm census (benchmarks/judges/census_plan.md)
    python benchmarks/judges.py train-pool --wave 14      # train-split replies where harmful content can be
    python benchmarks/judges.py status
    python benchmarks/judges.py build          # train candidates on the train split; the best by CV to benchmarks/cache
    python benchmarks/judges.py build --ship   # ... and replace the shipped content judge with it
    python benchmarks/judges.py build --families --lm-head   # also boosting, the cross-encoder, the 135M LoRA head (fold 0)
    python benchmarks/judges.py build --cross-encoder --lm-head --public-rows 500 --epochs 2   # the fine-tuned two only
    python benchmarks/judges.py candidate-eval --folder benchmarks/cache/content_cross_encoder   # on test and census-U
    python benchmarks/judges.py report         # benchmarks/results/judges.{json,md} (780 s alone over 101 kept runs)
    python benchmarks/judges.py render         # judges.md again from judges.json

Files (benchmarks/judges/): guideline.md (what annotators get), agreement_items.jsonl (items with their
hidden metadata: run, condition, prompt set, split), labels/{a,b,adjudicator}/*.jsonl (blind labels),
rerun_plan_agreement.json (the runs whose replies are sampled).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safekeel.eval.judges import agreement  # noqa: E402

JUDGES_DIR = ROOT / "benchmarks" / "judges"
RESULTS = ROOT / "benchmarks" / "results"
ITEMS = JUDGES_DIR / "agreement_items.jsonl"
LABELS = JUDGES_DIR / "labels"

log = logging.getLogger("judges")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_labels(annotator: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted((LABELS / annotator).glob("*.jsonl")):
        out.update(agreement.parse_labels(path))
    return out


def cmd_sample(args) -> None:
    """Add items for every planned run whose replies exist and that has no items yet (waves compose)."""
    from safekeel.eval.replies import read_replies, replies_path
    from safekeel.bench.rerun import committed_record

    items = read_jsonl(ITEMS)
    done_runs = {(i["meta"]["grid"], i["meta"]["run_id"]) for i in items}
    present = {i["id"] for i in items}
    added = []
    for entry in json.loads(args.plan.read_text()):
        key = (entry["grid"], entry["run_id"])
        path = replies_path(RESULTS, *key)
        if (key in done_runs) != bool(args.top_up) or not path.is_file():
            continue
        config = committed_record(RESULTS, *key)["config"]
        if args.top_up:  # more replies to evaluation harmful prompts from runs already sampled (a new seed, no repeats)
            if config["kind"] == "aligned":
                continue
            rows = [r for r in read_replies(path)
                    if agreement.item_id(key[0], key[1], r["set"], r.get("id", r["prompt"])) not in present]
            quota, seed = agreement.Quota(args.top_up, 0, 0, 0), args.seed + 1000 * args.wave
        else:
            rows = read_replies(path)
            quota = agreement.Quota(*args.quota) if config["kind"] != "aligned" else agreement.Quota(4, 2, 2, 1)
            seed = args.seed
        new = agreement.sample_items([(key[0], key[1], config, rows)], quota, seed=seed)
        for item in new:
            item["meta"].pop("judgements", None)  # judges are rejudged at report time, never stored beside labels
            item["meta"]["wave"] = args.wave
        added += new
    write_jsonl(ITEMS, items + added)
    print(f"{len(added)} items added from {len({(i['meta']['grid'], i['meta']['run_id']) for i in added})} runs; {len(items) + len(added)} in all")


ENRICH_MIN_WORDS = 25


def enrichment_candidates(plan: list[dict], present: set[str]) -> tuple[list[tuple], int]:
    """Replies of fine-tuned reruns to evaluation (test-split) harmful prompts that the refusal classifier, as recorded
    in the replies, did not call refused and that have at least ENRICH_MIN_WORDS words: where harmful content can be.
    Returns ((grid, run, config, row) not yet sampled, the number of test-split harmful-prompt replies they come from)."""
    from safekeel.bench.rerun import committed_record
    from safekeel.eval.replies import read_replies, replies_path

    candidates, universe = [], 0
    for entry in plan:
        key = (entry["grid"], entry["run_id"])
        path = replies_path(RESULTS, *key)
        config = committed_record(RESULTS, *key)["config"] if path.is_file() else None
        if config is None or config["kind"] == "aligned":
            continue
        for row in read_replies(path):
            if row["kind"] not in agreement.HARMFUL_KINDS or agreement.split_of(row["set"]) != "test":
                continue
            universe += 1
            eligible = (row["judgements"]["classifier"]["refused"] is False
                        and len((row["response"] or "").split()) >= ENRICH_MIN_WORDS)
            if eligible and agreement.item_id(*key, row["set"], row.get("id", row["prompt"])) not in present:
                candidates.append((*key, config, row))
    return candidates, universe


def cmd_enrich(args) -> None:
    """A positive-enriched test stratum: N replies drawn at random from enrichment_candidates. Its items carry
    meta.stratum = "enriched" with the stratum's size, so the report keeps them out of the representative test
    split (whose rates estimate the judges' errors on ordinary replies) and measures them apart (miss rates need
    replies that do contain harmful content, which are rare: 8 of 447 in waves 1-6)."""
    import random

    items = read_jsonl(ITEMS)
    present = {i["id"] for i in items}
    candidates, universe = enrichment_candidates(json.loads(args.plan.read_text()), present)
    chosen = random.Random(f"enrich|{args.seed}|{args.wave}").sample(candidates, min(args.n, len(candidates)))
    added = []
    for grid, run, config, row in chosen:
        item = agreement.sample_items([(grid, run, config, [row])], agreement.Quota(1, 1, 1, 1), seed=0)[0]
        item["meta"].pop("judgements", None)
        item["meta"].update(wave=args.wave, stratum="enriched", stratum_eligible=len(candidates), stratum_universe=universe,
                            stratum_rule=f"classifier not refused and >= {ENRICH_MIN_WORDS} words; test-split harmful prompts")
        added.append(item)
    write_jsonl(ITEMS, items + added)
    print(f"{len(added)} enriched items from {len(candidates)} eligible of {universe} test-split harmful-prompt replies "
          f"({len({(i['meta']['grid'], i['meta']['run_id']) for i in added})} runs); {len(items) + len(added)} items in all")


def cmd_census(args) -> None:
    """Add the census items (judges_census) of every kept run of the grids (the aligned model's too); resumable."""
    from judges_census import census_items
    from safekeel.eval.rejudge import find_runs
    from safekeel.eval.replies import read_replies

    items = read_jsonl(ITEMS)
    present = {i["id"] for i in items}
    added, runs = [], 0
    for grid in args.grid or ["confirm"]:
        for run in find_runs(grid, RESULTS):
            new = census_items(grid, run.run_id, run.record["config"], read_replies(run.replies), present, args.wave)
            present |= {i["id"] for i in new}
            added += new
            runs += bool(new)
    write_jsonl(ITEMS, items + added)
    print(f"{len(added)} census items added from {runs} runs; {len(items) + len(added)} items in all")


def cmd_train_pool(args) -> None:
    """Train-split items for the content judge: every reply of a kept fine-tuned run to a train-split harmful prompt
    (prompts no evaluation asks) that the refusal classifier, as recorded, did not call refused, not yet an item.
    meta.stratum = "train-enriched": the judge trains on them; the report keeps them out of the representative train
    rows. Replies to evaluation prompts (the test split) never enter."""
    from safekeel.bench.rerun import committed_record
    from safekeel.eval.replies import read_replies, replies_path

    items = read_jsonl(ITEMS)
    present = {i["id"] for i in items}
    added, runs = [], set()
    for path in sorted((RESULTS / "replies").glob("*/*.jsonl.gz")):
        grid, run_id = path.parent.name, path.name.split(".")[0]
        config = committed_record(RESULTS, grid, run_id)["config"]
        if config["kind"] == "aligned":
            continue
        for row in read_replies(replies_path(RESULTS, grid, run_id)):
            if (row["kind"] not in agreement.HARMFUL_KINDS or agreement.split_of(row["set"]) != "train"
                    or (row.get("judgements") or {}).get("classifier", {}).get("refused") is True):
                continue
            item = agreement.sample_items([(grid, run_id, config, [row])], agreement.Quota(1, 1, 1, 1), seed=0)[0]
            if item["id"] in present:
                continue
            item["meta"].pop("judgements", None)
            item["meta"].update(wave=args.wave, stratum="train-enriched",
                                stratum_rule="train-split harmful prompt; the recorded classifier did not call the reply refused")
            present.add(item["id"])
            added.append(item)
            runs.add((grid, run_id))
    write_jsonl(ITEMS, items + added)
    print(f"{len(added)} train-enriched items from {len(runs)} runs; {len(items) + len(added)} items in all")


def cmd_batches(args) -> None:
    """Annotator batches ({id, prompt, reply} only) of the items not yet labelled by this annotator."""
    labelled = load_labels(args.annotator) if (LABELS / args.annotator).is_dir() else {}
    items = [i for i in read_jsonl(ITEMS) if i["id"] not in labelled and (args.wave is None or i["meta"].get("wave") == args.wave)]
    if args.ids:
        wanted = set(Path(args.ids).read_text().split())
        items = [i for i in items if i["id"] in wanted]
    batches = agreement.annotator_batches(items, args.n, seed=args.seed)
    for number, batch in enumerate(batches, 1):
        write_jsonl(args.out / f"batch_{number}.jsonl", batch)
    print(f"{len(items)} items in {len(batches)} batches under {args.out}")


def cmd_status(args) -> None:
    items = read_jsonl(ITEMS)
    a, b = load_labels("a"), load_labels("b")
    both = [i["id"] for i in items if i["id"] in a and i["id"] in b]
    print(f"items {len(items)}; labelled by a {len(a)}, by b {len(b)}, by both {len(both)}")
    if both:
        for q in agreement.QUESTIONS:
            print(f"  kappa {q}: {agreement.cohen_kappa([a[i][q] for i in both], [b[i][q] for i in both])}")
        disputed = agreement.disagreements({i: a[i] for i in both}, {i: b[i] for i in both})
        third = load_labels("adjudicator")
        print(f"  items with a disagreement {len(disputed)}; adjudicated {sum(i in third for i in disputed)}")
        if args.disputed_out:
            args.disputed_out.write_text("\n".join(i for i in disputed if i not in third) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample")
    sample.add_argument("--plan", type=Path, default=JUDGES_DIR / "rerun_plan_agreement.json")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--wave", type=int, default=1)
    sample.add_argument("--top-up", type=int, default=0, metavar="N",
                        help="instead of new runs: N more replies to evaluation harmful prompts from each run already sampled")
    sample.add_argument("--quota", type=int, nargs=4, default=[16, 6, 12, 4], metavar=("TEST_HARMFUL", "TEST_SAFE", "TRAIN_HARMFUL", "TRAIN_SAFE"),
                        help="replies sampled per fine-tuned run (wave 1 used 10 5 7 3)")
    enrich = sub.add_parser("enrich", help="a positive-enriched test stratum (kept apart in the report)")
    enrich.add_argument("--plan", type=Path, default=JUDGES_DIR / "rerun_plan_agreement.json")
    enrich.add_argument("--n", type=int, default=100)
    enrich.add_argument("--seed", type=int, default=0)
    enrich.add_argument("--wave", type=int, required=True)
    census = sub.add_parser("census", help="the confirm census: every reply the classifier did not call refused, and a sample of the rest")
    census.add_argument("--wave", type=int, required=True)
    census.add_argument("--grid", action="append", default=[], help="a grid with kept replies (repeatable; default: confirm)")
    pool = sub.add_parser("train-pool", help="train-split replies the classifier did not call refused (judge training data)")
    pool.add_argument("--wave", type=int, required=True)
    batches = sub.add_parser("batches")
    batches.add_argument("--annotator", required=True)
    batches.add_argument("--seed", type=int, required=True)
    batches.add_argument("--n", type=int, default=2)
    batches.add_argument("--wave", type=int, default=None)
    batches.add_argument("--ids", default=None, help="a file of item ids (e.g. the disputed ones, for the adjudicator)")
    batches.add_argument("--out", type=Path, required=True)
    status = sub.add_parser("status")
    status.add_argument("--disputed-out", type=Path, default=None)
    build = sub.add_parser("build")
    build.add_argument("--families", action="store_true",
                       help="also compare gradient boosting and the MiniLM cross-encoder on fold 0 (tens of minutes of CPU)")
    build.add_argument("--ship", action="store_true",
                       help="write the best candidate over the shipped safekeel/eval/assets/content_judge.json (default: "
                            "benchmarks/cache/content_judge_candidate.json)")
    build.add_argument("--cross-encoder", action="store_true",
                       help="also compare the MiniLM cross-encoder on fold 0 (without boosting)")
    build.add_argument("--lm-head", action="store_true",
                       help="also compare SmolLM2-135M with LoRA and a classification head on fold 0 (the expensive one: "
                            "11.6 s a step of 16 rows alone on 2 cores, about 140 steps an epoch by default)")
    build.add_argument("--public-rows", type=int, default=None,
                       help="train the fine-tuned candidates (--cross-encoder, --lm-head) on a seeded sample of this many "
                            "public rows (default: all for the cross-encoder, 1500 for the LM head); every project row is kept")
    build.add_argument("--epochs", type=float, default=1.0, help="passes over the training rows of the fine-tuned candidates")
    candidate = sub.add_parser("candidate-eval", help="saved fine-tuned candidates against the test split and census-U")
    candidate.add_argument("--folder", action="append", required=True,
                           help="a saved candidate (benchmarks/cache/content_cross_encoder, .../content_lm_head); repeatable")
    report = sub.add_parser("report")
    report.add_argument("--judgement-cache", type=Path, default=None,
                        help="SQLite file of stored verdicts (default: $SAFEKEEL_HOME/judgements.sqlite)")
    report.add_argument("--no-cache", action="store_true", help="judge every reply again, storing nothing")
    sub.add_parser("render", help="judges.md again from judges.json (no judging)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "candidate-eval":
        import judges_candidates  # noqa: F401  (benchmarks/judges_candidates.py)

        judges_candidates.cmd_candidate_eval(args)
    elif args.command in ("build", "report", "render"):
        import judges_report  # noqa: F401  (benchmarks/judges_report.py)

        getattr(judges_report, f"cmd_{args.command}")(args)
    else:
        globals()[f"cmd_{args.command.replace('-', '_')}"](args)


if __name__ == "__main__":
    main()
