"""Non-causal HyperAttention in pure jnp: sortLSH block-diagonal attention plus a uniformly sampled residual.

Everything here works in the grouped layout (queries `[B, K, G, T, H]`, keys `[B, K, S, H]`, see `_layout.py`).
The hash order and the samples are drawn once into a `SortLSHPlan`; given the plan, the estimator is a smooth
function of q, k, v and `jax.grad` of it is exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.lsh import lsh_projections, lsh_rank
from hyperattn_jax.ops.sorting import SortOrder, sort_order, sort_rows, unsort_rows
from hyperattn_jax.ops.tiles import KeyTile, merge_partials, tiled_attention


class SortLSHPlan(NamedTuple):
    """The random, piecewise-constant part of HyperAttention for one call (treated as constants by gradients).

    query_order: sort of queries `[B, K, G, T]` by LSH rank; key_order: of keys `[B, K, S]`.
    num_blocks: nb; query_block: queries per block (bq = ceil(T / nb)); key_block: keys per block (b).
    sample_index: int32 `[B, K, m]` uniform key indices (with replacement), or None when sampling is off.
    num_valid_keys: float32 `[B]`, the real key count S (per batch element when kv_length is given).
    """

    query_order: SortOrder
    key_order: SortOrder
    num_blocks: int
    query_block: int
    key_block: int
    sample_index: jax.Array | None
    num_valid_keys: jax.Array


def make_plan(q, k, *, key, config: HyperAttentionConfig, kv_length=None, hash_key=None) -> SortLSHPlan:
    """Hash queries `[B, K, G, T, H]` and keys `[B, K, S, H]`, sort them, and draw the residual samples.

    `hash_key`, when given, draws the LSH hyperplanes (e.g. fixed per layer, as in the paper's code) and `key` only the
    samples; otherwise both come from `key`.
    """
    batch, kv_heads, _, t, head_dim = q.shape
    s = k.shape[2]
    own_hash_key, sample_key = jax.random.split(key)
    hash_key = own_hash_key if hash_key is None else hash_key
    projections = lsh_projections(hash_key, head_dim, config.num_projections)
    key_rank = lsh_rank(k, projections)
    if kv_length is None:
        num_valid = jnp.full((batch,), s, jnp.int32)
    else:
        num_valid = jnp.clip(kv_length.astype(jnp.int32), 1, s)
        # Padding keys get a rank past every bucket, so they sort to the end and fill the last blocks.
        key_rank = jnp.where(jnp.arange(s) < num_valid[:, None, None], key_rank, config.num_buckets)
    query_order = sort_order(lsh_rank(q, projections), config.num_buckets)
    key_order = sort_order(key_rank, config.num_buckets + 1)
    num_blocks = -(-s // config.block_size)
    sample_index = None
    if config.sample_size > 0:
        sample_index = jax.random.randint(
            sample_key, (batch, kv_heads, config.sample_size), 0, num_valid[:, None, None], dtype=jnp.int32
        )
    return SortLSHPlan(
        query_order=query_order,
        key_order=key_order,
        num_blocks=num_blocks,
        query_block=-(-t // num_blocks),
        key_block=config.block_size,
        sample_index=sample_index,
        num_valid_keys=num_valid.astype(jnp.float32),
    )


def _pad_axis(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def block_query_layout(q, plan: SortLSHPlan):
    """Queries sorted and cut into blocks: `[B, K, G, T, H]` -> `[B, K, G, nb, bq, H]` (zero rows pad the end)."""
    q_sorted = _pad_axis(sort_rows(q, plan.query_order), 3, plan.num_blocks * plan.query_block)
    return q_sorted.reshape(*q.shape[:3], plan.num_blocks, plan.query_block, q.shape[-1])


def unblock_query_layout(x_blocks, plan: SortLSHPlan, num_queries: int):
    """Inverse of `block_query_layout` for outputs `[B, K, G, nb, bq, H]` -> `[B, K, G, T, H]`."""
    x = x_blocks.reshape(*x_blocks.shape[:3], -1, x_blocks.shape[-1])[..., :num_queries, :]
    return unsort_rows(x, plan.query_order)


def block_diagonal_tile(k, v, plan: SortLSHPlan) -> KeyTile:
    """The sortLSH key tile: sorted key block i for query block i; padding keys get log-weight -inf."""
    padded = plan.num_blocks * plan.key_block
    shape = (*k.shape[:2], plan.num_blocks, plan.key_block, k.shape[-1])
    k_blocks = _pad_axis(sort_rows(k, plan.key_order), 2, padded).reshape(shape)
    v_blocks = _pad_axis(sort_rows(v, plan.key_order), 2, padded).reshape(shape)
    is_real = jnp.arange(padded) < plan.num_valid_keys[:, None]  # valid keys sort first, padding last
    log_weight = jnp.where(is_real, 0.0, -jnp.inf).reshape(-1, 1, plan.num_blocks, plan.key_block)
    return KeyTile(k_blocks, v_blocks, log_weight)


def sampled_residual_tile(k, v, plan: SortLSHPlan) -> KeyTile:
    """The residual tile: m sampled keys shared by all query blocks, weight S/m, excluded from their own block."""
    index = plan.sample_index
    k_sampled = jnp.take_along_axis(k, index[..., None], axis=2)[:, :, None]
    v_sampled = jnp.take_along_axis(v, index[..., None], axis=2)[:, :, None]
    sample_block = jnp.take_along_axis(plan.key_order.inverse, index, axis=2) // plan.key_block  # [B, K, m]
    in_own_block = sample_block[:, :, None, :] == jnp.arange(plan.num_blocks)[:, None]  # [B, K, nb, m]
    log_weight = jnp.log(plan.num_valid_keys / index.shape[-1])[:, None, None, None]
    return KeyTile(k_sampled, v_sampled, jnp.where(in_own_block, -jnp.inf, log_weight))


def hyper_attention_tiles(k, v, plan: SortLSHPlan) -> list[KeyTile]:
    """Every key tile of non-causal HyperAttention under `plan`."""
    tiles = [block_diagonal_tile(k, v, plan)]
    if plan.sample_index is not None:
        tiles.append(sampled_residual_tile(k, v, plan))
    return tiles


def block_diagonal_attention(q, k, v, plan: SortLSHPlan, *, scale: float):
    """The sortLSH part alone: out `[B, K, G, T, H]`, lse `[B, K, G, T]` (float32), in original query order."""
    return _attend_tiles(q, [block_diagonal_tile(k, v, plan)], plan, scale=scale)


def sampled_residual_attention(q, k, v, plan: SortLSHPlan, *, scale: float):
    """The sampled residual alone (weights S/m, own-block samples excluded), in original query order."""
    if plan.sample_index is None:
        raise ValueError("the plan has no samples (sample_size=0)")
    return _attend_tiles(q, [sampled_residual_tile(k, v, plan)], plan, scale=scale)


def _attend_tiles(q, tiles, plan, *, scale):
    out, lse = tiled_attention(block_query_layout(q, plan), tiles, scale=scale)
    t = q.shape[3]
    out = unblock_query_layout(out, plan, t)
    lse = unblock_query_layout(lse[..., None], plan, t)[..., 0]
    return out, lse


def grouped_hyper_attention(q, k, v, *, key, config: HyperAttentionConfig, scale: float, kv_length=None, hash_key=None):
    """Non-causal HyperAttention, grouped layout, fused form (one softmax over block and sample tiles).

    Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32.
    """
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, hash_key=hash_key)
    return _attend_tiles(q, hyper_attention_tiles(k, v, plan), plan, scale=scale)


def grouped_hyper_attention_merged(q, k, v, *, key, config: HyperAttentionConfig, scale: float, kv_length=None):
    """The same estimator as `grouped_hyper_attention`, as two partial attentions merged by lse (readable form)."""
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length)
    out, lse = block_diagonal_attention(q, k, v, plan, scale=scale)
    if plan.sample_index is None:
        return out, lse
    return merge_partials(out, lse, *sampled_residual_attention(q, k, v, plan, scale=scale))

