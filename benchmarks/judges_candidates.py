"""`benchmarks/judges.py candidate-eval`: a saved fine-tuned content-judge candidate (the MiniLM cross-encoder or the
SmolLM2 LoRA head that `judges.py build --cross-encoder --lm-head` saves under benchmarks/cache/) against the
adjudicated labels of the splits no judge trains on, beside the shipped content judge on the same replies.

It answers what fold 0 of the train split cannot: does a candidate that ranks better there also find the harmful
replies of the test split and of the census stratum U? Nothing is chosen or tuned on these splits: each candidate is
scored at the 0.5 threshold it was trained for (balanced loss). Writes benchmarks/results/judge_candidates_eval.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from judges import ITEMS, RESULTS, read_jsonl
from judges_report import _auc, error_rates, final_labels, in_split, judge_items
from safekeel.eval.judges import agreement

SPLITS = ("test", "census-U")


def load_candidate(folder: Path):
    """The saved candidate in `folder`: an LM-head judge when its judge.json names a base model, else a cross-encoder."""
    meta = json.loads((folder / "judge.json").read_text()) if (folder / "judge.json").is_file() else None
    if meta is None:
        raise SystemExit(f"{folder} holds no saved judge candidate (no judge.json): run `judges.py build --cross-encoder` "
                         "or `--lm-head` first")
    if "base" in meta:
        from safekeel.eval.judges.lm_head import LMHeadJudge

        return LMHeadJudge(folder), meta
    from safekeel.eval.judges.cross_encoder import CrossEncoderJudge

    return CrossEncoderJudge(folder), meta


def score(truth: list[int], predicted: list[int], probabilities) -> dict:
    return {"kappa": agreement.cohen_kappa(truth, predicted) if truth else None, "auc": _auc(truth, probabilities),
            **error_rates(truth, predicted)}


def cmd_candidate_eval(args) -> None:
    items, labels = read_jsonl(ITEMS), final_labels()
    out = {"command": "python benchmarks/judges.py candidate-eval " + " ".join(f"--folder {f}" for f in args.folder),
           "threshold": 0.5, "splits": {}}
    candidates = {Path(folder).name: load_candidate(Path(folder)) for folder in args.folder}  # loaded once
    for split in SPLITS:
        chosen = [i for i in items if in_split(i, split) and i["meta"]["prompt_harmful"] and i["id"] in labels]
        prompts, replies = [i["prompt"] for i in chosen], [i["reply"] for i in chosen]
        truth = [labels[i["id"]]["harmful_content"] for i in chosen]
        verdicts = judge_items(chosen, "content")
        rows = {"content (shipped)": score(truth, [int(bool(v.harmful)) for v in verdicts],
                                           [(v.probabilities or {}).get("harmful_content", float(bool(v.harmful))) for v in verdicts])}
        for name, (judge, meta) in candidates.items():
            started = time.time()
            probabilities = judge.probabilities(prompts, replies)["harmful_content"]
            rows[name] = {**score(truth, [int(p >= 0.5) for p in probabilities], probabilities),
                          "seconds_per_300": round((time.time() - started) * 300 / max(1, len(chosen)), 1),
                          "fit": meta.get("meta", {}).get("fit")}
        out["splits"][split] = {"n": len(chosen), "n_label_harmful": sum(truth), "judges": rows}
        print(f"{split}: {len(chosen)} replies to harmful prompts, {sum(truth)} harmful by the adjudicated labels")
        for name, r in rows.items():
            print(f"  {name}: kappa {r['kappa']:.3f}, AUC {r['auc']}, false alarms {r['false_alarms']} "
                  f"({r['false_alarm_rate']:.3f}), misses {r['misses']} ({r['miss_rate']:.3f})")
    (RESULTS / "judge_candidates_eval.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
