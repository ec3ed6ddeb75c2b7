"""Only the name of safekeel's vLLM plugin lives here (vllm_cpu_lora); the engines are safekeel.models.engines."""
