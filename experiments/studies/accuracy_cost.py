"""GPU time of the default (and candidates for it) vs `paper()`, forward and forward+backward, causal and not.

Command:  python3 experiments/studies/accuracy_cost.py --out experiments/results [--configs paper default ...]
          [--n 32768 131072] [--check-n 8192]
Hardware: one NVIDIA H100, jax 0.11.2, the pallas_triton backend. Runtime: ~1 minute per config (compilation
          included: 2 sizes x 2 modes x fwd, fwd+bwd). On a CPU it runs the xla backend (a dry run, small --n).
Expected: the default within 15% of paper()'s time at 32k and 131k, forward and forward+backward.
Writes accuracy_cost.json under --out: checks (pallas vs xla with the same key at --check-n: out, dq, dk, dv;
pallas vs exact cuDNN at min_seq_len, where HyperAttention is exact), timings_ms {"<n>/<mode>": {"<config>/<fwd|
fwd+bwd>/<latency|pipelined>": ms, "<config>_over_paper/...": ratio}} (accuracy_speed.py's two timings, B=1,
N=K=32, H=64, bf16: the shape of the paper's benchmark). Configs are the candidates of accuracy_perplexity.py with
the library's min_seq_len (4096).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_perplexity import all_configs
from accuracy_speed import timings
from bench_single_layer import check_against_xla
from run_record import with_run_record


def exact_check(config: ha.HyperAttentionConfig, causal: bool, implementation: str | None) -> float:
    """Relative difference to exact attention at n = min_seq_len, where HyperAttention must be exact."""
    n = config.min_seq_len
    q, k, v = (jax.random.normal(jax.random.key(i), (1, n, 8, 64), jnp.bfloat16) for i in range(3))
    key = jax.random.key(0)
    out = ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, implementation=implementation)
    ref = ha.exact_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=causal)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--configs", nargs="+", default=["paper", "default"])
    parser.add_argument("--check-configs", nargs="*", default=["default"], help="configs checked before timing")
    parser.add_argument("--check-n", type=int, default=8192, help="pallas vs xla at this n (GPU only); 0: skip")
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    implementation = "pallas_triton" if gpu else "xla"
    configs = {name: all_configs(args.configs)[name].replace(min_seq_len=4096) for name in args.configs}
    result = {
        "implementation": implementation,
        "shape": "B=1, N=K=32, H=64, bf16",
        "configs": {n: {f: getattr(c, f) for f in c.__dataclass_fields__} for n, c in configs.items()},
        "checks": {},
        "timings_ms": {},
    }
    out_path = Path(args.out) / "accuracy_cost.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    begin = time.time()
    for name in args.check_configs:  # correctness on the device before any timing
        config = configs[name]
        for causal in (False, True):
            mode = "causal" if causal else "noncausal"
            check = {"exact_at_min_seq_len": exact_check(config, causal, implementation)}
            if gpu and args.check_n:
                check |= check_against_xla(args.check_n, 64, causal, config, jax.random.key(0), implementation)
            result["checks"][f"{name}/{mode}"] = check
            print("check", name, mode, check, flush=True)
    for n in args.n:
        q, k, v = (jax.random.normal(jax.random.key(i), (1, n, 32, 64), jnp.bfloat16) for i in range(3))
        for causal in (False, True):
            entry = result["timings_ms"].setdefault(f"{n}/{'causal' if causal else 'noncausal'}", {})
            for name, config in configs.items():

                def hyper(q, k, v, config=config, causal=causal):
                    return ha.hyper_attention(
                        q, k, v, key=jax.random.key(0), config=config, causal=causal, implementation=implementation
                    )

                grad = jax.jit(jax.grad(lambda q, k, v, f=hyper: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))
                for kind, fn in (("fwd", jax.jit(hyper)), ("fwd+bwd", grad)):
                    for timing, ms in timings(fn, q, k, v).items():
                        entry[f"{name}/{kind}/{timing}"] = ms
                        if name != "paper" and f"paper/{kind}/{timing}" in entry:
                            entry[f"{name}_over_paper/{kind}/{timing}"] = ms / entry[f"paper/{kind}/{timing}"]
                print(n, causal, name, f"{time.time() - begin:.0f}s", flush=True)
                out_path.write_text(json.dumps(with_run_record(result), indent=1))
            print({key: round(value, 3) for key, value in entry.items()}, flush=True)


if __name__ == "__main__":
    main()
