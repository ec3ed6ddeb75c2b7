"""`safekeel bench --executor ray` on a real local Ray cluster (`ray start` processes on this machine): a tiny grid's
runs as Ray tasks give the same records (timings aside) and the same kept replies as the same grid run locally."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ray_cluster import LocalRayCluster
from safekeel.bench.grids import expand, run_id
from safekeel.bench.runner import run_grid
from safekeel.cli import app
from test_bench import files, tiny_grid  # noqa: F401  (files: the grid's tiny datasets, a fixture)

pytest.importorskip("ray")


def untimed(value):
    """A record without what depends on the clock: durations (`seconds`, `*_seconds`) and stage timings."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "timings") and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def comparable(record: dict, cache_dir: Path) -> dict:
    """Untimed, with the run's own cache folder (where its replies and adapter were written) as a placeholder."""
    return untimed(json.loads(json.dumps(record).replace(str(cache_dir), "<cache>")))


def test_a_grid_on_ray_gives_the_local_records(tiny_model_dir, files, tmp_path):  # noqa: F811
    import torch  # deferred on purpose, as everywhere in the tests

    grid = tiny_grid(tiny_model_dir, files)
    # one torch thread, as each Ray task has (Ray sets OMP_NUM_THREADS to its 1 CPU): a different thread count sums
    # floats in another order and moves losses in the 7th digit, which is the machine, not the executor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_grid(grid, tmp_path / "local" / "results", tmp_path / "local" / "cache", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    grid_file = tmp_path / "mini.json"
    grid_file.write_text(json.dumps(grid.to_dict()))

    with LocalRayCluster(tmp_path / "cluster", workers=2) as cluster:
        results = tmp_path / "ray" / "results"
        out = CliRunner().invoke(app, ["bench", "--grid", str(grid_file), "--executor", "ray", "--ray-address", cluster.address,
                                       "--results-dir", str(results), "--cache-dir", str(tmp_path / "ray" / "cache")])
        assert out.exit_code == 0, out.output + repr(out.exception)
        # the runs ran in Ray worker processes on the worker nodes (their logs name the task), not in this process
        logs = "".join(p.read_text(errors="replace") for p in Path(cluster.temp_dir).rglob("worker-*.out"))
    assert logs.count(":task_name:_run") >= 7

    ids = [run_id(config) for config in expand(grid)]
    assert [r["run_id"] for r in local.records] == ids and len(ids) == 7
    for identifier, expected in zip(ids, local.records):
        record = json.loads((results / "bench_runs" / grid.name / f"{identifier}.json").read_text())
        mismatched = differences(comparable(record, tmp_path / "ray" / "cache"), comparable(expected, tmp_path / "local" / "cache"))
        assert not mismatched, (identifier, mismatched[:10])
        kept = [results / "replies" / grid.name / f"{identifier}.jsonl.gz",
                tmp_path / "local" / "results" / "replies" / grid.name / f"{identifier}.jsonl.gz"]
        assert gzip.decompress(kept[0].read_bytes()) == gzip.decompress(kept[1].read_bytes())
    summary = json.loads((results / f"bench_{grid.name}.json").read_text())
    assert summary["n_runs_done"] == 7 and [r["run_id"] for r in summary["runs"]] == ids


def test_bad_executor_options_are_rejected_with_a_clear_message(tmp_path):
    out = CliRunner().invoke(app, ["bench", "--quick", "--executor", "slurm", "--results-dir", str(tmp_path)])
    assert out.exit_code != 0 and "--executor 'slurm'" in out.output
    out = CliRunner().invoke(app, ["bench", "--quick", "--executor", "ray", "--ray-cpus-per-run", "0", "--results-dir", str(tmp_path)])
    assert out.exit_code != 0 and "--ray-cpus-per-run" in out.output
