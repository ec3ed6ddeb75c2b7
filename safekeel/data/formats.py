"""Dataset formats: OpenAI chat JSONL, prompt/completion JSONL, Alpaca JSON/JSONL, question/answer JSONL.

Every record becomes a Conversation. Bad records are never dropped silently: each is reported with
the file, the line (or array item) and the field at fault. In strict mode the first one raises.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from safekeel.data.conversation import ROLES, Conversation, Message

MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_LINE_BYTES = 1_000_000
FORMATS = ("chat", "prompt_completion", "alpaca", "question_answer")


class DatasetError(ValueError):
    """A dataset problem a user can fix; the message names the file, line and field."""

    def __init__(self, path: str, line: int | None, field_name: str | None, reason: str, unit: str = "line"):
        self.path, self.line, self.field, self.reason = path, line, field_name, reason
        where = path + (f", {unit} {line}" if line is not None else "")
        what = f", field {field_name!r}" if field_name else ""
        super().__init__(f"{where}{what}: {reason}")


@dataclass
class SkippedRecord:
    line: int
    field: str | None
    reason: str

    def describe(self, path: str, unit: str = "line") -> str:
        what = f", field {self.field!r}" if self.field else ""
        return f"{path}, {unit} {self.line}{what}: {self.reason}"


@dataclass
class LoadResult:
    path: str
    format: str
    conversations: list[Conversation]
    skipped: list[SkippedRecord] = field(default_factory=list)
    unit: str = "line"  # "line" for JSONL, "item" for a JSON array

    @property
    def n_records(self) -> int:
        return len(self.conversations) + len(self.skipped)

    def summary(self) -> str:
        text = f"{self.path}: {len(self.conversations)} conversations ({self.format})"
        if self.skipped:
            text += f", {len(self.skipped)} skipped:\n" + "\n".join(
                "  " + s.describe(self.path, self.unit) for s in self.skipped[:20]
            )
            if len(self.skipped) > 20:
                text += f"\n  ... and {len(self.skipped) - 20} more"
        return text


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "question" in record and "answer" in record:
        return "question_answer"
    return None


def _looks_like_preference(record: Any) -> bool:
    """A preference record (safekeel.data.preference reads those): named in the error a supervised load gives it."""
    return isinstance(record, dict) and ({"chosen", "rejected"} <= set(record) or "preferred_output" in record)


def _require_text(record: dict[str, Any], key: str, optional: bool = False) -> str:
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise _FieldError(key, "is missing")
    value = record[key]
    if not isinstance(value, str):
        raise _FieldError(key, f"must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise _FieldError(key, "is empty")
    return value


class _FieldError(Exception):
    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(reason)


def record_to_conversation(record: Any, fmt: str, source: str = "", require_assistant: bool = True) -> Conversation:
    """Convert one parsed record; raises _FieldError naming the offending field."""
    if not isinstance(record, dict):
        raise _FieldError("", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "chat":
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise _FieldError("messages", "must be a non-empty list of {role, content} objects")
        messages = []
        for index, message in enumerate(raw):
            name = f"messages[{index}]"
            if not isinstance(message, dict):
                raise _FieldError(name, "must be an object with 'role' and 'content'")
            role = message.get("role")
            if role not in ROLES:
                raise _FieldError(f"{name}.role", f"must be one of {list(ROLES)}, got {role!r}")
            content = message.get("content")
            if not isinstance(content, str):
                raise _FieldError(f"{name}.content", f"must be a string, got {type(content).__name__}")
            messages.append(Message(role, content))
        if not any(m.role == "user" for m in messages):
            raise _FieldError("messages", "has no user message")
        if require_assistant:
            if messages[-1].role != "assistant":
                raise _FieldError("messages", "the last message must be from the assistant (the training target)")
            if not messages[-1].content.strip():
                raise _FieldError(f"messages[{len(messages) - 1}].content", "the assistant's target is empty")
        return Conversation(tuple(messages), source=source)
    if fmt == "prompt_completion":
        return Conversation.from_pair(_require_text(record, "prompt"), _require_text(record, "completion"), source=source)
    if fmt == "alpaca":
        instruction = _require_text(record, "instruction")
        extra = _require_text(record, "input", optional=True)
        request = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Conversation.from_pair(request, _require_text(record, "output"), source=source)
    if fmt == "question_answer":
        return Conversation.from_pair(_require_text(record, "question"), _require_text(record, "answer"), source=source)
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def _iter_records(path: Path, max_line_bytes: int) -> tuple[str, Iterator[tuple[int, Any, str | None]]]:
    """Yield (line-or-item number, parsed record or None, parse error or None); a `.gz` name is gzip-compressed JSONL."""
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    if not compressed:
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
    if not compressed and head.startswith(b"["):
        def array_items() -> Iterator[tuple[int, Any, str | None]]:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise DatasetError(str(path), None, None, f"not UTF-8 text ({error})") from None
            except json.JSONDecodeError as error:
                raise DatasetError(str(path), error.lineno, None, f"invalid JSON array: {error.msg}") from None
            for index, item in enumerate(data, start=1):
                yield index, item, None
        return "item", array_items()

    def jsonl_lines() -> Iterator[tuple[int, Any, str | None]]:
        with opener(path, "rb") as handle:
            numbered = enumerate(handle, start=1)
            while True:
                try:
                    number, raw = next(numbered)
                except StopIteration:
                    return
                except (OSError, EOFError) as error:  # gzip.BadGzipFile, a truncated stream
                    raise DatasetError(str(path), None, None, f"not a readable gzip file ({error})") from None
                if len(raw) > max_line_bytes:
                    yield number, None, f"line is {len(raw)} bytes, over the limit of {max_line_bytes}"
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield number, None, f"not UTF-8 ({error.reason} at byte {error.start})"
                    continue
                if not text.strip():
                    continue  # blank lines carry no record
                try:
                    yield number, json.loads(text), None
                except json.JSONDecodeError as error:
                    yield number, None, f"invalid JSON: {error.msg} (column {error.colno})"
    return "line", jsonl_lines()


def check_dataset_file(path: str | Path, max_file_bytes: int = MAX_FILE_BYTES) -> Path:
    """The path of a dataset file that exists, is not empty and is within the size limit (else a DatasetError)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(str(path), None, None, "no such file")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise DatasetError(str(path), None, None, f"file is {size} bytes, over the limit of {max_file_bytes}")
    if size == 0:
        raise DatasetError(str(path), None, None, "file is empty")
    return path


def load_conversations(
    path: str | Path,
    fmt: str | None = None,
    strict: bool = False,
    require_assistant: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> LoadResult:
    """Load a dataset file into Conversations, detecting the format from the first valid record."""
    path = check_dataset_file(path, max_file_bytes)
    if fmt is not None and fmt not in FORMATS:
        raise DatasetError(str(path), None, None, f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    unit, records = _iter_records(path, max_line_bytes)
    conversations: list[Conversation] = []
    skipped: list[SkippedRecord] = []
    detected = fmt
    for number, record, parse_error in records:
        try:
            if parse_error is not None:
                raise _FieldError("", parse_error)
            record_fmt = detect_format(record) if isinstance(record, dict) else None
            if detected is None:
                if record_fmt is None:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    hint = ("; this is preference data (chosen/rejected): train it with method dpo (`safekeel finetune --method "
                            "dpo`, or the API's method type 'dpo')") if _looks_like_preference(record) else ""
                    raise _FieldError("", f"unrecognised record {keys}; expected one of: messages | prompt+completion | instruction+output | question+answer{hint}")
                detected = record_fmt
            elif record_fmt is not None and record_fmt != detected:
                raise _FieldError("", f"record looks like {record_fmt or 'no known format'}, but the file is {detected}")
            conversations.append(record_to_conversation(record, detected, f"{path.name}:{number}", require_assistant))
        except _FieldError as error:
            if strict:
                raise DatasetError(str(path), number, error.field or None, error.reason, unit) from None
            skipped.append(SkippedRecord(number, error.field or None, error.reason))
    if not conversations:
        detail = skipped[0].describe(str(path), unit) if skipped else f"{path}: no records"
        raise DatasetError(str(path), None, None, f"no valid records (first problem: {detail})")
    return LoadResult(str(path), detected or "unknown", conversations, skipped, unit)
