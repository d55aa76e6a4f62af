"""The column-mass probe kernels against the jnp probe on a GPU, at the shapes of a real call.

For each length: the non-causal cut (every query over every key) and the causal recursion's levels down to
`min_seq_len` (4096), keys shifted by the default's window (256; every problem keeps real keys, as the library clamps
the window to half the base length), all levels in the kernels' two passes. Inputs are bf16 Gaussians scaled up so
that the mass spans orders of magnitude; the jnp twin (`probe_mass_reference`: `ops.probe_column_mass` per problem)
accumulates in float32 on the same bf16 values and the same probe rows. Non-causal twice: with the kernels' own first
pass, and with the lse from the hash kernel's read of k (the library's non-causal path). Reported per cut: the largest
|kernel - jnp| over the row's largest mass, and the L1 difference of the rows (each sums to 1).

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

from hyperattn_jax.kernels.gpu.hash import lsh_ranks_pallas
from hyperattn_jax.kernels.gpu.probe import probe_mass_pallas, probe_mass_reference
from hyperattn_jax.lsh import lsh_projections

NUM_PROBES, SCALE, WINDOW = 16, 0.125, 256


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
            probe_keys = [jax.random.key(100 + level) for level in range(len(cuts))]
            expected, probes = probe_mass_reference(
                q, k, probe_keys, cuts=cuts, shift=shift, scale=SCALE, num_probes=NUM_PROBES
            )
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
