"""Tests for the TopK sparse autoencoders and the sweep queue (safekeel.monitors.sae / .sweep), on synthetic activations."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from safekeel.monitors.sae import (SaeConfig, SaeModelMismatchError, SaeRun, SaeTrainer, TopKSAE, TrainStats,
                                   evaluate_sae, fraction_of_variance_unexplained, geometric_median)
from safekeel.monitors.sweep import KillRule, run_sweep


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls on a shared 2-core machine run ~30x faster without intra-op threading."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sparse_data(n: int, seed: int, d: int = 64, features: int = 128, active: int = 4) -> torch.Tensor:
    """n points, each a sum of `active` of `features` fixed random unit directions (coefficients in
    [0.5, 1.5]) plus a constant offset."""
    dictionary = torch.randn(features, d, generator=torch.Generator().manual_seed(1234))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(n, features, generator=generator).topk(active, dim=1).indices
    coefficients = torch.rand(n, active, generator=generator) + 0.5
    return F.embedding_bag(indices, dictionary, per_sample_weights=coefficients, mode="sum") + 3.0


def stream_of(data: dict[str, torch.Tensor], chunk: int):
    n = next(iter(data.values())).shape[0]
    for start in range(0, n, chunk):
        yield {name: x[start:start + chunk] for name, x in data.items()}


def small_cfg(**overrides) -> SaeConfig:
    values = dict(hookpoint="layers.1", d_in=16, num_latents=64, k=4, batch_size=64, lr=1e-2, dead_tokens=10_000)
    values.update(overrides)
    return SaeConfig(**values)


def test_fvu_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    # mean (3, 5); squared deviations 4+9 + 0+1 + 4+16 = 34; squared error 0+0 + 0+1 + 1+0 = 2
    assert fraction_of_variance_unexplained(x, x_hat).item() == pytest.approx(2 / 34)

    sae = TopKSAE(small_cfg())
    data = torch.randn(32, 16) * 2 + 1
    sae.initialize_from(data)
    out = sae(data)
    by_hand = sum(float((data[i, j] - out.sae_out[i, j].detach()) ** 2) for i in range(32) for j in range(16))
    variance = sum(float((data[i, j] - data[:, j].mean()) ** 2) for i in range(32) for j in range(16))
    assert out.fvu.item() == pytest.approx(by_hand / variance, rel=1e-5)


def test_b_dec_starts_at_the_geometric_median_of_the_first_batch():
    cluster = torch.randn(99, 16, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0
    points = torch.cat([cluster, torch.full((1, 16), 1000.0)])
    median = geometric_median(points)
    assert (median - 1.0).abs().max() < 0.1 and points.mean(0).min() > 10  # the outlier drags the mean, not it
    sae = TopKSAE(small_cfg(normalize_inputs=False))
    sae.initialize_from(points)
    assert torch.allclose(sae.b_dec, median) and sae.input_scale.item() == 1.0
    sae = TopKSAE(small_cfg(b_dec_init="mean"))
    sae.initialize_from(points)
    assert torch.allclose(sae.b_dec, points.mean(0) * sae.input_scale)
    assert (points * sae.input_scale).pow(2).sum(1).mean().item() == pytest.approx(16, rel=1e-4)


def test_topk_gives_exactly_k_nonzeros_per_row_and_decodes_them():
    cfg = small_cfg(k=5)
    sae = TopKSAE(cfg)
    x = torch.randn(40, 16) * 3
    sae.initialize_from(x)
    acts, indices = sae.encode(x)
    assert acts.shape == indices.shape == (40, 5)
    dense = torch.zeros(40, cfg.n_latents).scatter(1, indices, acts)
    assert (dense.count_nonzero(dim=1) == 5).all()
    largest = sae.pre_acts(x).topk(5, dim=1).values
    assert torch.allclose(acts.sort(dim=1, descending=True).values, largest)
    # decode is the dense product, undoing the input scale
    assert sae.input_scale.item() != pytest.approx(1.0)
    expected = (dense @ sae.W_dec + sae.b_dec) / sae.input_scale
    assert torch.allclose(sae.decode(acts, indices), expected, atol=1e-5)


def test_decoder_rows_stay_unit_norm_through_training_steps():
    run = SaeRun(small_cfg(lr=3e-2))
    before = run.sae.W_dec.detach().clone()
    run.feed({"layers.1": torch.randn(64 * 10, 16) * 2})
    assert run.stats.steps == 10
    assert (run.sae.W_dec - before).abs().max() > 1e-2  # the steps moved the decoder a lot
    assert torch.allclose(run.sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_gradient_parallel_to_decoder_rows_is_removed():
    sae = TopKSAE(small_cfg())
    x = torch.randn(64, 16)
    sae.initialize_from(x)
    sae(x).fvu.backward()
    rows = sae.W_dec.detach()
    grad = sae.W_dec.grad.clone()
    assert (grad * rows).sum(1).abs().max() > 1e-4  # there was a parallel component to remove
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * rows).sum(1).abs().max() < 1e-6
    # only the parallel part went: grad - grad_after = (grad . row) row
    assert torch.allclose(grad - sae.W_dec.grad, (grad * rows).sum(1, keepdim=True) * rows, atol=1e-6)


def test_learns_a_known_sparse_dictionary():
    cfg = SaeConfig("layers.3", d_in=64, num_latents=256, k=4, batch_size=256, lr=1e-2, max_tokens=256 * 150,
                    dead_tokens=256 * 20, seed=1)
    train = sparse_data(256 * 160, seed=0)
    held_out = sparse_data(4096, seed=99)
    untrained = TopKSAE(cfg)
    untrained.initialize_from(train[:256])
    before = evaluate_sae(untrained, [held_out])

    [result] = SaeTrainer([cfg]).fit(stream_of({"layers.3": train}, chunk=1000))
    after = evaluate_sae(result.sae, stream_of({"layers.3": held_out}, chunk=1000))

    assert result.status == "completed" and result.stats.steps == 150 and result.stats.tokens == 256 * 150
    assert before.fvu > 0.5
    assert after.fvu < 0.25 and after.fvu < 0.3 * before.fvu
    assert after.l0 == pytest.approx(4.0, abs=0.1) and after.tokens == 4096


def planted_dead_latent_sae(latent: int) -> tuple[TopKSAE, torch.Tensor]:
    """An SAE whose latent `latent` has a tiny positive pre-activation on every input: never in the top-k."""
    sae = TopKSAE(small_cfg())
    x = torch.randn(48, 16) * 2
    sae.initialize_from(x)
    with torch.no_grad():
        sae.encoder.weight[latent] = 0.0
        sae.encoder.bias[latent] = 1e-3
    return sae, x


def test_auxk_loss_trains_only_the_dead_latent():
    latent = 7
    sae, x = planted_dead_latent_sae(latent)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[latent] = True
    out = sae(x, dead_mask=dead)
    assert not (out.latent_indices == latent).any()
    assert out.auxk_loss.item() > 0

    # by hand: with one dead latent, its activation times its decoder row predicts the residual
    residual = (x - out.sae_out).detach()
    prediction = 1e-3 * sae.W_dec[latent].detach() / sae.input_scale
    expected = sae.cfg.aux_coef * (prediction - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    assert out.auxk_loss.item() == pytest.approx(expected.item(), rel=1e-5)

    out.auxk_loss.backward()
    others = torch.arange(64) != latent
    assert sae.encoder.weight.grad[latent].abs().sum() > 0
    assert sae.encoder.bias.grad[latent] != 0
    assert sae.W_dec.grad[latent].abs().sum() > 0
    assert (sae.W_dec.grad[others] == 0).all() and (sae.encoder.weight.grad[others] == 0).all()


def test_auxk_loss_is_zero_without_dead_latents():
    sae, x = planted_dead_latent_sae(7)
    with_none = sae(x)
    none_dead = sae(x, dead_mask=torch.zeros(64, dtype=torch.bool))
    assert with_none.auxk_loss.item() == 0.0 and none_dead.auxk_loss.item() == 0.0
    assert none_dead.fvu.item() == with_none.fvu.item()


def test_training_marks_a_never_firing_latent_dead():
    run = SaeRun(small_cfg(dead_tokens=64 * 3))
    with torch.no_grad():
        run.sae.encoder.bias[5] = -1e4  # never positive: never fires
    data = torch.randn(64 * 5, 16)
    run.feed({"layers.1": data[:64 * 2]})
    assert not run.dead_mask()[5] and run.stats.auxk_loss == 0.0
    run.feed({"layers.1": data[64 * 2:]})
    assert run.tokens_since_fired[5] == 64 * 5
    assert run.dead_mask()[5]
    assert run.stats.auxk_loss > 0
    live = run.tokens_since_fired < 64 * 3  # latents that fired recently are counted from their last firing
    assert live.sum() >= 48 and run.stats.dead_fraction == pytest.approx(1 - live.float().mean().item())
    assert run.sae.encoder.bias[5] == -1e4  # no gradient ever reached it (Adam moved nothing)


def test_save_load_roundtrip_and_model_hash_check(tmp_path):
    run = SaeRun(small_cfg())
    run.feed({"layers.1": torch.randn(64 * 3, 16) * 5 + 2})
    result = run.finish("completed", tmp_path / "sae", model_hash="abc123", extra={"dataset": "synthetic"})
    assert result.folder == tmp_path / "sae"

    loaded = TopKSAE.load(tmp_path / "sae", expected_model_hash="abc123")
    x = torch.randn(20, 16) * 5 + 2
    original_out, loaded_out = run.sae(x), loaded(x)
    for a, b in zip(original_out, loaded_out):
        assert torch.equal(a, b)
    assert loaded.input_scale.item() == run.sae.input_scale.item() != 1.0
    assert loaded.cfg == run.cfg and loaded.model_hash == "abc123" and loaded.extra == {"dataset": "synthetic"}
    assert loaded.training_record["status"] == "completed" and loaded.training_record["steps"] == 3

    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert "hidden_states[1]" in meta["hookpoint_meaning"]
    assert meta["normalization"]["input_scale"] == pytest.approx(run.sae.input_scale.item())
    assert meta["training"]["tokens"] == 64 * 3 and "torch" in meta["library_versions"]

    with pytest.raises(SaeModelMismatchError, match="abc123") as caught:
        TopKSAE.load(tmp_path / "sae", expected_model_hash="another-model")
    assert isinstance(caught.value, ValueError)

    meta["config"]["num_latents"] = 32
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        TopKSAE.load(tmp_path / "sae")


def test_trainer_feeds_several_hookpoints_and_sizes_from_one_stream(tmp_path):
    configs = [
        small_cfg(max_tokens=64 * 4),
        small_cfg(num_latents=128, batch_size=128, max_tokens=128 * 3),
        small_cfg(hookpoint="layers.2", d_in=32, batch_size=100, max_tokens=None),
    ]
    pulled = []

    def stream():
        for i in range(6):  # 6 items of 70 tokens = 420 tokens
            pulled.append(i)
            yield {"layers.1": torch.randn(70, 16), "layers.2": torch.randn(70, 32)}

    results = SaeTrainer(configs, tmp_path, model_hash="m1").fit(stream())
    assert [r.status for r in results] == ["completed", "completed", "completed"]
    assert [r.stats.steps for r in results] == [4, 3, 4]  # layers.2 has no budget: 420 // 100 full batches
    assert [r.stats.tokens for r in results] == [256, 384, 400]
    assert all(len(r.stats.fvu_history) == r.stats.steps for r in results)
    assert all(r.stats.l0 == 4.0 for r in results)
    assert len(pulled) == 6
    for r in results:
        assert r.folder == tmp_path / r.name
        assert TopKSAE.load(r.folder, expected_model_hash="m1").cfg == r.config


def test_trainer_stops_pulling_the_stream_once_every_budget_is_spent(tmp_path):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield {"layers.1": torch.randn(64, 16)}

    [result] = SaeTrainer([small_cfg(max_tokens=64 * 3)], tmp_path).fit(endless())
    assert result.status == "completed" and result.stats.steps == 3 and len(pulled) == 3


def test_should_stop_cancels_the_trainer(tmp_path):
    calls = itertools.count(1)
    results = SaeTrainer([small_cfg(max_tokens=64 * 100)], tmp_path,
                         should_stop=lambda: next(calls) > 3).fit(
        {"layers.1": torch.randn(64, 16)} for _ in itertools.count())
    assert results[0].status == "cancelled" and results[0].stats.steps == 3
    assert json.loads((results[0].folder / "cfg.json").read_text())["training"]["status"] == "cancelled"


def test_kill_rule_checks_metric_steps_and_pattern():
    rule = KillRule("dead_fraction", above=0.5, after_steps=5, pattern="layers.1-*")
    assert rule.check("layers.1-a", TrainStats(steps=5, dead_fraction=0.6)).startswith("dead_fraction = 0.6 > 0.5")
    assert rule.check("layers.1-a", TrainStats(steps=4, dead_fraction=0.6)) is None
    assert rule.check("layers.1-a", TrainStats(steps=9, dead_fraction=0.5)) is None
    assert rule.check("layers.2-a", TrainStats(steps=9, dead_fraction=0.9)) is None
    with pytest.raises(ValueError, match="unknown kill metric"):
        KillRule("accuracy", above=0.5, after_steps=1)


def test_sweep_kills_a_hopeless_run_and_hands_its_slot_to_the_next(tmp_path):
    configs = [small_cfg(name="doomed", max_tokens=64 * 8), small_cfg(name="a", max_tokens=64 * 8, seed=1),
               small_cfg(name="b", max_tokens=64 * 8, seed=2)]
    rules = [KillRule("fvu_ema", above=1e-9, after_steps=2, pattern="doomed")]  # an impossible bound
    stream = ({"layers.1": torch.randn(64, 16)} for _ in range(30))
    result = run_sweep(configs, stream, tmp_path, kill_rules=rules, parallel=2)

    doomed, a, b = (result.record(name) for name in ("doomed", "a", "b"))
    assert doomed.status == "killed" and doomed.kill_reason.startswith("fvu_ema")
    assert doomed.killed_at_step == 2 and doomed.killed_at_tokens == 128
    assert doomed.estimated_seconds_saved == pytest.approx(6 * doomed.seconds_per_step) and doomed.estimated_seconds_saved > 0
    assert doomed.folder is None and not (tmp_path / "doomed").exists()
    assert a.started_at_stream_tokens == 0 and b.started_at_stream_tokens == 128  # b took doomed's slot
    assert (a.status, a.steps, b.status, b.steps) == ("completed", 8, "completed", 8)
    assert (tmp_path / "a" / "sae.safetensors").exists() and (tmp_path / "b" / "cfg.json").exists()
    assert result.stream_tokens == 128 + 8 * 64 and not result.stream_exhausted and not result.cancelled

    summary = json.loads(result.path.read_text())
    assert summary["finished"] and [r["status"] for r in summary["runs"]] == ["killed", "completed", "completed"]
    assert summary["total_estimated_seconds_saved"] == pytest.approx(doomed.estimated_seconds_saved)


def test_sweep_records_runs_the_stream_could_not_serve(tmp_path):
    configs = [small_cfg(name=f"r{i}", max_tokens=64 * 4, seed=i) for i in range(3)] + [small_cfg(name="long", max_tokens=64 * 50)]
    stream = ({"layers.1": torch.randn(64, 16)} for _ in range(10))
    result = run_sweep(configs, stream, tmp_path, parallel=1)
    assert [r.status for r in result.records] == ["completed", "completed", "stream_ended", "not_started"]
    assert result.records[2].steps == 2 and result.stream_exhausted
    assert result.records[3].estimated_seconds_saved is None and result.records[3].started_at_stream_tokens is None


def test_should_stop_cancels_the_sweep(tmp_path):
    calls = itertools.count(1)
    configs = [small_cfg(name=f"r{i}", max_tokens=64 * 100, seed=i) for i in range(3)]
    result = run_sweep(configs, ({"layers.1": torch.randn(64, 16)} for _ in itertools.count()), tmp_path,
                       parallel=2, should_stop=lambda: next(calls) > 4)
    assert result.cancelled
    assert [r.status for r in result.records] == ["cancelled", "cancelled", "not_started"]
    assert [r.steps for r in result.records] == [4, 4, 0]
    summary = json.loads(result.path.read_text())
    assert summary["cancelled"] and math.isfinite(summary["runs"][0]["metrics"]["fvu_ema"])
