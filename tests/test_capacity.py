"""The capacity model's simulator (benchmarks/capacity.py, issue 33 item 5) behaves as a queue and a cache should."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "capacity.py"
_spec = importlib.util.spec_from_file_location("safekeel_bench_capacity", _PATH)
capacity = importlib.util.module_from_spec(_spec)
sys.modules["safekeel_bench_capacity"] = capacity  # dataclasses look their module up there
_spec.loader.exec_module(capacity)

SMALL = replace(capacity.Config(), requests=4000, warmup=2000, adapters=300, requests_per_s=20.0, days=2.0, tenants=200)


def _trace(cfg, seed_offset=1):
    return capacity.request_trace(cfg, np.random.default_rng(cfg.seed + seed_offset))


@pytest.mark.parametrize("policy", capacity.POLICIES)
def test_a_cache_that_holds_every_adapter_never_misses_after_warm_up(policy):
    cfg = replace(SMALL, adapters=20)
    res = capacity.simulate_serving(cfg, replicas=3, capacity=20, policy=policy, trace=_trace(cfg))
    assert res["hit_rate"] == 1.0


def test_a_small_cache_misses_and_misses_cost_latency():
    cfg = SMALL
    trace = _trace(cfg)
    small = capacity.simulate_serving(cfg, 4, 8, "random", trace)
    big = capacity.simulate_serving(cfg, 4, 300, "random", trace)
    assert small["hit_rate"] < big["hit_rate"] and small["hit_rate"] < 0.9
    assert small["ttft_p50_s"] > big["ttft_p50_s"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cache", [8, 32, 64])
def test_adapter_aware_routing_hits_at_least_as_often_as_random_on_the_same_trace(seed, cache):
    cfg = replace(SMALL, seed=seed)
    trace = _trace(cfg)
    random_hits = capacity.simulate_serving(cfg, 6, cache, "random", trace)["_hit_rate"]
    for policy in ("affinity", "affinity_bounded"):
        assert capacity.simulate_serving(cfg, 6, cache, policy, trace)["_hit_rate"] >= random_hits


def test_more_training_gpus_never_increase_the_mean_queueing_delay():
    cfg = SMALL
    trace = capacity.job_trace(cfg, np.random.default_rng(cfg.seed))
    waits = [capacity.simulate_training(cfg, g, trace)["_mean_wait_s"] for g in range(1, 12)]
    assert all(a >= b for a, b in zip(waits, waits[1:])), waits
    assert waits[0] > 0 and waits[-1] < waits[0]


def test_training_accounts_every_job_and_its_gpu_hours():
    cfg = SMALL
    arrivals, service = capacity.job_trace(cfg, np.random.default_rng(cfg.seed))
    res = capacity.simulate_training(cfg, 50, (arrivals, service))
    assert res["jobs"] == len(arrivals) > 0
    assert res["gpu_hours_per_day"] == round(service.sum() / 3600 / cfg.days, 1)
    assert res["queue_max_min"] == 0.0  # 50 GPUs for about 3 concurrent jobs: nobody waits


def test_the_same_seed_gives_the_same_results_and_another_seed_differs():
    a = capacity.simulate_serving(SMALL, 4, 16, "affinity")
    b = capacity.simulate_serving(SMALL, 4, 16, "affinity")
    c = capacity.simulate_serving(replace(SMALL, seed=7), 4, 16, "affinity")
    assert a == b and a != c
    assert capacity.simulate_training(SMALL, 2) == capacity.simulate_training(SMALL, 2)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown routing policy 'nearest'"):
        capacity.simulate_serving(SMALL, 2, 4, "nearest")
    with pytest.raises(ValueError, match="replicas and adapters per replica"):
        capacity.simulate_serving(SMALL, 0, 4, "random")
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        capacity.simulate_training(SMALL, 0)
    with pytest.raises(SystemExit, match="--gpus must be comma-separated integers"):
        capacity.main(["--gpus", "four"])


def test_the_script_writes_its_report(tmp_path):
    capacity.main(["--requests", "300", "--warmup", "100", "--gpus", "30", "--replicas", "2",
                   "--adapters-per-replica", "16", "--out", str(tmp_path)])
    text = (tmp_path / "capacity.md").read_text()
    assert "## Assumptions" in text and "| 2 | 16 | affinity_bounded |" in text and "--replicas 2" in text
