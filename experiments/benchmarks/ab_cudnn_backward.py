"""The causal base case's backward on cuDNN against our Triton flash backward, in one process (issue 18).

Command:  PYTHONPATH=. python3 experiments/benchmarks/ab_cudnn_backward.py --out experiments/results/ab.json
Hardware: one H100 or H200, jax 0.11.2. Runtime: ~2 minutes (compilation included).
Expected: the same gradients within bf16 round-off (~1e-2 relative, both differ from xla by ~3e-3) and the cuDNN
backward no slower.

For each shape (B=1, bf16, `HyperAttentionConfig.paper()`, causal, pallas_triton): forward+backward (value and
grad of sum(out * g)) with `cudnn_segment_backward` as the library has it ("cudnn") and replaced by a function
returning None, which is the library's own fallback to the Triton flash backward ("triton"); timed alternately,
three rounds of `call_times_ms` each, the median of every round recorded; and the two gradients compared (a
difference of exactly 0 would mean both variants ran the same code).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import call_times_ms

import hyperattn_jax as ha
from hyperattn_jax.kernels.gpu import causal as fused_causal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

SHAPES = ((131072, 32, 32, 64), (8192, 32, 8, 128), (8192, 32, 32, 64))  # (n, heads, kv heads, head dim)


def fwd_bwd(config):
    def loss(q, k, v, g):
        out = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=config, causal=True,
                                 implementation="pallas_triton")  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = ha.HyperAttentionConfig.paper()
    with_cudnn = fused_causal.cudnn_segment_backward
    record = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__, "rows": []}
    for n, heads, kv_heads, h in SHAPES:
        keys = jax.random.split(jax.random.key(n + h), 4)
        q, g = (jax.random.normal(kk, (1, n, heads, h), jnp.bfloat16) for kk in keys[:2])
        k, v = (jax.random.normal(kk, (1, n, kv_heads, h), jnp.bfloat16) for kk in keys[2:])
        fns, grads, rounds = {}, {}, {"cudnn": [], "triton": []}
        for name, backward in (("cudnn", with_cudnn), ("triton", lambda *a, **kw: None)):
            fused_causal.cudnn_segment_backward = backward  # read when the backward is traced (compiled here)
            jax.clear_caches()  # the library's jitted backend must trace again, not reuse the other variant
            fns[name] = fwd_bwd(config)
            grads[name] = jax.block_until_ready(fns[name](q, k, v, g)[1])
        fused_causal.cudnn_segment_backward = with_cudnn
        for _ in range(3):
            for name, fn in fns.items():
                rounds[name].append(statistics.median(call_times_ms(fn, q, k, v, g, reps=30, budget_s=1.0)))
        difference = {
            name: float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                        / np.linalg.norm(np.asarray(b, np.float32)))
            for name, a, b in zip(("dq", "dk", "dv"), grads["cudnn"], grads["triton"], strict=True)
        }  # fmt: skip
        row = {"n": n, "heads": heads, "kv_heads": kv_heads, "head_dim": h, "ms_rounds": rounds,
               "cudnn_over_triton": statistics.median(rounds["cudnn"]) / statistics.median(rounds["triton"]),
               "grad_difference": difference}  # fmt: skip
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(with_run_record(record), indent=1))


if __name__ == "__main__":
    main()
