"""The estimate: blocked queries attend a list of key tiles in one softmax with per-key log-weights.

`tiled_attention` is the readable twin of every fused attention kernel: a query block attends, in one online
softmax, to its sortLSH key block, the global keys and the sampled residual keys. `grouped_hyper_attention` is
non-causal HyperAttention (plan -> tiles -> estimate); `noncausal_attention` adds the one rule for exactness.
"""

from __future__ import annotations

import jax.numpy as jnp

from hyperattn_jax._numerics import finite_or_zero, masked_logsumexp
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.merge import merge_partials
from hyperattn_jax.ops.plan import SortLSHPlan, make_plan
from hyperattn_jax.ops.tiles import (
    KeyTile,
    block_diagonal_tile,
    block_query_layout,
    global_key_tile,
    hyper_attention_tiles,
    sampled_residual_tile,
    unblock_query_layout,
)


def tiled_attention(q_blocks, tiles: list[KeyTile] | tuple[KeyTile, ...], *, scale: float):
    """Attention of blocked queries over a list of key tiles, in one softmax.

    Args:
      q_blocks: `[B, K, G, nb, bq, H]` (G query heads per kv head, nb query blocks of bq queries).
      tiles: key tiles, see `KeyTile`.
      scale: softmax scale.

    Returns:
      out `[B, K, G, nb, bq, H]` float32 and lse `[B, K, G, nb, bq]` float32 (natural log, log-weights included).
    """
    acc = jnp.promote_types(q_blocks.dtype, jnp.float32)
    scores, values = [], []
    nb = q_blocks.shape[3]
    for tile in tiles:
        s = jnp.einsum("bkgnqh,bknth->bkgnqt", q_blocks, tile.k, preferred_element_type=acc) * scale
        log_weight = jnp.broadcast_to(tile.log_weight, (*tile.k.shape[:2], nb, tile.k.shape[3]))
        scores.append(s + log_weight[:, :, None, :, None, :].astype(acc))
        values.append(tile.v)
    s = jnp.concatenate(scores, axis=-1)
    lse = masked_logsumexp(s)
    p = jnp.exp(s - finite_or_zero(lse)[..., None])
    out = 0.0
    start = 0
    for v in values:
        width = v.shape[3]
        out = out + jnp.einsum("bkgnqt,bknth->bkgnqh", p[..., start : start + width], v.astype(acc))
        start += width
    return out, lse


def attend_tiles(q, tiles, plan: SortLSHPlan, *, scale: float, kernel=tiled_attention):
    """Queries `[B, K, G, T, H]` attend `tiles` in the plan's blocked order: out and lse in original query order.
    `kernel(q_blocks, tiles, scale=)` -> (out, lse): `tiled_attention` or a backend's kernel with the same contract."""
    out, lse = kernel(block_query_layout(q, plan), tiles, scale=scale)
    t = q.shape[3]
    out = unblock_query_layout(out, plan, t)
    lse = unblock_query_layout(lse[..., None], plan, t)[..., 0]
    return out, lse


def block_diagonal_attention(q, k, v, plan: SortLSHPlan, *, scale: float):
    """The sortLSH part alone: out `[B, K, G, T, H]`, lse `[B, K, G, T]` (float32), in original query order."""
    return attend_tiles(q, [block_diagonal_tile(k, v, plan)], plan, scale=scale)


def sampled_residual_attention(q, k, v, plan: SortLSHPlan, *, scale: float):
    """The sampled residual alone (weights S/m, own-block samples excluded), in original query order."""
    if plan.sample_index is None:
        raise ValueError("the plan has no samples (sample_size=0)")
    return attend_tiles(q, [sampled_residual_tile(k, v, plan)], plan, scale=scale)


def grouped_hyper_attention(
    q, k, v, *, key, config: HyperAttentionConfig, scale: float, kv_length=None, hash_key=None, sample_index=None
):
    """Non-causal HyperAttention, grouped layout, fused form (one softmax over block and sample tiles).

    Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32.
    """
    plan = make_plan(
        q,
        k,
        key=key,
        config=config,
        kv_length=kv_length,
        hash_key=hash_key,
        sample_index=sample_index,
        v=v,
        scale=scale,
    )
    return attend_tiles(q, hyper_attention_tiles(k, v, plan), plan, scale=scale)


def grouped_hyper_attention_merged(q, k, v, *, key, config: HyperAttentionConfig, scale: float, kv_length=None):
    """The same estimator as `grouped_hyper_attention`, as two partial attentions merged by lse (readable form)."""
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, v=v, scale=scale)
    out, lse = block_diagonal_attention(q, k, v, plan, scale=scale)
    if plan.num_global:
        out, lse = merge_partials(out, lse, *attend_tiles(q, [global_key_tile(k, v, plan)], plan, scale=scale))
    if plan.sample_index is None:
        return out, lse
    return merge_partials(out, lse, *sampled_residual_attention(q, k, v, plan, scale=scale))


def tiled_attention_backward(q_blocks, tiles, d_out, lse, delta, *, scale: float):
    """The gradients of `tiled_attention` as one part of a merged attention with final `lse` and `delta` (float32
    `[B, K, G, nb, bq]`; delta = rowsum(dO * O) - dlse of the merged output): the twin of every backward kernel.

    With P_ij = w_j e^{s_ij - lse_i} this part's share of the merged softmax: dV_j = sum_i P_ij dO_i, dS_ij =
    P_ij (dO_i . v_j - delta_i), dq_i = scale sum_j dS_ij k_j, dk_j = scale sum_i dS_ij q_i. Returns dq `[B, K, G, nb,
    bq, H]` and [(dk, dv)] per tile, shaped as its k, v, all float32.
    """
    f32 = jnp.float32
    q, do = q_blocks.astype(f32), d_out.astype(f32)
    lse, delta = finite_or_zero(lse)[..., None], delta.astype(f32)[..., None]
    nb = q_blocks.shape[3]
    dq, tile_grads = 0.0, []
    for tile in tiles:
        k, v = tile.k.astype(f32), tile.v.astype(f32)
        log_weight = jnp.broadcast_to(tile.log_weight, (*tile.k.shape[:2], nb, tile.k.shape[3]))[:, :, None, :, None]
        p = jnp.exp(jnp.einsum("bkgnqh,bknth->bkgnqt", q, k) * scale + log_weight - lse)
        ds = p * (jnp.einsum("bkgnqh,bknth->bkgnqt", do, v) - delta)
        dq = dq + scale * jnp.einsum("bkgnqt,bknth->bkgnqh", ds, k)
        shared = tile.k.shape[2] == 1 < nb  # one tile for every query block: sum over the blocks too
        spec = "bkgnqt,bkgnqh->bkth" if shared else "bkgnqt,bkgnqh->bknth"
        dk, dv = scale * jnp.einsum(spec, ds, q), jnp.einsum(spec, p, do)
        tile_grads.append((dk[:, :, None] if shared else dk, dv[:, :, None] if shared else dv))
    return dq, tile_grads
