"""Speed of the LSH sort order on the GPU: packed int32 keys vs stable (uint8 rank, int32 position) pairs.

Command:  PYTHONPATH=. python3 experiments/benchmarks/sort_probe.py --out $OUT/sort_probe.json
Hardware: one NVIDIA H100 80GB, jax 0.11.2; ~30 s. Result (2026-11-25): the uint8 pair sort is 1.3-1.9x faster than
the packed int32 sort from 4096 to 131072 ranks per row (XLA runs it as a one-byte cub radix sort), which is why
`ops.sorting.sort_order` uses it for up to 256 ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

SHAPES = ((32, 32768), (32, 65536), (32, 131072), (64, 32768), (128, 16384), (256, 8192), (512, 4096), (64, 65536))


def median_ms(fn, x, reps=30):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def packed_int32(rank):
    length = rank.shape[-1]
    position = jax.lax.broadcasted_iota(jnp.int32, rank.shape, rank.ndim - 1)
    return jax.lax.sort(rank.astype(jnp.int32) * length + position, dimension=rank.ndim - 1) % length


def pairs(key_dtype):
    def order(rank):
        position = jax.lax.broadcasted_iota(jnp.int32, rank.shape, rank.ndim - 1)
        keys = (rank.astype(key_dtype), position)
        return jax.lax.sort(keys, dimension=rank.ndim - 1, is_stable=True, num_keys=1)[1]

    return order


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/sort_probe.json")
    args = parser.parse_args()
    variants = {
        "packed_int32": packed_int32,
        "pairs_uint8": pairs(jnp.uint8),
        "pairs_int16": pairs(jnp.int16),
        "pairs_int32": pairs(jnp.int32),
    }
    record = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": "median ms of a stable sort order of random ranks in [0, 128) per row; 'cub' = XLA used cub radix",
        "rows": [],
    }
    for rows, length in SHAPES:
        rank = jax.random.randint(jax.random.key(length + rows), (rows, length), 0, 128, jnp.int32)
        expected = np.argsort(np.asarray(rank), axis=-1, kind="stable")
        row = {"rows": rows, "L": length}
        for name, order in variants.items():
            fn = jax.jit(order)
            text = fn.lower(rank).compile().as_text().lower()
            row[name] = {
                "ms": median_ms(fn, rank),
                "same": bool(np.array_equal(np.asarray(fn(rank)), expected)),
                "cub": "cub" in text or "radix" in text,
            }
        print(row, flush=True)
        record["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(with_run_record(record), f, indent=1)


if __name__ == "__main__":
    main()
