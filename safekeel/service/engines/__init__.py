"""Serving engines behind the OpenAI endpoints. Registry: a new engine is one file with @register_engine."""

from safekeel.service.engines.base import Adapter, Engine, GenerationChunk, GenerationParams, create_engine, register_engine

__all__ = ["Adapter", "Engine", "GenerationChunk", "GenerationParams", "create_engine", "register_engine"]
