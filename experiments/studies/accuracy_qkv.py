"""Accuracy of HyperAttention variants on real LM attention inputs, at matched cost.

Command:  python3 experiments/studies/accuracy_qkv.py [--layers 2 8 15 22 29] [--seeds 3] [--configs NAME ...] [--quick]
Hardware: CPU (2 cores are enough); any jax >= 0.11.2.
Runtime:  on 2 CPU cores shared with other work, 2 seeds: 3-18 minutes per layer for the full config list (the exact
          reference, cached under .carry/accuracy/exact after the first run, and the causal rows dominate).
Expected: the published algorithm ("paper", min_seq_len 1024) has mean relative error ~0.47 causal and ~0.88
          non-causal on these inputs; the "default" row (`HyperAttentionConfig.accurate()`: sinks, heavy keys,
          column-mass systematic sampling, window) ~0.04 and ~0.36 at the same number of keys per query.
          Writes experiments/results/accuracy_qkv.json; accuracy_report.py draws the PNG and tables.

Inputs: real post-RoPE q/k/v of SmolLM2-135M on the first 8192 tokens of Hamlet (hyperattn_jax.data.capture_qkv,
layers 2,
8, 15, 22, 29; 9 query heads, 3 kv heads, head dim 64). For every layer, causal and non-causal, every config and every
seed: the relative Frobenius error ||out_h - exact_h|| / ||exact_h|| per head, averaged over the 9 heads. "uniform" is
plain uniform attention (mean of v, causal: running mean), the trivial baseline the issue asks to beat on every layer.
Cost: every config lists `keys_per_query` = block + sample + sinks + heavy + window; all rows compared here use 512,
the paper's 256 + 256 (the exact causal base case of min_seq_len keys is common to all of them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
LAYERS = (22, 15, 29, 2, 8)  # sink-heavy layers first, so that a cut-short run still has them
MIN_SEQ_LEN = 1024  # as in the measurement of the published algorithm at 8192 tokens


# The variant proposed as the library default, `HyperAttentionConfig.accurate()` (named "default" in the JSON of
# these runs); docs/accuracy.md says how it was chosen.
DEFAULT_CANDIDATE = ha.HyperAttentionConfig.accurate()
# The first candidate (measured in accuracy_qkv.json as "default"): 160 global keys, which the GPU kernel pads to 256.
FIRST_CANDIDATE = DEFAULT_CANDIDATE.replace(num_heavy_keys=128, local_window=32)
# The paper's blocks and sample count with the residual sampled by probed column mass (systematic draws), with the
# library's 64 probe queries and with 16 (a quarter of the probe's cost on the GPU).
COLUMN_MASS = ha.HyperAttentionConfig.paper(sample_distribution="column_mass", sample_scheme="systematic")
COLUMN_MASS_P16 = COLUMN_MASS.replace(num_probe_queries=16)
LIBRARY_DEFAULT = ha.HyperAttentionConfig(min_seq_len=MIN_SEQ_LEN)


def candidate_configs() -> dict[str, ha.HyperAttentionConfig]:
    """Every variant measured: each option alone, then combined; all at 512 keys per query."""
    paper = ha.HyperAttentionConfig.paper(min_seq_len=MIN_SEQ_LEN)
    return {
        "paper": paper,
        "sinks64": paper.replace(sample_size=192, num_sink_keys=64),
        "heavy64": paper.replace(sample_size=192, num_heavy_keys=64),
        "systematic": paper.replace(sample_scheme="systematic"),
        "value_norm": paper.replace(sample_distribution="value_norm", sample_scheme="systematic"),
        "column_mass": COLUMN_MASS.replace(min_seq_len=MIN_SEQ_LEN),
        "column_mass_p16": COLUMN_MASS_P16.replace(min_seq_len=MIN_SEQ_LEN),
        "window64": paper.replace(sample_size=192, local_window=64),
        "sinks+window": paper.replace(sample_size=128, num_sink_keys=64, local_window=64),
        "b128+sinks+heavy+cm": paper.replace(
            block_size=128,
            sample_size=256,
            num_sink_keys=32,
            num_heavy_keys=96,
            sample_distribution="column_mass",
            sample_scheme="systematic",
        ),
        "b64+sinks32+heavy128+window32": FIRST_CANDIDATE.replace(min_seq_len=MIN_SEQ_LEN),
        "b128+sinks32+heavy96+u0.2": DEFAULT_CANDIDATE.replace(min_seq_len=MIN_SEQ_LEN, block_size=128, local_window=0),
        "b256+sinks32+heavy96+u0.2": DEFAULT_CANDIDATE.replace(
            min_seq_len=MIN_SEQ_LEN, block_size=256, sample_size=128, local_window=0
        ),
        "default": DEFAULT_CANDIDATE.replace(min_seq_len=MIN_SEQ_LEN),
        # The library default since issue 22 and what moves its error on the heads it loses to uniform attention.
        "b128+h128+w256": LIBRARY_DEFAULT,
        "b128+h128+w256+s1024": LIBRARY_DEFAULT.replace(sample_size=1024),
        "b128+h512+w256": LIBRARY_DEFAULT.replace(num_heavy_keys=512),
        "b128+h128+w256+p64": LIBRARY_DEFAULT.replace(num_probe_queries=64),
    }


def load_layer(layer: int):
    """q `[1, T, 9, 64]`, k and v `[1, T, 3, 64]` float32, and the model's softmax scale."""
    from hyperattn_jax.data import capture_qkv  # cached after the first run (python3 -m hyperattn_jax.data)

    captured = capture_qkv("shakespeare/hamlet", [layer], 8192)[layer]
    return jnp.asarray(captured.q), jnp.asarray(captured.k), jnp.asarray(captured.v), captured.scale


def exact_reference(layer: int, q, k, v, scale: float, causal: bool):
    """Exact float32 attention, cached under .carry/accuracy/exact (git-ignored): it dominates the runtime on CPU."""
    path = ROOT / ".carry" / "accuracy" / "exact" / f"L{layer}_{'causal' if causal else 'noncausal'}.npy"
    if path.is_file():
        return jnp.asarray(np.load(path))
    ref = ha.exact_attention(q, k, v, causal=causal, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(ref))
    return ref


def per_head_error(out, ref) -> np.ndarray:
    return np.asarray(ha.diagnostics.relative_error(out, ref, per_head=True))[0]


def uniform_attention(v, num_query_heads: int, causal: bool):
    """Plain uniform attention (every visible key weighted equally), `[1, T, N, H]`."""
    if causal:
        out = jnp.cumsum(v, axis=1) / jnp.arange(1, v.shape[1] + 1)[None, :, None, None]
    else:
        out = jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), v.shape)
    return jnp.repeat(out, num_query_heads // v.shape[2], axis=2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=["causal", "noncausal"])
    parser.add_argument("--output", default="accuracy_qkv")
    args = parser.parse_args()
    configs = candidate_configs()
    if args.configs:
        configs = {name: configs[name] for name in args.configs}
    results = {
        "experiment": "accuracy_qkv",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "data": "SmolLM2-135M-Instruct q/k/v, Hamlet first 8192 tokens (hyperattn_jax.data.capture_qkv)",
        "metric": "relative Frobenius error per head vs exact float32 attention, mean over 9 heads",
        "seeds": args.seeds,
        "configs": {
            name: {**{f: getattr(c, f) for f in c.__dataclass_fields__}, "keys_per_query": c.keys_per_query}
            for name, c in configs.items()
        },
        "layers": {},
    }
    for layer in args.layers:
        q, k, v, scale = load_layer(layer)
        layer_result = {}
        for mode in args.modes:
            causal = mode == "causal"
            start = time.time()
            ref = exact_reference(layer, q, k, v, scale, causal)
            mode_result = {"uniform": per_head_error(uniform_attention(v, q.shape[2], causal), ref).tolist()}
            # Per head, ||exact output|| / ||v of its kv head||: small where attention averages many unlike values.
            v_rows = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
            mode_result["exact_norm_over_v"] = (
                jnp.linalg.norm(ref[0], axis=(0, 2)) / jnp.linalg.norm(v_rows[0], axis=(0, 2))
            ).tolist()
            for name, config in configs.items():
                errors = []
                for seed in range(args.seeds):
                    out = ha.hyper_attention(
                        q, k, v, key=jax.random.key(seed), config=config, causal=causal, scale=scale
                    )
                    errors.append(per_head_error(out, ref))
                mode_result[name] = np.mean(errors, axis=0).tolist()  # per head, mean over seeds
                mode_result[name + "/seed_std"] = float(np.std([e.mean() for e in errors]))
            layer_result[mode] = mode_result
            summary = "  ".join(f"{n}={np.mean(e):.3f}" for n, e in mode_result.items() if "/" not in n)
            print(f"L{layer} {mode} ({time.time() - start:.0f}s): {summary}", flush=True)
        results["layers"][str(layer)] = layer_result
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.output}.json").write_text(json.dumps(with_run_record(results), indent=1))
    print(f"wrote {RESULTS / (args.output + '.json')}")


if __name__ == "__main__":
    main()
