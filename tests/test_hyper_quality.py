"""HyperAttention against the exact oracle: exactness where it must be exact, and accuracy that means something."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import clustered_qkv, planted_qkv, random_qkv

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.diagnostics import relative_error


@pytest.mark.parametrize("sample_size", [0, 32])
def test_one_block_covering_the_sequence_is_exact(rng, sample_size):
    # A single block holds every key; any sample lands in the own block and is excluded.
    q, k, v = random_qkv(rng, b=2, t=100, n=4, kv=2)
    cfg = ha.HyperAttentionConfig(block_size=128, sample_size=sample_size, min_seq_len=0)
    out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, return_lse=True)
    ref_out, ref_lse = ha.exact_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_fused_tiles_equal_merged_partials(rng):
    q, k, v = random_qkv(rng, b=1, t=300, s=260, n=4, kv=2)
    args = (ops.group_queries(q, 2), ops.heads_major(k), ops.heads_major(v))
    cfg = ha.HyperAttentionConfig(block_size=64, sample_size=48, min_seq_len=0)
    fused = ops.grouped_hyper_attention(*args, key=jax.random.key(3), config=cfg, scale=0.25)
    merged = ops.grouped_hyper_attention_merged(*args, key=jax.random.key(3), config=cfg, scale=0.25)
    for a, b in zip(fused, merged):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_block_part_finds_planted_heavy_entries(rng):
    q, k, v, partner = planted_qkv(rng, t=2048, n=2, h=32)
    cfg = ha.HyperAttentionConfig(block_size=128, sample_size=128, min_seq_len=0)
    plan = ops.make_plan(ops.group_queries(q, 2), ops.heads_major(k), key=jax.random.key(1), config=cfg,
                         v=ops.heads_major(v))  # fmt: skip
    query_block = np.asarray(plan.query_order.inverse)[:, :, 0] // plan.query_block  # [B, N, T]
    key_block = np.asarray(plan.key_order.inverse) // plan.key_block  # [B, N, S]
    found = np.mean(query_block == np.take_along_axis(key_block, partner, axis=-1))
    assert found > 0.8, found  # uniform sampling of b + m keys would find 12.5%

    ref = ha.exact_attention(q, k, v)
    hyper_error = relative_error(ha.hyper_attention(q, k, v, key=jax.random.key(1), config=cfg), ref)
    # A sampling-only estimate at the same number of keys per query (b + m) misses most planted entries.
    index = jax.random.choice(jax.random.key(2), q.shape[1], (cfg.block_size + cfg.sample_size,), replace=False)
    sampling_error = relative_error(ha.exact_attention(q, k[:, index], v[:, index]), ref)
    assert float(sampling_error) > 0.8
    assert float(hyper_error) < 0.5 * float(sampling_error), (hyper_error, sampling_error)


def test_error_falls_as_sample_size_grows(rng):
    q, k, v = random_qkv(rng, b=1, t=2048, n=2, h=16)
    q = q * 0.5  # moderately flat attention: the residual carries most of the mass, so sampling matters
    ref = ha.exact_attention(q, k, v)
    errors = []
    for m in (16, 128, 1024):
        cfg = ha.HyperAttentionConfig(block_size=64, sample_size=m, min_seq_len=0)
        runs = [relative_error(ha.hyper_attention(q, k, v, key=jax.random.key(s), config=cfg), ref) for s in range(4)]
        errors.append(float(np.mean(runs)))
    assert errors[0] > 1.5 * errors[1] > 1.5 * 1.5 * errors[2], errors


def test_cross_attention_odd_lengths_and_padding_keys(rng):
    q, k, v = random_qkv(rng, b=2, t=77, s=333, n=2)
    cfg = ha.HyperAttentionConfig(block_size=64, sample_size=16, min_seq_len=0)
    kv_length = jnp.array([333, 200])
    out = ha.hyper_attention(q, k, v, key=jax.random.key(5), config=cfg, kv_length=kv_length)
    # Padding keys get zero probability: changing them changes nothing.
    k2 = k.at[1, 200:].set(100.0)
    v2 = v.at[1, 200:].set(1e4)
    out2 = ha.hyper_attention(q, k2, v2, key=jax.random.key(5), config=cfg, kv_length=kv_length)
    np.testing.assert_array_equal(out, out2)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("t", [256, 257, 300])
def test_causal_equals_exact_at_or_below_min_seq_len(rng, t):
    q, k, v = random_qkv(rng, b=1, t=t, n=2)
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=16, min_seq_len=300)
    out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, causal=True, return_lse=True)
    ref_out, ref_lse = ha.exact_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [512, 515])
def test_causal_recursion_never_looks_ahead(rng, t):
    q, k, v = random_qkv(rng, b=1, t=t, n=2, kv=1)
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=16, min_seq_len=64)  # three recursion levels

    def run(v):
        return ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, causal=True)

    cut = 300
    changed = run(v.at[:, cut:].set(jnp.asarray(rng.standard_normal(v[:, cut:].shape), v.dtype)))
    np.testing.assert_array_equal(run(v)[:, :cut], changed[:, :cut])
    assert not np.allclose(run(v)[:, cut:], changed[:, cut:])


@pytest.mark.parametrize("t", [512, 515])
def test_causal_window_counts_every_key_once(rng, t):
    # With every quarter's keys global (heavy keys covering each quarter, no samples) the window's recursion is
    # exact: each segment's prefix and each quarter shifted w keys left tile the causal mask exactly once.
    q, k, v = random_qkv(rng, b=2, t=t, n=4, kv=2)
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=0, num_heavy_keys=512, min_seq_len=64, local_window=24)
    out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, causal=True, return_lse=True)
    ref_out, ref_lse = ha.exact_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_causal_recursion_is_accurate_on_clustered_inputs(rng):
    q, k, v = clustered_qkv(rng, t=2048, n=2, h=32)
    cfg = ha.HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=256)
    out = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, causal=True)
    assert float(relative_error(out, ha.exact_attention(q, k, v, causal=True))) < 0.3


def test_causal_off_diagonal_quarter_is_the_non_causal_estimator(rng):
    # One recursion level: the second half's output is merge(exact causal diagonal, HyperAttention lower-left).
    q, k, v = random_qkv(rng, b=1, t=256, n=2)
    # No heavy keys (the default's 128 would make the 128-key quarter exact) and no window (the window's recursion:
    # tests/test_accuracy_options.py).
    cfg = ha.HyperAttentionConfig(block_size=32, sample_size=16, min_seq_len=128, num_heavy_keys=0, local_window=0)
    key = jax.random.key(9)
    out = ha.hyper_attention(q, k, v, key=key, config=cfg, causal=True)
    key_low, _ = ha.ops.split_level(key)
    # The quarter has min_seq_len keys: estimated inside the recursion (a public call that size would be exact),
    # without sample shrinkage (non-causal calls only).
    low = ha.ops.grouped_hyper_attention(
        *(ha.ops.group_queries(q[:, 128:], 2), ha.ops.heads_major(k[:, :128]), ha.ops.heads_major(v[:, :128])),
        key=key_low, config=cfg.replace(sample_shrinkage=0.0), scale=q.shape[-1] ** -0.5,
    )  # fmt: skip
    low = (ha.ops.ungroup_output(low[0]), ha.ops.ungroup_lse(low[1]))
    diag = ha.exact_attention(q[:, 128:], k[:, 128:], v[:, 128:], causal=True, return_lse=True)
    expected, _ = ha.merge_attention(*diag, *low)
    np.testing.assert_allclose(out[:, 128:], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out[:, :128], ha.exact_attention(q[:, :128], k[:, :128], v[:, :128], causal=True), atol=1e-5
    )
