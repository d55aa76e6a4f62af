"""Device check of the Mosaic GPU tile-attention forward: accuracy against the Triton and xla paths, then timings.

Command:  PYTHONPATH=. python3 experiments/benchmarks/check_mosaic_gpu.py --out $OUT/mosaic_check.json
Hardware: one H100 80GB or H200 (Hopper: the kernel uses wgmma and TMA), jax 0.11.2 or newer. Runtime: ~2.5 min
(compilation included; one device call). Recorded: experiments/results/mosaic_check_h100.json (H100, 2026-12-06): (a)
held; (b) the kernel alone 5-14% faster than Triton's, the path 42-47% slower end to end. The prediction, written
before the first run: (a) the Mosaic forward agrees with the Triton and xla paths for the same key to ~3e-3 relative
(bf16; the same plan, the same estimator), at H 64 and 128 with GQA, and every kernel variant (P in registers: the
GPU's; P in shared memory: the one jax's interpreter tests on CPU; one or two compute warpgroups) agrees with the
float32 twin; (b) on the same pre-gathered inputs the Mosaic kernel is faster than the Triton tiled kernel (wgmma and
TMA against Triton's mma), two compute warpgroups faster than one (half the k/v copies per query), but the end-to-end
non-causal forward is not yet faster than `pallas_triton`'s, which gathers rows inside its kernel: the Mosaic path
pays XLA's sorted copies of q, k, v and of the output (~1.5 ms of 6.5 ms at 131k on the H100).

(a) `--check-n` tokens, B=1, N=8 query heads over K=2 kv heads (GQA), H 64 and 128, bf16, paper config, one key:
  relative difference of out and lse between `pallas_mosaic_gpu`, `pallas_triton` and `xla` (forward), and of dq, dk,
  dv between `pallas_mosaic_gpu` and `xla` (its backward is the Triton path's, with the Mosaic forward's out and lse);
  and, on the blocked inputs of that plan, every kernel variant (block_k 64/128, P in registers or in shared memory)
  against `ops.tiled_attention` in float32.
(b) n = 32768 and 131072, B=1, N=K=32, H=64, bf16, paper config: non-causal forward (and forward+backward) of
  cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`, exact), `pallas_triton` and `pallas_mosaic_gpu`;
  and the tile-attention kernels alone on the same sorted copies: the Mosaic kernel against the Triton tiled kernel
  (`fused_tiled_attention`), with their FLOP rates (4 B N T keys-per-query H). Median of many blocking calls after
  warm-up (`timing.call_times_ms`), all in this one process: compare ratios, not milliseconds across runs.
Last, as its own phase: the two-compute-warpgroup variant, checked against the twin and timed alone.
Guard: wherever a Mosaic GPU call fails (e.g. a lowering this jax version rejects), the error is recorded and the
rest still runs and is timed; no timing starts after --budget-s seconds (the rows left are marked skipped).
Writes JSON with the run record (commit, command, date, device, jax version).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import call_times_ms  # experiments/benchmarks/ is on the path when run as a script

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.kernels.configs import TiledKernelConfig
from hyperattn_jax.kernels.gpu.tiled_attention import fused_tiled_attention
from hyperattn_jax.kernels.mosaic_gpu.tiled_attention import MosaicTiling, tiled_attention_mosaic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

IMPLEMENTATIONS = ("xla", "pallas_triton", "pallas_mosaic_gpu")
VARIANTS = {  # name -> MosaicTiling of the kernel variants checked against the twin
    "k128_registers": MosaicTiling(block_k=128, p_in_registers=True),
    "k64_registers": MosaicTiling(block_k=64, p_in_registers=True),
    "k128_smem": MosaicTiling(block_k=128, p_in_registers=False),
}
# Two compute warpgroups sharing each k/v chunk: checked and timed last, as its own phase (jax's interpreter hung on
# it on a 2-core CPU, so it is the least certain variant; the JSON is saved before it starts).
TWO_WARPGROUPS = {"k128_registers_2wg": MosaicTiling(block_k=128, compute_warpgroups=2)}


def _error(error: Exception) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip()[-1500:]


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.linalg.norm((a - b)[finite]) / max(np.linalg.norm(b[finite]), 1e-30))


def _inputs(n, heads, kv_heads, head_dim, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (1, n, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, n, kv_heads, head_dim), jnp.bfloat16) for kk in keys[1:3])
    g = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    return q, k, v, g


def _functions(implementation, config, key, causal: bool = False):
    def forward(q, k, v):
        if implementation == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"), None
        return ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, return_lse=True,
                                  implementation=implementation)  # fmt: skip

    def loss(q, k, v, cotangent):
        return jnp.sum(forward(q, k, v)[0].astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _blocked(q, k, v, config, key):
    """The plan's sorted query blocks and key tiles (grouped layout), as the Mosaic backend feeds its kernel."""
    kv = k.shape[2]
    q5, k4, v4 = ops.group_queries(q, kv), ops.heads_major(k), ops.heads_major(v)
    plan = ops.make_plan(q5, k4, key=key, config=config, v=v4)
    return ops.block_query_layout(q5, plan), ops.hyper_attention_tiles(k4, v4, plan)


def check(n, head_dim, config, key) -> dict:
    """(a) at one head dim: the implementations against each other, the kernel variants against the twin."""
    return {**check_implementations(n, head_dim, config, key), **check_variants(n, head_dim, config, key, VARIANTS)}


def check_implementations(n, head_dim, config, key, causal: bool = False) -> dict:
    """The three implementations for the same key: out and lse, and dq, dk, dv against xla."""
    q, k, v, g = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    row = {"n": n, "heads": 8, "kv_heads": 2, "head_dim": head_dim, "causal": causal}
    outs, grads = {}, {}
    for name in IMPLEMENTATIONS:
        try:
            forward, fwd_bwd = _functions(name, config, key, causal)
            outs[name] = jax.block_until_ready(forward(q, k, v))
            if name != "pallas_triton":  # its backward is the one pallas_mosaic_gpu runs (checked against xla there)
                grads[name] = jax.block_until_ready(fwd_bwd(q, k, v, g)[1])
        except Exception as error:  # a lowering this jax rejects: record it, go on
            row[f"{name}_error"] = _error(error)
    for a, b in (("pallas_mosaic_gpu", "xla"), ("pallas_mosaic_gpu", "pallas_triton"), ("pallas_triton", "xla")):
        if a in outs and b in outs:
            row[f"{a}_vs_{b}"] = {"out": _relative(outs[a][0], outs[b][0]), "lse": _relative(outs[a][1], outs[b][1])}
        if a in grads and b in grads and b == "xla":
            row[f"{a}_vs_{b}"].update({f"d{x}": _relative(grads[a][i], grads[b][i]) for i, x in enumerate("qkv")})
    return row


def check_variants(n, head_dim, config, key, variants) -> dict:
    """Kernel variants on the plan's blocked inputs against `ops.tiled_attention` in float32."""
    q, k, v, _ = _inputs(n, 8, 2, head_dim, seed=n + head_dim)
    row = {"n": n, "heads": 8, "kv_heads": 2, "head_dim": head_dim}
    q_blocks, tiles = jax.jit(_blocked, static_argnames="config")(q, k, v, config, key)
    scale = head_dim**-0.5
    f32 = [ops.KeyTile(t.k.astype(jnp.float32), t.v.astype(jnp.float32), t.log_weight) for t in tiles]
    twin_out, twin_lse = jax.jit(ops.tiled_attention, static_argnames="scale")(
        q_blocks.astype(jnp.float32), f32, scale=scale
    )
    for variant, tiling in variants.items():
        try:
            out, lse = jax.jit(
                lambda qb, ts, tiling=tiling: tiled_attention_mosaic(qb, ts, scale=scale, tiling=tiling)
            )(q_blocks, tiles)
            row[f"kernel_{variant}_vs_twin"] = {"out": _relative(out, twin_out), "lse": _relative(lse, twin_lse)}
        except Exception as error:
            row[f"kernel_{variant}_error"] = _error(error)
    return row


def _time(fn, *args) -> dict:
    try:
        times = call_times_ms(fn, *args, reps=30, budget_s=1.0, min_reps=5)
        return {"ms": statistics.median(times), "reps": len(times)}
    except Exception as error:
        return {"error": _error(error)}


def time_end_to_end(n, mode, config, key) -> dict:
    """(b) one mode at n ("noncausal_fwd", "causal_fwdbwd", ...): cuDNN, pallas_triton, pallas_mosaic_gpu."""
    q, k, v, g = _inputs(n, 32, 32, 64, seed=n)
    backward, causal = mode.endswith("fwdbwd"), mode.startswith("causal")
    row = {"n": n, "heads": 32, "kv_heads": 32, "head_dim": 64, "mode": mode}
    outs = {}
    for name in ("cudnn", "pallas_triton", "pallas_mosaic_gpu"):
        forward, fwd_bwd = _functions(name, config, key, causal)
        row[name] = _time(fwd_bwd, q, k, v, g) if backward else _time(forward, q, k, v)
        if not backward and "ms" in row[name] and name != "cudnn":
            outs[name] = forward(q, k, v)[0]
    if len(outs) == 2:
        row["out_mosaic_vs_triton"] = _relative(outs["pallas_mosaic_gpu"], outs["pallas_triton"])
    for name in ("pallas_triton", "pallas_mosaic_gpu"):
        if "ms" in row["cudnn"] and "ms" in row[name]:
            row[f"ratio_cudnn_over_{name}"] = row["cudnn"]["ms"] / row[name]["ms"]
    return row


def time_kernels(n, config, key, variants=VARIANTS, triton: bool = True) -> dict:
    """(b) the tile-attention kernels alone on the same sorted copies, with FLOP rates."""
    q, k, v, _ = _inputs(n, 32, 32, 64, seed=n)
    q_blocks, tiles = jax.jit(_blocked, static_argnames="config")(q, k, v, config, key)
    scale = 64**-0.5
    keys_per_query = sum(t.k.shape[3] for t in tiles)
    flops = 4 * q_blocks.shape[0] * 32 * n * keys_per_query * 64
    row = {"n": n, "keys_per_query": keys_per_query, "flops": flops}
    kernels = {
        **({"triton_tiled": lambda qb, ts: fused_tiled_attention(qb, ts, scale=scale, tuning=TiledKernelConfig())}
           if triton else {}),
        **{f"mosaic_{v}": (lambda qb, ts, t=t: tiled_attention_mosaic(qb, ts, scale=scale, tiling=t))
           for v, t in variants.items()},
    }  # fmt: skip
    return {**row, **time_kernels_on(kernels, (q_blocks, tiles), flops, baseline="triton_tiled")}


def time_kernels_on(kernels: dict, args, flops: int, baseline: str) -> dict:
    """Each kernel's median time on the same args with its FLOP rate, and every "mosaic_*" kernel's speed-up over
    `baseline` (where both ran)."""
    row = {}
    for name, kernel in kernels.items():
        row[name] = _time(jax.jit(kernel), *args)
        if "ms" in row[name]:
            row[name]["tflops"] = flops / row[name]["ms"] / 1e9
    for name in [name for name in row if name.startswith("mosaic_")]:
        if "ms" in row.get(baseline, {}) and "ms" in row[name]:
            row[f"speedup_{name}_over_triton"] = row[baseline]["ms"] / row[name]["ms"]
    return row


class Recorder:
    """A device script's JSON `record`, written to `out` with its run record after every row. `add(kind, run,
    **where)` appends a row to record[kind]: `where` with run()'s dict, or with its error, or marked skipped once
    `budget_s` seconds have passed since the recorder was made (a device call has a time limit: the JSON so far
    stays)."""

    def __init__(self, record: dict, out: str, budget_s: float):
        self.record, self.out, self.budget_s, self.start = record, out, budget_s, time.monotonic()

    def save(self):
        os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(with_run_record(self.record), f, indent=1)

    def add(self, kind: str, run, **where):
        if time.monotonic() - self.start > self.budget_s:
            row = {**where, "skipped": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            try:
                row = {**where, **run()}
            except Exception as error:
                row = {**where, "error": _error(error)}
        self.record.setdefault(kind, []).append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def finish(self):
        self.record["elapsed_s"] = time.monotonic() - self.start
        self.save()
        print("wrote", self.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/mosaic_check.json")
    parser.add_argument("--check-n", type=int, default=8192)
    parser.add_argument("--n", default="32768,131072")
    parser.add_argument("--modes", default="noncausal_fwd,noncausal_fwdbwd")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no timing after this many seconds")
    args = parser.parse_args()
    config = ha.HyperAttentionConfig.paper()
    key = jax.random.key(0)
    record = {"config": {"batch": 1, "dtype": "bfloat16", **dataclasses.asdict(config)}, "checks": [], "timings": [],
              "kernels": [], "two_warpgroups": []}  # fmt: skip
    recorder = Recorder(record, args.out, args.budget_s)
    for head_dim in (64, 128):
        recorder.add("checks", functools.partial(check, args.check_n, head_dim, config, key))
    for n in [int(x) for x in args.n.split(",") if x]:
        recorder.add("kernels", lambda n=n: time_kernels(n, config, key), n=n)
        for mode in args.modes.split(","):
            recorder.add("timings", lambda n=n, mode=mode: time_end_to_end(n, mode, config, key), n=n, mode=mode)
    for h in (64, 128):
        recorder.add("two_warpgroups", functools.partial(check_variants, args.check_n, h, config, key, TWO_WARPGROUPS))
    for n in [int(x) for x in args.n.split(",") if x]:
        run = functools.partial(time_kernels, n, config, key, TWO_WARPGROUPS, triton=False)
        recorder.add("two_warpgroups", run, n=n)
    recorder.finish()


if __name__ == "__main__":
    main()
