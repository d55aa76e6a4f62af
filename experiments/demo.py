"""HyperAttention vs exact attention on whatever backend is present: time, speed-up and relative error.

Command:   python3 experiments/demo.py            (add --seq-lens 32768 65536 --heads 8 on a GPU)
Hardware:  any; CPU by default (2 cores: about 2-4 minutes), a GPU if jax sees one.
Expected:  at 16k-32k tokens HyperAttention (the default config) is several times faster than exact attention on CPU,
           and the speed-up grows with length. On random Gaussian inputs attention is nearly uniform, so the relative
           error is large (the output itself is tiny); on real LM attention (SmolLM2-135M q/k/v from ../shared, if
           present) it is the number to read, for the default config and for the published algorithm ("paper").
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms  # experiments/ is on the path when run as a script
from tqdm import tqdm

import hyperattn_jax as ha
from hyperattn_jax.diagnostics import relative_error

REAL_QKV = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "smollm2_qkv" / "hamlet_L15.npz"


def compare(q, k, v, *, causal, config, repeats, scale=None):
    exact = jax.jit(lambda q, k, v: ha.exact_attention(q, k, v, causal=causal, scale=scale))
    hyper = jax.jit(
        lambda q, k, v: ha.hyper_attention(q, k, v, key=jax.random.key(0), config=config, causal=causal, scale=scale)
    )
    exact_ms = median_ms(exact, q, k, v, reps=repeats)
    hyper_ms = median_ms(hyper, q, k, v, reps=repeats)
    error = float(relative_error(hyper(q, k, v), exact(q, k, v)))
    return dict(seq_len=q.shape[1], causal=causal, exact_ms=exact_ms, hyper_ms=hyper_ms, error=error)


def gaussian_qkv(seq_len, heads, head_dim, dtype):
    q, k, v = (jax.random.normal(jax.random.key(i), (1, seq_len, heads, head_dim), dtype) for i in range(3))
    return q, k, v


def real_qkv():
    """SmolLM2-135M layer 15 on Hamlet (8192 tokens, 9 query heads, 3 kv heads): [B, T, N, H] float32."""
    z = np.load(REAL_QKV)
    to_layout = lambda x: jnp.asarray(x, jnp.float32).transpose(1, 0, 2)[None]
    return to_layout(z["q"]), to_layout(z["k"]), to_layout(z["v"]), float(z["scale"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"backend: {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    configs = {"default": ha.HyperAttentionConfig(), "paper": ha.HyperAttentionConfig.paper()}
    jobs = [("gaussian", "default", n, c) for n in args.seq_lens for c in (False, True)]
    if REAL_QKV.exists():
        jobs += [("smollm2-L15", name, 8192, c) for name in configs for c in (False, True)]
    rows = []
    for data, config_name, seq_len, causal in tqdm(jobs, desc="exact vs hyper"):
        config = configs[config_name]
        if data == "gaussian":
            q, k, v = gaussian_qkv(seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
            row = compare(q, k, v, causal=causal, config=config, repeats=args.repeats)
        else:
            q, k, v, scale = real_qkv()
            # min_seq_len 1024 so that the 8k sequence is really approximated (three causal recursion levels).
            config = config.replace(min_seq_len=1024)
            row = compare(q, k, v, causal=causal, config=config, repeats=args.repeats, scale=scale)
        rows.append({"data": data, "config": config_name, **row})
    header = f"{'data':<12} {'config':<8} {'tokens':>7} {'causal':>6} {'exact ms':>9} {'hyper ms':>9} {'speed-up':>8}"
    print(f"\n{header} {'rel. error':>10}")
    for r in rows:
        print(
            f"{r['data']:<12} {r['config']:<8} {r['seq_len']:>7} {r['causal']!s:>6} {r['exact_ms']:>9.1f} "
            f"{r['hyper_ms']:>9.1f} {r['exact_ms'] / r['hyper_ms']:>7.1f}x {r['error']:>10.3f}"
        )


if __name__ == "__main__":
    main()
