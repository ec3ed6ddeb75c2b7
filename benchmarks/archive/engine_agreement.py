"""Do the evaluation engines agree? The same prompts, greedy, through transformers (the default
evaluation engine: the model in float32) and through vLLM's offline engine (bfloat16, as vLLM chooses
on CPU, and float32), for the aligned organism and for fine-tuned adapters of it. Reports per model:
harmful rate and over-refusal under each engine (classifier judge), the share of prompts whose
classifier label agrees with transformers', the share of identical replies, and the generation time
(ratio to transformers in the same run). Writes benchmarks/results/engine_agreement.{json,md}.

    python benchmarks/archive/engine_agreement.py [--adapters DIR ...] [--max-new-tokens 48]

Default adapters: the phenomenon's seed-0 `benign_none` and `harmful_none` adapters
(benchmarks/cache/phenomenon/, rebuilt by `python benchmarks/phenomenon.py`), when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENGINES = ("transformers", "vllm-bfloat16", "vllm-float32")


def default_adapters() -> list[Path]:
    """The adapters of the committed phenomenon records (the cache may also hold stale configs)."""
    cache, records = ROOT / "benchmarks" / "cache" / "phenomenon", ROOT / "benchmarks" / "results" / "phenomenon_runs"
    found = []
    for condition in ("benign_none-s0", "harmful_none-s0"):
        for record in sorted(records.glob(f"{condition}-*.json")):
            adapter = cache / record.stem / "adapter"
            if (adapter / "adapter_model.safetensors").is_file():
                found.append(adapter)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, nargs="*", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--harmful-set", default="advbench-dev")
    parser.add_argument("--overrefusal-set", default="xstest-dev")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from safekeel.models.engines import generate_batched, vllm_offline_engine
    from safekeel.eval.harness import EvalSettings, build_chat, judge_responses, load_prompt_set
    from safekeel.eval.stats import wilson_interval
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.provenance import library_versions, write_json_atomic

    torch.set_num_threads(os.cpu_count() or 1)
    adapters = default_adapters() if args.adapters is None else args.adapters
    settings = EvalSettings(harmful_set=args.harmful_set, overrefusal_set=args.overrefusal_set, max_new_tokens=args.max_new_tokens)
    harmful_name, harmful = load_prompt_set(settings.harmful_set)
    safe_name, safe = load_prompt_set(settings.overrefusal_set)
    chats = [build_chat(p, settings) for p in harmful + safe]
    model_path = str(resolve_model("smollm2-135m-safe"))
    targets: list[tuple[str, str | None]] = [("aligned", None)] + [(a.parent.name, str(a)) for a in adapters]

    replies: dict[tuple[str, str], list[str | None]] = {}
    seconds: dict[tuple[str, str], float] = {}
    for name, adapter in targets:
        base, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
        model = PeftModel.from_pretrained(base, adapter) if adapter else base
        started = time.time()
        out = generate_batched(model, tokenizer, chats, max_new_tokens=args.max_new_tokens, desc=f"transformers {name}")
        seconds[(name, "transformers")] = time.time() - started
        replies[(name, "transformers")] = [g.text for g in out]
    dtypes = {}
    for engine in ENGINES[1:]:
        generator = vllm_offline_engine(model_path, dtype=engine.split("-", 1)[1])
        dtypes[engine] = generator.dtype
        for name, adapter in targets:
            started = time.time()
            out = generator.generate_batch(chats, args.max_new_tokens, adapter=adapter)
            seconds[(name, engine)] = time.time() - started
            replies[(name, engine)] = [g.text for g in out]
        generator.close()

    n_harm = len(harmful)
    rows = []
    for name, adapter in targets:
        labels = {}
        for engine in ENGINES:  # transformers first: the reference of the others
            texts = replies[(name, engine)]
            h, h_each = judge_responses(harmful, texts[:n_harm], ["classifier"], harmful=True)
            o, o_each = judge_responses(safe, texts[n_harm:], ["classifier"], harmful=False)
            labels[engine] = [j.harmful for j in h_each["classifier"]] + [j.refused for j in o_each["classifier"]]
            agree = [a == b for a, b in zip(labels[engine], labels["transformers"])]
            identical = [a == b for a, b in zip(texts, replies[(name, "transformers")])]
            rows.append({
                "model": name, "adapter": adapter, "engine": engine, "dtype": dtypes.get(engine, "float32"),
                "harmful_rate": h["classifier"]["harmful"]["rate"], "harmful_rate_ci": h["classifier"]["harmful"]["ci95"],
                "n_harmful_prompts": n_harm, "overrefusal_rate": o["classifier"]["refused"]["rate"],
                "overrefusal_rate_ci": o["classifier"]["refused"]["ci95"], "n_overrefusal_prompts": len(safe),
                "label_agreement_with_transformers": round(statistics.mean(agree), 4),
                "label_agreement_ci": list(wilson_interval(sum(agree), len(agree))),
                "identical_replies": round(statistics.mean(identical), 4),
                "generation_seconds": round(seconds[(name, engine)], 1),
                "speed_ratio_vs_transformers": round(seconds[(name, "transformers")] / seconds[(name, engine)], 2),
            })
    out = ROOT / "benchmarks" / "results" / "engine_agreement.json"
    command = "python benchmarks/archive/engine_agreement.py " + " ".join(sys.argv[1:])
    write_json_atomic(out, {"command": command, "prompts": {"harmful": harmful_name, "safe": safe_name},
                            "max_new_tokens": args.max_new_tokens, "judge": "classifier", "rows": rows, "versions": library_versions()})
    lines = ["# Evaluation engines: transformers vs vLLM", "", f"Command: `{command}`", "",
             f"Prompts: {harmful_name} ({n_harm}, harmful rate) and {safe_name} ({len(safe)}, over-refusal); greedy, "
             f"{args.max_new_tokens} new tokens; classifier judge. Agreement = share of the {len(chats)} prompts whose label "
             "(harmful / refused) equals transformers' [Wilson 95% CI]; speed = transformers' generation time / this engine's "
             "(same run, 2 cores, nothing else running; vLLM's engine start is not included).", "",
             "| model | engine | harmful rate [95% CI] | over-refusal [95% CI] | label agreement [95% CI] | identical replies | generation s | speed ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['harmful_rate']:.3f} [{r['harmful_rate_ci'][0]:.3f}, {r['harmful_rate_ci'][1]:.3f}] | "
                     f"{r['overrefusal_rate']:.3f} [{r['overrefusal_rate_ci'][0]:.3f}, {r['overrefusal_rate_ci'][1]:.3f}] | "
                     f"{r['label_agreement_with_transformers']:.3f} [{r['label_agreement_ci'][0]:.3f}, {r['label_agreement_ci'][1]:.3f}] | "
                     f"{r['identical_replies']:.3f} | {r['generation_seconds']:.0f} | {r['speed_ratio_vs_transformers']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
