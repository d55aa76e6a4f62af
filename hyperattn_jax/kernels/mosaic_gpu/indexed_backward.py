"""Backward kernels on Pallas Mosaic GPU that gather their rows in the kernel: the gradients of
`indexed_forward.py`'s attention added into float32 accumulators in the public layout, in place.

The Mosaic twin of `kernels/gpu/indexed_backward.py` (same arguments, same jnp twin `indexed_tiled_backward_reference`)
and the row-gathering form of `tiled_backward.py` (same products, same keys-major dk, dv), so that the backward needs
no sorted copies of q, dO, lse, delta and no scatter of dq, dk, dv back:

- dq: a warpgroup owns 64 query slots of one block and head. It gathers their q, dO rows (cp.async, `row_copies`) and
  their lse, delta values, streams every tile's keys in the forward's chunks (the per-block tiles' rows gathered, the
  shared tiles copied by TMA; two slots, the next chunk in flight): S = q k^T, dP = dO v^T, dS = P (dP - delta),
  dq += dS k, and adds dq into the accumulator at its rows (every row sits in one slot).
- dk, dv of a per-block tile (the sorted blocks): a warpgroup owns 64 keys of one block, gathered once, and streams
  the block's queries of every head of the group in 64-row chunks (gathered, two slots, a loop over pairs of chunks):
  S^T = k q^T, dv += P^T dO, dP^T = v dO^T, dk += dS^T q; a key row sits in one block only, so its adds into the
  accumulators never collide.
- dk, dv of a shared tile (samples, global keys; its own k, v by TMA): partial sums over runs of query blocks into a
  float32 array, added into the accumulators by XLA with the tile's repeated rows folded first, as the Triton
  kernels do (`add_shared_tile_grads`).

Like the Triton kernels they take the FINAL lse and delta of the merged attention (delta_i = sum_h dO_ih O_ih -
dlse_i), so P_ij = w_j exp(s_ij - lse_i) is this part's share of the merged softmax.

Interpret mode (CPU): the row copies go one row at a time (`row_copies`), and P, dS reach their wgmmas through shared
memory, which is all the interpreter's wgmma takes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hyperattn_jax.kernels.configs import ROWS_PER_WARPGROUP, MosaicTiling
from hyperattn_jax.kernels.gpu.indexed_backward import add_shared_tile_grads, fold_repeated_rows, runs_of_blocks
from hyperattn_jax.kernels.gpu.indexed_forward import tile_log_weights
from hyperattn_jax.kernels.mosaic_gpu.row_copies import (
    empty_gather_group,
    gather_rows,
    gather_values,
    scatter_add_rows,
    swizzled,
    wait_gathers,
)
from hyperattn_jax.kernels.mosaic_gpu.row_operands import (
    block_entry,
    chunk_steps,
    query_rows,
    split_tile_refs,
    tile_operands,
)
from hyperattn_jax.kernels.mosaic_gpu.tiled_attention import DTYPES, HEAD_DIMS, LOG2_E, interpret_mode
from hyperattn_jax.kernels.mosaic_gpu.tiled_backward import from_registers, key_chunk_grads, product, row_vector
from hyperattn_jax.ops.tiles import KeyTile

ROWS = ROWS_PER_WARPGROUP  # wgmma's M: the rows one warpgroup owns (queries for dq, keys for dk, dv)


def _gather_queries(refs, load_rows, stat_rows, slot, *, interpret: bool):
    """A chunk of 64 queries into `slot`: q, dO rows as one cp.async group, lse and delta values by plain loads.
    refs: (q, dO, lse, delta) in global memory, then their shared buffers."""
    q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem = refs
    gather_rows(load_rows, [(q_ref, q_smem.at[slot]), (do_ref, do_smem.at[slot])], interpret=interpret)
    gather_values(lse_ref, stat_rows, lse_smem.at[slot], interpret=interpret)
    gather_values(delta_ref, stat_rows, delta_smem.at[slot], interpret=interpret)


def _dq_kernel(load_ref, stat_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, tiles, query_block: int,
               block_k: int, scale: float, interpret: bool, a_in_registers: bool):  # fmt: skip
    per_tile, (dq_acc, *scratch) = split_tile_refs(tiles, refs)
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, w_smem, dq_smem, k_bar, v_bar, w_bar, *ds_smem = scratch
    ds_smem = None if a_in_registers else ds_smem[0]
    chunk, head, problem = lax.axis_index("rows"), lax.axis_index("group"), lax.axis_index("problem")
    rows = pl.ds(chunk * ROWS, ROWS)
    block = lax.div(chunk, jnp.int32(query_block // ROWS))
    steps = chunk_steps(tiles, block_k)
    groups = []  # the cp.async groups committed so far, by name: they complete in order

    def issue(step: int):
        (sources, w_ref), tile = per_tile[steps[step][0]], tiles[steps[step][0]]
        slot, keys = step % 2, pl.ds(steps[step][1] * block_k, block_k)
        if tile.indexed:
            gather_rows(sources[0].at[problem, block, keys], [(k_ref, k_smem.at[slot]), (v_ref, v_smem.at[slot])],
                        interpret=interpret)  # fmt: skip
            groups.append(step)
        else:
            for src, dst, bar in zip(sources, (k_smem, v_smem), (k_bar, v_bar), strict=True):
                plgpu.copy_gmem_to_smem(src.at[problem, block_entry(src, block), keys], dst.at[slot], bar.at[slot])
        if w_ref is not None:
            plgpu.copy_gmem_to_smem(w_ref.at[problem, block_entry(w_ref, block), keys], w_smem.at[slot], w_bar.at[slot])

    def wait_for(name):
        wait_gathers(len(groups) - 1 - groups.index(name), interpret=interpret)

    query_refs = (q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem)
    _gather_queries(query_refs, load_ref.at[problem, head, rows], stat_ref.at[problem, head, rows], 0,
                    interpret=interpret)  # fmt: skip
    groups.append("q")
    issue(0)
    wait_for("q")
    lse2 = row_vector(lse_smem.at[0], 1) * LOG2_E
    delta = row_vector(delta_smem.at[0], 1)
    dq = plgpu.layout_cast(jnp.zeros((ROWS, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    for step in range(len(steps)):
        slot, tile = step % 2, tiles[steps[step][0]]
        if step + 1 < len(steps):  # the other slot's readers (the previous step's wgmmas) have finished
            issue(step + 1)
        if tile.indexed:
            wait_for(step)
        else:
            plgpu.barrier_wait(k_bar.at[slot])
        s = product(q_smem.at[0], k_smem.at[slot].T, (ROWS, block_k)) * (scale * LOG2_E)
        if tile.weighted:
            plgpu.barrier_wait(w_bar.at[slot])
            s = s + lax.broadcast_in_dim(row_vector(w_smem.at[slot], 0), s.shape, [1])
        p = jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [0]))
        if not tile.indexed:
            plgpu.barrier_wait(v_bar.at[slot])
        dp = product(do_smem.at[0], v_smem.at[slot].T, (ROWS, block_k))
        ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
        dq = dq + product(from_registers(ds.astype(q_smem.dtype), ds_smem), k_smem.at[slot], dq.shape)
    dq_smem[...] = dq * scale
    plgpu.commit_smem()
    scatter_add_rows(dq_smem, load_ref.at[problem, head, rows], dq_acc, interpret=interpret)


def _stream_query_chunks(num_steps: int, issue, compute, carry, *, interpret: bool):
    """compute(step, slot, carry) -> carry for every step with the next step's copies (`issue(step, slot)`, one
    cp.async group) in flight: a loop over pairs of steps, so that each step's slot (step mod 2) is static (the
    gathers' addresses in shared memory are), and an empty group where there is no next step, so that every step
    waits for all but one group. Step 0's copies must be issued before."""

    def run(step, slot, carry):
        has_next = step + 1 < num_steps
        pl.when(has_next)(functools.partial(issue, step + 1, 1 - slot))
        pl.when(jnp.logical_not(has_next))(functools.partial(empty_gather_group, interpret=interpret))
        return compute(step, slot, carry)

    def pair(i, carry):
        return run(2 * i + 1, 1, run(2 * i, 0, carry))

    carry = lax.fori_loop(0, num_steps // 2, pair, carry)
    if num_steps % 2:
        carry = run(jnp.int32(num_steps - 1), 0, carry)
    return carry


def _key_grads(keys_smem, query_refs, stat_smem, weight, *, num_steps: int, issue, scale: float, interpret: bool,
               a_smem):  # fmt: skip
    """dk, dv float32 (WGMMA layout) of the 64 keys in keys_smem = (k, v) over `num_steps` query chunks (`issue`
    copies chunk `step` into a slot: `_gather_queries`); `weight(step, slot)` gives the keys' base-2 log-weights
    seen by that chunk (a row vector along the keys) or None."""

    def compute(step, slot, grads):
        wait_gathers(1, interpret=interpret)  # this step's rows are in; the next step's may be in flight
        queries = tuple(ref.at[slot] for ref in (*query_refs, *stat_smem))
        return key_chunk_grads(grads, keys_smem, queries, scale=scale, a_smem=a_smem, log_weight=weight(step, slot))

    zeros = plgpu.layout_cast(jnp.zeros((ROWS, keys_smem[0].shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    issue(0, 0)
    dk, dv = _stream_query_chunks(num_steps, issue, compute, (zeros, zeros), interpret=interpret)
    return dk * scale, dv


def _query_chunk_issuer(load_ref, stat_ref, query_refs, *, problem, groups: int, query_block: int, first_block,
                        interpret: bool):  # fmt: skip
    """issue(step, slot) for the query chunks of query blocks first_block, first_block + 1, ..., every head of the
    group within a block, 64-row chunks within a head: (block, head, chunk) of step = ((b G) + g) (bq / 64) + c."""
    per_head = query_block // ROWS

    def location(step):
        block = first_block + lax.div(step, jnp.int32(groups * per_head))
        head = lax.rem(lax.div(step, jnp.int32(per_head)), jnp.int32(groups))
        return block, head, pl.ds(block * query_block + lax.rem(step, jnp.int32(per_head)) * ROWS, ROWS)

    def issue(step, slot):
        _, head, rows = location(step)
        _gather_queries(query_refs, load_ref.at[problem, head, rows], stat_ref.at[problem, head, rows], slot,
                        interpret=interpret)  # fmt: skip

    return issue, location


def _block_dkdv_kernel(rows_ref, load_ref, stat_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs,
                       weighted: bool, groups: int, query_block: int, scale: float, interpret: bool,
                       a_in_registers: bool):  # fmt: skip
    """dk, dv of 64 keys of one sorted block (rows named by rows_ref), added into the accumulators at their rows."""
    w_ref, refs = (refs[0], refs[1:]) if weighted else (None, refs)
    dk_acc, dv_acc, k_smem, v_smem, w_smem, q_smem, do_smem, lse_smem, delta_smem, grad_smem, w_bar, *a_smem = refs
    keys_at, block, problem = lax.axis_index("keys"), lax.axis_index("block"), lax.axis_index("problem")
    key_rows = rows_ref.at[problem, block, pl.ds(keys_at * ROWS, ROWS)]
    gather_rows(key_rows, [(k_ref, k_smem), (v_ref, v_smem)], interpret=interpret)  # the first group
    if weighted:
        plgpu.copy_gmem_to_smem(w_ref.at[problem, block_entry(w_ref, block), pl.ds(keys_at * ROWS, ROWS)], w_smem,
                                w_bar)  # fmt: skip
    query_refs = (q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem)
    issue, _ = _query_chunk_issuer(load_ref, stat_ref, query_refs, problem=problem, groups=groups,
                                   query_block=query_block, first_block=block, interpret=interpret)  # fmt: skip
    fixed = None
    if weighted:
        plgpu.barrier_wait(w_bar)
        fixed = row_vector(w_smem, 1)
    dk, dv = _key_grads((k_smem, v_smem), (q_smem, do_smem), (lse_smem, delta_smem), lambda step, slot: fixed,
                        num_steps=groups * query_block // ROWS, issue=issue, scale=scale, interpret=interpret,
                        a_smem=(None, None) if a_in_registers else a_smem)  # fmt: skip
    for grad, acc in ((dk, dk_acc), (dv, dv_acc)):
        grad_smem[...] = grad
        plgpu.commit_smem()
        scatter_add_rows(grad_smem, key_rows, acc, interpret=interpret)
        plgpu.commit_smem()  # every thread's reads of grad_smem are done before dv overwrites it


def _shared_dkdv_kernel(load_ref, stat_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, w_ref, dk_ref, dv_ref,
                        *scratch, per_block: bool, blocks_per_split: int, groups: int, query_block: int,
                        scale: float, interpret: bool, a_in_registers: bool):  # fmt: skip
    """Partial dk, dv of 64 keys of a shared tile over a run of `blocks_per_split` query blocks."""
    k_smem, v_smem, w_smem, q_smem, do_smem, lse_smem, delta_smem, dk_smem, dv_smem, kv_bar, wq_bar, *a_smem = scratch
    keys_at, split, problem = lax.axis_index("keys"), lax.axis_index("split"), lax.axis_index("problem")
    keys = pl.ds(keys_at * ROWS, ROWS)
    for src, dst in ((k_ref, k_smem), (v_ref, v_smem)):
        plgpu.copy_gmem_to_smem(src.at[problem, 0, keys], dst, kv_bar)
    query_refs = (q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem)
    gather_queries, location = _query_chunk_issuer(
        load_ref, stat_ref, query_refs, problem=problem, groups=groups, query_block=query_block,
        first_block=split * blocks_per_split, interpret=interpret,
    )  # fmt: skip

    def issue(step, slot):  # with per-block log-weights, the row this chunk's block sees (TMA)
        gather_queries(step, slot)
        if per_block:
            block = location(step)[0]
            plgpu.copy_gmem_to_smem(w_ref.at[problem, block, keys], w_smem.at[slot], wq_bar.at[slot])

    if not per_block:
        plgpu.copy_gmem_to_smem(w_ref.at[problem, 0, keys], w_smem.at[0], wq_bar.at[0])
    plgpu.barrier_wait(kv_bar)
    fixed = None
    if not per_block:
        plgpu.barrier_wait(wq_bar.at[0])
        fixed = row_vector(w_smem.at[0], 1)

    def weight(step, slot):
        if fixed is not None:
            return fixed
        plgpu.barrier_wait(wq_bar.at[slot])
        return row_vector(w_smem.at[slot], 1)

    dk, dv = _key_grads((k_smem, v_smem), (q_smem, do_smem), (lse_smem, delta_smem), weight,
                        num_steps=blocks_per_split * groups * query_block // ROWS, issue=issue, scale=scale,
                        interpret=interpret, a_smem=(None, None) if a_in_registers else a_smem)  # fmt: skip
    dk_smem[...], dv_smem[...] = dk, dv
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[problem, split, keys])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[problem, split, keys])
    plgpu.wait_smem_to_gmem(0)


def _query_scratch(h: int, dtype, slots: int = 2):
    """`slots` slots of a 64-query chunk: q, dO (swizzled), lse, delta."""
    chunk = [swizzled((slots, ROWS, h), dtype), swizzled((slots, ROWS, h), dtype)]
    return [*chunk, plgpu.SMEM((slots, ROWS), jnp.float32), plgpu.SMEM((slots, ROWS), jnp.float32)]


def _a_scratch(dtype, a_in_registers: bool, columns: int = ROWS):
    """The interpreter's shared buffers for the wgmma A operands formed in registers (P^T and dS^T, or dS): its wgmma
    reads no registers."""
    return [] if a_in_registers else [swizzled((ROWS, columns), dtype)] * 2


def unsupported_shape(q_rows, query_index, tiles, tile_key_index) -> str | None:
    """Why `indexed_tiled_backward_mosaic` cannot take a call (None when it can)."""
    h, bq = q_rows.shape[-1], query_index.shape[-1]
    if jnp.dtype(q_rows.dtype) not in DTYPES or h not in HEAD_DIMS:
        return f"the Mosaic GPU kernels take {DTYPES} and head dims {HEAD_DIMS}, got {q_rows.dtype}, {h=}"
    if bq % ROWS:
        return f"query blocks must be a multiple of {ROWS} slots, got {bq}"
    for tile, index in zip(tiles, tile_key_index, strict=True):
        if tile.k is None and index.shape[-1] % ROWS:
            return f"per-block tiles must hold a multiple of {ROWS} keys (their rows get no padding), got {index.shape}"
    return None


class _Call(NamedTuple):
    """What every kernel of one backward call shares."""

    queries: tuple  # (query rows of q, dO `[P K, G, nb bq]`, of lse, delta), then q, dO, lse, delta flattened
    keys: tuple  # k, v flattened `[B S K, H]`
    groups: int
    query_block: int
    sizes: tuple  # (problems x kv heads, query blocks)
    scale: float
    interpret: object  # None (GPU) or the interpreter's parameters

    def run(self, kernel, scratch, grid, grid_names, out_type=(), **static):
        interpret = self.interpret is not None
        return plgpu.kernel(
            functools.partial(kernel, scale=self.scale, interpret=interpret, a_in_registers=not interpret, **static),
            out_type=out_type,
            scratch_types=scratch,
            grid=grid,
            grid_names=grid_names,
            compiler_params=plgpu.CompilerParams(approx_math=True),
            interpret=self.interpret,
        )


def _dq(call: _Call, k, v, tiles, tile_key_index, dq_acc, block_k: int):
    """Adds dq into the accumulator ref: the forward's grid and chunk schedule; shared tiles read their own k, v."""
    h, dtype = k.shape[-1], call.queries[2].dtype
    pk, nb = call.sizes
    indexed = [index if tile.k is None else None for tile, index in zip(tiles, tile_key_index, strict=True)]
    facts, arrays = tile_operands(k, v, tiles, indexed, problems=pk // k.shape[2], num_blocks=nb, block_k=block_k)
    key_ring = [
        swizzled((2, block_k, h), dtype),
        swizzled((2, block_k, h), dtype),
        plgpu.SMEM((2, block_k), jnp.float32),
    ]
    scratch = [*_query_scratch(h, dtype, slots=1), *key_ring, swizzled((ROWS, h), jnp.float32)]
    scratch += [plgpu.Barrier(num_barriers=2) for _ in range(3)]  # k, v, log-weights (TMA): one per slot
    scratch += _a_scratch(dtype, call.interpret is None, block_k)[:1]
    grid = (nb * call.query_block // ROWS, call.groups, pk)
    kernel = call.run(_dq_kernel, scratch, grid, ("rows", "group", "problem"), tiles=facts,
                      query_block=call.query_block, block_k=block_k)  # fmt: skip
    kernel(*call.queries, *call.keys, *(x for tile_arrays in arrays for x in tile_arrays), dq_acc)


def _block_dkdv(call: _Call, k, v, tile, key_index, accumulators):
    """Adds a per-block tile's dk, dv into the accumulator refs."""
    h, dtype = k.shape[-1], call.queries[2].dtype
    pk, nb = call.sizes
    (fact,), ((rows, *weights),) = tile_operands(k, v, [tile], [key_index], problems=pk // k.shape[2], num_blocks=nb,
                                                 block_k=ROWS)  # fmt: skip
    scratch = [swizzled((ROWS, h), dtype), swizzled((ROWS, h), dtype), plgpu.SMEM((ROWS,), jnp.float32)]
    scratch += [*_query_scratch(h, dtype), swizzled((ROWS, h), jnp.float32), plgpu.Barrier()]
    scratch += _a_scratch(dtype, call.interpret is None)
    grid = (key_index.shape[-1] // ROWS, nb, pk)
    kernel = call.run(_block_dkdv_kernel, scratch, grid, ("keys", "block", "problem"), weighted=fact.weighted,
                      groups=call.groups, query_block=call.query_block)  # fmt: skip
    kernel(rows, *call.queries, *call.keys, *weights, *accumulators)


def _shared_dkdv(call: _Call, tile, key_index, *, splits_wanted: int):
    """A shared tile's partial dk, dv float32 `[P K, splits, t, H]` over runs of query blocks, its repeated rows
    folded (log-weight + log count in the first slot), and the rows to add them at (`fold_repeated_rows`)."""
    pk, nb = call.sizes
    length, h, dtype = key_index.shape[-1], tile.k.shape[-1], tile.k.dtype
    w, per_block = tile_log_weights(tile, problems=key_index.shape[0], kv_heads=key_index.shape[1], num_blocks=nb,
                                    length=length)  # fmt: skip
    w, write_index = fold_repeated_rows(jnp.zeros((pk, 1, length), jnp.float32) if w is None else w, key_index)
    padded = -(-length // ROWS) * ROWS
    tile_k, tile_v = (jnp.pad(x.reshape(pk, 1, length, h), [(0, 0), (0, 0), (0, padded - length), (0, 0)])
                      for x in (tile.k, tile.v))  # fmt: skip
    w = jnp.pad(w * LOG2_E, [(0, 0), (0, 0), (0, padded - length)], constant_values=-jnp.inf)
    splits = runs_of_blocks(nb, splits_wanted)
    scratch = [swizzled((ROWS, h), dtype), swizzled((ROWS, h), dtype), plgpu.SMEM((2, ROWS), jnp.float32)]
    scratch += [*_query_scratch(h, dtype), swizzled((ROWS, h), jnp.float32), swizzled((ROWS, h), jnp.float32)]
    scratch += [
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_barriers=2),
        *_a_scratch(dtype, call.interpret is None),
    ]
    part = jax.ShapeDtypeStruct((pk, splits, padded, h), jnp.float32)
    kernel = call.run(_shared_dkdv_kernel, scratch, (padded // ROWS, splits, pk), ("keys", "split", "problem"),
                      out_type=(part, part), per_block=per_block, blocks_per_split=nb // splits, groups=call.groups,
                      query_block=call.query_block)  # fmt: skip
    part_k, part_v = kernel(*call.queries, tile_k, tile_v, w)
    return (part_k[:, :, :length], part_v[:, :, :length]), write_index


def indexed_tiled_backward_mosaic(q_rows, k, v, do_rows, lse, delta, query_index, tiles, tile_key_index, grads, *,
                                  scale, tiling=None, interpret=None, value_mixes=None,
                                  shared_splits_wanted: int = 16):  # fmt: skip
    """`kernels.gpu.indexed_tiled_backward` on Mosaic GPU: add the gradients of the row-gathering forward's attention
    (one part of a merged attention with final `lse`, `delta`) into float32 accumulators, every row read by index.

    Args: as `indexed_tiled_backward`'s (q_rows, do_rows `[B, T, K, G, H]` 16-bit, H 64 or 128; lse (finite), delta
      float32 `[B, K, G, T]`; query blocks a multiple of 64 slots, every slot a real row; per-block tiles by rows, a
      multiple of 64 keys, each row at most once; shared tiles with their own k, v; grads the accumulators or None),
      with `tiling` (`MosaicTiling`: its block_k is the dq kernel's key chunk) in place of the Triton tuning,
      `interpret` as `indexed_tiled_forward_mosaic`'s, shared_splits_wanted as `TiledKernelConfig.shared_splits`.

    Returns:
      the accumulators (dq `[B, T, K, G, H]`, dk, dv `[B, S, K, H]` float32) with this part's gradients added (to
      zeros when grads is None), updated in place (mutable refs: XLA aliases the buffers).
    """
    tiles = [KeyTile(*tile) for tile in tiles]
    if (why := unsupported_shape(q_rows, query_index, tiles, tile_key_index)) is not None:
        raise ValueError(why)
    tiling = MosaicTiling() if tiling is None else tiling
    b, t, kv_heads, groups, h = q_rows.shape
    problems, nb, bq = query_index.shape[0], query_index.shape[3], query_index.shape[4]
    if max(b * t * kv_heads * groups, b * k.shape[1] * kv_heads) >= 2**31:  # rows are int32 in the kernels
        raise ValueError(f"too many rows for int32 row numbers: q {q_rows.shape}, k {k.shape}")
    if grads is None:
        grads = [jnp.zeros(x.shape, jnp.float32) for x in (q_rows, k, v)]
    load, _, stat = query_rows(query_index, b, t, groups, padded=False)  # every slot real: rows read = rows written
    flat = (q_rows.reshape(-1, h), do_rows.astype(q_rows.dtype).reshape(-1, h), lse.reshape(-1), delta.reshape(-1))
    call = _Call(queries=(load, stat, *flat), keys=(k.reshape(-1, h), v.reshape(-1, h)), groups=groups,
                 query_block=bq, sizes=(problems * kv_heads, nb), scale=float(scale),
                 interpret=interpret_mode(interpret))  # fmt: skip
    accumulators = [jax.new_ref(x.reshape(-1, h)) for x in grads]  # written in place by the kernels
    _dq(call, k, v, tiles, tile_key_index, accumulators[0], tiling.block_k)
    value_mixes = [None] * len(tiles) if value_mixes is None else value_mixes
    for tile, key_index, value_mix in zip(tiles, tile_key_index, value_mixes, strict=True):
        if tile.k is None:
            _block_dkdv(call, k, v, tile, key_index, accumulators[1:])
            continue
        parts, write_index = _shared_dkdv(call, tile, key_index, splits_wanted=shared_splits_wanted)
        dk, dv = (ref[...].reshape(k.shape) for ref in accumulators[1:])
        dk, dv = add_shared_tile_grads((dk, dv), parts, write_index, key_index, value_mix, b)
        accumulators[1:] = [jax.new_ref(x.reshape(-1, h)) for x in (dk, dv)]
    dq, dk, dv = (ref[...] for ref in accumulators)
    return dq.reshape(q_rows.shape), dk.reshape(k.shape), dv.reshape(v.shape)
