"""The column-mass probe kernels against the jnp probe on a GPU, at the shapes of a real call.

For each length: the non-causal cut (every query over every key) and the causal recursion's levels down to
`min_seq_len` (4096), keys shifted by the default's window (256; every problem keeps real keys, as the library clamps
the window to half the base length), all levels in the kernels' two passes. Inputs are bf16 Gaussians scaled up so
that the mass spans orders of magnitude; the jnp probe (`ops.probe_column_mass`) runs in float32 on the same bf16
values and the same probe rows. Non-causal twice: with the kernels' own first pass, and with the lse from the hash
kernel's read of k (the library's non-causal path). Reported per cut: the largest |kernel - jnp| over the row's
largest mass, and the L1 difference of the rows (each sums to 1).

    python3 experiments/benchmarks/check_probe_kernels.py --out experiments/results/probe_kernels_check_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

from hyperattn_jax import ops
from hyperattn_jax.kernels.gpu.hash import lsh_ranks_pallas
from hyperattn_jax.kernels.gpu.probe import probe_mass_pallas, probe_queries
from hyperattn_jax.lsh import lsh_projections

NUM_PROBES, SCALE, WINDOW = 16, 0.125, 256


def expected_mass(q, k, cut, shift, probe_key, kv):
    """The jnp probe over the cut's problems `[B, C, K, keys]` and the probe rows it used."""
    b, t = q.shape[:2]
    span, keys = cut
    chunks = t // span
    shifted = jnp.roll(k, shift, axis=1)
    q_problems = jnp.concatenate([q[:, c * span : (c + 1) * span][:, span - keys :] for c in range(chunks)])
    k_problems = jnp.concatenate([shifted[:, c * span : c * span + keys] for c in range(chunks)])
    first = jnp.where(jnp.arange(chunks * b) < b, shift, 0)  # the first chunk's keys before position 0
    key_valid = (jnp.arange(keys) >= first[:, None])[:, None]
    grouped_q, grouped_k = ops.group_queries(q_problems, kv), ops.heads_major(k_problems)
    mass = ops.probe_column_mass(
        grouped_q.astype(jnp.float32), grouped_k.astype(jnp.float32), key=probe_key, num_probes=NUM_PROBES,
        scale=SCALE, key_valid=key_valid,
    )  # fmt: skip
    index = ops.probe_index(probe_key, grouped_q.shape[2] * grouped_q.shape[3], NUM_PROBES)
    return mass.reshape(chunks, b, kv, keys).swapaxes(0, 1), index


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--base", type=int, default=4096, help="min_seq_len: the causal levels stop above it")
    args = parser.parse_args()
    interpret = jax.default_backend() != "gpu"
    results = {}
    for t in args.n:
        shape = (1, t, args.heads, 64)
        q, k = (3 * jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(2))
        q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
        levels = max((t // args.base).bit_length() - 1, 1)
        for mode, cuts, shift in (
            ("noncausal", [(t, t)], 0),
            ("noncausal_hash_lse", [(t, t)], 0),  # the library's non-causal path: the lse from the hash kernel
            ("causal", [(t >> level, t >> (level + 1)) for level in range(levels)], WINDOW),
        ):
            probes, expected = [], []
            for level, cut in enumerate(cuts):
                mass, index = expected_mass(q, k, cut, shift, jax.random.key(100 + level), args.heads)
                expected.append(mass)
                probes.append(probe_queries(q, index, num_kv_heads=args.heads, chunks=t // cut[0], halves=cut[1] < t))
            lse = None
            if mode == "noncausal_hash_lse":
                projections = [lsh_projections(jax.random.key(7), 64, 7)]
                _, lse = lsh_ranks_pallas(k, projections, interpret=interpret, probes=probes[0][:, 0], scale=SCALE)
                lse = lse[:, None]
            got = probe_mass_pallas(probes, k, cuts=cuts, shift=shift, scale=SCALE, interpret=interpret, lse=lse)
            for level, (mass, want) in enumerate(zip(got, expected, strict=True)):
                mass, want = np.asarray(mass, np.float64), np.asarray(want, np.float64)
                row_max = want.max(-1, keepdims=True)
                smallest = np.where(want > 0, want, np.inf).min(-1, keepdims=True)
                results[f"{t}/{mode}/cut{level}"] = {
                    "max_diff_over_row_max": float(np.max(np.abs(mass - want) / row_max)),
                    "row_l1": float(np.max(np.sum(np.abs(mass - want), -1))),
                    "mass_spread": float(np.max(row_max / smallest)),  # largest over smallest positive mass
                }
                print(t, mode, level, results[f"{t}/{mode}/cut{level}"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_run_record({"results": results}), indent=1))


if __name__ == "__main__":
    main()
