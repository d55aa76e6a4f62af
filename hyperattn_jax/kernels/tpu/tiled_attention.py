"""Pallas TPU (Mosaic) kernels for `ops.tiled_attention`: one online softmax over key tiles with per-key log-weights.

The sort permutation and the samples are applied by XLA gathers before the kernels (`ops.block_query_layout`,
`ops.hyper_attention_tiles`): the kernels read sorted, contiguous copies, so every block is a plain rectangular DMA
that the Pallas pipeline double-buffers (docs/tpu.md says why this beats row DMAs from scalar-prefetched indices).

Forward: grid (B*K, query block i, query chunk, query head g). A step holds `rows` sorted queries of one head and
every tile's keys for block i (its own sortLSH keys, the shared sampled keys, any shared global keys) resident in
VMEM; it runs the online softmax over the tiles in 128-lane multiples of keys and writes out and the natural-log lse.
The query head is the innermost grid axis and the tiles' index maps ignore it, so the G query heads of a kv head
reuse the tiles already in VMEM (GQA without repeated k, v and without refetching them).

Backward (FlashAttention-2 with per-key weights, P_ij = w_j e^{s_ij - lse_i}, dS = P (dP - delta), computed with
the final lse and delta = rowsum(dO O) - dlse): a dq kernel on the forward's grid, and per tile a dk/dv kernel on the
grid (B*K, key block, key chunk, query head, row chunk) that accumulates in VMEM scratch over the heads and the row
chunks that see its keys (one query block's for a per-block tile, every block's for a shared tile): no scatter-add.
The log-weights are constants of the plan: their cotangent is zero.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hyperattn_jax._numerics import finite_or_zero
from hyperattn_jax.kernels.configs import TpuTiling
from hyperattn_jax.kernels.tpu._common import (
    NEG_START,
    NUM_LANES,
    ROW_MULTIPLE,
    compiler_params,
    default_interpret,
    div,
    dot,
    dot_t,
    interpret_arg,
    pad_to,
    round_up,
)
from hyperattn_jax.kernels.tpu.vmem import VmemBudget, tile_bytes
from hyperattn_jax.ops import KeyTile, tiled_attention
from hyperattn_jax.ops.tiles import tile_shapes


class _Layout(NamedTuple):
    """Static shape facts of one call (hashable, so it can ride in nondiff_argnums)."""

    batch: int
    kv_heads: int
    groups: int
    num_blocks: int
    query_block: int  # bq (real)
    query_block_padded: int  # bqp: a multiple of `rows`
    rows: int  # query rows per forward / dq step
    head_dim: int
    dtype: str
    tile_lengths: tuple[int, ...]  # real t per tile
    tile_lengths_padded: tuple[int, ...]  # multiples of 128 and of both key chunks
    key_chunks: tuple[int, ...]  # forward keys per step, per tile
    key_chunks_bwd: tuple[int, ...]  # dk/dv keys per program, per tile
    tile_shared: tuple[bool, ...]  # keys shared by all query blocks ([.., 1, t, H])
    weight_per_block: tuple[bool, ...]  # log-weights differ between query blocks

    @property
    def splits(self) -> int:
        return self.query_block_padded // self.rows


def make_layout(q_shape, dtype, tiles_shapes, tiling: TpuTiling) -> _Layout:
    """The kernels' static layout from q_blocks' shape and each tile's (k shape, log-weight shape)."""
    batch, kv_heads, groups, nb, bq, h = q_shape
    bqp = round_up(bq, ROW_MULTIPLE)
    rows = min(tiling.block_q, bqp)
    bqp = round_up(bqp, rows)
    shapes = tile_shapes(q_shape, tiles_shapes)
    padded, chunks, chunks_bwd = [], [], []
    for shape in shapes:
        lanes = round_up(shape.length, NUM_LANES)
        chunk, chunk_bwd = min(tiling.block_k, lanes), min(tiling.block_k_bwd, lanes)
        padded.append(round_up(lanes, math.lcm(chunk, chunk_bwd)))
        chunks.append(chunk)
        chunks_bwd.append(chunk_bwd)
    return _Layout(
        batch=batch,
        kv_heads=kv_heads,
        groups=groups,
        num_blocks=nb,
        query_block=bq,
        query_block_padded=bqp,
        rows=rows,
        head_dim=h,
        dtype=jnp.dtype(dtype).name,
        tile_lengths=tuple(shape.length for shape in shapes),
        tile_lengths_padded=tuple(padded),
        key_chunks=tuple(chunks),
        key_chunks_bwd=tuple(chunks_bwd),
        tile_shared=tuple(shape.shared for shape in shapes),
        weight_per_block=tuple(shape.weight_per_block for shape in shapes),
    )


# ------------------------------------------------------------------------------------------------ VMEM budgets


def forward_budget(layout: _Layout, *, with_grads: bool = False) -> VmemBudget:
    """One step of the forward (or, `with_grads`, the dq) kernel: the query rows and every tile resident."""
    rows, h, dt = layout.rows, layout.head_dim, layout.dtype
    row_block = tile_bytes((rows, h), dt)
    stat = tile_bytes((rows, 1), jnp.float32)
    blocks = {"q": row_block, "out": row_block, "lse": stat}
    if with_grads:
        blocks = {"q": row_block, "do": row_block, "lse": stat, "delta": stat, "dq": row_block}
    for i, length in enumerate(layout.tile_lengths_padded):
        blocks[f"tile{i}.k"] = blocks[f"tile{i}.v"] = tile_bytes((length, h), dt)
        blocks[f"tile{i}.w"] = tile_bytes((1, length), jnp.float32)
    chunk = max(layout.key_chunks)
    scores = tile_bytes((rows, chunk), jnp.float32)
    temporaries = {"scores, probabilities, dP": 3 * scores, "accumulator": tile_bytes((rows, h), jnp.float32)}
    name = "tiled attention dq" if with_grads else "tiled attention forward"
    return VmemBudget(name, blocks, {}, temporaries)


def dkdv_budget(layout: _Layout, tile: int) -> VmemBudget:
    """One step of a tile's dk/dv kernel: one row chunk of one query head against one key chunk."""
    rows, h, dt = layout.rows, layout.head_dim, layout.dtype
    chunk = layout.key_chunks_bwd[tile]
    row_block, key_block = tile_bytes((rows, h), dt), tile_bytes((chunk, h), dt)
    stat = tile_bytes((rows, 1), jnp.float32)
    blocks = {"q": row_block, "do": row_block, "lse": stat, "delta": stat, "k": key_block, "v": key_block}
    blocks |= {"w": tile_bytes((1, chunk), jnp.float32), "dk": key_block, "dv": key_block}
    scratch = {"dk, dv accumulators": 2 * tile_bytes((chunk, h), jnp.float32)}
    temporaries = {"scores, probabilities, dP, dS": 4 * tile_bytes((rows, chunk), jnp.float32)}
    return VmemBudget(f"tiled attention dk/dv (tile {tile})", blocks, scratch, temporaries)


def layout_budgets(layout: _Layout) -> list[VmemBudget]:
    """Every kernel configuration one call of `tiled_attention_tpu` (forward and backward) runs."""
    budgets = [forward_budget(layout), forward_budget(layout, with_grads=True)]
    return budgets + [dkdv_budget(layout, tile) for tile in range(len(layout.tile_lengths))]


# ------------------------------------------------------------------------------------------------ forward kernel


def _tile_scores(q, k_ref, w_ref, start: int, chunk: int, scale: float):
    """Scores of `q` (rows, H) against keys [start, start + chunk) of a resident tile, log-weights added: float32."""
    k = k_ref[start : start + chunk, :]
    return dot_t(q, k) * scale + w_ref[:, start : start + chunk], k


def _forward_kernel(q_ref, *refs, layout: _Layout, scale: float):
    num_tiles = len(layout.tile_lengths)
    tile_refs, (o_ref, lse_ref) = refs[: 3 * num_tiles], refs[3 * num_tiles :]
    q = q_ref[...]
    rows = q.shape[0]
    row_max = jnp.full((rows, 1), NEG_START, jnp.float32)
    row_sum = jnp.zeros((rows, 1), jnp.float32)
    acc = jnp.zeros((rows, layout.head_dim), jnp.float32)
    for tile in range(num_tiles):
        k_ref, v_ref, w_ref = tile_refs[3 * tile : 3 * tile + 3]
        chunk = layout.key_chunks[tile]
        for start in range(0, layout.tile_lengths_padded[tile], chunk):  # static: tiles are a few chunks long
            s, _ = _tile_scores(q, k_ref, w_ref, start, chunk, scale)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - new_max)
            correction = jnp.exp(row_max - new_max)
            v = v_ref[start : start + chunk, :]
            acc = acc * correction + dot(p.astype(v.dtype), v)
            row_sum = row_sum * correction + jnp.sum(p, axis=1, keepdims=True)
            row_max = new_max
    has_keys = row_sum > 0
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    o_ref[...] = (acc / safe_sum).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, row_max + jnp.log(safe_sum), -jnp.inf)


def _tile_specs(layout: _Layout):
    """BlockSpecs of every tile's k, v, w for the grid (bk, query block i, query chunk j, head g): whole tiles."""
    specs = []
    for tile, length in enumerate(layout.tile_lengths_padded):
        shared, per_block = layout.tile_shared[tile], layout.weight_per_block[tile]
        kv_map = (lambda b, i, j, g: (b, 0, 0, 0)) if shared else (lambda b, i, j, g: (b, i, 0, 0))
        w_map = (lambda b, i, j, g: (b, i, 0, 0)) if per_block else (lambda b, i, j, g: (b, 0, 0, 0))
        kv_spec = pl.BlockSpec((None, None, length, layout.head_dim), kv_map)
        specs += [kv_spec, kv_spec, pl.BlockSpec((None, None, 1, length), w_map)]
    return specs


def _row_specs(layout: _Layout):
    """(query rows, per-row statistics) BlockSpecs on the forward / dq grid."""
    splits = layout.splits
    q_spec = pl.BlockSpec((None, None, layout.rows, layout.head_dim), lambda b, i, j, g: (b, g, i * splits + j, 0))
    stat_spec = pl.BlockSpec((None, None, layout.rows, 1), lambda b, i, j, g: (b, g, i * splits + j, 0))
    return q_spec, stat_spec


def _grid(layout: _Layout):
    return (layout.batch * layout.kv_heads, layout.num_blocks, layout.splits, layout.groups)


# ------------------------------------------------------------------------------------------------ backward kernels


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, *refs, layout: _Layout, scale: float):
    num_tiles = len(layout.tile_lengths)
    tile_refs, dq_ref = refs[: 3 * num_tiles], refs[3 * num_tiles]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    dq = jnp.zeros((q.shape[0], layout.head_dim), jnp.float32)
    for tile in range(num_tiles):
        k_ref, v_ref, w_ref = tile_refs[3 * tile : 3 * tile + 3]
        chunk = layout.key_chunks[tile]
        for start in range(0, layout.tile_lengths_padded[tile], chunk):
            s, k = _tile_scores(q, k_ref, w_ref, start, chunk, scale)
            p = jnp.exp(s - lse)
            ds = p * (dot_t(do, v_ref[start : start + chunk, :]) - delta)
            dq = dq + dot(ds.astype(k.dtype), k)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq_call(q, do, lse, delta, flat_tiles, layout: _Layout, *, scale: float, interpret: bool):
    forward_budget(layout, with_grads=True).check()
    q_spec, stat_spec = _row_specs(layout)
    return pl.pallas_call(
        functools.partial(_dq_kernel, layout=layout, scale=scale),
        grid=_grid(layout),
        in_specs=[q_spec, q_spec, stat_spec, stat_spec, *_tile_specs(layout)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(("parallel",) * 4),
        interpret=interpret_arg(interpret),
        name="hyper_tiled_attention_dq_tpu",
    )(q, do, lse, delta, *flat_tiles)


def _dkdv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, w_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale):
    """dk, dv of one key chunk of one tile, accumulated over the query heads and row chunks that see it."""
    g, step = pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (step == 0))
    def _zero():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    q, do, k = q_ref[...], do_ref[...], k_ref[...]
    p = jnp.exp(dot_t(q, k) * scale + w_ref[...] - lse_ref[...])  # (rows, chunk)
    dv_acc[...] += dot(p.T.astype(do.dtype), do)
    ds = p * (dot_t(do, v_ref[...]) - delta_ref[...])
    dk_acc[...] += dot(ds.T.astype(q.dtype), q)

    @pl.when((g == pl.num_programs(3) - 1) & (step == pl.num_programs(4) - 1))
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkdv_call(q, do, lse, delta, k, v, w, tile: int, layout: _Layout, *, scale: float, interpret: bool):
    """dk, dv `[BK, nb|1, tp, H]` of one tile. Grid (bk, key block i, key chunk c, head g, row chunk r), the last two
    a reduction: a per-block tile's keys are seen by the row chunks of query block i alone, a shared tile's by every
    row chunk of every query block. Per-step VMEM depends on neither G nor the query block length."""
    dkdv_budget(layout, tile).check()
    bk, _, _, h = q.shape
    shared, per_block = layout.tile_shared[tile], layout.weight_per_block[tile]
    chunk, rows, splits = layout.key_chunks_bwd[tile], layout.rows, layout.splits
    nb = layout.num_blocks
    key_blocks, row_steps = (1, nb * splits) if shared else (nb, splits)

    def row_chunk(i, r):
        return r if shared else i * splits + r

    rows_spec = pl.BlockSpec((None, None, rows, h), lambda b, i, c, g, r: (b, g, row_chunk(i, r), 0))
    stat_spec = pl.BlockSpec((None, None, rows, 1), lambda b, i, c, g, r: (b, g, row_chunk(i, r), 0))
    kv_spec = pl.BlockSpec((None, None, chunk, h), lambda b, i, c, g, r: (b, i, c, 0))
    if per_block:  # the weights of the query block that holds this row chunk
        w_spec = pl.BlockSpec((None, None, 1, chunk), lambda b, i, c, g, r: (b, div(row_chunk(i, r), splits), 0, c))
    else:
        w_spec = pl.BlockSpec((None, None, 1, chunk), lambda b, i, c, g, r: (b, 0, 0, c))
    length = layout.tile_lengths_padded[tile]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale),
        grid=(bk, key_blocks, length // chunk, layout.groups, row_steps),
        in_specs=[rows_spec, rows_spec, stat_spec, stat_spec, kv_spec, kv_spec, w_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((chunk, h), jnp.float32)] * 2,
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret_arg(interpret),
        name="hyper_tiled_attention_dkdv_tpu",
    )(q, do, lse, delta, k, v, w)


# ------------------------------------------------------------------------------------------------ layouts and vjp


def _queries_in(x, layout: _Layout):
    """`[B, K, G, nb, bq, ...]` -> `[BK, G, nb * bqp, ...]`, zero padded (H, or 1 for row statistics)."""
    x = pad_to(x, 4, layout.query_block_padded)
    return x.reshape(layout.batch * layout.kv_heads, layout.groups, -1, x.shape[-1])


def _queries_out(x, layout: _Layout):
    shape = (layout.batch, layout.kv_heads, layout.groups, layout.num_blocks, layout.query_block_padded, -1)
    return x.reshape(shape)[:, :, :, :, : layout.query_block]


def _tiles_in(tiles, layout: _Layout):
    """Each tile as k, v `[BK, nb|1, tp, H]` (zero keys padded) and log-weights `[BK, nb|1, 1, tp]` (-inf padded)."""
    flat = []
    bk = layout.batch * layout.kv_heads
    for tile, length, per_block in zip(tiles, layout.tile_lengths_padded, layout.weight_per_block, strict=True):
        k, v = (pad_to(x, 3, length) for x in (tile.k, tile.v))
        k, v = (x.reshape(bk, x.shape[2], length, layout.head_dim) for x in (k, v))
        weight_blocks = layout.num_blocks if per_block else 1
        w = jnp.asarray(tile.log_weight, jnp.float32)
        w = w.reshape((1,) * (4 - w.ndim) + w.shape)
        w = jnp.broadcast_to(w, (layout.batch, layout.kv_heads, weight_blocks, tile.k.shape[3]))
        flat += [k, v, pad_to(w, 3, length, -jnp.inf).reshape(bk, weight_blocks, 1, length)]
    return flat


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fused(q_blocks, tiles, layout, scale, interpret):
    return _fused_fwd(q_blocks, tiles, layout, scale, interpret)[0]


def _fused_fwd(q_blocks, tiles, layout, scale, interpret):
    # The kernel's operands: q `[BK, G, nb*bqp, H]`, flat tiles (k, v `[BK, nb|1, tp, H]`, w `[BK, nb|1, 1, tp]`)*;
    # it returns out and lse `[BK, G, nb*bqp, 1]`.
    q = _queries_in(q_blocks, layout)
    flat = _tiles_in(tiles, layout)
    forward_budget(layout).check()
    q_spec, stat_spec = _row_specs(layout)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, layout=layout, scale=scale),
        grid=_grid(layout),
        in_specs=[q_spec, *_tile_specs(layout)],
        out_specs=[q_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)],
        compiler_params=compiler_params(("parallel",) * 4),
        interpret=interpret_arg(interpret),
        name="hyper_tiled_attention_fwd_tpu",
    )(q, *flat)
    result = (_queries_out(out, layout), _queries_out(lse, layout)[..., 0])
    weights = [jnp.zeros_like(tile.log_weight) for tile in tiles]
    return result, (q, flat, out, lse, weights)


def _fused_bwd(layout, scale, interpret, residuals, cotangents):
    q, flat, out, lse, weights = residuals
    d_out, d_lse = cotangents
    do = _queries_in(d_out.astype(q.dtype), layout)
    # d lse enters dS like -delta: dS_ij = P_ij (dP_ij - delta_i + dlse_i).
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta = delta - _queries_in(d_lse[..., None].astype(jnp.float32), layout)
    return _backward(q, flat, do, lse, delta, weights, layout, scale, interpret)


def _backward(q, flat, do, lse, delta, weights, layout: _Layout, scale, interpret):
    """dq `[B, K, G, nb, bq, H]` and the tiles' (dk, dv) from kernel-layout inputs and the softmax statistics."""
    lse = finite_or_zero(lse)
    dq = _dq_call(q, do, lse, delta, flat, layout, scale=scale, interpret=interpret)
    d_tiles = []
    for tile in range(len(layout.tile_lengths)):
        k, v, w = flat[3 * tile : 3 * tile + 3]
        dk, dv = _dkdv_call(q, do, lse, delta, k, v, w, tile, layout, scale=scale, interpret=interpret)
        shape = (layout.batch, layout.kv_heads, *dk.shape[1:])
        length = layout.tile_lengths[tile]
        dk, dv = (x.reshape(shape)[:, :, :, :length] for x in (dk, dv))
        d_tiles.append(KeyTile(dk, dv, weights[tile]))
    return _queries_out(dq, layout), d_tiles


_fused.defvjp(_fused_fwd, _fused_bwd)


def _prepare(q_blocks, tiles, tiling):
    tiles = [KeyTile(*tile) for tile in tiles]
    for tile in tiles:
        if tile.k.dtype != q_blocks.dtype or tile.v.dtype != q_blocks.dtype:
            raise ValueError(
                f"q and tile k, v must share a dtype, got {q_blocks.dtype}, {tile.k.dtype}, {tile.v.dtype}"
            )
    tiling = (TpuTiling() if tiling is None else tiling).validate()
    shapes = [(tile.k.shape, jnp.shape(tile.log_weight)) for tile in tiles]
    return tiles, make_layout(q_blocks.shape, q_blocks.dtype, shapes, tiling)


def tiled_attention_tpu(
    q_blocks, tiles, *, scale: float, tiling: TpuTiling | None = None, interpret: bool | None = None
):
    """Pallas TPU twin of `ops.tiled_attention`: blocked queries over key tiles in one online softmax.

    Args:
      q_blocks: `[B, K, G, nb, bq, H]`, bfloat16 or float32; H a multiple of 128 or equal to 64 (any H lowers, as
        the full minor dim of its blocks, but 64/128/256 are the tested ones).
      tiles: list of `KeyTile` (k, v `[B, K, nb | 1, t, H]` in q's dtype; log_weight broadcastable to `[B, K, nb, t]`).
      scale: softmax scale.
      tiling: block sizes (`TpuTiling`).
      interpret: run in TPU interpret mode on the CPU (default: when the backend is not a TPU).

    Returns:
      out `[B, K, G, nb, bq, H]` in q's dtype and lse `[B, K, G, nb, bq]` float32 (natural log). Differentiable in
      q and the tiles' k, v (exact gradients of this estimator, including through lse); log-weights get zero.

    >>> q = jnp.ones((1, 1, 1, 2, 8, 64)); k = jnp.ones((1, 1, 2, 8, 64))
    >>> out, lse = tiled_attention_tpu(q, [KeyTile(k, k, 0.0)], scale=0.125, interpret=True)
    >>> out.shape, lse.shape
    ((1, 1, 1, 2, 8, 64), (1, 1, 1, 2, 8))
    """
    tiles, layout = _prepare(q_blocks, tiles, tiling)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _fused(q_blocks, tiles, layout, float(scale), interpret)


def tiled_attention_tpu_reference(q_blocks, tiles, *, scale: float):
    """The jnp twin: `ops.tiled_attention` (out float32, lse float32), the same math in one dense softmax."""
    return tiled_attention(q_blocks, list(tiles), scale=scale)
