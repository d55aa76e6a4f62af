"""Causal HyperAttention by the paper's recursion (Alg. 4), with a static depth.

Split the sequence in halves: the two diagonal quarters are causal problems of half the size (stacked on the batch
axis, so every problem of one recursion level runs as one batched call), and the lower-left quarter (second-half
queries, first-half keys) is unmasked, so it is a non-causal HyperAttention merged into the lower-right result by lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.tiles import merge_partials
from hyperattn_jax.reference import grouped_exact_attention


def causal_base_length(config: HyperAttentionConfig) -> int:
    """Lengths at or below this are computed exactly.

    Below one block HyperAttention is exact anyway (a single block holds every key), so the recursion also stops there.
    """
    return max(config.min_seq_len, config.block_size, 1)


def noncausal_is_exact(num_keys: int, config: HyperAttentionConfig) -> bool:
    """Whether non-causal attention over `num_keys` keys falls back to exact.

    The official implementation computes non-causal attention exactly when S < min_seq_len (strictly), so with a
    power-of-two length the last recursion level's lower-left quarter (S == min_seq_len) is still approximated.
    """
    return num_keys < config.min_seq_len or num_keys <= config.block_size


def grouped_causal_attention(q, k, v, *, key, config: HyperAttentionConfig, scale: float, noncausal_fn, exact_fn=None):
    """Causal HyperAttention in the grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, T, H]`).

    `noncausal_fn(q, k, v, key=...)` computes each level's lower-left quarter; `exact_fn(q, k, v)` the exact causal
    base case (default: the chunked jnp reference). Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32.
    """
    if exact_fn is None:

        def exact_fn(q, k, v):
            return grouped_exact_attention(q, k, v, scale=scale, causal=True)

    def recurse(q, k, v, key):
        t = q.shape[3]
        if t <= causal_base_length(config):
            return exact_fn(q, k, v)
        if t % 2:
            # One extra position at the end: causality hides it from every real query, and its own output is dropped.
            pad = ((0, 0), (0, 0), (0, 1), (0, 0))
            out, lse = recurse(jnp.pad(q, ((0, 0), *pad)), jnp.pad(k, pad), jnp.pad(v, pad), key)
            return out[..., :t, :], lse[..., :t]
        half = t // 2
        batch = q.shape[0]
        key_off_diagonal, key_deeper = jax.random.split(key)
        diag_out, diag_lse = recurse(
            jnp.concatenate([q[..., :half, :], q[..., half:, :]], axis=0),
            jnp.concatenate([k[:, :, :half], k[:, :, half:]], axis=0),
            jnp.concatenate([v[:, :, :half], v[:, :, half:]], axis=0),
            key_deeper,
        )
        low_out, low_lse = noncausal_fn(q[..., half:, :], k[:, :, :half], v[:, :, :half], key=key_off_diagonal)
        second_out, second_lse = merge_partials(diag_out[batch:], diag_lse[batch:], low_out, low_lse)
        out = jnp.concatenate([diag_out[:batch], second_out], axis=3)
        lse = jnp.concatenate([diag_lse[:batch], second_lse], axis=3)
        return out, lse

    return recurse(q, k, v, key)
