"""Base-model registry, loading and embedders."""

from safekeel.models.registry import (
    ModelNotFoundError,
    known_models,
    load_model_and_tokenizer,
    register_model,
    resolve_model,
)

__all__ = ["ModelNotFoundError", "known_models", "load_model_and_tokenizer", "register_model", "resolve_model"]
