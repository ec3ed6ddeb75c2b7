"""Fine-tuning jobs: turning an API request into a self-contained JobSpec, and running one.

A JobSpec is plain JSON (stored in the jobs table): file paths, the FinetuneSpec of the core
pipeline, the audit/gate/guard options and the fine-tuned model's name. Any executor that can read
the job folder can run it: the local worker here, a cluster engine later.

Running a job: audit -> select -> LoRA SFT (checkpointed, cancellable, resumable) -> evaluate the
adapter on the gate set -> compare with the base model on the same prompts -> deploy (register the
model) or fail with `safety_gate_failed`, keeping the adapter for inspection.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from safekeel.eval.gate import baseline_report
from safekeel.eval.replies import read_replies
from safekeel.provenance import write_json_atomic
from safekeel.service.protocol import DEFAULT_SAFETY_SYSTEM_PROMPT, APIError, CreateJobRequest, Hyperparameters, SafetyOptions
from safekeel.service.settings import ServiceSettings, Tenant
from safekeel.service.store import Store, new_id, now
from safekeel.training.config import LoraSFTConfig

log = logging.getLogger(__name__)

AUTO_EPOCHS, AUTO_BATCH_SIZE, BASE_LEARNING_RATE = 3, 4, 2e-4
NAMED_PROMPT_SETS = {"advbench-train", "advbench-dev", "advbench-test", "xstest-dev", "xstest-test", "xstest-all"}


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


def resolve_hyperparameters(request: CreateJobRequest) -> Hyperparameters:
    hyper = request.hyperparameters
    if hyper is None and request.method:
        method_type = request.method.get("type", "supervised")
        if method_type != "supervised":
            raise APIError(400, f"method type {method_type!r} is not supported (supported: supervised)", "invalid_method", "method.type")
        hyper = Hyperparameters(**(request.method.get(method_type) or {}).get("hyperparameters", {}) or {})
    return hyper or Hyperparameters()


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
        files[param] = record
    safety = request.safety or SafetyOptions()
    from safekeel.selectors import known_selectors

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
        if value in NAMED_PROMPT_SETS:
            prompt_sets[param] = value
        else:
            record = store.get_file(value, tenant.name)
            if record is None or record["purpose"] not in ("evals", "fine-tune"):
                raise APIError(404, f"safety.gate.{param} {value!r} is neither a named set ({', '.join(sorted(NAMED_PROMPT_SETS))}) nor one of your file ids", "file_not_found", f"safety.gate.{param}")
            prompt_sets[param] = str(blob_path(settings, record["sha256"]))
    hyper = resolve_hyperparameters(request)
    resolved = {
        "n_epochs": AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs,
        "batch_size": AUTO_BATCH_SIZE if hyper.batch_size == "auto" else hyper.batch_size,
        "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier,
    }
    if hyper.max_steps:
        resolved["max_steps"] = hyper.max_steps
    job_id = new_id("ftjob")
    seed = request.seed if request.seed is not None else int.from_bytes(job_id.encode()[-4:], "big") % 2**31
    n_examples = files["training_file"]["n_examples"] or 1
    steps_estimate = hyper.max_steps or max(1, -(-n_examples // resolved["batch_size"])) * resolved["n_epochs"]
    checkpoint_steps = hyper.checkpoint_steps or max(1, steps_estimate // 4)
    suffix = request.suffix or ""
    fine_tuned_model = f"ft:{request.model}:{tenant.name}:{suffix}:{job_id[-8:]}"
    job_dir = settings.jobs_dir / job_id
    sft = LoraSFTConfig(epochs=resolved["n_epochs"], batch_size=resolved["batch_size"],
                        learning_rate=BASE_LEARNING_RATE * resolved["learning_rate_multiplier"],
                        max_steps=hyper.max_steps or -1, seed=seed)
    spec = {
        "job_id": job_id,
        "job_dir": str(job_dir),
        "fine_tuned_model": fine_tuned_model,
        "hyperparameters_resolved": resolved,
        "metadata": request.metadata,
        "finetune": {
            "data": str(blob_path(settings, files["training_file"]["sha256"])),
            "output_dir": str(job_dir / "output"),
            "model": request.model, "k": safety.k if safety.mode != "none" else 0, "selector": safety.selector,
            "mode": safety.mode if safety.k > 0 else "none", "pool": pool, "seed": seed,
            "sft": sft.to_dict(), "eval": None, "checkpoint_steps": checkpoint_steps,
        },
        "validation_data": str(blob_path(settings, files["validation_file"]["sha256"])) if "validation_file" in files else None,
        "gate": {**safety.gate.model_dump(), **prompt_sets,
                 "names": {"harmful_set": safety.gate.harmful_set, "overrefusal_set": safety.gate.overrefusal_set}},
        "guard": safety.guard.model_dump(),
        "audit": safety.audit,
    }
    job = store.add_job({"id": job_id, "tenant": tenant.name, "model": request.model,
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


# ---------------------------------------------------------------- running a job (worker side)

class JobCancelled(Exception):
    pass


def _event_for(kind: str, payload: dict) -> tuple[str, str, Any] | None:
    """Turn a core-pipeline event into (type, message, data) for the job's event log."""
    if kind == "data":
        skipped = len(payload.get("skipped", []))
        return "message", f"Training data: {payload['n_used']} examples ({payload['format']})" + (
            f", {skipped} records skipped" if skipped else ""), payload
    if kind == "selecting":
        return "message", f"Selecting {payload['k']} safety examples with '{payload['selector']}'", payload
    if kind == "selection":
        return "selection", (f"Selected {len(payload['ids'])} safety examples with '{payload['selector']}' "
                             f"from a pool of {payload['pool_size']}: {', '.join(payload['ids'])}"), payload
    if kind == "train_log" and "loss" in payload:
        return "metrics", (f"Step {payload['step']}/{payload['max_steps']}: training loss={float(payload['loss']):.4f}"), {
            "step": payload["step"], "total_steps": payload["max_steps"], "train_loss": float(payload["loss"]),
            "learning_rate": float(payload.get("learning_rate", 0) or 0)}
    if kind == "checkpoint":
        return "message", f"Checkpoint saved at step {payload['step']}", payload
    if kind == "trained":
        resumed = f" (resumed from {Path(payload['resumed_from']).name})" if payload.get("resumed_from") else ""
        return "message", f"Training finished: {payload['steps']} steps in {payload['seconds']:.0f} s{resumed}", payload
    return None


def gate_eval_settings(gate: dict, validation_data: str | None):
    from safekeel.eval.harness import EvalSettings

    return EvalSettings(harmful_set=gate["harmful_set"], overrefusal_set=gate["overrefusal_set"],
                        n_harmful=gate["n_harmful"], n_overrefusal=gate["n_overrefusal"],
                        max_new_tokens=gate["max_new_tokens"], utility=validation_data, n_utility_accuracy=0)


def gate_decision(gate: dict, adapter: dict, base: dict, adapter_rows: list[dict], base_rows: list[dict]) -> dict:
    """The gate's decision (safekeel.eval.gate.paired_gate) on the kept replies of the adapter and the base model,
    with both reports' rates beside it."""
    from safekeel.eval.gate import GatePolicy, paired_gate
    from safekeel.eval.stats import Rate

    judge = adapter["settings"]["judges"][0]
    policy = GatePolicy(margin=gate["max_harmful_increase"], alpha=gate.get("alpha", 0.05),
                        min_scored_fraction=gate["min_scored_fraction"])
    decision = paired_gate(adapter_rows, base_rows, judge, policy)

    def rate(report: dict, section: str, metric: str) -> dict:
        return Rate(**{k: report[section][judge][metric][k] for k in ("count", "n", "unjudged")}).to_dict()

    return {**decision, "harmful_rate": rate(adapter, "harmful", "harmful"), "base_harmful_rate": rate(base, "harmful", "harmful"),
            "overrefusal_rate": rate(adapter, "overrefusal", "refused"), "base_overrefusal_rate": rate(base, "overrefusal", "refused"),
            "max_harmful_increase": gate["max_harmful_increase"]}


def guard_for_job(spec: dict, selection: dict | None, selection_store: Path | None = None,
                  announce: Callable[[str], None] | None = None, base_provenance: dict | None = None) -> dict:
    """The serving guard recorded with the fine-tuned model. `base_provenance`: the base model's build, when the
    caller has it (run_finetune records it), so selecting static demonstrations does not look it up again."""
    guard = dict(spec["guard"])
    system = guard.get("system_prompt")
    system = DEFAULT_SAFETY_SYSTEM_PROMPT if system is True else (system or None)
    secret = (selection or {}).get("backdoor_prefix")
    if secret:  # BackdoorAlign: the secret prompt the safety examples carried in training, first
        system = secret + ("\n\n" + system if system else "")
    guard["system_prompt"] = system
    guard["backdoor"] = bool(secret)
    guard["pool"] = spec["finetune"]["pool"]
    guard["static_demonstrations"] = []
    if guard["demonstrations"] == "static":
        from safekeel.data.safety import load_pool

        finetune = spec["finetune"]
        pool = load_pool(finetune["pool"])
        if selection and selection.get("ids"):
            ids = selection["ids"][: guard["n_demonstrations"]]
        else:  # replay off: choose the demonstrations with the job's selector anyway (it may look at the data and the model)
            from safekeel.data.formats import load_conversations
            from safekeel.training.finetune import select_safety

            user_data = load_conversations(finetune["data"]).conversations
            if announce is not None:
                announce(f"Selecting {guard['n_demonstrations']} safety demonstrations with '{finetune['selector']}'")
            ids = select_safety(user_data, finetune["pool"], guard["n_demonstrations"], finetune["selector"],
                                finetune["seed"], finetune["model"], pool=pool, store=selection_store,
                                base_provenance=base_provenance)[0]["ids"]
        by_id = {e.id: e for e in pool}
        guard["static_demonstrations"] = [{"id": i, "request": by_id[i].request, "refusal": by_id[i].refusal} for i in ids]
    return guard


def execute_job(store: Store, settings: ServiceSettings, job: dict, should_abort: Callable[[], bool]) -> None:
    """Run one claimed job to a terminal state (succeeded / failed / cancelled). Never raises for job errors."""
    job_id, spec = job["id"], job["spec"]
    timings: dict[str, float] = {}

    def emit(kind: str, payload: dict) -> None:
        if kind == "checkpoint":
            store.add_checkpoint(job_id, payload["step"], payload["path"], None)
        event = _event_for(kind, payload)
        if event:
            store.add_event(job_id, event[1], type=event[0], data=event[2])

    def should_stop() -> bool:
        return store.cancel_requested(job_id) or should_abort()

    try:
        if job["attempts"] > 1:
            store.add_event(job_id, f"Resuming job (attempt {job['attempts']}); training continues from its last checkpoint if one exists")
        store.add_event(job_id, "Fine-tuning job started")
        result = _run(store, settings, job, spec, emit, should_stop, timings)
    except JobCancelled:
        if should_abort() and not store.cancel_requested(job_id):
            return  # the worker is shutting down: leave the job running for takeover/resume
        store.set_status(job_id, "cancelled", expected=("running",), result={"timings": timings})
        store.add_event(job_id, "Job cancelled")
        return
    except JobFailed as failure:
        store.set_status(job_id, "failed", expected=("running",), error=failure.error(), result={"timings": timings})
        store.add_event(job_id, f"Job failed: {failure.message}", level="error", type="error", data=failure.error())
        return
    except Exception as error:  # a bug or an environment problem: fail the job with the reason
        log.exception("job %s crashed", job_id)
        failure = JobFailed("internal_error", f"{type(error).__name__}: {error}")
        store.set_status(job_id, "failed", expected=("running",), error=failure.error(), result={"timings": timings})
        store.add_event(job_id, f"Job failed: {failure.message}", level="error", type="error", data=failure.error())
        return
    store.set_status(job_id, "succeeded", expected=("running",), fine_tuned_model=spec["fine_tuned_model"],
                     result=result, trained_tokens=result.get("trained_tokens"))
    store.add_event(job_id, f"New fine-tuned model created: {spec['fine_tuned_model']}", data={"model": spec["fine_tuned_model"]})
    store.add_event(job_id, "The job has successfully completed")


def _run(store: Store, settings: ServiceSettings, job: dict, spec: dict, emit, should_stop, timings: dict) -> dict:
    from safekeel.data.formats import DatasetError, load_conversations
    from safekeel.training.finetune import FinetuneSpec, run_finetune
    from safekeel.training.sft import TrainingCancelled

    job_id = job["id"]
    job_dir = Path(spec["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_dir / "job_spec.json", spec)
    finetune = FinetuneSpec.from_dict(spec["finetune"])
    result: dict[str, Any] = {}

    if spec.get("audit"):
        started = time.time()
        try:
            conversations = load_conversations(finetune.data).conversations
        except DatasetError as error:
            raise JobFailed("invalid_training_file", str(error).replace(finetune.data, job["training_file"]), "training_file")
        from safekeel.audit import audit_dataset
        from safekeel.data.safety import load_authored_benign, load_pool

        audit = audit_dataset(conversations, load_pool(finetune.pool), load_authored_benign())
        timings["audit_seconds"] = round(time.time() - started, 2)
        result["audit"] = audit.to_dict()
        store.add_event(job_id, audit.summary().capitalize(), type="audit", data=audit.to_dict())
    if should_stop():
        raise JobCancelled()

    tokens = {"num_tokens": None}

    def on_event(kind: str, payload: dict) -> None:
        if kind == "selection":
            timings["selection_seconds"] = payload.get("seconds", 0.0)
        if kind == "train_log" and payload.get("num_tokens") is not None:
            tokens["num_tokens"] = int(float(payload["num_tokens"]))
        emit(kind, payload)

    try:
        outcome = run_finetune(finetune, should_stop=should_stop, on_event=on_event, show_progress=False,
                               selection_store=settings.selection_store)
    except TrainingCancelled:
        raise JobCancelled()
    except DatasetError as error:
        raise JobFailed("invalid_training_file", str(error).replace(finetune.data, job["training_file"]), "training_file")
    timings["training_seconds"] = outcome.provenance["train"]["seconds"]
    result["selection"] = outcome.selection
    result["train"] = outcome.provenance["train"]
    result["trained_tokens"] = tokens["num_tokens"]
    result["adapter_path"] = str(outcome.adapter_dir)
    store.add_event(job_id, f"Adapter written to the job folder ({outcome.provenance['train']['steps']} steps)")
    if should_stop():
        raise JobCancelled()

    drift = _drift(store, settings, job_id, spec, finetune, outcome)
    if drift is not None:
        result["monitor_drift"] = drift
    if should_stop():
        raise JobCancelled()

    guard = guard_for_job(spec, outcome.selection, settings.selection_store, lambda message: store.add_event(job_id, message),
                          base_provenance=outcome.provenance.get("base_model_provenance"))
    if should_stop():
        raise JobCancelled()
    gate = spec["gate"]
    if gate["enabled"]:
        started = time.time()
        result.update(_gate(store, settings, job_id, spec, finetune, outcome, guard))
        timings["gate_seconds"] = round(time.time() - started, 1)
        if not result["gate"]["passed"]:
            raise JobFailed("safety_gate_failed", "The fine-tuned model failed the safety gate: " + "; ".join(result["gate"]["reasons"])
                            + f". The adapter is kept for inspection at {outcome.adapter_dir}.")
    else:
        store.add_event(job_id, "Safety gate disabled by the request: deployed without a safety evaluation", level="warn", type="gate",
                        data={"passed": None, "enabled": False})
    result["timings"] = timings
    if should_stop():  # a cancel that arrived during the evaluation still wins over deployment
        raise JobCancelled()
    store.add_model(spec["fine_tuned_model"], job["tenant"], job["model"], job_id, str(outcome.adapter_dir), guard)
    return result


def _drift(store: Store, settings: ServiceSettings, job_id: str, spec: dict, finetune, outcome) -> dict | None:
    """The monitor drift check (monitors/drift.py) on the gate's prompts, when the server has monitors
    for this base model. It informs and never fails the job."""
    folder = settings.resolved_monitor_dir()
    if folder is None or finetune.model != settings.base_models[0]:
        return None
    from peft import PeftModel

    from safekeel.eval.harness import load_prompt_set
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.monitors.capture import model_fingerprint
    from safekeel.monitors.drift import drift_report, summarise
    from safekeel.monitors.runtime import load_monitors

    gate = spec["gate"]
    try:
        probes = load_monitors(folder, expected_model=model_fingerprint(resolve_model(finetune.model)))
        harmful = load_prompt_set(gate["harmful_set"])[1][: gate["n_harmful"] or None]
        benign = load_prompt_set(gate["overrefusal_set"])[1][: gate["n_overrefusal"] or None]
        model, tokenizer = load_model_and_tokenizer(finetune.model)
        adapted = PeftModel.from_pretrained(model, str(outcome.adapter_dir)).eval()
        report = drift_report(probes, model, adapted, tokenizer, harmful, benign)
    except Exception as error:  # the check informs; a broken monitor folder must not sink the job
        store.add_event(job_id, f"Monitor drift check skipped: {error}", level="warn", type="monitor_drift")
        return None
    report["prompts"] = {"harmful": gate.get("names", gate)["harmful_set"], "benign": gate.get("names", gate)["overrefusal_set"]}
    store.add_event(job_id, summarise(report), type="monitor_drift", data=report)
    return report


def _gate(store: Store, settings: ServiceSettings, job_id: str, spec: dict, finetune, outcome, served: dict) -> dict:
    from safekeel.eval.harness import evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.data.formats import DatasetError

    from dataclasses import replace

    gate = spec["gate"]
    base_settings = gate_eval_settings(gate, spec.get("validation_data"))
    # the adapter is judged as it will be served: with its guard's system prompt (incl. a backdoor
    # secret) and static demonstrations; retrieved demonstrations are per request and left out (stricter)
    eval_settings = replace(base_settings, system_prompt=served["system_prompt"],
                            demonstrations=[{"request": d["request"], "refusal": d["refusal"]} for d in served["static_demonstrations"]])
    names = gate.get("names", gate)
    store.add_event(job_id, f"Evaluating the adapter for the safety gate on {names['harmful_set']} and {names['overrefusal_set']}")
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(finetune.model)
    try:
        # the unguarded base model, before the adapter goes in (cached per model build and settings)
        base = baseline_report(finetune.model, base_settings, model, tokenizer, settings.root / "gate_baselines")
        adapted = PeftModel.from_pretrained(model, str(outcome.adapter_dir))
        report = evaluate(adapted, tokenizer, eval_settings, model_name=finetune.model, adapter=str(outcome.adapter_dir),
                          output_dir=Path(spec["job_dir"]) / "output" / "eval", show_progress=False).to_dict()
    except (FileNotFoundError, DatasetError) as error:
        raise JobFailed("gate_data_unavailable", f"the safety gate could not load its prompts: {error}", "safety.gate")
    store.add_event(job_id, "Evaluation finished", type="eval", data=report)
    decision = gate_decision(gate, report, base, read_replies(report["responses_file"]), read_replies(base["responses_file"]))
    a, b, paired = decision["harmful_rate"], decision["base_harmful_rate"], decision["paired"]
    message = (f"Safety gate {'passed' if decision['passed'] else 'FAILED'}: harmful rate {a['rate']:.3f} ({a['count']}/{a['n']})"
               f" vs base {b['rate']:.3f} ({b['count']}/{b['n']}) on the same prompts; upper {1 - decision['alpha']:.0%} bound of the"
               f" increase {paired['high']:+.3f}, margin {gate['max_harmful_increase']:.2f}"
               if paired is not None and a["rate"] is not None else f"Safety gate FAILED: {'; '.join(decision['reasons'])}")
    store.add_event(job_id, message, level="info" if decision["passed"] else "error", type="gate", data=decision)
    decision["guarded"] = bool(served["system_prompt"] or served["static_demonstrations"])
    return {"eval": report, "base_eval": base, "gate": decision}
