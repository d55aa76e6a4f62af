"""Device check of the Mosaic GPU kernels after the forward: the tile-attention backwards, on sorted copies
(`tiled_attention_backward_mosaic`) and with the rows gathered in the kernels (`indexed_tiled_backward_mosaic`), the
causal base case's flash kernels and the LSH hash.

Command:  PYTHONPATH=. python3 experiments/benchmarks/check_mosaic_backward.py --out $OUT/mosaic_backward.json
Hardware: one H100 80GB or H200 (Hopper: wgmma, TMA), jax 0.11.2 or newer. Runtime: ~3 min for the sorted-copies
rows (measured); the row-gathering rows are not yet measured (--budget-s bounds the whole).

(a) Agreement, `--check-n` tokens, B=1, N=8 query heads over K=2 kv heads, bf16, one key, `paper()` and the default
  at H 64 and 128: the sorted-copies kernels against their jnp twin `ops.tiled_attention_backward` in float32 on the
  plan's sorted copies (dq, and dk, dv per tile); the row-gathering kernels against theirs
  (`indexed_tiled_backward_reference`, the same rows); and `pallas_mosaic_gpu.attention`'s dq, dk, dv with every
  backward against the xla path's for the same key (non-causal; causal with "triton" and "mosaic").
(b) Timings at `--n`, B=1, N=K=32, H=64, bf16, `paper()` and the default: the backward kernels alone on the same
  operands, lse and delta (Mosaic against Triton, on sorted copies and with rows gathered in the kernels), with
  FLOP rates (the backward's useful 10 B N T keys-per-query H); and forward+backward end to end: cuDNN, and
  `pallas_mosaic_gpu` with each backward (non-causal), with "triton" and "mosaic" (causal). Median of many blocking
  calls after warm-up, all in this one process: compare ratios within the run.
(c) The causal base case (segment-causal flash attention with lse, `kernels/mosaic_gpu/flash.py`): the Mosaic kernels
  against their jnp twins at `--check-n` (GQA 8/2, H 64 and 128, segment 1024; and exact non-causal attention, 1000
  queries over 1500 keys, against the jnp reference), and timed at `--n` in segments of
  `--segment` (B=1, N=K=32, H=64): forward against cuDNN's (`cudnn_segment_forward`) and the Triton kernel, backward
  (the final lse and output given) against the Triton one.
(d) The LSH hash (`kernels/mosaic_gpu/hash.py`): ranks against the jnp hash at `--check-n` (mismatches counted), and
  timed at `--n` (B=1, N=32, H=64, one level of 7 hyperplanes and five levels) against the Triton kernel; the
  column-mass probe (`kernels/mosaic_gpu/probe.py`): against the jnp probe at `--check-n` and timed at `--n` (16
  probe rows; non-causal, and five causal levels with a window of 256) against the Triton kernels.
Guard: a failing call is recorded and the rest still runs; no timing starts after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from check_mosaic_gpu import Recorder, _blocked, _functions, _inputs, _relative, _time, time_kernels_on

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.backends import pallas_mosaic_gpu
from hyperattn_jax.kernels.gpu import flash, hyper
from hyperattn_jax.kernels.gpu.causal import recursion_shape
from hyperattn_jax.kernels.gpu.cudnn_segments import cudnn_segment_forward
from hyperattn_jax.kernels.gpu.hash import lsh_ranks_pallas
from hyperattn_jax.kernels.gpu.indexed_backward import indexed_tiled_backward, indexed_tiled_backward_reference
from hyperattn_jax.kernels.gpu.indexed_forward import indexed_tiled_forward_reference
from hyperattn_jax.kernels.gpu.probe import probe_mass_pallas, probe_mass_reference
from hyperattn_jax.kernels.gpu.tiled_attention import fused_tiled_attention_backward
from hyperattn_jax.kernels.mosaic_gpu.flash import (
    flash_attention_mosaic,
    flash_backward_rows_mosaic,
    flash_forward_rows_mosaic,
)
from hyperattn_jax.kernels.mosaic_gpu.hash import lsh_ranks_mosaic
from hyperattn_jax.kernels.mosaic_gpu.indexed_backward import indexed_tiled_backward_mosaic
from hyperattn_jax.kernels.mosaic_gpu.probe import probe_mass_mosaic
from hyperattn_jax.kernels.mosaic_gpu.tiled_backward import tiled_attention_backward_mosaic
from hyperattn_jax.lsh import lsh_projections, lsh_ranks
from hyperattn_jax.reference import grouped_exact_attention

CONFIGS = {"paper": ha.HyperAttentionConfig.paper(), "default": ha.HyperAttentionConfig()}


@functools.partial(jax.jit, static_argnames=("config", "scale"))
def _backward_inputs(q, k, v, config, key, scale):
    """The plan's sorted copies, the twin forward's lse, and the blocked cotangent and delta."""
    q_blocks, tiles = _blocked(q, k, v, config, key)
    f32 = [ops.KeyTile(t.k.astype(jnp.float32), t.v.astype(jnp.float32), t.log_weight) for t in tiles]
    out, lse = ops.tiled_attention(q_blocks.astype(jnp.float32), f32, scale=scale)
    d_out = jax.random.normal(jax.random.key(1), out.shape, q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
    return q_blocks, tiles, d_out, lse, delta


def check_kernels(n, head_dim, config, key) -> dict:
    """(a) the kernels against the float32 twin on the same sorted copies."""
    q, k, v, _ = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    scale = head_dim**-0.5
    q_blocks, tiles, d_out, lse, delta = _backward_inputs(q, k, v, config, key, scale)
    f32 = [ops.KeyTile(t.k.astype(jnp.float32), t.v.astype(jnp.float32), t.log_weight) for t in tiles]
    want_dq, want_tiles = jax.jit(ops.tiled_attention_backward, static_argnames="scale")(
        q_blocks.astype(jnp.float32), f32, d_out.astype(jnp.float32), lse, delta, scale=scale
    )
    run = jax.jit(functools.partial(tiled_attention_backward_mosaic, scale=scale))
    dq, grads = run(q_blocks, tiles, d_out, lse, delta)
    row = {"n": n, "head_dim": head_dim, "dq": _relative(dq, want_dq)}
    for i, ((dk, dv), (want_dk, want_dv)) in enumerate(zip(grads, want_tiles, strict=True)):
        row[f"tile{i}"] = {"keys": dk.shape[3], "dk": _relative(dk, want_dk), "dv": _relative(dv, want_dv)}
    return row


def _float32(tiles):
    return [t._replace(k=None if t.k is None else t.k.astype(jnp.float32),
                       v=None if t.v is None else t.v.astype(jnp.float32)) for t in tiles]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config", "scale"))
def _row_inputs(q, k, v, config, key, scale):
    """The row-gathering backward's operands for public-layout q, k, v: q and dO rows `[B, T, K, G, H]`, k, v, the
    float32 twin forward's lse, delta, and the plan's rows (query_index, tiles, every tile's rows)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q5, k4, v4 = ops.group_queries(q, kv), ops.heads_major(k), ops.heads_major(v)
    plan = ops.make_plan(q5, k4, key=key, config=config, v=v4)
    query_index, tiles, rows, _ = hyper.row_operands(k, v, plan, hyper.row_positions(q5.shape),
                                                     hyper.row_positions(k4.shape), b, None)  # fmt: skip
    q_rows = q.reshape(b, t, kv, n // kv, h)
    own = [index if tile.k is None else None for tile, index in zip(tiles, rows, strict=True)]
    f32 = [x.astype(jnp.float32) for x in (q_rows, k, v)]
    out, lse = indexed_tiled_forward_reference(*f32, query_index, _float32(tiles), own, scale=scale)
    do_rows = jax.random.normal(jax.random.key(1), q_rows.shape, q.dtype)
    delta = jnp.sum(do_rows.astype(jnp.float32) * out, axis=-1).transpose(0, 2, 3, 1)
    return q_rows, k, v, do_rows, lse, delta, query_index, tiles, rows


def check_row_kernels(n, head_dim, config, key) -> dict:
    """(a) the row-gathering kernels against their float32 twin on the same rows."""
    q, k, v, _ = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    args = _row_inputs(q, k, v, config, key, head_dim**-0.5)
    f32 = [x.astype(jnp.float32) for x in args[:4]]
    want = jax.jit(lambda *a: indexed_tiled_backward_reference(*a, None, scale=head_dim**-0.5))(
        *f32, *args[4:7], _float32(args[7]), args[8]
    )
    got = jax.jit(lambda *a: indexed_tiled_backward_mosaic(*a, None, scale=head_dim**-0.5))(*args)
    row = {"n": n, "head_dim": head_dim}
    return {**row, **{f"d{x}": _relative(got[i], want[i]) for i, x in enumerate("qkv")}}


def _gradients(backward, config, key, causal=False):
    """jitted (q, k, v, g) -> dq, dk, dv of sum(out * g): xla's, or pallas_mosaic_gpu's with this backward."""

    def loss(q, k, v, g):
        if backward == "xla":
            out = ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, implementation="xla")
        else:
            out, _ = pallas_mosaic_gpu.attention(q, k, v, key, None, None, config=config, causal=causal,
                                                 scale=q.shape[-1] ** -0.5, backward=backward)  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


CAUSAL_BACKWARDS = ("triton", "mosaic")  # causal calls: the recursion's parts on either row-gathering backward


def check_backend(n, head_dim, config, key, causal=False) -> dict:
    """(a) pallas_mosaic_gpu's gradients with each backward against xla's, for the same key."""
    q, k, v, g = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    want = _gradients("xla", config, key, causal)(q, k, v, g)
    row = {"n": n, "heads": 8, "kv_heads": 2, "head_dim": head_dim, "causal": causal}
    for backward in CAUSAL_BACKWARDS if causal else pallas_mosaic_gpu.BACKWARDS:
        got = _gradients(backward, config, key, causal)(q, k, v, g)
        row[f"{backward}_vs_xla"] = {f"d{x}": _relative(got[i], want[i]) for i, x in enumerate("qkv")}
    return row


def time_kernels(n, config, key) -> dict:
    """(b) the backward kernels alone on the same operands: sorted copies, and the rows gathered in the kernels."""
    q, k, v, _ = _inputs(n, 32, 32, 64, seed=n)
    args = _backward_inputs(q, k, v, config, key, 64**-0.5)
    keys_per_query = sum(t.k.shape[3] for t in args[1])
    flops = 10 * 32 * n * keys_per_query * 64
    kernels = {
        "triton_backward": functools.partial(fused_tiled_attention_backward, scale=64**-0.5),
        "mosaic_backward": functools.partial(tiled_attention_backward_mosaic, scale=64**-0.5),
    }
    row = {"n": n, "keys_per_query": keys_per_query, "flops": flops}
    sorted_copies = time_kernels_on(kernels, args, flops, baseline="triton_backward")
    args = _row_inputs(q, k, v, config, key, 64**-0.5)
    kernels = {
        "triton_rows_backward": lambda *a: indexed_tiled_backward(*a, None, scale=64**-0.5),
        "mosaic_rows_backward": lambda *a: indexed_tiled_backward_mosaic(*a, None, scale=64**-0.5),
    }
    rows = time_kernels_on(kernels, args, flops, baseline="triton_rows_backward")
    return {**row, "sorted_copies": sorted_copies, "rows_gathered": rows}


def time_end_to_end(n, config, key, causal=False) -> dict:
    """(b) forward+backward: cuDNN, and pallas_mosaic_gpu with each backward."""
    q, k, v, g = _inputs(n, 32, 32, 64, seed=n)
    row = {"n": n, "heads": 32, "kv_heads": 32, "head_dim": 64, "mode": f"{'' if causal else 'non'}causal_fwdbwd"}

    row["cudnn"] = _time(_functions("cudnn", config, key, causal)[1], q, k, v, g)
    for backward in CAUSAL_BACKWARDS if causal else pallas_mosaic_gpu.BACKWARDS:
        name = f"mosaic_forward_{backward}_backward"
        row[name] = _time(_gradients(backward, config, key, causal), q, k, v, g)
        if "ms" in row["cudnn"] and "ms" in row[name]:
            row[f"ratio_cudnn_over_{name}"] = row["cudnn"]["ms"] / row[name]["ms"]
    return row


def _flash_inputs(n, heads, kv_heads, head_dim, segment):
    """q rows `[1, n, K, G, H]`, k, v, the twin's out (bf16) and lse, a cotangent and a d lse, for segments."""
    q, k, v, g = _inputs(n, heads, kv_heads, head_dim, seed=n + head_dim)
    q_rows, do_rows = (x.reshape(1, n, kv_heads, heads // kv_heads, head_dim) for x in (q, g))
    f32 = [x.astype(jnp.float32) for x in (q_rows, k, v)]
    out, lse = jax.jit(flash.flash_forward_rows_reference, static_argnames=("scale", "segment", "out_dtype"))(
        *f32, scale=head_dim**-0.5, segment=segment, out_dtype=jnp.float32
    )
    d_lse = 0.1 * jax.random.normal(jax.random.key(2), lse.shape, jnp.float32)
    return (q_rows, k, v, do_rows, lse, out.astype(q.dtype), d_lse), f32, out


def check_flash(n, head_dim, segment) -> dict:
    """(c) the Mosaic flash kernels against their jnp twins."""
    (q_rows, k, v, do_rows, lse, out16, d_lse), f32, out = _flash_inputs(n, 8, 2, head_dim, segment)
    scale = head_dim**-0.5
    got_out, got_lse = jax.jit(lambda *a: flash_forward_rows_mosaic(*a, scale=scale, segment=segment,
                                                                    out_dtype=jnp.float32))(q_rows, k, v)  # fmt: skip
    (dq, dk, dv), delta = jax.jit(lambda *a: flash_backward_rows_mosaic(*a, scale=scale, segment=segment))(
        q_rows, k, v, do_rows, lse, out16, d_lse
    )
    want, want_delta = jax.jit(lambda *a: flash.flash_backward_rows_reference(*a, scale=scale, segment=segment))(
        *f32, do_rows.astype(jnp.float32), lse, out16.astype(jnp.float32), d_lse
    )
    row = {"n": n, "head_dim": head_dim, "segment": segment, "out": _relative(got_out, out)}
    row.update(lse_max_abs=float(jnp.max(jnp.abs(got_lse - lse))), delta=_relative(delta, want_delta))
    row.update({f"d{x}": _relative(g, w) for x, g, w in zip("qkv", (dq, dk, dv), want, strict=True)})
    # exact attention (grouped layout, non-causal, 1000 queries over 1500 keys: both padded inside)
    q5, k4, v4 = (jnp.moveaxis(x, 1, -2)[..., :length, :] for x, length in ((q_rows, 1000), (k, 1500), (v, 1500)))
    exact = jax.jit(lambda q, k, v: flash_attention_mosaic(q, k, v, scale=scale)[0])(q5, k4, v4)
    want_exact = grouped_exact_attention(*(x.astype(jnp.float32) for x in (q5, k4, v4)), scale=scale)[0]
    return {**row, "exact_out": _relative(exact, want_exact)}


def time_flash(n, segment) -> dict:
    """(c) the base case alone at n: forward (cuDNN, Triton, Mosaic) and backward (Triton, Mosaic)."""
    args, _, _ = _flash_inputs(n, 32, 32, 64, segment)
    q_rows, k, v = args[:3]
    _, _, tuning = recursion_shape(n, 64, ha.HyperAttentionConfig.paper(min_seq_len=segment))
    scale = 64**-0.5
    q = q_rows.reshape(1, n, 32, 64)
    forwards = {
        "cudnn": lambda q_rows, k, v: cudnn_segment_forward(q, k, v, scale=scale, segment=segment),
        "triton": lambda *a: flash.flash_forward_rows(*a, scale=scale, segment=segment, tuning=tuning,
                                                      out_dtype=q.dtype),
        "mosaic": lambda *a: flash_forward_rows_mosaic(*a, scale=scale, segment=segment, out_dtype=q.dtype),
    }  # fmt: skip
    backwards = {
        "triton": lambda *a: flash.flash_backward_rows(*a, scale=scale, segment=segment, tuning=tuning,
                                                       interpret=False),
        "mosaic": lambda *a: flash_backward_rows_mosaic(*a, scale=scale, segment=segment),
    }  # fmt: skip
    row = {"n": n, "segment": segment, "heads": 32, "head_dim": 64}
    row["forward"] = {name: _time(jax.jit(fn), q_rows, k, v) for name, fn in forwards.items()}
    row["backward"] = {name: _time(jax.jit(fn), *args) for name, fn in backwards.items()}
    return row


def _hash_inputs(n, levels):
    x = _inputs(n, 32, 32, 64, seed=n)[0]
    keys = jax.random.split(jax.random.key(levels), levels)
    return x, [lsh_projections(key, 64, 7) for key in keys]


def check_hash(n) -> dict:
    """(d) the Mosaic ranks against the jnp ones: mismatches (a sign bit within float32 rounding of a hyperplane)."""
    x, projection_sets = _hash_inputs(n, 5)
    got = jax.jit(lambda x: lsh_ranks_mosaic(x, projection_sets))(x)
    want = jax.jit(lambda x: lsh_ranks(x, projection_sets))(x)
    mismatches = [int(jnp.sum(a != jnp.swapaxes(b, 1, 2))) for a, b in zip(got, want, strict=True)]
    return {"n": n, "ranks": int(got[0].size), "mismatches_per_level": mismatches}


def time_hash(n) -> dict:
    """(d) one input's hash: Mosaic against Triton, one level and five."""
    row = {"n": n, "heads": 32, "head_dim": 64, "width": 7}
    for levels in (1, 5):
        x, projection_sets = _hash_inputs(n, levels)
        row[f"levels_{levels}"] = {
            "triton": _time(jax.jit(lambda x, p=projection_sets: lsh_ranks_pallas(x, p)), x),
            "mosaic": _time(jax.jit(lambda x, p=projection_sets: lsh_ranks_mosaic(x, p)), x),
        }
    return row


def _probe_case(n, levels, shift, *, time_it: bool):
    """(d) one probe case (non-causal: levels 0): the Mosaic masses against the jnp probe's, or both kernels' times."""
    q, k, _, _ = _inputs(n, 32, 32, 64, seed=n + levels)
    cuts = [(n >> level, n >> (level + 1)) for level in range(levels)] if levels else [(n, n)]
    keys = [jax.random.key(level) for level in range(len(cuts))]
    reference = jax.jit(functools.partial(probe_mass_reference, probe_keys=keys, cuts=cuts, shift=shift, scale=0.125,
                                          num_probes=16))  # fmt: skip
    kernels = {"triton": probe_mass_pallas, "mosaic": probe_mass_mosaic}
    run = {name: jax.jit(functools.partial(kernel, cuts=cuts, shift=shift, scale=0.125)) for name, kernel in
           kernels.items()}  # fmt: skip
    if time_it:
        probes = reference(q, k)[1]
        return {name: _time(fn, probes, k) for name, fn in run.items()}
    want, probes = reference(q.astype(jnp.float32), k.astype(jnp.float32))
    return [_relative(a, b) for a, b in zip(run["mosaic"](probes, k), want, strict=True)]


def check_probe(n) -> dict:
    """(d) the Mosaic probe against the jnp one: non-causal, and three causal levels with a window of 256."""
    return {"n": n, **{f"levels_{levels}": _probe_case(n, levels, shift, time_it=False) for levels, shift in
                       ((0, 0), (3, 256))}}  # fmt: skip


def time_probe(n) -> dict:
    """(d) the probe's two passes, Mosaic against Triton: non-causal, and five causal levels with a window of 256."""
    row = {"n": n, "heads": 32, "head_dim": 64, "probes": 16}
    return {**row, **{f"levels_{levels}": _probe_case(n, levels, shift, time_it=True) for levels, shift in
                      ((0, 0), (5, 256))}}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/mosaic_backward.json")
    parser.add_argument("--check-n", type=int, default=8192)
    parser.add_argument("--n", default="32768,131072")
    parser.add_argument("--head-dims", default="64,128", help="head dims of (a)")
    parser.add_argument("--segment", type=int, default=4096, help="(c): the base case's segment length")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no timing after this many seconds")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    key = jax.random.key(0)
    record = {"note": args.note, "configs": {name: dataclasses.asdict(c) for name, c in CONFIGS.items()}}
    record.update(batch=1, dtype="bfloat16", kernel_checks=[], row_kernel_checks=[], checks=[], flash_checks=[],
                  hash_checks=[], probe_checks=[], kernels=[], timings=[], flash_timings=[], hash_timings=[],
                  probe_timings=[])  # fmt: skip
    recorder = Recorder(record, args.out, args.budget_s)
    add = recorder.add
    for name, config in CONFIGS.items():
        for h in [int(x) for x in args.head_dims.split(",") if x]:
            add("kernel_checks", lambda c=config, h=h: check_kernels(args.check_n, h, c, key), config=name)
            add("row_kernel_checks", lambda c=config, h=h: check_row_kernels(args.check_n, h, c, key), config=name)
            for causal in (False, True):
                add("checks", lambda c=config, h=h, z=causal: check_backend(args.check_n, h, c, key, z), config=name)
    for h in [int(x) for x in args.head_dims.split(",") if x]:
        add("flash_checks", lambda h=h: check_flash(args.check_n, h, 1024))
    add("hash_checks", lambda: check_hash(args.check_n))
    add("probe_checks", lambda: check_probe(args.check_n))
    for n in [int(x) for x in args.n.split(",") if x]:
        add("hash_timings", lambda n=n: time_hash(n))
        add("probe_timings", lambda n=n: time_probe(n))
        add("flash_timings", lambda n=n: time_flash(n, args.segment))
        for name, config in CONFIGS.items():
            add("kernels", lambda n=n, c=config: time_kernels(n, c, key), config=name)
            for causal in (False, True):
                add("timings", lambda n=n, c=config, z=causal: time_end_to_end(n, c, key, z), config=name)
    recorder.finish()


if __name__ == "__main__":
    main()
