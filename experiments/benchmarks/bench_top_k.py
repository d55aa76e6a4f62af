"""Ways to pick the k heaviest of S keys per row (the plan's heavy keys), timed and checked against `lax.top_k`.

Rows are the kv-head problems of one call, k = 128; the default shapes are those of a 131k-token call with 32 kv
heads: non-causal (32 x 131072) and the causal recursion's five levels (2**l problems of 65536 / 2**l keys per kv
head). Methods: `lax.top_k` (a full sort on a GPU), the library's two-stage `top_k_index` with its own chunk rule
(`ops.plan.top_k_chunk`) and with fixed chunks, `lax.approx_max_k`. `overlap` is the fraction of `lax.top_k`'s picks
each method returns; `same_order` whether the indices come in the same order.

    python3 experiments/benchmarks/bench_top_k.py --out experiments/results/bench_top_k_levels_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record
from timing import median_ms

from hyperattn_jax.ops import top_k_index

METHODS = {
    "lax.top_k": lambda x, k: jax.lax.top_k(x, k)[1],
    "top_k_index": top_k_index,
    **{f"chunk{c}": functools.partial(lambda x, k, c: top_k_index(x, k, chunk=c), c=c) for c in (8, 16, 32, 64)},
    "approx_max_k": lambda x, k: jax.lax.approx_max_k(x, k)[1],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    shapes = "32x131072,32x65536,64x32768,128x16384,256x8192,512x4096"
    parser.add_argument("--shapes", default=shapes, help="ROWSxKEYS,...")
    parser.add_argument("--k", type=int, default=128)
    args = parser.parse_args()
    results = {}
    for shape in args.shapes.split(","):
        rows, s = map(int, shape.split("x"))
        # Column masses are heavy-tailed: a power of uniforms; the first 128 keys excluded (-inf) like sinks.
        x = jax.random.uniform(jax.random.key(0), (rows, s)) ** 8
        x = x.at[:, :128].set(-np.inf)
        reference = np.asarray(METHODS["lax.top_k"](x, args.k))
        for name, method in METHODS.items():
            fn = jax.jit(method, static_argnums=1)
            if name.startswith("chunk") and s < 4 * args.k * int(name.removeprefix("chunk")):
                continue  # that chunk would run one full top-k: the lax.top_k row
            picks = np.asarray(fn(x, args.k))
            overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(picks, reference)])
            ms = median_ms(fn, x, args.k) if jax.default_backend() == "gpu" else None
            same_order = bool((picks == reference).all())
            results[f"{shape}/{name}"] = {"ms": ms, "overlap": float(overlap), "same_order": same_order}
            print(shape, name, ms, overlap, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_run_record({"k": args.k, "results": results}), indent=1))


if __name__ == "__main__":
    main()
