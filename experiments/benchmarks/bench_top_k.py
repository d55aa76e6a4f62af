"""Ways to pick the k heaviest of S keys per row (the plan's heavy keys), timed and checked against `lax.top_k`.

Rows are 32 (or 8) kv-head problems of one call at 32k and 131k keys, k = 128: `lax.top_k` (a full sort on a GPU),
the library's two-stage `top_k_index` (chunk maxima first), `lax.approx_max_k`. `overlap` is the fraction of
`lax.top_k`'s picks each method returns.

    python3 experiments/benchmarks/bench_top_k.py --out experiments/results/bench_top_k_h100.json
"""

from __future__ import annotations

import argparse
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
    "approx_max_k": lambda x, k: jax.lax.approx_max_k(x, k)[1],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="32x131072,8x131072,32x32768", help="ROWSxKEYS,...")
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
