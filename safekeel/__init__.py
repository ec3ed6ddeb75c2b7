"""safekeel: safety-preserving fine-tuning, evaluation and serving for small chat models."""

__version__ = "0.1.0"
