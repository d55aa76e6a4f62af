"""Fused Pallas (Triton) kernels for `ops.tiled_attention`: one online softmax over key tiles with per-key log-weights.

Forward: a program owns `block_q` queries of one query block (one query head) and streams every tile's keys for that
block through one online softmax: the block's own sortLSH keys, the sampled residual keys (log-weight log(S/m), -inf
where excluded), and any further tile. It writes out and the natural-log lse.

Backward (FlashAttention-2 with per-key weights, P_ij = w_j e^{s_ij - lse_i}): one kernel recomputes P per query chunk
and accumulates dq over all tiles; a second one, per tile and per key chunk, loops over the queries that see those
keys and accumulates dk, dv. A per-block tile's keys are seen by one query block, so its dk, dv are written directly;
a tile shared by all blocks is reduced over a few partial sums (no atomics, no scatter-add).

The log-weights are treated as constants: their cotangent is zero (they come from the plan, not from q, k, v).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax._numerics import finite_or_zero
from hyperattn_jax.kernels.configs import TiledKernelConfig
from hyperattn_jax.kernels.gpu._common import (
    LN_2,
    LOG2_E,
    MIN_DOT,
    NEG_START,
    default_interpret,
    div,
    dot,
    dot_t,
    next_power_of_two,
    pad_to,
    rem,
    triton_params,
)
from hyperattn_jax.ops.tiles import KeyTile, tile_shapes


class _Layout(NamedTuple):
    """Static shape facts of one call (hashable, so it can ride in nondiff_argnums)."""

    batch: int
    kv_heads: int
    groups: int
    num_blocks: int
    query_block: int  # bq (real)
    query_block_padded: int  # bq rounded up to a power of two
    head_dim: int
    head_dim_padded: int
    tile_lengths: tuple[int, ...]  # real t per tile
    tile_lengths_padded: tuple[int, ...]
    tile_shared: tuple[bool, ...]  # keys shared by all query blocks ([.., 1, t, H])
    weight_per_block: tuple[bool, ...]  # log-weights differ between query blocks


# ------------------------------------------------------------------------------------------------ forward kernel


def _forward_kernel(q_ref, *refs, layout: _Layout, block_k: int, scale: float):
    num_tiles = len(layout.tile_lengths)
    tile_refs, (o_ref, lse_ref) = refs[: 3 * num_tiles], refs[3 * num_tiles :]
    q = q_ref[...]
    rows = q.shape[0]
    qk_scale = scale * LOG2_E  # work in base 2: exp2 is the cheap instruction
    carry = (
        jnp.full((rows,), NEG_START, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, layout.head_dim_padded), jnp.float32),
    )
    for tile in range(num_tiles):
        k_ref, v_ref, w_ref = tile_refs[3 * tile : 3 * tile + 3]
        chunk = min(block_k, layout.tile_lengths_padded[tile])

        def body(step, carry, k_ref=k_ref, v_ref=v_ref, w_ref=w_ref, chunk=chunk):
            row_max, row_sum, acc = carry
            keys = pl.ds(pl.multiple_of(step * chunk, chunk), chunk)
            s = dot_t(q, k_ref[keys, :]) * qk_scale + w_ref[keys][None, :] * LOG2_E
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            p = jnp.exp2(s - new_max[:, None])
            correction = jnp.exp2(row_max - new_max)
            v = v_ref[keys, :]
            acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
            return new_max, row_sum * correction + jnp.sum(p, axis=1), acc

        carry = lax.fori_loop(0, layout.tile_lengths_padded[tile] // chunk, body, carry)
    row_max, row_sum, acc = carry
    has_keys = row_sum > 0
    o_ref[...] = (acc / jnp.where(has_keys, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, (row_max + jnp.log2(jnp.where(has_keys, row_sum, 1.0))) * LN_2, -jnp.inf)


def _tile_specs(layout: _Layout, rows: int, splits: int):
    """BlockSpecs of every tile's k, v and log-weights for a grid (bk, g, query chunk j) of `rows` queries each."""
    specs = []
    for tile, length in enumerate(layout.tile_lengths_padded):
        shared, per_block = layout.tile_shared[tile], layout.weight_per_block[tile]
        kv_map = (lambda bk, g, j: (bk, 0, 0, 0)) if shared else (lambda bk, g, j: (bk, j // splits, 0, 0))
        w_map = (lambda bk, g, j: (bk, j // splits, 0)) if per_block else (lambda bk, g, j: (bk, 0, 0))
        kv_spec = pl.BlockSpec((None, None, length, layout.head_dim_padded), kv_map)
        specs += [kv_spec, kv_spec, pl.BlockSpec((None, None, length), w_map)]
    return specs


def _forward_call(q, flat_tiles, layout: _Layout, *, scale, tuning: TiledKernelConfig, interpret: bool):
    """q `[BK, G, nb*bqp, Hp]`, flat_tiles (k, v `[BK, nb|1, tp, Hp]`, w `[BK, nb|1, tp]`)* -> out, lse."""
    bk, g, rows_total, hp = q.shape
    rows = min(tuning.block_q, layout.query_block_padded)
    splits = layout.query_block_padded // rows
    grid = (bk, g, rows_total // rows)
    q_spec = pl.BlockSpec((None, None, rows, hp), lambda b, h, j: (b, h, j, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, layout=layout, block_k=tuning.block_k, scale=scale),
        grid=grid,
        in_specs=[q_spec, *_tile_specs(layout, rows, splits)],
        out_specs=[q_spec, pl.BlockSpec((None, None, rows), lambda b, h, j: (b, h, j))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((bk, g, rows_total), jnp.float32),
        ],
        compiler_params=triton_params(tuning.num_warps, tuning.num_stages),
        interpret=interpret,
        name="hyper_tiled_attention_fwd",
    )(q, *flat_tiles)


# ------------------------------------------------------------------------------------------------ backward kernels


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, *refs, layout: _Layout, block_k: int, scale: float):
    num_tiles = len(layout.tile_lengths)
    tile_refs, dq_ref = refs[: 3 * num_tiles], refs[3 * num_tiles]
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * LOG2_E
    delta = delta_ref[...]
    qk_scale = scale * LOG2_E
    dq = jnp.zeros(q.shape, jnp.float32)
    for tile in range(num_tiles):
        k_ref, v_ref, w_ref = tile_refs[3 * tile : 3 * tile + 3]
        chunk = min(block_k, layout.tile_lengths_padded[tile])

        def body(step, dq, k_ref=k_ref, v_ref=v_ref, w_ref=w_ref, chunk=chunk):
            keys = pl.ds(pl.multiple_of(step * chunk, chunk), chunk)
            k = k_ref[keys, :]
            s = dot_t(q, k) * qk_scale + w_ref[keys][None, :] * LOG2_E
            p = jnp.exp2(s - lse2[:, None])
            ds = p * (dot_t(do, v_ref[keys, :]) - delta[:, None])
            return dq + dot(ds.astype(k.dtype), k)

        dq = lax.fori_loop(0, layout.tile_lengths_padded[tile] // chunk, body, dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq_call(q, do, lse, delta, flat_tiles, layout, *, scale, tuning, interpret):
    bk, g, rows_total, hp = q.shape
    rows = min(tuning.block_q, layout.query_block_padded)
    splits = layout.query_block_padded // rows
    q_spec = pl.BlockSpec((None, None, rows, hp), lambda b, h, j: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, rows), lambda b, h, j: (b, h, j))
    return pl.pallas_call(
        functools.partial(_dq_kernel, layout=layout, block_k=tuning.block_k, scale=scale),
        grid=(bk, g, rows_total // rows),
        in_specs=[q_spec, q_spec, row_spec, row_spec, *_tile_specs(layout, rows, splits)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(tuning.num_warps, tuning.num_stages),
        interpret=interpret,
        name="hyper_tiled_attention_dq",
    )(q, do, lse, delta, *flat_tiles)


def _dkdv_kernel(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    w_ref,
    dk_ref,
    dv_ref,
    *,
    layout: _Layout,
    shared: bool,
    per_block: bool,
    blocks_per_program: int,
    rows: int,
    scale: float,
):
    """dk, dv of one key chunk of one tile, over every query (all heads of the group) that sees it."""
    key_block, split = pl.program_id(1), pl.program_id(3)
    first_block = split * blocks_per_program if shared else key_block
    bqp = layout.query_block_padded
    steps_per_block = bqp // rows
    steps_per_head = blocks_per_program * steps_per_block
    k, v = k_ref[...], v_ref[...]
    qk_scale = scale * LOG2_E
    fixed_w = None if (shared and per_block) else w_ref[0, :] * LOG2_E

    def body(step, carry):
        dk, dv = carry
        head = div(step, steps_per_head)
        local = rem(step, steps_per_head)
        query_block = first_block + div(local, steps_per_block)
        start = pl.multiple_of(query_block * bqp + rem(local, steps_per_block) * rows, rows)
        queries = pl.ds(start, rows)
        q = q_ref[head, queries, :]
        do = do_ref[head, queries, :]
        w = fixed_w if fixed_w is not None else w_ref[query_block, :] * LOG2_E
        # Keys-major scores: p^T and ds^T are formed directly (see flash._dkdv_kernel).
        s_t = dot_t(k, q) * qk_scale + w[:, None]
        p_t = jnp.exp2(s_t - (lse_ref[head, queries] * LOG2_E)[None, :])
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot_t(v, do) - delta_ref[head, queries][None, :])
        dk = dk + dot(ds_t.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, layout.groups * steps_per_head, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def shared_splits(num_blocks: int, wanted: int) -> int:
    """Largest divisor of num_blocks that is at most `wanted` (each split sums an equal run of query blocks)."""
    return max(d for d in range(1, min(num_blocks, wanted) + 1) if num_blocks % d == 0)


def _dkdv_call(q, do, lse, delta, k, v, w, tile: int, layout: _Layout, *, scale, tuning, interpret):
    """dk, dv `[BK, nb|1, tp, Hp]` of one tile (float32 partial sums reduced here for a shared tile)."""
    bk, g, rows_total, hp = q.shape
    shared, per_block = layout.tile_shared[tile], layout.weight_per_block[tile]
    length = layout.tile_lengths_padded[tile]
    chunk = min(tuning.block_k_bwd, length)
    rows = min(tuning.block_q_bwd, layout.query_block_padded)
    nb = layout.num_blocks
    splits = shared_splits(nb, tuning.shared_splits) if shared else 1
    key_blocks = 1 if shared else nb
    grid = (bk, key_blocks, length // chunk, splits)
    full_q = pl.BlockSpec((None, g, rows_total, hp), lambda b, i, c, r: (b, 0, 0, 0))
    full_rows = pl.BlockSpec((None, g, rows_total), lambda b, i, c, r: (b, 0, 0))
    kv_spec = pl.BlockSpec((None, None, chunk, hp), lambda b, i, c, r: (b, i, c, 0))
    if shared and per_block:  # every query block has its own row of weights for these keys
        w_spec = pl.BlockSpec((None, nb, chunk), lambda b, i, c, r: (b, 0, c))
    elif per_block:
        w_spec = pl.BlockSpec((None, 1, chunk), lambda b, i, c, r: (b, i, c))
    else:
        w_spec = pl.BlockSpec((None, 1, chunk), lambda b, i, c, r: (b, 0, c))
    out_dtype = jnp.float32 if splits > 1 else k.dtype
    out_spec = pl.BlockSpec((None, None, chunk, hp), lambda b, i, c, r: (b, i * splits + r, c, 0))
    out_shape = jax.ShapeDtypeStruct((bk, key_blocks * splits, length, hp), out_dtype)
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkdv_kernel,
            layout=layout,
            shared=shared,
            per_block=per_block,
            blocks_per_program=nb // splits if shared else 1,
            rows=rows,
            scale=scale,
        ),
        grid=grid,
        in_specs=[full_q, full_q, full_rows, full_rows, kv_spec, kv_spec, w_spec],
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=triton_params(tuning.num_warps, tuning.num_stages),
        interpret=interpret,
        name="hyper_tiled_attention_dkdv",
    )(q, do, lse, delta, k, v, w)
    if splits > 1:
        dk = jnp.sum(dk, axis=1, keepdims=True).astype(k.dtype)
        dv = jnp.sum(dv, axis=1, keepdims=True).astype(v.dtype)
    return dk, dv


# ------------------------------------------------------------------------------------------------ layouts and vjp


def _make_layout(q_blocks, tiles) -> _Layout:
    batch, kv_heads, groups, nb, bq, h = q_blocks.shape
    hp = next_power_of_two(h, MIN_DOT)
    shapes = tile_shapes(q_blocks.shape, [(tile.k.shape, jnp.shape(tile.log_weight)) for tile in tiles])
    lengths = [shape.length for shape in shapes]
    return _Layout(
        batch=batch,
        kv_heads=kv_heads,
        groups=groups,
        num_blocks=nb,
        query_block=bq,
        query_block_padded=next_power_of_two(bq, MIN_DOT),
        head_dim=h,
        head_dim_padded=hp,
        tile_lengths=tuple(lengths),
        tile_lengths_padded=tuple(next_power_of_two(t, MIN_DOT) for t in lengths),
        tile_shared=tuple(shape.shared for shape in shapes),
        weight_per_block=tuple(shape.weight_per_block for shape in shapes),
    )


def _queries_in(x, layout: _Layout):
    """`[B, K, G, nb, bq, H]` -> `[BK, G, nb * bqp, Hp]`, zero padded."""
    x = pad_to(pad_to(x, 4, layout.query_block_padded), 5, layout.head_dim_padded)
    return x.reshape(layout.batch * layout.kv_heads, layout.groups, -1, layout.head_dim_padded)


def _queries_out(x, layout: _Layout):
    x = x.reshape(layout.batch, layout.kv_heads, layout.groups, layout.num_blocks, layout.query_block_padded, -1)
    return x[..., : layout.query_block, : layout.head_dim]


def _rows_in(x, layout: _Layout):
    return pad_to(x, 4, layout.query_block_padded).reshape(layout.batch * layout.kv_heads, layout.groups, -1)


def _rows_out(x, layout: _Layout):
    x = x.reshape(layout.batch, layout.kv_heads, layout.groups, layout.num_blocks, layout.query_block_padded)
    return x[..., : layout.query_block]


def _tiles_in(tiles, layout: _Layout):
    flat = []
    bk = layout.batch * layout.kv_heads
    for tile, length, per_block in zip(tiles, layout.tile_lengths_padded, layout.weight_per_block, strict=True):
        k, v = (pad_to(pad_to(x, 3, length), 4, layout.head_dim_padded) for x in (tile.k, tile.v))
        k, v = (x.reshape(bk, x.shape[2], length, layout.head_dim_padded) for x in (k, v))
        weight_blocks = layout.num_blocks if per_block else 1
        w = jnp.asarray(tile.log_weight, jnp.float32)
        w = w.reshape((1,) * (4 - w.ndim) + w.shape)
        w = jnp.broadcast_to(w, (layout.batch, layout.kv_heads, weight_blocks, w.shape[-1]))
        w = jnp.broadcast_to(w, (*w.shape[:3], tile.k.shape[3]))
        w = pad_to(w, 3, length, -jnp.inf).reshape(bk, weight_blocks, length)
        flat += [k, v, w]
    return flat


def _check_dtypes(q_blocks, tiles):
    for tile in tiles:
        if tile.k.dtype != q_blocks.dtype or tile.v.dtype != q_blocks.dtype:
            raise ValueError(
                f"q and tile k, v must share a dtype, got {q_blocks.dtype}, {tile.k.dtype}, {tile.v.dtype}"
            )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fused(q_blocks, tiles, layout, scale, tuning, interpret):
    return _fused_fwd(q_blocks, tiles, layout, scale, tuning, interpret)[0]


def _fused_fwd(q_blocks, tiles, layout, scale, tuning, interpret):
    q = _queries_in(q_blocks, layout)
    flat = _tiles_in(tiles, layout)
    out, lse = _forward_call(q, flat, layout, scale=scale, tuning=tuning, interpret=interpret)
    result = (_queries_out(out, layout), _rows_out(lse, layout))
    weights = [jnp.zeros_like(tile.log_weight) for tile in tiles]
    return result, (q, flat, out, lse, weights)


def _fused_bwd(layout, scale, tuning, interpret, residuals, cotangents):
    q, flat, out, lse, weights = residuals
    d_out, d_lse = cotangents
    do = _queries_in(d_out.astype(q.dtype), layout)
    # d lse enters dS like -delta: dS_ij = P_ij (dP_ij - delta_i + dlse_i).
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - _rows_in(d_lse, layout)
    return _backward(q, flat, do, lse, delta, weights, layout, scale, tuning, interpret)


def _backward(q, flat, do, lse, delta, weights, layout: _Layout, scale, tuning, interpret):
    """dq `[B, K, G, nb, bq, H]` and the tiles' (dk, dv) from padded kernel inputs and the softmax statistics."""
    lse = finite_or_zero(lse)
    dq = _dq_call(q, do, lse, delta, flat, layout, scale=scale, tuning=tuning, interpret=interpret)
    d_tiles = []
    for tile in range(len(layout.tile_lengths)):
        k, v, w = flat[3 * tile : 3 * tile + 3]
        dk, dv = _dkdv_call(q, do, lse, delta, k, v, w, tile, layout, scale=scale, tuning=tuning, interpret=interpret)
        shape = (layout.batch, layout.kv_heads, dk.shape[1], dk.shape[2], dk.shape[3])
        length, h = layout.tile_lengths[tile], layout.head_dim
        dk, dv = (x.reshape(shape)[:, :, :, :length, :h] for x in (dk, dv))
        d_tiles.append(KeyTile(dk, dv, weights[tile]))
    return _queries_out(dq, layout), d_tiles


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_tiled_attention(
    q_blocks,
    tiles,
    *,
    scale: float,
    tuning: TiledKernelConfig | None = None,
    interpret: bool | None = None,
):
    """Pallas Triton twin of `ops.tiled_attention`: blocked queries over key tiles in one online softmax.

    Args:
      q_blocks: `[B, K, G, nb, bq, H]`, bfloat16 or float16 (float32 runs, with tf32-class dots on GPU).
      tiles: list of `KeyTile` (k, v `[B, K, nb | 1, t, H]` in q's dtype; log_weight broadcastable to `[B, K, nb, t]`).
      scale: softmax scale.
      tuning: block sizes and warps (`TiledKernelConfig`).
      interpret: run the kernels in the Pallas interpreter (default: when the backend is not a GPU).

    Returns:
      out `[B, K, G, nb, bq, H]` in q's dtype and lse `[B, K, G, nb, bq]` float32 (natural log). Differentiable in
      q and the tiles' k, v (exact gradients of this estimator); log-weights get a zero cotangent.
    """
    tiles = [KeyTile(*tile) for tile in tiles]
    _check_dtypes(q_blocks, tiles)
    tuning = TiledKernelConfig() if tuning is None else tuning
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _fused(q_blocks, tiles, _make_layout(q_blocks, tiles), float(scale), tuning, interpret)


def fused_tiled_attention_backward(
    q_blocks,
    tiles,
    d_out,
    lse,
    delta,
    *,
    scale: float,
    tuning: TiledKernelConfig | None = None,
    interpret: bool | None = None,
):
    """The backward kernels of `fused_tiled_attention` run with softmax statistics supplied by the caller.

    When this estimate is one part of a larger attention (a causal recursion level merged with others by lse), its
    gradient is the part's backward run with the FINAL lse and delta_i = sum_h dO_ih O_ih - dlse_i of the merged
    output: P_ij = w_j e^{s_ij - lse_i} is then this part's share of the merged softmax. So no part needs its own
    out and lse kept, and nothing is differentiated through the merge.

    Args:
      q_blocks, tiles, scale, tuning, interpret: as for `fused_tiled_attention`.
      d_out: cotangent of the merged output, `[B, K, G, nb, bq, H]` in the blocked layout of q_blocks.
      lse, delta: float32 `[B, K, G, nb, bq]`, the merged attention's lse and delta in the same layout.

    Returns:
      dq `[B, K, G, nb, bq, H]` in q's dtype and a list of `KeyTile`s holding each tile's dk, dv (zero log-weights).
    """
    tiles = [KeyTile(*tile) for tile in tiles]
    _check_dtypes(q_blocks, tiles)
    tuning = TiledKernelConfig() if tuning is None else tuning
    interpret = default_interpret() if interpret is None else bool(interpret)
    layout = _make_layout(q_blocks, tiles)
    weights = [jnp.zeros_like(tile.log_weight) for tile in tiles]
    q, do = (_queries_in(x.astype(q_blocks.dtype), layout) for x in (q_blocks, d_out))
    lse, delta = (_rows_in(x.astype(jnp.float32), layout) for x in (lse, delta))
    flat = _tiles_in(tiles, layout)
    return _backward(q, flat, do, lse, delta, weights, layout, float(scale), tuning, interpret)
