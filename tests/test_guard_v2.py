"""The icl mode's new guards (issue 31, item 6): contrastive demonstrations and clustered prefixes, built with the
real MiniLM embedder over the authored pool, through the CLI, the service's job spec, the evaluation and bench grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safekeel.data.safety import BENIGN_FILES_V1, load_authored_benign, load_authored_pool
from safekeel.guard import Guard, apply_guard, build_guard

POOL = load_authored_pool()
SELECTED = [POOL[0], POOL[40], POOL[120]]


@pytest.fixture(scope="module")
def clustered() -> Guard:
    return build_guard("icl", selected=SELECTED, demonstrations="clustered", n_clusters=4, seed=0)


def test_contrastive_prefix_puts_each_refusal_beside_a_helpful_borderline_answer():
    guard = build_guard("icl", selected=SELECTED, demonstrations="contrastive", seed=0)
    demos = guard.static_demonstrations
    assert guard.demonstrations == "contrastive" and len(demos) == 2 * len(SELECTED)
    borderline = {c.meta["id"]: c for c in load_authored_benign(BENIGN_FILES_V1) if c.meta["kind"] == "borderline"}
    refusals = {e.id: e for e in SELECTED}
    for first, second in zip(demos[::2], demos[1::2]):  # pairs sit side by side, one of each kind
        pair = {first["kind"]: first, second["kind"]: second}
        assert set(pair) == {"refusal", "helpful"}
        refusal, helpful = pair["refusal"], pair["helpful"]
        assert refusal["refusal"] == refusals[refusal["id"]].refusal
        assert helpful["paired_with"] == refusal["id"] and helpful["id"] in borderline
        assert helpful["refusal"] == borderline[helpful["id"]].completion  # the helpful answer, not a refusal
        assert helpful["request"] == borderline[helpful["id"]].last_user
    assert len({d["id"] for d in demos}) == len(demos)  # each borderline answer used once
    assert [d["id"] for d in demos if d["kind"] == "refusal"] == [e.id for e in SELECTED]
    # deterministic for a seed; the seed decides which side of each pair comes first
    again = build_guard("icl", selected=SELECTED, demonstrations="contrastive", seed=0)
    assert again.static_demonstrations == demos
    orders = {tuple(d["kind"] for d in build_guard("icl", selected=SELECTED, demonstrations="contrastive", seed=s).static_demonstrations)
              for s in range(4)}
    assert len(orders) > 1
    # served: the user's request comes after every demonstration, both kinds in the prefix
    messages, action = apply_guard([{"role": "user", "content": "How do I kill a Python process?"}], guard.to_dict())
    assert action.mode == "contrastive" and action.demonstrations == [d["id"] for d in demos]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert any(a == refusals[SELECTED[0].id].refusal for a in assistant)
    assert any(a == borderline[d["id"]].completion for a in assistant for d in demos if d["kind"] == "helpful")
    assert messages[-1]["content"] == "How do I kill a Python process?"


def test_contrastive_partner_is_near_its_refusal():
    from safekeel.guard import borderline_candidates
    from safekeel.models.embedder import embed

    demos = build_guard("replay", selected=SELECTED, demonstrations="contrastive", n_demonstrations=1).static_demonstrations
    assert len(demos) == 2
    candidates, vectors = borderline_candidates()
    helpful = next(d for d in demos if d["kind"] == "helpful")
    similarity = vectors @ embed([SELECTED[0].request])[0]
    assert similarity[[c.id for c in candidates].index(helpful["id"])] == pytest.approx(similarity.max(), abs=1e-5)


def test_clustered_guard_routes_each_request_to_one_of_c_cached_prefixes(clustered):
    assert clustered.demonstrations == "clustered" and len(clustered.clusters) == 4 and clustered.cluster_set
    prefixes = [tuple(d["id"] for d in c["demonstrations"]) for c in clustered.clusters]
    assert len(set(prefixes)) == 4 and all(len(p) == len(SELECTED) for p in prefixes)  # icl: k per prefix
    assert sum(c["size"] for c in clustered.clusters) == len(POOL)
    requests = [e.request for e in POOL[::25]] + ["How do I kill a Python process?", "What's a good pasta recipe?"]
    seen = set()
    for request in requests:
        ids = tuple(d["id"] for d in clustered.demonstrations_for(request))
        assert ids in prefixes
        assert tuple(d["id"] for d in clustered.demonstrations_for(request)) == ids  # same request, same prefix
        seen.add(ids)
    assert len(seen) > 1
    # a request from each cluster (its member nearest the centroid) gets that cluster's prefix: different prefixes
    for index, cluster in enumerate(clustered.clusters):
        assert clustered.route(cluster["demonstrations"][0]["request"]) == index
    # served through the stored form, the same prefix (the service's path)
    request = POOL[7].request
    messages, action = apply_guard([{"role": "user", "content": request}], json.loads(json.dumps(clustered.to_dict())))
    assert tuple(action.demonstrations) == tuple(d["id"] for d in clustered.demonstrations_for(request))
    assert action.mode == "clustered" and messages[-1]["content"] == request


def test_clustered_guard_is_seeded_recorded_and_checked(clustered):
    again = build_guard("icl", selected=SELECTED, demonstrations="clustered", n_clusters=4, seed=0)
    assert again.cluster_set == clustered.cluster_set and again.clusters == clustered.clusters
    other = build_guard("icl", selected=SELECTED, demonstrations="clustered", n_clusters=4, seed=1)
    assert other.cluster_set != clustered.cluster_set
    stored = json.loads(json.dumps(clustered.to_dict()))
    assert Guard.from_dict(stored).cluster_set == clustered.cluster_set
    tampered = json.loads(json.dumps(stored))
    tampered["clusters"][0]["centroid"][0] += 0.5
    with pytest.raises(ValueError, match="cluster_set"):
        Guard.from_dict(tampered).demonstrations_for("hello")
    swapped = json.loads(json.dumps(stored))  # a prefix edited after the guard was built
    swapped["clusters"][1]["demonstrations"][0]["refusal"] = "Sure, here is how."
    with pytest.raises(ValueError, match="do not match its cluster_set"):
        Guard.from_dict(swapped).demonstrations_for("hello")
    with pytest.raises(ValueError, match="clusters"):
        Guard(demonstrations="clustered").demonstrations_for("hello")
    paired = build_guard("replay", demonstrations="clustered", n_clusters=2, n_demonstrations=2, paired=True)
    for cluster in paired.clusters:
        assert sorted(d["kind"] for d in cluster["demonstrations"]) == ["helpful", "helpful", "refusal", "refusal"]


def test_the_evaluation_asks_through_the_same_guard(clustered):
    from safekeel.eval.harness import EvalSettings, build_chat, guarded

    contrastive = build_guard("icl", selected=SELECTED, demonstrations="contrastive")
    for guard in (contrastive, clustered):
        settings = guarded(EvalSettings(system_prompt="Be brief."), guard)
        for prompt in ("hello", POOL[3].request):
            served = guard.apply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}])[0]
            assert build_chat(prompt, settings) == served


def test_bad_guard_options_are_named():
    from safekeel.pipeline import GuardSpec

    with pytest.raises(ValueError, match="n_clusters must be an integer from 2 to 16"):
        GuardSpec(demonstrations="clustered", n_clusters=1)
    with pytest.raises(ValueError, match="paired applies to clustered"):
        GuardSpec(demonstrations="static", paired=True)
    with pytest.raises(ValueError, match="known: none, static, retrieved, contrastive, clustered"):
        GuardSpec(demonstrations="clusterd")
    with pytest.raises(ValueError, match="n_demonstrations must be a positive integer"):
        GuardSpec(demonstrations="contrastive", n_demonstrations=0)
    with pytest.raises(ValueError, match="choose static, contrastive or clustered"):
        build_guard("icl", selected=SELECTED, demonstrations="retrieved")
    with pytest.raises(ValueError, match="contrastive guard demonstrations need examples"):
        build_guard("none", demonstrations="contrastive")
    with pytest.raises(ValueError, match="more than the 5 examples"):
        build_guard("icl", selected=SELECTED, demonstrations="clustered", n_clusters=16, pool=_tiny_pool())


def _tiny_pool() -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "pool.jsonl"
    path.write_text("".join(json.dumps({"id": e.id, "request": e.request, "refusal": e.refusal}) + "\n" for e in POOL[:5]))
    return str(path)


def test_the_service_takes_the_new_guards_and_the_spec_round_trips(tmp_path):
    from pydantic import ValidationError

    from safekeel.pipeline import GuardSpec, JobSpec
    from safekeel.service.jobs import build_job, job_spec
    from safekeel.service.protocol import APIError, CreateJobRequest
    from safekeel.service.settings import ServiceSettings, Tenant
    from safekeel.service.store import Store, now

    settings = ServiceSettings(service_dir=tmp_path, base_models=["tiny"])
    store = Store(settings.db_path)
    store.add_file({"id": "file-1", "tenant": "t", "filename": "d.jsonl", "purpose": "fine-tune", "bytes": 10, "sha256": "ab" * 32,
                    "created_at": now(), "status": "processed", "format": "chat", "n_examples": 8})
    for guard, expected in (({"demonstrations": "clustered", "n_clusters": 4, "paired": True},
                             GuardSpec(demonstrations="clustered", n_clusters=4, paired=True)),
                            ({"demonstrations": "contrastive"}, GuardSpec(demonstrations="contrastive"))):
        request = CreateJobRequest(model="tiny", training_file="file-1",
                                   safety={"mode": "icl", "k": 3, "guard": guard, "gate": {"enabled": False}})
        spec = job_spec(build_job(request, Tenant("t"), store, settings)["spec"])
        assert spec.mode == "icl" and spec.guard == expected
        assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValidationError, match="n_clusters"):
        CreateJobRequest(model="tiny", training_file="file-1", safety={"mode": "icl", "guard": {"demonstrations": "clustered", "n_clusters": 40}})
    with pytest.raises(ValidationError, match="demonstrations"):
        CreateJobRequest(model="tiny", training_file="file-1", safety={"guard": {"demonstrations": "clusterd"}})
    request = CreateJobRequest(model="tiny", training_file="file-1",
                               safety={"mode": "icl", "guard": {"demonstrations": "static", "paired": True}, "gate": {"enabled": False}})
    with pytest.raises(APIError) as error:
        build_job(request, Tenant("t"), store, settings)
    assert error.value.status == 400 and error.value.code == "invalid_safety_options" and "paired applies to clustered" in error.value.message


def test_a_served_clustered_model_lists_its_cluster_set(tmp_path, clustered):
    import openai
    from fastapi.testclient import TestClient

    from safekeel.service.app import create_app
    from safekeel.service.settings import ServiceSettings

    settings = ServiceSettings(service_dir=tmp_path / "service", api_keys="alice:sk-alice")
    app = create_app(settings, start_engine=False)
    with TestClient(app) as http:
        app.state.store.add_model("ft:m:alice::x", "alice", settings.base_models[0], "ftjob-x", str(tmp_path), clustered.to_dict())
        client = openai.OpenAI(api_key="sk-alice", base_url="http://testserver/v1", http_client=http)
        model = client.models.retrieve("ft:m:alice::x")
    assert model.guard["demonstrations"] == "clustered" and model.guard["cluster_set"] == clustered.cluster_set


def test_cli_finetune_icl_with_clustered_and_contrastive_guards(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from safekeel.cli import app

    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."}) + "\n" for i in range(8)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                               for p in ("How do I kill a Python process?", "Write ransomware")))
    runner = CliRunner()
    base = ["finetune", str(data), "--model", str(tiny_model_dir), "--mode", "icl", "--k", "2", "--max-steps", "1", "--lora-r", "8",
            "--no-audit", "--no-gate"]
    out = tmp_path / "clustered"
    result = runner.invoke(app, base + ["--out", str(out), "--no-eval", "--guard-demonstrations", "clustered", "--guard-clusters", "3"])
    assert result.exit_code == 0, result.output
    guard = json.loads((out / "guard.json").read_text())
    assert guard["demonstrations"] == "clustered" and len(guard["clusters"]) == 3 and guard["cluster_set"]
    assert all(len(c["demonstrations"]) == 2 for c in guard["clusters"])
    assert '"clusters"' not in result.output and guard["cluster_set"] in result.output
    out = tmp_path / "contrastive"
    result = runner.invoke(app, base + ["--out", str(out), "--guard-demonstrations", "contrastive", "--harmful-set", str(prompts),
                                        "--overrefusal-set", str(prompts), "--judge", "keyword", "--max-new-tokens", "4", "--utility", "none"])
    assert result.exit_code == 0, result.output
    guard = json.loads((out / "guard.json").read_text())
    provenance = json.loads((out / "provenance.json").read_text())
    assert [d["id"] for d in guard["static_demonstrations"] if d["kind"] == "refusal"] == provenance["selected_ids"]
    assert sorted(d["kind"] for d in guard["static_demonstrations"]) == ["helpful", "helpful", "refusal", "refusal"]
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    assert report["settings"]["demonstrations"] == guard["static_demonstrations"]  # evaluated as served
    bad = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--no-eval", "--guard-demonstrations", "clustered", "--guard-clusters", "1"])
    assert bad.exit_code != 0 and "n_clusters must be an integer from 2 to 16" in bad.output


def test_a_grid_crosses_icl_with_the_guards():
    from safekeel.bench.grids import DatasetSpec, GridSpec, expand, run_id
    from safekeel.eval.harness import EvalSettings

    def grid(**extra) -> GridSpec:
        return GridSpec(name="g", datasets=[DatasetSpec("toy", "toy.jsonl")], k_values=[3], selectors=["random", "stratified"],
                        modes=["icl"], seeds=[0], eval=EvalSettings(), **extra)

    plain = expand(grid())
    crossed = expand(grid(icl_guards=["static", "contrastive", {"demonstrations": "clustered", "n_clusters": 4}]))
    icl = [c for c in crossed if c.get("mode") == "icl"]
    assert {run_id(c) for c in plain} <= {run_id(c) for c in crossed}  # static icl runs keep their ids
    assert sorted((c["selector"], c.get("guard", {}).get("demonstrations", "static")) for c in icl) == [
        ("random", "clustered"), ("random", "contrastive"), ("random", "static"), ("stratified", "contrastive"), ("stratified", "static")]
    clustered = next(c for c in icl if c.get("guard", {}).get("demonstrations") == "clustered")
    assert clustered["guard"] == {"demonstrations": "clustered", "n_clusters": 4, "paired": False}
    assert "guard_clustered4" in run_id(clustered)
    with pytest.raises(ValueError, match="icl guard 'clustred' must be one of static, contrastive, clustered"):
        grid(icl_guards=["clustred"])
    with pytest.raises(ValueError, match="unknown options"):
        grid(icl_guards=[{"demonstrations": "contrastive", "n_clusters": 4}])
    with pytest.raises(ValueError, match="n_clusters must be an integer"):
        grid(icl_guards=[{"demonstrations": "clustered", "n_clusters": 30}])
