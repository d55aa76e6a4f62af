"""Forward kernel with the sort gathers fused in: rows are loaded and stored by index, no sorted copies of q, k, v, out.

The tiled kernel (`tiled_attention.py`) reads queries and key blocks already gathered into sorted order and writes
outputs in sorted order, so XLA has to copy q, k, v into that order and the output back (about 1.5 ms of 6.5 ms at
131k tokens, H100). Here each program loads its queries `q[query_index]` and its key block `k[key_index]` straight
from the unsorted arrays, in the public `[B, T, N, H]` layout (no transposed copies either), and stores
`out[query_index]`, `lse[query_index]`, or merges its part by lse into a partial result already at those rows
(`merge_into`, a causal recursion level: its T/2 rows on top of the base case and the levels before it).
Tiles shared by all query blocks (samples, global keys) are small and stay pre-gathered.

The row indices are the plan's (`ops.plan_rows`), so whatever order and padding `ops` gives the tiles, the kernel
reads the same rows. `indexed_tiled_forward_reference` is its jnp twin. This assumes per-block tiles consist of rows
of k and v (true for the sorted blocks); a tile that transforms keys must stay on the pre-gathered path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import LN_2, LOG2_E, NEG_START, div, dot, dot_t, rem, triton_params
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig
from hyperattn_jax.ops.estimate import tiled_attention
from hyperattn_jax.ops.merge import merge_partials


def row_coordinates(index, batch: int):
    """The batch and kv-head index arrays that, with row index int32 `[P, K, ..., t]`, address rows
    `x[p % B, row, kv head]` of a public-layout `[B, S, K, H]` array (problem p reads batch element p % B)."""
    problems, kv_heads = index.shape[:2]
    trailing = (1,) * (index.ndim - 2)
    problem_batch = (jnp.arange(problems) % batch).reshape(problems, 1, *trailing)
    return problem_batch, jnp.arange(kv_heads).reshape(1, kv_heads, *trailing)


def rows_of(x, index, batch: int):
    """Rows of a public-layout x `[B, S, K, H]` named by index int32 `[P, K, ..., t]` (`row_coordinates`; -1 reads
    row 0: padding, masked by its log-weight): `[P, K, ..., t, H]`."""
    problem_batch, head = row_coordinates(index, batch)
    return x[problem_batch, jnp.maximum(index, 0), head]


def tile_loaders(kinds, lengths, refs):
    """(load_keys(keys) -> (k, v), w_ref or None (log-weights all 0), length) of every tile, from the refs
    `tile_operands` laid out."""
    loaders, position = [], 0
    for (source, weighted), length in zip(kinds, lengths, strict=True):
        if source == "indexed":
            k_index_ref, k_ref, v_ref = refs[position : position + 3]
            position += 3

            def load_keys(keys, k_index_ref=k_index_ref, k_ref=k_ref, v_ref=v_ref):
                index = jnp.maximum(k_index_ref[keys], 0)
                return k_ref[index, :], v_ref[index, :]

        else:
            k_ref, v_ref = refs[position : position + 2]
            position += 2

            def load_keys(keys, k_ref=k_ref, v_ref=v_ref):
                return k_ref[keys, :], v_ref[keys, :]

        w_ref = refs[position] if weighted else None
        position += weighted
        loaders.append((load_keys, w_ref, length))
    return loaders


def add_log_weights(logits, w_ref, keys):
    """Base-2 logits `[rows, keys]` plus the keys' log-weights (none: all 0, one add per score saved)."""
    return logits if w_ref is None else logits + w_ref[keys][None, :] * LOG2_E


def tile_log_weights(tile, *, problems: int, kv_heads: int, num_blocks: int, length: int):
    """A tile's log-weights as float32 `[P * K, nb | 1, length]` and whether they differ between query blocks; (None,
    False) for a tile without log-weights (all 0)."""
    if tile.log_weight is None:
        return None, False
    w = jnp.asarray(tile.log_weight, jnp.float32)
    w = w.reshape((1,) * (4 - w.ndim) + w.shape)
    per_block = w.shape[2] == num_blocks and num_blocks > 1
    w = jnp.broadcast_to(w, (problems, kv_heads, num_blocks if per_block else 1, length))
    return w.reshape(problems * kv_heads, -1, length), per_block


def tile_operands(k, v, tiles, tile_key_index, *, problems: int, num_blocks: int, splits: int, batch_of, head_of):
    """BlockSpecs, arrays, kinds and lengths of the key tiles for a grid (query chunk c, query head j, problem x kv
    head i) whose query chunks are `splits` per block: an "indexed" tile passes its key index and all of k, v (rows
    loaded in the kernel), a "copied" one its own k, v (rows gathered before the kernel); both pass their log-weights
    unless they have none (an indexed tile's `log_weight` None: every key counts once). A kind is (source, weighted)."""
    kv_heads, h = k.shape[2], k.shape[3]
    pk, nb = problems * kv_heads, num_blocks
    full_kv = pl.BlockSpec((None, k.shape[1], None, h), lambda c, j, i: (batch_of(i), 0, head_of(i), 0))
    in_specs, args, kinds, lengths = [], [], [], []
    for tile, key_index in zip(tiles, tile_key_index, strict=True):
        length = tile.log_weight.shape[-1] if key_index is None else key_index.shape[-1]
        if key_index is not None:
            in_specs += [pl.BlockSpec((None, None, length), lambda c, j, i: (i, c // splits, 0)), full_kv, full_kv]
            args += [key_index.reshape(pk, nb, length), k, v]
        else:
            shared = tile.k.shape[2] == 1
            kv_map = (lambda c, j, i: (i, 0, 0, 0)) if shared else (lambda c, j, i: (i, c // splits, 0, 0))
            kv_spec = pl.BlockSpec((None, None, length, h), kv_map)
            in_specs += [kv_spec, kv_spec]
            args += [tile.k.reshape(pk, tile.k.shape[2], length, h), tile.v.reshape(pk, tile.k.shape[2], length, h)]
        w, per_block_weight = tile_log_weights(tile, problems=problems, kv_heads=kv_heads, num_blocks=nb, length=length)
        if w is not None:
            w_map = (lambda c, j, i: (i, c // splits, 0)) if per_block_weight else (lambda c, j, i: (i, 0, 0))
            in_specs.append(pl.BlockSpec((None, None, length), w_map))
            args.append(w)
        kinds.append(("indexed" if key_index is not None else "copied", w is not None))
        lengths.append(length)
    return in_specs, args, tuple(kinds), tuple(lengths)


def _indexed_forward_kernel(
    q_index_ref,
    q_ref,
    *refs,
    kinds: tuple[str, ...],
    lengths: tuple[int, ...],
    block_k: int,
    scale: float,
    rows: int,
    merge: bool,
):
    """kinds[i] is ("indexed", weighted) (refs: key index, k, v, [w]) or ("copied", weighted) (refs: k, v, [w]).
    With `merge`, the refs before the outputs are the partial out and lse they alias: the rows' own part is merged
    into them by lse."""
    o_ref, lse_ref = refs[-2:]
    q_index = q_index_ref[...]
    load_index = jnp.maximum(q_index, 0)  # padding rows (-1) read row 0 and store to the spare last row
    q = q_ref[load_index, :]
    qk_scale = scale * LOG2_E
    carry = (
        jnp.full((rows,), NEG_START, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q.shape[1]), jnp.float32),
    )
    for load_keys, w_ref, length in tile_loaders(kinds, lengths, refs):
        chunk = min(block_k, length)

        def body(step, carry, load_keys=load_keys, w_ref=w_ref, chunk=chunk):
            row_max, row_sum, acc = carry
            keys = pl.ds(pl.multiple_of(step * chunk, chunk), chunk)
            k, v = load_keys(keys)
            s = add_log_weights(dot_t(q, k) * qk_scale, w_ref, keys)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            p = jnp.exp2(s - new_max[:, None])
            correction = jnp.exp2(row_max - new_max)
            acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
            return new_max, row_sum * correction + jnp.sum(p, axis=1), acc

        carry = lax.fori_loop(0, length // chunk, body, carry)
    row_max, row_sum, acc = carry
    if merge:  # every slot is a real row; exp2(NEG_START - m) = 0 drops an empty side
        earlier_out_ref, earlier_lse_ref = refs[-4:-2]
        earlier_lse2 = earlier_lse_ref[q_index] * LOG2_E
        new_max = jnp.maximum(row_max, earlier_lse2)
        earlier_weight = jnp.exp2(earlier_lse2 - new_max)
        own_weight = jnp.exp2(row_max - new_max)
        row_sum = earlier_weight + row_sum * own_weight
        acc = earlier_out_ref[q_index, :].astype(jnp.float32) * earlier_weight[:, None] + acc * own_weight[:, None]
        row_max, store_index = new_max, q_index
    else:
        store_index = jnp.where(q_index >= 0, q_index, o_ref.shape[0] - 1)
    has_keys = row_sum > 0
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    o_ref[store_index, :] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
    lse_ref[store_index] = jnp.where(has_keys, (row_max + jnp.log2(safe_sum)) * LN_2, -jnp.inf)


def indexed_tiled_forward(
    q_rows,
    k,
    v,
    query_index,
    tiles,
    tile_key_index,
    *,
    scale,
    tuning=None,
    interpret=False,
    merge_into=None,
):
    """Forward of `ops.tiled_attention` for one or many problems cut from the same unsorted q, k, v, gathering rows
    in the kernel and storing outputs at their rows.

    Args:
      q_rows: `[B, T, K, G, H]`: the public `[B, T, N, H]` layout with the heads split by kv head (a free reshape);
        H a power of two >= 16.
      k, v: `[B, S, K, H]`, the public layout.
      query_index: int32 `[P, K, G, nb, bq]`: the row of q_rows (position along T) in each blocked query slot of
        problem p, -1 = padding (bq a power of two). Problem p reads batch element p % B, so P = c * B problems
        (e.g. the c lower-left quarters of a causal recursion level) are cut from one q, k, v without copies.
      tiles: the `KeyTile`s of the plan, leading dims `[P, K]`. `tile_key_index[i]` is None (use tile i's k, v as
        given: shared tiles, pre-gathered) or int32 `[P, K, nb, t]` rows of k, v (positions along S) of per-block
        tile i (t a power of two; -1 = padding, whose log-weight must be -inf; tile i's k, v are then unused).
      scale: softmax scale.
      merge_into: optional (out, lse) of other parts of the same attention on all T rows (out q's dtype, lse
        float32, shaped as returned). The kernel merges its part into them by lse at the rows it names and returns
        them updated in place (aliased buffers): no array per part and no separate merge pass. Needs every query
        slot to hold a real row (no padding).

    Returns:
      out `[B, T, K, G, H]` (q's dtype) and lse `[B, K, G, T]` float32, at the rows named by query_index (rows no
      problem names are unspecified, or merge_into's). No gradient rule.
    """
    tuning = TiledKernelConfig() if tuning is None else tuning
    b, t, kv_heads, g, h = q_rows.shape
    problems, nb, bq = query_index.shape[0], query_index.shape[3], query_index.shape[4]
    pk = problems * kv_heads
    rows = min(tuning.block_q, bq)
    splits = bq // rows
    padded_rows = merge_into is None and math.prod(query_index.shape) != b * kv_heads * g * t
    t_out = t + 1 if padded_rows else t  # padding slots store to a spare last row

    def batch_of(i):
        return rem(div(i, kv_heads), b)

    def head_of(i):
        return rem(i, kv_heads)

    q_spec = pl.BlockSpec((None, t, None, None, h), lambda c, j, i: (batch_of(i), 0, head_of(i), j, 0))
    tile_specs, tile_args, kinds, lengths = tile_operands(
        k, v, tiles, tile_key_index, problems=problems, num_blocks=nb, splits=splits, batch_of=batch_of, head_of=head_of
    )
    in_specs = [pl.BlockSpec((None, None, rows), lambda c, j, i: (i, j, c)), q_spec, *tile_specs]
    args = [query_index.reshape(pk, g, nb * bq), q_rows, *tile_args]
    o_spec = pl.BlockSpec((None, t_out, None, None, h), lambda c, j, i: (batch_of(i), 0, head_of(i), j, 0))
    lse_spec = pl.BlockSpec((None, None, None, t_out), lambda c, j, i: (batch_of(i), head_of(i), j, 0))
    aliases = {}
    if merge_into is not None:
        aliases = {len(args): 0, len(args) + 1: 1}
        in_specs += [o_spec, lse_spec]
        args += list(merge_into)
    out, lse = pl.pallas_call(
        functools.partial(
            _indexed_forward_kernel,
            kinds=kinds,
            lengths=lengths,
            block_k=tuning.block_k,
            scale=scale,
            rows=rows,
            merge=merge_into is not None,
        ),
        # query chunks vary fastest: programs that run together share a problem's key blocks and samples in L2
        grid=(nb * splits, g, pk),
        in_specs=in_specs,
        out_specs=[o_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, t_out, kv_heads, g, h), q_rows.dtype),
            jax.ShapeDtypeStruct((b, kv_heads, g, t_out), jnp.float32),
        ],
        input_output_aliases=aliases,
        compiler_params=triton_params(tuning.num_warps, tuning.num_stages),
        interpret=interpret,
        name="hyper_gathered_attention_fwd",
    )(*args)
    return (out[:, :t], lse[..., :t]) if padded_rows else (out, lse)


def blocked_rows(x_rows, query_index, batch: int):
    """Rows of x_rows `[B, T, K, G, H]` in the blocked slots of query_index `[P, K, G, nb, bq]` (-1 reads row 0)."""
    problems, kv_heads, groups = query_index.shape[:3]
    problem_batch = (jnp.arange(problems) % batch).reshape(problems, 1, 1, 1, 1)
    head = jnp.arange(kv_heads).reshape(1, kv_heads, 1, 1, 1)
    group = jnp.arange(groups).reshape(1, 1, groups, 1, 1)
    return x_rows[problem_batch, jnp.maximum(query_index, 0), head, group], (problem_batch, head, group)


def complete_tiles(k, v, tiles, tile_key_index, batch: int):
    """The tiles with every k, v given (per-block ones gathered by their rows) and every log-weight (0 where None)."""
    full = []
    for tile, index in zip(tiles, tile_key_index, strict=True):
        if index is not None:
            tile = tile._replace(k=rows_of(k, index, batch), v=rows_of(v, index, batch))
        if tile.log_weight is None:
            tile = tile._replace(log_weight=jnp.zeros(tile.k.shape[:4], jnp.float32))
        full.append(tile)
    return full


def indexed_tiled_forward_reference(q_rows, k, v, query_index, tiles, tile_key_index, *, scale, merge_into=None):
    """jnp twin of `indexed_tiled_forward`: the same rows gathered with jnp, `ops.tiled_attention`, outputs scattered
    to their rows (merged by lse into `merge_into` when given). Rows no slot names are 0 (or merge_into's)."""
    b, t = q_rows.shape[:2]
    q_blocks, (problem_batch, head, group) = blocked_rows(q_rows, query_index, b)
    out, lse = tiled_attention(q_blocks, complete_tiles(k, v, tiles, tile_key_index, b), scale=scale)
    row = jnp.where(query_index < 0, t, query_index)  # padding slots write past the end: dropped
    if merge_into is None:
        base_out = jnp.zeros(q_rows.shape, q_rows.dtype)
        base_lse = jnp.full((b, *query_index.shape[1:3], t), -jnp.inf, jnp.float32)
    else:
        base_out, base_lse = merge_into
        old_out = base_out[problem_batch, jnp.minimum(row, t - 1), head, group]
        old_lse = base_lse[problem_batch, head, group, jnp.minimum(row, t - 1)]
        out, lse = merge_partials(old_out, old_lse, out, lse)
    out_rows = base_out.at[problem_batch, row, head, group].set(out.astype(base_out.dtype), mode="drop")
    return out_rows, base_lse.at[problem_batch, head, group, row].set(lse, mode="drop")
