"""LoRA preference training (DPO, IPO and kin) with trl's DPOTrainer + peft.

No second model is held in memory: with a peft model, trl computes the reference log-probabilities with the adapter
disabled, i.e. the base model the adapter starts from (the "PEFT reference trick"). Training gets the same machinery
as LoRA SFT (safekeel.training.sft): progress logs, resumable checkpoints, a stop at the end of a step. Runs that train
one backbone on the same pairs again (a benchmark grid, the lr search) pass a ReferenceCache: each pair's reference
log-probabilities are then computed once and read back (safekeel.training.reference_cache).

What beta means depends on the objective. With Delta = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
(sums over the reply's tokens), trl's losses are:

| loss_type | loss per pair | beta | default |
| --- | --- | --- | --- |
| sigmoid (DPO, Rafailov et al. 2023) | -log sigmoid(beta Delta) | inverse temperature of the implicit reward; larger keeps the policy nearer the reference | 0.1 (the paper's dialogue / Anthropic HH runs) |
| ipo (IPO, Azar et al. 2023) | (Delta_avg - 1/(2 beta))^2, Delta_avg per token | tau: the regression target of the per-token log-ratio margin is 1/(2 tau); larger tau, smaller target | 0.1 (trl's; the paper has no LLM recipe; HF's beta sweep found 0.01 best on one 7B model) |
| hinge (SLiC, Zhao et al. 2023) | max(0, 1 - beta Delta) | 1/margin: the pair stops counting once Delta > 1/beta | 1.0 (SLiC's margin of 1) |
| robust (rDPO, Chowdhury et al. 2024) | DPO corrected for a label-flip rate eps = label_smoothing | as sigmoid | 0.1, eps 0.1 (the paper's) |

trl's IPO is length-normalised (Delta divided by the reply lengths) and the others are not, so the same beta is a
different constraint under each objective: beta is the objective's own knob, never one number shared across them.
Every other loss trl 1.16 implements is accepted with trl's default beta (0.1); exo_pair's eps defaults to 1e-3 (the
EXO paper's). A list of losses with `loss_weights` trains their weighted sum (trl's multi-loss, e.g. DPO + an NLL
term on the chosen replies: ["sigmoid", "sft"]); the components share one beta, by default the first loss's.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from safekeel.data.conversation import PreferenceExample
from safekeel.models.lora import LoraSFTConfig, lora_config
from safekeel.provenance import bf16_emulation_warning
from safekeel.training.sft import TrainingCancelled, TrainResult, latest_checkpoint, training_hooks
from safekeel.training.reference_cache import ReferenceCache, pair_key, reference_identity

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""trl 1.16's DPOTrainer loss types (DPOConfig.loss_type)."""
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 1.0, "robust": 0.1}
"""Per-objective defaults (module docstring says where each comes from); other losses: trl's 0.1."""
DEFAULT_LABEL_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}
"""rDPO's assumed label-flip rate and EXO's epsilon; 0 for every other loss."""
DPO_LEARNING_RATE = 5e-5
"""The LoRA learning rate of preference jobs unless given (the organism's DPO experiments,
benchmarks/archive/organism_dpo.py); supervised jobs keep LoraSFTConfig's."""
DPO_MAX_LENGTH = 512
"""The max training length of preference jobs unless given: hh-rlhf prompts are multi-turn, and trl drops a pair whose
prompt alone fills max_length (at 256, 8 of the first 109 pairs of hh-rlhf harmless-base test were dropped);
supervised jobs keep LoraSFTConfig's 256."""


@dataclass
class PreferenceConfig:
    """The preference objective: which of trl's losses (or a weighted list), beta and the label-noise rate. The LoRA
    hyperparameters (learning rate, epochs, batch size, rank, max_length, seed) stay in LoraSFTConfig."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    """One loss or several (a string is one); trained as their weighted sum."""
    loss_weights: tuple[float, ...] | None = None
    """One weight per loss (default: 1 each)."""
    beta: float | None = None
    """None: the first loss's default (DEFAULT_BETA); its meaning depends on the loss (module docstring)."""
    label_smoothing: float | None = None
    """robust: the assumed rate of flipped preference labels, in [0, 0.5); exo_pair: epsilon in (0, 1). None: the
    paper's (DEFAULT_LABEL_SMOOTHING), 0 for the other losses."""

    def __post_init__(self) -> None:
        self.loss_type = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ValueError(f"unknown preference loss {', '.join(map(repr, unknown)) or '(none given)'}; known (trl's "
                             f"names): {', '.join(LOSS_TYPES)}")
        if len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(f"loss_type lists a loss twice: {list(self.loss_type)}")
        if self.loss_weights is not None:
            self.loss_weights = tuple(float(w) for w in self.loss_weights)
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(f"loss_weights needs one weight per loss: {len(self.loss_weights)} weights for "
                                 f"{list(self.loss_type)}")
            if any(w < 0 for w in self.loss_weights) or not any(self.loss_weights):
                raise ValueError(f"loss_weights must be >= 0 and not all 0, got {list(self.loss_weights)}")
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss_type[0], 0.1)
        self.beta = float(self.beta)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.label_smoothing is None:
            self.label_smoothing = next((DEFAULT_LABEL_SMOOTHING[t] for t in self.loss_type if t in DEFAULT_LABEL_SMOOTHING), 0.0)
        self.label_smoothing = float(self.label_smoothing)
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"robust: label_smoothing (the label-flip rate) must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and not 0 < self.label_smoothing < 1:
            raise ValueError(f"exo_pair: label_smoothing (epsilon) must be in (0, 1), got {self.label_smoothing}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def label(self) -> str:
        """A short name: 'ipo', or '0.8*sigmoid+0.2*sft' for a combination."""
        if len(self.loss_type) == 1:
            return self.loss_type[0]
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        return "+".join(f"{w:g}*{t}" for w, t in zip(weights, self.loss_type))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loss_type"] = list(self.loss_type)
        data["loss_weights"] = list(self.loss_weights) if self.loss_weights is not None else None
        return data


def train_preference(model, tokenizer, pairs: Sequence, config: LoraSFTConfig, preference: PreferenceConfig,
                     output_dir: str | Path, should_stop: Callable[[], bool] | None = None,
                     on_log: Callable[[dict], None] | None = None, show_progress: bool = True,
                     checkpoint_dir: str | Path | None = None, checkpoint_steps: int | None = None,
                     on_checkpoint: Callable[[int, Path], None] | None = None,
                     reference_cache: ReferenceCache | None = None) -> TrainResult:
    """Train a LoRA adapter on preference pairs (PreferenceExample, or anything with trl's `to_row()`) with trl's
    DPOTrainer and save it (vLLM-servable: no modules_to_save, no DoRA). Checkpoints, resume and the stop hook as
    safekeel.training.sft.train_lora; raises TrainingCancelled when `should_stop()` stopped it. With
    `reference_cache`, the reference log-probabilities are read from it (computed once per pair and backbone and
    stored) instead of computed in every step (safekeel.training.reference_cache)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("no preference pairs")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir / "trainer"
    saving = bool(checkpoint_steps) and checkpoint_steps > 0
    resume_from = latest_checkpoint(checkpoint_dir) if saving else None
    args = DPOConfig(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        beta=preference.beta,
        loss_type=list(preference.loss_type),
        loss_weights=list(preference.loss_weights) if preference.loss_weights is not None else None,
        label_smoothing=preference.label_smoothing,
        logging_steps=config.logging_steps,
        save_strategy="steps" if saving else "no",
        save_steps=checkpoint_steps if saving else 500,
        save_total_limit=2 if saving else None,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=config.bf16,
        fp16=False,
        gradient_checkpointing=config.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
        dataset_num_proc=None,
        # only where a loss reads the reference (a pure NLL term does not)
        precompute_ref_log_probs=reference_cache is not None and any(loss != "sft" for loss in preference.loss_type),
    )
    if warning := bf16_emulation_warning(config.bf16, torch.cuda.is_available()):
        log.warning(warning)
    started = time.time()
    trainer_class = DPOTrainer
    if args.precompute_ref_log_probs:
        compute = "bfloat16 autocast" if config.bf16 else "float32"
        trainer_class = cached_reference_trainer(DPOTrainer, reference_cache, compute, show_progress, should_stop)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list([p.to_row() for p in pairs]),
                         processing_class=tokenizer, peft_config=lora_config(config),
                         callbacks=[training_hooks(should_stop, on_log, on_checkpoint, saving)])
    if len(trainer.train_dataset) < len(pairs):
        log.warning("%d of %d preference pairs dropped: their prompt alone fills max_length=%d tokens",
                    len(pairs) - len(trainer.train_dataset), len(pairs), config.max_length)
    if resume_from is not None:
        log.info("resuming preference training from %s", resume_from)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if getattr(trainer.state, "cancelled", False):
        raise TrainingCancelled(f"training cancelled at step {trainer.state.global_step}")
    trainer.model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert not adapter_config.get("modules_to_save") and not adapter_config.get("use_dora"), "adapter must be vLLM-servable"
    return TrainResult(adapter_dir=output_dir, steps=trainer.state.global_step, seconds=round(time.time() - started, 1),
                       train_loss=getattr(output, "training_loss", None), log_history=list(trainer.state.log_history),
                       resumed_from=str(resume_from) if resume_from else None, model=trainer.model,
                       reference_cached=bool(args.precompute_ref_log_probs))


STORE_EVERY = 32
"""Pairs computed between two stores while the cache fills (so a stop or a crash loses at most this many)."""


def cached_reference_trainer(base: type, cache: ReferenceCache, compute: str, show_progress: bool = True,
                             should_stop: Callable[[], bool] | None = None) -> type:
    """A DPOTrainer subclass whose precomputed reference log-probabilities (precompute_ref_log_probs) come from
    `cache`: each pair missing there is computed alone (one pair per forward, so no other pair's padding enters its
    value) with trl's own collator and reference forward, and stored every STORE_EVERY pairs, under the model's
    reference_identity with `compute` (the precision trl computes in) and the accelerator's device. `should_stop()`
    is checked between pairs (TrainingCancelled). A cache that cannot be read or written is skipped with a warning
    (the values are then computed and used, not kept). A model with an adapter named "ref" (trl's reference for
    re-trained adapters, not the base) falls back to trl's own precompute."""
    from tqdm.auto import tqdm

    class CachedReferenceDPOTrainer(base):
        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            if "ref" in getattr(self.accelerator.unwrap_model(self.model), "peft_config", {}):
                return super()._precompute_ref_logps(dataset, name, batch_size)
            reference = reference_identity(self.model, compute, self.accelerator.device.type)
            keys = [pair_key(reference, self.args.max_length, self.args.truncation_mode, row["prompt_ids"], row["chosen_ids"],
                             row["rejected_ids"]) for row in dataset]
            usable = True
            try:
                values = cache.get_pairs(keys)
            except sqlite3.Error as error:
                log.warning("reference cache %s unreadable (%s): computing every pair's reference, keeping none", cache.path, error)
                values, usable = {}, False
            missing = [i for i, key in enumerate(keys) if key not in values]
            log.info("reference log-probs of %d %s pairs: %d cached, %d to compute", len(keys), name, len(keys) - len(missing),
                     len(missing))
            model = self.ref_model or self.model
            pending: list[tuple[str, float, float]] = []
            for n, i in enumerate(tqdm(missing, desc=f"reference log-probs ({name}, not cached)", disable=not show_progress), 1):
                if should_stop is not None and should_stop():
                    if usable:
                        _store(cache, pending)
                    raise TrainingCancelled(f"cancelled while computing reference log-probs ({n - 1} of {len(missing)} pairs)")
                batch = {k: v.to(self.accelerator.device) for k, v in self.data_collator([dataset[i]]).items()}
                chosen, rejected = self.compute_ref_log_probs(model, batch)
                pending.append((keys[i], float(chosen[0]), float(rejected[0])))
                values[keys[i]] = pending[-1][1:]
                if len(pending) >= STORE_EVERY or n == len(missing):
                    usable = usable and _store(cache, pending)
                    pending = []
            dataset = dataset.add_column("ref_chosen_logps", [values[key][0] for key in keys])
            return dataset.add_column("ref_rejected_logps", [values[key][1] for key in keys])

    return CachedReferenceDPOTrainer


def _store(cache: ReferenceCache, rows: list[tuple[str, float, float]]) -> bool:
    """Keep rows in the cache; False (with a warning) when it cannot be written, so later rows are not tried."""
    try:
        cache.put_pairs(rows)
        return True
    except sqlite3.Error as error:
        log.warning("reference cache %s not writable (%s): the computed references are used, not kept", cache.path, error)
        return False


# ---------------------------------------------------------------- the organism experiments' interface (kept as it was)

@dataclass
class PreferencePair:
    """A prompt (chat messages up to the assistant turn) with a preferred and a dispreferred reply
    (benchmarks/archive/organism_dpo.py; the pipeline uses safekeel.data.conversation.PreferenceExample)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class LoraDPOConfig(LoraSFTConfig):
    learning_rate: float = DPO_LEARNING_RATE
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_length: int = 256
    """256, not DPO_MAX_LENGTH: benchmarks/archive/organism_dpo.py's committed results trained with it."""
    sft_weight: float = 0.0
    """> 0 adds an NLL term on the chosen replies with this weight (trl's "sft" loss; RPO)."""


def train_lora_dpo(model, tokenizer, pairs: Sequence[PreferencePair | PreferenceExample], config: LoraDPOConfig,
                   output_dir: str | Path, show_progress: bool = True) -> TrainResult:
    """train_preference with the objective in a LoraDPOConfig (sigmoid or ipo, plus an optional NLL term)."""
    losses = (config.loss_type, "sft") if config.sft_weight > 0 else (config.loss_type,)
    weights = (1.0, config.sft_weight) if config.sft_weight > 0 else None
    result = train_preference(model, tokenizer, pairs, config, PreferenceConfig(losses, weights, config.beta), output_dir,
                              show_progress=show_progress)
    result.model = None
    return result
