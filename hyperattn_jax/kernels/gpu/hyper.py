"""HyperAttention on the fused Pallas Triton kernels, grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`).

The plan (LSH hash, int32 packed-key sort, samples) and the tiles come from `ops`, unchanged, so any tile kind the
jnp path has (sorted blocks, sampled residual, global keys) runs here too; only the attention over the tiles is the
fused kernel instead of `ops.tiled_attention`. The forward gathers rows by index inside the kernel where the shapes
allow (`gathered.py`); under differentiation the pre-gathered kernels with their backward run instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu._common import MIN_DOT
from hyperattn_jax.kernels.gpu.flash import FlashConfig, flash_attention
from hyperattn_jax.kernels.gpu.gathered import gathered_tiled_forward
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig, fused_tiled_attention
from hyperattn_jax.ops.causal import causal_base_length, grouped_causal_attention, noncausal_is_exact
from hyperattn_jax.ops.sortlsh import block_query_layout, hyper_attention_tiles, make_plan, unblock_query_layout
from hyperattn_jax.ops.tiles import merge_partials
from hyperattn_jax.reference import grouped_exact_attention


def _power_of_two(x: int) -> bool:
    return x >= MIN_DOT and x & (x - 1) == 0


def _pregathered(q, k, v, key, kv_length, hash_key, static):
    config, scale, tuning, interpret = static
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, hash_key=hash_key, v=v, scale=scale)
    tiles = hyper_attention_tiles(k, v, plan)
    out, lse = fused_tiled_attention(
        block_query_layout(q, plan), tiles, scale=scale, tuning=tuning, interpret=interpret
    )
    t = q.shape[3]
    return unblock_query_layout(out, plan, t), unblock_query_layout(lse[..., None], plan, t)[..., 0]


def _row_positions(shape):
    """Float32 row number + 1 of every row of an array `[..., L, H]`, as `[..., L, 1]` (0 marks padding after a
    gather-and-pad; exact below 2**24 rows)."""
    return jnp.broadcast_to(jnp.arange(1, shape[-2] + 1, dtype=jnp.float32)[:, None], (*shape[:-1], 1))


def _can_gather_in_kernel(q, plan) -> bool:
    return _power_of_two(q.shape[-1]) and _power_of_two(plan.query_block)


def _gathered(q, k, v, key, kv_length, hash_key, static):
    config, scale, tuning, interpret = static
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, hash_key=hash_key, v=v, scale=scale)
    if not _can_gather_in_kernel(q, plan):
        return _pregathered(q, k, v, key, kv_length, hash_key, static)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _hyper(q, k, v, key, kv_length, hash_key, static):
    return _gathered(q, k, v, key, kv_length, hash_key, static)


def _hyper_fwd(q, k, v, key, kv_length, hash_key, static):
    # Under differentiation: the pre-gathered kernels, whose custom_vjp holds the fused backward.
    return jax.vjp(lambda q, k, v: _pregathered(q, k, v, key, kv_length, hash_key, static), q, k, v)


def _hyper_bwd(static, vjp, cotangents):
    return (*vjp(cotangents), None, None, None)


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


def grouped_attention_pallas(q, k, v, key, kv_length, hash_key, *, config: HyperAttentionConfig, causal, scale):
    """The `implementation="pallas_triton"` body of `hyper_attention`, grouped layout: the paper's dispatch (exact below
    `min_seq_len`, causal recursion above it) with the fused kernels in place of the jnp ones. Same plan and random
    draws as the xla path for the same key, so the two agree up to rounding.
    """

    def noncausal(q, k, v, *, key, kv_length=None, config=config):  # the causal recursion may pass its own config
        if noncausal_is_exact(k.shape[2], config):
            if kv_length is not None:
                return grouped_exact_attention(q, k, v, scale=scale, kv_length=kv_length)
            return flash_attention(q, k, v, scale=scale)
        return grouped_hyper_attention_pallas(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key
        )

    if causal:
        unstacked = _causal_without_stacking(q, k, v, key=key, config=config, scale=scale, noncausal_fn=noncausal)
        if unstacked is not None:
            return unstacked

        def exact_causal(q, k, v):
            return flash_attention(q, k, v, scale=scale, causal=True)

        return grouped_causal_attention(
            q, k, v, key=key, config=config, scale=scale, noncausal_fn=noncausal, exact_fn=exact_causal
        )
    return noncausal(q, k, v, key=key, kv_length=kv_length)


def _bit_reverse_chunks(x, axis: int, bits: int):
    """Reorder a 2**bits axis by bit reversal (an involution), as a transpose of its binary digits (XLA fuses it)."""
    if bits <= 1:
        return x
    shape = x.shape
    x = x.reshape(*shape[:axis], *([2] * bits), *shape[axis + 1 :])
    order = [*range(axis), *reversed(range(axis, axis + bits)), *range(axis + bits, x.ndim)]
    return x.transpose(order).reshape(shape)


def _causal_without_stacking(q, k, v, *, key, config, scale, noncausal_fn):
    """The paper's causal recursion, same estimator and same random draws as `ops.grouped_causal_attention`, without
    its per-level copies: the diagonal problems of the last level are ONE segment-causal flash call on the unsplit
    sequence, each level's lower-left problems are cut from strided views (in the batch order the ops recursion
    stacks them: chunk index bit-reversed), and all levels are merged by lse once at the end.

    Returns None where the shapes need the ops recursion (odd lengths, sinks or a local window, tiny segments).
    """
    t = q.shape[3]
    if config.num_sink_keys or config.local_window:
        return None
    depth, segment = 0, t
    while segment > causal_base_length(config):
        if segment % 2:
            return None
        segment //= 2
        depth += 1
    block = next((b for b in (128, 64, 32, 16) if segment % b == 0), None)
    if depth == 0 or block is None:
        return None
    tuning = FlashConfig(block_q=block, block_k=min(64, block), block_bwd=min(64, block))
    out, lse = flash_attention(q, k, v, scale=scale, causal=True, segment=segment, tuning=tuning)
    out = out.astype(jnp.float32)
    batch = q.shape[0]
    level_key = key
    for level in range(depth):
        off_diagonal_key, level_key = jax.random.split(level_key)
        chunks, half = 2**level, t // 2**level // 2

        def lower_left(x, which, chunks=chunks, half=half, level=level):
            """Rows of x `[B, ..., T, H]`: half `which` of every chunk, stacked as `[chunks * B, ..., half, H]`."""
            lead = x.shape[1:-2]
            x = x.reshape(batch, *lead, chunks, 2, half, x.shape[-1])[..., which, :, :]
            x = _bit_reverse_chunks(x, x.ndim - 3, level)
            return jnp.moveaxis(x, x.ndim - 3, 0).reshape(chunks * batch, *lead, half, x.shape[-1])

        low_out, low_lse = noncausal_fn(lower_left(q, 1), lower_left(k, 0), lower_left(v, 0), key=off_diagonal_key)

        def back(x, fill, chunks=chunks, half=half, level=level):
            """`[chunks * B, ..., half, (H)]` -> `[B, ..., T, (H)]` at the second halves; `fill` at the first halves."""
            x = x.reshape(chunks, batch, *x.shape[1:])
            axis = 3  # the chunk axis lands after B, K, G
            x = _bit_reverse_chunks(jnp.moveaxis(x, 0, axis), axis, level)
            x = jnp.stack([jnp.full_like(x, fill), x], axis=axis + 1)
            return x.reshape(*x.shape[:axis], chunks * 2 * half, *x.shape[axis + 3 :])

        out, lse = merge_partials(out, lse, back(low_out.astype(jnp.float32), 0.0), back(low_lse, -jnp.inf))
    return out, lse
