"""HTTP shapes: request models (pydantic, validated at the edge) and response models (the routes'
`response_model`, so /openapi.json describes what is returned).

Responses are the `openai` package's own types where they fit (the `openai` client parses them
unchanged), subclassed where safekeel returns more (a job's safety options and outcome, a model's
parent and guard, a chat completion's `safekeel` record). Routes set `response_model_exclude_unset`:
a response holds the fields its route built, validated against the model, without the model's other
optional fields as nulls; every response model keeps fields it does not name (`extra="allow"`).
safekeel's own options travel in a `safety` object in the job body (`extra_body={"safety": {...}}`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from openai.types import FileObject, Model
from openai.types.chat import ChatCompletion
from openai.types.fine_tuning import (DpoHyperparameters, DpoMethod, FineTuningJob, FineTuningJobEvent,
                                      SupervisedHyperparameters, SupervisedMethod, fine_tuning_job)
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel, ConfigDict, Field, field_validator

from safekeel.defaults import DEFAULT_SELECTOR
from safekeel.eval.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, DEFAULT_MIN_SCORED
from safekeel.defaults import DEFAULT_SAFETY_SYSTEM_PROMPT  # noqa: F401 (re-exported)

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
    harmful_set: str = "harmbench-standard"
    """Harmful prompts for the gate: a named prompt set (`safekeel data status`) or a file id of yours. The default's
    200 prompts are what a 0.10 margin needs (benchmarks/results/gate_power.md: under the refusal classifier, the
    median paired discordance between a fine-tune and its base, 0.244, needs 151 prompts for 80% power at alpha
    0.05; with AdvBench dev's 52 an unchanged fine-tune would pass about 43% of the time, with these 200 about 89%)."""
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
    demonstrations: Literal["none", "static", "retrieved", "contrastive", "clustered"] = "none"
    """In-context safety demonstrations at serving time: the job's selected examples (static, a shared
    prefix vLLM caches), the same with each refusal beside a borderline-safe helpful answer (contrastive), one of
    n_clusters cached prefixes chosen per request by nearest cluster centroid (clustered), or the nearest pool
    examples to each request (retrieved, faiss). Mode icl takes static (its default), contrastive or clustered."""
    n_demonstrations: int = Field(3, ge=1, le=20)
    n_clusters: int = Field(6, ge=2, le=16)
    """Clustered: the number of prefixes."""
    paired: bool = False
    """Clustered: each refusal beside a borderline-safe helpful answer."""
    system_prompt: bool | str = False
    """A safety system prompt at serving time (PTST): True for safekeel's default, or your own text."""
    monitor_policy: Literal["default", "off", "log", "flag", "block"] = "default"
    """What the server's hidden-state monitors do with this model's requests: log scores, flag flagged
    requests in the response, or block them with a refusal; default: the server's SAFEKEEL_MONITOR_POLICY."""


class DataGateOptions(Strict):
    action: Literal["off", "warn", "reject"] = "warn"
    """What the audit's flags do (safekeel.audit.flags): warn records the decision and trains; reject fails the job
    before any training (error code data_gate_failed) when too many examples are flagged."""
    max_flagged_fraction: float = Field(0.1, ge=0, le=1)
    """Limit on the share of examples flagged harmful_request, harmful_answer or persona_override (the identity-shift pattern)."""


class AuditOptions(Strict):
    """The audit stage's options (safekeel.pipeline.spec.AuditSpec); `"audit": true` is these defaults."""

    answers: bool = True
    """Judge the training answers with the content judge (the harmful_answer flag)."""
    hidden_states: bool = False
    """Also measure the distances in the base model's own residual stream (slower: one forward pass per example)."""
    layer: int | None = None
    shift: Literal["none", "drop", "downweight"] = "none"
    """Before training, drop (or keep with probability shift_weight) the flagged examples and the shift_fraction
    nearest a harmful request."""
    shift_fraction: float | None = Field(None, ge=0, le=1)
    shift_weight: float = Field(0.5, ge=0, le=1)
    policy: Literal["fixed", "adaptive"] = "fixed"
    """adaptive: k, mode and the safety system prompt chosen from the harm predictor's predicted no-replay increase
    (compliance with harmful requests, by its metric; safekeel.audit.act); k is then the medium-risk k."""


class SafetyOptions(Strict):
    selector: str = DEFAULT_SELECTOR
    """Which safety examples to replay (`safekeel selectors` lists them); the default and the evidence behind it:
    safekeel.defaults.DEFAULT_SELECTOR."""
    k: int = Field(10, ge=0, le=200)
    mode: Literal["none", "replay", "backdoor", "icl", "ptst"] = "replay"
    """replay: the k examples join the training data; backdoor (BackdoorAlign): they carry a secret system
    prompt in training, and the deployed model is served with that prompt; icl: training on your data alone,
    the k selected examples served as in-context demonstrations; ptst (Pure Tuning, Safe Testing): training on
    your data alone, served with safekeel's safety system prompt; none: no safety data."""
    pool: str = "authored"
    """Safety pool: 'authored' (shipped) or the id of a file you uploaded (safekeel pool schema or chat format)."""
    replay_format: Literal["plain", "match"] = "plain"
    """plain: the replayed examples as they are; match: rewritten into your training file's format (its system
    prompt and persona, template, turns, length; safekeel.selectors.format_match), recorded in the selection. Mode
    replay only."""
    audit: bool | AuditOptions = True
    """Audit the training file before training (true: the default options; false: no audit)."""
    data_gate: DataGateOptions = Field(default_factory=DataGateOptions)
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
    bf16: bool | None = None
    """safekeel extension: train with bfloat16 autocast (LoraSFTConfig.bf16, as `safekeel finetune --bf16` and the
    benchmark presets); fast only with native bf16 (AVX512-BF16/AMX or a GPU). Default: the server's LoRA default."""

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


class DpoOptions(Hyperparameters):
    """`method.dpo.hyperparameters` of a preference job: OpenAI's fields (beta, n_epochs, batch_size,
    learning_rate_multiplier) and safekeel's (loss_type, loss_weights, label_smoothing, max_steps, checkpoint_steps,
    bf16). What beta means depends on the objective (safekeel.training.preference); "auto" is the objective's default."""

    beta: float | Literal["auto"] = "auto"
    loss_type: str | list[str] | None = None
    """safekeel extension: trl's preference loss, sigmoid (DPO, the default) | ipo | hinge | robust | ..., or a list of
    them trained as a weighted sum (with loss_weights)."""
    loss_weights: list[float] | None = None
    """safekeel extension: one weight per loss_type."""
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    """safekeel extension: robust's assumed label-flip rate (default 0.1), exo_pair's epsilon."""

    @field_validator("beta")
    @classmethod
    def _positive_beta(cls, value: Any) -> Any:
        if value != "auto" and not value > 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: dict | None = None
    """OpenAI's newer form: {"type": "supervised", "supervised": {"hyperparameters": {...}}} or {"type": "dpo", "dpo":
    {"hyperparameters": {...}}} (DpoOptions; the training file then holds preference pairs)."""
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


# ---------------------------------------------------------------- responses (the routes' response_model)

FilePurpose = Literal["fine-tune", "evals"]
"""fine-tune: training data (every record needs an assistant reply); evals: prompt sets for the safety gate."""


class Open(BaseModel):
    """A response part that names its fields and passes through any it does not name (never drops one)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(Open):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(Open):
    """Every error, as OpenAI returns it (validation errors included: 400, not 422)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses (all shaped as ErrorResponse)."""
    why = {400: "Invalid request", 401: "Missing or wrong API key", 403: "Not allowed", 404: "Not found",
           413: "Upload too large", 503: "No serving engine"}
    return {status: {"model": ErrorResponse, "description": why.get(status, "Error")} for status in statuses}


ERRORS = error_responses(400, 401, 404)
"""The errors every authenticated route can return."""


class File(FileObject):
    purpose: FilePurpose  # type: ignore[assignment]  # safekeel's purposes (OpenAI's list has no `evals`)


class FileList(Open):
    object: Literal["list"] = "list"
    data: list[File]
    has_more: bool


class JobHyperparameters(fine_tuning_job.Hyperparameters):
    max_steps: int | None = None
    """safekeel extension: training stops after this many optimizer steps."""
    bf16: bool | None = None
    """safekeel extension: bfloat16 autocast in training."""


class JobSupervisedHyperparameters(SupervisedHyperparameters):
    max_steps: int | None = None
    bf16: bool | None = None


class JobSupervisedMethod(SupervisedMethod):
    hyperparameters: JobSupervisedHyperparameters | None = None  # type: ignore[assignment]


class JobDpoHyperparameters(DpoHyperparameters):
    max_steps: int | None = None
    bf16: bool | None = None
    loss_type: list[str] | None = None
    """safekeel extension: the preference losses trained (trl's names), summed with loss_weights."""
    loss_weights: list[float] | None = None
    label_smoothing: float | None = None


class JobDpoMethod(DpoMethod):
    hyperparameters: JobDpoHyperparameters | None = None  # type: ignore[assignment]


class JobMethod(Open):
    """OpenAI's `method` object: supervised, or dpo (preference pairs; the objective's resolved beta and losses)."""

    type: Literal["supervised", "dpo"]
    supervised: JobSupervisedMethod | None = None
    dpo: JobDpoMethod | None = None


class GateReport(Open):
    """The safety gate's decision (safekeel.eval.gate.paired_gate) with the rates it compared."""

    passed: bool | None
    reasons: list[str] = []
    judge: str | None = None
    n_pairs: int | None = None
    """Harmful prompts judged for both the adapter and the base model."""
    alpha: float | None = None
    max_harmful_increase: float | None = None
    paired: dict[str, Any] | None = None
    """The paired difference of harmful rates (adapter - base) with its one-sided upper bound `high`."""
    harmful_rate: dict[str, Any] | None = None
    base_harmful_rate: dict[str, Any] | None = None
    overrefusal_rate: dict[str, Any] | None = None
    base_overrefusal_rate: dict[str, Any] | None = None
    guarded: bool | None = None
    """The adapter was judged with its serving guard (system prompt, static demonstrations)."""


class JobResult(Open):
    """A job's outcome without the bulky evaluation reports (those are in the job's events)."""

    gate: GateReport | None = None
    timings: dict[str, float] | None = None
    """Seconds per stage: audit_seconds, selection_seconds, training_seconds, gate_seconds."""
    selected_ids: list[str] = []
    """The safety examples replayed in training (or used as demonstrations)."""
    audit_flagged_fraction: float | None = None
    data_gate: dict[str, Any] | None = None
    """The data gate's decision on the audit's flags (action, passed, gated_fraction, limit, counts, reason)."""
    train: dict[str, Any] | None = None


class Job(FineTuningJob):
    """OpenAI's fine-tuning job, with the safety options it runs with and its outcome."""

    hyperparameters: JobHyperparameters  # type: ignore[assignment]
    method: JobMethod | None = None  # type: ignore[assignment]
    safety: SafetyOptions
    result: JobResult | None = None


class JobList(Open):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(FineTuningJobEvent):
    type: str | None = None  # type: ignore[assignment]
    """message, metrics, or one of safekeel's: audit, selection, eval, gate, monitor_drift, error."""


class JobEventList(Open):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class JobCheckpointList(Open):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ModelGuard(Open):
    """The test-time guard a fine-tuned model is served with (the system prompt's text is not shown)."""

    demonstrations: Literal["none", "static", "retrieved", "contrastive", "clustered"] | None = None
    n_demonstrations: int | None = None
    system_prompt: bool = False
    cluster_set: str | None = None
    """Clustered demonstrations: the hash of the served centroids and prefixes (safekeel.guard.cluster_set_hash)."""


class ServedModel(Model):
    parent: str | None = None
    """The base model of a fine-tuned model; None for a base model."""
    served: bool = False
    """This server answers chat and completion requests for it (the first base model and its fine-tunes)."""
    fine_tuning_job: str | None = None
    guard: ModelGuard | None = None


class ModelList(Open):
    object: Literal["list"] = "list"
    data: list[ServedModel]


class GuardRecord(Open):
    """What the test-time guard did to this request."""

    system_prompt: bool
    demonstrations: list[str]
    """Ids of the safety demonstrations put before the user's turns."""
    mode: str


class MonitorRecord(Open):
    """The hidden-state monitors' scores for this request and the policy's decision."""

    policy: str
    decision: Literal["pass", "logged", "flagged", "blocked"]
    flagged_by: list[str] = []
    seconds: float | None = None
    scores: dict[str, float] = {}
    thresholds: dict[str, float | None] = {}
    concepts: dict[str, dict] = {}
    """Concepts with their own policy (server setting monitor_concept_policies): {concept: {policy, decision, flagged_by}}."""


class SafekeelRecord(Open):
    guard: GuardRecord
    monitor: MonitorRecord | None = None


class GuardedChatCompletion(ChatCompletion):
    safekeel: SafekeelRecord | None = None
    """safekeel's record of the guard and monitors applied to this request."""


class Health(Open):
    status: str
    engine: str | None
    served_model: str | None
    workers: int
    """Live worker processes started by this server."""
    jobs: dict[str, int]
    """Fine-tuning jobs by status."""
    replicas: list[dict] | None = None
    """Serving replicas (SAFEKEEL_REPLICAS): url, up, in_flight, adapters, error."""


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
        "method": job["spec"].get("method") or {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "safety": job["safety"], "result": summarize_result(job["result"]),
    }


def summarize_result(result: dict | None) -> dict | None:
    """The job's outcome without the bulky eval reports (those are in the job's events)."""
    if not result:
        return None
    selection = result.get("selection") or {}
    return {"gate": result.get("gate"), "timings": result.get("timings"), "selected_ids": selection.get("ids", []),
            "audit_flagged_fraction": (result.get("audit") or {}).get("flagged_fraction"), "data_gate": result.get("data_gate"),
            "train": result.get("train")}


def event_object(event: dict) -> dict:
    return {"id": event["id"], "object": "fine_tuning.job.event", "created_at": event["created_at"],
            "level": event["level"], "message": event["message"], "type": event["type"], "data": event["data"]}


def model_object(model_id: str, owned_by: str, created: int, parent: str | None = None, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent, **extra}
