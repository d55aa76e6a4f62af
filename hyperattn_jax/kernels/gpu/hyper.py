"""HyperAttention on the fused Pallas Triton kernels, grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`).

The plan (LSH hash, int32 packed-key sort, samples) and the tiles come from `ops`, unchanged, so any tile kind the
jnp path has (sorted blocks, sampled residual, global keys) runs here too; only the attention over the tiles is the
fused kernel instead of `ops.tiled_attention`. The forward gathers rows by index inside the kernel where the shapes
allow (`gathered.py`) and keeps only the plan, out and lse; the backward gathers the sorted blocks again and runs the
backward kernels with the output's lse and delta (`estimate_backward`), which is also how the causal recursion
(`causal.py`) differentiates each of its levels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu._common import MIN_DOT
from hyperattn_jax.kernels.gpu.gathered import gathered_tiled_forward
from hyperattn_jax.kernels.gpu.tiled_attention import (
    TiledKernelConfig,
    fused_tiled_attention,
    fused_tiled_attention_backward,
)
from hyperattn_jax.ops.sortlsh import block_query_layout, hyper_attention_tiles, make_plan, unblock_query_layout


def _power_of_two(x: int) -> bool:
    return x >= MIN_DOT and x & (x - 1) == 0


def _pregathered_forward(q, k, v, plan, scale, tuning, interpret):
    out, lse = fused_tiled_attention(
        block_query_layout(q, plan), hyper_attention_tiles(k, v, plan), scale=scale, tuning=tuning, interpret=interpret
    )
    t = q.shape[3]
    return unblock_query_layout(out, plan, t), unblock_query_layout(lse[..., None], plan, t)[..., 0]


def _row_positions(shape):
    """Float32 row number + 1 of every row of an array `[..., L, H]`, as `[..., L, 1]` (0 marks padding after a
    gather-and-pad; exact below 2**24 rows)."""
    return jnp.broadcast_to(jnp.arange(1, shape[-2] + 1, dtype=jnp.float32)[:, None], (*shape[:-1], 1))


def _can_gather_in_kernel(q, plan) -> bool:
    return _power_of_two(q.shape[-1]) and _power_of_two(plan.query_block)


def estimate_forward(q, k, v, plan, *, scale, tuning, interpret):
    """out `[B, K, G, T, H]` (q's dtype) and lse `[B, K, G, T]` of the estimator under `plan`, forward only: rows are
    gathered inside the kernel where the shapes allow, else through sorted copies (the pre-gathered kernel)."""
    if not _can_gather_in_kernel(q, plan):
        return _pregathered_forward(q, k, v, plan, scale, tuning, interpret)
    tiles = hyper_attention_tiles(k, v, plan)
    # The same layout functions applied to row numbers say which original row sits in each blocked slot.
    query_index = block_query_layout(_row_positions(q.shape), plan)[..., 0].astype(jnp.int32) - 1
    position_tiles = hyper_attention_tiles(_row_positions(k.shape), _row_positions(k.shape), plan)
    key_index = [
        position_tile.k[..., 0].astype(jnp.int32) - 1
        if tile.k.shape[2] == plan.num_blocks > 1 and _power_of_two(tile.k.shape[3])
        else None
        for tile, position_tile in zip(tiles, position_tiles, strict=True)
    ]
    return gathered_tiled_forward(
        q, k, v, query_index, tiles, key_index, scale=scale, tuning=tuning, interpret=interpret
    )


def estimate_backward(q, k, v, plan, d_out, lse, delta, *, scale, tuning, interpret):
    """dq, dk, dv of the estimator under `plan` as one part of an attention whose final lse and delta are given
    (`fused_tiled_attention_backward`): the blocked layouts are gathered here and their transposes (gathers by the
    inverse permutation) bring the gradients back to the original rows."""

    def blocked(q, k, v):
        return block_query_layout(q, plan), hyper_attention_tiles(k, v, plan)

    (q_blocks, tiles), blocked_vjp = jax.vjp(blocked, q, k, v)
    stats = jnp.stack([lse, delta], axis=-1)  # one gather for both rows statistics
    lse_blocks, delta_blocks = jnp.moveaxis(block_query_layout(stats, plan), -1, 0)
    d_q_blocks, d_tiles = fused_tiled_attention_backward(
        q_blocks,
        tiles,
        block_query_layout(d_out.astype(q.dtype), plan),
        lse_blocks,
        delta_blocks,
        scale=scale,
        tuning=tuning,
        interpret=interpret,
    )
    return blocked_vjp((d_q_blocks, d_tiles))


def output_delta(out, d_out, d_lse):
    """delta_i = sum_h dO_ih O_ih - dlse_i (float32): with the lse, what every backward kernel needs of the output."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    return delta - d_lse.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _hyper(q, k, v, key, kv_length, hash_key, static):
    return _hyper_fwd(q, k, v, key, kv_length, hash_key, static)[0]


def _hyper_fwd(q, k, v, key, kv_length, hash_key, static):
    config, scale, tuning, interpret = static
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, hash_key=hash_key, v=v, scale=scale)
    out, lse = estimate_forward(q, k, v, plan, scale=scale, tuning=tuning, interpret=interpret)
    return (out, lse), (q, k, v, plan, out, lse)


def _hyper_bwd(static, residuals, cotangents):
    _, scale, tuning, interpret = static
    q, k, v, plan, out, lse = residuals
    delta = output_delta(out, *cotangents)
    grads = estimate_backward(q, k, v, plan, cotangents[0], lse, delta, scale=scale, tuning=tuning, interpret=interpret)
    return (*grads, None, None, None)


_hyper.defvjp(_hyper_fwd, _hyper_bwd)


def grouped_hyper_attention_pallas(
    q,
    k,
    v,
    *,
    key,
    config: HyperAttentionConfig,
    scale: float,
    kv_length=None,
    hash_key=None,
    tuning: TiledKernelConfig | None = None,
    interpret: bool | None = None,
):
    """Non-causal HyperAttention with the fused kernels; same estimator (and same plan for the same key) as
    `ops.grouped_hyper_attention`.

    Returns out `[B, K, G, T, H]` in q's dtype and lse `[B, K, G, T]` float32.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    static = (config, float(scale), tuning or TiledKernelConfig(), bool(interpret))
    return _hyper(q, k, v, key, kv_length, hash_key, static)
