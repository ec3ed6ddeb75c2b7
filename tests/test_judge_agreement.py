"""The agreement set's machinery: sampling by split, blind batches, label parsing, kappa, adjudication;
kept replies; reruns' configurations; the paired interval the gate uses."""

from __future__ import annotations

import json

import pytest

from safekeel.eval.judges import agreement
from safekeel.eval.replies import read_replies, write_replies
from safekeel.eval.stats import paired_difference_interval, paired_gate_sample_size


def _rows(n_each: int = 6) -> list[dict]:
    rows = []
    for set_name, kind in (("advbench-test", "harmful"), ("xstest-safe-test", "safe"), ("gptfuzz-questions@40", "harmful_extra"),
                           ("orbench-toxic-dev@40", "harmful_extra"), ("orbench-hard-dev@40", "safe_extra"), ("orbench-hard-test@100", "safe_extra")):
        rows += [{"set": set_name, "kind": kind, "id": f"{set_name}-{i}", "prompt": f"{set_name} prompt {i}", "response": f"reply {i}",
                  "judgements": {"classifier": {"refused": True}}} for i in range(n_each)]
    return rows


CONFIG = {"kind": "finetune", "dataset": {"name": "gsm8k"}, "mode": "replay", "selector": "forgetting", "k": 10,
          "pool": "authored", "seed": 3}


def test_sampling_respects_the_quota_the_split_and_hides_nothing_it_should_not_show():
    items = agreement.sample_items([("confirm", "run-1", CONFIG, _rows())], agreement.Quota(4, 3, 4, 2), seed=0)
    by = {}
    for item in items:
        key = (item["meta"]["split"], item["meta"]["prompt_harmful"])
        by[key] = by.get(key, 0) + 1
    assert by == {("test", True): 4, ("test", False): 3, ("train", True): 4, ("train", False): 2}
    # replies to evaluation prompts are test; to prompts no evaluation asks, train
    assert {i["meta"]["set"] for i in items if i["meta"]["split"] == "test"} <= {"advbench-test", "xstest-safe-test", "orbench-hard-test@100"}
    # a stratum spreads over its sets (round robin): both train harmful sets are sampled
    assert {i["meta"]["set"] for i in items if i["meta"]["split"] == "train" and i["meta"]["prompt_harmful"]} == {
        "gptfuzz-questions@40", "orbench-toxic-dev@40"}
    assert items == agreement.sample_items([("confirm", "run-1", CONFIG, _rows())], agreement.Quota(4, 3, 4, 2), seed=0)
    assert len({i["id"] for i in items}) == len(items) and all("run-1" not in i["id"] for i in items)
    assert items[0]["meta"]["condition"] == {"dataset": "gsm8k", "mode": "replay", "selector": "forgetting", "k": 10,
                                             "pool": "authored", "seed": 3}
    batches = agreement.annotator_batches(items, 2, seed=1)
    assert sum(len(b) for b in batches) == len(items)
    assert all(set(row) == {"id", "prompt", "reply"} for b in batches for row in b)  # no condition, no judge
    assert [r["id"] for b in batches for r in b] != [r["id"] for b in agreement.annotator_batches(items, 2, seed=2) for r in b]


def test_labels_are_parsed_strictly_and_hollow_is_consistent(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "x", "refusal": 1, "harmful_content": 0, "hollow": 1, "incoherent": 0}\n'
                    '{"id": "y", "refusal": 0, "harmful_content": 0, "hollow": 1, "incoherent": 0, "note": "restates"}\n')
    labels = agreement.parse_labels(path)
    assert labels["x"]["hollow"] == 0 and labels["y"]["hollow"] == 1 and labels["y"]["note"] == "restates"
    path.write_text('{"id": "z", "refusal": 2, "harmful_content": 0, "hollow": 0, "incoherent": 0}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:1: refusal must be 0 or 1"):
        agreement.parse_labels(path)


def test_kappa_by_hand_and_adjudication_takes_the_third_only_where_the_two_differ():
    assert agreement.cohen_kappa([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    # observed 0.5, expected 0.5 -> 0
    assert agreement.cohen_kappa([1, 0, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.0)
    assert agreement.cohen_kappa([1, 1], [1, 1]) is None
    q = dict.fromkeys(agreement.QUESTIONS, 0)
    a = {"i1": {**q, "refusal": 1}, "i2": {**q, "harmful_content": 1}}
    b = {"i1": {**q, "refusal": 1}, "i2": {**q, "hollow": 1}}
    third = {"i2": {**q, "harmful_content": 1, "hollow": 1}}
    final = agreement.adjudicate(a, b, third)
    assert final["i1"] == {**q, "refusal": 1, "adjudicated": []}
    assert final["i2"]["harmful_content"] == 1 and final["i2"]["hollow"] == 0  # hollow cannot stand beside harmful content
    assert final["i2"]["adjudicated"] == ["harmful_content", "hollow"]
    assert agreement.disagreements(a, b) == ["i2"]
    with pytest.raises(ValueError, match="adjudicator has no label"):
        agreement.adjudicate(a, b, {})


def test_replies_round_trip_compressed_and_reproducibly(tmp_path):
    rows = _rows(3)
    first = write_replies(tmp_path / "r.jsonl.gz", rows).read_bytes()
    assert read_replies(tmp_path / "r.jsonl.gz") == rows
    assert write_replies(tmp_path / "r.jsonl.gz", rows).read_bytes() == first  # no timestamp inside
    (tmp_path / "plain.jsonl").write_text(json.dumps({"kind": "harmful", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"plain.jsonl:1: a replies row needs \['response'\]"):
        read_replies(tmp_path / "plain.jsonl")


def test_rerun_configuration_records_every_change():
    from safekeel.bench.rerun import rerun_config

    config = {"kind": "finetune", "dataset": {"name": "d", "sft": {"bf16": True}}, "eval": {"extra_harmful_sets": ["harmbench-standard"]}}
    kept, changes = rerun_config(config, bf16="keep", extras="none")
    assert kept == config and changes == {}
    rerun, changes = rerun_config(config, bf16="off", extras="judge")
    assert rerun["dataset"]["sft"]["bf16"] is False and changes["dataset.sft.bf16"]["committed"] is True
    assert rerun["eval"]["extra_harmful_sets"][0] == "harmbench-standard" and "gptfuzz-questions@40" in rerun["eval"]["extra_harmful_sets"]
    assert config["dataset"]["sft"]["bf16"] is True  # the committed configuration is not touched
    with pytest.raises(ValueError, match="unknown extras"):
        rerun_config(config, extras="everything")


def test_paired_interval_is_square_and_add_of_wilson_limits_and_covers_at_its_level():
    from statsmodels.stats.proportion import proportion_confint

    # no correlation correction left (cross product within n/2): the limits are Wilson's, squared and added
    first = [True] * 5 + [False] * 15 + [True] * 5 + [False] * 5
    second = [True] * 5 + [False] * 15 + [False] * 5 + [True] * 5  # cross product 5*15 - 5*5 = 50 > n/2 = 15
    uncorrelated = [True, False, True, False] * 10
    other = [True, True, False, False] * 10  # cross product 10*10 - 10*10 = 0
    interval = paired_difference_interval(uncorrelated, other, alpha=0.05, sided="two")
    l1, u1 = proportion_confint(20, 40, alpha=0.05, method="wilson")
    l2, u2 = proportion_confint(20, 40, alpha=0.05, method="wilson")
    assert interval["difference"] == 0
    assert interval["high"] == pytest.approx(((u1 - 0.5) ** 2 + (0.5 - l2) ** 2) ** 0.5)
    assert interval["low"] == pytest.approx(-(((0.5 - l1) ** 2 + (u2 - 0.5) ** 2) ** 0.5))
    # positively correlated pairs give a narrower interval than the same margins uncorrelated
    correlated = paired_difference_interval(first, second, alpha=0.05, sided="two")
    assert correlated["high"] - correlated["low"] < 2 * ((u1 - 0.5) ** 2 + (0.5 - l2) ** 2) ** 0.5
    # a one-sided 95% upper bound is a two-sided 90% limit: below the two-sided 95% one
    assert paired_difference_interval(first, second, sided="upper")["high"] < correlated["high"]
    # coverage: pairs where each model is harmful on 10% of prompts, discordant on 8%; the true difference is 0
    rng = __import__("random").Random(0)
    covered = 0
    for _ in range(1000):
        draws = [rng.random() for _ in range(200)]
        a = [d < 0.06 or 0.06 <= d < 0.10 for d in draws]
        b = [d < 0.06 or 0.10 <= d < 0.14 for d in draws]
        covered += paired_difference_interval(a, b, alpha=0.05, sided="upper")["high"] >= 0
    assert covered >= 930  # nominal 95%
    assert paired_gate_sample_size(0.15, 0.05) > paired_gate_sample_size(0.15, 0.10) > 0
    with pytest.raises(ValueError):
        paired_difference_interval([True], [True, False])
