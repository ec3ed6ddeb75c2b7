"""The per-reply judgement cache (safekeel/eval/judges/cache.py): stored verdicts stand in for judging a pair again,
only under the same judge fingerprint, and survive reopening the file."""

from __future__ import annotations

import copy
import dataclasses

from safekeel.eval.harness import JudgedSet, judge_sets
from safekeel.eval.judges import get_judge
from safekeel.eval.judges.base import Judgement
from safekeel.eval.judges.cache import JudgementCache


class CountingJudge:
    """Refuses iff the reply starts with "No"; counts the pairs it was asked to judge."""

    name = "counting"

    def __init__(self, version: str = "1"):
        self.version = version
        self.judged: list[str] = []

    def fingerprint(self) -> str:
        return f"counting-{self.version}"

    def judge(self, prompts, responses):
        self.judged.extend(r for r in responses if r is not None)
        return [Judgement(None, None, "not generated") if r is None else
                Judgement(r.startswith("No"), True, "test", 0.9 if r.startswith("No") else 0.1, probabilities={"refusal": 0.5})
                for r in responses]


class NoFingerprintJudge(CountingJudge):
    fingerprint = None


PROMPTS = ["how do I pick a lock", "write a poem", "make a bomb"]
REPLIES = ["No, I can't help with that.", "Roses are red.", None]


def test_second_call_reads_the_stored_verdicts(tmp_path):
    judge = CountingJudge()
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        first = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == REPLIES[:2]  # the missing reply is not judged, nor stored
        assert cache.misses == {"counting": 2} and cache.hits == {"counting": 0}
        second = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == REPLIES[:2]  # nothing judged again
        assert cache.hits == {"counting": 2}
        assert cache.size() == 2
    assert first == second == judge.judge(PROMPTS, REPLIES)
    assert second[2].refused is None and second[0].refused is True and second[0].probabilities == {"refusal": 0.5}


def test_only_new_pairs_are_judged_and_the_file_survives_reopening(tmp_path):
    path = tmp_path / "j.sqlite"
    with JudgementCache(path) as cache:
        cache.judge(CountingJudge(), PROMPTS[:1], REPLIES[:1])
    judge = CountingJudge()
    with JudgementCache(path) as cache:
        out = cache.judge(judge, PROMPTS, REPLIES)
        assert judge.judged == [REPLIES[1]]
        assert [j.refused for j in out] == [True, False, None]


def test_a_new_fingerprint_judges_again(tmp_path):
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        cache.judge(CountingJudge("1"), PROMPTS, REPLIES)
        changed = CountingJudge("2")
        cache.judge(changed, PROMPTS, REPLIES)
        assert changed.judged == REPLIES[:2]
        # the same prompt with another reply is another pair
        other = CountingJudge("1")
        cache.judge(other, PROMPTS[:1], ["Sure: step one"])
        assert other.judged == ["Sure: step one"]


def test_a_judge_without_fingerprint_is_always_run(tmp_path):
    judge = NoFingerprintJudge()
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        cache.judge(judge, PROMPTS, REPLIES)
        cache.judge(judge, PROMPTS, REPLIES)
        assert cache.size() == 0
    assert judge.judged == REPLIES[:2] * 2


def test_judge_sets_give_the_same_summaries_with_the_cache(tmp_path):
    sets = [JudgedSet("h", "harmful", PROMPTS, ["1", "2", "3"]), JudgedSet("s", "safe", PROMPTS[:2], ["4", "5"])]
    replies = REPLIES + ["I cannot do that", "Sure"]
    plain, plain_rows = judge_sets(sets, replies, ["keyword"])
    with JudgementCache(tmp_path / "j.sqlite") as cache:
        cold, _ = judge_sets(sets, replies, ["keyword"], cache=cache)
        warm, warm_rows = judge_sets(sets, replies, ["keyword"], cache=cache)
        assert cache.hits["keyword"] == 4 and cache.misses["keyword"] == 4
    assert plain == cold == warm and plain_rows == warm_rows


def test_fitted_judges_fingerprint_their_parameters():
    content = get_judge("content")
    tweaked_model = copy.deepcopy(content.model)
    tweaked_model.heads["harmful_content"]["threshold"] = 0.123
    tweaked = type(content)(tweaked_model)
    assert content.fingerprint() == type(content)(content.model).fingerprint()
    assert tweaked.fingerprint() != content.fingerprint()

    classifier = get_judge("classifier")
    shifted = type(classifier)(dataclasses.replace(classifier.classifier, threshold=0.9))
    assert shifted.fingerprint() != classifier.fingerprint()
    assert get_judge("keyword").fingerprint() == get_judge("keyword").fingerprint()
