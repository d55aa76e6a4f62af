"""Where the time goes in one HyperAttention layer on the GPU: a per-kernel profile and a sweep of kernel tunings.

Command:  PYTHONPATH=. python3 experiments/benchmarks/profile_single_layer.py --out $OUT/profile_single_layer.json
          [--config paper|default|accurate] [--replace block_size=128,num_heavy_keys=128] [--modes causal_fwd,...]
          [--top 0] [--hlo-dir $OUT/hlo]
Hardware: one NVIDIA H100 80GB (the project's lent GPU), jax 0.11.2. Runtime: ~70 s with --skip-sweep, ~110 s for
the sweep alone (measured, compilation included). Expected result (2026-11-25 06:48 UTC, n = 131072): GPU kernel time
4.3 ms non-causal fwd, 15.7 ms fwd+bwd, 19.3 ms causal fwd (6.6 of it the exact base case), 71.0 ms causal fwd+bwd;
the table per kernel is in experiments/results/NOTES.md.

1. Profile: each mode (non-causal / causal, fwd / fwd+bwd) at --n runs under `jax.profiler.trace` with a Perfetto
   trace; the GPU kernels' durations are summed by kernel name and divided by the traced runs (top kernels kept).
2. Sweep: the two kernels the causal layer spends most in, timed alone at --n with several tunings: the HyperAttention
   estimate (`hyper_attention_pallas`, fwd and fwd+bwd, `TiledKernelConfig`) and the exact base case (one
   segment-causal flash call over --n positions in segments of min_seq_len, `FlashConfig`).
B=1, N=32 (K=32, or --kv-heads for grouped-query attention), H=64 (or --head-dim), bf16, HyperAttentionConfig.paper()
(or --config). Writes JSON (device, jax version, date, every timing).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import median_ms  # experiments/ is on the path when run as a script

import hyperattn_jax as ha
from hyperattn_jax.kernels.gpu.flash import FlashConfig, flash_attention
from hyperattn_jax.kernels.gpu.hyper import hyper_attention_pallas
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

HEADS = 32


def with_grad(forward):
    """fwd+bwd of sum(out * cotangent) for a function returning out (or (out, lse))."""

    def loss(q, k, v, cotangent):
        out = forward(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_variant(row, forward, inputs, cotangent):
    """row with the median fwd and fwd+bwd milliseconds of `forward` (or the error that stopped them), printed."""
    for mode, fn, fn_args in (("fwd", jax.jit(forward), inputs), ("fwdbwd", with_grad(forward), (*inputs, cotangent))):
        try:
            row[mode] = median_ms(fn, *fn_args)
        except Exception as error:
            row[mode] = f"{type(error).__name__}: {str(error)[:200]}"
    print(row, flush=True)
    return row


def gpu_kernel_times(fn, args, runs=3, top=40):
    """Mean GPU time per run of every kernel name, from a Perfetto trace of `runs` runs (ms, largest first)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    total, launches = collections.Counter(), 0
    for event in events:
        if event.get("ph") == "X" and event.get("pid") in gpu:
            total[event["name"]] += event.get("dur", 0) / 1e3 / runs
            launches += 1
    return {"sum_ms": sum(total.values()), "launches": launches / runs, "kernels": dict(total.most_common(top or None))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/profile_single_layer.json")
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--config", choices=["paper", "default", "accurate"], default="paper", help="a preset")
    parser.add_argument("--replace", default="", help="config fields changed, e.g. block_size=128,local_window=128")
    parser.add_argument("--modes", default="noncausal_fwd,noncausal_fwdbwd,causal_fwd,causal_fwdbwd")
    parser.add_argument("--top", type=int, default=40, help="kernels kept per mode, largest first (0: all)")
    parser.add_argument("--kv-heads", type=int, default=HEADS, help="below 32: grouped-query attention")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--hlo-dir",
        help="also write each mode's optimized HLO there (MODE.hlo.txt.gz): XLA names "
        "its kernels after the fusions, whose metadata give the source lines",
    )
    args = parser.parse_args()
    n = args.n
    presets = {"paper": ha.HyperAttentionConfig.paper, "default": ha.HyperAttentionConfig,
               "accurate": ha.HyperAttentionConfig.accurate}  # fmt: skip
    changes = dict(item.split("=") for item in args.replace.split(",") if item)
    config = presets[args.config]().replace(**{field: int(value) for field, value in changes.items()})
    key = jax.random.key(0)
    keys = jax.random.split(jax.random.key(n), 4)
    q_shape, kv_shape = (1, n, HEADS, args.head_dim), (1, n, args.kv_heads, args.head_dim)
    q, k, v, g = (
        jax.random.normal(kk, shape, jnp.bfloat16) for kk, shape in zip(keys, (q_shape, kv_shape, kv_shape, q_shape))
    )
    g = g.astype(jnp.float32)
    record = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "n": n,
        "config": {
            "batch": 1,
            "num_heads": HEADS,
            "num_kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": "bfloat16",
            "name": args.config,
            "replace": changes,
        },
        "profile": {},
        "sweep": [],
    }

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(with_run_record(record), f, indent=1)

    for causal in (False, True):
        forward = jax.jit(
            lambda q, k, v, causal=causal: ha.hyper_attention(q, k, v, key=key, config=config, causal=causal)
        )
        for mode, fn, fn_args in (("fwd", forward, (q, k, v)), ("fwdbwd", with_grad(forward), (q, k, v, g))):
            name = f"{'causal' if causal else 'noncausal'}_{mode}"
            if name not in args.modes.split(","):
                continue
            try:
                wall = median_ms(fn, *fn_args)
                record["profile"][name] = {"wall_ms": wall, **gpu_kernel_times(fn, fn_args, top=args.top)}
                if args.hlo_dir:
                    os.makedirs(args.hlo_dir, exist_ok=True)
                    with gzip.open(os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
                        f.write(fn.lower(*fn_args).compile().as_text())
            except Exception as error:
                record["profile"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            entry = record["profile"][name]
            print(name, {key_: round(value, 3) for key_, value in entry.get("kernels", {}).items()}, flush=True)
            print(
                f"{name}: wall {entry.get('wall_ms', float('nan')):.3f} ms, kernels {entry.get('sum_ms', 0):.3f} ms,"
                f" {entry.get('launches', 0):.0f} launches"
            )
            save()
    if args.skip_sweep:
        return

    # Grouped layout for the kernels called directly: q [B, K, G, T, H], k, v [B, K, T, H].
    groups = HEADS // args.kv_heads
    q5, g5 = (x.reshape(1, n, args.kv_heads, groups, args.head_dim).transpose(0, 2, 3, 1, 4) for x in (q, g))
    k4, v4 = (jnp.moveaxis(x, 1, 2) for x in (k, v))
    scale = args.head_dim**-0.5
    tiled_variants = [  # the forward's block_q / block_k were settled in the 06:31 sweep; these vary the backward
        TiledKernelConfig(),
        TiledKernelConfig(num_warps=8),  # at H 128 the dk/dv accumulators alone take 128 registers with 4 warps
        TiledKernelConfig(num_stages_bwd=2),
        TiledKernelConfig(block_k_bwd=128),
        TiledKernelConfig(block_k_bwd=128, num_warps=8),
        TiledKernelConfig(block_q_bwd=32),
        TiledKernelConfig(block_q_bwd=32, block_k_bwd=128),
        TiledKernelConfig(block_q_bwd=128, block_k_bwd=128, num_warps=8),
        TiledKernelConfig(num_stages=3),
        TiledKernelConfig(block_k=128, num_warps=8),
    ]
    for tuning in tiled_variants:

        def estimate(q, k, v, tuning=tuning):
            return hyper_attention_pallas(q, k, v, key=key, config=config, scale=scale, tuning=tuning)

        row = {"kernel": "estimate", "tuning": dataclasses.asdict(tuning)}
        record["sweep"].append(time_variant(row, estimate, (q, k, v), g))
        save()
    segment = config.min_seq_len
    flash_variants = [
        FlashConfig(),
        FlashConfig(block_q=64, block_k=64),
        FlashConfig(num_stages=3),
        FlashConfig(block_q=128, block_k=64, num_warps=8),
        FlashConfig(block_q=128, block_k=128, num_warps=8),
        FlashConfig(block_q=128, block_k=32),
        FlashConfig(block_bwd=32),
        FlashConfig(block_bwd=128, num_warps=8),
    ]
    for tuning in flash_variants:

        def base(q, k, v, tuning=tuning):
            return flash_attention(q, k, v, scale=scale, causal=True, segment=segment, tuning=tuning)

        row = {"kernel": "causal_base", "segment": segment, "tuning": dataclasses.asdict(tuning)}
        record["sweep"].append(time_variant(row, base, (q5, k4, v4), g5))
        save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
