import pytest

from safekeel.data.conversation import Conversation
from safekeel.data.safety import load_authored_pool
from safekeel.selectors import SelectionContext, get_selector, known_selectors
from safekeel.training.mixing import mix


@pytest.fixture(scope="module")
def pool():
    return load_authored_pool()


def user_data(n=20):
    return [Conversation.from_pair(f"question {i}", f"answer {i}") for i in range(n)]


def test_random_is_seeded_and_without_replacement(pool):
    a = get_selector("random").select(SelectionContext(pool, user_data(), 10, seed=1))
    b = get_selector("random").select(SelectionContext(pool, user_data(), 10, seed=1))
    c = get_selector("random").select(SelectionContext(pool, user_data(), 10, seed=2))
    assert a.ids == b.ids and a.ids != c.ids
    assert len(set(a.ids)) == 10
    assert {e.id for e in a.examples(pool)} == set(a.ids)
    assert "seed 1" in a.rationale


def test_stratified_covers_every_category_first(pool):
    selection = get_selector("stratified").select(SelectionContext(pool, user_data(), 11, seed=0))
    assert len(set(selection.details["categories"])) == 11
    more = get_selector("stratified").select(SelectionContext(pool, user_data(), 20, seed=0))
    assert len(set(more.ids)) == 20


def test_selection_context_validates_k(pool):
    with pytest.raises(ValueError, match="larger than the safety pool"):
        SelectionContext(pool[:5], user_data(), 10, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        SelectionContext(pool, user_data(), 0, seed=0)
    with pytest.raises(ValueError, match="unknown selector"):
        get_selector("nope")
    assert {"random", "stratified"} <= set(known_selectors())


def test_mix_replay_adds_the_safety_examples_in_a_seeded_order(pool):
    data = user_data(30)
    safety = pool[:5]
    mixed = mix(data, safety, "replay", seed=3)
    assert len(mixed) == 35
    safety_positions = [i for i, c in enumerate(mixed) if "safety_id" in c.meta]
    assert len(safety_positions) == 5 and safety_positions != list(range(30, 35))  # shuffled in, not appended
    assert mix(data, safety, "replay", seed=3) == mixed
    assert [c.completion for c in mixed if "safety_id" in c.meta] != []
    assert sorted(c.last_user for c in mix(data, safety, "none", seed=3)) == sorted(c.last_user for c in data)
    with pytest.raises(ValueError, match="unknown mode"):
        mix(data, safety, "sometimes", seed=0)
