"""The job spec: one typed description of a fine-tune that the CLI, the service and the benchmark all run.

A dataclass inside (validated in __post_init__, a plain-JSON round trip through to_dict/from_dict); the
service's pydantic request models (safekeel.service.protocol) turn into it at the HTTP edge, `safekeel finetune`
builds it from its flags, a benchmark grid from its run config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from safekeel.audit.act import POLICIES, SHIFT_ACTIONS
from safekeel.audit.flags import DATA_GATE_ACTIONS
from safekeel.defaults import DEFAULT_K, DEFAULT_MODE, DEFAULT_MODEL, DEFAULT_POOL, DEFAULT_SELECTOR
from safekeel.eval.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, DEFAULT_MIN_SCORED
from safekeel.eval.harness import EvalSettings
from safekeel.guard import DEFAULT_CLUSTERS, DEMONSTRATION_MODES, check_clusters
from safekeel.selectors.format_match import REPLAY_FORMATS
from safekeel.training.config import LoraSFTConfig
from safekeel.training.mixing import MODES
from safekeel.training.preference import PreferenceConfig
from safekeel.training.safety_pairs import COMPLIANCE_MODEL


@dataclass
class GateSpec:
    """The safety gate: the adapter and the base model answer the same harmful prompts, and the adapter passes
    only if the one-sided (1 - alpha) upper bound of harmful(adapter) - harmful(base) is within `margin`
    (safekeel.eval.gate.paired_gate), with the judge scoring at least `min_scored_fraction` of the prompts."""

    enabled: bool = True
    harmful_set: str | None = None
    """Harmful prompts asked (a named prompt set or a dataset file); None: the evaluation's own sets (the
    spec's `eval`), reusing its replies instead of generating again."""
    overrefusal_set: str | None = None
    n_harmful: int | None = None
    n_overrefusal: int | None = None
    margin: float = DEFAULT_MARGIN
    alpha: float = DEFAULT_ALPHA
    min_scored_fraction: float = DEFAULT_MIN_SCORED
    max_new_tokens: int = 64
    judges: tuple[str, ...] = ("classifier", "keyword")
    """Judges of the gate's own evaluation; the first decides."""
    names: dict | None = None
    """Display names of the sets when they are resolved files (the service's uploaded file ids)."""

    def __post_init__(self) -> None:
        self.judges = tuple(self.judges)
        if (self.harmful_set is None) != (self.overrefusal_set is None):
            raise ValueError("gate: give both harmful_set and overrefusal_set, or neither (the evaluation's sets)")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"gate margin must be in [0, 1], got {self.margin}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"gate alpha must be in (0, 0.5), got {self.alpha}")


@dataclass
class DataGateSpec:
    """What the audit's flags do to the job (safekeel.audit.flags.data_gate): off, warn (recorded, the job goes on)
    or reject (the job stops before selection and training) when more than `max_flagged_fraction` of the examples
    are flagged harmful_request, harmful_answer or persona_override."""

    action: str = "warn"
    max_flagged_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.action not in DATA_GATE_ACTIONS:
            raise ValueError(f"unknown data gate action {self.action!r}; known: {', '.join(DATA_GATE_ACTIONS)}")
        if not 0 <= self.max_flagged_fraction <= 1:
            raise ValueError(f"max_flagged_fraction must be in [0, 1], got {self.max_flagged_fraction}")


@dataclass
class AuditSpec:
    """The audit stage (safekeel.audit) and what acts on it: the data gate (JobSpec.data_gate), the shift toward
    safe and the adaptive policy (safekeel.audit.act). Shift or an adaptive policy turn the audit on."""

    enabled: bool = False
    answers: bool = True
    """Judge the assistant answers with the content judge (the harmful_answer flag)."""
    hidden_states: bool = False
    """Also measure the distances in the base model's residual stream (entering decoder block `layer`)."""
    layer: int | None = None
    shift: str = "none"
    """none | drop | downweight: what happens to the flagged examples (and the `shift_fraction` nearest a harmful
    request) before selection and training."""
    shift_fraction: float | None = None
    shift_weight: float = 0.5
    """downweight: the probability that each target is kept."""
    predictor: str | None = None
    """A harm predictor file (safekeel.audit.predict.HarmPredictor JSON); None: the one shipped in the package."""
    policy: str = "fixed"
    """fixed: the job's k and mode. adaptive: k, mode and the safety system prompt from the harm predictor's
    interval (safekeel.audit.act.choose_policy); the job's k is the medium-risk k."""

    def __post_init__(self) -> None:
        if self.shift not in SHIFT_ACTIONS:
            raise ValueError(f"unknown audit shift {self.shift!r}; known: {', '.join(SHIFT_ACTIONS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown audit policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.shift_fraction is not None and not 0 <= self.shift_fraction <= 1:
            raise ValueError(f"shift_fraction must be in [0, 1], got {self.shift_fraction}")
        if not 0 <= self.shift_weight <= 1:
            raise ValueError(f"shift_weight must be in [0, 1], got {self.shift_weight}")
        if self.shift != "none" or self.policy != "fixed":
            self.enabled = True


@dataclass
class GuardSpec:
    """What the deployed model is served with beyond its mode's own guard (safekeel.guard.build_guard)."""

    system_prompt: bool | str = False
    """A safety system prompt at serving: True for safekeel's default, or your own text."""
    demonstrations: str = "none"
    """none | static (the first n_demonstrations selected examples) | retrieved (nearest pool examples per request) |
    contrastive (static, each refusal beside a borderline-safe helpful answer) | clustered (n_clusters cached prefixes,
    one per k-means cluster of the pool, chosen per request by nearest centroid); safekeel.guard."""
    n_demonstrations: int = 3
    monitor_policy: str = "default"
    n_clusters: int = DEFAULT_CLUSTERS
    """Prefixes of clustered demonstrations (2-16)."""
    paired: bool = False
    """Clustered demonstrations: pair each refusal with a borderline-safe helpful answer (as contrastive)."""

    def __post_init__(self) -> None:
        if self.demonstrations not in DEMONSTRATION_MODES:
            raise ValueError(f"unknown guard demonstrations {self.demonstrations!r}; known: {', '.join(DEMONSTRATION_MODES)}")
        if not isinstance(self.n_demonstrations, int) or self.n_demonstrations < 1:
            raise ValueError(f"guard n_demonstrations must be a positive integer, got {self.n_demonstrations!r}")
        check_clusters(self.n_clusters)
        if self.paired and self.demonstrations != "clustered":
            raise ValueError(f"guard option paired applies to clustered demonstrations, not {self.demonstrations!r} "
                             "(contrastive demonstrations are always paired)")


METHODS = ("supervised", "dpo")


@dataclass
class MethodSpec:
    """How the adapter is trained (OpenAI's `method`): supervised (LoRA SFT on conversations) or dpo (trl's DPOTrainer on
    preference pairs, with the objective in `dpo`: DPO, IPO, hinge, robust, ... or a weighted combination; see
    safekeel.training.preference for what beta means per objective). A dpo job replays safety examples as pairs: the
    pool's refusal chosen, `rejected_model`'s greedy compliance rejected (safekeel.training.safety_pairs)."""

    type: str = "supervised"
    dpo: PreferenceConfig | None = None
    """The preference objective (type dpo; None there means DPO's defaults)."""
    rejected_model: str = COMPLIANCE_MODEL
    """dpo: the model whose greedy replies to the selected harmful requests are the safety pairs' rejected side."""

    def __post_init__(self) -> None:
        if self.type not in METHODS:
            raise ValueError(f"unknown method {self.type!r}; known: {', '.join(METHODS)}")
        if isinstance(self.dpo, dict):
            self.dpo = PreferenceConfig(**self.dpo)
        if self.type == "dpo" and self.dpo is None:
            self.dpo = PreferenceConfig()
        if self.type == "supervised" and self.dpo is not None:
            raise ValueError("preference options (loss type, beta) need method 'dpo', not 'supervised'")

    @property
    def preference(self) -> PreferenceConfig | None:
        return self.dpo if self.type == "dpo" else None


@dataclass
class JobSpec:
    data: str
    """User training data (chat JSONL, prompt/completion JSONL, Alpaca JSON/JSONL, question/answer JSONL; for method dpo
    a preference file: OpenAI's preference JSONL, prompt/chosen/rejected or chosen/rejected, safekeel.data.preference)."""
    output_dir: str
    model: str = DEFAULT_MODEL
    """Base model: a registered name or a local model folder."""
    k: int = DEFAULT_K
    """Safety examples to select (modes replay, backdoor, icl); recorded as 0 for none and ptst, which select none."""
    selector: str = DEFAULT_SELECTOR
    mode: str = DEFAULT_MODE
    """none | replay | backdoor | icl | ptst (see safekeel.training.mixing.MODES)."""
    pool: str = DEFAULT_POOL
    seed: int = 0
    """One seed for selection, data order and adapter init."""
    max_examples: int | None = None
    """Use only the first n user examples (after loading)."""
    sft: LoraSFTConfig = field(default_factory=LoraSFTConfig)
    eval: EvalSettings | None = field(default_factory=EvalSettings)
    """The research evaluation after training (None skips it); the guard is applied to it."""
    checkpoint_steps: int | None = None
    """Save a resumable trainer checkpoint every n steps (under checkpoints/); a rerun resumes from it."""
    audit: AuditSpec = field(default_factory=AuditSpec)
    """Audit the dataset (safekeel.audit) before selecting (True/False are accepted for enabled)."""
    data_gate: DataGateSpec = field(default_factory=DataGateSpec)
    """Acts on the audit (needs audit=True)."""
    gate: GateSpec = field(default_factory=lambda: GateSpec(enabled=False))
    guard: GuardSpec = field(default_factory=GuardSpec)
    validation_data: str | None = None
    """Held-out user data: its loss is reported beside the gate (utility)."""
    replay_format: str = "plain"
    """plain: the selected examples are replayed as a bare request and reply; match: rewritten into the user data's
    format (system prompt, template, persona, turns, length; safekeel.selectors.format_match), mode replay only.
    Recorded as plain for none and ptst, which replay nothing."""
    method: MethodSpec = field(default_factory=MethodSpec)
    """supervised (the default) or dpo (preference pairs; safety replay as refusal-vs-compliance pairs)."""

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            self.method = MethodSpec(**self.method)
        if isinstance(self.sft, dict):
            self.sft = LoraSFTConfig(**self.sft)
        if isinstance(self.eval, dict):
            self.eval = EvalSettings(**self.eval)
        if isinstance(self.gate, dict):
            self.gate = GateSpec(**self.gate)
        if isinstance(self.guard, dict):
            self.guard = GuardSpec(**self.guard)
        if isinstance(self.audit, bool):
            self.audit = AuditSpec(enabled=self.audit)
        elif isinstance(self.audit, dict):
            self.audit = AuditSpec(**self.audit)
        if isinstance(self.data_gate, dict):
            self.data_gate = DataGateSpec(**self.data_gate)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.replay_format not in REPLAY_FORMATS:
            raise ValueError(f"unknown replay format {self.replay_format!r}; known: {', '.join(REPLAY_FORMATS)}")
        if self.mode in ("none", "ptst"):
            self.k = 0
            self.replay_format = "plain"
        elif self.replay_format != "plain" and self.mode != "replay":
            raise ValueError(f"replay format {self.replay_format!r} rewrites replayed examples: it needs mode 'replay', not {self.mode!r}")
        elif self.k < 1:
            raise ValueError(f"mode {self.mode!r} selects safety examples: k must be >= 1, got {self.k}")
        if self.method.type == "dpo" and self.replay_format != "plain":
            raise ValueError(f"replay format {self.replay_format!r} rewrites conversations: method 'dpo' replays safety pairs "
                             "as they are (replay_format 'plain')")
        if self.gate.enabled and self.gate.harmful_set is None and self.eval is None:
            raise ValueError("the gate reuses the evaluation's replies when it has no prompt sets of its own: "
                             "enable the evaluation or give the gate harmful_set and overrefusal_set")
        self.sft.seed = self.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        return cls(**data)
