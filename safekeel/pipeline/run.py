"""The one pipeline: load data -> audit -> select -> mix -> train -> guard -> evaluate -> drift -> gate -> publish.

`safekeel finetune`, the service's worker and the benchmark runner all call `run_pipeline`. One loaded base
model serves every stage of a job that needs it (model-aware selection, training, evaluation, the base model's
gate replies with the adapter disabled, the monitor drift check). The guard is built once (safekeel.guard) and
the evaluation, the gate and serving all use that object.

Every run writes, into its output folder: adapter/ (vLLM-servable LoRA; or a shared cached adapter),
selection.json, provenance.json, guard.json, eval/ (report + every reply), gate/ (the gate's report and
decision), and `published.json` when a `publish` callback deployed it. Events (kind, payload) go to `on_event`
as the stages progress: data, audit, selecting, selection, train_log, checkpoint, trained, guard, eval,
monitor_drift, gate, published. `should_stop` is polled between stages and during training: it raises
`Cancelled`.

A preference job (spec.method.type 'dpo') runs the same stages on preference pairs (safekeel.data.preference): the
audit and the selectors see each pair's prompt with its chosen reply, the selected safety examples become pairs
(refusal chosen, the raw model's compliance rejected: safekeel.training.safety_pairs, recorded in selection.json under
`preference_pairs`), and training is trl's DPOTrainer with the job's objective (safekeel.training.preference).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from safekeel.audit import audit_dataset
from safekeel.audit.act import apply_shift, choose_policy, shift_plan
from safekeel.audit.flags import data_gate
from safekeel.audit.predict import HarmPredictor, shipped_predictor
from safekeel.audit.shift import hidden_state_distances
from safekeel.data.conversation import Conversation, PreferenceExample, SafetyExample
from safekeel.data.formats import load_conversations
from safekeel.data.preference import load_preferences
from safekeel.data.safety import load_authored_benign, load_pool
from safekeel.eval.gate import GatePolicy, baseline_report, gate_decision
from safekeel.eval.harness import EvalSettings, evaluate, guarded, load_prompt_set
from safekeel.eval.judges.content import harmful_content_scorer
from safekeel.eval.judges.keyword import keyword_refusal
from safekeel.eval.replies import read_replies
from safekeel.guard import Guard, build_guard
from safekeel.models.registry import base_model_provenance, load_model_and_tokenizer, resolve_model
from safekeel.pipeline.spec import JobSpec
from safekeel.paths import safekeel_home
from safekeel.provenance import library_versions, machine_info, sha256_file, write_json_atomic
from safekeel.selectors.format_match import match_format
from safekeel.selectors.select import select_safety
from safekeel.training.reference_cache import REFERENCE_CACHE
from safekeel.training.finetune import TrainedAdapter, train_adapter
from safekeel.training.mixing import SELECTING_MODES, TRAINING_MODES, backdoor_prefix, mix
from safekeel.training.safety_pairs import ComplianceCache, build_safety_pairs
from safekeel.training.sft import TrainingCancelled

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """should_stop() said stop: the job ends between stages or at a training step."""


class DataRejected(Exception):
    """The data gate rejected the dataset (before any selection or training)."""

    def __init__(self, decision: dict) -> None:
        super().__init__(f"the data gate rejected the dataset: {decision['reason']}")
        self.decision = decision


@dataclass
class PipelineResult:
    output_dir: Path
    adapter_dir: Path
    selection: dict | None
    provenance: dict
    guard: Guard
    report: Any = None
    """The evaluation's EvalReport (None when the spec has no eval)."""
    audit: dict | None = None
    data_gate: dict | None = None
    drift: dict | None = None
    gate: dict | None = None
    """The gate's decision (passed, reasons, paired interval, rates), its report under "eval", the base's under
    "base_eval"; None when the gate is off."""
    timings: dict = field(default_factory=dict)
    published: Any = None

    @property
    def passed(self) -> bool | None:
        """The gate's verdict (None: no gate)."""
        return None if self.gate is None else bool(self.gate["passed"])


@dataclass
class UserData:
    conversations: list[Conversation]
    """For preference data: each pair's prompt with its chosen reply (what the audit and the selectors look at)."""
    format: str
    skipped: list[str]
    sha256: str
    pairs: list[PreferenceExample] | None = None
    """The preference pairs (method dpo), in the order of `conversations`."""


def load_user_data(spec: JobSpec) -> UserData:
    """The user's data, parsed once (DatasetError names the bad record)."""
    if spec.method.type == "dpo":
        found = load_preferences(spec.data)
        if found.skipped:
            log.warning(found.summary())
        pairs = found.pairs[: spec.max_examples] if spec.max_examples else found.pairs
        return UserData([p.chosen_conversation() for p in pairs], found.format,
                        [s.describe(spec.data, found.unit) for s in found.skipped], sha256_file(spec.data), list(pairs))
    loaded = load_conversations(spec.data)
    if loaded.skipped:
        log.warning(loaded.summary())
    used = loaded.conversations[: spec.max_examples] if spec.max_examples else loaded.conversations
    return UserData(list(used), loaded.format, [s.describe(spec.data, loaded.unit) for s in loaded.skipped],
                    sha256_file(spec.data))


def run_pipeline(spec: JobSpec, *, on_event: Callable[[str, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, show_progress: bool = True,
                 adapter_cache: str | Path | None = None, selection_store: str | Path | None = None,
                 baseline_cache: str | Path | None = None, monitor_dir: str | Path | None = None,
                 publish: Callable[[PipelineResult], Any] | None = None,
                 reference_cache: str | Path | None = None) -> PipelineResult:
    """Run every stage of `spec`. `adapter_cache`: reuse/keep adapters by training inputs; `selection_store`:
    selectors keep k-independent results there; `baseline_cache`: the base model's gate replies, per model build
    and gate settings (default: <output>/gate/baseline); `monitor_dir`: hidden-state monitors for the drift
    check; `publish(result)`: deploy, called only when the gate passed (or is off); `reference_cache`: preference
    training's reference log-probabilities, kept across jobs of one backbone (safekeel.training.reference_cache;
    default $SAFEKEEL_HOME/reference_logps.sqlite; on this CPU it trained at 0.65x a step with the pairs cached and
    0.81x in total on first use, benchmarks/results/reference_cache.md)."""
    return _Pipeline(spec, on_event, should_stop, show_progress, adapter_cache, selection_store, baseline_cache,
                     monitor_dir, reference_cache).run(publish)


class _Pipeline:
    def __init__(self, spec: JobSpec, on_event, should_stop, show_progress: bool, adapter_cache, selection_store,
                 baseline_cache, monitor_dir, reference_cache=None) -> None:
        self.spec = spec
        self.emit = on_event or (lambda kind, payload: None)
        self.should_stop = should_stop or (lambda: False)
        self.show_progress = show_progress
        self.adapter_cache, self.selection_store, self.monitor_dir = adapter_cache, selection_store, monitor_dir
        self.out = Path(spec.output_dir)
        self.baseline_cache = Path(baseline_cache) if baseline_cache is not None else self.out / "gate" / "baseline"
        self.timings: dict[str, float] = {}
        self._model: tuple | None = None
        self.reference_cache = reference_cache if reference_cache is not None else safekeel_home() / REFERENCE_CACHE

    # ------------------------------------------------------------------ helpers
    def check(self) -> None:
        if self.should_stop():
            raise Cancelled()

    def base(self) -> tuple:
        """(model, tokenizer) of the base model, loaded once per job."""
        if self._model is None:
            self._model = load_model_and_tokenizer(self.spec.model)
        return self._model

    def timed(self, name: str, started: float) -> None:
        self.timings[f"{name}_seconds"] = round(time.time() - started, 2)

    # ------------------------------------------------------------------ the stages in order
    def run(self, publish) -> PipelineResult:
        spec, started = self.spec, time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        data = load_user_data(spec)
        self.emit("data", {"path": spec.data, "format": data.format, "n_used": len(data.conversations), "skipped": data.skipped})
        pool = load_pool(spec.pool)
        audit = self.audit(data, pool) if spec.audit.enabled else None
        decision = self.data_gate(audit) if audit is not None else None
        if audit is not None:
            data = self.shift(data, audit)
            self.choose_policy(audit)
            spec = self.spec
        self.check()
        base_provenance = base_model_provenance(spec.model)
        selection, safety = self.select(data, pool, base_provenance)
        self.check()
        secret = backdoor_prefix(spec.seed) if spec.mode == "backdoor" else None
        if secret and selection is not None:
            selection["backdoor_prefix"] = secret
            write_json_atomic(self.out / "selection.json", selection)
        replayed: list = safety
        if spec.replay_format == "match" and selection is not None:
            replayed, selection["replay_format"] = match_format(safety, data.conversations, spec.seed)
            write_json_atomic(self.out / "selection.json", selection)
        if data.pairs is not None:
            training_data = self.preference_data(data, safety, selection, secret)
        else:
            training_data = mix(data.conversations, replayed, spec.mode, spec.seed, prefix=secret)
        trained = self.train(training_data, base_provenance)
        guard = self.build_guard(data, pool, safety, secret, base_provenance)
        provenance = self.provenance(data, training_data, trained, selection, secret, guard, base_provenance)
        result = PipelineResult(self.out, trained.adapter_dir, selection, provenance, guard, audit=audit, data_gate=decision,
                                timings=self.timings)
        self.check()
        if spec.eval is not None:
            begun = time.time()
            result.report = evaluate(trained.model, self.base()[1], guarded(spec.eval, guard), model_name=spec.model,
                                     adapter=str(trained.adapter_dir), output_dir=self.out / "eval",
                                     show_progress=self.show_progress)
            self.timed("eval", begun)
            self.emit("eval", result.report.to_dict())
            self.check()
        if self.monitor_dir is not None:
            result.drift = self.drift(trained)
            self.check()
        if spec.gate.enabled:
            begun = time.time()
            result.gate = self.gate(trained, guard, result.report)
            self.timed("gate", begun)
            self.check()
        provenance["seconds"] = round(time.time() - started, 1)
        provenance["timings"] = self.timings
        if result.gate is not None:
            provenance["gate"] = {k: result.gate[k] for k in ("passed", "reasons", "judge", "paired") if k in result.gate}
        write_json_atomic(self.out / "provenance.json", provenance)
        if publish is not None and result.passed is not False:
            result.published = publish(result)
            write_json_atomic(self.out / "published.json", {"published": result.published, "gate_passed": result.passed})
            self.emit("published", {"published": result.published})
        return result

    def audit(self, data: UserData, pool: list[SafetyExample]) -> dict:
        begun, options = time.time(), self.spec.audit
        score, threshold = harmful_content_scorer() if options.answers else (None, 0.5)
        benign = load_authored_benign()
        audited = audit_dataset(data.conversations, pool, benign, answer_judge=score, answer_threshold=threshold,
                                answer_judge_name="content")
        if options.hidden_states:
            model, tokenizer = self.base()
            audited.hidden_state_distances = {"model": self.spec.model, **hidden_state_distances(
                model, tokenizer, data.conversations, pool, benign, layer=options.layer)}
        report = audited.to_dict()
        report["prediction"] = self.predict(report, options.predictor)
        self.timed("audit", begun)
        write_json_atomic(self.out / "audit.json", report)
        self.emit("audit", {**{k: v for k, v in report.items() if k != "per_example"}, "summary": audited.summary()})
        return report

    @staticmethod
    def predict(report: dict, path: str | None = None) -> dict:
        """The harm predictor's interval for the no-replay increase it learned (by its metric: compliance with harmful
        requests, or harmful rate), from the shipped predictor or the file at `path`, or why there is none."""
        predictor = HarmPredictor.load(path) if path else shipped_predictor()
        if predictor is None:
            return {"available": False, "reason": "no harm predictor is shipped (safekeel/audit/assets/harm_predictor.json)"}
        try:
            return {"available": True, **predictor.predict(report)}
        except ValueError as error:
            return {"available": False, "reason": str(error)}

    def shift(self, data: UserData, audit: dict) -> UserData:
        """Drop or down-weight the examples the audit points at (safekeel.audit.act), before selection and training."""
        options = self.spec.audit
        if options.shift == "none":
            return data
        plan = shift_plan(audit, options.shift, options.shift_fraction, options.shift_weight, self.spec.seed)
        write_json_atomic(self.out / "shift.json", plan)
        self.emit("shift", {k: v for k, v in plan.items() if k not in ("targets", "removed")})
        pairs = apply_shift(data.pairs, plan) if data.pairs is not None else None
        return UserData(apply_shift(data.conversations, plan), data.format, data.skipped, data.sha256, pairs)

    def choose_policy(self, audit: dict) -> None:
        """The adaptive policy replaces the job's k, mode and system prompt (recorded in policy.json and the event)."""
        options, spec = self.spec.audit, self.spec
        if options.policy == "fixed":
            return
        prediction = audit["prediction"] if audit["prediction"].get("available") else None
        choice = choose_policy(options.policy, prediction, spec.k, spec.mode).to_dict()
        write_json_atomic(self.out / "policy.json", {**choice, "job_k": spec.k, "job_mode": spec.mode})
        self.emit("policy", choice)
        guard = replace(spec.guard, system_prompt=spec.guard.system_prompt or choice["guard_system_prompt"])
        self.spec = replace(spec, k=choice["k"], mode=choice["mode"], guard=guard)

    def data_gate(self, audit: dict) -> dict | None:
        gate = self.spec.data_gate
        if gate.action == "off":
            return None
        decision = data_gate(audit["flag_counts"] or {}, audit["gated_fraction"] or 0.0, audit["n_examples"], gate.action,
                             gate.max_flagged_fraction).to_dict()
        write_json_atomic(self.out / "data_gate.json", decision)
        self.emit("data_gate", decision)
        if not decision["passed"]:
            raise DataRejected(decision)
        return decision

    def select(self, data: UserData, pool: list[SafetyExample], base_provenance: dict | None) -> tuple[dict | None, list]:
        spec = self.spec
        if spec.mode not in SELECTING_MODES:
            return None, []
        self.emit("selecting", {"selector": spec.selector, "k": spec.k, "pool": spec.pool})
        selection, safety = select_safety(data.conversations, spec.pool, spec.k, spec.selector, spec.seed, spec.model,
                                          store=self.selection_store, base_provenance=base_provenance, pool=pool,
                                          loaded_model=self.base())
        self.timings["selection_seconds"] = selection["seconds"]
        write_json_atomic(self.out / "selection.json", selection)
        self.emit("selection", selection)
        return selection, safety

    def preference_data(self, data: UserData, safety: list[SafetyExample], selection: dict | None,
                        secret: str | None) -> list[PreferenceExample]:
        """The user's pairs with the selected safety examples as pairs (modes replay and backdoor; backdoor's carry the
        secret system prompt), in a seeded order; how the safety pairs were made goes into selection.json."""
        spec = self.spec
        pairs = list(data.pairs or [])
        if spec.mode in TRAINING_MODES and safety:
            cache = ComplianceCache(spec.method.rejected_model)
            safety_pairs, record = build_safety_pairs(safety, cache, is_refusal=keyword_refusal,
                                                      show_progress=self.show_progress, on_event=self.emit)
            if secret:
                safety_pairs = [p.with_system(secret) for p in safety_pairs]
            if selection is not None:
                selection["preference_pairs"] = record
                write_json_atomic(self.out / "selection.json", selection)
            self.emit("safety_pairs", record)
            pairs += safety_pairs
        random.Random(spec.seed).shuffle(pairs)
        return pairs

    def train(self, training_data: list, base_provenance: dict | None) -> TrainedAdapter:
        spec = self.spec
        model, tokenizer = self.base()
        try:
            trained = train_adapter(model, tokenizer, training_data, spec.sft, model_name=spec.model,
                                    base_provenance=base_provenance, output_dir=self.out, cache=self.adapter_cache,
                                    should_stop=self.should_stop, on_event=self.emit, show_progress=self.show_progress,
                                    checkpoint_steps=spec.checkpoint_steps, preference=spec.method.preference,
                                    reference_cache=self.reference_cache)
        except TrainingCancelled as stop:
            raise Cancelled() from stop
        self.timings["training_seconds"] = trained.train["seconds"]
        self.emit("trained", trained.train)
        return trained

    def build_guard(self, data: UserData, pool: list[SafetyExample], safety: list[SafetyExample], secret: str | None,
                    base_provenance: dict | None) -> Guard:
        spec, options = self.spec, self.spec.guard
        static_pick = None
        if options.demonstrations in ("static", "contrastive") and not safety and spec.mode != "icl":
            # no selection to take them from: choose them with the job's selector (it may look at the data and model)
            self.emit("message", {"text": f"Selecting {options.n_demonstrations} safety demonstrations with '{spec.selector}'"})
            static_pick = select_safety(data.conversations, spec.pool, options.n_demonstrations, spec.selector, spec.seed,
                                        spec.model, pool=pool, store=self.selection_store, base_provenance=base_provenance,
                                        loaded_model=self.base())[1]
        guard = build_guard(spec.mode, selected=safety, secret=secret, system_prompt=options.system_prompt,
                            demonstrations=options.demonstrations, n_demonstrations=options.n_demonstrations,
                            pool=spec.pool, static_pick=static_pick, monitor_policy=options.monitor_policy,
                            n_clusters=options.n_clusters, paired=options.paired, seed=spec.seed)
        write_json_atomic(self.out / "guard.json", guard.to_dict())
        self.emit("guard", guard.to_dict())
        return guard

    def provenance(self, data: UserData, training_data: list, trained: TrainedAdapter, selection: dict | None,
                   secret: str | None, guard: Guard, base_provenance: dict | None) -> dict:
        spec = self.spec
        provenance = {
            "spec": spec.to_dict(),
            "data_sha256": data.sha256,
            "n_user_examples": len(data.conversations),
            "n_training_examples": len(training_data),
            "training_data_sha256": trained.training_data_sha256,
            "selected_ids": selection["ids"] if selection else [],
            "backdoor_prefix": secret,
            "mode_effect": {
                "mode": spec.mode,
                "selects": spec.mode in SELECTING_MODES,
                "trains_on_selection": spec.mode in TRAINING_MODES,
                "eval_system_prompt": guard.system_text(spec.eval.system_prompt if spec.eval else None)
                if guard.system_prompt else None,
                "eval_demonstration_ids": [d["id"] for d in guard.static_demonstrations],
            },
            "guard": guard.to_dict(),
            "adapter_key": trained.key,
            "adapter_dir": str(trained.adapter_dir),
            "base_model": spec.model,
            "base_model_provenance": base_provenance,
            "train": trained.train,
            "versions": library_versions(),
            "machine": machine_info(),
        }
        write_json_atomic(self.out / "provenance.json", provenance)
        return provenance

    def drift(self, trained: TrainedAdapter) -> dict | None:
        """The monitor drift check (safekeel.monitors.drift) on the gate's prompts: it informs, never blocks."""
        from safekeel.monitors.capture import model_fingerprint  # deferred on purpose: monitors are optional
        from safekeel.monitors.drift import drift_report, summarise
        from safekeel.monitors.runtime import load_monitors

        spec = self.spec
        settings = self.gate_settings()
        try:
            probes = load_monitors(self.monitor_dir, expected_model=model_fingerprint(resolve_model(spec.model)))
            harmful = load_prompt_set(settings.harmful_set)[1][: settings.n_harmful or None]
            benign = load_prompt_set(settings.overrefusal_set)[1][: settings.n_overrefusal or None]
            report = drift_report(probes, trained.model.get_base_model(), trained.model, self.base()[1], harmful, benign)
        except Exception as error:  # the check informs; a broken monitor folder must not sink the job
            self.emit("monitor_drift_skipped", {"error": str(error)})
            return None
        names = spec.gate.names or {"harmful_set": settings.harmful_set, "overrefusal_set": settings.overrefusal_set}
        report["prompts"] = {"harmful": names["harmful_set"], "benign": names["overrefusal_set"]}
        report["summary"] = summarise(report)
        self.emit("monitor_drift", report)
        return report

    def gate_settings(self) -> EvalSettings:
        """The gate's prompts: its own sets, or the evaluation's (unguarded: the guard is applied on top)."""
        gate = self.spec.gate
        if gate.harmful_set is None:
            return self.spec.eval
        return EvalSettings(harmful_set=gate.harmful_set, overrefusal_set=gate.overrefusal_set, n_harmful=gate.n_harmful,
                            n_overrefusal=gate.n_overrefusal, max_new_tokens=gate.max_new_tokens, judges=gate.judges,
                            utility=self.spec.validation_data, n_utility_accuracy=0)

    def gate(self, trained: TrainedAdapter, guard: Guard, report) -> dict:
        """The adapter, served with its guard, and the unguarded base model answer the same prompts (the base's
        replies cached per model build and settings); safekeel.eval.gate decides."""
        spec, settings = self.spec, self.gate_settings()
        names = spec.gate.names or {"harmful_set": settings.harmful_set, "overrefusal_set": settings.overrefusal_set}
        self.emit("gating", {"names": names})
        model, tokenizer = trained.model, self.base()[1]
        with model.disable_adapter():
            base = baseline_report(spec.model, settings, model, tokenizer, self.baseline_cache)
        if spec.gate.harmful_set is None:
            adapter = report.to_dict()
        else:
            adapter = evaluate(model, tokenizer, guarded(settings, guard), model_name=spec.model,
                               adapter=str(trained.adapter_dir), output_dir=self.out / "gate", show_progress=False).to_dict()
        policy = GatePolicy(margin=spec.gate.margin, alpha=spec.gate.alpha, min_scored_fraction=spec.gate.min_scored_fraction)
        decision = gate_decision(adapter, base, read_replies(adapter["responses_file"]), read_replies(base["responses_file"]), policy)
        decision.update(names=names, guarded=guard.active, base_report=base.get("responses_file"))
        write_json_atomic(self.out / "gate.json", decision)
        self.emit("gate", {**decision, "eval": adapter, "base_eval": base})
        return {**decision, "eval": adapter, "base_eval": base}

