"""Communication, memory (and, on real devices, time) of sequence-sharded HyperAttention, per device.

Command (CPU, 8 forced host devices; compile-only byte and memory counts, no timing):
    python3 experiments/benchmarks/bench_sharded.py --cpu-devices 8 --lengths 4096 16384 65536 262144 --shards 1 2 4 8 \
        --out experiments/results/bench_sharded_cpu.json
Command (GPU, several devices of one host, with timing; adds the cuDNN exact baseline on one device):
    python3 experiments/benchmarks/bench_sharded.py --lengths 16384 65536 131072 262144 --shards 1 2 4 --dtype \
        bfloat16 \
        --heads 32 --kv-heads 8 --head-dim 128 --time --out experiments/results/bench_sharded_gpu.json
Hardware: any jax backend; the CPU run needs no accelerator. Runtime: 9 minutes measured for the CPU command above on
a busy 2-core machine (56 compilations; nothing is executed unless --time is given). The GPU command is untested.
Expected result: bytes sent per device follow the model in docs/sharding.md (all_to_all ~ (P-1)/P^2 (2TN + 2SK) H e,
bucket_dispatch about three times that plus the float32 output), i.e. fall as 1/P at fixed T and grow linearly in T
at fixed P; per-device memory (arguments + outputs + temporaries) falls roughly as 1/P.

Bytes are read from the compiled program: every all-to-all, collective-permute, all-gather, all-reduce and
reduce-scatter instruction, counted as the bytes one device sends (all-to-all and all-gather: (g-1)/g of the buffer;
collective-permute: the buffer; all-reduce: 2 (g-1)/g of it, a ring). Collectives inside loops would be counted once:
these programs have none in loops. Memory is XLA's `memory_analysis()` of the per-device program.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import re
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-devices", type=int, default=0, help="force this many CPU devices (0: use the backend)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8], help="sequence-axis sizes P")
    parser.add_argument("--strategies", nargs="+", default=["all_to_all", "bucket_dispatch"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument(
        "--plans",
        nargs="+",
        default=["paper"],
        choices=["paper", "default", "accurate"],
        help="HyperAttentionConfig.paper(), HyperAttentionConfig() or .accurate(), with min_seq_len",
    )
    parser.add_argument("--causal", nargs="+", type=int, default=[0], choices=[0, 1], help="0: non-causal, 1: causal")
    parser.add_argument("--time", action="store_true", help="also execute and time (median of --repeats)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="experiments/results/bench_sharded.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402  (XLA_FLAGS must be set before jax starts)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import hyperattn_jax as ha  # noqa: E402
from hyperattn_jax.parallel import sharded_hyper_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record  # noqa: E402

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
DTYPE_BYTES |= {"s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-to-all|collective-permute-start|collective-permute|all-gather-start|all-gather|"
    r"all-reduce-start|all-reduce|reduce-scatter)\("
)
_GROUP_SIZE = re.compile(r"replica_groups=(?:\{\{([\d,]+)\}|mesh\[[^\]]*?=(\d+)\])")


def _array_bytes(type_text: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(type_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        sizes.append(count * DTYPE_BYTES[dtype])
    return sizes


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes one device sends, per collective kind, from a compiled (per-device) HLO module's text."""
    sent: dict[str, float] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        type_text, op = match.groups()
        arrays = _array_bytes(type_text)
        if not arrays:
            continue
        group = _GROUP_SIZE.search(line)
        g = len(group.group(1).split(",")) if group and group.group(1) else int(group.group(2)) if group else 0
        kind = op.removesuffix("-start")
        if op.endswith("-start"):
            arrays = arrays[1:2]  # (operand, output, context...): count the output once
        total = float(sum(arrays))
        if kind == "all-to-all":
            g = len(arrays) if len(arrays) > 1 else g
            total *= (g - 1) / g
        elif kind == "all-gather":
            total *= (g - 1) / g
        elif kind == "all-reduce":
            total *= 2 * (g - 1) / g
        elif kind == "reduce-scatter":
            total *= g - 1
        sent[kind] = sent.get(kind, 0.0) + total
    return sent


def model_bytes(strategy: str, *, p: int, b: int, t: int, n: int, kv: int, h: int, e: int, m: int) -> float:
    """The scaling model of docs/sharding.md: bytes one device sends in the forward pass."""
    if p == 1:
        return 0.0
    if strategy == "all_to_all":
        return (p - 1) / p**2 * b * (2 * t * n + 2 * t * kv) * h * e  # q, k, v in, out back (no lse requested)
    rounds = 2 * (p - 1) / p + 1  # Columnsort: two all_to_all "deals" and a half-column shift there and back
    keys = t / p * b * kv * (2 * h * e + 4)  # k and v rows plus their int32 sort keys
    queries = t / p * b * n * (2 * h * e + 4)  # q rows and their int32 sort keys going, the output coming back
    samples = 2 * (p - 1) / p * b * kv * m * (2 * h * e + 4)  # psum of the gathered samples
    return rounds * (keys + queries) + samples


def build(strategy, mode, mesh, config, shapes, dtype, causal=False):
    key = jax.random.key(0)
    if strategy == "cudnn":  # the exact baseline of DESIGN.md section 4, one device, timed in the same run

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    elif mesh is None:
        # "single_device": the fastest single-device path (Pallas on GPU for bf16/fp16); "single_device_xla": the
        # pure-jnp path that each device of the sharded strategies runs, for a like-for-like comparison.
        implementation = "xla" if strategy == "single_device_xla" else None

        def attend(q, k, v):
            return ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, implementation=implementation)
    else:

        def attend(q, k, v):
            return sharded_hyper_attention(
                q, k, v, key=key, config=config, mesh=mesh, seq_axis="seq", strategy=strategy, causal=causal
            )

    if mode == "fwd":
        fn = attend
    else:

        def fn(q, k, v):
            return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    sharding = None if mesh is None else NamedSharding(mesh, P(None, "seq"))
    specs = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    return jax.jit(fn), specs


def time_it(fn, shapes, dtype, sharding, repeats):
    keys = jax.random.split(jax.random.key(1), 3)
    args = [jax.random.normal(k_, s, dtype) for k_, s in zip(keys, shapes, strict=True)]
    if sharding is not None:
        args = [jax.device_put(x, sharding) for x in args]
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    dtype = jnp.dtype(ARGS.dtype)
    # The published plan with these sizes, and the default and accurate plans with this min_seq_len.
    configs = {
        "paper": ha.HyperAttentionConfig.paper(
            block_size=ARGS.block_size, sample_size=ARGS.sample_size, min_seq_len=ARGS.min_seq_len
        ),
        "default": ha.HyperAttentionConfig(min_seq_len=ARGS.min_seq_len),
        "accurate": ha.HyperAttentionConfig.accurate(min_seq_len=ARGS.min_seq_len),
    }
    runs = [(plan, bool(causal)) for plan in ARGS.plans for causal in ARGS.causal]
    b, n, kv, h = ARGS.batch, ARGS.heads, ARGS.kv_heads, ARGS.head_dim
    rows = []
    for t in ARGS.lengths:
        shapes = [(b, t, n, h), (b, t, kv, h), (b, t, kv, h)]
        for p in ARGS.shards:
            if p > jax.device_count():
                print(f"skip P={p}: only {jax.device_count()} devices", flush=True)
                continue
            mesh = None if p == 1 else jax.make_mesh((p,), ("seq",), devices=jax.devices()[:p])
            on_gpu = jax.default_backend() == "gpu"
            single = ["single_device"] + (["single_device_xla", "cudnn"] if on_gpu else [])
            cases = [
                (s, m, plan, c) for plan, c in runs for s in (ARGS.strategies if p > 1 else single) for m in ARGS.modes
            ]
            for strategy, mode, plan, causal in cases:
                config = configs[plan]
                fn, specs = build(strategy, mode, mesh, config, shapes, dtype, causal)
                start = time.perf_counter()
                try:
                    compiled = fn.lower(*specs).compile()
                except (ValueError, TypeError) as error:  # e.g. heads not divisible by P, too few rows for the sort
                    print(f"T={t} P={p} {strategy} {mode}: not applicable: {error}", flush=True)
                    continue
                except jax.errors.JaxRuntimeError as error:  # e.g. a compile-time out-of-memory
                    print(f"T={t} P={p} {strategy} {mode}: failed: {str(error).splitlines()[0][:300]}", flush=True)
                    continue
                compile_s = time.perf_counter() - start
                sent = collective_bytes(compiled.as_text())
                memory = compiled.memory_analysis()
                row = dict(
                    seq_len=t,
                    shards=p,
                    strategy=strategy,
                    plan=plan,
                    causal=causal,
                    mode=mode,
                    bytes_sent_per_device=sum(sent.values()),
                    bytes_sent_by_kind=sent,
                    model_bytes_fwd=model_bytes(
                        strategy, p=p, b=b, t=t, n=n, kv=kv, h=h, e=dtype.itemsize, m=config.sample_size
                    ),
                    argument_bytes=memory.argument_size_in_bytes,
                    output_bytes=memory.output_size_in_bytes,
                    temp_bytes=memory.temp_size_in_bytes,
                    peak_bytes_estimate=memory.argument_size_in_bytes
                    + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes
                    - memory.alias_size_in_bytes,
                    compile_s=compile_s,
                )
                if ARGS.time:
                    sharding = None if mesh is None else NamedSharding(mesh, P(None, "seq"))
                    try:
                        row["median_ms"] = time_it(compiled, shapes, dtype, sharding, ARGS.repeats)
                    except jax.errors.JaxRuntimeError as error:  # e.g. out of memory at the longest lengths
                        row["error"] = str(error).splitlines()[0][:300]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "bytes_sent_by_kind"}), flush=True)

    result = dict(
        script="experiments/benchmarks/bench_sharded.py",
        argv=sys.argv[1:],
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        device_kind=jax.devices()[0].device_kind,
        config=dict(batch=b, heads=n, kv_heads=kv, head_dim=h, dtype=ARGS.dtype),
        plans={plan: dataclasses.asdict(configs[plan]) for plan in ARGS.plans},
        rows=rows,
    )
    out = pathlib.Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(with_run_record(result), indent=1))
    print(f"wrote {out}")
    plot(result, pathlib.Path(ARGS.plot) if ARGS.plot else out.with_suffix(".png"))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in result["rows"] if r["mode"] == "fwd"]
    styles = {"all_to_all": "-", "bucket_dispatch": "--", "single_device": ":"}
    runs = sorted({(r.get("plan", "paper"), r.get("causal", False)) for r in rows})
    for (plan, causal), strategy, p in itertools.product(runs, styles, sorted({r["shards"] for r in rows})):
        pts = sorted(
            (r["seq_len"], r)
            for r in rows
            if (r["strategy"], r["shards"], r.get("plan", "paper"), r.get("causal", False))
            == (strategy, p, plan, causal)
        )
        if not pts:
            continue
        lengths = [x for x, _ in pts]
        label = f"{strategy} P={p} {plan}{' causal' if causal else ''}"
        if strategy != "single_device":
            axes[0].plot(lengths, [r["bytes_sent_per_device"] / 2**20 for _, r in pts], styles[strategy],
                         marker="o", label=label)  # fmt: skip
            axes[0].plot(lengths, [r["model_bytes_fwd"] / 2**20 for _, r in pts], styles[strategy], color="gray",
                         alpha=0.4)  # fmt: skip
        axes[1].plot(lengths, [r["peak_bytes_estimate"] / 2**20 for _, r in pts], styles[strategy], marker="o",
                     label=label)  # fmt: skip
    cfg = result["config"]
    title = f"N={cfg['heads']} K={cfg['kv_heads']} H={cfg['head_dim']} {cfg['dtype']}, {result['device_kind']}"
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length T (= S)", ylabel="MiB sent per device (fwd)",
                title="communication (gray: model)")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length T (= S)", ylabel="MiB per device",
                title="memory: arguments + outputs + temporaries (fwd)")  # fmt: skip
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
