"""The safekeel service: an OpenAI-compatible API for safety-preserving fine-tuning and serving."""
