"""Shared test helpers: fresh random inputs and the dense re-implementation of the HyperAttention estimator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def outputs_and_gradients(q, k, v, *, key, config, implementation, causal=False, kv_length=None, interpret=True):
    """out, lse and the gradients dq, dk, dv of a loss that takes both (lse's cotangent takes a separate path through
    every backward), for comparing implementations on the same key. Jitted: one compile of forward + backward."""
    import hyperattn_jax as ha

    def loss(q, k, v):
        out = ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, return_lse=True,
                                 implementation=implementation, interpret=interpret, kv_length=kv_length)  # fmt: skip
        weighted = jnp.sum(out[0].astype(jnp.float32) * jnp.cos(q.astype(jnp.float32)))
        return weighted + jnp.sum(jnp.sin(out[1])), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return jax.tree.leaves((out, grads))


def random_qkv(rng, b=1, t=64, s=None, n=2, kv=None, h=16, dtype=jnp.float32):
    s = t if s is None else s
    kv = n if kv is None else kv
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
    return q, k, v


def clustered_qkv(rng, b=1, t=1024, n=2, h=32, clusters=16, spread=0.1, sharpness=2.0, dtype=jnp.float32):
    """Planted heavy entries: q and k lie near shared cluster directions and each cluster's keys carry one value.

    A query's attention mass sits on its own cluster's keys (the large entries sortLSH must find), so its exact output
    is close to its cluster's value; keys from other clusters are light.
    """
    centres = rng.standard_normal((b, n, clusters, h))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    cluster_values = rng.standard_normal((b, n, clusters, h))

    def draw(length):
        which = rng.integers(0, clusters, (b, n, length))
        x = np.take_along_axis(centres, which[..., None], axis=2)
        x = x + spread / np.sqrt(h) * rng.standard_normal((b, n, length, h))
        return sharpness * np.sqrt(h) * x / np.linalg.norm(x, axis=-1, keepdims=True), which

    q, _ = draw(t)
    k, key_cluster = draw(t)
    v = np.take_along_axis(cluster_values, key_cluster[..., None], axis=2) + 0.1 * rng.standard_normal(k.shape)
    return tuple(jnp.asarray(x.transpose(0, 2, 1, 3), dtype) for x in (q, k, v))


def planted_qkv(rng, b=1, t=2048, n=2, h=32, noise=0.03, strength=1.5, dtype=jnp.float32):
    """Planted heavy entries: query i is a slightly perturbed copy of key perm[i], and that one entry dominates its row.

    Returns q, k, v and `perm` `[B, N, T]`. Uniform sampling finds a query's partner key with probability m / S;
    sortLSH puts the two (near in angle) in the same bucket, hence usually in the same block.
    """
    k = rng.standard_normal((b, n, t, h))
    k *= strength * np.sqrt(h) / np.linalg.norm(k, axis=-1, keepdims=True)
    perm = np.stack([[rng.permutation(t) for _ in range(n)] for _ in range(b)])
    q = np.take_along_axis(k, perm[..., None], axis=2) + noise * strength * rng.standard_normal(k.shape)
    v = rng.standard_normal(k.shape)
    return (*(jnp.asarray(x.transpose(0, 2, 1, 3), dtype) for x in (q, k, v)), perm)


def dense_estimator_weights(plan, t: int, s: int):
    """Per-(query, key) multiplicity W `[B, K, G, T, S]` of the estimator under `plan`, built densely.

    W_ij = 1 if key j sits in query i's sortLSH block, plus S/m for every sample equal to j outside that block.
    """
    query_block = plan.query_order.inverse // plan.query_block  # [B, K, G, T]
    key_block = plan.key_order.inverse // plan.key_block  # [B, K, S]
    valid = jnp.arange(s) < plan.num_valid_keys[:, None, None]
    same_block = (query_block[..., None] == key_block[:, :, None, None, :]) & valid[:, :, None, None, :]
    weights = same_block.astype(jnp.float32)
    if plan.sample_index is not None:
        m = plan.sample_index.shape[-1]
        counts = jax.nn.one_hot(plan.sample_index, s).sum(axis=2)  # [B, K, S], duplicates counted
        rate = (plan.num_valid_keys / m)[:, None, None, None, None]
        weights = weights + jnp.where(same_block, 0.0, rate * counts[:, :, None, None, :])
    return weights


def dense_estimator(q, k, v, weights, scale):
    """out_i = sum_j W_ij e^{s_ij} v_j / sum_j W_ij e^{s_ij}, grouped layout, plain autodiff-able jnp."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", q, k) * scale
    s = jnp.where(weights > 0, s + jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.einsum("bkgqs,bksh->bkgqh", jnp.exp(s - lse[..., None]), v), lse
