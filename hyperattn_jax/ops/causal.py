"""Causal HyperAttention by the paper's recursion (Alg. 4), with a static depth, and `grouped_attention`: the one
place that decides between exact attention, the non-causal estimate and the recursion.

Split the sequence in halves: the two diagonal quarters are causal problems of half the size (stacked on the batch
axis, so every problem of one recursion level runs as one batched call), and the lower-left quarter (second-half
queries, first-half keys) is unmasked, so it is a non-causal HyperAttention merged into the lower-right result by lse.

Accuracy options (docs/accuracy.md), both exact parts merged by lse:
- `num_sink_keys` g: the first g keys are taken out before the recursion; every query attends them exactly (query
  i < g causally), and the recursion runs on positions [g, T).
- `local_window` w: every diagonal block reaches w keys further left (`causal_window`). A node of the recursion
  (queries [a, b)) owns keys [a - w, b): its prefix [a - w, a) is visible to all its queries. Its halves are nodes of
  the same form (the second one's prefix is [mid - w, mid), real keys), and its lower-left problem is queries
  [mid, b) over keys [a - w, mid - w): half x half like the paper's, estimated with no window, in the order
  [a, mid - w) then [a - w, a) (the prefix last, where `kv_length` cuts it off for the sequence's first node, whose
  prefix lies before position 0). The base case is each segment's causal attention plus its prefix, exactly. Every
  key before a query is counted once (in one quarter or in its base case), and every query sees its w most recent
  keys exactly; the window keys of far queries fall into smaller quarters further down. With w = 0 this is the
  paper's recursion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.keys import split_level
from hyperattn_jax.ops.merge import merge_partials


def causal_base_length(config: HyperAttentionConfig) -> int:
    """Lengths at or below this are computed exactly.

    Below one block HyperAttention is exact anyway (a single block holds every key), so the recursion also stops there.
    """
    return max(config.min_seq_len, config.block_size, 1)


def quarter_is_exact(num_keys: int, config: HyperAttentionConfig) -> bool:
    """Whether the recursion computes an off-diagonal quarter of `num_keys` keys exactly: when it has fewer than
    `min_seq_len` keys (strictly, the official code's rule). A public call is exact at `num_keys <= min_seq_len`
    (`config.attends_exactly`); inside the recursion the quarter of exactly `min_seq_len` keys, which power-of-two
    lengths always reach at the last level, stays estimated: computing it exactly would double the exact work there.
    """
    return num_keys < config.min_seq_len or num_keys <= config.block_size


def causal_padded_length(t: int, config: HyperAttentionConfig) -> int:
    """The length the recursion runs on: t rounded up so that it halves down to the base case in whole blocks (a
    multiple of 2**levels * block_size). Every backend runs the same problems: the ops recursion and the kernels'
    level-by-level recursions, which need every level's halves to be whole blocks. The appended positions come last,
    where causality hides them from every real query; their outputs are dropped (`pad_positions`)."""
    base = causal_base_length(config)
    if t <= base:
        return t
    levels, segment = 0, t
    while segment > base:
        segment, levels = -(-segment // 2), levels + 1
    unit = config.block_size << levels
    return -(-t // unit) * unit


def pad_positions(x, length: int, *, axis: int):
    """x with zero positions appended along `axis` up to `length` (`causal_padded_length`)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


class AttentionParts(NamedTuple):
    """A backend's pieces in the grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`), each returning out and
    lse `[B, K, G, T]` float32.

    estimate(q, k, v, *, key, config, kv_length): non-causal HyperAttention (keys at positions >= kv_length `[B]`
      are padding; kv_length may be None).
    exact(q, k, v, *, causal, kv_length): exact attention (kv_length only when not causal).
    """

    estimate: Callable
    exact: Callable


def grouped_attention(
    q, k, v, *, key, config: HyperAttentionConfig, causal: bool, parts: AttentionParts, kv_length=None
):
    """HyperAttention in the grouped layout on a backend's `parts`: exact when `config.attends_exactly(S)`, else the
    non-causal estimate or the causal recursion. Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32."""
    if config.attends_exactly(k.shape[2]):
        return parts.exact(q, k, v, causal=causal, kv_length=kv_length)
    if causal:
        return grouped_causal_attention(q, k, v, key=key, config=config, parts=parts)
    return parts.estimate(q, k, v, key=key, config=config, kv_length=kv_length)


def causal_window(config: HyperAttentionConfig) -> int:
    """The recursion's window w: `local_window`, at most half the base length. Segments are longer than half the
    base length, so every quarter of the sequence's first node keeps at least one real key."""
    return min(config.local_window, causal_base_length(config) // 2)


def quarter_config(config: HyperAttentionConfig) -> HyperAttentionConfig:
    """The config the recursion estimates its lower-left quarters with: no sinks (taken out before the recursion), no
    window (the recursion's own), no sample shrinkage (non-causal only: in the quarters it moved perplexity the
    wrong way, results/perplexity_kinds_causal_shrinkage_cpu.json)."""
    return config.replace(num_sink_keys=0, local_window=0, sample_shrinkage=0.0)


def grouped_causal_attention(q, k, v, *, key, config: HyperAttentionConfig, parts: AttentionParts):
    """Causal HyperAttention in the grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, T, H]`) on `parts`: its exact
    causal base case (each segment with its prefix) and, for each level's lower-left quarter, its estimate (exact
    where `quarter_is_exact`). Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32.
    """

    def exact_fn(q, k, v):
        return parts.exact(q, k, v, causal=True, kv_length=None)

    num_sinks = config.num_sink_keys
    window = causal_window(config)
    quarters = quarter_config(config)

    def off_diagonal(q, k, v, key, kv_length):
        """Second-half queries over keys [a - w, mid - w) (the prefix last): the non-causal estimate."""
        if quarter_is_exact(k.shape[2], config):
            return parts.exact(q, k, v, causal=False, kv_length=kv_length)
        return parts.estimate(q, k, v, key=key, config=quarters, kv_length=kv_length)

    def base_case(q, k_ext, v_ext, has_prefix):
        own = exact_fn(q, k_ext[:, :, window:], v_ext[:, :, window:])
        if not window:
            return own
        out, lse = parts.exact(q, k_ext[:, :, :window], v_ext[:, :, :window], causal=False, kv_length=None)
        out = jnp.where(has_prefix[:, None, None, None, None], out, 0.0)
        lse = jnp.where(has_prefix[:, None, None, None], lse, -jnp.inf)  # the first node's prefix is padding
        return merge_partials(*own, out, lse)

    def recurse(q, k_ext, v_ext, has_prefix, key):
        """q `[B', K, G, T', H]`; k_ext, v_ext `[B', K, w + T', H]` (the node's prefix first); has_prefix `[B']`."""
        t = q.shape[3]
        if t <= causal_base_length(config):
            return base_case(q, k_ext, v_ext, has_prefix)
        if t % 2:  # only where min_seq_len is not a multiple of the block size (`causal_padded_length`)
            # One extra position at the end: causality hides it from every real query, and its own output is dropped.
            padded = (
                pad_positions(q, t + 1, axis=3),
                *(pad_positions(x, window + t + 1, axis=2) for x in (k_ext, v_ext)),
            )
            out, lse = recurse(*padded, has_prefix, key)
            return out[..., :t, :], lse[..., :t]
        half = t // 2
        batch = q.shape[0]
        key_off_diagonal, key_deeper = split_level(key)
        diag_out, diag_lse = recurse(
            jnp.concatenate([q[..., :half, :], q[..., half:, :]], axis=0),
            jnp.concatenate([k_ext[:, :, : window + half], k_ext[:, :, half:]], axis=0),
            jnp.concatenate([v_ext[:, :, : window + half], v_ext[:, :, half:]], axis=0),
            jnp.concatenate([has_prefix, jnp.ones_like(has_prefix)]),  # the second half's prefix is real keys
            key_deeper,
        )
        k_low, v_low = (jnp.concatenate([x[:, :, window:half], x[:, :, :window]], axis=2) for x in (k_ext, v_ext))
        kv_length = jnp.where(has_prefix, half, half - window).astype(jnp.int32) if window else None
        low_out, low_lse = off_diagonal(q[..., half:, :], k_low, v_low, key_off_diagonal, kv_length)
        second_out, second_lse = merge_partials(diag_out[batch:], diag_lse[batch:], low_out, low_lse)
        out = jnp.concatenate([diag_out[:batch], second_out], axis=3)
        lse = jnp.concatenate([diag_lse[:batch], second_lse], axis=3)
        return out, lse

    def padded_recursion(q, k, v):
        t, length = q.shape[3], causal_padded_length(q.shape[3], config)
        if t <= causal_base_length(config):
            return exact_fn(q, k, v)
        prefix = [(0, 0), (0, 0), (window, 0), (0, 0)]  # the first node's prefix: padding before position 0
        k_ext, v_ext = (jnp.pad(pad_positions(x, length, axis=2), prefix) for x in (k, v))
        has_prefix = jnp.zeros((q.shape[0],), bool)
        out, lse = recurse(pad_positions(q, length, axis=3), k_ext, v_ext, has_prefix, key)
        return out[..., :t, :], lse[..., :t]

    t = q.shape[3]
    if not num_sinks or t <= causal_base_length(config):
        return padded_recursion(q, k, v)
    g = min(num_sinks, t)
    # Queries before g see only sinks (causally); the rest see all g sinks exactly plus the recursion on [g, T).
    head_out, head_lse = exact_fn(q[..., :g, :], k[:, :, :g], v[:, :, :g])
    if g == t:
        return head_out, head_lse
    sink = parts.exact(q[..., g:, :], k[:, :, :g], v[:, :, :g], causal=False, kv_length=None)
    rest = padded_recursion(without_sinks(q, g, axis=3), without_sinks(k, g, axis=2), without_sinks(v, g, axis=2))
    return with_sinks((head_out, head_lse), sink, rest)


def without_sinks(x, g: int, *, axis: int):
    """Positions [g, T) of x shifted to the front along `axis` and g zero positions appended: the recursion's input
    once the g sinks are taken out. Same length T, so the recursion keeps the paper's problem sizes (the same quarters
    are exact or estimated), and causality hides the appended keys from every real query."""
    return pad_positions(jax.lax.slice_in_dim(x, g, x.shape[axis], axis=axis), x.shape[axis], axis=axis)


def with_sinks(head, sink, rest):
    """The causal result over all T positions (grouped layout) from its parts, each (out `[B, K, G, L, H]`, lse
    `[B, K, G, L]`): `head`, queries [0, g) over the g sinks (causal); `sink`, queries [g, T) over the sinks; `rest`,
    the recursion on `without_sinks` inputs (its last g positions are the appended ones, dropped)."""
    tail = sink[0].shape[3]
    tail_out, tail_lse = merge_partials(*sink, rest[0][..., :tail, :], rest[1][..., :tail])
    return jnp.concatenate([head[0], tail_out], axis=3), jnp.concatenate([head[1], tail_lse], axis=3)


# The recursion level by level: level l (0 = top) has 2**l chunks of T / 2**l positions; its lower-left problems
# (second-half queries of every chunk over its first half's keys shifted left by the window) run as one call,
# stacked on the batch axis in the order the recursion stacks them (chunk index bit-reversed); the base case is every
# segment's causal attention plus, for every segment but the first, its prefix (`prefix_problem`). Backends that run
# the levels themselves (the fused GPU recursion, the TPU kernels) use these to make the same problems, keys and
# merges as `grouped_causal_attention`.


def level_shape(t: int, config: HyperAttentionConfig) -> tuple[int, int] | None:
    """(levels, base segment length) of the recursion over t positions (a `causal_padded_length`) when it can run
    level by level: every length on the way down even, at least one level. Else None. With sinks, the recursion runs
    on `without_sinks` inputs of the same length t (`with_sinks` puts the parts together)."""
    depth, segment = 0, t
    while segment > causal_base_length(config):
        if segment % 2:
            return None
        segment //= 2
        depth += 1
    return (depth, segment) if depth else None


def _bit_reverse_chunks(x, axis: int, bits: int):
    """Reorder a 2**bits axis by bit reversal (an involution), as a transpose of its binary digits (XLA fuses it)."""
    if bits <= 1:
        return x
    shape = x.shape
    x = x.reshape(*shape[:axis], *([2] * bits), *shape[axis + 1 :])
    order = [*range(axis), *reversed(range(axis, axis + bits)), *range(axis + bits, x.ndim)]
    return x.transpose(order).reshape(shape)


def level_rows(x, which: int, level: int):
    """Rows of x `[B, ..., T, H]`: half `which` (0 first, 1 second) of every one of the 2**level chunks, stacked as
    `[chunks * B, ..., half, H]` in the recursion's batch order."""
    batch, lead, h = x.shape[0], x.shape[1:-2], x.shape[-1]
    chunks = 2**level
    half = x.shape[-2] // chunks // 2
    x = x.reshape(batch, *lead, chunks, 2, half, h)[..., which, :, :]
    x = _bit_reverse_chunks(x, x.ndim - 3, level)
    return jnp.moveaxis(x, x.ndim - 3, 0).reshape(chunks * batch, *lead, half, h)


def shifted_level_rows(x, level: int, window: int):
    """Key rows of a level's lower-left problems, x `[B, ..., T, H]` -> `[C * B, ..., half, H]` in `level_rows`'
    order: chunk [a, b) with midpoint mid gets keys [a, mid - w) then its prefix [a - w, a), as
    `grouped_causal_attention` orders them. The first chunk's prefix wraps around to rows [T - w, T): real rows,
    which its `level_kv_length` cuts off."""
    if not window:
        return level_rows(x, 0, level)
    return jnp.roll(level_rows(jnp.roll(x, window, axis=-2), 0, level), -window, axis=-2)


def level_kv_length(batch: int, level: int, half: int, window: int):
    """The level's kv_length `[C * B]` int32: half keys, half - w for the first chunk's problems (the first B in
    `level_rows`' order), whose prefix lies before position 0. None without a window."""
    if not window:
        return None
    return jnp.full((batch << level,), half, jnp.int32).at[:batch].set(half - window)


def level_problem(q, k, v, level: int, window: int):
    """The lower-left problems of a level: q `[B, K, G, T, H]` -> `[C * B, K, G, T / 2C, H]`, k, v likewise (keys
    shifted by the window, `shifted_level_rows`)."""
    return level_rows(q, 1, level), shifted_level_rows(k, level, window), shifted_level_rows(v, level, window)


def segment_rows(x, segment: int):
    """x `[B, ..., T, H]` cut into its T / segment segments, stacked chunk-major: `[C * B, ..., segment, H]`."""
    batch, lead, h = x.shape[0], x.shape[1:-2], x.shape[-1]
    x = x.reshape(batch, *lead, -1, segment, h)
    return jnp.moveaxis(x, x.ndim - 3, 0).reshape(-1, *lead, segment, h)


def unsegment_rows(x, batch: int):
    """Inverse of `segment_rows` (for any number of segments): `[C * B, ..., segment, *rest]` -> `[B, ...,
    C * segment, *rest]`, where `...` is the 3 axes K, G and segment is axis 3."""
    x = jnp.moveaxis(x.reshape(-1, batch, *x.shape[1:]), 0, 3)  # [B, K, G, C, segment, *rest]
    return x.reshape(*x.shape[:3], -1, *x.shape[5:])


def prefix_problem(q, k, v, segment: int, window: int):
    """The base case's prefix problems: every segment but the first over the w keys before it (`window` > 0).
    q `[B, K, G, T, H]` -> `[(C - 1) * B, K, G, segment, H]`, k, v -> `[(C - 1) * B, K, w, H]`, segment-major."""
    batch = q.shape[0]
    keys = (segment_rows(jnp.roll(x, window, axis=-2), segment)[batch:, ..., :window, :] for x in (k, v))
    return segment_rows(q, segment)[batch:], *keys


def merge_prefix(out, lse, part_out, part_lse, segment: int):
    """out `[B, K, G, T, H]`, lse `[B, K, G, T]` with the prefix problems' part (`prefix_problem` order) merged by
    lse into positions [segment, T)."""
    batch = out.shape[0]
    merged_out, merged_lse = merge_partials(
        out[..., segment:, :], lse[..., segment:], unsegment_rows(part_out, batch), unsegment_rows(part_lse, batch)
    )
    return out.at[..., segment:, :].set(merged_out), lse.at[..., segment:].set(merged_lse)


def stack_level_problems(x, level: int):
    """`[B, C, ...]` per chunk (C = 2**level, in sequence order) -> `[C * B, ...]` in `level_rows`' problem order."""
    x = _bit_reverse_chunks(x, 1, level)
    return jnp.moveaxis(x, 1, 0).reshape(-1, *x.shape[2:])


def merge_level(out, lse, part_out, part_lse, level: int):
    """out `[B, K, G, T, H]`, lse `[B, K, G, T]` with a level's lower-left part (`[C * B, K, G, half, H]`, lse
    `[C * B, K, G, half]`, problems in `level_rows`' order) merged by lse into every chunk's second half, as the
    recursion merges it (the result so far first)."""
    chunks = 2**level

    def by_chunk(x):  # [B, K, G, T, rest] -> [B, K, G, C, 2, half, rest]
        return x.reshape(*x.shape[:3], chunks, 2, -1, *x.shape[4:])

    def unstack(x):  # [C * B, K, G, half, rest] -> [B, K, G, C, half, rest], chunks in sequence order
        return jnp.moveaxis(_bit_reverse_chunks(x.reshape(chunks, -1, *x.shape[1:]), 0, level), 0, 3)

    out6, lse5 = by_chunk(out), by_chunk(lse[..., None])[..., 0]
    merged_out, merged_lse = merge_partials(
        out6[..., 1, :, :], lse5[..., 1, :], unstack(part_out), unstack(part_lse[..., None])[..., 0]
    )
    out6 = out6.at[..., 1, :, :].set(merged_out)
    lse5 = lse5.at[..., 1, :].set(merged_lse)
    return out6.reshape(out.shape), lse5.reshape(lse.shape)
