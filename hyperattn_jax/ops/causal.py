"""Causal HyperAttention by the paper's recursion (Alg. 4), with a static depth.

Split the sequence in halves: the two diagonal quarters are causal problems of half the size (stacked on the batch
axis, so every problem of one recursion level runs as one batched call), and the lower-left quarter (second-half
queries, first-half keys) is unmasked, so it is a non-causal HyperAttention merged into the lower-right result by lse.

Accuracy options (docs/accuracy.md), both expressed as one more exactly attended key tile merged by lse:
- `num_sink_keys` g: the first g keys are taken out before the recursion; every query attends them exactly (query
  i < g causally), and the recursion runs on positions [g, T).
- `local_window` w: in each lower-left quarter the last w keys of the first half (the w keys just before the
  boundary) are attended exactly by every second-half query and masked out of the non-causal estimate (as padding,
  `kv_length = half - w`). Every query then sees its w most recent keys exactly: the base case covers its own chunk,
  and the keys just before its chunk are always the boundary keys of the quarter that contains them.
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

    `noncausal_fn(q, k, v, key=..., kv_length=None)` computes each level's lower-left quarter (keys at positions
    >= kv_length are padding); when sinks are on it is also passed `config=` (the config without sinks, which the
    recursion has taken out). `exact_fn(q, k, v)` is the exact causal base case (default: the chunked jnp reference).
    Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32.
    """
    if exact_fn is None:

        def exact_fn(q, k, v):
            return grouped_exact_attention(q, k, v, scale=scale, causal=True)

    num_sinks = config.num_sink_keys
    noncausal_options = {}
    if num_sinks:
        noncausal_options = {"config": config.replace(num_sink_keys=0)}

    def off_diagonal(q, k, v, key):
        """Second-half queries over first-half keys: the non-causal estimate plus the exact recent-key window."""
        half = k.shape[2]
        window = min(config.local_window, half)
        if not window:
            return noncausal_fn(q, k, v, key=key, **noncausal_options)
        # Few keys: one unchunked call (the default query chunking would run T / 1024 small steps one after another).
        recent = grouped_exact_attention(
            q, k[:, :, half - window :], v[:, :, half - window :], scale=scale, query_chunk=q.shape[3]
        )
        if window == half:
            return recent
        kv_length = jnp.full((q.shape[0],), half - window, jnp.int32)
        estimate = noncausal_fn(q, k, v, key=key, kv_length=kv_length, **noncausal_options)
        return merge_partials(*estimate, *recent)

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
        low_out, low_lse = off_diagonal(q[..., half:, :], k[:, :, :half], v[:, :, :half], key_off_diagonal)
        second_out, second_lse = merge_partials(diag_out[batch:], diag_lse[batch:], low_out, low_lse)
        out = jnp.concatenate([diag_out[:batch], second_out], axis=3)
        lse = jnp.concatenate([diag_lse[:batch], second_lse], axis=3)
        return out, lse

    t = q.shape[3]
    if not num_sinks or t <= causal_base_length(config):
        return recurse(q, k, v, key)
    g = min(num_sinks, t)
    # Queries before g see only sinks (causally); the rest see all g sinks exactly plus the recursion on [g, T).
    head_out, head_lse = exact_fn(q[..., :g, :], k[:, :, :g], v[:, :, :g])
    if g == t:
        return head_out, head_lse
    sink_out, sink_lse = grouped_exact_attention(
        q[..., g:, :], k[:, :, :g], v[:, :, :g], scale=scale, query_chunk=max(t - g, 1)
    )
    # Positions [g, T) shifted to the front and g masked positions appended: the recursion keeps the paper's problem
    # sizes (so the same quarters are exact or estimated), and causality hides the appended keys from real queries.
    pad = ((0, 0), (0, 0), (0, g), (0, 0))
    rest_out, rest_lse = recurse(
        jnp.pad(q[..., g:, :], ((0, 0), *pad)), jnp.pad(k[:, :, g:], pad), jnp.pad(v[:, :, g:], pad), key
    )
    rest_out, rest_lse = rest_out[..., : t - g, :], rest_lse[..., : t - g]
    tail_out, tail_lse = merge_partials(sink_out, sink_lse, rest_out, rest_lse)
    return jnp.concatenate([head_out, tail_out], axis=3), jnp.concatenate([head_lse, tail_lse], axis=3)
