"""Organism candidate v5: the shipped v3 organism + a LoRA DPO stage that pushes against refusing
borderline-but-safe requests and against complying with harmful ones. Judged on the DEV splits only
(AdvBench dev, XSTest safe odd ids), like every organism candidate (organism.md).

    python benchmarks/organism_dpo.py [--beta 0.1] [--lr 5e-5] [--epochs 1]

Pairs (all authored or generated here, nothing from the evaluation sets):
- borderline: the authored borderline-but-safe requests (v3's files and the later borderline_3/4);
  chosen = the authored answer, rejected = a refusal (seeded choice among refusal phrasings the
  organism itself uses);
- harmful: the 270 authored requests v3 was aligned on; chosen = the authored refusal, rejected =
  the RAW SmolLM2-135M-Instruct's own greedy reply (it complies: 0/20 refusals in FACTS.md).
The 44 pool examples v3 never saw stay unseen. Outputs under runs/organism_dpo/<config hash>/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
    from safekeel.eval.generate import generate_batched
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the raw model's rejected replies")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.provenance import library_versions, sha256_json, write_json_atomic
    from safekeel.training.preference import LoraDPOConfig, train_lora_dpo

    torch.set_num_threads(os.cpu_count() or 1)
    config = LoraDPOConfig(learning_rate=args.lr, beta=args.beta, epochs=args.epochs, loss_type=args.loss, lora_r=args.rank,
                           lora_alpha=2 * args.rank, batch_size=8, bf16=True, max_length=256, seed=args.seed)
    out = ROOT / "runs" / "organism_dpo" / sha256_json({**config.to_dict(), "max_new_tokens": args.max_new_tokens})[:10]
    out.mkdir(parents=True, exist_ok=True)
    pairs = build_pairs(args.seed, args.max_new_tokens, out.parent)
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
    write_json_atomic(out / "summary.json", {"config": config.to_dict(), "pairs": counts, "dev": report.to_dict(),
                                             "train": json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else None,
                                             "command": "python benchmarks/organism_dpo.py " + " ".join(sys.argv[1:]),
                                             "versions": library_versions()})


if __name__ == "__main__":
    main()
