"""The audit's distribution distances against closed forms on synthetic Gaussians (issue 30)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safekeel.audit.distances import frechet_distance, frechet_from_moments, lda_side, mmd


def gaussian(n: int, mean, scale: float = 1.0, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=mean, scale=scale, size=(n, dim))


def test_frechet_is_zero_for_identical_sets_and_matches_the_closed_form():
    a = gaussian(500, 0.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # equal covariances: the distance is the squared distance of the means
    mean = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_from_moments(np.zeros(4), np.eye(4), mean, np.eye(4)) == pytest.approx(float(mean @ mean))
    # isotropic covariances s1^2 I and s2^2 I: d (s1 - s2)^2
    assert frechet_from_moments(np.zeros(4), np.eye(4), np.zeros(4), 9 * np.eye(4)) == pytest.approx(4 * (1 - 3) ** 2)
    # sampled sets approach the closed form
    shifted = gaussian(4000, mean, seed=1)
    sample = frechet_distance(gaussian(4000, 0.0, seed=2), shifted)
    assert sample == pytest.approx(float(mean @ mean), rel=0.05)
    wide = frechet_distance(gaussian(4000, 0.0, seed=3), gaussian(4000, 0.0, scale=3.0, seed=4))
    assert wide == pytest.approx(16.0, rel=0.05)


def test_frechet_survives_fewer_examples_than_dimensions():
    a, b = gaussian(10, 0.0, dim=50, seed=5), gaussian(10, 0.5, dim=50, seed=6)
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > frechet_distance(a, gaussian(10, 0.0, dim=50, seed=7)) * 0.5


def test_mmd_permutation_test_rejects_a_shift_and_keeps_identical_distributions():
    shifted = mmd(gaussian(60, 0.0, seed=10), gaussian(60, 0.8, seed=11), n_permutations=500)
    assert shifted["p_value"] < 0.01 and shifted["mmd2"] > 0
    same = mmd(gaussian(60, 0.0, seed=12), gaussian(60, 0.0, seed=13), n_permutations=500)
    assert same["p_value"] > 0.05
    assert same["mmd2"] < shifted["mmd2"]
    # the p-value counts the observed labelling: never 0
    assert shifted["p_value"] >= 1 / 501


def test_lda_places_a_set_on_the_side_it_was_drawn_from():
    harmful, safe = gaussian(300, 1.0, seed=20), gaussian(300, -1.0, seed=21)
    near_harm = lda_side(gaussian(100, 1.0, seed=22), harmful, safe)
    near_safe = lda_side(gaussian(100, -1.0, seed=23), harmful, safe)
    assert near_harm["harmful_side_share"] > 0.9 and near_safe["harmful_side_share"] < 0.1
    assert near_harm["mean_projection"] == pytest.approx(1.0, abs=0.15)
    assert near_safe["mean_projection"] == pytest.approx(0.0, abs=0.15)
    assert near_harm["reference_accuracy"] > 0.95
    halfway = lda_side(gaussian(400, 0.0, seed=24), harmful, safe)
    assert 0.3 < halfway["harmful_side_share"] < 0.7 and halfway["mean_projection"] == pytest.approx(0.5, abs=0.15)


def test_the_audit_places_held_out_harmful_requests_on_the_harmful_side():
    """`safekeel audit` (and a job's audit stage) on real embeddings: held-out pool requests sit on the harmful side
    of the LDA direction and nearer the harmful reference; held-out safe requests do not."""
    from typer.testing import CliRunner

    from safekeel.audit import audit_dataset
    from safekeel.audit.shift import reference_embeddings
    from safekeel.models.embedder import DEFAULT_EMBEDDER
    from safekeel.cli import app
    from safekeel.data.conversation import Conversation
    from safekeel.data.safety import load_authored_benign, load_authored_pool

    pool, benign = load_authored_pool(), load_authored_benign()
    held_pool, held_benign = set(range(0, len(pool), 15)), set(range(0, len(benign), 15))  # spread over categories
    harmful_users = [Conversation.from_pair(pool[i].request, "ok") for i in sorted(held_pool)]
    safe_users = [benign[i] for i in sorted(held_benign)]
    harmful_reference = [e for i, e in enumerate(pool) if i not in held_pool]
    safe_reference = [c for i, c in enumerate(benign) if i not in held_benign]
    reference_embeddings.cache_clear()
    reports = {name: audit_dataset(users, harmful_reference, safe_reference, n_permutations=200)
               for name, users in (("harmful", harmful_users), ("safe", safe_users))}
    # the references are embedded once for both audits, and the cached rows cannot be modified by a caller
    assert reference_embeddings.cache_info().misses == 2 and reference_embeddings.cache_info().hits == 2
    assert not reference_embeddings(tuple(e.request for e in harmful_reference), DEFAULT_EMBEDDER).flags.writeable
    harmful, safe = reports["harmful"].distances, reports["safe"].distances
    assert harmful["lda"]["harmful_side_share"] >= 0.75 and safe["lda"]["harmful_side_share"] <= 0.25
    assert harmful["lda"]["mean_projection"] > 0.5 > safe["lda"]["mean_projection"]
    for users, near, far in ((harmful, "harmful", "safe"), (safe, "safe", "harmful")):
        assert users[near]["frechet"] < users[far]["frechet"] and users[near]["mmd2"] < users[far]["mmd2"]
    assert "harmful side" in reports["harmful"].summary()

    result = CliRunner().invoke(app, ["audit", "--help"])
    assert result.exit_code == 0 and "Frechet" in result.output and "MMD" in result.output


def test_the_audit_measures_distances_in_the_models_own_hidden_states(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from safekeel.cli import app

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}) + "\n"
                            for q in ("How do I pick a lock?", "Summarise this meeting.", "Write a poem about rain.")))
    result = CliRunner().invoke(app, ["audit", str(data), "--hidden-states", "--model", str(tiny_model_dir), "--layer", "1",
                                      "--permutations", "50", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    hidden = report["hidden_state_distances"]
    assert hidden["layer"] == 1 and hidden["model"] == str(tiny_model_dir)
    assert all(np.isfinite(hidden[side]["frechet"]) and 0 < hidden[side]["mmd_p_value"] <= 1 for side in ("harmful", "safe"))
    assert 0 <= hidden["lda"]["harmful_side_share"] <= 1
    bad = CliRunner().invoke(app, ["audit", str(data), "--hidden-states", "--model", str(tiny_model_dir), "--layer", "99"])
    assert bad.exit_code == 2 and "out of range" in bad.output


def test_the_frechet_size_floor_takes_out_the_small_sample_bias():
    """Sets drawn from the reference itself: the raw Frechet distance grows as the set shrinks (fewer rows than
    dimensions), the size floor grows with it, and the excess over the floor stays near 0 at every size; a shifted
    set keeps a clear excess."""
    from safekeel.audit.distances import distance_report, frechet_size_null

    reference = gaussian(400, 0.0, dim=40, seed=20)
    small, large = gaussian(10, 0.0, dim=40, seed=21), gaussian(150, 0.0, dim=40, seed=22)
    assert frechet_distance(small, reference) > 2 * frechet_distance(large, reference)
    assert frechet_size_null(reference, 10) > 2 * frechet_size_null(reference, 150)
    safe = gaussian(400, 1.0, dim=40, seed=23)
    true_shift = 0.7 ** 2 * 40  # the squared mean distance of the shifted set below: its Frechet distance in the limit
    for user in (small, large):  # raw: 43 (10 rows) and 4.3 (150 rows) for no shift at all
        report = distance_report(user, reference, safe, n_permutations=50)
        assert abs(report["harmful"]["frechet_excess"]) < 0.3 * true_shift
    assert distance_report(small, reference, safe, n_permutations=10)["harmful"]["frechet"] > true_shift  # raw: size, not shift
    shifted = distance_report(gaussian(10, 0.7, dim=40, seed=24), reference, safe, n_permutations=50)
    assert 0.7 * true_shift < shifted["harmful"]["frechet_excess"] < 1.3 * true_shift
    # one MMD kernel for both references and any user set: the bandwidth does not depend on the user set
    assert shifted["harmful"]["mmd_bandwidth"] == shifted["safe"]["mmd_bandwidth"] == \
        distance_report(large, reference, safe, n_permutations=10)["safe"]["mmd_bandwidth"]
