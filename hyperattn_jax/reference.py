"""Exact softmax attention: the oracle every approximation is measured against.

Float32 (or float64) accumulation, natural-log lse, GQA without repeating k/v, and memory O(chunk * S) by computing
query chunks one after another with rematerialisation, so that it runs (and differentiates) at 32k tokens on a laptop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax._checks import check_qkv, default_scale
from hyperattn_jax._layout import (
    group_queries,
    heads_major,
    merge_query_chunks,
    split_query_chunks,
    ungroup_lse,
    ungroup_output,
)
from hyperattn_jax._numerics import finite_or_zero, masked_logsumexp

DEFAULT_QUERY_CHUNK = 1024


def accumulation_dtype(dtype):
    """float64 inputs (x64 tests) keep float64; everything narrower accumulates in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _attend_chunk(q_chunk, k, v, q_start, *, scale, causal, kv_length):
    """Exact attention of one query chunk. q_chunk [B,K,G,C,H]; k, v [B,K,S,H] -> out [B,K,G,C,H], lse [B,K,G,C]."""
    acc = accumulation_dtype(q_chunk.dtype)
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_chunk.astype(acc), k.astype(acc)) * scale
    key_pos = jnp.arange(k.shape[2])
    allowed = jnp.ones(s.shape[-2:], bool)
    if causal:
        query_pos = q_start + jnp.arange(q_chunk.shape[3])
        allowed = key_pos[None, :] <= query_pos[:, None]
    allowed = allowed[None, None, None]
    if kv_length is not None:
        allowed = allowed & (key_pos < kv_length[:, None, None, None, None])
    s = jnp.where(allowed, s, -jnp.inf)
    lse = masked_logsumexp(s)
    p = jnp.exp(s - finite_or_zero(lse)[..., None])
    return jnp.einsum("bkgqs,bksh->bkgqh", p, v.astype(acc)), lse


def grouped_exact_attention(q, k, v, *, scale, causal=False, kv_length=None, query_chunk=DEFAULT_QUERY_CHUNK):
    """Exact attention in the grouped layout: q `[B, K, G, T, H]`, k, v `[B, K, S, H]`.

    Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]` in the accumulation dtype (float32 or float64).
    """
    t = q.shape[3]

    def attend(q_chunk, start):
        return _attend_chunk(q_chunk, k, v, start, scale=scale, causal=causal, kv_length=kv_length)

    # Rematerialise each chunk's probabilities in the backward pass, so memory stays O(query_chunk * S).
    attend = jax.checkpoint(attend)
    if t <= query_chunk:
        return attend(q, 0)
    chunks = split_query_chunks(q, query_chunk)
    starts = jnp.arange(chunks.shape[0]) * query_chunk
    out, lse = jax.lax.map(lambda args: attend(*args), (chunks, starts))
    return merge_query_chunks(out, t), merge_query_chunks(lse, t)


def exact_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    kv_length=None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
):
    """Exact softmax attention in `jax.nn` layout, with float32 accumulation.

    Args:
      q: queries `[B, T, N, H]`.
      k: keys `[B, S, K, H]`, N % K == 0 (GQA/MQA share each kv head among N // K query heads).
      v: values `[B, S, K, H]`.
      causal: query i attends keys j <= i (T must equal S).
      scale: softmax scale, default `1 / sqrt(H)`.
      return_lse: also return the natural-log row normaliser `[B, N, T]` (float32, float64 for float64 inputs).
      kv_length: optional int `[B]`: keys at positions >= kv_length[b] are padding and get zero probability.
      query_chunk: queries processed at once; memory is O(query_chunk * S).

    Returns:
      out `[B, T, N, H]` in q's dtype, and lse `[B, N, T]` if `return_lse`.

    >>> q = k = v = jnp.ones((1, 8, 2, 4))
    >>> exact_attention(q, k, v, causal=True).shape
    (1, 8, 2, 4)
    """
    check_qkv(q, k, v, causal=causal)
    scale = default_scale(q.shape[-1], scale)
    out, lse = grouped_exact_attention(
        group_queries(q, k.shape[2]),
        heads_major(k),
        heads_major(v),
        scale=scale,
        causal=causal,
        kv_length=kv_length,
        query_chunk=query_chunk,
    )
    out = ungroup_output(out).astype(q.dtype)
    return (out, ungroup_lse(lse)) if return_lse else out
