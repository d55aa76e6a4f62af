"""Sample shrinkage (`HyperAttentionConfig.sample_shrinkage`, `ops.shrinkage`): the map on the sample tile and its
transpose, the fixed rule and the adaptive (James-Stein) lam against their definitions, what each does to a spread
and to a peaked residual, and non-causal only. The estimator's dense definition with shrinkage is in
test_accuracy_options.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import clustered_qkv, random_qkv

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.ops.shrinkage import adaptive_value_weight


def _grouped(q, k, v):
    return ops.group_queries(q, k.shape[2]), ops.heads_major(k), ops.heads_major(v)


def _james_stein_by_loops(queries, keys, values, log_weight, scale):
    """lam per (batch, kv head), written probe by probe from the definition in `ops.shrinkage`."""
    b, kv = log_weight.shape[:2]
    lam = np.ones((b, kv))
    for i in range(b):
        for j in range(kv):
            live = np.isfinite(log_weight[i, j])
            w = np.exp(log_weight[i, j][live])
            k_s, v_s = keys[i, j][live], values[i, j][live]
            deviation = v_s - (w / w.sum()) @ v_s
            noise = energy = 0.0
            for query in queries[i, j]:
                logits = k_s @ query * scale + np.log(w)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                signal = p @ deviation
                noise += np.sum(p**2 * np.sum((deviation - signal) ** 2, axis=-1))
                energy += np.sum(signal**2)
            lam[i, j] = np.clip(1 - noise / energy, 0, 1)
    return lam


def test_adaptive_weight_is_the_positive_part_james_stein_factor(rng):
    b, kv, r, m, h = 2, 2, 16, 128, 32
    keys = rng.standard_normal((b, kv, m, h))
    # Head 0: values a function of the keys (the probes' attention shifts their mean: signal); head 1: values
    # independent of the keys (any shift is sampling noise).
    values = np.stack([keys[:, 0] @ rng.standard_normal((h, h)) / h**0.5, rng.standard_normal((b, m, h))], axis=1)
    queries = 0.8 * rng.standard_normal((b, kv, r, h))
    log_weight = 0.5 * rng.standard_normal((b, kv, m))
    log_weight[0, 1, :5] = -np.inf  # dropped samples
    args = [jnp.asarray(x, jnp.float32) for x in (queries, keys, values, log_weight)]
    lam = np.asarray(adaptive_value_weight(*args, scale=h**-0.5))
    np.testing.assert_allclose(lam, _james_stein_by_loops(queries, keys, values, log_weight, h**-0.5), atol=2e-5)
    assert np.all(lam[:, 0] > 0.2) and np.all(lam[:, 1] < 0.05), lam


def test_adaptive_weight_is_one_where_no_sample_is_live():
    x = jnp.ones((1, 1, 4, 8))
    lam = adaptive_value_weight(x[:, :, :2], x, x, jnp.full((1, 1, 4), -jnp.inf), scale=1.0)
    np.testing.assert_array_equal(lam, 1.0)


def test_sample_shrinkage_pulls_sample_values_toward_their_weighted_mean(rng):
    q, k, v = random_qkv(rng, b=2, t=300, n=4, kv=2, h=16)
    gq, gk, gv = _grouped(q, k, v)
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=20, min_seq_len=0, num_heavy_keys=8, sample_shrinkage=0.5)
    plan = ops.make_plan(gq, gk, key=jax.random.key(4), config=cfg, v=gv)
    residual_keys_per_sample = np.asarray(plan.num_block_keys) / 20
    np.testing.assert_allclose(plan.sample_value_weight, 1 / (1 + 0.5 * residual_keys_per_sample), rtol=1e-6)
    raw = np.take_along_axis(np.asarray(gv), np.asarray(plan.sample_index)[..., None], axis=2)  # [B, K, m, H]
    weight = np.exp(np.asarray(plan.sample_log_weight))
    mean = np.einsum("bkm,bkmh->bkh", weight, raw) / weight.sum(-1)[..., None]
    lam = np.asarray(plan.sample_value_weight)[..., None, None]
    expected = lam * raw + (1 - lam) * mean[:, :, None]
    np.testing.assert_allclose(ops.sampled_residual_tile(gk, gv, plan).v[:, :, 0], expected, rtol=1e-5, atol=1e-6)
    # The kernels' backward applies the map's transpose to the tile's dv: it must be the linear map's transpose.
    d_values = jnp.asarray(rng.standard_normal(raw[:, :, None].shape), jnp.float32)
    (transposed,) = jax.linear_transpose(lambda x: ops.shrink_sample_values(x, plan), d_values)(d_values)
    got = ops.tiles.shrink_sample_values_transpose(d_values, *ops.sample_value_mix(plan))
    np.testing.assert_allclose(got, transposed, rtol=1e-5, atol=1e-6)
    # Off (the paper's estimator): the plan has no weight and the tile's values are the sampled rows.
    plain = ops.make_plan(gq, gk, key=jax.random.key(4), config=cfg.replace(sample_shrinkage=0.0), v=gv)
    assert plain.sample_value_weight is None
    np.testing.assert_array_equal(ops.sampled_residual_tile(gk, gv, plain).v[:, :, 0], raw)


@pytest.mark.parametrize("shrinkage", [0.5, "adaptive"])
def test_sample_shrinkage_is_non_causal_only(rng, shrinkage):
    q, k, v = random_qkv(rng, b=1, t=512, n=2, kv=1, h=16)
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=32, min_seq_len=128, num_heavy_keys=8, local_window=16)
    for causal, same in ((True, True), (False, False)):
        on, off = (
            ha.hyper_attention(q, k, v, key=jax.random.key(1), config=cfg.replace(sample_shrinkage=c), causal=causal)
            for c in (shrinkage, 0.0)
        )
        assert bool(jnp.array_equal(on, off)) == same, causal


def _mean_error(q, k, v, config, seeds: int):
    ref = ha.exact_attention(q, k, v)
    out = [ha.hyper_attention(q, k, v, key=jax.random.key(s), config=config) for s in range(seeds)]
    return float(np.mean([ha.diagnostics.relative_error(o, ref) for o in out]))


def test_sample_shrinkage_cuts_the_error_of_a_spread_residual(rng):
    # Scores with spread 2 and a common value offset: the residual carries most of the mass, its weights vary
    # widely, and its estimate is dominated by the sample-by-sample deviations that shrinkage damps.
    q, k, v = random_qkv(rng, b=1, t=2048, n=2, h=16)
    q, v = 2.0 * q, v + 1.0
    cfg = ha.HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=0, num_heavy_keys=16)
    errors = {c: _mean_error(q, k, v, cfg.replace(sample_shrinkage=c), seeds=8) for c in (0.0, 1 / 32, "adaptive")}
    # this test's draw: 0.353 unshrunk, 0.219 fixed, 0.169 adaptive
    assert errors[1 / 32] < 0.8 * errors[0.0] and errors["adaptive"] < 0.8 * errors[0.0], errors


def test_adaptive_shrinkage_leaves_a_peaked_residual_alone(rng):
    # Planted clusters: each query's mass sits on its cluster's keys, which carry one value per cluster, so the
    # samples' deviations from their mean are the signal. The fixed rule damps it anyway (c = 1/32 raised the error
    # about fivefold on three other draws of this input); the adaptive lam sees it in the probes and keeps it.
    q, k, v = clustered_qkv(rng, t=2048, n=2, h=16)
    cfg = ha.HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=0, num_heavy_keys=16)
    errors = {c: _mean_error(q, k, v, cfg.replace(sample_shrinkage=c), seeds=4) for c in (0.0, 1 / 32, "adaptive")}
    assert errors["adaptive"] < 1.05 * errors[0.0] and errors[1 / 32] > 2 * errors[0.0], errors


def test_sample_shrinkage_refuses_what_it_cannot_do(rng):
    with pytest.raises(ValueError, match="sample_shrinkage"):
        ha.HyperAttentionConfig(sample_shrinkage="auto")
    with pytest.raises(ValueError, match="sample_shrinkage"):
        ha.HyperAttentionConfig(sample_shrinkage=-1.0)
    gq, gk, _ = _grouped(*random_qkv(rng, t=256, h=16))
    with pytest.raises(ValueError, match="needs the values"):
        ops.make_plan(gq, gk, key=jax.random.key(0), config=ha.HyperAttentionConfig(block_size=32, sample_size=16))
