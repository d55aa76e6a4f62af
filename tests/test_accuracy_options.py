"""The accuracy options (sinks, heavy keys, importance/systematic sampling, causal window): exact estimator, exact
gradients, unbiased weights, and the paper config unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_estimator, dense_estimator_weights, random_qkv

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.backends import xla as xla_backend

OPTION_CONFIGS = {
    "sinks+heavy+column_mass+systematic": dict(
        num_sink_keys=3,
        num_heavy_keys=6,
        sample_distribution="column_mass",
        sample_scheme="systematic",
        num_probe_queries=16,
    ),
    "sinks+heavy+value_norm": dict(
        num_sink_keys=5, num_heavy_keys=4, sample_distribution="value_norm", uniform_fraction=0.3, num_probe_queries=8
    ),
}


def global_mask(plan, s: int):
    """bool `[B, K, S]`: the plan's global keys."""
    if plan.global_index is None:
        return jnp.zeros(plan.key_order.inverse.shape, bool)
    return jnp.any(plan.global_index[..., None] == jnp.arange(s), axis=-2)


def dense_option_weights(plan, t: int, s: int):
    """W `[B, K, G, T, S]` of the estimator under a plan with options, built densely from the plan's definition.

    W_ij = 1 for the global keys (`plan.global_index`) and for the other valid keys in query i's block (sorted
    position // key_block: global keys keep their place in the hash order), plus exp(sample_log_weight) for every
    sample equal to j outside that block.
    """
    sorted_position = plan.key_order.inverse  # [B, K, S]
    valid = jnp.arange(s) < plan.num_valid_keys[:, None, None]
    is_global = global_mask(plan, s) & valid
    key_block = sorted_position // plan.key_block
    query_block = plan.query_order.inverse // plan.query_block  # [B, K, G, T]
    in_blocks = valid & ~is_global
    same_block = (query_block[..., None] == key_block[:, :, None, None, :]) & in_blocks[:, :, None, None, :]
    weights = (same_block | is_global[:, :, None, None, :]).astype(jnp.float32)
    sample_block = jnp.take_along_axis(key_block, plan.sample_index, axis=-1)  # [B, K, m]
    sample_weight = jnp.exp(plan.sample_log_weight)  # [B, K, m]
    outside = query_block[..., None] != sample_block[:, :, None, None, :]  # [B, K, G, T, m]
    one_hot = jax.nn.one_hot(plan.sample_index, s)  # [B, K, m, S]
    return weights + jnp.einsum("bkgtm,bkm,bkms->bkgts", outside.astype(jnp.float32), sample_weight, one_hot)


def _grouped(q, k, v):
    return ops.group_queries(q, k.shape[2]), ops.heads_major(k), ops.heads_major(v)


@pytest.mark.parametrize("name", list(OPTION_CONFIGS))
def test_option_estimator_and_gradients_equal_dense_definition(rng, name):
    q, k, v = random_qkv(rng, b=2, t=150, s=170, n=4, kv=2, h=16)
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=24, min_seq_len=0, **OPTION_CONFIGS[name])
    key, scale = jax.random.key(7), 0.3
    kv_length = jnp.array([170, 131])
    gq, gk, gv = _grouped(q, k, v)
    plan = ops.make_plan(gq, gk, key=key, config=cfg, kv_length=kv_length, v=gv, scale=scale)
    weights = dense_option_weights(plan, 150, 170)
    cotangent = jnp.asarray(rng.standard_normal(gq.shape), jnp.float32)

    def hyper_loss(q, k, v):
        out, lse = ops.grouped_hyper_attention(q, k, v, key=key, config=cfg, scale=scale, kv_length=kv_length)
        return jnp.sum(out * cotangent) + jnp.sum(jnp.sin(lse)), (out, lse)

    def dense_loss(q, k, v):
        out, lse = dense_estimator(q, k, v, weights, scale)
        return jnp.sum(out * cotangent) + jnp.sum(jnp.sin(lse)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(hyper_loss, argnums=(0, 1, 2), has_aux=True))(gq, gk, gv)
    (_, (ref_out, ref_lse)), ref_grads = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2), has_aux=True))(
        gq, gk, gv
    )
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The fused form and the merged (readable) form are the same estimator.
    merged = jax.jit(ops.grouped_hyper_attention_merged, static_argnames=("config", "scale"))(
        gq, gk, gv, key=key, config=cfg, scale=scale, kv_length=kv_length
    )
    np.testing.assert_allclose(merged[0], out, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shrinkage", [0.5, "adaptive"])
def test_shrunk_estimator_and_gradients_equal_dense_definition(rng, shrinkage):
    # With shrinkage every sample enters as its own term with value lam v_s + (1 - lam) * the weighted mean of the
    # sampled values: written here sample by sample, from the plan's indices, weights and lam alone (lam is part of
    # the plan: a constant for the gradients, also where it is fitted to q, k, v).
    q, k, v = random_qkv(rng, b=2, t=150, s=170, n=4, kv=2, h=16)
    options = OPTION_CONFIGS["sinks+heavy+column_mass+systematic"]
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=24, min_seq_len=0, sample_shrinkage=shrinkage,
                                        **options)  # fmt: skip
    key, scale, kv_length = jax.random.key(7), 0.3, jnp.array([170, 131])
    gq, gk, gv = _grouped(q, k, v)
    plan = ops.make_plan(gq, gk, key=key, config=cfg, kv_length=kv_length, v=gv, scale=scale)
    no_samples = plan.replace(
        sample_index=plan.sample_index[..., :0], sample_log_weight=plan.sample_log_weight[..., :0]
    )
    without_samples = dense_option_weights(no_samples, 150, 170)
    query_block = plan.query_order.inverse // plan.query_block  # [B, K, G, T]
    sample_block = jnp.take_along_axis(plan.key_order.inverse // plan.key_block, plan.sample_index, axis=-1)
    outside = query_block[..., None] != sample_block[:, :, None, None, :]  # [B, K, G, T, m]
    weight = jnp.exp(plan.sample_log_weight)  # [B, K, m]
    lam = plan.sample_value_weight[..., None, None]
    cotangent = jnp.asarray(rng.standard_normal(gq.shape), jnp.float32)

    def dense(q, k, v):
        s = jnp.einsum("bkgqh,bksh->bkgqs", q, k) * scale
        k_s, v_s = (jnp.take_along_axis(x, plan.sample_index[..., None], axis=2) for x in (k, v))  # [B, K, m, H]
        mean = jnp.einsum("bkm,bkmh->bkh", weight, v_s) / jnp.sum(weight, -1)[..., None]
        shrunk = lam * v_s + (1 - lam) * mean[:, :, None]
        s_s = jnp.einsum("bkgqh,bkmh->bkgqm", q, k_s) * scale
        logits = jnp.concatenate([
            jnp.where(without_samples > 0, s + jnp.log(jnp.where(without_samples > 0, without_samples, 1.0)), -jnp.inf),
            jnp.where(outside, s_s + jnp.log(weight)[:, :, None, None], -jnp.inf),
        ], axis=-1)  # fmt: skip
        lse = jax.nn.logsumexp(logits, axis=-1)
        p = jnp.exp(logits - lse[..., None])
        out = jnp.einsum("bkgqs,bksh->bkgqh", p[..., :170], v) + jnp.einsum("bkgqm,bkmh->bkgqh", p[..., 170:], shrunk)
        return out, lse

    def hyper(q, k, v):
        return ops.grouped_hyper_attention(q, k, v, key=key, config=cfg, scale=scale, kv_length=kv_length)

    def value_and_grad(fn):
        loss = lambda *a: (lambda o: (jnp.sum(o[0] * cotangent) + jnp.sum(jnp.sin(o[1])), o))(fn(*a))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(gq, gk, gv)

    (_, (out, lse)), grads = value_and_grad(hyper)
    (_, (ref_out, ref_lse)), ref_grads = value_and_grad(dense)
    assert float(jnp.min(plan.sample_value_weight)) < 0.5  # the shrinkage is strong enough to matter
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_global_keys_are_the_sinks_and_the_heaviest_columns(rng):
    q, k, v = random_qkv(rng, b=1, t=256, n=2, kv=1, h=16)
    heavy = np.array([40, 100, 201])
    k = k.at[:, heavy].set(2.5 * q.mean(axis=(1, 2))[:, None] / jnp.linalg.norm(q.mean(axis=(1, 2))) * 4)
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=16, min_seq_len=0, num_sink_keys=4, num_heavy_keys=3)
    gq, gk, gv = _grouped(q, k, v)
    plan = jax.jit(ops.make_plan, static_argnames="config")(gq, gk, key=jax.random.key(0), config=cfg, v=gv)
    global_keys = set(np.asarray(plan.global_index[0, 0]).tolist())
    assert global_keys == {0, 1, 2, 3, *heavy.tolist()}
    assert not set(np.asarray(plan.sample_index).ravel().tolist()) & global_keys  # never sampled


@pytest.mark.parametrize(
    "options", [dict(sample_distribution="column_mass"), dict(sample_scheme="systematic", num_sink_keys=3)]
)
def test_sample_weights_are_unbiased(rng, options):
    # E[sum over samples of w_s * f(j_s)] = sum over non-global valid keys of f(j): averaged over many draws.
    q, k, v = random_qkv(rng, b=1, t=128, n=2, kv=1, h=16)
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=16, min_seq_len=0, num_probe_queries=8, **options)
    gq, gk, gv = _grouped(q, k, v)
    f = jnp.asarray(rng.uniform(0.5, 1.5, 128), jnp.float32)

    def estimate(key):
        plan = ops.make_plan(gq, gk, key=key, config=cfg, v=gv)
        is_normal = ~global_mask(plan, 128)[0, 0]
        total = jnp.sum(jnp.where(is_normal, f, 0.0))
        return jnp.sum(jnp.exp(plan.sample_log_weight[0, 0]) * f[plan.sample_index[0, 0]]) / total

    keys = jax.random.split(jax.random.key(1), 1000)
    ratios = np.asarray(jax.jit(jax.vmap(estimate))(keys))
    assert abs(ratios.mean() - 1.0) < 4 * ratios.std() / np.sqrt(len(ratios)) + 1e-3, (ratios.mean(), ratios.std())


def test_systematic_sampling_draws_each_key_at_most_once_when_uniform(rng):
    q, k, v = random_qkv(rng, b=2, t=300, n=2, kv=2, h=16)
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=64, min_seq_len=0, sample_scheme="systematic")
    plan = ops.make_plan(*_grouped(q, k, v)[:2], key=jax.random.key(3), config=cfg)
    index = np.asarray(plan.sample_index).reshape(-1, 64)
    assert all(len(set(row)) == 64 for row in index)
    np.testing.assert_allclose(np.exp(plan.sample_log_weight), 300 / 64, rtol=1e-5)


def test_paper_config_is_the_published_algorithm(rng):
    # The default: half the paper's block, 128 probed heavy keys (same keys per query non-causally), a 256-key causal
    # window, and the residual sampled by probed column mass.
    ours = {"sample_distribution": "column_mass", "sample_scheme": "systematic", "num_probe_queries": 16}
    ours |= {"block_size": 128, "num_heavy_keys": 128, "local_window": 256, "sample_shrinkage": "adaptive"}
    assert ha.HyperAttentionConfig.paper(**ours) == ha.HyperAttentionConfig()
    cfg = ha.HyperAttentionConfig.paper()
    assert cfg.sample_shrinkage == 0
    assert (cfg.block_size, cfg.sample_size, cfg.num_projections, cfg.min_seq_len) == (256, 256, 7, 4096)
    assert (cfg.num_sink_keys, cfg.num_heavy_keys, cfg.local_window) == (0, 0, 0)
    assert (cfg.sample_distribution, cfg.sample_scheme, cfg.keys_per_query) == ("uniform", "independent", 512)
    # Its estimator is the published one: tests/helpers.py's dense definition (uniform samples, weight S/m).
    q, k, v = random_qkv(rng, b=1, t=300, n=2, kv=1, h=16)
    small = ha.HyperAttentionConfig.paper(block_size=32, sample_size=16, min_seq_len=0)
    gq, gk, gv = _grouped(q, k, v)
    plan = ops.make_plan(gq, gk, key=jax.random.key(2), config=small)
    assert plan.num_global == 0 and plan.sample_log_weight is None
    expected, _ = dense_estimator(gq, gk, gv, dense_estimator_weights(plan, 300, 300), 0.25)
    out = ha.hyper_attention(q, k, v, key=jax.random.key(2), config=small, scale=0.25)
    np.testing.assert_allclose(ops.group_queries(out, 1), expected, rtol=2e-5, atol=2e-5)


def test_causal_sinks_and_window_equal_the_dense_definition_with_gradients(rng):
    # One recursion level after the sinks: T = 256, g = 8, base 128, window 16.
    t, g, w, half = 256, 8, 16, 128
    q, k, v = random_qkv(rng, b=1, t=t, n=4, kv=2, h=16)
    cfg = ha.HyperAttentionConfig.paper(
        block_size=32, sample_size=16, min_seq_len=128, num_sink_keys=g, local_window=w, sample_scheme="systematic"
    )
    key, scale = jax.random.key(4), 0.25
    gq, gk, gv = _grouped(q, k, v)
    # The recursion runs on positions [g, T) padded back to T. The second half's diagonal block reaches w keys left
    # (its prefix, exact); the lower-left quarter is second-half queries over keys [0, half - w), then the first
    # node's prefix, which lies before position 0 and is cut off by kv_length.
    shift = lambda x, axis: jnp.pad(
        jax.lax.slice_in_dim(x, g, t, axis=axis), [(0, g) if a == axis else (0, 0) for a in range(x.ndim)]
    )
    sq, sk, sv = shift(gq, 3), shift(gk, 2), shift(gv, 2)
    key_low, _ = ops.split_level(key)
    low_keys = lambda x: jnp.pad(x[:, :, : half - w], [(0, 0), (0, 0), (0, w), (0, 0)])
    plan = ops.make_plan(
        sq[..., half:, :],
        low_keys(sk),
        key=key_low,
        config=cfg.replace(num_sink_keys=0, local_window=0),
        kv_length=jnp.array([half - w]),
        v=low_keys(sv),
        scale=scale,
    )
    assert float(plan.num_valid_keys[0]) == half - w
    low = dense_option_weights(plan, half, half)  # [B, K, G, half, half] in shifted coordinates
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    si, sj = i - g, j - g  # shifted positions
    same_segment = (si // half == sj // half) & (sj >= 0)
    prefix = (si >= half) & (sj >= half - w) & (sj < half)
    exact = (j <= i) & ((j < g) | same_segment | prefix)
    weights = jnp.broadcast_to(jnp.asarray(exact, jnp.float32), (*low.shape[:3], t, t))
    weights = weights.at[..., g + half :, g : g + half].add(low[..., : t - g - half, :])

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out**2) + jnp.sum(jnp.sin(lse)), out

    def hyper(q, k, v):
        parts = xla_backend.parts(scale=scale, hash_key=None)
        return ops.grouped_causal_attention(q, k, v, key=key, config=cfg, parts=parts)

    value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = value_and_grad(hyper)(gq, gk, gv)
    (_, ref), ref_grads = value_and_grad(lambda q, k, v: dense_estimator(q, k, v, weights, scale))(gq, gk, gv)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The public entry point computes the same thing.
    public = ha.hyper_attention(q, k, v, key=key, config=cfg, causal=True, scale=scale)
    np.testing.assert_allclose(ops.group_queries(public, 2), out, rtol=2e-5, atol=2e-5)


def test_paper_plan_weights_match_the_shared_dense_helper(rng):
    # The options' dense definition reduces to tests/helpers.py's for the published plan.
    q, k, v = random_qkv(rng, b=1, t=100, n=2, kv=1, h=16)
    cfg = ha.HyperAttentionConfig.paper(block_size=32, sample_size=16, min_seq_len=0, num_sink_keys=0)
    gq, gk, _ = _grouped(q, k, v)
    plan = ops.make_plan(gq, gk, key=jax.random.key(5), config=cfg)
    full = plan.replace(
        sample_log_weight=jnp.full(plan.sample_index.shape, jnp.log(100 / 16)),
        num_block_keys=jnp.full(plan.sample_index.shape[:2], 100),
    )
    np.testing.assert_allclose(dense_option_weights(full, 100, 100), dense_estimator_weights(plan, 100, 100), rtol=1e-5)


def sink_qkv(rng, t=1024, n=2, h=32):
    """Random q/k/v plus an attention sink: queries share a component along u and key 0 lies along u, so a large share
    of most queries' attention sits on key 0 (the structure of real LM attention that defeats uniform sampling)."""
    q, k, v = random_qkv(rng, b=1, t=t, n=n, kv=1, h=h)
    u = jnp.asarray(rng.standard_normal(h), jnp.float32)
    u = u / jnp.linalg.norm(u)
    q = q + 2.0 * u
    k = k.at[:, 0, 0].set(20.0 * u)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_accurate_options_beat_the_paper_on_a_sink_at_equal_cost(rng, causal):
    # The harness of experiments/accuracy_qkv.py in small: same keys per query (128), several keys, error vs exact.
    q, k, v = sink_qkv(rng)
    paper = ha.HyperAttentionConfig.paper(block_size=64, sample_size=64, min_seq_len=256)
    ours = ha.HyperAttentionConfig.accurate(
        block_size=32, sample_size=64, num_sink_keys=8, num_heavy_keys=16, local_window=8, min_seq_len=256,
        num_probe_queries=32,
    )  # fmt: skip
    assert paper.keys_per_query == ours.keys_per_query == 128
    ref = ha.exact_attention(q, k, v, causal=causal)

    def error(config):
        runs = [
            ha.diagnostics.relative_error(
                ha.hyper_attention(q, k, v, key=jax.random.key(s), config=config, causal=causal), ref
            )
            for s in range(2)
        ]
        return float(np.mean(runs))

    paper_error, our_error = error(paper), error(ours)
    assert our_error < 0.5 * paper_error, (our_error, paper_error)


@pytest.mark.parametrize("scheme", ["systematic", "independent"])
@pytest.mark.parametrize("top_offset", [False, True])
def test_sample_draws_land_on_keys_with_probability(rng, monkeypatch, scheme, top_offset):
    # Keys in hash order, the last ones (and some in between) without probability, some with mass the normalised
    # cdf barely resolves: every draw must land on a key with probability, also when the systematic offset is the
    # largest float32 below 1, where (m - 1 + offset) / m rounds up to 1.
    from hyperattn_jax.ops import plan as plan_module

    probability = rng.exponential(size=(2, 3, 120)) * (rng.random((2, 3, 120)) < 0.7)
    probability[..., 0] = 1.0  # every row has a key with probability
    probability[..., 90:] *= 1e-9
    probability[..., 110:] = 0.0
    probability = jnp.asarray(probability / probability.sum(-1, keepdims=True), jnp.float32)
    if top_offset:
        monkeypatch.setattr(plan_module, "draw_uniform", lambda key, shape: jnp.full(shape, 1.0 - 2.0**-24))
    position = plan_module._draw_sorted_positions(jax.random.key(int(rng.integers(1 << 30))), probability, 256, scheme)
    drawn = np.take_along_axis(np.asarray(probability), np.asarray(position), axis=-1)
    assert position.shape == (2, 3, 256) and bool(np.all(drawn > 0))
