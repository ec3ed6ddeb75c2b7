"""Preference dataset formats: every record becomes a PreferenceExample (a prompt, a chosen and a rejected reply).

- `openai_preference`: OpenAI's DPO fine-tuning JSONL, `{"input": {"messages": [...]}, "preferred_output":
  [{"role": "assistant", "content": ...}], "non_preferred_output": [{"role": "assistant", "content": ...}]}`.
- `prompt_chosen_rejected`: `{"prompt", "chosen", "rejected"}` (trl's explicit-prompt form); the prompt is a string
  (one user turn) or a list of messages, each reply a string or a list holding one assistant message.
- `chosen_rejected`: `{"chosen", "rejected"}` without a prompt (trl's implicit-prompt form): two whole conversations,
  as message lists or as Anthropic hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."), that share every
  turn but the final assistant reply.

As in safekeel.data.formats, bad records are never dropped silently: each is reported with the file, the line (or
array item) and the field at fault, and strict mode raises on the first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safekeel.data.conversation import ROLES, Message, PreferenceExample
from safekeel.data.formats import (MAX_FILE_BYTES, MAX_LINE_BYTES, DatasetError, SkippedRecord, _FieldError,
                                   _iter_records, check_dataset_file)

PREFERENCE_FORMATS = ("openai_preference", "prompt_chosen_rejected", "chosen_rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferenceLoadResult:
    path: str
    format: str
    pairs: list[PreferenceExample]
    skipped: list[SkippedRecord] = field(default_factory=list)
    unit: str = "line"

    def summary(self) -> str:
        text = f"{self.path}: {len(self.pairs)} preference pairs ({self.format})"
        if self.skipped:
            text += f", {len(self.skipped)} skipped:\n" + "\n".join(
                "  " + s.describe(self.path, self.unit) for s in self.skipped[:20])
            if len(self.skipped) > 20:
                text += f"\n  ... and {len(self.skipped) - 20} more"
        return text


def detect_preference_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "preferred_output" in record or "non_preferred_output" in record:
        return "openai_preference"
    if "chosen" in record and "rejected" in record:
        return "prompt_chosen_rejected" if "prompt" in record else "chosen_rejected"
    return None


def is_preference_file(path: str | Path) -> bool:
    """Whether the first parseable record of a dataset file is in a preference format (the upload's and the CLI's
    switch between preference and supervised data)."""
    try:
        _, records = _iter_records(Path(path), MAX_LINE_BYTES)
        for _, record, error in records:
            if error is None:
                return detect_preference_format(record) is not None
    except (DatasetError, OSError, EOFError):
        return False
    return False


def _messages(raw: Any, name: str) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _FieldError(name, "must be a non-empty list of {role, content} objects")
    out = []
    for index, message in enumerate(raw):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise _FieldError(where, "must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise _FieldError(f"{where}.role", f"must be one of {list(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise _FieldError(f"{where}.content", f"must be a string, got {type(message.get('content')).__name__}")
        out.append(Message(message["role"], message["content"]))
    return out


def _check_prompt(prompt: list[Message], name: str) -> tuple[Message, ...]:
    if not any(m.role == "user" for m in prompt):
        raise _FieldError(name, "has no user message")
    if prompt[-1].role == "assistant":
        raise _FieldError(name, "must end before the assistant's reply (its last message is from the assistant)")
    return tuple(prompt)


def _reply(raw: Any, name: str) -> str:
    """One assistant reply: a non-empty string, or a list holding one assistant message."""
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, list):
        messages = _messages(raw, name)
        if len(messages) != 1 or messages[0].role != "assistant":
            raise _FieldError(name, f"must hold exactly one assistant message, got {[m.role for m in messages]}")
        text, name = messages[0].content, f"{name}[0].content"
    elif raw is None:
        raise _FieldError(name, "is missing")
    else:
        raise _FieldError(name, f"must be a string or a list of messages, got {type(raw).__name__}")
    if not text.strip():
        raise _FieldError(name, "is empty")
    return text


def parse_hh(text: str, name: str) -> list[Message]:
    """An Anthropic hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as user/assistant messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 5:
        raise _FieldError(name, "is not an hh-rlhf transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns")
    return [Message("user" if speaker == "Human" else "assistant", content.strip())
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _conversation(raw: Any, name: str) -> list[Message]:
    if isinstance(raw, str):
        return parse_hh(raw, name)
    if raw is None:
        raise _FieldError(name, "is missing")
    return _messages(raw, name)


def record_to_preference(record: Any, fmt: str, source: str = "") -> PreferenceExample:
    """Convert one parsed record; raises _FieldError naming the offending field."""
    if not isinstance(record, dict):
        raise _FieldError("", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "openai_preference":
        raw_input = record.get("input")
        if not isinstance(raw_input, dict):
            raise _FieldError("input", "must be an object with 'messages'" if raw_input is not None else "is missing")
        prompt = _check_prompt(_messages(raw_input.get("messages"), "input.messages"), "input.messages")
        chosen = _reply(record.get("preferred_output"), "preferred_output")
        rejected = _reply(record.get("non_preferred_output"), "non_preferred_output")
        names = ("preferred_output", "non_preferred_output")
    elif fmt == "prompt_chosen_rejected":
        raw_prompt = record["prompt"]
        if isinstance(raw_prompt, str):
            if not raw_prompt.strip():
                raise _FieldError("prompt", "is empty")
            prompt: tuple[Message, ...] = (Message("user", raw_prompt),)
        else:
            prompt = _check_prompt(_messages(raw_prompt, "prompt"), "prompt")
        chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
        names = ("chosen", "rejected")
    elif fmt == "chosen_rejected":
        chosen_turns, rejected_turns = _conversation(record["chosen"], "chosen"), _conversation(record["rejected"], "rejected")
        for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1].role != "assistant":
                raise _FieldError(name, "must end with the assistant's reply")
            if not turns[-1].content.strip():
                raise _FieldError(name, "its final assistant reply is empty")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise _FieldError("rejected", "must share every turn but the final assistant reply with 'chosen' (no prompt "
                                          "field: the prompt is the turns they share)")
        prompt = _check_prompt(chosen_turns[:-1] or [Message("assistant", "")], "chosen")
        chosen, rejected = chosen_turns[-1].content, rejected_turns[-1].content
        names = ("chosen", "rejected")
    else:
        raise ValueError(f"unknown preference format {fmt!r}; known: {PREFERENCE_FORMATS}")
    if chosen.strip() == rejected.strip():
        raise _FieldError(names[1], f"is the same reply as {names[0]!r}: the pair prefers nothing")
    return PreferenceExample(prompt, chosen, rejected, source=source)


def load_preferences(path: str | Path, fmt: str | None = None, strict: bool = False,
                     max_file_bytes: int = MAX_FILE_BYTES, max_line_bytes: int = MAX_LINE_BYTES) -> PreferenceLoadResult:
    """Load a preference dataset (JSONL or a JSON array; .jsonl.gz too), detecting the format from the first valid
    record. Bad records are skipped with file, line and field (strict: the first raises a DatasetError)."""
    path = check_dataset_file(path, max_file_bytes)
    if fmt is not None and fmt not in PREFERENCE_FORMATS:
        raise DatasetError(str(path), None, None, f"unknown preference format {fmt!r}; known: {', '.join(PREFERENCE_FORMATS)}")
    unit, records = _iter_records(path, max_line_bytes)
    return _convert(str(path), path.name, unit, records, fmt, strict)


def _convert(path: str, name: str, unit: str, records, fmt: str | None, strict: bool) -> PreferenceLoadResult:
    pairs: list[PreferenceExample] = []
    skipped: list[SkippedRecord] = []
    detected = fmt
    for number, record, parse_error in records:
        try:
            if parse_error is not None:
                raise _FieldError("", parse_error)
            record_fmt = detect_preference_format(record)
            if detected is None:
                if record_fmt is None:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise _FieldError("", f"unrecognised preference record {keys}; expected one of: input+preferred_output+"
                                          "non_preferred_output | prompt+chosen+rejected | chosen+rejected")
                detected = record_fmt
            elif record_fmt != detected:
                raise _FieldError("", f"record looks like {record_fmt or 'no preference format'}, but the file is {detected}")
            pairs.append(record_to_preference(record, detected, f"{name}:{number}"))
        except _FieldError as error:
            if strict:
                raise DatasetError(path, number, error.field or None, error.reason, unit) from None
            skipped.append(SkippedRecord(number, error.field or None, error.reason))
    if not pairs:
        detail = skipped[0].describe(path, unit) if skipped else f"{path}: no records"
        raise DatasetError(path, None, None, f"no valid preference pairs (first problem: {detail})")
    return PreferenceLoadResult(path, detected or "unknown", pairs, skipped, unit)
