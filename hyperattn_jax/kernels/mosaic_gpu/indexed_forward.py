"""Tile-attention forward on Pallas Mosaic GPU that gathers its rows in the kernel: no sorted copies of q, k, v, out.

The Mosaic twin of `kernels/gpu/indexed_forward.py` (same arguments, same jnp twin
`indexed_tiled_forward_reference`): each program (64 blocked query slots of one query head) copies its queries
`q[query_index]` and, chunk by chunk, its block's keys `k[key_index]`, `v[key_index]` from the unsorted public-layout
arrays into shared memory (`row_copies.gather_rows`: cp.async, 16 bytes per copy), runs the online softmax of
`tiled_attention.attend_chunk` (wgmma) over them and over the shared tiles (samples, global keys: small,
pre-gathered, copied by TMA as in `tiled_attention.py`), and stores out and lse at the query rows. Key chunks go
through a ring of `MosaicTiling.stages` slots: the gathers of the next chunks are in flight while one is multiplied;
each indexed chunk's key rows reach shared memory by TMA a chunk before its gathers read them (`stage_rows`).

Why: with XLA's sorted copies (`tiled_attention_mosaic`), the Mosaic path was 42-47% slower end to end than the
Triton path, which reads rows by index (`results/mosaic_check_h100.json`), though its kernel alone was 5-14% faster.

Scope: the forward, one or two compute warpgroups per program (two share each key chunk) and optionally a producer
warpgroup that issues every copy (`warp_specialised.py`; with two compute warpgroups optionally in a ping-pong
schedule), query blocks a multiple of 64 slots per compute warpgroup, H 64 or 128, bf16/fp16.
With `merge_into` (a causal recursion's part) the program also gathers the running out rows and lse of its queries
and merges its part into them by lse before the stores, in place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hyperattn_jax.kernels.configs import MosaicTiling
from hyperattn_jax.kernels.mosaic_gpu.row_copies import (
    announce_gathered,
    gather_barriers,
    gather_rows,
    gather_values,
    init_gather_barriers,
    scatter_rows,
    scatter_values,
    swizzled,
    wait_gather_barrier,
    wait_gathers,
)
from hyperattn_jax.kernels.mosaic_gpu.row_operands import (
    block_entry,
    chunk_steps,
    query_rows,
    split_tile_refs,
    tile_operands,
)
from hyperattn_jax.kernels.mosaic_gpu.tiled_attention import (
    DTYPES,
    HEAD_DIMS,
    SMEM_LIMIT,
    attend_chunk,
    interpret_mode,
    softmax_finish,
    softmax_merge,
    softmax_start,
)
from hyperattn_jax.kernels.mosaic_gpu.warp_specialised import gather_and_compute, rendezvous
from hyperattn_jax.ops.tiles import KeyTile


def _smem_bytes(head_dim: int, tiling: MosaicTiling, merge: bool = False) -> int:
    """Shared memory of one program on the GPU (16-bit inputs, P in registers; barriers not counted): per compute
    warpgroup q (then out) and the lse, with `merge` also the earlier out rows and lse, with `stage_store_rows` the
    rows they are stored at; the ring's k, v, log-weights and key rows."""
    ring = tiling.stages * tiling.block_k * (2 * 2 * head_dim + 4 + 4)
    per_warpgroup = (1 + merge) * (2 * tiling.block_q * head_dim + 4 * tiling.block_q)
    per_warpgroup += 2 * 4 * tiling.block_q * tiling.stage_store_rows
    return tiling.compute_warpgroups * per_warpgroup + ring


def _kernel(q_load_ref, out_rows_ref, lse_rows_ref, q_ref, k_ref, v_ref, *refs, tiles, query_block: int,
            block_k: int, scale: float, interpret: bool, p_in_registers: bool, stage_rows: bool,
            producer: bool, merge: bool, warpgroups: int, pingpong: bool, stage_store_rows: bool,
            share_heads: bool):  # fmt: skip
    """One program: `warpgroups` x 64 query slots of one query head and query block, one compute warpgroup per 64.
    Key chunks go through a ring of `stages` slots shared by the compute warpgroups: the gathers of the next
    stages - 1 chunks are in flight while one is multiplied, issued by the computing warpgroups themselves (each its
    share of the rows) or, with `producer`, by one more warpgroup (`_gather_and_compute`). With `merge`, o_ref and
    lse_ref hold an earlier partial result: its rows are gathered with the queries and merged by lse before the
    stores."""
    per_tile, (o_ref, lse_ref, *scratch) = split_tile_refs(tiles, refs)
    q_smem, k_smem, v_smem, w_smem, lse_smem, k_bar, v_bar, w_bar, rows_smem, rows_bar = scratch[:10]
    rest = scratch[10:]
    store_rows_smem, store_rows_bar = (rest.pop(0), rest.pop(0)) if stage_store_rows else (None, None)
    earlier_smem, earlier_lse_smem = (rest.pop(0), rest.pop(0)) if merge else (None, None)
    p_smem = None if p_in_registers else rest.pop(0)
    # a slot's products are done; a gathered slot has landed (`gather_barriers`); the ping-pong schedule
    consumed, landed, schedule = [*rest, None][:3] if rest else (None,) * 3
    shared = warpgroups > 1 or producer  # the ring's slots are shared between warpgroups: barriers order them
    if shared:  # every gathering thread arrives on them once per phase
        init_gather_barriers(landed, 1 if producer else warpgroups, interpret=interpret)
    stage_rows = stage_rows and not shared  # a producer's row loads stall no product
    block_q, stages = q_smem.shape[1], k_smem.shape[0]
    chunk, problem = lax.axis_index("rows"), lax.axis_index("problem")
    # this compute warpgroup's queries and buffers (with a producer, whose index is `warpgroups`, unused by it)
    me = lax.axis_index("wg") if shared else 0
    if share_heads:  # the same slots of one query block for `warpgroups` heads of the kv group
        head, rows = lax.axis_index("group") * warpgroups + me, pl.ds(chunk * block_q, block_q)
        block = lax.div(chunk, jnp.int32(query_block // block_q))
    else:  # `warpgroups` x 64 slots of one query block of one head
        head, rows = lax.axis_index("group"), pl.ds((chunk * warpgroups + me) * block_q, block_q)
        block = lax.div(chunk, jnp.int32(query_block // (warpgroups * block_q)))
    q_mine, lse_mine = q_smem.at[me], lse_smem.at[me]
    p_mine = None if p_smem is None else p_smem.at[me]

    steps = chunk_steps(tiles, block_k)
    groups = []  # the cp.async groups committed so far, by name: gathers complete in order

    def key_rows(step: int, first: int = 0, count: int = block_k):
        i, c = steps[step]
        return per_tile[i][0][0].at[problem, block, pl.ds(c * block_k + first, count)]

    def stage(step: int):
        """Copy an indexed step's key rows into shared memory (TMA) a step before its gathers read them, so that the
        gathers wait on no global load. The slot held the rows of step - stages, whose gathers every thread has
        issued (the barrier orders those reads before the copy)."""
        if stage_rows and step < len(steps) and tiles[steps[step][0]].indexed:
            if step >= stages:
                plgpu.commit_smem()
            slot = step % stages
            plgpu.copy_gmem_to_smem(key_rows(step), rows_smem.at[slot], rows_bar.at[slot])

    def gather_keys(step: int, slot: int, share: int):
        """Rows [share * n, (share + 1) * n) of an indexed step's chunk, n = block_k / parts, into its slot."""
        parts = 1 if producer else warpgroups
        count = block_k // parts
        rows_ref = key_rows(step, share * count, count)
        if stage_rows:
            plgpu.barrier_wait(rows_bar.at[slot])
            rows_ref = rows_smem.at[slot]
        pairs = [(k_ref, k_smem.at[slot]), (v_ref, v_smem.at[slot])]
        arrive_on = (landed, slot) if shared else None  # shared slots: announced as the copies land
        gather_rows(rows_ref, pairs, first=share * count, interpret=interpret, arrive_on=arrive_on)

    def issue(step: int, slot: int):
        """The copies of chunk `step` into `slot`: by the producer, or by the compute warpgroups, each gathering
        its share of an indexed chunk's rows, the first one issuing the TMA copies (pre-gathered tiles, weights)."""
        i, c = steps[step]
        (sources, w_ref), tile = per_tile[i], tiles[i]
        keys = pl.ds(c * block_k, block_k)
        if tile.indexed:
            if producer or warpgroups == 1:
                gather_keys(step, slot, 0)
            else:  # a static branch per warpgroup: static row offsets in the swizzled layout
                for share in range(warpgroups):
                    pl.when(me == share)(functools.partial(gather_keys, step, slot, share))
            if not shared:
                groups.append(step)

        def copies():
            if not tile.indexed:
                for src, dst, bar in zip(sources, (k_smem, v_smem), (k_bar, v_bar), strict=True):
                    plgpu.copy_gmem_to_smem(src.at[problem, block_entry(src, block), keys], dst.at[slot], bar.at[slot])
            if w_ref is not None:
                weights = w_ref.at[problem, block_entry(w_ref, block), keys]
                plgpu.copy_gmem_to_smem(weights, w_smem.at[slot], w_bar.at[slot])

        if producer or warpgroups == 1:
            copies()
        else:
            pl.when(me == 0)(copies)

    def wait_for(name):
        wait_gathers(len(groups) - 1 - groups.index(name), interpret=interpret)

    def wait_landed(step: int):
        """Wait until every share of indexed step `step`'s rows is in its slot, visible to wgmma. On the GPU the
        copies arrive on the slot's gather barrier as they land; the n-th indexed use of a slot completes phase n, of
        parity n mod 2. The interpreter's copies are done when issued: the gatherers announce them."""
        slot = step % stages
        if not producer:  # this warpgroup gathered its share of the rows itself
            announce_gathered(landed, slot, interpret=interpret)
        uses = sum(tiles[steps[s][0]].indexed for s in range(slot, step, stages))
        wait_gather_barrier(landed, slot, uses % 2, interpret=interpret)

    def attend(state, step: int):
        slot, tile = step % stages, tiles[steps[step][0]]
        wait_values = None if tile.indexed else functools.partial(plgpu.barrier_wait, v_bar.at[slot])
        hooks = dict(before_values=wait_values)
        if pingpong:  # the tensor cores go to the other warpgroup while this one's softmax runs, and back
            hooks = dict(after_qk=functools.partial(rendezvous, schedule),
                         before_values=functools.partial(rendezvous, schedule, wait_values))  # fmt: skip
        return attend_chunk(
            state, q_mine, k_smem.at[slot], v_smem.at[slot], w_smem.at[slot] if tile.weighted else None, scale=scale,
            p_smem=p_mine, before_weights=functools.partial(plgpu.barrier_wait, w_bar.at[slot]), **hooks,
        )  # fmt: skip

    def gather_queries():
        """q's rows and, with `merge`, the earlier partial out (the same rows: no padding slots) and lse: one cp.async
        group for the rows; the lse values by plain loads."""
        pairs = [(q_ref, q_mine)] + ([(o_ref, earlier_smem.at[me])] if merge else [])
        gather_rows(q_load_ref.at[problem, head, rows], pairs, interpret=interpret)
        if stage_store_rows:  # the rows the stores go to, in shared memory by the time they are needed
            for i, rows_ref in enumerate((out_rows_ref, lse_rows_ref)):
                plgpu.copy_gmem_to_smem(rows_ref.at[problem, head, rows], store_rows_smem.at[me, i],
                                        store_rows_bar.at[me])  # fmt: skip
        if merge:
            gather_values(lse_ref, lse_rows_ref.at[problem, head, rows], earlier_lse_smem.at[me], interpret=interpret)

    def finish(state):
        if merge:  # the earlier gathers were waited for with the queries'
            state = softmax_merge(state, earlier_smem.at[me], earlier_lse_smem.at[me])
        o_smem = q_mine  # every wgmma reading q has completed: its buffer takes the output (8 KB less at H 64)
        o_smem[...], lse_mine[...] = softmax_finish(state, q_mine.dtype)
        plgpu.commit_smem()
        out_rows, lse_rows = out_rows_ref.at[problem, head, rows], lse_rows_ref.at[problem, head, rows]
        if stage_store_rows:
            plgpu.barrier_wait(store_rows_bar.at[me])
            out_rows, lse_rows = store_rows_smem.at[me, 0], store_rows_smem.at[me, 1]
        scatter_rows(o_smem, out_rows, o_ref, interpret=interpret)
        scatter_values(lse_mine, lse_rows, lse_ref, interpret=interpret)

    start = functools.partial(softmax_start, block_q, q_smem.shape[-1])
    if producer:
        gather_and_compute(steps, tiles, issue, attend, finish, wait_landed, landed, consumed, k_bar, stages=stages,
                           warpgroups=warpgroups, gather_queries=gather_queries, start=start,
                           interpret=interpret, schedule=schedule if pingpong else None)  # fmt: skip
        return
    # named scopes: the regions of a profiled call's trace (`profile_dir`); nothing otherwise
    with jax.named_scope("issue"):
        for step in range(stages):
            stage(step)
        gather_queries()
        groups.append("q")
        for step in range(min(stages - 1, len(steps))):
            issue(step, step)
    with jax.named_scope("wait"):
        wait_for("q")
    state = start()
    for step in range(len(steps)):
        slot = step % stages
        indexed = tiles[steps[step][0]].indexed
        with jax.named_scope("issue"):
            stage(step + stages)
            ahead = step + stages - 1
            if ahead < len(steps):  # its slot's readers (the previous step's wgmmas) have finished
                if shared and ahead >= stages:  # every warpgroup's: they arrived on `consumed`
                    plgpu.barrier_wait(consumed.at[ahead % stages])
                issue(ahead, ahead % stages)
        with jax.named_scope("wait"):
            if indexed and shared:  # every warpgroup's share of the rows is in
                wait_landed(step)
            elif indexed:
                wait_for(step)
            else:
                plgpu.barrier_wait(k_bar.at[slot])
        with jax.named_scope("attend"):
            state = attend(state, step)
        if shared and step + stages < len(steps):
            plgpu.barrier_arrive(consumed.at[slot])
    with jax.named_scope("store"):
        finish(state)


def _profile_params(profile_dir, num_chunks: int) -> dict:
    """CompilerParams fields of a profiled call: room for the two events of each of a warpgroup's regions (about
    four per key chunk; any past that are dropped, not written over other memory)."""
    if profile_dir is None:
        return {}
    return dict(profile_dir=str(profile_dir), profile_space=2 * (4 * num_chunks + 8), profile_bounds_check=True)


def indexed_tiled_forward_mosaic(q_rows, k, v, query_index, tiles, tile_key_index, *, scale, tiling=None,
                                 interpret=None, merge_into=None, profile_dir=None):  # fmt: skip
    """`kernels.gpu.indexed_tiled_forward` on Mosaic GPU: rows gathered in the kernel.

    Args:
      q_rows: `[B, T, K, G, H]` (the public `[B, T, N, H]` split by kv head), bfloat16/float16, H in (64, 128).
      k, v: `[B, S, K, H]`, public layout, q's dtype.
      query_index: int32 `[P, K, G, nb, bq]`: row of q_rows in each blocked slot of problem p (batch p % B), -1 =
        padding; bq a multiple of 64.
      tiles, tile_key_index: as `indexed_tiled_forward`'s (per-block tiles by rows, shared ones pre-gathered).
      scale: softmax scale. tiling: `MosaicTiling`; with `compute_warpgroups=2` a program takes 2 x 64 slots of one
        query block (bq a multiple of 128), whose key chunks both warpgroups share (half the gathers per query), or,
        with `share_heads`, the same 64 slots for two query heads of a kv head (G even). interpret: as
        `tiled_attention_mosaic`.
      merge_into: optional (out `[B, T, K, G, H]` in q's dtype, lse `[B, K, G, T]` float32) of other parts of the
        same attention: the kernel merges its part into them by lse at the rows it names and returns them updated
        in place (passed to the kernel as mutable refs, so XLA aliases the buffers). Every query slot must hold a
        real row (no padding), as for the Triton kernel.
      profile_dir: a folder for Mosaic GPU's on-device profile of this call: a Perfetto trace of every warpgroup's
        named regions ("issue" copies, "wait", "attend", "store"; the producer's "wait_slot") per
        program, with the profiling overhead (GPU only; for `experiments/benchmarks/check_mosaic_indexed.py`).

    Returns:
      out `[B, T, K, G, H]` (q's dtype) and lse `[B, K, G, T]` float32 at the rows query_index names (others
      unspecified, or merge_into's). No gradient rule.
    """
    tiles = [KeyTile(*tile) for tile in tiles]
    tiling = MosaicTiling() if tiling is None else tiling
    b, t, kv_heads, groups, h = q_rows.shape
    problems, nb, bq = query_index.shape[0], query_index.shape[3], query_index.shape[4]
    if jnp.dtype(q_rows.dtype) not in DTYPES or h not in HEAD_DIMS:
        raise ValueError(f"the Mosaic GPU kernel takes {DTYPES} and head dims {HEAD_DIMS}, got {q_rows.dtype}, {h=}")
    if groups % tiling.heads:
        raise ValueError(f"MosaicTiling.share_heads takes {tiling.heads} query heads per kv head at a time, the "
                         f"group has {groups}")  # fmt: skip
    if bq % tiling.rows:
        raise ValueError(f"query blocks must be a multiple of {tiling.rows} slots ({bq=}): {tiling.block_q} per "
                         f"compute warpgroup")  # fmt: skip
    interpret = interpret_mode(interpret)
    merge = merge_into is not None
    if merge and (merge_into[0].shape != q_rows.shape or merge_into[1].shape != (b, kv_heads, groups, t)):
        raise ValueError(f"merge_into must be out {q_rows.shape} and lse {(b, kv_heads, groups, t)}, got "
                         f"{merge_into[0].shape} and {merge_into[1].shape}")  # fmt: skip
    padded = not merge and math.prod(query_index.shape) != b * kv_heads * groups * t
    t_out = t + 1 if padded else t
    if max(b * t_out * kv_heads * groups, b * k.shape[1] * kv_heads) >= 2**31:  # rows are int32 in the kernel
        raise ValueError(f"too many rows for int32 row numbers: q {q_rows.shape}, k {k.shape}")
    if (need := _smem_bytes(h, tiling, merge)) > SMEM_LIMIT:
        raise ValueError(f"{tiling} needs {need} bytes of shared memory at {h=} (limit {SMEM_LIMIT})")
    facts, tile_arrays = tile_operands(k, v, tiles, tile_key_index, problems=problems, num_blocks=nb,
                                        block_k=tiling.block_k)  # fmt: skip
    p_in_registers = tiling.p_in_registers and interpret is None
    block_q, block_k, stages = tiling.block_q, tiling.block_k, tiling.stages
    warpgroups, producer = tiling.compute_warpgroups, tiling.producer
    scratch = [
        swizzled((warpgroups, block_q, h), q_rows.dtype),  # q, then out: one per compute warpgroup
        swizzled((stages, block_k, h), q_rows.dtype),
        swizzled((stages, block_k, h), q_rows.dtype),
        plgpu.SMEM((stages, block_k), jnp.float32),
        plgpu.SMEM((warpgroups, block_q), jnp.float32),
        *(plgpu.Barrier(num_barriers=stages) for _ in range(3)),  # pre-gathered k, v and the weights: one per slot
        plgpu.SMEM((stages, block_k), jnp.int32),  # the key rows of the next gathers (`MosaicTiling.stage_rows`)
        plgpu.Barrier(num_barriers=stages),
        # `stage_store_rows`: the out and lse rows of each compute warpgroup's queries (two TMA copies, one barrier)
        *([plgpu.SMEM((warpgroups, 2, block_q), jnp.int32), plgpu.Barrier(num_arrivals=2, num_barriers=warpgroups)]
          if tiling.stage_store_rows else []),
        # with merge_into: the earlier out rows and lse of each compute warpgroup's queries
        *([swizzled((warpgroups, block_q, h), q_rows.dtype), plgpu.SMEM((warpgroups, block_q), jnp.float32)]
          if merge else []),
        *([] if p_in_registers else [swizzled((warpgroups, block_q, block_k), q_rows.dtype)]),
        # with warpgroups sharing the ring: a slot's products are done (by every compute warpgroup), a gathered slot
        # has landed (filled by the producer, or by every compute warpgroup for its share of the rows)
        *([plgpu.Barrier(num_arrivals=warpgroups, num_barriers=stages),
           gather_barriers(stages, 1 if producer else warpgroups, interpret=interpret is not None)]
          if producer or warpgroups > 1 else []),
        *([plgpu.Barrier(num_arrivals=2)] if tiling.pingpong else []),  # the ping-pong schedule's hand-overs
    ]  # fmt: skip
    kernel = functools.partial(_kernel, tiles=facts, query_block=bq, block_k=block_k, scale=float(scale),
                               interpret=interpret is not None, p_in_registers=p_in_registers,
                               stage_rows=tiling.stage_rows, producer=producer, merge=merge,
                               warpgroups=warpgroups, pingpong=tiling.pingpong,
                               stage_store_rows=tiling.stage_store_rows,
                               share_heads=tiling.share_heads)  # fmt: skip
    outputs = (
        jax.ShapeDtypeStruct((b * t_out * kv_heads * groups, h), q_rows.dtype),
        jax.ShapeDtypeStruct((b * kv_heads * groups * t_out,), jnp.float32),
    )
    call = plgpu.kernel(
        kernel,
        out_type=() if merge else outputs,
        scratch_types=scratch,
        grid=(nb * bq // tiling.rows, groups // tiling.heads, problems * kv_heads),
        grid_names=("rows", "group", "problem"),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, **_profile_params(profile_dir, sum(f.length // block_k for f in facts))
        ),
        interpret=interpret,
        **(dict(num_threads=warpgroups + producer, thread_name="wg") if warpgroups + producer > 1 else {}),
    )
    operands = (
        *query_rows(query_index, b, t, groups, padded),
        q_rows.reshape(-1, h),
        k.reshape(-1, h),
        v.reshape(-1, h),
        *(x for arrays in tile_arrays for x in arrays),
    )
    if merge:  # written in place: refs in, read back after the kernel
        refs = [jax.new_ref(x.reshape(shape.shape)) for x, shape in zip(merge_into, outputs, strict=True)]
        call(*operands, *refs)
        out, lse = (ref[...] for ref in refs)
    else:
        out, lse = call(*operands)
    out, lse = out.reshape(b, t_out, kv_heads, groups, h), lse.reshape(b, kv_heads, groups, t_out)
    return (out[:, :t], lse[..., :t]) if padded else (out, lse)
