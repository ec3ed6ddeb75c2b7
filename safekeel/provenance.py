"""Reproducibility records: content hashes, library versions and atomic JSON writes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "safekeel", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
    "sentence-transformers", "faiss-cpu", "scikit-learn", "numpy", "gguf",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes. Modules whose code a cache key must cover call it on their own __file__ at import
    (SOURCE_SHA256): the hash of the code that was loaded, not of a file that may have been edited since."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs that compute bfloat16 matmuls natively (AVX512-BF16, AMX)."""


def cpu_bf16_support(cpuinfo: str | None = None) -> dict[str, Any]:
    """Whether this machine's CPU computes bfloat16 natively: {"native": True/False (None where
    /proc/cpuinfo cannot be read or lists no flags), "model": the CPU's model name, "flags": the bf16
    flags it lists}. Without them PyTorch emulates bf16 matmuls: measured on a 2-core AMD EPYC with AVX2
    only, a 1024x576 @ 576x1536 matmul took 2,037 ms in bfloat16 against 47 ms in float32 (43x), and the
    modes grid's gsm8k_random100-ptst run (25 bf16 LoRA steps) trained in 6,399 s at seed 2 there against
    168 s at seed 1 on the machine the grids had run on (6,732 s against 264 s end to end)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"native": None, "model": platform.processor() or platform.machine(), "flags": []}
    model = flags = None
    for line in cpuinfo.splitlines():  # one block per core: the first of each key speaks for all
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    model = model or platform.machine()
    if flags is None:
        return {"native": None, "model": model, "flags": []}
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return {"native": bool(found), "model": model, "flags": found}


def bf16_emulation_warning(bf16: bool, cuda: bool, cpuinfo: str | None = None) -> str | None:
    """The warning to log when bf16 training is asked for on a CPU that only emulates it (None otherwise)."""
    if not bf16 or cuda:
        return None
    support = cpu_bf16_support(cpuinfo)
    if support["native"] is not False:
        return None
    return (f"bf16 training requested on a CPU without native bfloat16 ({support['model']}: no "
            f"{' or '.join(BF16_CPU_FLAGS)} flag): PyTorch emulates it, tens of times slower than float32 "
            "(43x on a 2-core AVX2 EPYC); set bf16: false here, or run on a CPU with AVX512-BF16/AMX to "
            "reproduce results trained in bf16")


def machine_info() -> dict[str, Any]:
    """The hardware a record was made on (its seconds depend on it, and bf16 results on its arithmetic)."""
    support = cpu_bf16_support()
    return {"platform": platform.platform(), "cpu": support["model"], "cpus": os.cpu_count(),
            "cpu_bf16_native": support["native"]}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
