"""How long selection takes at scale once embeddings exist: k=20 from a 100k pool against 100k user examples.

Embedding 200k texts is not what is measured: the context cache is pre-filled with synthetic
clustered unit vectors (dim 384, like all-MiniLM-L6-v2: a seeded mixture of 50 Gaussians, the user
data weighted differently over the same clusters) and the pool's examples are synthetic with 11
harm categories. Times the user-summary step (k-means of the user data into USER_SUMMARY weighted
centroids, shared by every user-aware selector) on its own, then every representation-space selector
plus random and stratified with the summary already cached; median of --runs runs each.

    python benchmarks/selection_scale.py       # writes benchmarks/results/selection_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safekeel.data.conversation import Conversation, SafetyExample  # noqa: E402
from safekeel.selectors import SelectionContext, get_selector  # noqa: E402
from safekeel.selectors.representation import USER_SUMMARY, user_summary  # noqa: E402

SELECTORS = ["random", "stratified", "kmeans", "kcenter", "facility_location", "nearest_user", "dpp"]
CATEGORIES = 11
CLUSTERS = 50


def clustered_unit_vectors(n: int, centers: np.ndarray, weights: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors around the given unit centers, cluster i with probability weights[i]."""
    labels = rng.choice(len(centers), size=n, p=weights)
    rows = centers[labels] + spread * rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_context(pool_size: int, user_size: int, dim: int, k: int, seed: int) -> SelectionContext:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # spread 0.04 per coordinate puts a point at cosine ~0.6 to its center, like related sentences
    pool_vectors = clustered_unit_vectors(pool_size, centers, rng.dirichlet(np.ones(CLUSTERS)), 0.04, rng)
    user_vectors = clustered_unit_vectors(user_size, centers, rng.dirichlet(0.3 * np.ones(CLUSTERS)), 0.04, rng)
    categories = rng.integers(CATEGORIES, size=pool_size)
    pool = [SafetyExample(f"s{i}", f"category-{c}", f"request {i}", "I can't help with that.", "brief", "synthetic")
            for i, c in enumerate(categories)]
    users = [Conversation.from_pair(f"question {i}", f"answer {i}") for i in range(user_size)]
    context = SelectionContext(pool, users, k, seed)
    context.cache["pool_embeddings"] = pool_vectors
    context.cache["user_embeddings"] = user_vectors
    return context


def timed(function, runs: int) -> tuple[float, list[float], object]:
    seconds, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), seconds, result


def machine() -> dict:
    import faiss
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    return {"platform": platform.platform(), "processor": models[0] if models else platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__}


def render_markdown(result: dict) -> list[str]:
    lines = ["# Selection time at scale", "", f"`{result['command']}`", "",
             f"k = {result['k']} from a pool of {result['pool_size']:,} against {result['user_size']:,} user examples, "
             f"embeddings given (synthetic: {CLUSTERS}-Gaussian mixture of unit vectors, dim {result['dim']}; "
             f"{CATEGORIES} categories); median of {result['runs']} runs.", "",
             f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores "
             f"(load average {result['machine']['load_average_1min']} when it started), {result['machine']['platform']}, "
             f"numpy {result['machine']['numpy']}, faiss {result['machine']['faiss']}.", "",
             "| step | median seconds | runs (s) |", "| --- | --- | --- |",
             f"| user summary (k-means of {result['user_size']:,} user vectors into <= {USER_SUMMARY} weighted centroids, "
             f"once per context) | {result['user_summary']['median_s']} | {', '.join(map(str, result['user_summary']['runs_s']))} |"]
    for row in result["selectors"]:
        lines.append(f"| {row['selector']} | {row['median_s']} | {', '.join(map(str, row['runs_s']))} |")
    lines += ["", "Selector times exclude the user summary (cached in the context and shared by facility_location, "
              "nearest_user and dpp); the first user-aware selector in a context pays it once."]
    for note in result.get("notes", []):
        lines += ["", note]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_scale")
    parser.add_argument("--note", action="append", default=[], help="a line appended to the report (repeatable)")
    args = parser.parse_args()

    info = machine()
    started = time.perf_counter()
    context = synthetic_context(args.pool, args.users, args.dim, args.k, args.seed)
    print(f"synthetic data: {time.perf_counter() - started:.1f}s", flush=True)

    def summarise():
        context.cache.pop("user_summary", None)
        return user_summary(context)

    median, runs, (centroids, _) = timed(summarise, args.runs)
    summary = {"median_s": round(median, 3), "runs_s": [round(s, 3) for s in runs], "centroids": len(centroids)}
    print(f"user summary: {summary}", flush=True)

    rows = []
    for name in SELECTORS:
        selector = get_selector(name)

        def select():
            context.cache.pop("user_relevance", None)
            return selector.select(context)

        median, runs, selection = timed(select, args.runs)
        rows.append({"selector": name, "median_s": round(median, 3), "runs_s": [round(s, 3) for s in runs], "ids": selection.ids})
        print(f"{name}: {median:.3f}s", flush=True)

    shown, skip = [], False  # the command without its --note lines
    for argument in sys.argv[1:]:
        if not skip and not argument.startswith("--note"):
            shown.append(argument)
        skip = argument == "--note"
    command = " ".join(["python benchmarks/selection_scale.py", *shown])
    result = {"command": command, "measured": time.strftime("%Y-%m-%d"), "machine": info, "pool_size": args.pool,
              "user_size": args.users, "dim": args.dim, "k": args.k, "runs": args.runs, "seed": args.seed,
              "user_summary": summary, "selectors": rows, "notes": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(render_markdown(result)) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
