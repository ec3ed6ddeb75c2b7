"""Labelled concept data for probes (toxicity, hazardous cyber knowledge), read from the data folders'
`probing/` (see ../shared/data/probing/README.md: sources, labels, licenses; never copied into the repo).

Every row has `id, text, label` (1 = the concept is present) plus its source's own columns (the Kaggle
head's six toxicity sub-labels, Davidson's class, MMLU's subject and `neg_group`, ...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from safekeel.data.home import data_file
from safekeel.data.jsonl import read_jsonl

PROBING_FILES = {
    "jigsaw_wiki": "probing/toxicity_jigsaw_wiki_binary.jsonl",
    "jigsaw_kaggle_head": "probing/toxicity_jigsaw_kaggle_head.jsonl",
    "davidson": "probing/toxicity_davidson_tweets.jsonl",
    "wmdp_cyber": "probing/hazard_wmdp_cyber.jsonl",
    "mmlu_benign": "probing/hazard_mmlu_benign.jsonl",
}
TOXICITY_SUBLABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


@dataclass(frozen=True)
class LabelledTexts:
    name: str
    texts: list[str]
    labels: list[int]
    ids: list[str]
    extra: list[dict] = field(default_factory=list)
    """Each row's other columns (sub-labels, subject, ...), aligned with texts."""

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, keep, name: str | None = None) -> "LabelledTexts":
        """The rows for which keep(extra row, label) is true."""
        rows = [i for i in range(len(self)) if keep(self.extra[i], self.labels[i])]
        return self.take(rows, name or self.name)

    def take(self, rows, name: str | None = None) -> "LabelledTexts":
        rows = list(rows)
        return LabelledTexts(name or self.name, [self.texts[i] for i in rows], [self.labels[i] for i in rows],
                             [self.ids[i] for i in rows], [self.extra[i] for i in rows])


def load_probing(name: str) -> LabelledTexts:
    """One probing source by short name (PROBING_FILES); `text` as stored (question stems only for WMDP/MMLU)."""
    if name not in PROBING_FILES:
        raise ValueError(f"unknown probing source {name!r}; known: {', '.join(PROBING_FILES)}")
    rows = read_jsonl(data_file(PROBING_FILES[name], purpose=f"concept probes ({name})"))
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
            raise ValueError(f"{PROBING_FILES[name]} row {number}: needs a string `text` and a 0/1 `label`")
    return LabelledTexts(name, [r["text"] for r in rows], [int(r["label"]) for r in rows], [str(r["id"]) for r in rows],
                         [{k: v for k, v in r.items() if k not in ("text", "label", "id")} for r in rows])


def balanced_sample(data: LabelledTexts, n_per_label: int, seed: int = 0, exclude: set[str] | frozenset = frozenset()) -> LabelledTexts:
    """Up to n rows of each label (seeded), skipping ids in `exclude`; rows keep the file order."""
    rng = random.Random(f"{data.name}-{seed}")
    chosen: list[int] = []
    for label in (1, 0):
        rows = [i for i, y in enumerate(data.labels) if y == label and data.ids[i] not in exclude]
        chosen += rng.sample(rows, min(n_per_label, len(rows)))
    return data.take(sorted(chosen), f"{data.name}@{n_per_label}x2")


def split_rows(data: LabelledTexts, sizes: dict[str, int], seed: int = 0) -> dict[str, LabelledTexts]:
    """Disjoint seeded splits (stratified by label: each split gets half positives where the data allows)."""
    rng = random.Random(f"{data.name}-split-{seed}")
    by_label = {y: [i for i, v in enumerate(data.labels) if v == y] for y in (0, 1)}
    for rows in by_label.values():
        rng.shuffle(rows)
    out, used = {}, {0: 0, 1: 0}
    for name, size in sizes.items():
        rows = []
        for y in (1, 0):
            want = size // 2 + (size % 2 if y == 1 else 0)
            rows += by_label[y][used[y]:used[y] + want]
            used[y] += want
        out[name] = data.take(sorted(rows), f"{data.name}-{name}")
    return out
