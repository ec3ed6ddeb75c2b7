"""A grid's runs as Ray tasks (`safekeel bench --executor ray`): the same `execute` per run, on a cluster.

Each run that has no record yet becomes one Ray task asking for `cpus_per_run` CPUs; the driver (the bench
command) writes every record, keeps its replies and re-renders the outputs as runs finish, exactly as a local
grid does, so run ids, records and resumability are unchanged. The runs of one (dataset, seed), or of one
aligned model, form a chain: each task starts after the one before it in grid order (a Ray task takes its
predecessor's result as an argument), so the adapters they share (`none`, `icl` and `ptst` of a seed, equal
selections) are trained once and reused in the same order as locally: the records say the same cache hits.
Different chains run at once. The cache folder (adapters, selections, the model-aware selectors' store) must be
a path every node sees (a shared filesystem; the same machine here). A task whose worker or node dies is
retried by Ray (`max_retries`); a run that raises stops the grid, with the records finished so far kept.

ray is imported where it is used, on purpose: it is an optional extra (`pip install 'safekeel[ray]'`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from safekeel.bench.runner import execute

log = logging.getLogger(__name__)

FORWARDED_ENV = ("SAFEKEEL_HOME", "SAFEKEEL_SHARED_DATA", "SAFEKEEL_LOG", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM")
"""Environment variables of the bench command (those set) that its Ray tasks get too."""


def import_ray():
    """ray, or a clear error (a ValueError: the --executor value cannot be used) naming the extra that provides it."""
    try:
        import ray  # deferred on purpose: an optional extra, imported only for --executor ray
    except ImportError as error:
        raise ValueError("--executor ray needs the ray package: pip install 'safekeel[ray]' (make install includes it)") from error
    return ray


def chain_key(config: dict) -> str:
    """Runs that may share an adapter or a selection, run one after another: one (dataset, seed, model) chain."""
    return json.dumps([config.get("kind"), config.get("dataset"), config.get("seed"), config.get("model")], sort_keys=True)


def _run(config: dict, cache_dir: str, after: Any = None) -> dict:
    """One run in a Ray worker process. `after`: the previous run of its chain (Ray resolves it first; unused)."""
    return execute(config, cache_dir)


def execute_on_ray(pending: Sequence[tuple[dict, Path]], cache_dir: str | Path, address: str | None = None,
                   cpus_per_run: float = 1.0) -> Iterator[tuple[dict, Path, dict]]:
    """Run `pending` (config, record path) pairs on the Ray cluster at `address` (None: RAY_ADDRESS or a cluster
    started on this machine); yields (config, path, record) as each run finishes."""
    ray = import_ray()
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address or "auto", namespace="safekeel-bench", log_to_driver=False, logging_level="warning",
                     runtime_env={"env_vars": env} if env else None)
        except ConnectionError as error:
            raise ValueError(f"--executor ray: no Ray cluster at {address or 'auto'!r} (--ray-address): {error}") from error
    task = ray.remote(_run).options(num_cpus=cpus_per_run, max_retries=3)
    chains: dict[str, Any] = {}
    waiting: dict[Any, tuple[dict, Path]] = {}
    for config, path in pending:
        key = chain_key(config)
        ref = task.remote(config, str(cache_dir), chains.get(key))
        chains[key] = ref
        waiting[ref] = (config, path)
    log.info("%d runs submitted to Ray in %d chains, %g CPU each", len(waiting), len(chains), cpus_per_run)
    try:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            config, path = waiting.pop(ready[0])
            yield config, path, ray.get(ready[0])
    finally:
        for ref in waiting:  # a run failed or the caller stopped: the rest is not needed
            ray.cancel(ref)
        if started_here:
            ray.shutdown()
