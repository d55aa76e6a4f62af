"""The pure-jnp backend: runs anywhere jax runs, any dtype. The twin every kernel backend is tested against."""

from __future__ import annotations

import functools

from hyperattn_jax._layout import group_queries, heads_major, ungroup_output
from hyperattn_jax.ops.causal import AttentionParts, grouped_attention
from hyperattn_jax.ops.estimate import grouped_hyper_attention
from hyperattn_jax.reference import DEFAULT_QUERY_CHUNK, grouped_exact_attention

NAME = "xla"
PLATFORMS = None  # every platform
# Exact parts over this many keys or fewer (sinks, the causal recent-key window) run as one unchunked call: the
# default query chunking would run T / 1024 small steps one after another.
FEW_KEYS = 256


def unsupported(**_) -> str | None:
    return None


def exact(q, k, v, *, scale, causal, kv_length):
    """Exact attention in the grouped layout, float32 statistics, memory O(query chunk x S)."""
    chunk = q.shape[3] if k.shape[2] <= FEW_KEYS else DEFAULT_QUERY_CHUNK
    return grouped_exact_attention(q, k, v, scale=scale, causal=causal, kv_length=kv_length, query_chunk=chunk)


def parts(*, scale: float, hash_key) -> AttentionParts:
    """The jnp estimate and exact attention, grouped layout (`ops.AttentionParts`)."""

    def estimate(q, k, v, *, key, config, kv_length):
        return grouped_hyper_attention(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key
        )

    return AttentionParts(estimate=estimate, exact=functools.partial(exact, scale=scale))


def attention(q, k, v, key, kv_length, hash_key, *, config, causal, scale, interpret=False):
    """Public layout in (q `[B, T, N, H]`, k, v `[B, S, K, H]`); out `[B, T, N, H]`, lse `[B, K, G, T]` float32."""
    del interpret  # nothing to interpret
    q5, k4, v4 = group_queries(q, k.shape[2]), heads_major(k), heads_major(v)
    out, lse = grouped_attention(
        q5, k4, v4, key=key, config=config, causal=causal, parts=parts(scale=scale, hash_key=hash_key),
        kv_length=kv_length,
    )  # fmt: skip
    return ungroup_output(out), lse
