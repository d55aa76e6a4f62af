"""Single-layer speed of HyperAttention (fused Pallas kernels) against exact attention (cuDNN / splash), paper config.

Command:  PYTHONPATH=. python3 experiments/benchmarks/bench_single_layer.py --out \
    experiments/results/bench_single_layer.json
          then python3 experiments/benchmarks/plot_single_layer.py experiments/results/bench_single_layer.json \
              (PNG + README table)
Hardware: one NVIDIA H200 (the project's lent GPU; an H100 80GB before 2026-12), jax 0.11.2. Runtime: ~3 min for
n <= 131k with --max-xla-n 8192 --check-n 8192, ~1.5 min for --n "" --n-hyper-only 262144,524288,1048576 --methods
pallas_triton (compilation included, H200). Expected result (measured 2026-12-02 00:56 UTC on the H200): ratios
cuDNN / ours that grow with n, at n = 131072 non-causal fwd ~102x, fwd+bwd ~101x, causal fwd ~12.5x, fwd+bwd ~11x;
the causal forward beats cuDNN from 8k on; every mode runs up to 1M tokens (causal fwd+bwd at 1M in ~0.54 s).

In ONE process: `jax.nn.dot_product_attention(implementation="cudnn")` (exact baseline), our `xla` path and our
`pallas_triton` path on a GPU (add `pallas_mosaic_gpu` to `--methods` for the Mosaic GPU path); jax's splash
attention, `xla` and `pallas_tpu` on a TPU (docs/tpu.md; `--methods` defaults to the platform's three, and a method
for another platform is refused with the platform it needs); B=1, N=32 (K=32 kv heads, or --kv-heads for
grouped-query attention, e.g. 8 with --head-dims 128: a Llama layer), bf16, HyperAttentionConfig.paper() (block
256, sample 256, 7 projections, min_seq_len 4096) or, with --config default, HyperAttentionConfig(); --min-seq-len
overrides either's base-case size.
Before timing, each kernel path's output is compared with the xla path for the same key (relative error, forward
and gradients). Timings: median of many runs after warm-up, each run ended by `block_until_ready`. The exact baseline
is timed up to --max-exact-n and the xla path up to --max-xla-n; beyond, only HyperAttention is timed.
Writes JSON (device, jax version, date, config, every timing, ratios, compiled memory of each function).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

# JAX reserves 75% of GPU memory by default; the 1M-token causal fwd+bwd needs 67 GB of the H100's 80 (set before
# jax starts; an explicit setting in the environment wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np
from timing import call_times_ms  # experiments/ is on the path when run as a script

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

NUM_HEADS = 32


def _compiled_bytes(fn, args):
    try:
        analysis = fn.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes + analysis.argument_size_in_bytes)
    except Exception:  # memory_analysis is not available on every backend/version
        return None


# Per jax platform: the exact baseline, then our implementations. The exact baselines are cuDNN's fused attention
# (GPU) and jax's splash attention (TPU, jax.experimental.pallas.ops.tpu); ratios are baseline time / ours.
METHODS = {"gpu": ("cudnn", "xla", "pallas_triton"), "tpu": ("splash", "xla", "pallas_tpu"), "cpu": ("xla",)}
EXACT = {"cudnn": "gpu", "splash": "tpu"}
KERNELS = {"pallas_triton": "gpu", "pallas_mosaic_gpu": "gpu", "pallas_tpu": "tpu"}


def check_methods(methods, platform: str) -> None:
    """Raise ValueError naming the platform a method needs where it is not this one."""
    for method in methods:
        needs = EXACT.get(method) or KERNELS.get(method)
        if method not in ("xla", *EXACT, *KERNELS):
            raise ValueError(f"unknown method {method!r}: choose from xla, {', '.join([*EXACT, *KERNELS])}")
        if needs is not None and needs != platform:
            raise ValueError(
                f"method {method!r} needs a {needs.upper()} backend, but jax's default backend is {platform!r}; "
                f"on {platform} run --methods {','.join(METHODS.get(platform, ('xla',)))}"
            )


def splash_attention(q, k, v, *, causal: bool):
    """Exact attention with jax's splash attention kernel (TPU), public layout [B, T, N, H] in and out."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, t, n, h = q.shape
    one = masks.CausalMask((t, k.shape[1])) if causal else masks.FullMask((t, k.shape[1]))
    block = min(512, t)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    kernel = splash.make_splash_mha_single_device(masks.MultiHeadMask([one] * n), block_sizes=sizes)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, H]
    out = jax.vmap(kernel)(heads_first(q * (h**-0.5)), heads_first(k), heads_first(v))  # splash does not scale q
    return heads_first(out)


def _make_fns(method: str, causal: bool, config, key):
    def forward(q, k, v):
        if method == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        if method == "splash":
            return splash_attention(q, k, v, causal=causal)
        return ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, implementation=method)

    def loss(q, k, v, cotangent):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fwd, fwd_bwd


def _relative_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(n, head_dim, seed, kv_heads=NUM_HEADS):
    """q and the cotangent `[1, n, 32, H]`, k and v `[1, n, kv_heads, H]` (grouped-query attention below 32)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape, kv_shape = (1, n, NUM_HEADS, head_dim), (1, n, kv_heads, head_dim)
    q, k, v, g = (
        jax.random.normal(kk, shape, jnp.bfloat16)
        for kk, shape in zip(keys, (q_shape, kv_shape, kv_shape, q_shape), strict=True)
    )
    return q, k, v, g


def check_against_xla(n, head_dim, causal, config, key, kernel: str, kv_heads=NUM_HEADS):
    """Relative difference of the `kernel` method vs xla (same key): forward out, and dq, dk, dv."""
    q, k, v, g = _inputs(n, head_dim, seed=n + 7, kv_heads=kv_heads)
    result = {}
    grads = {}
    for method in ("xla", kernel):
        fwd, fwd_bwd = _make_fns(method, causal, config, key)
        result[method] = fwd(q, k, v)
        grads[method] = fwd_bwd(q, k, v, g)[1]
    errors = {"out": _relative_error(result[kernel], result["xla"])}
    errors.update(
        {name: _relative_error(grads[kernel][i], grads["xla"][i]) for i, name in enumerate(("dq", "dk", "dv"))}
    )
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/bench_single_layer.json")
    parser.add_argument("--n", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--n-hyper-only", default="262144,524288,1048576", help="HyperAttention alone (no cuDNN)")
    parser.add_argument("--head-dims", default="64")
    parser.add_argument("--config", choices=("paper", "default"), default="paper")
    parser.add_argument(
        "--min-seq-len",
        default="",
        help="override the config's min_seq_len; several (comma-separated): each of our methods once per value, "
        "timed as METHOD@VALUE against the one exact baseline",
    )
    parser.add_argument("--kv-heads", type=int, default=NUM_HEADS, help="below 32: grouped-query attention")
    parser.add_argument("--modes", default="noncausal_fwd,noncausal_fwdbwd,causal_fwd,causal_fwdbwd")
    parser.add_argument(
        "--methods", default=None, help="default per platform: gpu cudnn,xla,pallas_triton; tpu splash,xla,pallas_tpu"
    )
    parser.add_argument("--max-xla-n", type=int, default=16384, help="largest n for the xla path")
    parser.add_argument("--max-exact-n", type=int, default=131072, help="largest n for the exact baseline")
    parser.add_argument("--check-n", default="8192,16384", help="n at which the kernels are compared with xla")
    args = parser.parse_args()
    platform = jax.default_backend()
    methods = args.methods.split(",") if args.methods else list(METHODS.get(platform, ("xla",)))
    try:
        check_methods(methods, platform)
    except ValueError as error:
        parser.error(str(error))
    baseline = next((m for m in methods if m in EXACT), None)
    kernels = [m for m in methods if m in KERNELS]
    kernel = next(iter(kernels), None)  # the one whose ratio is printed

    # paper(): the published algorithm; "default": HyperAttentionConfig() with its accuracy options
    config = ha.HyperAttentionConfig.paper() if args.config == "paper" else ha.HyperAttentionConfig()
    # The causal recursion's base-case size (issue 18: where stopping the recursion pays off).
    min_seq_lens = [int(x) for x in args.min_seq_len.split(",") if x]
    if len(min_seq_lens) == 1:
        config = dataclasses.replace(config, min_seq_len=min_seq_lens[0])
    configs = {m: config for m in methods}  # timed label (METHOD or METHOD@min_seq_len) -> its config
    if len(min_seq_lens) > 1:
        configs = {m: config for m in methods if m in EXACT} | {
            f"{m}@{size}": dataclasses.replace(config, min_seq_len=size)
            for m in methods
            if m not in EXACT
            for size in min_seq_lens
        }
    key = jax.random.key(0)
    device = jax.devices()[0]
    record = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {
            "name": args.config,
            "batch": 1,
            "num_heads": NUM_HEADS,
            "num_kv_heads": args.kv_heads,
            "dtype": "bfloat16",
            **dataclasses.asdict(config),
            **({"min_seq_len": min_seq_lens} if len(min_seq_lens) > 1 else {}),
        },
        "xla_python_client_mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
        "checks": [],
        "timings": [],
    }
    out_path = args.out

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(with_run_record(record), f, indent=1)

    head_dims = [int(x) for x in args.head_dims.split(",")]
    for head_dim in head_dims:
        for n, method in [(int(x), m) for x in args.check_n.split(",") if x for m in kernels]:
            for causal in (False, True):
                errors = check_against_xla(n, head_dim, causal, config, key, method, args.kv_heads)
                record["checks"].append({"n": n, "head_dim": head_dim, "causal": causal, "method": method, **errors})
                cells = " ".join(f"{name}={value:.2e}" for name, value in errors.items())
                print(f"check {method} H={head_dim} n={n} causal={causal}: {cells}")
        save()

    modes = args.modes.split(",")
    sizes = [int(x) for x in args.n.split(",") if x] + [int(x) for x in args.n_hyper_only.split(",") if x]
    for head_dim in head_dims:
        for n in sizes:
            q, k, v, g = _inputs(n, head_dim, seed=n, kv_heads=args.kv_heads)
            for mode in modes:
                causal = mode.startswith("causal")
                backward = mode.endswith("fwdbwd")
                row = {"n": n, "head_dim": head_dim, "mode": mode}
                for label, label_config in configs.items():
                    method = label.split("@")[0]
                    if method in EXACT and n > args.max_exact_n:
                        continue
                    if method == "xla" and n > args.max_xla_n:
                        continue
                    fwd, fwd_bwd = _make_fns(method, causal, label_config, key)
                    fn, fn_args = (fwd_bwd, (q, k, v, g)) if backward else (fwd, (q, k, v))
                    try:
                        times = call_times_ms(fn, *fn_args, reps=50, budget_s=1.5, min_reps=5)
                        ms, reps = statistics.median(times), len(times)
                        row[label] = {"ms": ms, "reps": reps, "compiled_bytes": _compiled_bytes(fn, fn_args)}
                    except Exception as error:  # out of memory at large n: record, go on
                        row[label] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                for label in configs:
                    if label not in EXACT and "ms" in row.get(baseline, {}) and "ms" in row.get(label, {}):
                        row[f"ratio_{baseline}_over_{label}"] = row[baseline]["ms"] / row[label]["ms"]
                record["timings"].append(row)
                cells = " ".join(f"{m}={row[m]['ms']:.3f}ms" if "ms" in row.get(m, {}) else f"{m}=--" for m in configs)
                ratio = row.get(f"ratio_{baseline}_over_{kernel}")
                print(f"H={head_dim} n={n} {mode}: {cells}" + (f" ratio={ratio:.1f}x" if ratio else ""), flush=True)
                save()
    save()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
