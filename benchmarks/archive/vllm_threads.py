"""vLLM on CPU: how many cores its model worker gets, and what that does to an evaluation's generation.

    python benchmarks/archive/vllm_threads.py [--adapter DIR] [--reserved 1 0]

On x86 vLLM reserves `local_world_size` cores (here 1 of 2) for its scheduler process unless
VLLM_CPU_NUM_OF_RESERVED_CPU says otherwise, so the worker ran on one thread. safekeel's offline
evaluation engine (safekeel/models/engines/vllm_engine.py) now sets the reservation to 0. This script generates the
selector grid's evaluation prompts (AdvBench test + XSTest safe test, greedy, 48 new tokens, float32)
once per setting, each in a fresh process (the setting is read at engine start), times the generation
after a warm-up (engine start and adapter load excluded), and checks that the replies are identical.
Writes benchmarks/results/vllm_threads.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "benchmarks" / "results"


def measure(output: Path, adapter: str | None) -> None:
    """One setting (inherited from the environment): generation seconds and the replies, to `output`."""
    from safekeel.models.engines import vllm_offline_engine
    from safekeel.eval.harness import EvalSettings, build_chat, load_prompt_set
    from safekeel.models.registry import resolve_model

    settings = EvalSettings(harmful_set="advbench-test", overrefusal_set="xstest-test", max_new_tokens=48)
    prompts = load_prompt_set(settings.harmful_set)[1] + load_prompt_set(settings.overrefusal_set)[1]
    chats = [build_chat(p, settings) for p in prompts]
    generator = vllm_offline_engine(str(resolve_model("smollm2-135m-safe")), dtype="float32")
    generator.generate_batch(chats[:8], settings.max_new_tokens, adapter=adapter, show_progress=False)  # warm-up, adapter load
    started = time.time()
    replies = generator.generate_batch(chats, settings.max_new_tokens, adapter=adapter, show_progress=False)
    seconds = time.time() - started
    output.write_text(json.dumps({"seconds": round(seconds, 2), "n_prompts": len(prompts), "texts": [r.text for r in replies]}))
    generator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (default: the aligned model alone)")
    parser.add_argument("--reserved", type=int, nargs="+", default=[1, 0], help="VLLM_CPU_NUM_OF_RESERVED_CPU values to compare")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.adapter)
        return

    from safekeel.provenance import library_versions, write_json_atomic

    results = []
    for reserved in args.reserved:
        output = RESULTS / f".vllm_threads_{reserved}.json"
        command = [sys.executable, __file__, "--measure", str(output)] + (["--adapter", args.adapter] if args.adapter else [])
        subprocess.run(command, check=True, env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)})
        data = json.loads(output.read_text())
        output.unlink()
        results.append({"reserved_cpus": reserved, "worker_threads": (os.cpu_count() or 1) - reserved, **data})
    baseline = results[0]
    rows = []
    for r in results:
        same = sum(a == b for a, b in zip(r["texts"], baseline["texts"]))
        rows.append({"reserved_cpus": r["reserved_cpus"], "worker_threads": r["worker_threads"], "seconds": r["seconds"],
                     "speed_ratio": round(baseline["seconds"] / r["seconds"], 2), "identical_replies": same,
                     "n_prompts": r["n_prompts"]})
    command = "python benchmarks/archive/vllm_threads.py " + " ".join(sys.argv[1:])
    write_json_atomic(RESULTS / "vllm_threads.json", {"command": command, "adapter": args.adapter, "cores": os.cpu_count(),
                                                      "rows": rows, "versions": library_versions()})
    lines = ["# vLLM on CPU: cores for the model worker", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cores. Prompts: AdvBench test + XSTest safe test ({rows[0]['n_prompts']}), greedy, "
             f"48 new tokens, float32, smollm2-135m-safe" + (f" + adapter `{Path(args.adapter).name}`" if args.adapter else "")
             + "; generation timed after a warm-up (engine start and adapter load excluded), one fresh process per setting. "
             "Speed ratio and identical replies against the first row (vLLM's default on x86: one core reserved).", "",
             "| VLLM_CPU_NUM_OF_RESERVED_CPU | worker threads | generation s | speed ratio | identical replies |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['reserved_cpus']} | {r['worker_threads']} | {r['seconds']:.1f} | {r['speed_ratio']:.2f} | "
              f"{r['identical_replies']}/{r['n_prompts']} |" for r in rows]
    (RESULTS / "vllm_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
