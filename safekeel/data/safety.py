"""Safety pools (harmful request + refusal) and the project's own authored data shipped in the package."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.data.formats import MAX_LINE_BYTES, DatasetError, load_conversations
from safekeel.data.home import data_file
from safekeel.data.jsonl import iter_jsonl, read_jsonl

HARM_CATEGORIES = (
    "illegal_activity", "child_abuse", "hate_harass_violence", "malware", "physical_harm",
    "economic_harm", "fraud_deception", "adult_content", "political_campaigning",
    "privacy_violation", "tailored_financial_advice",
)
AUTHORED_POOL = "authored"
SHARED_POOLS = {"safety_tuned_llamas": "safety_pool/safety_tuned_llamas_2483.json"}
"""Named pools read from the data folders (safekeel.data.home; `safekeel data fetch safety-tuned-llamas`), never
shipped: Bianchi et al.'s Safety-Tuned LLaMAs safety-only instructions (2,483 harmful requests with refusals;
CC BY-NC 4.0)."""


def _authored_dir():
    return resources.files("safekeel.data") / "authored"


def load_authored_pool() -> list[SafetyExample]:
    """The authored safety pool: >= 300 examples over the 11 HEx-PHI categories, two refusal styles."""
    examples = []
    for resource in sorted(_authored_dir().iterdir(), key=lambda r: r.name):
        if resource.name.startswith("safety_pool") and resource.name.endswith(".jsonl"):
            for row in read_jsonl(resource):
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
            for row in read_jsonl(resource):
                key = row["request"].strip().lower()
                if key not in seen:
                    seen.add(key)
                    conversations.append(Conversation.from_pair(
                        row["request"], row["answer"], source=f"safekeel/authored/{resource.name}:{row['id']}",
                        meta={"id": row["id"], "kind": row["kind"]}))
    return conversations


def shared_pool_path(name: str) -> Path:
    """The file of a named shared pool (SHARED_POOLS); a FileNotFoundError saying what is missing and what to do."""
    return data_file(SHARED_POOLS[name], purpose=f"safety pool {name!r}")


POOL_FIELDS = ("id", "request", "refusal")
"""safekeel's pool schema, one JSON object a line: {id, request, refusal[, category, style]}."""


def is_pool_file(path: str | Path) -> bool:
    """Whether a file is in safekeel's pool schema rather than a dataset format: its first line is a JSON object
    with a top-level "refusal" (a chat record whose messages carry OpenAI's "refusal" field is not)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline(MAX_LINE_BYTES).strip()
    if not (first.startswith("{") and '"refusal"' in first):
        return False
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return True  # the pool reader names the line and the problem
    return isinstance(record, dict) and "refusal" in record


def _pool_example(row: Any, path: Path) -> SafetyExample:
    if not isinstance(row, dict):
        raise DatasetError(str(path), None, None, f"a pool example must be a JSON object, got {type(row).__name__}")
    for field in POOL_FIELDS:
        if field not in row:
            raise DatasetError(str(path), None, field, f"is missing (a pool example needs {', '.join(POOL_FIELDS)})")
    for field in ("request", "refusal"):
        if not isinstance(row[field], str) or not row[field].strip():
            raise DatasetError(str(path), None, field, "must be a non-empty string")
    return SafetyExample(str(row["id"]), row.get("category", "unknown"), row["request"], row["refusal"],
                         row.get("style", "unknown"), str(path))


def read_pool_file(path: str | Path) -> list[SafetyExample]:
    """A pool file in safekeel's schema (POOL_FIELDS). A bad line raises a DatasetError naming the file, the
    line and the field; ids must be unique. `load_pool` and the service's upload validation both use it."""
    path = Path(path)
    examples: list[SafetyExample] = []
    seen: dict[str, int] = {}
    for number, row in iter_jsonl(path):
        try:
            example = _pool_example(row, path)
        except DatasetError as error:
            raise DatasetError(str(path), number, error.field, error.reason) from None
        if example.id in seen:
            raise DatasetError(str(path), number, "id", f"{example.id!r} repeats the id of line {seen[example.id]}")
        seen[example.id] = number
        examples.append(example)
    if not examples:
        raise DatasetError(str(path), None, None, "no pool examples")
    return examples


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
    if is_pool_file(path):
        return read_pool_file(path)
    loaded = load_conversations(path, strict=True)
    return [
        SafetyExample(f"{path.stem}-{index}", "unknown", conv.last_user, conv.completion or "", "unknown", conv.source)
        for index, conv in enumerate(loaded.conversations)
    ]
