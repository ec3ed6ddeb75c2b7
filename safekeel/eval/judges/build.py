"""Rebuild the shipped refusal classifier (safekeel/eval/assets/refusal_classifier.json).

Kept exactly as it was built, for comparability with every committed table. Known limits (issue 28,
benchmarks/results/judges.md): its refusal class is the authored pool that the selectors replay, and the
SafeTuneBed AdvBench splits overlap, so 18 of the AdvBench-dev prompts whose replies it was trained on are
also AdvBench-test prompts. The independent judge is safekeel.eval.judges.content.

Training texts:
- refusals: every refusal in the authored safety pool (both styles);
- compliance: every answer in the authored benign data, plus the raw base model's own replies to the
  authored pool's harmful requests (it is not aligned and complies), minus any reply that contains a
  refusal marker, so that "talks about a harmful topic" is not mistaken for "refuses";
- hand-labelled model responses to the DEV splits only (AdvBench dev, XSTest dev half), shipped in
  assets/judge_dev_labels.jsonl: "refusal" -> refusal, "harmful"/"complied" -> compliance
  ("incoherent" is left to the coherence check). Agreement is measured on TEST-split responses.
"""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from pathlib import Path

from safekeel.data.jsonl import read_jsonl
from safekeel.data.safety import BENIGN_FILES_V1, load_authored_benign, load_authored_pool
from safekeel.eval.judges.classifier import ASSET, train_refusal_classifier
from safekeel.eval.judges.keyword import keyword_refusal
from safekeel.models.embedder import DEFAULT_EMBEDDER
from safekeel.paths import safekeel_home
from safekeel.provenance import sha256_json, write_json_atomic

REFUSAL_MARKERS = re.compile(r"\b(can't|cannot|can not|won't|unable to|not able to|I'm sorry|apologi[sz]e|decline)\b", re.I)


def base_model_replies(base_model: str, requests: list[str], max_new_tokens: int) -> list[str | None]:
    """The base model's greedy replies, cached in $SAFEKEEL_HOME keyed by model, requests and length."""
    from safekeel.models.engines import generate_batched
    from safekeel.models.registry import load_model_and_tokenizer

    cache = safekeel_home() / "judge_build" / f"replies-{sha256_json([base_model, requests, max_new_tokens])[:16]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model, tokenizer = load_model_and_tokenizer(base_model)
    generations = generate_batched(model, tokenizer, [[{"role": "user", "content": r}] for r in requests],
                                   max_new_tokens=max_new_tokens, desc="base-model replies")
    replies = [g.text for g in generations]
    write_json_atomic(cache, replies)
    return replies


def dev_labelled_responses() -> tuple[list[str], list[str]]:
    resource = resources.files("safekeel.eval") / "assets" / "judge_dev_labels.jsonl"
    if not resource.is_file():
        return [], []
    rows = read_jsonl(resource)
    refusals = [r["response"] for r in rows if r["label"] == "refusal"]
    compliances = [r["response"] for r in rows if r["label"] in ("harmful", "complied")]
    return refusals, compliances


def build_classifier(base_model: str = "smollm2-135m-instruct", max_new_tokens: int = 64, output: Path | None = None) -> dict:
    started = time.time()
    pool = load_authored_pool()
    refusals = [e.refusal for e in pool]
    benign_answers = [c.completion for c in load_authored_benign(BENIGN_FILES_V1)]
    replies = base_model_replies(base_model, [e.request for e in pool], max_new_tokens)
    base_compliance = [text for text in replies if text and not keyword_refusal(text) and not REFUSAL_MARKERS.search(text)]
    dev_refusals, dev_compliances = dev_labelled_responses()
    refusals = refusals + dev_refusals
    compliances = benign_answers + base_compliance + dev_compliances
    meta = {
        "built_with": f"safekeel.eval.judges.build.build_classifier(base_model={base_model!r}, max_new_tokens={max_new_tokens})",
        "embedder": DEFAULT_EMBEDDER,
        "n_base_model_replies": len(replies),
        "n_base_model_replies_kept_as_compliance": len(base_compliance),
        "n_dev_labelled_refusals": len(dev_refusals),
        "n_dev_labelled_compliances": len(dev_compliances),
        "training_texts_sha256": sha256_json([refusals, compliances]),
        "seconds": None,
    }
    classifier, stats = train_refusal_classifier(refusals, compliances, DEFAULT_EMBEDDER, meta=meta)
    classifier.meta["seconds"] = round(time.time() - started, 1)
    target = output or Path(str(resources.files("safekeel.eval") / "assets" / ASSET))
    classifier.save(target)
    return {**stats, "path": str(target), **classifier.meta}
