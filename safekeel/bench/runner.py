"""Running a benchmark grid: each configuration once, its record kept, resumable, optionally git-committed.

Every run is cached by a hash of its full configuration (safekeel.bench.grids.run_id) as a JSON run record
under <results_dir>/bench_runs/<grid>/, so an interrupted grid resumes; with `commit` the finished records
are git-committed with the updated summary, one commit per run or per batch of runs (`commit_every`).
Adapters, selections and eval responses go to <cache_dir> (outside git). Adapters are cached by a hash of
the training inputs (safekeel.training.finetune.adapter_key): `none`, `icl` and `ptst` runs of one
(dataset, seed) train once and share the adapter across selectors. The model-aware selectors keep their
k-independent results (pool gradients, pool losses before and after the probe steps) in
<cache_dir>/selection/, keyed by a hash of their inputs (SelectionContext.persisted): a k=20 run reads what
its k=10 twin computed, the pool gradients are computed once per seed (not per dataset), the base model's
pool losses once. The folders are the caller's: the `safekeel bench` command and the benchmarks/ scripts
default to benchmarks/results and benchmarks/cache/bench of the checkout.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from safekeel.bench.git_tools import BatchCommitter, git_commit, runs_message, uncommitted
from safekeel.bench.grids import REFERENCE_SELECTOR, DatasetSpec, GridSpec, expand, run_id
from safekeel.bench.preference_report import write_preference_outputs
from safekeel.bench.report import write_outputs
from safekeel.data.benign_preference import derived_dataset
from safekeel.data.jsonl import read_jsonl, read_text, write_jsonl
from safekeel.data.reference import shared_dataset
from safekeel.eval.harness import EvalSettings, evaluate, is_named_prompt_set
from safekeel.eval.replies import read_replies, replies_path, write_replies
from safekeel.models.registry import load_model_and_tokenizer
from safekeel.paths import safekeel_home
from safekeel.provenance import library_versions, machine_info, sha256_file, sha256_json, write_json_atomic
from safekeel.training.config import LoraSFTConfig
from safekeel.training.reference_cache import REFERENCE_CACHE, open_reference_cache
from safekeel.pipeline import GuardSpec, JobSpec, MethodSpec, run_pipeline

log = logging.getLogger(__name__)


SLICE = re.compile(r"^(?P<path>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")
"""`path[start:stop]`: records start .. stop - 1 of a dataset file (a JSON list or JSONL), e.g. a held-out part of the
file a grid trains on the first records of (`max_examples`)."""


def resolve_data_path(path: str) -> str:
    """An existing path as is; a derived dataset's name (safekeel.data.benign_preference: built on first use);
    otherwise a file under ../shared/data. Any of these with a `[start:stop]` suffix (SLICE): those records of it,
    written once as JSONL under $SAFEKEEL_HOME/derived/slices/ (named by the source's sha256, so a changed source
    gets a new file)."""
    if Path(path).is_file():
        return str(path)
    sliced = SLICE.match(path)
    if sliced:
        return str(slice_file(resolve_data_path(sliced["path"]), int(sliced["start"] or 0),
                              int(sliced["stop"]) if sliced["stop"] else None))
    derived = derived_dataset(path)
    return str(derived) if derived is not None else shared_dataset(path)


def slice_file(source: str | Path, start: int, stop: int | None) -> Path:
    """Records start .. stop - 1 of a JSON-list or JSONL file as a JSONL file under $SAFEKEEL_HOME/derived/slices/
    (ValueError when the slice is empty)."""
    source = Path(source)
    digest = sha256_file(source)
    target = safekeel_home() / "derived" / "slices" / f"{source.stem}-{start}-{'' if stop is None else stop}-{digest[:12]}.jsonl"
    if not target.is_file():
        records = _records(source)
        part = records[start:stop]
        if not part:
            raise ValueError(f"{source}[{start}:{'' if stop is None else stop}] is empty: the file has {len(records)} records")
        write_jsonl(target, part, ensure_ascii=False)
    return target


def _records(path: str | Path) -> list:
    """The records of a dataset file: a JSON list, or JSON Lines."""
    text = read_text(path)
    return json.loads(text) if text.lstrip().startswith("[") else read_jsonl(path)


def prepare_dataset(path: str, template: dict | None, cache_dir: Path) -> str:
    """The file to load: the dataset itself, or (with a template) its records rendered as a
    prompt/completion JSONL under cache_dir/data/ (rewritten only when missing)."""
    source = resolve_data_path(path)
    if template is None:
        return source
    target = Path(cache_dir) / "data" / f"{Path(source).stem}-{sha256_json([source, template])[:8]}.jsonl"
    if not target.is_file():
        write_jsonl(target, [{"prompt": template["prompt"].format(**r), "completion": template["completion"].format(**r)}
                             for r in _records(source)])
    return str(target)


def _eval_settings(config: dict, cache_dir: Path) -> EvalSettings:
    settings = dict(config["eval"], judges=tuple(config["eval"]["judges"]))
    template = config.get("dataset", {}).get("template")
    for key in ("harmful_set", "overrefusal_set"):
        if not is_named_prompt_set(settings[key]):
            settings[key] = resolve_data_path(settings[key])
    settings["extra_harmful_sets"] = tuple(name if is_named_prompt_set(name) else resolve_data_path(name)
                                           for name in settings.get("extra_harmful_sets", ()))
    if settings["utility"] not in (None, "gsm8k"):
        settings["utility"] = prepare_dataset(settings["utility"], template, cache_dir)
    guard = config.get("guard", {})
    demos = config.get("k", 0) * (2 if guard.get("demonstrations") == "contrastive" or guard.get("paired") else 1)
    if config.get("mode") == "icl" and demos > 4:
        # k demonstrations make every prompt ~k times longer: smaller generation batches bound the KV
        # cache (greedy outputs do not depend on the batch; tests/test_tiny_model.py checks that)
        settings["batch_size"] = max(1, settings["batch_size"] * 4 // demos)
    return EvalSettings(**settings)


def execute(config: dict, cache_dir: str | Path, show_progress: bool = False) -> dict:
    """Run one configuration; its run record. Outputs in cache_dir/runs/<run id>/, adapters in cache_dir/adapters/."""
    started = time.time()
    cache_dir = Path(cache_dir)
    identifier = run_id(config)
    folder = cache_dir / "runs" / identifier
    settings = _eval_settings(config, cache_dir)
    if config["kind"] == "aligned":
        model, tokenizer = load_model_and_tokenizer(config["model"])
        report = evaluate(model, tokenizer, settings, model_name=config["model"], output_dir=folder / "eval",
                          show_progress=show_progress)
        extra: dict = {}
    else:
        dataset = DatasetSpec(**config["dataset"])
        spec = JobSpec(prepare_dataset(dataset.path, dataset.template, cache_dir), str(folder), model=config["model"],
                            k=config["k"], selector=config["selector"] or REFERENCE_SELECTOR, mode=config["mode"],
                            pool=config["pool"] or "authored", seed=config["seed"], max_examples=dataset.max_examples,
                            sft=LoraSFTConfig(**dataset.sft), eval=settings, replay_format=config.get("replay_format", "plain"),
                            method=method_of(config), guard=GuardSpec(**config.get("guard", {})))
        result = run_pipeline(spec, show_progress=show_progress, adapter_cache=cache_dir / "adapters",
                              selection_store=cache_dir / "selection", reference_cache=cache_dir / REFERENCE_CACHE)
        report = result.report
        provenance = result.provenance
        extra = {key: provenance[key] for key in ("selected_ids", "train", "adapter_key", "mode_effect", "data_sha256",
                                                  "n_user_examples", "n_training_examples")}
        extra["adapter_cache_hit"] = bool(provenance["train"].get("cached"))
        if config.get("preference_eval"):
            extra["preference_eval"] = held_out_preference(config, result.adapter_dir, spec.sft.max_length,
                                                           cache_dir / REFERENCE_CACHE)
        if "method" in config:
            extra["safety_pairs"] = (result.selection or {}).get("preference_pairs")
    return {"run_id": identifier, "config": config, "report": report.to_dict(), **extra,
            "seconds": round(time.time() - started, 1), "versions": library_versions(), "machine": machine_info()}


def method_of(config: dict) -> MethodSpec:
    """A run's training method: dpo with the configuration's objective, or supervised (no `method` in it)."""
    if "method" not in config:
        return MethodSpec()
    return MethodSpec(type="dpo", dpo={k: v for k, v in config["method"].items() if k != "type"})


def held_out_preference(config: dict, adapter_dir: Path, max_length: int, reference_cache: Path | None = None) -> dict:
    """Preference accuracy and reward margin of a run's adapter on the held-out pairs of its `preference_eval`
    ({path, skip, n}: the n pairs after the first `skip` of the file; safekeel.eval.preference); the reference's
    log-probabilities from `reference_cache` where stored."""
    from peft import PeftModel  # deferred on purpose: heavy

    from safekeel.data.preference import load_preferences
    from safekeel.eval.preference import preference_metrics

    held = config["preference_eval"]
    pairs = load_preferences(resolve_data_path(held["path"])).pairs[held.get("skip", 0): held.get("skip", 0) + held["n"]]
    model, tokenizer = load_model_and_tokenizer(config["model"])
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    objective = method_of(config).dpo
    return {**preference_metrics(model, tokenizer, pairs, objective.beta, max_length, objective.loss_type,
                                 open_reference_cache(reference_cache)), "held_out": dict(held)}


@dataclass
class GridOutcome:
    records: list[dict]
    """Every run record of the grid, in grid order."""
    executed: list[str]
    """Run ids executed in this invocation (the others came from their cached records)."""
    outputs: list[Path]


Writer = Callable[[list[dict], bool], list[Path]]
"""(records so far, final) -> files written. Called after each executed run and once at the end."""

Runs = Callable[[Sequence[tuple[dict, Path]], Path], Iterator[tuple[dict, Path, dict]]]
"""(pending (config, record path) pairs, cache dir) -> (config, path, record) as each run finishes: how the runs
are executed (default: one after another here, `execute_here`; safekeel.bench.ray_executor: Ray tasks)."""


class RunsFailed(RuntimeError):
    """Some runs of a grid raised; the others ran and were recorded (the message names the failed ones)."""


def execute_here(pending: Sequence[tuple[dict, Path]], cache_dir: Path) -> Iterator[tuple[dict, Path, dict]]:
    """Each pending run in this process, in order. A run that raises (not Ctrl-C) yields {"run_id", "failed": {error,
    traceback}} instead of a record, so one bad run does not stop the grid; run_grid records the failure apart."""
    for config, path in pending:
        try:
            record = execute(config, cache_dir)
        except Exception as error:  # noqa: BLE001 - any failure of one run is reported, the grid goes on
            log.exception("run %s failed; the grid goes on", run_id(config))
            record = {"run_id": run_id(config), "failed": {"error": f"{type(error).__name__}: {error}",
                                                           "traceback": traceback.format_exc()}}
        yield config, path, record


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_grid(grid: GridSpec, results_dir: str | Path, cache_dir: str | Path, commit: bool = False, command: str = "",
             writer: Writer | None = None, show_progress: bool = True, configs: Sequence[dict] | None = None,
             commit_every: int = 1, runs: Runs | None = None) -> GridOutcome:
    """Run every configuration of the grid that has no run record yet; write the outputs.

    Records: results_dir/bench_runs/<grid>/<run id>.json, replies beside them in results_dir/replies/<grid>/;
    adapters and responses in cache_dir. `writer` (default: bench_<grid>.json/.md and the plots in
    results_dir) runs after each executed run. With `commit`, the new records are git-committed with what the
    writer wrote, one commit per `commit_every` runs (default 1: a commit per run), the last batch with the
    final outputs (or, when every batch is committed, the final outputs alone); records an interrupted batch
    left uncommitted are committed first. `configs`: run these instead of expand(grid) (controls that a
    GridSpec cannot express, such as a system prompt that differs per seed). `runs`: how the missing runs are
    executed (default `execute_here`, in grid order; the Ray executor runs them at once and they finish in any
    order: the records and outputs are the same, listed in grid order)."""
    committer = BatchCommitter(commit_every, runs_message(f"bench {grid.name}"), enabled=commit)
    results_dir = Path(results_dir)
    configs = list(configs) if configs is not None else expand(grid)
    runs_dir = results_dir / "bench_runs" / grid.name
    paths = [runs_dir / f"{run_id(c)}.json" for c in configs]
    write = writer or (lambda records, final: write_preference_outputs(grid, records, results_dir, command) if grid.methods
                       else write_outputs(grid, records, results_dir, command, plots=final))
    records, executed, durations, failed = [], [], [], []
    # a run's id hashes its whole configuration: a record another grid made of the same configuration is
    # this grid's record too (the modes grid shares its `none` and random-replay runs with the selectors grid)
    elsewhere = {other.name: other for other in sorted((results_dir / "bench_runs").glob("*/*.json"), reverse=True)
                 if other.parent != runs_dir}
    shared = [(path, elsewhere[path.name]) for path in paths if not path.is_file() and path.name in elsewhere]
    for path, other in shared:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(other.read_bytes())
        other_replies = results_dir / "replies" / other.parent.name / f"{other.stem}.jsonl.gz"
        if other_replies.is_file():  # its kept replies come with it
            target = results_dir / "replies" / grid.name / other_replies.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(other_replies.read_bytes())
    if shared:
        log.info("%d run records shared from other grids (same configuration): %s", len(shared),
                 ", ".join(sorted({other.parent.name for _, other in shared})))
        if commit:
            git_commit([path for path, _ in shared], f"bench {grid.name}: {len(shared)} run records shared from other grids")
    if commit:
        left = uncommitted([f for path in paths for f in (path, replies_path(results_dir, grid.name, path.stem))])
        if left:
            log.info("committing %d files an interrupted run left uncommitted", len(left))
            git_commit(left, f"bench {grid.name}: {len(left)} files left uncommitted by an interrupted run")
    remaining = sum(not p.is_file() for p in paths)
    bar = tqdm(total=len(configs), initial=len(configs) - remaining, unit="run", desc=f"bench {grid.name}",
               bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed} elapsed{postfix}", disable=not show_progress)
    done = {path: json.loads(path.read_text()) for path in paths if path.is_file()}
    pending: list[tuple[dict, Path]] = []
    for config, path in zip(configs, paths):
        if path not in done and path not in {p for _, p in pending}:
            pending.append((config, path))
    with bar:
        if pending:
            bar.set_description_str(f"bench {grid.name} [{run_id(pending[0][0])}]")
        for config, path, record in (runs or execute_here)(pending, Path(cache_dir)):
            if "failed" in record:  # not a record: kept apart (a next start retries the run) and reported at the end
                failure = runs_dir / "failed" / f"{record['run_id']}.json"
                write_json_atomic(failure, {"config": config, **record["failed"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                failed.append((record["run_id"], record["failed"]["error"], failure))
                remaining -= 1
                bar.update(1)
                continue
            write_json_atomic(path, record)
            kept = keep_replies(record["run_id"], grid.name, results_dir, cache_dir)
            done[path] = record
            records = [done[p] for p in paths if p in done]
            executed.append(record["run_id"])
            durations.append(record["seconds"])
            remaining -= 1
            written = write(records, False)
            committer.add(record["run_id"], [path, kept], written)
            bar.update(1)
            mean = statistics.mean(durations)
            bar.set_postfix_str(f"~{_duration(mean * remaining)} left ({mean:.0f} s/run over {len(durations)} runs)")
            following = next((c for c, p in pending if p not in done), None)
            if following is not None:
                bar.set_description_str(f"bench {grid.name} [{run_id(following)}]")
    records = [done[p] for p in paths if p in done]
    finished = set(executed)
    executed = [run_id(c) for c, _ in pending if run_id(c) in finished]  # grid order, however they finished
    outputs = write(records, True)
    if committer.runs:
        committer.flush(outputs, note=", summary and plots")
    elif commit and executed:
        git_commit(outputs, f"bench {grid.name}: summary and plots")
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(pending)} runs of grid {grid.name} failed (the others are recorded; a next start "
                         f"retries these): " + "; ".join(f"{rid}: {error} (traceback: {where})" for rid, error, where in failed))
    return GridOutcome(records, executed, outputs)


def keep_replies(identifier: str, grid: str, results_dir: str | Path, cache_dir: str | Path) -> Path:
    """Compress a run's replies (with every judge's verdicts) from the cache to results/replies/<grid>/<run id>.jsonl.gz,
    where they are committed beside the run's record."""
    responses = Path(cache_dir) / "runs" / identifier / "eval" / "responses.jsonl"
    return write_replies(replies_path(results_dir, grid, identifier), read_replies(responses))

