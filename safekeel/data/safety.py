"""Safety pools (harmful request + refusal) and the project's own authored data shipped in the package."""

from __future__ import annotations

from typing import Sequence

import json
from importlib import resources
from pathlib import Path

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.data.formats import DatasetError, load_conversations

HARM_CATEGORIES = (
    "illegal_activity", "child_abuse", "hate_harass_violence", "malware", "physical_harm",
    "economic_harm", "fraud_deception", "adult_content", "political_campaigning",
    "privacy_violation", "tailored_financial_advice",
)
AUTHORED_POOL = "authored"
SHARED_POOLS = {"safety_tuned_llamas": "safety_pool/safety_tuned_llamas_2483.json"}
"""Named pools read from the shared reference data (../shared/data), never shipped: Bianchi et al.'s
Safety-Tuned LLaMAs safety-only instructions (2,483 harmful requests with refusals; CC BY-NC 4.0)."""


def _authored_dir():
    return resources.files("safekeel.data") / "authored"


def _read_jsonl(resource) -> list[dict]:
    rows = []
    for number, line in enumerate(resource.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(str(resource), number, None, f"invalid JSON: {error.msg}") from None
    return rows


def load_authored_pool() -> list[SafetyExample]:
    """The authored safety pool: >= 300 examples over the 11 HEx-PHI categories, two refusal styles."""
    examples = []
    for resource in sorted(_authored_dir().iterdir(), key=lambda r: r.name):
        if resource.name.startswith("safety_pool") and resource.name.endswith(".jsonl"):
            for row in _read_jsonl(resource):
                examples.append(SafetyExample(
                    id=row["id"], category=row["category"], request=row["request"],
                    refusal=row["refusal"], style=row.get("style", "unknown"),
                    source=f"safekeel/authored/{resource.name}",
                ))
    return examples


BENIGN_FILES_V1 = ("benign.jsonl", "benign_borderline_2.jsonl", "benign_general_2.jsonl")
"""The benign files the shipped organism (v3) and the shipped judge were built from; the later
borderline files (_3, _4) were tried for organism v4 (see benchmarks/results/organism.md)."""


def load_authored_benign(files: Sequence[str] | None = None) -> list[Conversation]:
    """Authored benign pairs, including borderline-but-safe requests answered helpfully (a request
    written twice across files is kept once). `files`: only these file names (default: all)."""
    conversations, seen = [], set()
    for resource in sorted(_authored_dir().iterdir(), key=lambda r: r.name):
        if files is not None and resource.name not in files:
            continue
        if resource.name.startswith("benign") and resource.name.endswith(".jsonl"):
            for row in _read_jsonl(resource):
                key = row["request"].strip().lower()
                if key not in seen:
                    seen.add(key)
                    conversations.append(Conversation.from_pair(
                        row["request"], row["answer"], source=f"safekeel/authored/{resource.name}:{row['id']}",
                        meta={"id": row["id"], "kind": row["kind"]}))
    return conversations


def shared_pool_path(name: str) -> Path:
    """The file of a named shared pool (SHARED_POOLS); FileNotFoundError saying what is missing."""
    from safekeel.paths import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / SHARED_POOLS[name]).is_file():
        where = root / SHARED_POOLS[name] if root is not None else f"../shared/data/{SHARED_POOLS[name]}"
        raise FileNotFoundError(f"safety pool {name!r} reads {where}, which is not present (the shared reference "
                                "data beside the checkout, or $SAFEKEEL_SHARED_DATA)")
    return root / SHARED_POOLS[name]


def load_pool(name_or_path: str) -> list[SafetyExample]:
    """A safety pool by name ('authored', or a shared pool in SHARED_POOLS) or from a file: safekeel's
    own JSONL schema ({id, category, request, refusal[, style]}) or any dataset format (chat,
    Alpaca, ...), whose examples get ids '<file stem>-<n>' and category 'unknown'."""
    if name_or_path == AUTHORED_POOL:
        return load_authored_pool()
    if name_or_path in SHARED_POOLS:
        name_or_path = str(shared_pool_path(name_or_path))
    path = Path(name_or_path)
    if not path.is_file():
        raise DatasetError(name_or_path, None, None, f"no such safety pool (known: {AUTHORED_POOL!r}, "
                           f"{', '.join(map(repr, SHARED_POOLS))} or a file path)")
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().strip()
    if first.startswith("{") and '"refusal"' in first:
        examples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(SafetyExample(str(row["id"]), row.get("category", "unknown"), row["request"],
                                              row["refusal"], row.get("style", "unknown"), str(path)))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DatasetError(str(path), number, getattr(error, "args", [None])[0] if isinstance(error, KeyError) else None,
                                   f"not a safety example ({error})") from None
        return examples
    loaded = load_conversations(path, strict=True)
    return [
        SafetyExample(f"{path.stem}-{index}", "unknown", conv.last_user, conv.completion or "", "unknown", conv.source)
        for index, conv in enumerate(loaded.conversations)
    ]
