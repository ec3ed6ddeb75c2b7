"""Training data and training of the content judge (safekeel.eval.judges.content).

Training rows are (prompt, reply, {question: 0/1 or None}, weight, source). A head trains on the rows that
answer its question. Sources:
- public human labels in ../shared/data/judge_labels: XSTest rows of the project's dev half only (refusal,
  harmful_content), GPTFuzz and Safe-RLHF (harmful_content only: their "not harmful" mixes refusals and safe
  answers), Safe-RLHF rows whose prompt overlaps XSTest's test half dropped, exact duplicates dropped;
- the agreement set's train split (replies of the project's fine-tuned models to prompts no evaluation asks),
  with adjudicated labels for all four questions, weighted up (the weight is chosen by cross-validation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from safekeel.data.home import data_file
from safekeel.data.jsonl import read_jsonl
from safekeel.eval.judges.content import HEADS, ContentJudgeModel, dense_features, fit_vocabulary, lexical_features

PUBLIC_CAPS = {"gptfuzz_responses_labeled": 3000, "saferlhf_mini": 2000}
"""Rows kept per large public source (seeded sample), so the public data does not drown the project's replies."""


@dataclass
class Row:
    prompt: str
    reply: str
    labels: dict
    """{question: 0/1 or None}"""
    weight: float = 1.0
    source: str = ""
    group: str = ""
    """Rows of one group (a prompt) stay on one side of a cross-validation split."""


def public_rows(seed: int = 0, caps: Mapping[str, int] = PUBLIC_CAPS) -> list[Row]:
    """The public human-labelled replies a judge may train on (see the module docstring)."""
    rows: list[Row] = []
    for name in ("xstest_v2_completions", "gptfuzz_responses_labeled", "saferlhf_mini"):
        seen = set()
        kept: list[Row] = []
        for item in read_jsonl(data_file(f"judge_labels/{name}.jsonl")):
            if any(tag.startswith("xstest:test") for tag in item.get("eval_overlap", [])):
                continue
            if name == "xstest_v2_completions" and item["meta"].get("project_split") != "dev":
                continue
            key = (item["prompt"], item["response"])
            if key in seen or not item["response"] or not item["response"].strip():
                continue
            seen.add(key)
            labels = {q: None for q in HEADS}
            labels["harmful_content"] = int(bool(item["harmful"]))
            if name == "xstest_v2_completions":
                labels["refusal"] = int(item["label"] == "refusal")
            kept.append(Row(item["prompt"], item["response"], labels, 1.0, name, f"{name}:{item['prompt']}"))
        cap = caps.get(name)
        if cap and len(kept) > cap:
            kept = random.Random(f"{name}-{seed}").sample(kept, cap)
        rows += kept
    return rows


def agreement_rows(items: Sequence[dict], labels: Mapping[str, dict], split: str = "train", weight: float = 1.0) -> list[Row]:
    """Labelled agreement-set items of one split as training rows."""
    out = []
    for item in items:
        if item["meta"]["split"] != split or item["id"] not in labels:
            continue
        label = labels[item["id"]]
        out.append(Row(item["prompt"], item["reply"], {q: int(label[q]) for q in HEADS}, weight, "agreement:" + split,
                       "prompt:" + item["prompt"]))
    return out


class FeatureCache:
    """Dense features of (prompt, reply) pairs, computed once per pair and kept in an .npz file."""

    def __init__(self, path: str | Path | None, embedder: str):
        self.path = Path(path) if path else None
        self.embedder = embedder
        self.table: dict[str, np.ndarray] = {}
        if self.path and self.path.is_file():
            with np.load(self.path) as data:
                self.table = {key: data[key] for key in data.files}

    @staticmethod
    def key(prompt: str, reply: str) -> str:
        from safekeel.provenance import sha256_json

        return sha256_json([prompt, reply])[:24]

    def get(self, prompts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        keys = [self.key(p, r) for p, r in zip(prompts, replies)]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.table}.items(), key=lambda kv: kv[1])
        if missing:
            index = [i for _, i in missing]
            computed = dense_features([prompts[i] for i in index], [replies[i] for i in index], self.embedder)
            for (key, _), vector in zip(missing, computed):
                self.table[key] = vector
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(self.path, **self.table)
        return np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)


def _fit_head(features: np.ndarray, y: np.ndarray, w: np.ndarray, kind: str, seed: int, c: float = 1.0):
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    elif kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, max_leaf_nodes=15, l2_regularization=1.0,
                                               random_state=seed)
    else:
        raise ValueError(f"unknown head kind {kind!r}; known: logistic, boosting")
    model.fit(features, y, sample_weight=w)
    return model


@dataclass
class TrainedHeads:
    """Fitted heads of one candidate (any sklearn classifier), with the vocabulary its features use."""

    kind: str
    vocabulary: list[str]
    models: dict
    embedder: str

    def probabilities(self, dense: np.ndarray, replies: Sequence[str]) -> dict[str, np.ndarray]:
        features = np.hstack([dense, lexical_features(replies, self.vocabulary)])
        return {name: model.predict_proba(features)[:, 1] for name, model in self.models.items()}

    def to_model(self, meta: dict) -> ContentJudgeModel:
        """The shippable form (logistic heads only)."""
        if self.kind != "logistic":
            raise ValueError("only logistic heads ship as JSON")
        heads = {name: {"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "threshold": 0.5}
                 for name, model in self.models.items()}
        return ContentJudgeModel(self.embedder, self.vocabulary, heads, meta)


def train_heads(rows: Sequence[Row], dense: np.ndarray, kind: str = "logistic", seed: int = 0, c: float = 1.0,
                embedder: str = "all-minilm-l6-v2") -> TrainedHeads:
    """One head per question, each on the rows that answer it (dense: dense features of the rows, in order)."""
    vocabulary = fit_vocabulary([r.reply for r in rows])
    features = np.hstack([dense, lexical_features([r.reply for r in rows], vocabulary)])
    models = {}
    for head in HEADS:
        index = np.array([i for i, r in enumerate(rows) if r.labels.get(head) is not None])
        if len(index) == 0:
            continue
        y = np.array([rows[i].labels[head] for i in index])
        if len(set(y.tolist())) < 2:
            continue
        w = np.array([rows[i].weight for i in index], dtype=np.float64)
        models[head] = _fit_head(features[index], y, w, kind, seed, c)
    return TrainedHeads(kind, vocabulary, models, embedder)
