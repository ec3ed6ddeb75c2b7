"""What a test-time guard does to answers, beside what it costs (benchmarks/guard_overhead.py): over-refusal on safe
prompts (XSTest safe test split, OR-Bench-Hard-1K test split) and the harmful rate on harmful prompts, per guard,
asked through the live service (the guard applied as served), judged afterwards with the project's judges (the
content judge and the refusal classifier; safekeel.eval.judges). Every reply is kept (a JSONL beside the results).
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

DEFAULT_SAFE_SETS = ("xstest-test", "orbench-hard-test@200")
DEFAULT_HARMFUL_SETS = ("advbench-test@50",)
DEFAULT_JUDGES = ("content", "classifier")


def load_sets(safe: list[str], harmful: list[str]) -> list[tuple[str, str, list[str]]]:
    """[(kind, set name, prompts)] for the named sets (NAME@N: a seeded sample; safekeel.eval.harness.load_prompt_set)."""
    from safekeel.eval.harness import load_prompt_set

    out = []
    for kind, names in (("overrefusal", safe), ("harmful", harmful)):
        for name in names:
            set_name, prompts = load_prompt_set(name)
            out.append((kind, set_name, prompts))
    return out


def ask(client, model: str, prompt: str, max_tokens: int) -> dict:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0)
    record = (response.model_extra or {}).get("safekeel") or {}
    return {"response": response.choices[0].message.content or "",
            "demonstrations": (record.get("guard") or {}).get("demonstrations", [])}


def collect(client, models: dict[str, str], sets: list[tuple[str, str, list[str]]], max_tokens: int,
            concurrency: int) -> list[dict]:
    """Every (guard, set, prompt) reply from the live server, with the demonstration ids the guard put before it."""
    replies: list[dict] = []
    for guard, model in models.items():
        for kind, set_name, prompts in sets:
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                answers = list(pool.map(lambda p: ask(client, model, p, max_tokens), prompts))
            replies += [{"guard": guard, "kind": kind, "set": set_name, "index": i, "prompt": p, **a}
                        for i, (p, a) in enumerate(zip(prompts, answers))]
            print(f"quality {guard} {set_name}: {len(prompts)} replies in {time.perf_counter() - started:.0f} s", flush=True)
    return replies


def judge(replies: list[dict], judges: list[str]) -> None:
    """Adds {judge: {refused, harmful}} to every reply (each judge over all replies at once)."""
    from safekeel.eval.judges import get_judge

    for name in judges:
        started = time.perf_counter()
        judgements = get_judge(name).judge([r["prompt"] for r in replies], [r["response"] for r in replies])
        for reply, judgement in zip(replies, judgements):
            reply.setdefault("judgements", {})[name] = {"refused": judgement.refused, "harmful": judgement.harmful}
        print(f"judged {len(replies)} replies with {name} in {time.perf_counter() - started:.0f} s", flush=True)


def _rate(flags: list) -> float | None:
    scored = [f for f in flags if f is not None]
    return round(sum(scored) / len(scored), 4) if scored else None


def summarise(replies: list[dict], judges: list[str]) -> list[dict]:
    """Per (guard, set, judge): over-refusal (safe sets: share refused) or harmful rate and refusal rate (harmful
    sets), with the number scored and the distinct demonstration prefixes the guard used."""
    rows = []
    keys = list(dict.fromkeys((r["guard"], r["kind"], r["set"]) for r in replies))
    for guard, kind, set_name in keys:
        members = [r for r in replies if (r["guard"], r["kind"], r["set"]) == (guard, kind, set_name)]
        prefixes = len({tuple(r["demonstrations"]) for r in members if r["demonstrations"]})
        for name in judges:
            refused = [r["judgements"][name]["refused"] for r in members]
            row = {"guard": guard, "set": set_name, "kind": kind, "judge": name, "n": len(members),
                   "n_scored": sum(f is not None for f in refused), "refusal_rate": _rate(refused), "distinct_prefixes": prefixes}
            if kind == "harmful":
                row["harmful_rate"] = _rate([r["judgements"][name]["harmful"] for r in members])
            rows.append(row)
    return rows


def render(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Over-refusal and harm per guard", "",
             "Safe sets: over-refusal = share of replies the judge calls a refusal. Harmful sets: harmful rate (the judge's "
             "harmful content; the classifier: complied and coherent) and refusal rate. Greedy, through the live service.", "",
             "| guard | set | judge | n scored | over-refusal | harmful rate | refusal rate | distinct prefixes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        over = r["refusal_rate"] if r["kind"] == "overrefusal" else ""
        harmful, refusal = (r.get("harmful_rate"), r["refusal_rate"]) if r["kind"] == "harmful" else ("", "")
        lines.append(f"| {r['guard']} | {r['set']} | {r['judge']} | {r['n_scored']}/{r['n']} | {over} | {harmful} | {refusal} | "
                     f"{r['distinct_prefixes']} |")
    return lines


def write_replies(path: Path, replies: list[dict]) -> None:
    """Every reply with its judgements, gzip-compressed by a `.gz` name (reproducibly: no timestamp inside)."""
    from safekeel.data.jsonl import write_jsonl

    write_jsonl(path, replies)
