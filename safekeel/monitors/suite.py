"""Train and evaluate harm probes on a model: data splits, one activation pass, a layer x pooling x
method grid chosen on validation, threshold calibration, in- and out-of-distribution tests.

Splits (all prompts rendered with the model's chat template as one user turn):
- harmful: AdvBench train (fit) / dev (choose) / the 52 behaviours in neither (report, in
  distribution: the SafeTuneBed test split shares 125 of its 156 prompts with train);
- benign: disjoint seeded samples of Alpaca's harmless instructions for fit, choose, calibrate the
  threshold, and report;
- shift: HarmBench standard and contextual behaviours and JBB goals against the Alpaca test
  sample, and XSTest's 200 unsafe prompts against its 250 safe-but-scary ones (nothing of XSTest or
  HarmBench/JBB is seen before the report).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from safekeel.monitors.capture import SKIPPED_POSITIONS, ActivationReader, model_fingerprint, render_requests
from safekeel.monitors.probes import Probe, ProbeConfig, calibrate_threshold, detection_metrics, fit_probe
from safekeel.provenance import library_versions, sha256_json, write_json_atomic
from safekeel.defaults import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass
class ProbeSuiteConfig:
    model: str = DEFAULT_MODEL
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12, 15, 18, 21, 24, 27])
    poolings: list[str] = field(default_factory=lambda: ["last", "mean", "max"])
    methods: list[str] = field(default_factory=lambda: ["logistic", "diff_means"])
    rolling_window: int = 4
    """rolling_max (token-level) probes are fitted at the layer the best mean-pooled probe chose."""
    n_benign: dict[str, int] = field(default_factory=lambda: {"train": 800, "val": 200, "calibration": 1000, "test": 500})
    target_fpr: float = 0.01
    C: float = 1.0
    seed: int = 0
    batch_size: int = 16
    xstest_validation: bool = True
    """Validate on XSTest's dev half (odd ids: unsafe vs safe-but-scary) beside AdvBench dev vs Alpaca, and
    test on its other half. AdvBench dev vs Alpaca alone saturates (AUROC 1.0 for most layers), so the
    choice fell to the first layer tried, a lexical one that failed under shift (monitors.md)."""


@dataclass
class PromptSplits:
    sets: dict[str, list[str]]
    """name -> raw requests: harmful_{train,val,test}, benign_{train,val,calibration,test}, and the shift sets."""
    pairs: dict[str, tuple[str, str]]
    """test name -> (harmful set, benign set)."""
    validation: dict[str, tuple[str, str]] = field(default_factory=lambda: {"advbench_dev_vs_alpaca": ("harmful_val", "benign_val")})
    """validation name -> (harmful set, benign set): what layer, pooling and method are chosen on."""

    def sha256(self) -> str:
        return sha256_json(self.sets)


def reference_splits(n_benign: dict[str, int], seed: int = 0, xstest_validation: bool = True) -> PromptSplits:
    from safekeel.data import reference

    benign = reference.split_prompts(reference.alpaca_harmless(), n_benign, seed=seed)
    sets = {
        "harmful_train": reference.advbench("train").prompts,
        "harmful_val": reference.advbench("dev").prompts,
        "harmful_test": reference.advbench_unseen().prompts,
        **{f"benign_{name}": subset.prompts for name, subset in benign.items()},
        "harmbench_standard": reference.harmbench("standard").prompts,
        "harmbench_contextual": reference.harmbench("contextual").prompts,
        "jbb": reference.jbb_harmful().prompts,
    }
    halves = ("dev", "test") if xstest_validation else ("all",)
    for half in halves:
        sets[f"xstest_unsafe_{half}"] = reference.xstest_unsafe(half).prompts
        sets[f"xstest_safe_{half}"] = reference.xstest_safe(half).prompts
    pairs = {
        "advbench_unseen_vs_alpaca (in distribution)": ("harmful_test", "benign_test"),
        "harmbench_standard_vs_alpaca": ("harmbench_standard", "benign_test"),
        "harmbench_contextual_vs_alpaca": ("harmbench_contextual", "benign_test"),
        "jbb_vs_alpaca": ("jbb", "benign_test"),
    }
    validation = {"advbench_dev_vs_alpaca": ("harmful_val", "benign_val")}
    if xstest_validation:
        pairs["xstest_test_half_unsafe_vs_safe"] = ("xstest_unsafe_test", "xstest_safe_test")
        validation["xstest_dev_half_unsafe_vs_safe"] = ("xstest_unsafe_dev", "xstest_safe_dev")
    else:
        pairs["xstest_unsafe_vs_safe"] = ("xstest_unsafe_all", "xstest_safe_all")
    return PromptSplits(sets, pairs, validation)


def validation_metrics(score_of: Callable[[str], Sequence[float]], splits: PromptSplits, fpr: float = 0.01) -> dict:
    """A candidate's validation record: per validation pair AUROC and TPR at `fpr` (oracle), and their
    means (`auroc`, `tpr_at_<fpr>_fpr_oracle`), which rank the candidates. `score_of(set name)` scores a set."""
    pairs = {name: detection_metrics(score_of(h), score_of(b), fpr=fpr) for name, (h, b) in splits.validation.items()}
    key = f"tpr_at_{fpr:g}_fpr_oracle"
    return {"auroc": round(float(np.mean([m["auroc"] for m in pairs.values()])), 4),
            key: round(float(np.mean([m[key] for m in pairs.values()])), 4), "pairs": pairs}


@dataclass
class SuiteResult:
    report: dict
    probes: dict[str, Probe]
    """'harm_probe' (best on validation), 'refusal_direction' (diff_means, last token, best layer) and
    'token_probe' (rolling-max over token scores, at the layer the best mean-pooled probe chose)."""
    token_layer: int | None = None
    sequences: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """Every split's full per-prompt activations at `token_layer` (reusable, e.g. for SAE-latent probes)."""


def train_probe_suite(config: ProbeSuiteConfig, output_dir: str | Path | None = None, splits: PromptSplits | None = None,
                      model=None, tokenizer=None, show_progress: bool = True) -> SuiteResult:
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model

    started = time.time()
    splits = splits or reference_splits(config.n_benign, config.seed, config.xstest_validation)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model)
    model.eval()
    fingerprint = model_fingerprint(resolve_model(config.model))
    reader = ActivationReader(model, tokenizer, [f"layers.{n}" for n in config.layers])

    capture_started = time.time()
    features: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for name, requests in splits.sets.items():
        features[name] = reader.pooled(render_requests(tokenizer, requests), config.poolings, config.batch_size,
                                       show_progress=show_progress)
        log.info("captured %s (%d prompts)", name, len(requests))
    capture_seconds = time.time() - capture_started

    grid = []
    for layer in config.layers:
        for pooling in config.poolings:
            for method in config.methods:
                probe_config = ProbeConfig(f"layers.{layer}", pooling, method, C=config.C, target_fpr=config.target_fpr, seed=config.seed)
                key = (probe_config.hookpoint, pooling)
                probe = fit_probe(probe_config, features["harmful_train"][key], features["benign_train"][key])
                val = validation_metrics(lambda name: probe.score_features(features[name][key]), splits, config.target_fpr)
                grid.append({"probe": probe_config.name, "layer": layer, "pooling": pooling, "method": method,
                             "val": val, "_probe": probe})

    def best(rows):  # validation AUROC, then TPR at the target FPR
        return max(rows, key=lambda r: (r["val"]["auroc"], r["val"][f"tpr_at_{config.target_fpr:g}_fpr_oracle"]))

    chosen = {"harm_probe": best(grid),
              "refusal_direction": best([r for r in grid if r["method"] == "diff_means" and r["pooling"] == "last"])}
    mean_rows = [r for r in grid if r["pooling"] == "mean" and r["method"] == "logistic"]
    sequences: dict[str, list[np.ndarray]] = {}
    token_layer = None
    if mean_rows:  # token-level probe with rolling-max pooling at the layer the mean-pooled probe picked
        token_layer = best(mean_rows)["layer"]
        hook = f"layers.{token_layer}"
        token_reader = ActivationReader(model, tokenizer, [hook])
        sequences = {name: token_reader.sequences(render_requests(tokenizer, prompts), config.batch_size)[hook]
                     for name, prompts in splits.sets.items()}
        tokens = {name: [h[SKIPPED_POSITIONS:] for h in sequences[name]] for name in ("harmful_train", "benign_train")}
        rolling_config = ProbeConfig(hook, "rolling_max", "logistic", C=config.C, window=config.rolling_window,
                                     target_fpr=config.target_fpr, seed=config.seed)
        probe = fit_probe(rolling_config, tokens["harmful_train"], tokens["benign_train"])
        val = validation_metrics(lambda name: [probe.score_sequence(h) for h in sequences[name]], splits, config.target_fpr)
        grid.append({"probe": rolling_config.name, "layer": token_layer, "pooling": "rolling_max", "method": "logistic",
                     "val": val, "_probe": probe})
        chosen["token_probe"] = grid[-1]

    data_hash = splits.sha256()
    report_probes = {}
    for role, row in chosen.items():
        probe: Probe = row["_probe"]
        scores = _score_sets(probe, features, sequences, splits)
        probe.threshold = calibrate_threshold(scores["benign_calibration"], config.target_fpr)
        tests = {name: detection_metrics(scores[h], scores[b], probe.threshold, fpr=config.target_fpr)
                 for name, (h, b) in splits.pairs.items()}
        probe.metadata.update({"role": role, "model": config.model, "model_fingerprint": fingerprint,
                               "training_data_sha256": data_hash, "validation": row["val"], "tests": tests,
                               "n_calibration": len(splits.sets["benign_calibration"])})
        report_probes[role] = {"probe": row["probe"], "validation": row["val"], "threshold": probe.threshold, "tests": tests}
    report = {
        "model": config.model, "model_fingerprint": fingerprint, "config": asdict(config),
        "data": {name: len(prompts) for name, prompts in splits.sets.items()}, "data_sha256": data_hash,
        "grid": [{k: v for k, v in row.items() if not k.startswith("_")} for row in grid],
        "chosen": report_probes, "capture_seconds": round(capture_seconds, 1),
        "seconds": round(time.time() - started, 1), "versions": library_versions(),
    }
    probes = {role: row["_probe"] for role, row in chosen.items()}
    if output_dir is not None:
        output_dir = Path(output_dir)
        for role, probe in probes.items():
            probe.save(output_dir / role)
        write_json_atomic(output_dir / "report.json", report)
    return SuiteResult(report, probes, token_layer, sequences)


def _score_sets(probe: Probe, features, sequences, splits: PromptSplits) -> dict[str, np.ndarray]:
    names = {"benign_calibration"} | {n for pair in splits.pairs.values() for n in pair}
    if probe.config.pooling != "rolling_max":
        key = (probe.config.hookpoint, probe.config.pooling)
        return {name: probe.score_features(features[name][key]) for name in names}
    return {name: np.array([probe.score_sequence(h) for h in sequences[name]]) for name in names}


def probe_scores(monitor, model, tokenizer, requests: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Score raw requests with any monitor (a probe or an SAE probe: anything with `config.hookpoint` and
    `score_sequence`) on a loaded model, e.g. a fine-tuned one for drift checks. Batched forwards."""
    reader = ActivationReader(model, tokenizer, [monitor.config.hookpoint])
    hidden = reader.sequences(render_requests(tokenizer, requests), batch_size)[monitor.config.hookpoint]
    return np.asarray([monitor.score_sequence(h) for h in hidden], dtype=np.float64)


def sae_corpus(tokenizer, splits: PromptSplits, n_alpaca: int = 12000, n_gsm8k: int = 1500, seed: int = 0) -> list[str]:
    """Chat-rendered texts to train SAEs on, disjoint from every probe split: Alpaca instructions in no
    split, GSM8K train questions with answers, AdvBench train, the authored safety pool and benign pairs."""
    import random

    from safekeel.data import reference
    from safekeel.data.safety import load_authored_benign, load_authored_pool

    used = {p for prompts in splits.sets.values() for p in prompts}
    alpaca = [p for p in reference.alpaca_harmless().prompts if p not in used]
    rng = random.Random(seed)
    rng.shuffle(alpaca)
    texts = render_requests(tokenizer, alpaca[:n_alpaca])
    texts += [tokenizer.apply_chat_template(c.to_messages(), tokenize=False) for c in reference.gsm8k("train", n=n_gsm8k, seed=seed)]
    texts += render_requests(tokenizer, splits.sets["harmful_train"])
    texts += [tokenizer.apply_chat_template(e.to_conversation().to_messages(), tokenize=False) for e in load_authored_pool()]
    texts += [tokenizer.apply_chat_template(c.to_messages(), tokenize=False) for c in load_authored_benign()]
    rng.shuffle(texts)
    return texts


def activation_stream(reader: ActivationReader, texts: Sequence[str], batch_size: int = 32, epochs: int = 1):
    """Token activations of `texts`, batch by batch, `epochs` times over: the stream SAEs train on
    (nothing is stored; each item is {hookpoint: (tokens, d)})."""
    for _ in range(epochs):
        yield from reader.token_batches(texts, batch_size)
