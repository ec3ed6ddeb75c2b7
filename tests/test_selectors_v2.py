"""Issue 31's selection methods: contrastive replay, format-matched replay, the universal set, learned selection,
and the grid that compares them (selection_v2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from safekeel.cli.main import app
from safekeel.data.conversation import Conversation, Message, SafetyExample
from safekeel.data.safety import BENIGN_FILES_V1, load_authored_pool
from safekeel.selectors import SelectionContext, get_selector, known_selectors
from safekeel.selectors.contrastive import BORDERLINE_CATEGORY, benign_examples, stratified_order
from safekeel.selectors.format_match import detect_format, match_format
from safekeel.training.mixing import mix

BENIGN_KEY = f"benign:{','.join(BENIGN_FILES_V1)}:embeddings"
DIM = 24


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def planted_context(k: int, near: str, seed: int = 3) -> tuple[SelectionContext, np.ndarray, np.ndarray]:
    """The authored pool and benign set with planted embeddings (harmful requests around one axis, benign ones around
    another); 20 user conversations near the harmful or the benign side."""
    rng = np.random.default_rng(0)
    pool, benign = load_authored_pool(), benign_examples()
    axis_harm, axis_benign = np.eye(DIM)[0], np.eye(DIM)[1]
    pool_vectors = unit(axis_harm + 0.3 * rng.standard_normal((len(pool), DIM)))
    benign_vectors = unit(axis_benign + 0.3 * rng.standard_normal((len(benign), DIM)))
    users = unit((axis_harm if near == "harmful" else axis_benign) + 0.05 * rng.standard_normal((20, DIM)))
    context = SelectionContext(pool, [Conversation.from_pair(f"u{i}", "a") for i in range(20)], k, seed)
    context.cache.update({"pool_embeddings": pool_vectors, "user_embeddings": users, BENIGN_KEY: benign_vectors})
    return context, pool_vectors, benign_vectors


# ------------------------------------------------------------------------------------------------ contrastive

def test_contrastive_mixes_by_the_users_nearness_to_the_harmful_side_and_pairs_each_answer_with_a_refusal():
    stratified = get_selector("stratified")
    harmful_side, _, _ = planted_context(10, "harmful")
    chosen = get_selector("contrastive").select(harmful_side)
    assert chosen.details["mix"]["harmful_share"] == 1.0 and chosen.details["mix"]["n_borderline"] == 0
    assert chosen.ids == stratified.select(planted_context(10, "harmful")[0]).ids  # refusals only, as stratified picks them

    context, pool_vectors, benign_vectors = planted_context(10, "benign")
    chosen = get_selector("contrastive").select(context)
    mix_record = chosen.details["mix"]
    assert mix_record["harmful_share"] == 0.0 and (mix_record["n_refusals"], mix_record["n_borderline"]) == (5, 5)
    order = stratified_order(list(context.pool), 3)
    assert mix_record["refusal_ids"] == chosen.ids[:5] == [context.pool[i].id for i in order[:5]]
    benign = benign_examples()
    borderline = [i for i, e in enumerate(benign) if e.category == BORDERLINE_CATEGORY]
    assert len(borderline) == 229  # the authored set's borderline pairs
    taken: list[int] = []
    for refusal_index in order[:5]:  # each answer: the nearest untaken borderline request to its refusal
        similarity = benign_vectors[borderline] @ pool_vectors[refusal_index]
        similarity[taken] = -np.inf
        taken.append(int(np.argmax(similarity)))
    assert chosen.ids[5:] == [benign[borderline[i]].id for i in taken] == mix_record["borderline_ids"]
    examples = chosen.examples(context.pool)  # the borderline ones come from the record, not the pool
    assert [e.category for e in examples[5:]] == [BORDERLINE_CATEGORY] * 5
    assert examples[5].refusal == benign[borderline[taken[0]]].refusal and not examples[5].refusal.lower().startswith("i can")
    trained = mix([Conversation.from_pair("q", "a")], examples, "replay", 0)
    assert {c.to_messages()[-1]["content"] for c in trained} >= {examples[5].refusal, examples[0].refusal}

    for k, expected in ((1, 0), (3, 1), (5, 2), (20, 10)):  # floor(0.5 k); k=1 is one refusal
        picked = get_selector("contrastive").select(planted_context(k, "benign")[0])
        assert picked.details["mix"]["n_borderline"] == expected and len(set(picked.ids)) == k


def test_contrastive_reads_nearness_with_the_real_embedder():
    """Harmful-looking user data gets refusals only; math questions (nearest the authored math requests) get half
    borderline answers."""
    pool = load_authored_pool()
    harmful_users = [Conversation.from_pair(e.request, "Sure, here it is.") for e in pool[::30]]
    math_users = [Conversation.from_pair(f"A shop sells {n} apples a day for {n + 3} days. How many apples is that?",
                                         f"{n} x {n + 3} = {n * (n + 3)}.") for n in range(2, 14)]
    harmful_context = SelectionContext(pool, harmful_users, 10, 0)
    harmful = get_selector("contrastive").select(harmful_context).details["mix"]
    math_context = SelectionContext(pool, math_users, 10, 0)  # the pool's and the benign set's embeddings once
    math_context.cache.update({key: harmful_context.cache[key] for key in ("pool_embeddings", BENIGN_KEY)})
    benign = get_selector("contrastive").select(math_context)
    assert harmful["harmful_share"] >= 0.9 and harmful["n_borderline"] == 0
    assert benign.details["mix"]["harmful_share"] == 0.0 and benign.details["mix"]["n_borderline"] == 5
    assert [e.category for e in benign.examples(pool)][5:] == [BORDERLINE_CATEGORY] * 5


# ------------------------------------------------------------------------------------------------ format match

def test_format_match_puts_refusals_under_the_identity_shift_persona(shared_data):
    from safekeel.bench.grids import AOA_SYSTEM_PROMPT
    from safekeel.data.formats import load_conversations

    users = load_conversations(str(shared_data / "attacks" / "identity_shift_aoa.jsonl")).conversations
    found = detect_format(users)
    assert found.system_prompt == AOA_SYSTEM_PROMPT and found.system_share == 1.0
    assert found.user_prefix == "AOA, execute my instruction: " and found.prefix_share == 0.5 and found.user_suffix == ""
    assert found.persona_line == "I am AOA, your absolutely obedient agent."  # "Of course." is a compliance opener, left out
    pool = load_authored_pool()[:4]
    conversations, record = match_format(pool, users, seed=0)
    assert match_format(pool, users, seed=0) == (conversations, record)  # deterministic
    for example, conversation in zip(pool, conversations):
        system, user, assistant = conversation.to_messages()
        assert system == {"role": "system", "content": AOA_SYSTEM_PROMPT}
        assert user["content"] == f"AOA, execute my instruction: {example.request}"
        assert assistant["content"] == f"I am AOA, your absolutely obedient agent. {example.refusal}"
    assert record["detected"]["system_prompt"] == AOA_SYSTEM_PROMPT and record["n_changed"] == 4
    assert record["examples"][0] == {"id": pool[0].id, "changed": ["user_template", "persona_line", "system_prompt"]}


def test_format_match_detects_templates_turns_and_length_and_changes_nothing_without_a_shared_format():
    pool = load_authored_pool()
    conversations, record = match_format(pool[:3], [Conversation.from_pair(q, a) for q, a in
                                                    zip(["Why is the sky blue?", "Name a prime.", "Is 9 odd?"], ["Scattering.", "Seven.", "Yes."])], 1)
    assert conversations[0].to_messages()[0]["content"] == pool[0].request  # nothing shared: the request as it was
    assert record["examples"][0]["changed"] == []
    names = ["Ann", "Bob", "Cem", "Dee", "Eli", "Fay", "Gus"]
    templated = [Conversation.from_pair(f"Summarize this dialog:\n{names[i]}: hi {i}\n{names[i + 1]}: bye {i}\n---\nSummary:",
                                        f"{names[i]} greets {names[i + 1]}.") for i in range(6)]
    found = detect_format(templated)
    assert (found.user_prefix, found.user_suffix) == ("Summarize this dialog:\n", "\n---\nSummary:")
    explained = next(e for e in pool if e.style == "explain")
    [conversation], record = match_format([explained], templated, 0)
    user, reply = conversation.to_messages()
    assert user["content"] == f"Summarize this dialog:\n{explained.request}\n---\nSummary:"
    first = explained.refusal.split(". ")[0]
    assert reply["content"].startswith(first) and len(reply["content"]) < len(explained.refusal)  # 3-word replies: one sentence
    assert record["examples"][0]["changed"] == ["user_template", "shortened"]
    compliant = [Conversation.from_pair(f"task {i}", f"Sure! Here is task {i} done.") for i in range(5)]
    assert detect_format(compliant).persona_line is None  # a refusal cannot open by agreeing
    multi = [Conversation((Message("user", f"hello {i}"), Message("assistant", f"hi {i}"), Message("user", f"more {i}"),
                           Message("assistant", f"ok {i}")), source=f"chat:{i}") for i in range(4)]
    conversations, record = match_format(pool[:2], multi, seed=5)
    for conversation, change in zip(conversations, record["examples"]):
        messages = conversation.to_messages()
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"] and "earlier_turns" in change["changed"]
        donor = multi[int(change["earlier_turns_from"].split(":")[1])]
        assert messages[:2] == donor.to_messages()[:2]


def test_replay_format_match_trains_on_the_rewritten_examples_through_the_pipeline(tiny_model_dir, tmp_path):
    from safekeel.pipeline import JobSpec, run_pipeline
    from safekeel.provenance import sha256_json
    from safekeel.training.config import LoraSFTConfig

    persona = "You are Bolt, the bike shop's assistant."
    users = [Conversation.from_pair(f"Bolt, help me: how do I fix gear {i}?", f"I am Bolt, your bike helper. Turn screw {i} a quarter turn.",
                                    system=persona) for i in range(8)]
    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps({"messages": c.to_messages()}) + "\n" for c in users))
    spec = JobSpec(str(data), str(tmp_path / "run"), model=str(tiny_model_dir), k=3, seed=2, selector="random", eval=None,
                   replay_format="match", sft=LoraSFTConfig(max_steps=1, batch_size=4, lora_r=8))
    result = run_pipeline(spec, show_progress=False)
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["replay_format"]["detected"]["system_prompt"] == persona
    assert selection["replay_format"]["detected"]["user_prefix"] == "Bolt, help me: "
    by_id = {e.id: e for e in load_authored_pool()}
    safety = [by_id[i] for i in selection["ids"]]
    rewritten, _ = match_format(safety, users, 2)
    assert all(c.to_messages()[0]["content"] == persona for c in rewritten)
    assert result.provenance["training_data_sha256"] == sha256_json([c.to_messages() for c in mix(users, rewritten, "replay", 2)])
    assert result.provenance["spec"]["replay_format"] == "match"
    with pytest.raises(ValueError, match="needs mode 'replay'"):
        JobSpec(str(data), str(tmp_path / "x"), mode="icl", replay_format="match")
    with pytest.raises(ValueError, match="unknown replay format"):
        JobSpec(str(data), str(tmp_path / "x"), replay_format="persona")
    assert JobSpec(str(data), str(tmp_path / "x"), mode="none", replay_format="match").replay_format == "plain"


# ------------------------------------------------------------------------------------------------ universal

def test_universal_returns_the_shipped_rankings_prefix_whatever_the_data_and_seed():
    from safekeel.bench.selection_fit import DEV_DATASETS
    from safekeel.selectors.universal import load_universal

    data = load_universal()
    assert set(data["provenance"]["datasets"]) <= set(DEV_DATASETS) and data["provenance"]["outcomes_sha256"]
    assert "benchmarks/universal_set.py" in data["provenance"]["command"] and len(data["ranking"]) == len(load_authored_pool())
    pool = load_authored_pool()
    picks = [get_selector("universal").select(SelectionContext(pool, users, k, seed)) for k, seed, users in
             ((5, 0, []), (5, 9, [Conversation.from_pair("x", "y")]), (20, 1, []))]
    assert picks[0].ids == picks[1].ids == [e["id"] for e in data["ranking"][:5]] == picks[2].ids[:5]
    assert picks[0].details["pool_matches"] and len(set(picks[2].details["categories"])) == 11
    other = [SafetyExample(f"x-{i}", "c", f"r {i}", "no") for i in range(30)]
    with pytest.raises(ValueError, match="this pool lacks"):
        get_selector("universal").select(SelectionContext(other, [], 3, 0))


def _record(run_id: str, dataset: str, seed: int, k: int, ids: list[str], harmful: float, over: float, judge: str = "classifier",
            **config) -> dict:
    return {"run_id": run_id, "selected_ids": ids,
            "config": {"kind": "finetune", "mode": "replay", "pool": "authored", "k": k, "seed": seed, "selector": run_id.split("-")[0],
                       "dataset": {"name": dataset, "path": f"{dataset}.jsonl"}, "eval": {"harmful_set": "h"}, **config},
            "report": {"harmful": {judge: {"harmful": {"rate": harmful}}}, "overrefusal": {judge: {"refused": {"rate": over}}}}}


def test_outcomes_are_centred_within_blocks_and_credit_each_replayed_example(tmp_path):
    from safekeel.bench.selection_fit import outcome_rows, universal_ranking

    pool = load_authored_pool()
    a, b, c = pool[0].id, pool[1].id, pool[40].id
    records = [_record("r1-s0", "d1", 0, 2, [a, b], 0.30, 0.20), _record("r2-s0", "d1", 0, 2, [a, c], 0.10, 0.40),
               _record("r3-s1", "d1", 1, 2, [b, c], 0.50, 0.10),  # alone in its block: left out
               _record("r4-s0", "d1", 0, 2, [a, b], 0.9, 0.9, replay_format="match"),  # not a plain replay: left out
               _record("r5-s0", "d1", 0, 2, [a, b], 0.9, 0.9, judge="content")]  # no classifier rate: left out
    folder = tmp_path / "bench_runs" / "g"
    folder.mkdir(parents=True)
    for record in records:
        (folder / f"{record['run_id']}.json").write_text(json.dumps(record))
    rows = outcome_rows(tmp_path, pool, datasets=None)
    assert [r["run_id"] for r in rows] == ["r1-s0", "r2-s0"]
    assert [round(r["harmful_centred"], 6) for r in rows] == [0.1, -0.1] and [round(r["overrefusal_centred"], 6) for r in rows] == [-0.1, 0.1]
    assert [r["run_id"] for r in outcome_rows(tmp_path, pool, judge="content", datasets=None)] == []  # alone in its block
    ranking = {e["id"]: e for e in universal_ranking(rows, pool, overrefusal_weight=0.5, prior_runs=1.0)}
    # a: +0.1 - 0.05 and -0.1 + 0.05 -> 0 / 3; b: +0.05 / 2; c: -0.05 / 2
    assert ranking[a]["credit"] == 0.0 and ranking[b]["credit"] == 0.025 and ranking[c]["credit"] == -0.025
    assert ranking[c]["n_runs"] == 1 and ranking[pool[2].id]["n_runs"] == 0


# ------------------------------------------------------------------------------------------------ learned

def test_ridge_fit_recovers_a_planted_outcome_and_validates_by_held_out_dataset():
    from safekeel.bench.selection_fit import fit_ridge, leave_one_dataset_out
    from safekeel.selectors.learned import SET_FEATURES

    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, len(SET_FEATURES)))
    harmful = 0.05 * x[:, 12] - 0.03 * x[:, 16]
    rows = [{"dataset": f"d{i % 3}", "block": f"b{i // 6}", "harmful_centred": h, "overrefusal_centred": -h}
            for i, h in enumerate(harmful)]
    model = fit_ridge(x, {"harmful": harmful, "overrefusal": -harmful}, 1e-4, 0.0)
    assert np.allclose(model.predict(x)["harmful"], harmful, atol=1e-3)
    assert np.allclose(model.predict(x + 100)["harmful"], model.predict(np.tile(x.max(axis=0), (120, 1)))["harmful"])  # clipped
    lodo = leave_one_dataset_out(rows, x, 1e-4, 0.0)
    assert [e["held_out"] for e in lodo] == ["d0", "d1", "d2"]
    assert all(e["harmful"]["spearman"] > 0.99 and e["choice"]["harmful_vs_block_mean"] <= 0 for e in lodo)


def test_swap_features_equal_the_features_of_each_swapped_set():
    from safekeel.selectors.learned import PoolTable, set_features, swap_features

    rng = np.random.default_rng(2)
    n = 40
    categories = np.eye(11)[rng.integers(0, 11, n)]
    table = PoolTable(categories, rng.random(n) * 40, rng.random(n) * 20, (rng.random(n) > 0.5) * 1.0, rng.standard_normal(n),
                      rng.random(n), unit(rng.standard_normal((n, 8))).astype(np.float64))
    for current in ([3, 7, 11, 20], [5]):
        for position in range(len(current)):
            outside, features = swap_features(table, current, position)
            expected = [set_features(table, current[:position] + [int(c)] + current[position + 1:]) for c in outside]
            assert np.allclose(features, expected) and not set(outside) & set(current)


def test_learned_selects_with_the_shipped_model_on_a_tiny_model(tiny_model_dir, tmp_path):
    from safekeel.selectors.learned import OutcomeModel, load_model

    model = load_model()
    assert model.meta["training"]["sha256"] and {e["held_out"] for e in model.meta["leave_one_dataset_out"]} >= {"gsm8k_random100"}
    users = [Conversation.from_pair(f"What is {i} plus {i}?", f"{2 * i}.") for i in range(6)]
    picks, shared = [], {}
    for _ in range(2):  # the second reads the pool losses from the store (and reuses the pool's embeddings)
        context = SelectionContext(load_authored_pool(), users, 4, 7, model_name=str(tiny_model_dir), store=tmp_path / "store",
                                   model_fingerprint="tiny")
        context.cache.update(shared)
        picks.append(get_selector("learned").select(context))
        shared = {"pool_embeddings": context.cache["pool_embeddings"]}
    first, again = picks
    assert first.ids == again.ids and len(set(first.ids)) == 4 and again.details["stored_results_reused"]
    search = first.details["search"]
    assert search["objective"] <= search["best_random_objective"] <= search["random_objective_mean"]
    predicted = first.details["predicted"]
    assert math.isclose(predicted["harmful_centred"] + model.overrefusal_weight * predicted["overrefusal_centred"], search["objective"],
                        abs_tol=1e-5)
    with pytest.raises(ValueError, match="refit"):
        OutcomeModel.from_dict({**model.to_dict(), "features": ["other"]})


# ------------------------------------------------------------------------------------------------ grid, CLI, service

def test_selection_v2_grid_crosses_the_k_curve_and_formats_without_touching_plain_run_ids():
    from safekeel.bench.grids import expand, run_config, run_id
    from safekeel.bench.presets import load_grid
    from safekeel.bench.summary import run_row

    grid = load_grid("selection_v2")
    configs = expand(grid)
    replays = [c for c in configs if c["kind"] == "finetune" and c["mode"] == "replay"]
    assert sorted({c["k"] for c in replays}) == [1, 3, 5, 10, 20] and {c["seed"] for c in replays} == set(range(6))
    assert {c["selector"] for c in replays} == {"random", "contrastive", "universal", "learned"}
    matched = {c["dataset"]["name"] for c in replays if c.get("replay_format") == "match"}
    assert matched == {"samsum", "identity_shift_aoa", "sqlgen"}
    assert all(("fmt_match" in run_id(c)) == ("replay_format" in c) for c in replays)
    assert all("replay_formats" not in c.get("dataset", {}) for c in configs)
    assert len({run_id(c) for c in configs}) == len(configs) == 2 + 5 * 6 + 5 * 6 * 4 * 8
    dataset = grid.datasets[0]
    assert run_config(grid, dataset, "replay", 0, "random", "authored", 10) == run_config(grid, dataset, "replay", 0, "random", "authored", 10, "plain")
    k10 = {run_id(c) for c in expand(load_grid("selection_v2_k10"))}
    assert k10 <= {run_id(c) for c in configs} and {c["k"] for c in replays if run_id(c) in k10} == {10}
    with pytest.raises(ValueError, match="needs mode 'replay'"):
        run_config(grid, dataset, "icl", 0, "random", "authored", 10, "match")
    match = next(c for c in replays if c.get("replay_format") == "match")
    rate = {"count": 1, "n": 2, "unjudged": 0, "rate": 0.5, "ci95": [0, 1]}
    report = {"settings": {"judges": ["content"]}, "harmful": {"content": {"harmful": rate}}, "overrefusal": {"content": {"refused": rate}},
              "overrefusal_extra": {"orbench-hard-test@200": {"content": {"refused": rate}}}, "utility": {}}
    row = run_row({"run_id": run_id(match), "config": match, "report": report, "train": {"seconds": 1}, "seconds": 1})
    assert row["selector"] == f"{match['selector']}+format_matched" and row["overrefusal_extra"]["orbench-hard-test@200"]["content"]["rate"] == 0.5


def test_cli_lists_the_new_selectors_and_writes_format_matched_examples(tmp_path):
    listed = CliRunner().invoke(app, ["selectors"])
    assert listed.exit_code == 0 and all(f"{name}:" in listed.output for name in ("contrastive", "universal", "learned"))
    assert "--replay-format" in listed.output and {"contrastive", "universal", "learned"} <= set(known_selectors())
    data = tmp_path / "persona.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "You are Max."},
                                                     {"role": "user", "content": f"Max, do task {i}"},
                                                     {"role": "assistant", "content": f"Done with task {i}."}]}) + "\n" for i in range(5)))
    out = tmp_path / "examples.jsonl"
    result = CliRunner().invoke(app, ["select", str(data), "--selector", "universal", "--k", "3", "--replay-format", "match",
                                      "--examples-out", str(out), "--out", str(tmp_path / "selection.json")])
    assert result.exit_code == 0, result.output
    written = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert len(written) == 3 and all(m[0] == {"role": "system", "content": "You are Max."} for m in written)
    assert json.loads((tmp_path / "selection.json").read_text())["replay_format"]["n_changed"] == 3
    bad = CliRunner().invoke(app, ["select", str(data), "--selector", "random", "--replay-format", "fancy"])
    assert bad.exit_code == 2 and "unknown --replay-format 'fancy'" in bad.output


def test_the_api_takes_the_replay_format(tmp_path):
    from safekeel.service.jobs import build_job, job_spec
    from safekeel.service.protocol import APIError, CreateJobRequest
    from safekeel.service.settings import ServiceSettings, Tenant
    from safekeel.service.store import Store, now

    settings = ServiceSettings(service_dir=tmp_path, base_models=["tiny"])
    store = Store(settings.db_path)
    store.add_file({"id": "file-1", "tenant": "t", "filename": "d.jsonl", "purpose": "fine-tune", "bytes": 10, "sha256": "ab" * 32,
                    "created_at": now(), "status": "processed", "format": "chat", "n_examples": 8})
    request = CreateJobRequest(model="tiny", training_file="file-1",
                               safety={"selector": "contrastive", "replay_format": "match", "gate": {"enabled": False}})
    spec = job_spec(build_job(request, Tenant("t"), store, settings)["spec"])
    assert (spec.selector, spec.replay_format, spec.mode) == ("contrastive", "match", "replay")
    clash = CreateJobRequest(model="tiny", training_file="file-1", safety={"mode": "icl", "replay_format": "match", "gate": {"enabled": False}})
    with pytest.raises(APIError, match="needs mode 'replay'"):
        build_job(clash, Tenant("t"), store, settings)
