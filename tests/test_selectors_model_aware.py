"""Model-aware selectors (gradients, forgetting, hidden states) on the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest

from safekeel.data.conversation import Conversation
from safekeel.data.safety import load_authored_benign, load_authored_pool
from safekeel.selectors import SelectionContext, get_selector

MODEL_AWARE = ["gradient_alignment", "gradient_alignment_stratified", "forgetting", "kmeans_hidden", "kcenter_hidden",
               "facility_location_hidden", "nearest_user_hidden", "dpp_hidden"]
DETAILS = {"gradient_alignment": {"parameter_subset", "projection", "projection_dim", "n_user_examples", "seconds"},
           "forgetting": {"steps", "lr", "seconds", "loss_before", "loss_after"},
           "hidden": {"hookpoint", "embedder", "pooling"}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads, which only add synchronisation (badly so on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    """4 examples of each of the 11 harm categories."""
    taken: dict[str, int] = {}
    chosen = []
    for example in load_authored_pool():
        if taken.get(example.category, 0) < 4:
            taken[example.category] = taken.get(example.category, 0) + 1
            chosen.append(example)
    return chosen


@pytest.fixture(scope="module")
def users():
    return load_authored_benign()[:24]


def fresh_model(folder):
    from safekeel.models.registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(folder))
    return model.eval(), tokenizer


def single_example_loss(model, tokenizer, conversation: Conversation):
    """Mean NLL over the final assistant turn of one unpadded conversation."""
    import torch
    import torch.nn.functional as F

    from safekeel.selectors.model_aware import completion_tokens

    ids, start = completion_tokens(tokenizer, conversation)
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return F.cross_entropy(logits[start - 1:], torch.tensor(ids[start:]))


@pytest.mark.parametrize("name", MODEL_AWARE)
def test_returns_k_unique_pool_ids_deterministically_with_details(name, pool, users, tiny_model_dir):
    first = get_selector(name).select(SelectionContext(pool, users, 13, seed=3, model_name=str(tiny_model_dir)))
    again = get_selector(name).select(SelectionContext(pool, users, 13, seed=3, model_name=str(tiny_model_dir)))
    assert len(first.ids) == len(set(first.ids)) == len(first.scores) == 13
    assert set(first.ids) <= {e.id for e in pool} and first.rationale
    assert (first.ids, first.scores) == (again.ids, again.scores)
    family = "hidden" if name.endswith("_hidden") else name.removesuffix("_stratified")
    assert DETAILS[family] <= set(first.details)
    assert first.details["categories"] == [e.category for e in first.examples(pool)]


@pytest.mark.parametrize("name", MODEL_AWARE)
def test_needs_a_model_name(name, pool, users):
    with pytest.raises(ValueError, match="needs the base model"):
        get_selector(name).select(SelectionContext(pool, users, 5, seed=0))


def test_gradient_alignment_picks_the_most_opposed_gradients(pool, users, tiny_model_dir):
    """Recomputes every gradient one example at a time with plain autograd on the weights, projects
    it with the recorded factors and checks the selection against those cosines. The pool also holds
    a copy of the single user conversation: its gradient is the user gradient (cosine 1)."""
    from safekeel.data.conversation import SafetyExample
    from safekeel.selectors.model_aware import projection_matrices

    user = users[0]
    twin = SafetyExample("twin", "benign_twin", user.last_user, user.completion)
    extended = list(pool) + [twin]
    selection = get_selector("gradient_alignment").select(SelectionContext(extended, [user], 8, seed=5, model_name=str(tiny_model_dir)))
    assert selection.details["n_user_examples"] == 1 and selection.details["projection_dim"] == 4 * 16 * 16

    model, tokenizer = fresh_model(tiny_model_dir)
    model.requires_grad_(False)
    modules = [(name.removesuffix(".weight"), model.get_submodule("model." + name.removesuffix(".weight")))
               for name in selection.details["parameter_subset"]]
    projections = projection_matrices(modules, 16, seed=5)

    def projected(conversation):
        weights = [module.weight for _, module in modules]
        for weight in weights:
            weight.requires_grad_(True)
        loss = single_example_loss(model, tokenizer, conversation)
        loss.backward()
        feature = np.concatenate([(p_out.T @ w.grad @ p_in).flatten().numpy() for w, (p_in, p_out) in zip(weights, projections)])
        for weight in weights:
            weight.grad = None
            weight.requires_grad_(False)
        return feature

    user_gradient = projected(user)
    cosines = {}
    for example in extended:
        g = projected(example.to_conversation())
        cosines[example.id] = float(g @ user_gradient / (np.linalg.norm(g) * np.linalg.norm(user_gradient)))
    assert cosines["twin"] == pytest.approx(1.0, abs=1e-5) and "twin" not in selection.ids
    assert selection.scores == sorted(selection.scores)
    assert selection.scores == pytest.approx([cosines[i] for i in selection.ids], abs=1e-4)
    unchosen = [c for i, c in cosines.items() if i not in selection.ids]
    assert max(selection.scores) <= min(unchosen) + 1e-4


def test_gradient_alignment_stratified_takes_categories_in_turn(pool, users, tiny_model_dir):
    context = SelectionContext(pool, users, 15, seed=0, model_name=str(tiny_model_dir))
    plain = get_selector("gradient_alignment").select(context)
    stratified = get_selector("gradient_alignment_stratified").select(context)
    categories = stratified.details["categories"]
    assert len(set(categories[:11])) == 11 and len(set(categories[11:])) == 4
    assert stratified.ids[0] == plain.ids[0]  # the most opposed example of all leads
    assert stratified.scores[:11] == sorted(stratified.scores[:11])  # categories ordered by their most opposed example


def test_forgetting_scores_are_the_measured_loss_increases_round_robin(pool, users, tiny_model_dir):
    from safekeel.selectors.model_aware import ForgettingSelector, assistant_losses, lora_steps, round_robin, training_sample

    selector = ForgettingSelector()
    selection = selector.select(SelectionContext(pool, users, 15, seed=2, model_name=str(tiny_model_dir)))
    details = selection.details
    assert selection.scores == pytest.approx(np.subtract(details["loss_after"], details["loss_before"]), abs=2e-6)
    assert details["steps"] == 8 and details["lr"] == selector.config.learning_rate
    assert details["n_user_examples"] == len(users)  # 8 steps x 4 > 24 conversations: every one is used

    model, tokenizer = fresh_model(tiny_model_dir)
    conversations = [e.to_conversation() for e in pool]
    by_id = {e.id: e for e in pool}
    for identifier, before in zip(selection.ids, details["loss_before"]):  # padded batches = one example at a time
        assert float(single_example_loss(model, tokenizer, by_id[identifier].to_conversation()).detach()) == pytest.approx(before, abs=1e-4)

    config = selector.config.__class__(**{**selector.config.to_dict(), "seed": 2})
    order = training_sample(len(users), 8 * config.batch_size, 2)
    tuned, train_losses = lora_steps(model, tokenizer, [users[i] for i in order], 8, config)
    increase = assistant_losses(tuned, tokenizer, conversations) - assistant_losses(model, tokenizer, conversations)
    assert train_losses == pytest.approx(details["train_loss"], abs=1e-4)
    assert [pool[i].id for i in round_robin(-increase, [e.category for e in pool], 15)] == selection.ids
    assert selection.ids[0] == pool[int(np.argmax(increase))].id
    categories = details["categories"]
    assert len(set(categories[:11])) == 11
    assert selection.scores[:11] == sorted(selection.scores[:11], reverse=True)


@pytest.mark.parametrize("name", ["gradient_alignment", "forgetting"])
def test_stored_results_are_shared_across_k_and_keyed_by_their_inputs(name, pool, users, tiny_model_dir, tmp_path):
    """A k=15 run after a k=10 run on the same inputs reads the stored scores (no model load, no training)
    and selects what a fresh computation selects; other user data, another seed or another model build is
    computed afresh; without a model fingerprint nothing is stored."""
    def context(k, seed=4, data=users, fingerprint="build-a", store=tmp_path / "store"):
        return SelectionContext(pool, data, k, seed=seed, model_name=str(tiny_model_dir), store=store,
                                model_fingerprint=fingerprint)

    first = get_selector(name).select(context(10))
    stored = sorted(p.name for p in (tmp_path / "store").glob("*.npz"))
    assert len(stored) == 2 and not first.details["stored_results_reused"]
    assert all((tmp_path / "store" / f).with_suffix(".json").is_file() for f in stored)

    reading = context(15)
    second = get_selector(name).select(reading)
    assert second.details["stored_results_reused"]
    assert not any(key.startswith("model:") for key in reading.cache)  # the model was never loaded
    fresh = get_selector(name).select(SelectionContext(pool, users, 15, seed=4, model_name=str(tiny_model_dir)))
    assert (second.ids, second.scores) == (fresh.ids, fresh.scores)
    assert second.details == {**fresh.details, "stored_results_reused": True, "seconds": second.details["seconds"]}

    for changed in (context(10, data=users[:12]), context(10, seed=5), context(10, fingerprint="build-b")):
        assert not get_selector(name).select(changed).details["stored_results_reused"]
    # the pool-only result serves the new user data; forgetting's (the base model's pool losses) also the new seed
    assert len(list((tmp_path / "store").glob("*.npz"))) == 2 + 1 + (2 if name == "gradient_alignment" else 1) + 2

    unknown = tmp_path / "unknown"
    get_selector(name).select(context(10, fingerprint=None, store=unknown))
    assert not unknown.exists()


def test_round_robin_orders_categories_by_their_best():
    from safekeel.selectors.model_aware import round_robin

    priority = np.array([0.5, 0.1, 0.3, 0.2, 0.9, 0.4])
    categories = ["a", "b", "a", "c", "b", "c"]
    assert round_robin(priority, categories, 6) == [1, 3, 2, 4, 5, 0]
    assert round_robin(priority, categories, 4) == [1, 3, 2, 4]


def test_hidden_states_are_the_input_to_the_middle_block_and_not_the_sentence_embeddings(pool, users, tiny_model_dir):
    """The pooled vector equals hidden_states[1] (the stream entering block 1 of 2) of the unpadded
    request, averaged over the request's own tokens; sentence-embedding kmeans in the same context
    keeps its own cache entries."""
    import torch

    context = SelectionContext(pool, users, 6, seed=0, model_name=str(tiny_model_dir))
    hidden = get_selector("kmeans_hidden").select(context)
    sentence = get_selector("kmeans").select(context)
    assert hidden.details["hookpoint"] == "layers.1 (input to block 1)"
    assert sentence.details["embedder"] == "all-minilm-l6-v2" and "hookpoint" not in sentence.details
    key = f"hidden:{tiny_model_dir}:layers.1:pool_embeddings"
    vectors, sentence_vectors = context.cache[key], context.cache["pool_embeddings"]
    assert vectors.shape == (len(pool), 64) and sentence_vectors.shape == (len(pool), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    model, tokenizer = fresh_model(tiny_model_dir)
    for index in (0, 17, 40):  # different lengths, so batched rows were padded
        request = pool[index].request
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        begin = rendered.rfind(request)
        span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < begin + len(request) and b > begin]
        assert 0 < len(span) < len(encoded["input_ids"])  # the template's own tokens are left out
        with torch.no_grad():
            states = model(input_ids=torch.tensor([encoded["input_ids"]]), output_hidden_states=True).hidden_states[1][0]
        expected = torch.nn.functional.normalize(states[span].mean(dim=0), dim=0).numpy()
        assert np.allclose(vectors[index], expected, atol=1e-5)


def test_the_selectors_hidden_states_are_the_monitors_capture(pool, tiny_model_dir):
    """One capture of hidden states (safekeel.models.capture): for the same model, text and layer, the selectors'
    request vector is the monitors' token stream (ActivationReader, as probes and SAEs read it) averaged over the
    request's tokens and unit-normalised, whatever each side's batching and padding."""
    from safekeel.monitors.capture import ActivationReader
    from safekeel.models.capture import request_hidden_states

    model, tokenizer = fresh_model(tiny_model_dir)
    requests = [pool[i].request for i in (0, 17, 40)]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False) for r in requests]
    by_layer = {}
    for layer in (0, 1):
        by_layer[layer] = request_hidden_states(model, tokenizer, requests, layer, batch_size=2)
        streams = ActivationReader(model, tokenizer, [f"layers.{layer}"]).sequences(rendered, batch_size=3)[f"layers.{layer}"]
        for request, text, stream, vector in zip(requests, rendered, streams, by_layer[layer]):
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            begin = text.rfind(request)
            span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < begin + len(request) and b > begin]
            assert len(stream) == len(encoded["input_ids"]) and 0 < len(span) < len(stream)
            mean = stream[span].mean(axis=0)
            np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-5)
    assert not np.allclose(by_layer[0], by_layer[1], atol=1e-3)  # the layer is the one asked for


@pytest.mark.parametrize("block", [2, 3, 2048])
def test_lazy_greedy_facility_location_equals_the_plain_greedy(block, monkeypatch):
    """facility_location (and facility_location_hidden) use a lazy greedy: same picks and gains as
    recomputing every gain every round, ties (duplicate pool vectors) included, at any block size."""
    from safekeel.data.conversation import SafetyExample
    from safekeel.selectors import representation

    monkeypatch.setattr(representation, "FACILITY_BLOCK", block)
    rng = np.random.default_rng(0)
    for trial in range(6):
        n, k = int(rng.integers(5, 80)), int(rng.integers(1, 5))
        rows = np.round(rng.standard_normal((n // 2 + 1, 6)), 1)[rng.integers(n // 2 + 1, size=n)]
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        users = rng.standard_normal((int(rng.integers(1, 20)), 6))
        users /= np.linalg.norm(users, axis=1, keepdims=True)
        pool = [SafetyExample(f"p{i}", "c", "r", "x") for i in range(n)]
        context = SelectionContext(pool, [Conversation.from_pair("u", "a")] * len(users), k, trial)
        context.cache["pool_embeddings"], context.cache["user_embeddings"] = rows.astype(np.float32), users.astype(np.float32)
        selection = get_selector("facility_location").select(context)
        centroids, weights = representation.user_summary(context)
        similarity = centroids @ rows.astype(np.float32).T
        covered, available, chosen, gains = np.zeros(len(centroids), dtype=np.float32), np.ones(n, dtype=bool), [], []
        for _ in range(k):
            gain = (weights[:, None] * np.maximum(similarity - covered[:, None], 0.0)).sum(axis=0)
            gain[~available] = -np.inf
            pick = int(np.argmax(gain))
            chosen.append(f"p{pick}")
            gains.append(round(float(gain[pick]), 6))
            available[pick] = False
            covered = np.maximum(covered, similarity[:, pick])
        assert (selection.ids, selection.scores) == (chosen, gains)
