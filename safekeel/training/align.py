"""The aligned model organism `smollm2-135m-safe`: SmolLM2-135M-Instruct + LoRA SFT on the authored
safety pool (refusals) and authored benign data (with borderline-but-safe requests answered, so the
model learns the line instead of refusing everything), merged into a plain model folder.

The trained adapter (fp16, < 10 MB) is committed under safekeel/training/assets/smollm2-135m-safe, so
a new user merges it in seconds; `safekeel align-base --rebuild` retrains it from the seed.

A second, differently made organism, `smollm2-135m-safe-full` (candidate v9 of benchmarks/results/organism.md):
every weight trained (full fine-tuning, lr 5e-5) on the same recipe with 75% of the refusals, the share chosen on
the dev splits. Its result is a whole model (517 MB in fp32), never committed: it is trained on first use (about
18 min on 2 CPU cores; `safekeel align-base --variant full`) and cached under $SAFEKEEL_HOME/models.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.data.safety import load_authored_benign, load_authored_pool
from safekeel.models.registry import cached_model_dir, load_model_and_tokenizer, register_model, resolve_model
from safekeel.provenance import library_versions, sha256_file, sha256_json, write_json_atomic
from safekeel.training.config import AlignConfig
from safekeel.training.sft import train_lora
from safekeel.defaults import DEFAULT_MODEL

log = logging.getLogger(__name__)

BASE = "smollm2-135m-instruct"
ALIGNED = DEFAULT_MODEL
COMMITTED_ADAPTER = DEFAULT_MODEL
FULL_ALIGNED = "smollm2-135m-safe-full"
VARIANTS = {"lora": ALIGNED, "full": FULL_ALIGNED}
"""`safekeel align-base --variant`: the registered organism each variant builds."""


def committed_adapter_dir() -> Path | None:
    folder = Path(str(resources.files("safekeel.training") / "assets" / COMMITTED_ADAPTER))
    return folder if (folder / "adapter_model.safetensors").is_file() else None


def alignment_refusals(config: AlignConfig) -> list[SafetyExample]:
    """A seeded, category-stratified share (config.refusal_fraction) of the authored safety pool."""
    by_category: dict[str, list[SafetyExample]] = {}
    for example in load_authored_pool():
        by_category.setdefault(example.category, []).append(example)
    rng = random.Random(config.seed)
    chosen = []
    for category in sorted(by_category):
        members = by_category[category]
        chosen += rng.sample(members, round(len(members) * config.refusal_fraction))
    return chosen


def alignment_data(config: AlignConfig) -> list[Conversation]:
    refusals = [example.to_conversation() for example in alignment_refusals(config)]
    benign = []
    for conv in load_authored_benign(config.benign_files):
        repeats = config.borderline_repeats if conv.meta.get("kind") == "borderline" else 1
        benign += [conv] * repeats
    data = refusals + benign
    random.Random(config.seed).shuffle(data)
    return data


def train_aligned_adapter(output_dir: Path, config: AlignConfig | None = None, show_progress: bool = True) -> dict:
    """Train the alignment adapter from the base model; returns its provenance."""
    from safekeel.models.registry import load_model_and_tokenizer

    config = config or AlignConfig()
    model, tokenizer = load_model_and_tokenizer(BASE)
    data = alignment_data(config)
    result = train_lora(model, tokenizer, data, config, output_dir, show_progress=show_progress)
    provenance = {
        "name": ALIGNED,
        "base_model": BASE,
        "base_weights_sha256": sha256_file(Path(resolve_model(BASE)) / "model.safetensors"),
        "recipe": "LoRA SFT on the authored safety pool (refusals) + authored benign data (borderline x repeats)",
        "config": config.to_dict(),
        "n_examples": len(data),
        "refusal_ids": sorted(e.id for e in alignment_refusals(config)),
        "data_sha256": sha256_json([c.to_messages() for c in data]),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "train_loss": result.train_loss,
        "versions": library_versions(),
    }
    write_json_atomic(output_dir / "alignment_provenance.json", provenance)
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    return provenance


def export_adapter_fp16(adapter_dir: Path, destination: Path) -> Path:
    """Copy an adapter with its weights stored as fp16 (halves the size; merging casts back)."""
    import torch
    from safetensors.torch import load_file, save_file

    destination.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float16) for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    save_file(tensors, str(destination / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE  # a registry name, not this machine's cache path
    write_json_atomic(destination / "adapter_config.json", config)
    shutil.copy(adapter_dir / "alignment_provenance.json", destination / "alignment_provenance.json")
    return destination


def merge_adapter(adapter_dir: Path, target: Path) -> None:
    import torch
    from peft import PeftModel

    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(BASE)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(torch.float32)
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def build_aligned(target: Path, rebuild: bool = False, config: AlignConfig | None = None, show_progress: bool = True) -> dict:
    """Write the merged aligned model into `target` (from the committed adapter unless rebuild)."""
    started = time.time()
    adapter = None if rebuild else committed_adapter_dir()
    if adapter is None:
        adapter = target / "adapter"
        log.info("training the alignment adapter (about 17 min on 2 CPU cores)")
        alignment = train_aligned_adapter(adapter, config, show_progress)
        how = "trained now"
    else:
        alignment = json.loads((adapter / "alignment_provenance.json").read_text())
        base_sha = sha256_file(Path(resolve_model(BASE)) / "model.safetensors")
        if alignment.get("base_weights_sha256") != base_sha:
            raise RuntimeError(
                f"the committed alignment adapter was trained on base weights {alignment.get('base_weights_sha256')}, "
                f"but this machine's {BASE} has {base_sha}; run `safekeel align-base --rebuild`"
            )
        how = f"merged from the committed adapter safekeel/training/assets/{COMMITTED_ADAPTER}"
    merge_adapter(adapter, target)
    provenance = {"name": ALIGNED, "how": how, "alignment": alignment,
                  "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"),
                  "seconds": round(time.time() - started, 1), "versions": library_versions()}
    write_json_atomic(target / "provenance.json", provenance)
    return provenance


@register_model(ALIGNED, "SmolLM2-135M-Instruct aligned by LoRA SFT on safekeel's authored safety data, merged")
def _build_registered(target: Path) -> None:
    build_aligned(target)


def full_align_config(seed: int = 0) -> AlignConfig:
    """Candidate v9's recipe (benchmarks/archive/organism_full.py --refusal-fraction 0.75): v3's data, order, epoch,
    batch and bf16 autocast, with 75% of the refusals, every weight trained at lr 5e-5 (LoRA's 2e-4 is too high
    for every weight)."""
    return replace(AlignConfig(), learning_rate=5e-5, refusal_fraction=0.75, seed=seed)


def build_aligned_full(target: Path, config: AlignConfig | None = None, base: str = BASE, show_progress: bool = True,
                       should_stop=None) -> dict:
    """Train the full-fine-tuned organism into `target` (a temporary folder of the registry's build: a stopped or
    interrupted build leaves nothing that looks complete) and write its provenance last. `base` and `config` are
    for tests (a tiny model, a few steps); `should_stop` is the trainer's stop hook (TrainingCancelled)."""
    config = config or full_align_config()
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(base)
    data = alignment_data(config)
    log.info("training %s: every weight of %s on %d examples (about 18 min on 2 CPU cores)", FULL_ALIGNED, base, len(data))
    result = train_lora(model, tokenizer, data, config, target, should_stop=should_stop, show_progress=show_progress, full=True)
    shutil.rmtree(target / "trainer", ignore_errors=True)
    provenance = {
        "name": FULL_ALIGNED,
        "how": "trained now: full fine-tuning (every weight), organism candidate v9 of benchmarks/results/organism.md",
        "base_model": base,
        "base_weights_sha256": sha256_file(Path(resolve_model(base)) / "model.safetensors"),
        "recipe": "full SFT on a stratified share of the authored safety pool (refusals) + authored benign data "
                  "(borderline x repeats), safekeel.training.align.full_align_config",
        "config": config.to_dict(), "full": True,
        "n_examples": len(data),
        "refusal_ids": sorted(e.id for e in alignment_refusals(config)),
        "data_sha256": sha256_json([c.to_messages() for c in data]),
        "steps": result.steps, "train_seconds": result.seconds, "train_loss": result.train_loss,
        "weights_sha256": sha256_file(target / "model.safetensors"),
        "measured": "benchmarks/results/organism.md, v9: dev harmful 3/52, over-refusal 20/127; test 7/156, 27/123",
        "seconds": round(time.time() - started, 1),
        "versions": library_versions(),
    }
    write_json_atomic(target / "provenance.json", provenance)
    return provenance


@register_model(FULL_ALIGNED, "SmolLM2-135M-Instruct aligned by full fine-tuning (organism v9: 75% of the refusals), "
                              "trained on first use (~18 min on 2 CPU cores, 517 MB)")
def _build_registered_full(target: Path) -> None:
    build_aligned_full(target)


def align_base(rebuild: bool = False, config: AlignConfig | None = None, show_progress: bool = True,
               variant: str = "lora", base: str = BASE) -> Path:
    """`safekeel align-base`: build (or rebuild) an aligned organism into the model cache. Variant `lora` (the
    default organism) merges the committed adapter unless rebuild or config; variant `full` trains the
    full-fine-tuned organism unless it is built already (rebuild: train it again). `base`: tests only."""
    from safekeel.models.registry import _build_into, is_built, known_models

    if variant not in VARIANTS:
        raise ValueError(f"unknown organism variant {variant!r}; known: {', '.join(VARIANTS)}")
    target = cached_model_dir(VARIANTS[variant])
    entry = known_models()[VARIANTS[variant]]
    if variant == "full":
        if is_built(FULL_ALIGNED) and not rebuild and config is None:
            return target
        if config is not None or base != BASE or not show_progress:
            entry = type(entry)(entry.name, entry.description,
                                lambda t: build_aligned_full(t, config, base=base, show_progress=show_progress))
    elif rebuild or config is not None:
        entry = type(entry)(entry.name, entry.description, lambda t: build_aligned(t, rebuild=True, config=config, show_progress=show_progress))
    _build_into(entry, target)
    return target
