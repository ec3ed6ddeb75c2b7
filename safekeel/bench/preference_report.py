"""The preference grid's run table (safekeel.bench.grids_v2.preference_grid): one row per run, written after each run in
place of the selector benchmark's summary, whose cells do not tell backbones and objectives apart.

<results>/<output stem>.json holds {"grid", "command", "runs"}: per run its backbone, dataset, objective (loss types, beta),
replay (none, or the selector with k), seed, lr, batch_size, harmful and over-refusal rates under every judge of the
evaluation (the first is `judge`), and the held-out preference accuracy and reward margin. The across-backbone spread
and the replay differences (issue 32's `spread` and `replay`) are computed from these rows by the analysis.
"""

from __future__ import annotations

from pathlib import Path

from safekeel.bench.grids import GridSpec
from safekeel.provenance import write_json_atomic
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import PreferenceConfig


def run_row(record: dict) -> dict:
    config, report = record["config"], record["report"]
    judges = list(config["eval"]["judges"])
    rate = lambda part, key, judge: (((report.get(part) or {}).get(judge) or {}).get(key) or {}).get("rate")  # noqa: E731
    row = {"run_id": record["run_id"], "kind": config["kind"], "backbone": config["model"], "judge": judges[0],
           "harmful_rate": rate("harmful", "harmful", judges[0]), "overrefusal_rate": rate("overrefusal", "refused", judges[0]),
           "refusal_rate": rate("harmful", "refused", judges[0]),
           "harmful_rates": {j: rate("harmful", "harmful", j) for j in judges},
           "refusal_rates": {j: rate("harmful", "refused", j) for j in judges},
           "overrefusal_rates": {j: rate("overrefusal", "refused", j) for j in judges}}
    if config["kind"] == "finetune":
        method = config.get("method")
        objective = PreferenceConfig(**{k: v for k, v in method.items() if k != "type"}) if method else None
        sft = LoraSFTConfig(**config["dataset"].get("sft", {}))  # what the runner trained with
        held = record.get("preference_eval") or {}
        row.update(dataset=config["dataset"]["name"], objective=objective.label if objective else "supervised", beta=objective.beta if objective else None,
                   replay="none" if config["mode"] == "none" else config["selector"], k=config["k"], seed=config["seed"],
                   lr=sft.learning_rate, batch_size=sft.batch_size,
                   preference_accuracy=held.get("accuracy"), reward_margin=held.get("reward_margin"),
                   safety_pairs=len((record.get("safety_pairs") or {}).get("pair_ids", [])))
    return row


def write_preference_outputs(grid: GridSpec, records: list[dict], results_dir: str | Path, command: str = "") -> list[Path]:
    path = Path(results_dir) / f"{grid.output_stem}.json"
    write_json_atomic(path, {"grid": grid.to_dict(), "command": command, "runs": [run_row(r) for r in records]})
    return [path]
