"""Base models: the registry and loading, LoRA hyperparameters (lora), generation engines (engines), hidden-state
capture (capture) and embedders."""

from safekeel.models.registry import (
    ModelNotFoundError,
    known_models,
    load_model_and_tokenizer,
    register_model,
    resolve_model,
)

__all__ = ["ModelNotFoundError", "known_models", "load_model_and_tokenizer", "register_model", "resolve_model"]
