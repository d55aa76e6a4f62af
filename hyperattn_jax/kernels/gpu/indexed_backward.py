"""Backward kernels with the sort gathers fused in: the gradients of `indexed_tiled_forward`'s attention, added into
float32 accumulators in the public layout, in place.

The backward of the tiled kernels (`tiled_attention.py`) needs q, dO, lse and delta in sorted blocks and gives dq, dk,
dv in sorted blocks, so XLA gathers four arrays into that order per call and scatters three back, on top of the
transposes to the grouped layout (about a quarter of the causal forward+backward at 131k tokens, H100). Here every
program loads its rows by index straight from the public `[B, T, N, H]` arrays, like the forward
(`indexed_forward.py`), and read-modify-writes its gradient rows in the accumulators (input/output aliasing), so the
parts of a merged attention (a causal recursion's base case and levels) sum their gradients without any copy:

- dq: a program owns `rows` queries of one query block and head, loops over every tile's keys like the forward;
- dk, dv of a per-block tile (the sorted blocks): a program owns a chunk of one block's keys and loops over that
  block's queries of every head of the group; a key row sits in exactly one block, so the writes never collide;
- dk, dv of a shared tile (samples, global keys): partial sums over runs of query blocks, summed, and written into
  the accumulators by one XLA gather and one scatter that SETS row + part (a few hundred rows per problem). A key
  drawn c times is first folded into one slot of weight c w (`fold_repeated_rows`: the same estimator, whose dk,
  dv are the repeats' sum), so the written rows are distinct: no scatter-add, no atomics, a deterministic result.

Like `fused_tiled_attention_backward`, the kernels take the FINAL lse and delta of the merged attention, so the result
is this part's share of the merged gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import LOG2_E, div, dot, dot_t, rem, triton_params
from hyperattn_jax.kernels.gpu.indexed_forward import (
    add_log_weights,
    blocked_rows,
    complete_tiles,
    row_coordinates,
    rows_of,
    tile_loaders,
    tile_log_weights,
    tile_operands,
)
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig
from hyperattn_jax.ops.estimate import tiled_attention_backward
from hyperattn_jax.ops.tiles import shrink_sample_values_transpose


def _dq_kernel(
    q_index_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, kinds, lengths, block_k: int, scale: float, accumulate: bool
):
    """dq of `rows` queries over every tile, stored at their rows, or added there (`accumulate`: the last input is the
    accumulator, aliased to the output)."""
    dq_ref = refs[-1]
    index = q_index_ref[...]
    q, do = q_ref[index, :], do_ref[index, :]
    lse2 = lse_ref[index] * LOG2_E
    delta = delta_ref[index]
    qk_scale = scale * LOG2_E
    dq = jnp.zeros(q.shape, jnp.float32)
    for load_keys, w_ref, length in tile_loaders(kinds, lengths, refs):
        chunk = min(block_k, length)

        def body(step, dq, load_keys=load_keys, w_ref=w_ref, chunk=chunk):
            keys = pl.ds(pl.multiple_of(step * chunk, chunk), chunk)
            k, v = load_keys(keys)
            p = jnp.exp2(add_log_weights(dot_t(q, k) * qk_scale, w_ref, keys) - lse2[:, None])
            ds = p * (dot_t(do, v) - delta[:, None])
            return dq + dot(ds.astype(k.dtype), k)

        dq = lax.fori_loop(0, length // chunk, body, dq)
    dq = dq * scale
    dq_ref[index, :] = refs[-2][index, :] + dq if accumulate else dq


def _key_chunk_grads(
    q_index_ref, q_ref, do_ref, lse_ref, delta_ref, k, v, weight, *, steps, first_step, rows, shape, scale
):
    """dk, dv float32 of keys k, v over `steps` chunks of `rows` queries named by q_index_ref, starting at chunk
    `first_step`; `weight(step)` gives the keys' log-weights (base 2) seen by that query chunk (None: all 0). Query
    chunks run block by block, head by head within a block (the index layout `_blocks_then_heads` makes)."""
    groups, query_block, head_dim, num_queries = shape
    qk_scale = scale * LOG2_E

    def body(step, carry):
        dk, dv = carry
        step = first_step + step
        head = rem(div(step, query_block // rows), groups)
        index = q_index_ref[pl.ds(pl.multiple_of(step * rows, rows), rows)]
        columns = pl.ds(pl.multiple_of(head * head_dim, head_dim), head_dim)
        q, do = q_ref[index, columns], do_ref[index, columns]
        stat = head * num_queries + index
        # Keys-major scores: p^T and ds^T are formed directly (see flash._dkdv_kernel).
        logits = dot_t(k, q) * qk_scale - (lse_ref[stat] * LOG2_E)[None, :]
        w = weight(step)
        p_t = jnp.exp2(logits if w is None else logits + w[:, None])
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot_t(v, do) - delta_ref[stat][None, :])
        return dk + dot(ds_t.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
    return dk * scale, dv


def _block_dkdv_kernel(
    k_index_ref,
    q_index_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    *refs,
    rows: int,
    shape,
    scale: float,
    accumulate: bool,
    weighted: bool,
):
    """dk, dv of a chunk of one sorted block's keys (rows named by k_index_ref), stored at their rows or added there.
    refs: the keys' log-weights (if `weighted`), the two accumulators (if `accumulate`, aliased to the outputs), the
    outputs."""
    dk_ref, dv_ref = refs[-2:]
    groups, query_block = shape[:2]
    key_index = k_index_ref[...]
    k, v = k_ref[key_index, :], v_ref[key_index, :]
    w = refs[0][...] * LOG2_E if weighted else None
    refs = refs[weighted:]
    dk, dv = _key_chunk_grads(
        q_index_ref,
        q_ref,
        do_ref,
        lse_ref,
        delta_ref,
        k,
        v,
        lambda step: w,
        steps=groups * query_block // rows,
        first_step=0,
        rows=rows,
        shape=shape,
        scale=scale,
    )
    if accumulate:
        dk, dv = refs[0][key_index, :] + dk, refs[1][key_index, :] + dv
    dk_ref[key_index, :] = dk
    dv_ref[key_index, :] = dv


def _shared_dkdv_kernel(
    q_index_ref,
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
    rows: int,
    shape,
    scale: float,
    blocks_per_split: int,
    per_block: bool,
):
    """Partial dk, dv of a chunk of a shared tile's keys over a run of `blocks_per_split` query blocks."""
    groups, query_block = shape[:2]
    steps_per_block = groups * query_block // rows
    k, v = k_ref[...], v_ref[...]
    if per_block:  # every query block has its own log-weights for these keys (e.g. samples inside its own block)

        def weight(step):
            return w_ref[div(step, steps_per_block), :] * LOG2_E

    else:
        fixed = w_ref[...] * LOG2_E

        def weight(step):
            return fixed

    dk, dv = _key_chunk_grads(
        q_index_ref,
        q_ref,
        do_ref,
        lse_ref,
        delta_ref,
        k,
        v,
        weight,
        steps=blocks_per_split * steps_per_block,
        first_step=pl.program_id(1) * blocks_per_split * steps_per_block,
        rows=rows,
        shape=shape,
        scale=scale,
    )
    dk_ref[...] = dk
    dv_ref[...] = dv


def _blocks_then_heads(query_index):
    """`[P, K, G, nb, bq]` -> `[P * K, nb, G * bq]`: a block's query rows of every head, head by head."""
    p, kv_heads, g, nb, bq = query_index.shape
    return jnp.swapaxes(query_index, 2, 3).reshape(p * kv_heads, nb, g * bq)


def indexed_tiled_backward(
    q_rows,
    k,
    v,
    do_rows,
    lse,
    delta,
    query_index,
    tiles,
    tile_key_index,
    grads,
    *,
    scale,
    tuning=None,
    interpret=False,
    value_mixes=None,
):
    """Add the gradients of `indexed_tiled_forward`'s attention (one part of a merged attention with final `lse` and
    `delta`) into float32 accumulators, reading every row by index.

    Args:
      q_rows, do_rows: `[B, T, K, G, H]` (public layout split by kv head), q's dtype.
      k, v: `[B, S, K, H]` public layout.
      lse, delta: float32 `[B, K, G, T]`, the merged attention's (lse finite).
      query_index: int32 `[P, K, G, nb, bq]` as for the forward; every slot must hold a real row, each row at most once.
      tiles, tile_key_index: as for the forward, except that every tile's rows are given: `tile_key_index[i]` int32
        `[P, K, nb | 1, t]`; per-block tiles (nb > 1) are loaded by it in the kernel and must hold every row at most
        once (no -1 padding); shared tiles use their own k, v and may hold -1 (log-weight -inf) or repeat a row
        with the same log-weights (a key sampled twice). Problems of one batch element must not share key rows.
      grads: (dq `[B, T, K, G, H]`, dk, dv `[B, S, K, H]`) float32 accumulators, or None when this is the first
        part: its kernels then write the gradients instead of adding (every row must be in query_index and in the
        per-block tiles, as for a single non-causal problem).
      value_mixes: per tile, None or (lam `[P, K]`, mix `[P, K, t]`) for a shared tile whose values are lam v +
        sum_t mix_t v_t of its rows' v (`ops.sample_value_mix`, shrunk samples): its dv goes back through that map.

    Returns:
      the accumulators with this part's dq, dk, dv added (updated in place where XLA can).
    """
    tuning = TiledKernelConfig() if tuning is None else tuning
    accumulate = grads is not None
    dq, dk, dv = grads if accumulate else (None, None, None)
    b, t, kv_heads, g, h = q_rows.shape
    problems, nb, bq = query_index.shape[0], query_index.shape[3], query_index.shape[4]
    pk = problems * kv_heads
    rows = min(tuning.block_q, bq)
    splits = bq // rows
    params = triton_params(tuning.num_warps, tuning.num_stages_bwd)

    def batch_of(i):
        return rem(div(i, kv_heads), b)

    def head_of(i):
        return rem(i, kv_heads)

    # dq: the forward's grid and operands; shared tiles read their own (pre-gathered) k, v.
    indexed = [index if tile.k is None else None for tile, index in zip(tiles, tile_key_index, strict=True)]
    tile_specs, tile_args, kinds, lengths = tile_operands(
        k, v, tiles, indexed, problems=problems, num_blocks=nb, splits=splits, batch_of=batch_of, head_of=head_of
    )
    q_spec = pl.BlockSpec((None, t, None, None, h), lambda c, j, i: (batch_of(i), 0, head_of(i), j, 0))
    row_spec = pl.BlockSpec((None, None, None, t), lambda c, j, i: (batch_of(i), head_of(i), j, 0))
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel, kinds=kinds, lengths=lengths, block_k=tuning.block_k, scale=scale, accumulate=accumulate
        ),
        grid=(nb * splits, g, pk),
        in_specs=[
            pl.BlockSpec((None, None, rows), lambda c, j, i: (i, j, c)),
            q_spec,
            q_spec,
            row_spec,
            row_spec,
            *tile_specs,
            *[q_spec] * accumulate,
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, jnp.float32),
        input_output_aliases={5 + len(tile_args): 0} if accumulate else {},
        compiler_params=params,
        interpret=interpret,
        name="hyper_gathered_attention_dq",
    )(query_index.reshape(pk, g, nb * bq), q_rows, do_rows, lse, delta, *tile_args, *[dq] * accumulate)

    # dk, dv: queries of a block, all heads of the group, read as [T, G * H] rows; row stats as [G * T].
    rows_bwd = min(tuning.block_q_bwd, bq)
    shape = (g, bq, h, t)
    by_block = _blocks_then_heads(query_index)
    q_flat, do_flat = (x.reshape(b, t, kv_heads, g * h) for x in (q_rows, do_rows))
    lse_flat, delta_flat = (x.reshape(b, kv_heads, g * t) for x in (lse, delta))
    # per-block tiles first: without accumulators they write every key row, and the shared tiles add into those
    value_mixes = [None] * len(tiles) if value_mixes is None else value_mixes
    ordered = sorted(zip(tiles, tile_key_index, value_mixes, strict=True), key=lambda item: item[0].k is not None)
    for tile, key_index, value_mix in ordered:
        length = key_index.shape[-1]
        chunk = min(tuning.block_k_bwd, length)
        w, per_block = tile_log_weights(tile, problems=problems, kv_heads=kv_heads, num_blocks=nb, length=length)
        if tile.k is None:  # per-block tile: rows loaded and accumulated by index
            k_index = key_index.reshape(pk, nb, length)
            full = pl.BlockSpec((None, t, None, g * h), lambda c, n, i: (batch_of(i), 0, head_of(i), 0))
            stat = pl.BlockSpec((None, None, g * t), lambda c, n, i: (batch_of(i), head_of(i), 0))
            full_kv = pl.BlockSpec((None, k.shape[1], None, h), lambda c, n, i: (batch_of(i), 0, head_of(i), 0))
            w_map = (lambda c, n, i: (i, n, c)) if per_block else (lambda c, n, i: (i, 0, c))
            weights = [] if w is None else [w]
            accumulators = [] if dk is None else [dk, dv]
            first_accumulator = 8 + len(weights)
            dk, dv = pl.pallas_call(
                functools.partial(
                    _block_dkdv_kernel,
                    rows=rows_bwd,
                    shape=shape,
                    scale=scale,
                    accumulate=bool(accumulators),
                    weighted=bool(weights),
                ),
                grid=(length // chunk, nb, pk),
                in_specs=[
                    pl.BlockSpec((None, None, chunk), lambda c, n, i: (i, n, c)),
                    pl.BlockSpec((None, None, g * bq), lambda c, n, i: (i, n, 0)),
                    full,
                    full,
                    stat,
                    stat,
                    full_kv,
                    full_kv,
                    *[pl.BlockSpec((None, None, chunk), w_map)] * len(weights),
                    *[full_kv] * len(accumulators),
                ],
                out_specs=[full_kv, full_kv],
                out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2,
                input_output_aliases={first_accumulator: 0, first_accumulator + 1: 1} if accumulators else {},
                compiler_params=params,
                interpret=interpret,
                name="hyper_gathered_attention_dkdv",
            )(k_index, by_block, q_flat, do_flat, lse_flat, delta_flat, k, v, *weights, *accumulators)
            continue
        # shared tile: partial sums over runs of (at least 8) query blocks, then its distinct rows written once
        w, write_index = fold_repeated_rows(w, key_index)
        split_count = runs_of_blocks(nb, tuning.shared_splits)
        full = pl.BlockSpec((None, t, None, g * h), lambda c, r, i: (batch_of(i), 0, head_of(i), 0))
        stat = pl.BlockSpec((None, None, g * t), lambda c, r, i: (batch_of(i), head_of(i), 0))
        kv_spec = pl.BlockSpec((None, None, chunk, h), lambda c, r, i: (i, 0, c, 0))
        w_spec = pl.BlockSpec(
            (None, w.shape[1], chunk) if per_block else (None, None, chunk), lambda c, r, i: (i, 0, c)
        )
        part_spec = pl.BlockSpec((None, None, chunk, h), lambda c, r, i: (i, r, c, 0))
        tile_k, tile_v = (x.reshape(pk, 1, length, h) for x in (tile.k, tile.v))
        part_k, part_v = pl.pallas_call(
            functools.partial(
                _shared_dkdv_kernel,
                rows=rows_bwd,
                shape=shape,
                scale=scale,
                blocks_per_split=nb // split_count,
                per_block=per_block,
            ),
            grid=(length // chunk, split_count, pk),
            in_specs=[
                pl.BlockSpec((None, nb * g * bq), lambda c, r, i: (i, 0)),
                full,
                full,
                stat,
                stat,
                kv_spec,
                kv_spec,
                w_spec,
            ],
            out_specs=[part_spec, part_spec],
            out_shape=[jax.ShapeDtypeStruct((pk, split_count, length, h), jnp.float32)] * 2,
            compiler_params=params,
            interpret=interpret,
            name="hyper_gathered_attention_shared_dkdv",
        )(by_block.reshape(pk, -1), q_flat, do_flat, lse_flat, delta_flat, tile_k, tile_v, w)
        if dk is None:  # no per-block tile wrote them
            dk, dv = (jnp.zeros(k.shape, jnp.float32) for _ in range(2))
        dk, dv = add_shared_tile_grads((dk, dv), (part_k, part_v), write_index, key_index, value_mix, b)
    return dq, dk, dv


def runs_of_blocks(num_blocks: int, wanted: int) -> int:
    """Into how many equal runs of (at least 8) query blocks a shared tile's dk, dv are split as partial sums: the
    largest divisor of num_blocks that is at most `wanted` and leaves runs that long."""
    return max(
        d
        for d in range(1, min(num_blocks, wanted) + 1)
        if num_blocks % d == 0 and num_blocks // d >= min(num_blocks, 8)
    )


def add_shared_tile_grads(grads, parts, write_index, key_index, value_mix, batch: int):
    """The dk, dv accumulators `[B, S, K, H]` plus a shared tile's partial sums `[P * K, splits, t, H]` (over runs of
    query blocks, with its repeated rows folded: `fold_repeated_rows`' write_index) at its rows `key_index`
    `[P, K, 1, t]`; `value_mix` as `indexed_tiled_backward`'s."""
    dk, dv = grads
    part_k, part_v = (jnp.sum(x, axis=1) for x in parts)
    dk = add_distinct_rows(dk, part_k, write_index, batch)
    if value_mix is None:
        return dk, add_distinct_rows(dv, part_v, write_index, batch)
    # d v = lam d v~ (each row once, repeats folded) + mix d(sum of v~) (every slot: scatter-add)
    lam, mix = value_mix
    pk, length = part_v.shape[:2]
    dv = add_distinct_rows(dv, lam.reshape(pk, 1, 1) * part_v, write_index, batch)
    mixed = mix.reshape(pk, length, 1) * jnp.sum(part_v, axis=1, keepdims=True)
    return dk, add_rows(dv, mixed, key_index[:, :, 0], batch)


def fold_repeated_rows(w, index):
    """A shared tile's log-weights w `[P * K, nb | 1, t]` with every repeated row of index `[P, K, 1, t]` folded
    into its first slot: log-weight + log(count) there, -inf in the repeats, so the first slot's dk, dv are the
    sum of all of them (P_ij = w_j e^{s_ij - lse_i} is linear in w_j). Needs the repeats of a row to carry the same
    log-weights, which ops' tiles do (a sample's weight is a function of its key: 1 / (m p_key), blocks it is
    excluded from by its key's block). Returns the weights and the rows to write, int32 `[P, K, t]`, -1 where
    nothing is written (repeats and padding slots)."""
    index = index[:, :, 0]
    same = index[..., :, None] == index[..., None, :]
    count = jnp.sum(same, axis=-1)
    first = (index >= 0) & ~jnp.any(jnp.tril(same, -1), axis=-1)
    fold = jnp.where(first, jnp.log(count.astype(jnp.float32)), -jnp.inf).reshape(w.shape[0], 1, -1)
    return w + fold, jnp.where(first, index, -1)


def add_distinct_rows(total, part, index, batch: int):
    """total `[B, S, K, H]` plus part `[P * K, t, H]` at the rows index `[P, K, t]` names (problem p: batch p % B;
    -1: not written), as a gather and a scatter that sets: the named (batch, row, kv head) must be distinct, which
    `fold_repeated_rows` makes them within a problem and the callers' problems (disjoint key ranges of one batch
    element, or different batch elements) make them across problems."""
    problem_batch, head = row_coordinates(index, batch)
    target = jnp.where(index >= 0, index, total.shape[1])  # out of range: dropped
    part = part.reshape(*index.shape, part.shape[-1])
    return total.at[problem_batch, target, head].set(rows_of(total, index, batch) + part, mode="drop")


def add_rows(total, part, index, batch: int):
    """total `[B, S, K, H]` plus part (`[P * K, t, H]` or `[P, K, ..., t, H]`) at the rows index `[P, K, ..., t]`
    names (-1: dropped), repeats summed (scatter-add)."""
    problem_batch, head = row_coordinates(index, batch)
    target = jnp.where(index >= 0, index, total.shape[1])
    return total.at[problem_batch, target, head].add(part.reshape(*index.shape, part.shape[-1]), mode="drop")


def indexed_tiled_backward_reference(
    q_rows, k, v, do_rows, lse, delta, query_index, tiles, tile_key_index, grads, *, scale, value_mixes=None
):
    """jnp twin of `indexed_tiled_backward`: the part's gradients by `ops.tiled_attention_backward` on the gathered
    rows, added into `grads` (zeros when None) by scatter-add at the rows the plan names."""
    b, t = q_rows.shape[:2]
    q_blocks, (problem_batch, head, group) = blocked_rows(q_rows, query_index, b)
    do_blocks, _ = blocked_rows(do_rows, query_index, b)
    row = jnp.maximum(query_index, 0)
    lse_blocks, delta_blocks = (x[problem_batch, head, group, row] for x in (lse, delta))
    own = [index if tile.k is None else None for tile, index in zip(tiles, tile_key_index, strict=True)]
    full = complete_tiles(k, v, tiles, own, b)  # shared tiles keep their own k, v (shrunk samples' v differs)
    dq_blocks, tile_grads = tiled_attention_backward(q_blocks, full, do_blocks, lse_blocks, delta_blocks, scale=scale)
    if grads is None:
        grads = (jnp.zeros(q_rows.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = grads
    dq = dq.at[problem_batch, jnp.where(query_index < 0, t, query_index), head, group].add(dq_blocks, mode="drop")
    value_mixes = [None] * len(tiles) if value_mixes is None else value_mixes
    for index, (dk_tile, dv_tile), value_mix in zip(tile_key_index, tile_grads, value_mixes, strict=True):
        if value_mix is not None:
            dv_tile = shrink_sample_values_transpose(dv_tile, *value_mix)
        dk, dv = add_rows(dk, dk_tile, index, b), add_rows(dv, dv_tile, index, b)
    return dq, dk, dv
