"""The paper's causal recursion on the fused kernels, as ONE differentiable function with its own backward.

Same estimator and same random draws (`ops.level_keys`) as `ops.grouped_causal_attention` (its jnp twin), computed
without its copies, on the public layout (q `[B, T, N, H]`, k, v `[B, T, K, H]`):
- the diagonal problems of the last level are one segment-causal call on the unsplit sequence (cuDNN's flash forward
  with its float32 lse where it runs, `cudnn_segments.py`; our flash kernel elsewhere);
- every level's hash comes from one kernel over the unsorted q and k (each level has its own hyperplanes), and the
  default config's column-mass probe from two kernels per level that read k in place;
- each level's lower-left problems (second-half queries of every chunk over its first-half keys) are planned on
  strided views, in the batch order the ops recursion stacks them (chunk index bit-reversed), and ONE kernel launch
  per level reads their rows straight from q, k, v by index and merges its part by lse into the running out and lse
  at its T/2 rows, in place: no copy of q, k, v per level, no array per part, no separate merge pass.
Backward: every part's backward kernels run with the FINAL lse and delta (see `fused_tiled_attention_backward`), so no
part keeps its own output and nothing is differentiated through the merge. The base case's kernels write float32
gradient accumulators on the public layout; each level's kernels read q, dO, k, v rows by index and add their dq, dk,
dv rows into them in place (`indexed_backward.py`): no grouped or sorted copies, one cast at the end.
Residuals: q, k, v, out, lse and the plans (int32 orders and samples).
"""

from __future__ import annotations

import functools

import jax

from hyperattn_jax._numerics import finite_or_zero
from hyperattn_jax.kernels.gpu.cudnn_segments import cudnn_segment_forward
from hyperattn_jax.kernels.gpu.flash import FlashConfig, flash_backward_rows, flash_forward_rows
from hyperattn_jax.kernels.gpu.hyper import (
    estimate_backward_rows,
    fits_dot,
    grouped_inputs,
    kernel_probe,
    public_layout_ranks,
    row_operands,
    row_positions,
)
from hyperattn_jax.kernels.gpu.indexed_forward import indexed_tiled_forward
from hyperattn_jax.ops.causal import level_problem, level_rows, level_shape, quarter_is_exact, stack_level_problems
from hyperattn_jax.ops.keys import level_keys
from hyperattn_jax.ops.plan import make_plan, plan_projections


def recursion_shape(t: int, head_dim: int, config) -> tuple[int, int, FlashConfig] | None:
    """(levels, base segment length, flash tuning) of the recursion over t positions, or None where this module does
    not apply and the ops recursion (with kernels inside) must run: no recursion at all, and shapes the in-place
    kernels cannot take: odd lengths on the way down, segments not a multiple of the block size (every query and key
    slot of every level must hold a real row; on `ops.causal_padded_length` positions that happens only where
    min_seq_len is not a multiple of the block size), head dims or blocks that are not powers of two. Heavy keys and the
    window are global keys of each level's plan (a shared tile, like the samples); quarters the recursion computes
    exactly are plans whose keys are all global (`level_plan_config`). Sinks are the caller's (`ops.without_sinks`):
    `config` must have none."""
    shape = level_shape(t, config)
    if config.num_sink_keys or shape is None or not (fits_dot(head_dim) and fits_dot(config.block_size)):
        return None
    depth, segment = shape
    block = next((b for b in (128, 64, 32, 16) if segment % b == 0), None)
    if block is None or segment % config.block_size:
        return None
    return depth, segment, FlashConfig(block_q=block, block_k=min(64, block), block_bwd=min(64, block))


def level_plan_config(half: int, config):
    """(config, recent keys) of the plan of a level whose quarters hold `half` keys. Where the recursion computes the
    quarter exactly (fewer than min_seq_len keys, e.g. the last level of 3 x 4096 positions, or a window as long as
    the quarter), every key is a recent (global) key of a plan without samples or heavy keys: the same row-indexed
    kernels then attend the whole quarter exactly and merge it like any level."""
    if quarter_is_exact(half, config) or config.local_window >= half:
        exact = config.replace(sample_size=0, num_heavy_keys=0, sample_distribution="uniform", local_window=0)
        return exact, half
    return config, config.local_window


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def estimate(q, k, v, key, hash_key, static):
    """Causal HyperAttention on the fused kernels for shapes `recursion_shape` accepts: q `[B, T, N, H]`, k, v
    `[B, T, K, H]` (public layout) -> out `[B, T, N, H]` (q's dtype), lse `[B, K, G, T]` float32.
    `static` = (config, scale, TiledKernelConfig, interpret, recursion_shape(...))."""
    return _causal_fwd(q, k, v, key, hash_key, static)[0]


def _causal_fwd(q, k, v, key, hash_key, static):
    config, scale, tuning, interpret, (depth, segment, flash_tuning) = static
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q_rows = q.reshape(b, t, kv_heads, n // kv_heads, h)
    # The base case, causal attention within every segment: cuDNN's flash forward where it runs (faster on Hopper:
    # probe_causal_parts_h200.json), else our flash kernel; out `[B, T, K, G, H]`, lse `[B, K, G, T]`.
    cudnn = None if interpret else cudnn_segment_forward(q, k, v, scale=scale, segment=segment)
    if cudnn is not None:
        out, lse = cudnn[0].reshape(q_rows.shape), cudnn[1].reshape(b, kv_heads, n // kv_heads, t)
    else:
        out, lse = flash_forward_rows(
            q_rows, k, v, scale=scale, segment=segment, tuning=flash_tuning, out_dtype=q.dtype, interpret=interpret
        )
    q5, k4, v4 = grouped_inputs(q, k, v)  # for shapes (and the jnp probe where the probe kernels do not fit)
    query_positions, key_positions = row_positions((*q5.shape[:-1], 1)), row_positions((*k4.shape[:-1], 1))
    keys = level_keys(key, depth)
    # Every level's hash in one pass over the unsorted q and k (each level has its own hyperplanes).
    projections = [plan_projections(level_key, h, config, hash_key) for level_key in keys]
    plans = []
    for level, (level_key, (query_rank, key_rank)) in enumerate(
        zip(keys, public_layout_ranks(q, k, projections, interpret=interpret), strict=True)
    ):
        ql, kl, vl = level_problem(q5, k4, v4, level)
        ranks = level_rows(query_rank[..., None], 1, level)[..., 0], level_rows(key_rank[..., None], 0, level)[..., 0]
        plan_config, recent_keys = level_plan_config(kl.shape[2], config)
        probe = kernel_probe(
            q,
            k,
            plan_config,
            scale=scale,
            interpret=interpret,
            chunks=2**level,
            halves=True,
            arrange=functools.partial(stack_level_problems, level=level),
        )
        plan = make_plan(
            ql, kl, key=level_key, config=plan_config, hash_key=hash_key, v=vl, scale=scale, ranks=ranks,
            probe=probe, recent_keys=recent_keys,
        )  # fmt: skip
        # The level's problems read their rows of q, k, v by index (the plan was made for [P, K, G, T', H] problems,
        # P = chunks * B, problem p reading batch element p % B) and merge by lse into out, lse in place.
        query_index, tiles, _, key_index = row_operands(
            k, v, plan, level_rows(query_positions, 1, level), level_rows(key_positions, 0, level), b, None, tuning
        )
        out, lse = indexed_tiled_forward(
            q_rows, k, v, query_index, tiles, key_index, scale=scale, tuning=tuning, interpret=interpret,
            merge_into=(out, lse),
        )  # fmt: skip
        plans.append(plan)
    out = out.reshape(q.shape)
    return (out, lse), (q, k, v, out, lse, plans)


def _causal_bwd(static, residuals, cotangents):
    _, scale, tuning, interpret, (_, segment, flash_tuning) = static
    q, k, v, out, lse, plans = residuals
    d_out, d_lse = cotangents
    lse = finite_or_zero(lse)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q_rows, do_rows, out_rows = (x.astype(q.dtype).reshape(b, t, kv_heads, n // kv_heads, h) for x in (q, d_out, out))
    # The base case's kernels write the float32 accumulators (and delta); every level's kernels add their rows.
    grads, delta = flash_backward_rows(
        q_rows, k, v, do_rows, lse, out_rows, d_lse, scale=scale, segment=segment, tuning=flash_tuning,
        interpret=interpret,
    )  # fmt: skip
    query_positions = row_positions((b, kv_heads, n // kv_heads, t, 1))
    key_positions = row_positions((b, kv_heads, t, 1))
    for level, plan in enumerate(plans):
        grads = estimate_backward_rows(
            q_rows,
            k,
            v,
            do_rows,
            lse,
            delta,
            plan,
            level_rows(query_positions, 1, level),
            level_rows(key_positions, 0, level),
            grads,
            scale=scale,
            tuning=tuning,
            interpret=interpret,
        )
    dq, dk, dv = grads
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


estimate.defvjp(_causal_fwd, _causal_bwd)
