"""Public `[B, T, N, H]` layout <-> the grouped layout used inside: queries `[B, K, G, T, H]`, keys `[B, K, S, H]`.

Query head n uses kv head n // G (G = N // K), as in `jax.nn.dot_product_attention`; grouping the query heads under
their kv head lets GQA/MQA run without materialising repeated keys and values.
"""

from __future__ import annotations

import jax.numpy as jnp


def group_queries(q, num_kv_heads: int):
    """q `[B, T, N, H]` -> `[B, K, G, T, H]`."""
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h).transpose(0, 2, 3, 1, 4)


def heads_major(kv):
    """k or v `[B, S, K, H]` -> `[B, K, S, H]`."""
    return kv.transpose(0, 2, 1, 3)


def ungroup_output(out):
    """`[B, K, G, T, H]` -> `[B, T, N, H]`."""
    b, kv_heads, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


def ungroup_lse(lse):
    """`[B, K, G, T]` -> `[B, N, T]`."""
    b, kv_heads, g, t = lse.shape
    return lse.reshape(b, kv_heads * g, t)


def split_query_chunks(x, chunk: int):
    """Axis 3 (queries) of `[B, K, G, T, ...]` -> leading chunks `[num_chunks, B, K, G, chunk, ...]`, zero-padded."""
    t = x.shape[3]
    num_chunks = -(-t // chunk)
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, num_chunks * chunk - t)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(*x.shape[:3], num_chunks, chunk, *x.shape[4:]), 3, 0)


def merge_query_chunks(chunks, num_queries: int):
    """Inverse of `split_query_chunks`: `[num_chunks, B, K, G, chunk, ...]` -> `[B, K, G, T, ...]`."""
    x = jnp.moveaxis(chunks, 0, 3)
    return x.reshape(*x.shape[:3], -1, *x.shape[5:])[:, :, :, :num_queries]
