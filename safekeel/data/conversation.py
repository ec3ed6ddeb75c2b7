"""The one conversation type every module passes around, and the safety example built on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A chat: messages in order. For training, the last message is the assistant's target."""

    messages: tuple[Message, ...]
    source: str = ""  # "file:line" (or "file:item N") it came from, for error messages and provenance
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_pair(cls, request: str, response: str, system: str | None = None, source: str = "", meta: dict | None = None) -> "Conversation":
        messages = [Message("system", system)] if system else []
        messages += [Message("user", request), Message("assistant", response)]
        return cls(tuple(messages), source=source, meta=dict(meta or {}))

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the final assistant turn (the context the model conditions on)."""
        return self.messages[:-1] if self.messages and self.messages[-1].role == "assistant" else self.messages

    @property
    def completion(self) -> str | None:
        return self.messages[-1].content if self.messages and self.messages[-1].role == "assistant" else None

    @property
    def last_user(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""

    def to_messages(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages]

    def to_prompt_completion(self) -> dict[str, list[dict[str, str]]]:
        """trl's conversational prompt-completion form: loss is taken on the completion only."""
        return {
            "prompt": [m.to_dict() for m in self.prompt_messages],
            "completion": [self.messages[-1].to_dict()],
        }

    def with_system(self, system: str) -> "Conversation":
        """The same conversation with `system` as its system prompt (replacing any existing one)."""
        rest = tuple(m for m in self.messages if m.role != "system")
        return Conversation((Message("system", system),) + rest, self.source, dict(self.meta))


@dataclass(frozen=True)
class SafetyExample:
    """A harmful request paired with a refusal, from a safety pool."""

    id: str
    category: str
    request: str
    refusal: str
    style: str = "unknown"  # "brief" | "explain" | "unknown"
    source: str = ""

    def to_conversation(self, system: str | None = None) -> Conversation:
        return Conversation.from_pair(
            self.request, self.refusal, system=system, source=self.source,
            meta={"safety_id": self.id, "category": self.category},
        )


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair: a prompt (the messages before the assistant's reply) with a preferred (chosen) and a
    dispreferred (rejected) reply. The sibling of Conversation for preference fine-tuning (DPO and kin)."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str = ""  # "file:line" it came from, or "safety:<pool id>" for a safety pair
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_request(cls, request: str, chosen: str, rejected: str, system: str | None = None, source: str = "",
                     meta: dict | None = None) -> "PreferenceExample":
        prompt = ((Message("system", system),) if system else ()) + (Message("user", request),)
        return cls(prompt, chosen, rejected, source=source, meta=dict(meta or {}))

    @property
    def last_user(self) -> str:
        return next((m.content for m in reversed(self.prompt) if m.role == "user"), "")

    def chosen_conversation(self) -> Conversation:
        """The prompt answered with the chosen reply: what selectors and the audit look at."""
        return Conversation(self.prompt + (Message("assistant", self.chosen),), self.source, dict(self.meta))

    def with_system(self, system: str) -> "PreferenceExample":
        """The same pair with `system` as its system prompt (replacing any existing one)."""
        rest = tuple(m for m in self.prompt if m.role != "system")
        return PreferenceExample((Message("system", system),) + rest, self.chosen, self.rejected, self.source, dict(self.meta))

    def to_dict(self) -> dict:
        """Plain JSON (what training hashes): prompt messages, chosen and rejected replies."""
        return {"prompt": [m.to_dict() for m in self.prompt], "chosen": self.chosen, "rejected": self.rejected}

    def to_row(self) -> dict[str, list[dict[str, str]]]:
        """trl's conversational preference form (explicit prompt): the loss compares the two assistant replies."""
        return {"prompt": [m.to_dict() for m in self.prompt],
                "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}
