"""Datasets: formats and validation, the Conversation type, safety pools, reference eval sets."""

from safekeel.data.conversation import Conversation, Message, SafetyExample
from safekeel.data.formats import DatasetError, LoadResult, load_conversations

__all__ = ["Conversation", "DatasetError", "LoadResult", "Message", "SafetyExample", "load_conversations"]
