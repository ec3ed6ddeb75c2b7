"""Fine-tuning jobs: turning an API request into a JobSpec (safekeel.pipeline), and running it.

The stored spec is plain JSON (the jobs table): the job's id, folder and fine-tuned model name, the resolved
hyperparameters, metadata, and the pipeline's JobSpec as a dict. Any executor that can read the job folder can
run it: the local worker here, a cluster engine later.

Running a job is `run_pipeline`: audit -> select -> LoRA SFT (checkpointed, cancellable, resumable) -> guard ->
evaluate the adapter, served with its guard, on the gate's prompts -> compare with the base model on the same
prompts -> publish (register the model) or fail with `safety_gate_failed`, keeping the adapter for inspection.
This module maps the pipeline's events onto the job's event log and its outcome onto the job's status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from safekeel.audit.predict import describe_prediction
from safekeel.data.formats import DatasetError
from safekeel.data.preference import PREFERENCE_FORMATS
from safekeel.data.prompt_sets import is_known as is_named_prompt_set
from safekeel.pipeline import (AuditSpec, Cancelled, DataGateSpec, DataRejected, GateSpec, GuardSpec, JobSpec, MethodSpec, PipelineResult,
                               run_pipeline)
from safekeel.provenance import write_json_atomic
from safekeel.selectors import known_selectors
from safekeel.service.protocol import APIError, CreateJobRequest, DpoOptions, Hyperparameters, SafetyOptions
from safekeel.service.settings import ServiceSettings, Tenant
from safekeel.service.store import Store, new_id, now
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import DPO_LEARNING_RATE, DPO_MAX_LENGTH, PreferenceConfig

log = logging.getLogger(__name__)

DEFAULT_SFT = LoraSFTConfig()
"""The API's "auto" hyperparameters: the pipeline's LoRA SFT defaults (safekeel.training.config)."""


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


def resolve_hyperparameters(request: CreateJobRequest) -> Hyperparameters:
    """The job's hyperparameters: the top-level ones, else the method's (DpoOptions for method dpo)."""
    method_type = (request.method or {}).get("type", "supervised")
    if method_type not in ("supervised", "dpo"):
        raise APIError(400, f"method type {method_type!r} is not supported (supported: supervised, dpo)", "invalid_method", "method.type")
    hyper = request.hyperparameters
    if method_type == "dpo" and hyper is not None:
        raise APIError(400, "a dpo job takes its hyperparameters in method.dpo.hyperparameters, not in the top-level "
                            "hyperparameters", "invalid_hyperparameters", "hyperparameters")
    if hyper is None and request.method:
        body = request.method.get(method_type) or {}
        param = f"method.{method_type}.hyperparameters"
        try:
            hyper = (DpoOptions if method_type == "dpo" else Hyperparameters)(**(body.get("hyperparameters") or {}))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise APIError(400, f"{param}.{where}: {first['msg']}", "invalid_hyperparameters", f"{param}.{where}") from None
    return hyper or (DpoOptions() if method_type == "dpo" else Hyperparameters())


def method_spec(hyper: Hyperparameters) -> MethodSpec:
    """The pipeline's training method for these hyperparameters (a DpoOptions is a dpo job)."""
    if not isinstance(hyper, DpoOptions):
        return MethodSpec()
    try:
        return MethodSpec(type="dpo", dpo=PreferenceConfig(
            loss_type=hyper.loss_type or "sigmoid", loss_weights=hyper.loss_weights,
            beta=None if hyper.beta == "auto" else hyper.beta, label_smoothing=hyper.label_smoothing))
    except ValueError as error:
        raise APIError(400, f"method.dpo.hyperparameters: {error}", "invalid_hyperparameters", "method.dpo.hyperparameters")


def build_job(request: CreateJobRequest, tenant: Tenant, store: Store, settings: ServiceSettings) -> dict:
    """Validate a create-job request against the caller's files and the served models; insert the job."""
    if request.model not in settings.base_models:
        raise APIError(404, f"model {request.model!r} does not exist or cannot be fine-tuned here "
                            f"(fine-tunable: {', '.join(settings.base_models)})", "model_not_found", "model")
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(request, param)
        if file_id is None:
            continue
        record = store.get_file(file_id, tenant.name)
        if record is None:
            raise APIError(404, f"No such file: {file_id!r}", "file_not_found", param)
        if record["purpose"] != "fine-tune":
            raise APIError(400, f"file {file_id!r} has purpose {record['purpose']!r}, not 'fine-tune'", "invalid_file_purpose", param)
        if record.get("format") == "safety_pool":
            raise APIError(400, f"file {file_id!r} is a safety pool (request/refusal records), not training data: pass it as "
                                "safety.pool", "invalid_training_file", param)
        files[param] = record
    hyper = resolve_hyperparameters(request)
    method = method_spec(hyper)
    preference_file = files["training_file"].get("format") in PREFERENCE_FORMATS
    if method.type == "dpo" and not preference_file:
        raise APIError(400, f"file {request.training_file!r} holds {files['training_file'].get('format')} records; a dpo job trains on "
                            "preference pairs (OpenAI's preference JSONL: input, preferred_output, non_preferred_output; or "
                            "prompt/chosen/rejected)", "invalid_training_file", "training_file")
    if method.type == "supervised" and preference_file:
        raise APIError(400, f"file {request.training_file!r} holds preference pairs: create the job with method "
                            "{\"type\": \"dpo\"}", "invalid_training_file", "training_file")
    if method.type == "dpo" and "validation_file" in files:
        raise APIError(400, "a validation_file is not supported for dpo jobs yet (the gate's utility loss reads "
                            "conversations)", "invalid_validation_file", "validation_file")
    safety = request.safety or SafetyOptions()
    if safety.selector not in known_selectors():
        raise APIError(400, f"unknown selector {safety.selector!r} (known: {', '.join(known_selectors())})", "invalid_selector", "safety.selector")
    pool = "authored"
    if safety.pool != "authored":
        record = store.get_file(safety.pool, tenant.name)
        if record is None:
            raise APIError(404, f"No such file: {safety.pool!r} (safety.pool is 'authored' or one of your file ids)", "file_not_found", "safety.pool")
        pool = str(blob_path(settings, record["sha256"]))
    prompt_sets = {}
    for param in ("harmful_set", "overrefusal_set"):
        value = getattr(safety.gate, param)
        if is_named_prompt_set(value):
            prompt_sets[param] = value
        else:
            record = store.get_file(value, tenant.name)
            if record is None or record["purpose"] not in ("evals", "fine-tune"):
                raise APIError(404, f"safety.gate.{param} {value!r} is neither a named prompt set (`safekeel data status` lists "
                                    "them) nor one of your file ids", "file_not_found", f"safety.gate.{param}")
            prompt_sets[param] = str(blob_path(settings, record["sha256"]))
    resolved = {
        "n_epochs": int(DEFAULT_SFT.epochs) if hyper.n_epochs == "auto" else hyper.n_epochs,
        "batch_size": DEFAULT_SFT.batch_size if hyper.batch_size == "auto" else hyper.batch_size,
        "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier,
    }
    if hyper.max_steps:
        resolved["max_steps"] = hyper.max_steps
    if hyper.bf16 is not None:
        resolved["bf16"] = hyper.bf16
    job_id = new_id("ftjob")
    seed = request.seed if request.seed is not None else int.from_bytes(job_id.encode()[-4:], "big") % 2**31
    n_examples = files["training_file"]["n_examples"] or 1
    steps_estimate = hyper.max_steps or max(1, -(-n_examples // resolved["batch_size"])) * resolved["n_epochs"]
    checkpoint_steps = hyper.checkpoint_steps or max(1, steps_estimate // 4)
    suffix = request.suffix or ""
    fine_tuned_model = f"ft:{request.model}:{tenant.name}:{suffix}:{job_id[-8:]}"
    job_dir = settings.jobs_dir / job_id
    base_rate = DPO_LEARNING_RATE if method.type == "dpo" else DEFAULT_SFT.learning_rate
    sft = LoraSFTConfig(epochs=resolved["n_epochs"], batch_size=resolved["batch_size"],
                        learning_rate=base_rate * resolved["learning_rate_multiplier"],
                        max_steps=hyper.max_steps or -1, seed=seed, bf16=resolved.get("bf16", DEFAULT_SFT.bf16),
                        max_length=DPO_MAX_LENGTH if method.type == "dpo" else DEFAULT_SFT.max_length)
    gate = safety.gate
    try:
        pipeline = JobSpec(
            data=str(blob_path(settings, files["training_file"]["sha256"])), output_dir=str(job_dir / "output"),
            model=request.model, k=safety.k if safety.mode not in ("none", "ptst") else 0, selector=safety.selector,
            mode=safety.mode if safety.k > 0 or safety.mode == "ptst" else "none", pool=pool, seed=seed, sft=sft,
            eval=None, checkpoint_steps=checkpoint_steps, replay_format=safety.replay_format,
            audit=safety.audit if isinstance(safety.audit, bool) else AuditSpec(enabled=True, **safety.audit.model_dump()),
            data_gate=DataGateSpec(**safety.data_gate.model_dump()),
            gate=GateSpec(enabled=gate.enabled, harmful_set=prompt_sets["harmful_set"], overrefusal_set=prompt_sets["overrefusal_set"],
                          n_harmful=gate.n_harmful, n_overrefusal=gate.n_overrefusal, margin=gate.max_harmful_increase,
                          alpha=gate.alpha, min_scored_fraction=gate.min_scored_fraction, max_new_tokens=gate.max_new_tokens,
                          names={"harmful_set": gate.harmful_set, "overrefusal_set": gate.overrefusal_set}),
            guard=GuardSpec(**safety.guard.model_dump()),
            validation_data=str(blob_path(settings, files["validation_file"]["sha256"])) if "validation_file" in files else None,
            method=method)
    except ValueError as error:
        raise APIError(400, str(error), "invalid_safety_options", "safety")
    spec = {"job_id": job_id, "job_dir": str(job_dir), "fine_tuned_model": fine_tuned_model,
            "hyperparameters_resolved": resolved, "metadata": request.metadata, "pipeline": pipeline.to_dict()}
    if method.type == "dpo":
        objective = method.dpo.to_dict()
        spec["method"] = {"type": "dpo", "dpo": {"hyperparameters": {**resolved, "beta": objective["beta"], "loss_type": objective["loss_type"],
                                                                     "loss_weights": objective["loss_weights"],
                                                                     "label_smoothing": objective["label_smoothing"]}}}
    store.add_job({"id": job_id, "tenant": tenant.name, "model": request.model,
                         "training_file": request.training_file, "validation_file": request.validation_file,
                         "suffix": request.suffix, "seed": seed, "hyperparameters": resolved,
                         "safety": safety.model_dump(), "spec": spec, "status": "validating_files",
                         "created_at": now()})
    store.add_event(job_id, f"Validating training file: {request.training_file}")
    # Files were parsed and validated on upload; the job moves on at once.
    store.set_status(job_id, "queued", expected=("validating_files",))
    store.add_event(job_id, "Files validated, moving job to queued state")
    return store.get_job(job_id)


def blob_path(settings: ServiceSettings, sha256: str) -> Path:
    return settings.blobs_dir / sha256[:2] / f"{sha256}.jsonl"


def job_spec(spec: dict) -> JobSpec:
    """The pipeline spec of a stored job (also of a job stored before the pipeline existed: finetune/gate/guard/audit)."""
    if "pipeline" in spec:
        return JobSpec.from_dict(spec["pipeline"])
    gate = dict(spec["gate"])
    names = gate.pop("names", None)
    margin = gate.pop("max_harmful_increase")
    return JobSpec(**spec["finetune"], audit=bool(spec.get("audit")), validation_data=spec.get("validation_data"),
                   gate=GateSpec(**gate, margin=margin, names=names), guard=GuardSpec(**spec["guard"]))


# ---------------------------------------------------------------- running a job (worker side)

def _event_for(kind: str, payload: dict) -> tuple[str, str, Any, str] | None:
    """A pipeline event as (type, message, data, level) for the job's event log; None: not logged."""
    if kind == "data":
        skipped = len(payload.get("skipped", []))
        return "message", f"Training data: {payload['n_used']} examples ({payload['format']})" + (
            f", {skipped} records skipped" if skipped else ""), payload, "info"
    if kind == "audit":
        prediction = payload.get("prediction") or {}  # named by the predictor's metric and judge
        return "audit", payload["summary"].capitalize() + (f"; {describe_prediction(prediction)}" if prediction.get("available")
                                                           else ""), payload, "info"
    if kind == "shift":
        return "audit", f"Shift toward safe: {payload['reason']}", payload, "info"
    if kind == "policy":
        return "audit", (f"Policy ({payload['policy']}): risk {payload['risk']}, k={payload['k']}, mode {payload['mode']}"
                         + (", safety system prompt" if payload["guard_system_prompt"] else "") + f"; {payload['reason']}"), payload, "info"
    if kind == "data_gate":
        verdict, level = ("REJECTED", "error") if not payload["passed"] else (
            ("WARNING", "warn") if payload["over_limit"] else ("passed", "info"))
        return "data_gate", f"Data gate ({payload['action']}) {verdict}: {payload['reason']}", payload, level
    if kind == "selecting":
        return "message", f"Selecting {payload['k']} safety examples with '{payload['selector']}'", payload, "info"
    if kind == "selection":
        return "selection", (f"Selected {len(payload['ids'])} safety examples with '{payload['selector']}' "
                             f"from a pool of {payload['pool_size']}: {', '.join(payload['ids'])}"), payload, "info"
    if kind == "train_log" and "loss" in payload:
        data = {"step": payload["step"], "total_steps": payload["max_steps"], "train_loss": float(payload["loss"]),
                "learning_rate": float(payload.get("learning_rate", 0) or 0)}
        preference = {name.replace("rewards/", "reward_"): float(payload[name]) for name in ("rewards/accuracies", "rewards/margins")
                      if name in payload}  # a dpo job's implicit-reward accuracy and margin on its training batches
        return "metrics", (f"Step {payload['step']}/{payload['max_steps']}: training loss={float(payload['loss']):.4f}"
                           + (f", reward margin={preference['reward_margins']:.4f}" if "reward_margins" in preference else "")), \
            {**data, **preference}, "info"
    if kind == "safety_pairs":
        dropped = f" ({len(payload['dropped'])} dropped: the raw model refused or gave nothing)" if payload["dropped"] else ""
        return "selection", (f"Safety preference pairs: {len(payload['pair_ids'])} refusals preferred over compliances written by "
                             f"{payload['rejected_model']}{dropped}"), {k: v for k, v in payload.items() if k != "cache"}, "info"
    if kind == "checkpoint":
        return "message", f"Checkpoint saved at step {payload['step']}", payload, "info"
    if kind == "trained":
        resumed = f" (resumed from {Path(payload['resumed_from']).name})" if payload.get("resumed_from") else ""
        return "message", f"Training finished: {payload['steps']} steps in {payload['seconds']:.0f} s{resumed}", payload, "info"
    if kind == "message":
        return "message", payload["text"], None, "info"
    if kind == "monitor_drift":
        return "monitor_drift", payload["summary"], payload, "info"
    if kind == "monitor_drift_skipped":
        return "monitor_drift", f"Monitor drift check skipped: {payload['error']}", None, "warn"
    if kind == "gating":
        names = payload["names"]
        return "message", f"Evaluating the adapter for the safety gate on {names['harmful_set']} and {names['overrefusal_set']}", None, "info"
    if kind == "gate":
        return "gate", _gate_message(payload), {k: v for k, v in payload.items() if k not in ("eval", "base_eval", "base_report")}, \
            "info" if payload["passed"] else "error"
    return None


def _gate_message(decision: dict) -> str:
    a, b, paired = decision["harmful_rate"], decision["base_harmful_rate"], decision["paired"]
    if paired is None or a["rate"] is None:
        return f"Safety gate FAILED: {'; '.join(decision['reasons'])}"
    return (f"Safety gate {'passed' if decision['passed'] else 'FAILED'}: harmful rate {a['rate']:.3f} ({a['count']}/{a['n']})"
            f" vs base {b['rate']:.3f} ({b['count']}/{b['n']}) on the same prompts; upper {1 - decision['alpha']:.0%} bound of the"
            f" increase {paired['high']:+.3f}, margin {decision['max_harmful_increase']:.2f}")


def execute_job(store: Store, settings: ServiceSettings, job: dict, should_abort: Callable[[], bool]) -> None:
    """Run one claimed job to a terminal state (succeeded / failed / cancelled). Never raises for job errors.
    When `should_abort()` (the worker is stopping) ends it, the job is left running for the worker to requeue."""
    job_id, stored = job["id"], job["spec"]
    outcome: dict[str, Any] = {"timings": {}}
    tokens: dict[str, int | None] = {"trained": None}

    def emit(kind: str, payload: dict) -> None:
        if kind == "train_log" and payload.get("num_tokens") is not None:
            tokens["trained"] = int(float(payload["num_tokens"]))
        if kind == "checkpoint":
            store.add_checkpoint(job_id, payload["step"], payload["path"], None)
        if kind == "gate":
            store.add_event(job_id, "Evaluation finished", type="eval", data=_without_paths(payload["eval"]))
        event = _event_for(kind, payload)
        if event:
            store.add_event(job_id, event[1], type=event[0], data=event[2], level=event[3])

    def should_stop() -> bool:
        return store.cancel_requested(job_id) or should_abort()

    def publish(result: PipelineResult) -> str:
        store.add_model(stored["fine_tuned_model"], job["tenant"], job["model"], job_id, str(result.adapter_dir),
                        result.guard.to_dict())
        return stored["fine_tuned_model"]

    try:
        if job["attempts"] > 1:
            store.add_event(job_id, f"Resuming job (attempt {job['attempts']}); training continues from its last checkpoint if one exists")
        store.add_event(job_id, "Fine-tuning job started")
        spec = job_spec(stored)
        Path(stored["job_dir"]).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(stored["job_dir"]) / "job_spec.json", stored)
        if not spec.gate.enabled:
            store.add_event(job_id, "Safety gate disabled by the request: deployed without a safety evaluation", level="warn",
                            type="gate", data={"passed": None, "enabled": False})
        try:
            result = run_pipeline(spec, on_event=emit, should_stop=should_stop, show_progress=False,
                                  selection_store=settings.selection_store, baseline_cache=settings.gate_baselines_dir,
                                  monitor_dir=_monitor_dir(settings, spec), publish=publish,
                                  reference_cache=settings.reference_cache(job["tenant"]))
        except DatasetError as error:
            raise JobFailed("invalid_training_file", str(error).replace(spec.data, job["training_file"]), "training_file")
        except DataRejected as rejected:
            raise JobFailed("data_gate_failed", f"The training file was rejected by the data gate: {rejected.decision['reason']}. "
                                                "The audit event lists the flagged examples and why.", "training_file")
        except FileNotFoundError as error:
            raise JobFailed("gate_data_unavailable", f"the safety gate could not load its prompts: {error}", "safety.gate")
        outcome = {**_result(result), "trained_tokens": tokens["trained"]}
        if result.passed is False:
            raise JobFailed("safety_gate_failed", "The fine-tuned model failed the safety gate: " + "; ".join(result.gate["reasons"])
                            + f". The adapter is kept for inspection with job {job_id} (adapter key {result.provenance['adapter_key']}).")
    except Cancelled:
        if should_abort() and not store.cancel_requested(job_id):
            return  # the worker is shutting down: leave the job running for takeover/resume
        store.set_status(job_id, "cancelled", expected=("running",), result={"timings": outcome["timings"]})
        store.add_event(job_id, "Job cancelled")
        return
    except JobFailed as failure:
        store.set_status(job_id, "failed", expected=("running",), error=failure.error(), result=outcome)
        store.add_event(job_id, f"Job failed: {failure.message}", level="error", type="error", data=failure.error())
        return
    except Exception as error:  # a bug or an environment problem: fail the job with the reason
        log.exception("job %s crashed", job_id)
        failure = JobFailed("internal_error", f"{type(error).__name__}: {error}")
        store.set_status(job_id, "failed", expected=("running",), error=failure.error(), result=outcome)
        store.add_event(job_id, f"Job failed: {failure.message}", level="error", type="error", data=failure.error())
        return
    store.set_status(job_id, "succeeded", expected=("running",), fine_tuned_model=stored["fine_tuned_model"],
                     result=outcome, trained_tokens=outcome.get("trained_tokens"))
    store.add_event(job_id, f"New fine-tuned model created: {stored['fine_tuned_model']}", data={"model": stored["fine_tuned_model"]})
    store.add_event(job_id, "The job has successfully completed")


def _monitor_dir(settings: ServiceSettings, spec: JobSpec) -> Path | None:
    """The server's hidden-state monitors, when they were trained on this job's base model."""
    folder = settings.resolved_monitor_dir()
    return folder if folder is not None and spec.model == settings.base_models[0] else None


def _result(result: PipelineResult) -> dict:
    """The job's stored result: what the API shows (no server paths)."""
    out: dict[str, Any] = {"timings": result.timings, "selection": result.selection, "train": result.provenance["train"],
                           "trained_tokens": None, "adapter": {"key": result.provenance["adapter_key"]},
                           "guard": result.guard.to_dict()}
    if result.audit is not None:
        out["audit"] = {k: v for k, v in result.audit.items() if k != "per_example"}  # per example: audit.json
    if result.data_gate is not None:
        out["data_gate"] = result.data_gate
    if result.drift is not None:
        out["monitor_drift"] = result.drift
    if result.gate is not None:
        out["gate"] = {k: v for k, v in result.gate.items() if k not in ("eval", "base_eval", "base_report")}
    return out


def _without_paths(report: dict) -> dict:
    """An evaluation report as a client sees it: no server paths (replies file, adapter folder)."""
    return {k: v for k, v in report.items() if k not in ("responses_file", "adapter")}
