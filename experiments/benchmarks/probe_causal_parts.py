"""Times the parts of the causal forward that have alternatives, alone, before they are wired in (issue 3).

Command:  PYTHONPATH=. python3 experiments/benchmarks/probe_causal_parts.py --out $OUT/probe_causal_parts.json
Hardware: one NVIDIA H200 (the project's lent GPU), jax 0.11.2; ~1 min.
1. The exact base case of a causal call at --n (segments of --segment, B=1, N=32, H=64, bf16): our flash kernel
   (`flash_forward_rows`, float32 and bf16 output) against cuDNN through jax's internal entry point with the lse
   (`cudnn_segment_forward`); checks that both give the same output and natural-log lse before timing.
2. The LSH hash kernel over --n positions with the five levels' hyperplanes, for several rows per step and steps
   (chunks) per program.
Writes JSON (device, jax version, date, every timing and check). Expected result (2026-12-01, H200, n = 131072):
cuDNN ~5.7 ms against ~6.9 ms (bf16 out) / ~7.1 ms (float32 out) for the flash kernel, lse within ~2e-6; the hash
~0.50 ms with 8 chunks of 128 rows per program against ~0.57 ms with one (wall clock, dispatch included).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import median_ms  # experiments/ is on the path when run as a script

from hyperattn_jax.kernels.gpu.cudnn_segments import cudnn_segment_forward
from hyperattn_jax.kernels.gpu.flash import FlashConfig, flash_forward_rows
from hyperattn_jax.kernels.gpu.hash import lsh_ranks_pallas
from hyperattn_jax.lsh import lsh_projections

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

HEADS, HEAD_DIM = 32, 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--segment", type=int, default=4096)
    parser.add_argument("--out", default="experiments/results/probe_causal_parts.json")
    args = parser.parse_args()
    n, segment, scale = args.n, args.segment, HEAD_DIM**-0.5
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, n, HEADS, HEAD_DIM), jnp.bfloat16) for key in keys)
    q_rows = q.reshape(1, n, HEADS, 1, HEAD_DIM)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {"n": n, "segment": segment, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
    }
    tuning = FlashConfig(block_q=128, block_k=64, block_bwd=64)

    def flash(out_dtype):
        return jax.jit(
            lambda q, k, v: flash_forward_rows(
                q, k, v, scale=scale, segment=segment, tuning=tuning, out_dtype=out_dtype, interpret=False
            )
        )

    cudnn = jax.jit(lambda q, k, v: cudnn_segment_forward(q, k, v, scale=scale, segment=segment))
    reference = flash(jnp.float32)(q_rows, k, v)
    got = cudnn(q, k, v)
    if got is None:
        result["cudnn"] = "not available"
    else:
        out_error = jnp.max(jnp.abs(got[0].reshape(reference[0].shape).astype(jnp.float32) - reference[0]))
        result["cudnn_check"] = {
            "max_abs_out_diff": float(out_error),
            "max_abs_lse_diff": float(jnp.max(jnp.abs(got[1].reshape(reference[1].shape) - reference[1]))),
        }
        result["cudnn_ms"] = median_ms(cudnn, q, k, v, reps=30)
    result["flash_f32_ms"] = median_ms(flash(jnp.float32), q_rows, k, v, reps=30)
    result["flash_bf16_ms"] = median_ms(flash(jnp.bfloat16), q_rows, k, v, reps=30)
    print(result, flush=True)

    projection_sets = [lsh_projections(key, HEAD_DIM, 7) for key in jax.random.split(jax.random.key(1), 5)]
    hashes = {}
    for chunks in (1, 2, 4, 8, 16):
        for rows, warps in ((128, 4), (64, 4)):
            name = f"rows{rows}_chunks{chunks}_warps{warps}"
            hash_fn = functools.partial(
                lsh_ranks_pallas, projection_sets=projection_sets, rows=rows, chunks=chunks, num_warps=warps
            )
            try:
                hashes[name] = median_ms(jax.jit(hash_fn), q, reps=30)
            except Exception as error:
                hashes[name] = f"{type(error).__name__}: {str(error)[:200]}"
            print(name, hashes[name], flush=True)
    result["hash_ms"] = hashes
    with open(args.out, "w") as f:
        json.dump(with_run_record(result), f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
