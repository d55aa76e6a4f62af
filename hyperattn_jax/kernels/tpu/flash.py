"""Exact attention with a float32 natural-log lse as Pallas TPU (Mosaic) kernels: the causal recursion's base case.

jax ships TPU flash and splash attention, but neither fits this seam: `jax.experimental.pallas.ops.tpu.flash_attention`
returns no lse from its public entry point and its vjp raises for `save_residuals=True`; splash returns lse only as a
residual, with no cotangent for it. The causal recursion merges the base case with the estimated quarters by lse and
differentiates that merge, so the lse needs a gradient: dS = P (dP - delta + dlse).

Forward: grid (B*K, query head g, query block i, key block j), j a reduction with the running max, sum and output in
VMEM scratch. Causal: key blocks above the diagonal are skipped, and their index map repeats the last needed block so
the pipeline fetches nothing for them. GQA: k, v `[B*K, S, H]` are indexed by the kv head; no repeated copies.
Backward: a dq kernel on the forward's grid and a dk/dv kernel on (B*K, key block, head, query block), both with the
final lse and delta = rowsum(dO O) - dlse.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hyperattn_jax._numerics import finite_or_zero
from hyperattn_jax.kernels.configs import FlashTiling
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
from hyperattn_jax.reference import grouped_exact_attention


class _Layout(NamedTuple):
    batch: int
    kv_heads: int
    groups: int
    num_queries: int
    num_keys: int
    head_dim: int
    dtype: str
    block_q: int
    block_k: int
    causal: bool

    @property
    def padded_queries(self) -> int:
        return round_up(self.num_queries, self.block_q)

    @property
    def padded_keys(self) -> int:
        return round_up(self.num_keys, self.block_k)


def make_layout(q_shape, k_shape, dtype, causal: bool, tiling: FlashTiling) -> _Layout:
    batch, kv_heads, groups, t, h = q_shape
    s = k_shape[2]
    if causal and t != s:
        raise ValueError(f"causal flash attention needs as many queries as keys, got T={t}, S={s}")
    if tiling.block_q % ROW_MULTIPLE or tiling.block_k % NUM_LANES:
        raise ValueError(f"{tiling=}: block_q must be a multiple of {ROW_MULTIPLE}, block_k of {NUM_LANES}")
    block_q = min(tiling.block_q, round_up(t, ROW_MULTIPLE))
    block_k = min(tiling.block_k, round_up(s, NUM_LANES))
    return _Layout(batch, kv_heads, groups, t, s, h, jnp.dtype(dtype).name, block_q, block_k, causal)


def flash_budgets(layout: _Layout) -> list[VmemBudget]:
    """VMEM per grid step of the forward, dq and dk/dv kernels of one configuration."""
    bq, bk, h, dt = layout.block_q, layout.block_k, layout.head_dim, layout.dtype
    rows, keys = tile_bytes((bq, h), dt), tile_bytes((bk, h), dt)
    stat, bias = tile_bytes((bq, 1), jnp.float32), tile_bytes((1, bk), jnp.float32)
    scores = tile_bytes((bq, bk), jnp.float32)
    acc_q, acc_k = tile_bytes((bq, h), jnp.float32), tile_bytes((bk, h), jnp.float32)
    forward = VmemBudget(
        "flash forward",
        {"q": rows, "k": keys, "v": keys, "bias": bias, "out": rows, "lse": stat},
        {"max, sum": 2 * stat, "accumulator": acc_q},
        {"scores, probabilities": 2 * scores},
    )
    grads = {"q": rows, "do": rows, "lse": stat, "delta": stat, "k": keys, "v": keys, "bias": bias}
    dq = VmemBudget("flash dq", grads | {"dq": rows}, {"dq accumulator": acc_q}, {"P, dP, dS": 3 * scores})
    dkdv = VmemBudget(
        "flash dk/dv", grads | {"dk": keys, "dv": keys}, {"dk, dv accumulators": 2 * acc_k}, {"P, dP, dS": 3 * scores}
    )
    return [forward, dq, dkdv]


def _scores(q, k, bias, qi, kj, layout: _Layout, scale: float):
    """Float32 scores of query block qi against key block kj: scaled, key bias added, causal mask applied."""
    s = dot_t(q, k) * scale + bias
    if layout.causal:
        shape = (layout.block_q, layout.block_k)
        row = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + qi * layout.block_q
        col = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + kj * layout.block_k
        s = jnp.where(col <= row, s, -jnp.inf)
    return s


def _needed(qi, kj, layout: _Layout):
    """Whether key block kj holds any key that query block qi may see (always, unless causal)."""
    if not layout.causal:
        return True
    return kj * layout.block_k <= (qi + 1) * layout.block_q - 1


def _last_key_block(qi, layout: _Layout):
    """The last key block query block qi sees: the index map repeats it for the skipped ones (no refetch)."""
    return div((qi + 1) * layout.block_q - 1, layout.block_k)


def _first_query_block(kj, layout: _Layout):
    return div(kj * layout.block_k, layout.block_q)


# ------------------------------------------------------------------------------------------------ forward


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, m_acc, l_acc, o_acc, *, layout, scale):
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        m_acc[...] = jnp.full(m_acc.shape, NEG_START, jnp.float32)
        l_acc[...] = jnp.zeros(l_acc.shape, jnp.float32)
        o_acc[...] = jnp.zeros(o_acc.shape, jnp.float32)

    @pl.when(_needed(qi, kj, layout))
    def _step():
        s = _scores(q_ref[...], k_ref[...], bias_ref[...], qi, kj, layout, scale)
        row_max = m_acc[...]
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - new_max)
        correction = jnp.exp(row_max - new_max)
        v = v_ref[...]
        o_acc[...] = o_acc[...] * correction + dot(p.astype(v.dtype), v)
        l_acc[...] = l_acc[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        m_acc[...] = new_max

    @pl.when(kj == pl.num_programs(3) - 1)
    def _write():
        row_sum = l_acc[...]
        has_keys = row_sum > 0
        safe_sum = jnp.where(has_keys, row_sum, 1.0)
        o_ref[...] = (o_acc[...] / safe_sum).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, m_acc[...] + jnp.log(safe_sum), -jnp.inf)


def _query_major_specs(layout: _Layout):
    """Specs on the grid (bk, g, qi, kj): query rows, their statistics, and the (clamped) key blocks."""
    bq, bk, h, kv_heads = layout.block_q, layout.block_k, layout.head_dim, layout.kv_heads

    def key_block(qi, kj):
        return jnp.minimum(kj, _last_key_block(qi, layout)) if layout.causal else kj

    rows = pl.BlockSpec((None, None, bq, h), lambda b, g, qi, kj: (b, g, qi, 0))
    stats = pl.BlockSpec((None, None, bq, 1), lambda b, g, qi, kj: (b, g, qi, 0))
    keys = pl.BlockSpec((None, bk, h), lambda b, g, qi, kj: (b, key_block(qi, kj), 0))
    bias = pl.BlockSpec((None, 1, bk), lambda b, g, qi, kj: (div(b, kv_heads), 0, key_block(qi, kj)))
    return rows, stats, keys, bias


def _query_major_grid(layout: _Layout):
    return (
        layout.batch * layout.kv_heads,
        layout.groups,
        layout.padded_queries // layout.block_q,
        layout.padded_keys // layout.block_k,
    )


def _forward_call(q, k, v, bias, layout: _Layout, scale: float, interpret: bool):
    rows, stats, keys, bias_spec = _query_major_specs(layout)
    bq, h = layout.block_q, layout.head_dim
    return pl.pallas_call(
        functools.partial(_forward_kernel, layout=layout, scale=scale),
        grid=_query_major_grid(layout),
        in_specs=[rows, keys, keys, bias_spec],
        out_specs=[rows, stats],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(interpret),
        name="hyper_flash_fwd_tpu",
    )(q, k, v, bias)


# ------------------------------------------------------------------------------------------------ backward


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref, dq_ref, dq_acc, *, layout, scale):
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(_needed(qi, kj, layout))
    def _step():
        k = k_ref[...]
        p = jnp.exp(_scores(q_ref[...], k, bias_ref[...], qi, kj, layout, scale) - lse_ref[...])
        ds = p * (dot_t(do_ref[...], v_ref[...]) - delta_ref[...])
        dq_acc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, layout, scale
):
    kj, g, qi = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    first = (g == 0) & (qi == 0)
    last = (g == pl.num_programs(2) - 1) & (qi == pl.num_programs(3) - 1)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(_needed(qi, kj, layout))
    def _step():
        q, do = q_ref[...], do_ref[...]
        p = jnp.exp(_scores(q, k_ref[...], bias_ref[...], qi, kj, layout, scale) - lse_ref[...])
        dv_acc[...] += dot(p.T.astype(do.dtype), do)
        ds = p * (dot_t(do, v_ref[...]) - delta_ref[...])
        dk_acc[...] += dot(ds.T.astype(q.dtype), q)

    @pl.when(last)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(q, k, v, bias, out, lse, do, d_lse, layout: _Layout, scale: float, interpret: bool):
    lse = finite_or_zero(lse)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True) - d_lse
    rows, stats, keys, bias_spec = _query_major_specs(layout)
    bq, bk, h = layout.block_q, layout.block_k, layout.head_dim
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, layout=layout, scale=scale),
        grid=_query_major_grid(layout),
        in_specs=[rows, rows, stats, stats, keys, keys, bias_spec],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(interpret),
        name="hyper_flash_dq_tpu",
    )(q, do, lse, delta, k, v, bias)

    def query_block(kj, qi):  # causal: query blocks before the first that sees key block kj repeat it (no refetch)
        return jnp.maximum(qi, _first_query_block(kj, layout)) if layout.causal else qi

    kv_heads = layout.kv_heads
    rows_k = pl.BlockSpec((None, None, bq, h), lambda b, kj, g, qi: (b, g, query_block(kj, qi), 0))
    stats_k = pl.BlockSpec((None, None, bq, 1), lambda b, kj, g, qi: (b, g, query_block(kj, qi), 0))
    keys_k = pl.BlockSpec((None, bk, h), lambda b, kj, g, qi: (b, kj, 0))
    bias_k = pl.BlockSpec((None, 1, bk), lambda b, kj, g, qi: (div(b, kv_heads), 0, kj))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, layout=layout, scale=scale),
        grid=(q.shape[0], layout.padded_keys // bk, layout.groups, layout.padded_queries // bq),
        in_specs=[rows_k, rows_k, stats_k, stats_k, keys_k, keys_k, bias_k],
        out_specs=[keys_k, keys_k],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32)] * 2,
        compiler_params=compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret_arg(interpret),
        name="hyper_flash_dkdv_tpu",
    )(q, do, lse, delta, k, v, bias)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------ vjp and layouts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, bias, layout, scale, interpret):
    return _flash_fwd(q, k, v, bias, layout, scale, interpret)[0]


def _flash_fwd(q, k, v, bias, layout, scale, interpret):
    out, lse = _forward_call(q, k, v, bias, layout, scale, interpret)
    return (out, lse), (q, k, v, bias, out, lse)


def _flash_bwd(layout, scale, interpret, residuals, cotangents):
    q, k, v, bias, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _backward(q, k, v, bias, out, lse, d_out.astype(q.dtype), d_lse, layout, scale, interpret)
    return dq, dk, dv, jnp.zeros_like(bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool = False,
    kv_length=None,
    tiling: FlashTiling | None = None,
    interpret: bool | None = None,
):
    """Exact attention in the grouped layout with its lse, as Pallas TPU kernels (differentiable, lse included).

    Args:
      q: `[B, K, G, T, H]`, bfloat16 or float32; k, v: `[B, K, S, H]` in q's dtype (GQA: G query heads per kv head).
      scale: softmax scale.
      causal: query i sees keys j <= i (needs T == S).
      kv_length: optional int `[B]`: keys at positions >= kv_length[b] are padding.
      tiling: block sizes (`FlashTiling`).
      interpret: TPU interpret mode on the CPU (default: when the backend is not a TPU).

    Returns:
      out `[B, K, G, T, H]` in q's dtype and lse `[B, K, G, T]` float32 (natural log).

    >>> q = jnp.ones((1, 1, 2, 16, 64)); k = jnp.ones((1, 1, 16, 64))
    >>> out, lse = flash_attention_tpu(q, k, k, scale=0.125, causal=True, interpret=True)
    >>> out.shape, lse.shape
    ((1, 1, 2, 16, 64), (1, 1, 2, 16))
    """
    tiling = FlashTiling() if tiling is None else tiling
    interpret = default_interpret() if interpret is None else bool(interpret)
    layout = make_layout(q.shape, k.shape, q.dtype, causal, tiling)
    for budget in flash_budgets(layout):
        budget.check()
    b, kv_heads, g, t, h = q.shape
    q_in = pad_to(q, 3, layout.padded_queries).reshape(b * kv_heads, g, layout.padded_queries, h)
    k_in, v_in = (pad_to(x, 2, layout.padded_keys).reshape(b * kv_heads, layout.padded_keys, h) for x in (k, v))
    valid = jnp.arange(layout.padded_keys) < (layout.num_keys if kv_length is None else kv_length[:, None])
    bias = jnp.broadcast_to(jnp.where(valid, 0.0, -jnp.inf), (b, layout.padded_keys))[:, None, :]
    out, lse = _flash(q_in, k_in, v_in, bias, layout, float(scale), interpret)
    out = out.reshape(b, kv_heads, g, layout.padded_queries, h)[:, :, :, :t]
    return out, lse.reshape(b, kv_heads, g, layout.padded_queries)[..., :t]


def flash_attention_tpu_reference(q, k, v, *, scale: float, causal: bool = False, kv_length=None):
    """The jnp twin: the package's exact reference (out and lse float32), the same math without tiling."""
    return grouped_exact_attention(q, k, v, scale=scale, causal=causal, kv_length=kv_length)
