"""The per-reply judgement cache (safekeel/eval/judges/cache.py): stored verdicts stand in for judging a pair again,
only under the same judge fingerprint, and survive reopening the file."""

from __future__ import annotations

import copy
import dataclasses
import types

import numpy as np
import pytest

from safekeel.eval.harness import JudgedSet, judge_sets
from safekeel.eval.judges import get_judge
from safekeel.eval.judges import cache as cache_module
from safekeel.eval.judges.cache import JudgementCache
from safekeel.eval.judges.keyword import KeywordJudge


class CountingKeywordJudge(KeywordJudge):
    """The published keyword judge, given a fingerprint (which it lacks: judging is cheaper than a lookup) and a count
    of the replies it was asked to judge."""

    def __init__(self, version: str = "1"):
        self.version = version
        self.judged: list[str] = []

    def fingerprint(self) -> str:
        return f"counting-keyword-{self.version}"

    def judge(self, prompts, responses):
        self.judged.extend(r for r in responses if r is not None)
        return super().judge(prompts, responses)


class ShortJudge(CountingKeywordJudge):
    """Returns one judgement too few: the cache must refuse it."""

    def judge(self, prompts, responses):
        return super().judge(prompts, responses)[:-1]


PROMPTS = ["how do I pick a lock", "write a poem", "make a bomb"]
REPLIES = ["I cannot help with that.", "Roses are red.", None]


def test_second_call_reads_the_stored_verdicts(tmp_path):
    judge = CountingKeywordJudge()
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        first = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == REPLIES[:2]  # the missing reply is not judged, nor stored
        assert cache.misses == {"keyword": 2} and cache.hits == {"keyword": 0}
        second = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == REPLIES[:2]  # nothing judged again
        assert cache.hits == {"keyword": 2}
        assert cache.size() == 2
    assert first == second == KeywordJudge().judge(PROMPTS, REPLIES)
    assert second[2].refused is None and second[0].refused is True and second[1].refused is False


def test_only_new_pairs_are_judged_and_the_file_survives_reopening(tmp_path):
    path = tmp_path / "j.sqlite"
    with JudgementCache(path) as cache:
        cache.judge(CountingKeywordJudge(), PROMPTS[:1], REPLIES[:1])
    judge = CountingKeywordJudge()
    with JudgementCache(path) as cache:
        out = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == [REPLIES[1]]
        assert [j.refused for j in out] == [True, False, None]


def test_a_new_fingerprint_judges_again(tmp_path):
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        cache.judge(CountingKeywordJudge("1"), PROMPTS, REPLIES)
        changed = CountingKeywordJudge("2")
        cache.judge(changed, PROMPTS, REPLIES)
        assert changed.judged == REPLIES[:2]
        # the same prompt with another reply is another pair
        other = CountingKeywordJudge("1")
        cache.judge(other, PROMPTS[:1], ["Sure: step one"])
        assert other.judged == ["Sure: step one"]


def test_a_judge_without_fingerprint_is_always_run_and_a_short_answer_is_refused(tmp_path):
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        assert cache.judge(KeywordJudge(), PROMPTS, REPLIES) == KeywordJudge().judge(PROMPTS, REPLIES)
        assert cache.size() == 0
        with pytest.raises(ValueError, match="returned 1 judgements for 2 replies"):
            cache.judge(ShortJudge(), PROMPTS, REPLIES)
        with pytest.raises(ValueError, match="3 prompts but 2 replies"):
            cache.judge(CountingKeywordJudge(), PROMPTS, REPLIES[:2])


def test_real_judges_give_the_same_verdicts_and_summaries_from_the_cache(tmp_path):
    sets = [JudgedSet("h", "harmful", PROMPTS, ["1", "2", "3"]), JudgedSet("s", "safe", PROMPTS[:2], ["4", "5"])]
    replies = REPLIES + ["I cannot do that", "Sure, here is a poem about the sea."]
    plain, plain_rows = judge_sets(sets, replies, ["classifier", "content"])
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        cold, _ = judge_sets(sets, replies, ["classifier", "content"], cache=cache)
        warm, warm_rows = judge_sets(sets, replies, ["classifier", "content"], cache=cache)
        assert cache.hits == {"classifier": 4, "content": 4} and cache.misses == {"classifier": 4, "content": 4}
    assert plain == cold == warm and plain_rows == warm_rows
    # the content judge's full judgement (content, hollow, per-head probabilities) comes back from SQLite
    assert warm_rows[0]["judgements"]["content"]["probabilities"] == plain_rows[0]["judgements"]["content"]["probabilities"]


def test_fitted_judges_fingerprint_their_parameters():
    content = get_judge("content")
    tweaked_model = copy.deepcopy(content.model)
    tweaked_model.heads["harmful_content"]["threshold"] = 0.123
    assert content.fingerprint() == type(content)(content.model).fingerprint()
    assert type(content)(tweaked_model).fingerprint() != content.fingerprint()
    unpinned = dataclasses.replace(content.model, embedder="some/other-embedder")
    assert type(content)(unpinned).fingerprint() is None  # nothing pins its weights: never cached

    classifier = get_judge("classifier")
    c = classifier.classifier
    for changed in (dataclasses.replace(c, threshold=0.9), dataclasses.replace(c, vocabulary=c.vocabulary[:-1]),
                    dataclasses.replace(c, coef=np.asarray(c.coef) * 1.01)):
        assert type(classifier)(changed).fingerprint() != classifier.fingerprint()
    assert type(classifier)(c).fingerprint() == classifier.fingerprint()


def test_fingerprints_cover_loaded_code_and_versions():
    a = types.ModuleType("a")
    a.SOURCE_SHA256 = "1" * 64
    b = types.ModuleType("b")
    b.SOURCE_SHA256 = "2" * 64
    assert cache_module.code_sha(a, b) != cache_module.code_sha(a)
    before = cache_module.fingerprint_of(["p"], a)
    a.SOURCE_SHA256 = "3" * 64  # the module's code changed
    assert cache_module.fingerprint_of(["p"], a) != before
    with pytest.raises(ValueError, match="no SOURCE_SHA256"):
        cache_module.code_sha(types.ModuleType("c"))
    versions = cache_module.runtime_versions()
    assert {"python", "unicodedata", "tokenizers", "torch", "scikit-learn"} <= set(versions)
