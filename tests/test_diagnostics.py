import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_qkv

import hyperattn_jax as ha
from hyperattn_jax import diagnostics, ops


def test_alpha_is_one_for_uniform_attention(rng):
    _, k, _ = random_qkv(rng, t=128, n=2)
    q = jnp.zeros((1, 128, 2, 16))  # every score 0: every column carries mass 1/S of every row
    h = diagnostics.hardness(q, k, key=jax.random.key(0), config=ha.HyperAttentionConfig(block_size=32), query_chunk=48)
    np.testing.assert_allclose(h.alpha, 1.0, rtol=1e-5)


def test_hardness_matches_dense_definitions(rng):
    q, k, v = random_qkv(rng, t=100, s=90, n=4, kv=2)
    cfg = ha.HyperAttentionConfig(block_size=16, sample_size=8, min_seq_len=0)
    key = jax.random.key(4)
    h = diagnostics.hardness(q, k, key=key, config=cfg, query_chunk=32)
    scores = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)) / 4
    a = np.exp(scores)
    normalised = a / a.sum(-1, keepdims=True)
    np.testing.assert_allclose(h.alpha, 100 * (normalised**2).sum(-2).max(-1), rtol=1e-4)
    plan = ops.make_plan(ops.group_queries(q, 2), ops.heads_major(k), key=key, config=cfg, v=ops.heads_major(v))
    query_block = np.asarray(plan.query_order.inverse // plan.query_block).reshape(1, 4, 100)
    key_block = np.repeat(np.asarray(plan.key_order.inverse // plan.key_block), 2, axis=1)
    residual = np.where(query_block[..., None] == key_block[:, :, None, :], 0.0, a).sum(-1)
    np.testing.assert_allclose(h.kappa, residual.max(-1) / residual.min(-1), rtol=1e-4)


def test_relative_error_per_head(rng):
    q, _, _ = random_qkv(rng, b=2, t=16, n=3)
    noisy = q.at[:, :, 1].multiply(1.5)
    err = diagnostics.relative_error(noisy, q, per_head=True)
    np.testing.assert_allclose(err, np.array([[0, 0.5, 0]] * 2), atol=1e-6)
