"""GPU speed of the default config (and other accuracy variants) vs the paper config, cuDNN timed in the same run.

Command:  python3 experiments/benchmarks/accuracy_speed.py --n 32768 131072 [--implementation pallas_triton]
Hardware: one NVIDIA H100 (the project's lent GPU), jax 0.11.2. Runtime: ~3-4 minutes (compilation included).
Expected: the default config (column-mass systematic sampling, 16 probe queries) within ~15% of the paper config's
          time (block 256, 256 uniform samples), forward and forward+backward, causal and non-causal.
Writes experiments/results/accuracy_speed.json (device, jax version, date, configs, all timings, ratios).

B=1, N=32 query heads, K=32, H=64, bf16 (the paper's benchmark shape). Two timings per call, both medians after two
warm-up calls: "latency" (each call ended by block_until_ready: includes the host's dispatch and synchronisation, the
same for every config, which makes ~1 ms calls noisy) and "pipelined" (10 calls dispatched back to back, then one
block_until_ready, divided by 10: the device time per call, as in a training loop). cuDNN exact attention is the
same-run baseline.
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

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))  # accuracy_qkv's configs
from accuracy_qkv import COLUMN_MASS, COLUMN_MASS_P16, DEFAULT_CANDIDATE
from bench_single_layer import check_against_xla
from timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

RESULTS = Path(__file__).resolve().parents[1] / "results"
BASELINE = "cudnn" if jax.default_backend() == "gpu" else None  # the "cudnn" rows are XLA attention off GPU


def pipelined_ms(fn, *args, calls: int = 10, reps: int = 7) -> float:
    """Median over `reps` of the time per call of `calls` calls dispatched back to back (device time per call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append(1e3 * (time.perf_counter() - t0) / calls)
    return statistics.median(times)


def timings(fn, *args) -> dict[str, float]:
    return {"latency": median_ms(fn, *args, reps=30, budget_s=1.0), "pipelined": pipelined_ms(fn, *args)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--implementation", default="pallas_triton")
    parser.add_argument("--output", default="accuracy_speed")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--bwd-max-n", type=int, default=32768, help="time forward+backward up to this n")
    parser.add_argument("--configs", nargs="+", default=["paper", "default"])
    parser.add_argument("--check-n", type=int, default=8192, help="pallas vs xla (same key) at this n; 0: skip")
    args = parser.parse_args()
    configs = {
        "paper": ha.HyperAttentionConfig.paper(),
        "default": ha.HyperAttentionConfig(),
        "accurate": DEFAULT_CANDIDATE,
        # The cheaper variant of accuracy_qkv.json ("b256+sinks32+heavy96+u0.2"): paper-sized blocks, no window.
        "accurate_b256": DEFAULT_CANDIDATE.replace(block_size=256, sample_size=128, local_window=0),
        "column_mass": COLUMN_MASS,
        "column_mass_p16": COLUMN_MASS_P16,
    }
    configs = {name: config for name, config in configs.items() if name in args.configs}
    results = {
        "experiment": "accuracy_speed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "implementation": args.implementation,
        "shape": "B=1, N=K=32, H=64, bf16",
        "configs": {n: {f: getattr(c, f) for f in c.__dataclass_fields__} for n, c in configs.items()},
        "timings_ms": {},
        "checks": {},
    }
    for name, config in configs.items():  # correctness on the device before any timing
        for causal in (False, True) if args.check_n else ():
            check = check_against_xla(args.check_n, 64, causal, config, jax.random.key(0), args.implementation)
            results["checks"][f"{name}/{args.check_n}/{'causal' if causal else 'noncausal'}"] = check
            print("pallas vs xla", name, args.check_n, "causal" if causal else "noncausal", check, flush=True)
    for n in args.n:
        shape = (1, n, 32, 64)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        for causal in (False, True):
            mode = "causal" if causal else "noncausal"
            entry = results["timings_ms"].setdefault(f"{n}/{mode}", {})

            def cudnn(q, k, v, causal=causal):
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=BASELINE)

            cudnn_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cudnn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
            kinds = ("fwd", "fwd+bwd") if n <= args.bwd_max_n else ("fwd",)
            for timing, ms in timings(jax.jit(cudnn), q, k, v).items():
                entry[f"cudnn/fwd/{timing}"] = ms
            if "fwd+bwd" in kinds:
                for timing, ms in timings(cudnn_grad, q, k, v).items():
                    entry[f"cudnn/fwd+bwd/{timing}"] = ms
            for name, config in configs.items():

                def hyper(q, k, v, config=config, causal=causal):
                    return ha.hyper_attention(
                        q, k, v, key=jax.random.key(0), config=config, causal=causal,
                        implementation=args.implementation,
                    )  # fmt: skip

                grad = jax.jit(jax.grad(lambda q, k, v, f=hyper: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))
                for kind, fn in (("fwd", jax.jit(hyper)), ("fwd+bwd", grad)):
                    if kind in kinds:
                        for timing, ms in timings(fn, q, k, v).items():
                            entry[f"{name}/{kind}/{timing}"] = ms
            for kind in kinds:
                for name in configs:
                    for timing in ("latency", "pipelined"):
                        if name != "paper":
                            ratio = entry[f"{name}/{kind}/{timing}"] / entry[f"paper/{kind}/{timing}"]
                            entry[f"{name}_over_paper/{kind}/{timing}"] = ratio
            print(n, mode, {key: round(value, 3) for key, value in entry.items()}, flush=True)
            out_dir = Path(args.results_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{args.output}.json").write_text(json.dumps(with_run_record(results), indent=1))


if __name__ == "__main__":
    main()
