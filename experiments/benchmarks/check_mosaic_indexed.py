"""Device check of the Mosaic GPU forward that gathers its rows in the kernel (`indexed_tiled_forward_mosaic`).

Command:  PYTHONPATH=. python3 experiments/benchmarks/check_mosaic_indexed.py --out $OUT/mosaic_indexed.json
Hardware: one H100 80GB or H200 (Hopper: wgmma, TMA, cp.async), jax 0.11.2 or newer. Runtime: ~4 min, one call.

(a) Agreement, `--check-n` tokens, B=1, N=8 query heads over K=2 kv heads, bf16, one key: `implementation=
  "pallas_mosaic_gpu"` (which now runs the row-gathering kernel wherever the query blocks are whole 64-row chunks),
  `pallas_triton` and `xla` (out, lse; dq, dk, dv against xla) for `paper()` and the default at `--head-dims`,
  non-causal and causal (`--check-causal`: the causal recursion's parts run on the Mosaic kernel, merged in place)
  (`check_mosaic_gpu.check_implementations`); and the row-gathering kernels (Mosaic variants, Triton) on the same
  row operands against their jnp twin `indexed_tiled_forward_reference` in float32.
(b) Timings at `--n`, B=1, N=K=32, H=64, bf16, `paper()` and the default: `--modes` (forward and forward+backward,
  causal or not) of cuDNN, `pallas_triton` and `pallas_mosaic_gpu` (the backward is the Triton path's for both),
  and the row-gathering kernels alone on the same operands with their FLOP rates (Mosaic `VARIANTS`: keys per
  chunk, ring depth, key rows staged or not). Median of many blocking calls after
  warm-up, all in this one process: compare ratios within the run.
(c) `--profile-n`: Mosaic GPU's on-device profile of each selected variant at that n (B=1, N=K=32, H=64): mean
  microseconds per program in each named region of the kernel ("issue" copies, "wait", "attend", "store"; the
  producer's "wait_slot", "announce"), per warpgroup, profiling overhead included.
Recorded (H100): `results/mosaic_indexed_h100.json` (before `stage_rows`: every key-row load direct; variants k128,
k64), `results/mosaic_indexed_staged_h100.json` (staged or direct, two slots; q and out in separate buffers) and
`results/mosaic_indexed_ring_h100.json` (`VARIANTS`, out written into q's buffer).
Guard: a failing call is recorded and the rest still runs; no timing starts after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from check_mosaic_gpu import (
    Recorder,
    _error,
    _inputs,
    _relative,
    check_implementations,
    time_end_to_end,
    time_kernels_on,
)

import hyperattn_jax as ha
from hyperattn_jax.backends.pallas_triton import plan_and_rows
from hyperattn_jax.kernels.configs import MosaicTiling, TiledKernelConfig
from hyperattn_jax.kernels.gpu import hyper
from hyperattn_jax.kernels.gpu.indexed_forward import indexed_tiled_forward, indexed_tiled_forward_reference
from hyperattn_jax.kernels.mosaic_gpu.indexed_forward import indexed_tiled_forward_mosaic

INTERPRET = jax.default_backend() != "gpu"  # a CPU dry run: the kernels in their interpreters
CONFIGS = {"paper": ha.HyperAttentionConfig.paper(), "default": ha.HyperAttentionConfig()}


def _row_operands(q, k, v, config, key):
    """The plan's row operands for public-layout q, k, v, as both backends build them: (q_rows, query_index, tiles,
    key_index)."""
    plan, rows = plan_and_rows(q, k, v, key, None, None, config=config, scale=q.shape[-1] ** -0.5, interpret=INTERPRET)
    return hyper.public_row_operands(q, k, v, plan, None, rows)


# Mosaic variants: k = keys per chunk, s = chunk slots in the ring (`MosaicTiling.stages`), "direct": key rows loaded
# from global memory by each gather instead of staged in shared memory by TMA (`MosaicTiling.stage_rows`),
# "producer": `MosaicTiling.producer` (added after `mosaic_indexed_ring_h100.json`; since the ninth session its
# gathers arrive on a barrier as they land, where it used to wait for them before announcing), "2wg": two compute
# warpgroups, "pingpong": a producer and two compute warpgroups in FlashAttention-3's ping-pong schedule, "stores":
# `MosaicTiling.stage_store_rows`, "heads": `MosaicTiling.share_heads`.
VARIANTS = {
    "k128_s2": MosaicTiling(block_k=128, stages=2),
    "k128_s3": MosaicTiling(block_k=128, stages=3),
    "k64_s2": MosaicTiling(block_k=64, stages=2),
    "k64_s3": MosaicTiling(block_k=64, stages=3),
    "k64_s4": MosaicTiling(block_k=64, stages=4),
    "k64_s3_direct": MosaicTiling(block_k=64, stages=3, stage_rows=False),
    # a producer warpgroup issues the copies, the other only multiplies (warp specialisation)
    "k128_s2_producer": MosaicTiling(block_k=128, stages=2, producer=True),
    "k128_s3_producer": MosaicTiling(block_k=128, stages=3, producer=True),
    "k64_s3_producer": MosaicTiling(block_k=64, stages=3, producer=True),
    # two compute warpgroups (2 x 64 slots of one query block) share each chunk: half the gathers per query
    "k128_s2_2wg": MosaicTiling(block_k=128, compute_warpgroups=2),
    "k64_s3_2wg": MosaicTiling(block_k=64, stages=3, compute_warpgroups=2),
    "k128_s2_2wg_producer": MosaicTiling(block_k=128, compute_warpgroups=2, producer=True),
    "k128_s3_2wg_producer": MosaicTiling(block_k=128, stages=3, compute_warpgroups=2, producer=True),
    "k128_s2_pingpong": MosaicTiling(block_k=128, compute_warpgroups=2, producer=True, pingpong=True),
    "k128_s3_pingpong": MosaicTiling(block_k=128, stages=3, compute_warpgroups=2, producer=True, pingpong=True),
    "k64_s4_pingpong": MosaicTiling(block_k=64, stages=4, compute_warpgroups=2, producer=True, pingpong=True),
    # the rows out and lse are stored at, staged in shared memory by TMA with the queries
    "k128_s2_stores": MosaicTiling(block_k=128, stages=2, stage_store_rows=True),
    "k128_s2_producer_stores": MosaicTiling(block_k=128, stages=2, producer=True, stage_store_rows=True),
    # grouped-query attention: two compute warpgroups, the same slots of two query heads of a kv head (time with
    # --kv-heads 16 or fewer)
    "k128_s2_2wg_heads": MosaicTiling(block_k=128, compute_warpgroups=2, share_heads=True),
    "k128_s3_pingpong_heads": MosaicTiling(
        block_k=128, stages=3, compute_warpgroups=2, producer=True, pingpong=True, share_heads=True
    ),
}


def _kernels(scale, variants=None):
    """The Triton row-indexed kernel and the Mosaic variants (`VARIANTS`, or those named in `variants`)."""
    kernels = {
        "triton_indexed": lambda q, k, v, qi, ts, ki: indexed_tiled_forward(
            q, k, v, qi, ts, ki, scale=scale, tuning=TiledKernelConfig(), interpret=INTERPRET
        )
    }
    for name, tiling in VARIANTS.items():
        if variants is not None and name not in variants:
            continue
        kernels[f"mosaic_indexed_{name}"] = lambda q, k, v, qi, ts, ki, tiling=tiling: indexed_tiled_forward_mosaic(
            q, k, v, qi, ts, ki, scale=scale, tiling=tiling
        )
    return kernels


def check_kernels(n, head_dim, config, key, variants=None) -> dict:
    """The row-gathering kernels against the float32 twin on the same operands (out, lse)."""
    q, k, v, _ = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    row = {"n": n, "heads": 8, "kv_heads": 2, "head_dim": head_dim}
    q_rows, query_index, tiles, key_index = jax.jit(_row_operands, static_argnames="config")(q, k, v, config, key)
    f32 = [tile._replace(k=None if tile.k is None else tile.k.astype(jnp.float32),
                         v=None if tile.v is None else tile.v.astype(jnp.float32)) for tile in tiles]  # fmt: skip
    twin = jax.jit(indexed_tiled_forward_reference, static_argnames="scale")(
        q_rows.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), query_index, f32, key_index,
        scale=head_dim**-0.5,
    )  # fmt: skip
    for name, kernel in _kernels(head_dim**-0.5, variants).items():
        try:
            out, lse = jax.jit(kernel)(q_rows, k, v, query_index, tiles, key_index)
            row[f"{name}_vs_twin"] = {"out": _relative(out, twin[0]), "lse": _relative(lse, twin[1])}
        except Exception as error:
            row[f"{name}_error"] = _error(error)
    return row


def time_kernels(n, config, key, variants=None, kv_heads=32, head_dim=64) -> dict:
    """The row-gathering kernels alone on the same operands (B=1, N=32, `kv_heads`), with FLOP rates (4 B N T
    keys-per-query H)."""
    q, k, v, _ = _inputs(n, 32, kv_heads, head_dim, seed=n)
    operands = jax.jit(_row_operands, static_argnames="config")(q, k, v, config, key)
    _, query_index, tiles, key_index = operands
    keys_per_query = sum(t.k.shape[3] if i is None else i.shape[-1] for t, i in zip(tiles, key_index))
    flops = 4 * 32 * n * keys_per_query * head_dim
    row = {"n": n, "kv_heads": kv_heads, "head_dim": head_dim, "keys_per_query": keys_per_query, "flops": flops}
    args = (operands[0], k, v, query_index, tiles, key_index)
    kernels = _kernels(head_dim**-0.5, variants)
    return {**row, **time_kernels_on(kernels, args, flops, baseline="triton_indexed")}


def summarise_trace(path, warpgroups: int) -> dict:
    """Mean microseconds per program in each named region of a Mosaic GPU profile (Perfetto JSON: one track per
    program and warpgroup, begin/end events), per warpgroup (the compute warpgroups first, then the producer, if
    any), and each warpgroup's mean span from its first event to its last."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    open_at, totals, spans = {}, {}, {}
    for event in events:
        track = event["tid"] - 1
        warpgroup = track % warpgroups
        first, last = spans.setdefault(track, (event["ts"], event["ts"]))
        spans[track] = (min(first, event["ts"]), max(last, event["ts"]))
        if event["ph"] == "B":
            open_at.setdefault(track, []).append(event["ts"])
        else:
            region = totals.setdefault(warpgroup, {})
            region[event["name"]] = region.get(event["name"], 0.0) + event["ts"] - open_at[track].pop()
    programs = len(spans) // warpgroups
    summary = {"programs": programs}
    for warpgroup, region in sorted(totals.items()):
        span = sum(last - first for track, (first, last) in spans.items() if track % warpgroups == warpgroup)
        summary[f"warpgroup_{warpgroup}_us"] = {
            "span": span / programs, **{name: total / programs for name, total in sorted(region.items())}
        }  # fmt: skip
    return summary


def profile_kernels(n, config, key, variants) -> dict:
    """Mosaic GPU's on-device profile of the row-gathering kernel (one call per variant, `profile_dir`): where a
    program's time goes, per warpgroup and named region (`summarise_trace`). The traces stay in a temporary folder."""
    q, k, v, _ = _inputs(n, 32, 32, 64, seed=n)
    q_rows, query_index, tiles, key_index = jax.jit(_row_operands, static_argnames="config")(q, k, v, config, key)
    row = {"n": n}
    for name in variants:
        tiling = VARIANTS[name]
        with tempfile.TemporaryDirectory() as folder:
            try:
                call = jax.jit(lambda q, k, v, qi, ts, ki, tiling=tiling: indexed_tiled_forward_mosaic(
                    q, k, v, qi, ts, ki, scale=64**-0.5, tiling=tiling, profile_dir=folder))  # fmt: skip
                jax.block_until_ready(call(q_rows, k, v, query_index, tiles, key_index))
                jax.effects_barrier()  # the trace is written by a host callback
                [trace] = Path(folder).glob("*.json")
                row[f"mosaic_indexed_{name}"] = summarise_trace(trace, tiling.compute_warpgroups + tiling.producer)
            except Exception as error:
                row[f"mosaic_indexed_{name}_error"] = _error(error)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/mosaic_indexed.json")
    parser.add_argument("--check-n", type=int, default=8192)
    parser.add_argument("--n", default="32768,131072")
    parser.add_argument("--modes", default="noncausal_fwd,noncausal_fwdbwd")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no timing after this many seconds")
    parser.add_argument("--head-dims", default="64,128", help="head dims of (a), for every config")
    parser.add_argument("--check-causal", choices=("no", "also", "only", "skip"), default="also",
                        help="(a) causal calls too, or only (the recursion's parts on the Mosaic kernel); skip: "
                             "no backend checks, the kernels against the twin only (a quick smoke run)")  # fmt: skip
    parser.add_argument("--variants", default="", help="comma-separated names of VARIANTS (default: all)")
    parser.add_argument("--kv-heads", type=int, default=32, help="kernel timings: kv heads of the 32 query heads")
    parser.add_argument("--kernel-head-dim", type=int, default=64, help="kernel timings: head dim")
    parser.add_argument("--profile-n", default="", help="n at which to profile the kernel variants (after the timings)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    variants = [name for name in args.variants.split(",") if name] or None
    if unknown := set(variants or ()) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    key = jax.random.key(0)
    record = {
        "note": args.note,
        "variants": variants or sorted(VARIANTS),
        "configs": {name: dataclasses.asdict(c) for name, c in CONFIGS.items()},
    }
    record.update(batch=1, dtype="bfloat16", checks=[], kernel_checks=[], timings=[], kernels=[], profiles=[])
    recorder = Recorder(record, args.out, args.budget_s)
    add = recorder.add
    for name, head_dim in [(name, int(h)) for name in CONFIGS for h in args.head_dims.split(",")]:
        for causal in {"no": [False], "also": [False, True], "only": [True], "skip": []}[args.check_causal]:
            add("checks", lambda c=CONFIGS[name], h=head_dim, causal=causal: check_implementations(
                args.check_n, h, c, key, causal), config=name)  # fmt: skip
        add(
            "kernel_checks",
            lambda c=CONFIGS[name], h=head_dim: check_kernels(args.check_n, h, c, key, variants),
            config=name,
        )
    for n in [int(x) for x in args.n.split(",") if x]:
        for name, config in CONFIGS.items():
            add("kernels", lambda n=n, c=config: time_kernels(n, c, key, variants, args.kv_heads, args.kernel_head_dim),
                config=name)  # fmt: skip
            for mode in [m for m in args.modes.split(",") if m]:
                add("timings", lambda n=n, m=mode, c=config: time_end_to_end(n, m, c, key), config=name)
    for n in [int(x) for x in args.profile_n.split(",") if x]:
        for name, config in CONFIGS.items():
            add("profiles", lambda n=n, c=config: profile_kernels(n, c, key, variants or list(VARIANTS)), config=name)
    recorder.finish()


if __name__ == "__main__":
    main()
