"""Non-causal HyperAttention on the fused Pallas Triton kernels, taking the public layout (q `[B, T, N, H]`, k, v
`[B, S, K, H]`).

The plan (LSH hash, int32 packed-key sort, samples) and the tiles come from `ops`, unchanged, so any tile kind the jnp
path has (sorted blocks, sampled residual, global keys) runs here too; only the hash (`hash.py`), the column-mass probe
(`probe.py`) and the attention over the tiles are kernels. The forward reads q, k, v in the public layout and gathers
rows by index inside the kernel where the shapes allow (`indexed_forward.py`): no transposed or sorted copies; it keeps
only the plan, out and lse. The backward runs the row-gathering backward kernels with that out and lse
(`estimate_backward_rows`, `indexed_backward.py`) where every slot holds a real row, else gathers the sorted blocks
(grouped layout) for the tiled backward (`estimate_backward`). The causal recursion (`causal.py`) differentiates each of
its levels the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperattn_jax._layout import group_queries, heads_major, ungroup_output
from hyperattn_jax._numerics import finite_or_zero
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu._common import MIN_DOT
from hyperattn_jax.kernels.gpu.hash import hash_rows, lsh_ranks_pallas
from hyperattn_jax.kernels.gpu.indexed_backward import indexed_tiled_backward
from hyperattn_jax.kernels.gpu.indexed_forward import indexed_tiled_forward, rows_of
from hyperattn_jax.kernels.gpu.probe import probe_key_chunk, probe_mass_pallas, probe_queries
from hyperattn_jax.kernels.gpu.tiled_attention import (
    TiledKernelConfig,
    fused_tiled_attention,
    fused_tiled_attention_backward,
)
from hyperattn_jax.lsh import lsh_ranks
from hyperattn_jax.ops.causal import stack_level_problems
from hyperattn_jax.ops.estimate import attend_tiles
from hyperattn_jax.ops.keys import plan_keys
from hyperattn_jax.ops.plan import make_plan, plan_projections, probe_index
from hyperattn_jax.ops.tiles import (
    KeyTile,
    block_query_layout,
    hyper_attention_tiles,
    plan_rows,
    sample_value_mix,
    shrink_sample_values,
)


def fits_dot(x: int) -> bool:
    """Whether a kernel block dimension of size x lowers: a power of two of at least Triton's MIN_DOT (16)."""
    return x >= MIN_DOT and x & (x - 1) == 0


def _pregathered_forward(q, k, v, plan, scale, tuning, interpret):
    """Grouped layout in and out, through sorted copies: for head dims and blocks the in-kernel gathers cannot take."""
    kernel = functools.partial(fused_tiled_attention, tuning=tuning, interpret=interpret)
    return attend_tiles(q, hyper_attention_tiles(k, v, plan), plan, scale=scale, kernel=kernel)


def row_positions(shape):
    """int32 row number of every row of an array `[..., L, H]`, as `[..., L, 1]`: passed through the same cuts as the
    data (the causal levels' problems), it says which row of the unsplit array each problem row is (`ops.plan_rows`)."""
    return jnp.broadcast_to(jnp.arange(shape[-2], dtype=jnp.int32)[:, None], (*shape[:-1], 1))


def can_gather_in_kernel(head_dim: int, plan) -> bool:
    return fits_dot(head_dim) and fits_dot(plan.query_block)


def _blocks_hold_valid_keys(plan, num_keys: int, kv_length) -> bool:
    """Whether every sorted-block key slot of the plan holds a valid key attended there: no kv_length, no global keys
    (their slots are masked), no padding at the end. The block tile's log-weights are then all 0."""
    return kv_length is None and plan.num_global == 0 and plan.num_blocks * plan.key_block == num_keys


def _kernel_tile_length(length: int, tuning: TiledKernelConfig) -> int:
    """A shared tile's length padded for the kernels, which step through a tile in whole chunks of min(block_k,
    length) keys, each a power of two of at least 16 (Triton's dot): a power of two up to the chunk, else a multiple
    of it."""
    chunk = max(tuning.block_k, tuning.block_k_bwd)
    if length <= chunk:
        return max(MIN_DOT, 1 << (length - 1).bit_length())
    return -(-length // chunk) * chunk


def _pad_shared_tile(index, log_weight, tuning: TiledKernelConfig | None):
    """A shared tile's rows `[P, K, 1, t]` and log-weights padded to `_kernel_tile_length` (rows -1, weight -inf)."""
    t = index.shape[-1]
    pad = _kernel_tile_length(t, TiledKernelConfig() if tuning is None else tuning) - t
    if not pad:
        return index, log_weight
    log_weight = jnp.broadcast_to(log_weight, (*log_weight.shape[:-1], t))
    widths = [(0, 0)] * (index.ndim - 1) + [(0, pad)]
    return jnp.pad(index, widths, constant_values=-1), jnp.pad(log_weight, widths, constant_values=-jnp.inf)


def row_operands(k, v, plan, query_positions, key_positions, batch: int, kv_length, tuning=None, rows=None):
    """What the row-indexed kernels take for a plan: the int32 query row of every blocked slot `[P, K, G, nb, bq]`
    (-1 = padding); the tiles, per-block ones without k, v (their rows are loaded by index in the kernel; without
    log-weights where all are 0, `_blocks_hold_valid_keys`: one add per score fewer), shared ones (samples, global
    keys) gathered here, sample values shrunk (`ops.shrink_sample_values`), and padded to whole kernel chunks
    (`_kernel_tile_length`); each tile's int32 rows `[P, K, nb | 1, t]`; and which of them the kernel loads by index
    (None for the gathered ones)."""
    unweighted_blocks = _blocks_hold_valid_keys(plan, key_positions.shape[-2], kv_length)
    query_index, tile_rows = plan_rows(plan, query_positions, key_positions) if rows is None else rows
    tiles, rows, in_kernel = [], [], []
    for position, (index, log_weight) in enumerate(tile_rows):  # index [P, K, nb | 1, t]
        if index.shape[2] == plan.num_blocks > 1 and fits_dot(index.shape[3]):
            tiles.append(KeyTile(None, None, None if unweighted_blocks else log_weight))
            in_kernel.append(index)
        else:
            values = rows_of(v, index, batch)
            if _is_sample_tile(plan, position, len(tile_rows)):
                values = shrink_sample_values(values, plan)
            index, log_weight = _pad_shared_tile(index, log_weight, tuning)
            values = jnp.pad(values, [(0, 0)] * 3 + [(0, index.shape[-1] - values.shape[3]), (0, 0)])
            tiles.append(KeyTile(rows_of(k, index, batch), values, log_weight))
            in_kernel.append(None)
        rows.append(index)
    return query_index, tiles, rows, in_kernel


def public_row_operands(q, k, v, plan, kv_length, rows=None, tuning=None):
    """`row_operands` of a non-causal plan made for the grouped public-layout q `[B, T, N, H]`, k, v `[B, S, K, H]`
    (`rows`: its `ops.plan_rows`, computed here when None), with q split by kv head: (q_rows `[B, T, K, G, H]`,
    query_index, tiles, key_index), what the row-indexed forward kernels take."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    query_index, tiles, _, key_index = row_operands(
        k, v, plan, row_positions((b, kv_heads, n // kv_heads, t, 1)), row_positions((b, kv_heads, k.shape[1], 1)),
        b, kv_length, tuning, rows,
    )  # fmt: skip
    return q.reshape(b, t, kv_heads, n // kv_heads, h), query_index, tiles, key_index


def _is_sample_tile(plan, position: int, num_tiles: int) -> bool:
    """Whether tile `position` of the plan's `hyper_attention_tiles` is the sampled residual (always the last)."""
    return plan.sample_index is not None and position == num_tiles - 1


def _value_mixes(plan, rows):
    """`indexed_tiled_backward`'s value_mixes for `row_operands`' tiles: the sample tile's (lam, mix) with mix
    zero-padded to the tile's kernel length, None for the others."""
    value_mix = sample_value_mix(plan)
    mixes = [None] * len(rows)
    if value_mix is not None and _is_sample_tile(plan, len(rows) - 1, len(rows)):
        lam, mix = value_mix
        mixes[-1] = (lam, jnp.pad(mix, [(0, 0), (0, 0), (0, rows[-1].shape[-1] - mix.shape[-1])]))
    return mixes


def can_backward_in_place(plan, num_queries: int, num_keys: int) -> bool:
    """Whether `estimate_backward_rows` takes the plan: every query slot and every sorted-block key slot holds a
    distinct row (no padding: its gradient rows would collide; masked global keys hold their own rows), problems of
    `num_queries` x `num_keys`."""
    return (
        plan.num_blocks * plan.query_block == num_queries
        and plan.num_blocks * plan.key_block == num_keys
        and (plan.num_blocks == 1 or fits_dot(plan.key_block))
    )


def estimate_backward_rows(
    q_rows,
    k,
    v,
    do_rows,
    lse,
    delta,
    plan,
    query_positions,
    key_positions,
    grads,
    *,
    scale,
    tuning,
    interpret,
    kv_length=None,
    rows=None,
    kernel=None,
):
    """The estimator's backward for problems cut from public-layout q_rows `[B, T, K, G, H]`, k, v `[B, S, K, H]`
    (a causal level's): `plan` was made for problems `[P, K, G, T', H]` x `[P, K, S', H]` (P = c * B; problem p
    reads batch element p % B); `query_positions` `[P, K, G, T', 1]` and `key_positions` `[P, K, S', 1]` (see
    `row_positions`) say at which row of q_rows, k each of the problems' rows sits. One part of a merged attention with
    final lse and delta `[B, K, G, T]`: its dq, dk, dv added into the float32 accumulators `grads` (dq
    `[B, T, K, G, H]`, dk, dv `[B, S, K, H]`; None: written, for a plan covering every row), reading every row by
    index (`indexed_tiled_backward`, or `kernel`: another backend's with its arguments). Needs
    `can_backward_in_place`; `kv_length` as for the forward; `rows`: the plan's `ops.plan_rows` at those positions,
    where the caller has them."""
    query_index, tiles, rows, _ = row_operands(
        k, v, plan, query_positions, key_positions, q_rows.shape[0], kv_length, tuning, rows
    )
    return (kernel or indexed_tiled_backward)(
        q_rows,
        k,
        v,
        do_rows,
        lse,
        delta,
        query_index,
        tiles,
        rows,
        grads,
        scale=scale,
        tuning=tuning,
        interpret=interpret,
        value_mixes=_value_mixes(plan, rows),
    )


def estimate_backward(q, k, v, plan, d_out, lse, delta, *, scale, tuning, interpret, tiled_backward=None):
    """dq, dk, dv (grouped layout) of the estimator under `plan` as one part of an attention whose final lse and
    delta are given (`fused_tiled_attention_backward`): the blocked layouts are gathered here and their transposes
    (gathers by the inverse permutation) bring the gradients back to the original rows. `tiled_backward`: another
    kernel for the blocked gradients, called as `(q_blocks, tiles, d_out, lse, delta)` and returning them in the
    inputs' dtypes (None: the Triton one)."""
    if tiled_backward is None:
        tiled_backward = functools.partial(
            fused_tiled_attention_backward, scale=scale, tuning=tuning, interpret=interpret
        )

    def blocked(q, k, v):
        return block_query_layout(q, plan), hyper_attention_tiles(k, v, plan)

    (q_blocks, tiles), blocked_vjp = jax.vjp(blocked, q, k, v)
    stats = jnp.stack([lse, delta], axis=-1)  # one gather for both row statistics
    lse_blocks, delta_blocks = jnp.moveaxis(block_query_layout(stats, plan), -1, 0)
    d_out_blocks = block_query_layout(d_out.astype(q.dtype), plan)
    d_q_blocks, d_tiles = tiled_backward(q_blocks, tiles, d_out_blocks, lse_blocks, delta_blocks)
    return blocked_vjp((d_q_blocks, d_tiles))


def output_delta(out, d_out, d_lse):
    """delta `[B, K, G, T]` float32 = sum_h dO O - dlse, from public-layout out, d_out `[B, T, N, H]` and d_lse
    `[B, K, G, T]`: with the lse, what every backward kernel needs of the output."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    return jnp.swapaxes(delta, 1, 2).reshape(d_lse.shape) - d_lse.astype(jnp.float32)


def public_layout_ranks(q, k, projection_sets, *, interpret, hash_kernel=None):
    """LSH ranks of q `[B, T, N, H]` and k `[B, S, K, H]` under each projection set, hashed in one pass over the
    public layout (the hash kernel where the shapes allow; no transposed copies of q, k either way) and returned
    grouped: [(query_rank `[B, K, G, T]`, key_rank `[B, K, S]`), ...], as `make_plan(ranks=...)` takes them.
    `hash_kernel`: another backend's, `lsh_ranks_pallas`' arguments, returning None where it cannot take x."""
    kv_heads, width = k.shape[2], projection_sets[0].shape[1]
    ranks = None
    if hash_kernel is not None:
        ranks = [hash_kernel(x, projection_sets, interpret=interpret) for x in (q, k)]
        ranks = None if any(x is None for x in ranks) else ranks
    if ranks is None and all(hash_rows(x.shape[1], x.shape[3], x.dtype, width) for x in (q, k)):
        ranks = [lsh_ranks_pallas(x, projection_sets, interpret=interpret) for x in (q, k)]
    if ranks is not None:
        query_ranks, key_ranks = ranks
        return [
            (query_rank.reshape(q.shape[0], kv_heads, -1, q.shape[1]), key_rank)
            for query_rank, key_rank in zip(query_ranks, key_ranks, strict=True)
        ]
    return [
        (group_queries(query_rank[..., None], kv_heads)[..., 0], heads_major(key_rank[..., None])[..., 0])
        for query_rank, key_rank in zip(lsh_ranks(q, projection_sets), lsh_ranks(k, projection_sets), strict=True)
    ]


def kernel_level_probes(q, k, config, level_keys, *, hash_key, shift, scale, interpret, probe_kernel=None):
    """`make_plan(probe=...)` functions for every level of the causal recursion, run by the probe kernels for all
    levels at once (`probe_mass_pallas`: two passes over k in all), on public-layout q, k; or None where no
    probe is configured or the shapes do not fit the kernels. Level l's problems are `ops.causal`'s (second-half
    queries of each of its 2**l chunks over the first half's keys shifted `shift` left), in the plan's order, and
    its probe rows are those `make_plan(key=level_keys[l], hash_key=hash_key)` draws: each function returns that
    mass whatever key it is given. `probe_kernel`: another backend's, with `probe_mass_pallas`' arguments."""
    h, kv_heads, t = q.shape[-1], k.shape[2], k.shape[1]
    depth = len(level_keys)
    if not config.needs_probe or probe_key_chunk(t >> depth, h, shift) is None:
        return None
    probes = []
    for level, level_key in enumerate(level_keys):
        rows = q.shape[2] // kv_heads * (t >> (level + 1))
        index = probe_index(plan_keys(level_key, hash_key).probe, rows, config.num_probe_queries)
        probes.append(probe_queries(q, index, num_kv_heads=kv_heads, chunks=1 << level, halves=True))
    cuts = [(t >> level, t >> (level + 1)) for level in range(depth)]
    masses = (probe_kernel or probe_mass_pallas)(probes, k, cuts=cuts, shift=shift, scale=scale, interpret=interpret)

    def arranged(mass, level):  # [B, C, K, half] -> the plan's problems and key order (the prefix last)
        return jnp.roll(stack_level_problems(mass, level), -shift, axis=-1)

    return [lambda _, mass=mass, level=level: arranged(mass, level) for level, mass in enumerate(masses)]


def _ranks_and_probe(q, k, key, config, hash_key, scale, interpret, probe_allowed: bool, hash_kernel=None,
                     probe_kernel=None):  # fmt: skip
    """The non-causal plan's ranks and `make_plan(probe=...)` function (None where no probe is configured or allowed,
    or the shapes do not fit the probe kernels: make_plan then probes in jnp). The probe rows are those `make_plan`
    picks (`plan_keys(key).probe`); where the hash kernel takes the shapes, the probe's first pass (each probe
    query's lse over all keys) runs inside the hash of k, which reads every key row anyway. With `probe_kernel`
    (another backend's, `probe_mass_pallas`' arguments) the probe runs there in its own two passes."""
    projections = [plan_projections(key, q.shape[-1], config, hash_key)]
    s, kv_heads, width = k.shape[1], k.shape[2], projections[0].shape[1]
    if not (probe_allowed and config.needs_probe) or probe_key_chunk(s, q.shape[-1]) is None:
        return public_layout_ranks(q, k, projections, interpret=interpret, hash_kernel=hash_kernel)[0], None
    index = probe_index(plan_keys(key).probe, q.shape[2] // kv_heads * q.shape[1], config.num_probe_queries)
    probes = probe_queries(q, index, num_kv_heads=kv_heads, chunks=1, halves=False)
    lse = None
    if probe_kernel is None and all(hash_rows(x.shape[1], x.shape[3], x.dtype, width) for x in (q, k)):
        (query_rank,) = lsh_ranks_pallas(q, projections, interpret=interpret)
        (key_rank,), lse = lsh_ranks_pallas(k, projections, interpret=interpret, probes=probes[:, 0], scale=scale)
        ranks = query_rank.reshape(q.shape[0], kv_heads, -1, q.shape[1]), key_rank
        lse = lse[:, None]
    else:
        ranks = public_layout_ranks(q, k, projections, interpret=interpret, hash_kernel=hash_kernel)[0]
    (mass,) = (probe_kernel or probe_mass_pallas)([probes], k, cuts=[(s, s)], scale=scale, interpret=interpret,
                                                   lse=lse)  # fmt: skip
    return ranks, lambda _: mass[:, 0]  # make_plan passes plan_keys(key).probe: the rows above


def grouped_inputs(q, k, v):
    """Public layout -> grouped (`_layout.py`); XLA fuses these transposes into their consumers where it can."""
    return group_queries(q, k.shape[2]), heads_major(k), heads_major(v)


def public_grads(dq, dk, dv):
    """Grouped gradients -> the public layout."""
    return ungroup_output(dq), heads_major(dk), heads_major(dv)


def plan_inputs(q, k, key, config, hash_key, *, scale, interpret, probe_allowed: bool, hash_kernel=None,
                probe_kernel=None):  # fmt: skip
    """What `ops.make_plan` takes from the hash and probe kernels for a non-causal call on public-layout q, k:
    `dict(ranks=..., probe=...)`. q, k enter with their gradients stopped: the plan is a constant of the estimator
    (and the kernels' pallas_calls are never differentiated). `hash_kernel` as `public_layout_ranks`' (where no probe
    is fused into the hash of k), `probe_kernel` as `_ranks_and_probe`'s: another backend's."""
    q, k = jax.lax.stop_gradient((q, k))
    ranks, probe = _ranks_and_probe(q, k, key, config, hash_key, scale, interpret, probe_allowed, hash_kernel,
                                    probe_kernel)  # fmt: skip
    return dict(ranks=ranks, probe=probe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def estimate(q, k, v, kv_length, plan, rows, static):
    """Non-causal estimate under `plan` (made by `ops.make_plan` for grouped q, k, v with `plan_inputs`'s ranks and
    probe) on the fused kernels: public-layout q `[B, T, N, H]`, k, v `[B, S, K, H]` in; out `[B, T, N, H]` and lse
    `[B, K, G, T]` float32 out. `rows`: `ops.plan_rows(plan, row_positions(q5.shape), row_positions(k4.shape))`,
    the plan as int32 rows (q5, k4 the grouped q, k). `static` = (scale, tuning, interpret). The plan and rows get
    zero cotangents."""
    return _estimate_fwd(q, k, v, kv_length, plan, rows, static)[0]


def _estimate_fwd(q, k, v, kv_length, plan, rows, static):
    scale, tuning, interpret = static
    if can_gather_in_kernel(q.shape[-1], plan):
        q_rows, query_index, tiles, key_index = public_row_operands(q, k, v, plan, kv_length, rows, tuning)
        out, lse = indexed_tiled_forward(
            q_rows, k, v, query_index, tiles, key_index, scale=scale, tuning=tuning, interpret=interpret
        )
        out = out.reshape(q.shape)
    else:
        out, lse = _pregathered_forward(*grouped_inputs(q, k, v), plan, scale, tuning, interpret)
        out = ungroup_output(out)
    return (out, lse), (q, k, v, kv_length, plan, rows, out, lse)


def _estimate_bwd(static, residuals, cotangents):
    scale, tuning, interpret = static
    return estimate_gradients(residuals, cotangents, scale=scale, tuning=tuning, interpret=interpret)


def estimate_gradients(residuals, cotangents, *, scale, tuning, interpret, rows_kernel=None, tiled_backward=None):
    """`estimate`'s backward: the kernels that read their rows by index where the plan allows
    (`can_backward_in_place`; `rows_kernel`: another backend's, as `estimate_backward_rows`' kernel), else sorted
    copies (`tiled_backward`: another backend's, as `estimate_backward`'s). Cotangents of q, k, v, then None for
    kv_length, plan and rows."""
    q, k, v, kv_length, plan, rows, out, lse = residuals
    d_out, d_lse = cotangents
    delta = output_delta(out, d_out, d_lse)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if can_gather_in_kernel(h, plan) and can_backward_in_place(plan, t, s):
        q_rows, do_rows = (x.astype(q.dtype).reshape(b, t, kv_heads, n // kv_heads, h) for x in (q, d_out))
        dq, dk, dv = estimate_backward_rows(
            q_rows,
            k,
            v,
            do_rows,
            finite_or_zero(lse),
            delta,
            plan,
            row_positions((b, kv_heads, n // kv_heads, t, 1)),
            row_positions((b, kv_heads, s, 1)),
            None,  # the only part: its kernels write every row
            scale=scale,
            tuning=tuning,
            interpret=interpret,
            kv_length=kv_length,
            rows=rows,
            kernel=rows_kernel,
        )
        return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None
    grads = sorted_copies_backward(q, k, v, plan, d_out, lse, delta, scale=scale, tuning=tuning, interpret=interpret,
                                   tiled_backward=tiled_backward)  # fmt: skip
    return (*grads, None, None, None)


def sorted_copies_backward(q, k, v, plan, d_out, lse, delta, *, scale, tuning, interpret, tiled_backward=None):
    """`estimate_backward` for public-layout q, d_out `[B, T, N, H]`, k, v `[B, S, K, H]` (lse, delta `[B, K, G,
    T]`): dq, dk, dv in the public layout."""
    d_out = group_queries(d_out, k.shape[2])
    grads = estimate_backward(*grouped_inputs(q, k, v), plan, d_out, lse, delta, scale=scale, tuning=tuning,
                              interpret=interpret, tiled_backward=tiled_backward)  # fmt: skip
    return public_grads(*grads)


estimate.defvjp(_estimate_fwd, _estimate_bwd)


def hyper_attention_pallas(
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

    q `[B, T, N, H]`, k, v `[B, S, K, H]` (public layout). Returns out `[B, T, N, H]` in q's dtype and lse
    `[B, K, G, T]` float32 (G = N // K).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    found = plan_inputs(q, k, key, config, hash_key, scale=scale, interpret=interpret, probe_allowed=kv_length is None)
    q5, k4, v4 = grouped_inputs(*jax.lax.stop_gradient((q, k, v)))
    plan = make_plan(q5, k4, key=key, config=config, kv_length=kv_length, hash_key=hash_key, v=v4, scale=scale, **found)
    rows = plan_rows(plan, row_positions(q5.shape), row_positions(k4.shape))
    return estimate(q, k, v, kv_length, plan, rows, (float(scale), tuning or TiledKernelConfig(), bool(interpret)))
