"""Where the time of one HyperAttention layer goes (pallas_triton path), and kernel block-size variants.

Command:  PYTHONPATH=. python3 experiments/benchmarks/breakdown_single_layer.py
          --out experiments/results/bench_single_layer_breakdown.json
Hardware: one NVIDIA H100 80GB, jax 0.11.2. Runtime: under 3 minutes (measured 230 s together with a two-size
bench_single_layer.py run). Expected result: a table of median milliseconds per
stage (hash+sort plan, gathers into the blocked layout, fused kernel, unsort, causal base case) at n = 131072, H = 64,
B = 1, N = 32, bf16, HyperAttentionConfig.paper(), and the fused kernel's time for a few block/warp variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import median_ms as timed_median_ms  # experiments/ is on the path when run as a script

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.kernels.gpu.flash import FlashConfig, flash_attention
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig, fused_tiled_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

REPS = int(os.environ.get("BREAKDOWN_REPS", "20"))
median_ms = functools.partial(timed_median_ms, reps=REPS)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="experiments/results/bench_single_layer_breakdown.json")
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--skip-cudnn", action="store_true")
    args = parser.parse_args()
    n, h, heads = args.n, args.head_dim, args.heads
    cfg = ha.HyperAttentionConfig.paper()  # the published algorithm (the defaults carry accuracy options)
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (1, n, heads, h), jnp.bfloat16) for kk in jax.random.split(key, 3))
    q5, k4, v4 = ops.group_queries(q, heads), ops.heads_major(k), ops.heads_major(v)
    scale = h**-0.5
    rows = {}

    plan_fn = jax.jit(lambda q5, k4: ops.make_plan(q5, k4, key=key, config=cfg))
    rows["plan (hash + sort + samples)"] = median_ms(plan_fn, q5, k4)

    def layout(q5, k4, v4):
        plan = ops.make_plan(q5, k4, key=key, config=cfg)
        return ops.block_query_layout(q5, plan), ops.hyper_attention_tiles(k4, v4, plan)

    layout_fn = jax.jit(layout)
    rows["plan + gathers into blocked layout (q, k, v, samples)"] = median_ms(layout_fn, q5, k4, v4)
    qb, tiles = layout_fn(q5, k4, v4)

    for tuning in (
        TiledKernelConfig(),
        TiledKernelConfig(block_q=128, block_k=128),
        TiledKernelConfig(block_q=128, block_k=128, num_warps=8),
        TiledKernelConfig(block_q=64, block_k=64),
        TiledKernelConfig(block_q=256, block_k=64, num_warps=8),
        TiledKernelConfig(num_stages=3),
    ):
        name = f"kernel fwd bq={tuning.block_q} bk={tuning.block_k} w={tuning.num_warps} s={tuning.num_stages}"
        fn = jax.jit(lambda qb, tiles, tuning=tuning: fused_tiled_attention(qb, tiles, scale=scale, tuning=tuning))
        rows[name] = median_ms(fn, qb, tiles)
    out, lse = jax.jit(lambda qb, tiles: fused_tiled_attention(qb, tiles, scale=scale))(qb, tiles)

    def unblock(out, lse, q5, k4):
        plan = ops.make_plan(q5, k4, key=key, config=cfg)
        return ops.unblock_query_layout(out, plan, n), ops.unblock_query_layout(lse[..., None], plan, n)[..., 0]

    rows["plan + unsort out, lse"] = median_ms(jax.jit(unblock), out, lse, q5, k4)

    for tuning in (
        TiledKernelConfig(),
        TiledKernelConfig(block_q_bwd=64, block_k_bwd=128),
        TiledKernelConfig(block_q_bwd=32, block_k_bwd=64),
        TiledKernelConfig(num_warps=8),
    ):

        def kernel_vjp(qb, tiles, tuning=tuning):
            (o, lse), vjp = jax.vjp(
                lambda qb, tiles: fused_tiled_attention(qb, tiles, scale=scale, tuning=tuning), qb, tiles
            )
            return vjp((o, jnp.zeros_like(lse)))

        name = f"kernel fwd+bwd qb={tuning.block_q_bwd} kb={tuning.block_k_bwd} w={tuning.num_warps}"
        rows[name] = median_ms(jax.jit(kernel_vjp), qb, tiles)

    full = jax.jit(lambda q, k, v: ha.hyper_attention(q, k, v, key=key, config=cfg, implementation="pallas_triton"))
    rows["full non-causal fwd"] = median_ms(full, q, k, v)
    full_causal = jax.jit(
        lambda q, k, v: ha.hyper_attention(q, k, v, key=key, config=cfg, causal=True, implementation="pallas_triton")
    )
    rows["full causal fwd"] = median_ms(full_causal, q, k, v)
    half = jax.jit(
        lambda q, k, v: ha.hyper_attention(
            q[:, n // 2 :], k[:, : n // 2], v[:, : n // 2], key=key, config=cfg, implementation="pallas_triton"
        )
    )
    rows["one level's lower-left quarter (non-causal n/2)"] = median_ms(half, q, k, v)
    for tuning in (FlashConfig(), FlashConfig(block_q=128, block_k=128, num_warps=8), FlashConfig(num_warps=8)):
        base = jax.jit(
            lambda q5, k4, v4, tuning=tuning: flash_attention(
                q5, k4, v4, scale=scale, causal=True, segment=cfg.min_seq_len, tuning=tuning
            )
        )
        rows[f"causal base case, all segments (flash {tuple(tuning)})"] = median_ms(base, q5, k4, v4)

    def grad_of(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2)))

    rows["full non-causal fwd+bwd"] = median_ms(
        grad_of(lambda q, k, v: (ha.hyper_attention(q, k, v, key=key, config=cfg, implementation="pallas_triton"),)),
        q,
        k,
        v,
    )
    rows["full causal fwd+bwd"] = median_ms(
        grad_of(
            lambda q, k, v: (
                ha.hyper_attention(q, k, v, key=key, config=cfg, causal=True, implementation="pallas_triton"),
            )
        ),
        q,
        k,
        v,
    )
    rows["causal base case fwd+bwd, all segments (flash default)"] = median_ms(
        grad_of(lambda q5, k4, v4: flash_attention(q5, k4, v4, scale=scale, causal=True, segment=cfg.min_seq_len)),
        q5,
        k4,
        v4,
    )
    rows["one level's lower-left quarter fwd+bwd (non-causal n/2)"] = median_ms(
        grad_of(
            lambda q, k, v: (
                ha.hyper_attention(
                    q[:, n // 2 :], k[:, : n // 2], v[:, : n // 2], key=key, config=cfg, implementation="pallas_triton"
                ),
            )
        ),
        q,
        k,
        v,
    )
    if not args.skip_cudnn:
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        rows["cudnn causal fwd (same run)"] = median_ms(cudnn, q, k, v, reps=5)

    record = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "n": n,
        "head_dim": h,
        "num_heads": heads,
        "config": dataclasses.asdict(cfg),
        "median_ms": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(with_run_record(record), f, indent=1)
    for name, ms in rows.items():
        print(f"{ms:9.3f} ms  {name}")


if __name__ == "__main__":
    main()
