"""HTTP shapes: request models (pydantic, validated at the edge) and OpenAI-shaped response objects.

Field names follow OpenAI's API (the `openai` client parses these responses unchanged). safekeel's
own options travel in a `safety` object in the job body (`extra_body={"safety": {...}}`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from safekeel.defaults import DEFAULT_SELECTOR
from safekeel.eval.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, DEFAULT_MIN_SCORED
from safekeel.training.mixing import DEFAULT_SAFETY_SYSTEM_PROMPT  # noqa: F401 (re-exported; defined beside the modes)

SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class APIError(Exception):
    """An error returned to the client as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(kind: str, identifier: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind}: {identifier!r}", f"{kind.replace(' ', '_')}_not_found", param)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateOptions(Strict):
    enabled: bool = True
    """Evaluate the adapter before deploying it; False deploys without the safety check (recorded)."""
    harmful_set: str = "advbench-dev"
    """Harmful prompts for the gate: advbench-{train,dev,test} (../shared/data) or a file id of yours."""
    n_harmful: int | None = Field(None, ge=1)
    overrefusal_set: str = "xstest-dev"
    n_overrefusal: int | None = Field(None, ge=1)
    max_harmful_increase: float = Field(DEFAULT_MARGIN, ge=0, le=1)
    """Deployable only if the one-sided (1 - alpha) upper confidence bound of harmful_rate(adapter) -
    harmful_rate(base), paired on the same prompts, is at most this margin (safekeel.eval.gate)."""
    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=0.5)
    """Error rate of the gate's one-sided upper bound."""
    min_scored_fraction: float = Field(DEFAULT_MIN_SCORED, ge=0, le=1)
    """Deployable only if the judge scored at least this share of the gate's harmful prompts."""
    max_new_tokens: int = Field(64, ge=8, le=512)


class GuardOptions(Strict):
    demonstrations: Literal["none", "static", "retrieved"] = "none"
    """In-context safety demonstrations at serving time: the job's selected examples (static, a shared
    prefix vLLM caches) or the nearest pool examples to each request (retrieved, faiss)."""
    n_demonstrations: int = Field(3, ge=1, le=20)
    system_prompt: bool | str = False
    """A safety system prompt at serving time (PTST): True for safekeel's default, or your own text."""
    monitor_policy: Literal["default", "off", "log", "flag", "block"] = "default"
    """What the server's hidden-state monitors do with this model's requests: log scores, flag flagged
    requests in the response, or block them with a refusal; default: the server's SAFEKEEL_MONITOR_POLICY."""


class SafetyOptions(Strict):
    selector: str = DEFAULT_SELECTOR
    """Which safety examples to replay (`safekeel selectors` lists them); the default beat random in a pre-registered
    test at k=10, replay, authored pool (safekeel.defaults.DEFAULT_SELECTOR says what was and was not tested)."""
    k: int = Field(10, ge=0, le=200)
    mode: Literal["none", "replay", "backdoor"] = "replay"
    """replay: the k examples join the training data; backdoor (BackdoorAlign): they carry a secret system
    prompt in training, and the deployed model is served with that prompt; none: no safety data."""
    pool: str = "authored"
    """Safety pool: 'authored' (shipped) or the id of a file you uploaded (safekeel pool schema or chat format)."""
    audit: bool = True
    gate: GateOptions = Field(default_factory=GateOptions)
    guard: GuardOptions = Field(default_factory=GuardOptions)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    max_steps: int | None = Field(None, ge=1)
    """safekeel extension: stop after this many optimizer steps."""
    checkpoint_steps: int | None = Field(None, ge=1)
    """safekeel extension: save a resumable checkpoint every n steps (default: about 4 per job)."""

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive_float(cls, value: Any) -> Any:
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be in (0, 100] or 'auto'")
        return value


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: dict | None = None
    """OpenAI's newer form: {"type": "supervised", "supervised": {"hyperparameters": {...}}}."""
    suffix: str | None = None
    seed: int | None = None
    safety: SafetyOptions | None = None
    metadata: dict[str, str] | None = None
    integrations: list | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX_PATTERN.match(value):
            raise ValueError("suffix must be 1-40 characters of letters, digits, '-' or '_'")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False


def file_object(record: dict) -> dict:
    return {"id": record["id"], "object": "file", "bytes": record["bytes"], "created_at": record["created_at"],
            "filename": record["filename"], "purpose": record["purpose"], "status": record["status"],
            "status_details": None, "expires_at": None}


def job_object(job: dict) -> dict:
    hyper = job["spec"]["hyperparameters_resolved"]
    error = job["error"] or None
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"],
        "error": error, "fine_tuned_model": job["fine_tuned_model"], "finished_at": job["finished_at"],
        "hyperparameters": hyper, "model": job["model"], "organization_id": job["tenant"],
        "result_files": [], "seed": job["seed"], "status": job["status"], "trained_tokens": job["trained_tokens"],
        "training_file": job["training_file"], "validation_file": job["validation_file"],
        "integrations": [], "suffix": job["suffix"], "estimated_finish": None, "metadata": job["spec"].get("metadata"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "safety": job["safety"], "result": summarize_result(job["result"]),
    }


def summarize_result(result: dict | None) -> dict | None:
    """The job's outcome without the bulky eval reports (those are in the job's events)."""
    if not result:
        return None
    selection = result.get("selection") or {}
    return {"gate": result.get("gate"), "timings": result.get("timings"), "selected_ids": selection.get("ids", []),
            "audit_flagged_fraction": (result.get("audit") or {}).get("flagged_fraction"), "train": result.get("train")}


def event_object(event: dict) -> dict:
    return {"id": event["id"], "object": "fine_tuning.job.event", "created_at": event["created_at"],
            "level": event["level"], "message": event["message"], "type": event["type"], "data": event["data"]}


def model_object(model_id: str, owned_by: str, created: int, parent: str | None = None, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent, **extra}
