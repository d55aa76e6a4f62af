"""Relative attention error of HyperAttention variants on real q/k/v of three kinds of text: play, code, prose.

Command:  python3 experiments/studies/accuracy_kinds.py [--layers 2 8 15 22] [--seeds 1] [--configs NAME ...]
          [--held-out] [--modes causal noncausal] [--output NAME]
Hardware: CPU (2 cores); any jax >= 0.11.2. Runtime: on 2 busy shared cores, 3-8 minutes for the first
          (document, mode) of a layer (the exact reference, then cached under .carry/accuracy/exact), 20-70 s after.
Expected (recorded 2026-12-05, layers 2, 15, 22): mean error causal ~0.56 paper(), ~0.08 default, ~0.04
          b128+h128+w128; non-causal ~0.9-1.1, ~0.55-0.61, ~0.44-0.48; the three kinds about equally hard.
Writes experiments/results/accuracy_kinds.json.

Inputs: post-RoPE q/k/v of SmolLM2-135M (`hyperattn_jax.data.capture_qkv`) on the first 8192 tokens of one tuning
document per kind: shakespeare/hamlet (play: dialogue), stdlib/argparse.py (code), milton/areopagitica (prose); with
--held-out, documents no config was tuned on (HELD_OUT). Metric as in accuracy_qkv.py: relative Frobenius error per
head vs exact float32 attention, mean over the 9 heads; "uniform" is plain uniform attention, the floor every config
must beat. min_seq_len 1024 as in the perplexity runs.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # accuracy_qkv beside this file
from accuracy_qkv import per_head_error, uniform_attention
from run_record import with_run_record

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
DOCUMENTS = {"play": "shakespeare/hamlet", "code": "stdlib/argparse.py", "prose": "milton/areopagitica"}
# --held-out: documents no config was tuned on (the perplexity study's held-out play and module, the other prose
# document, and verse, a fourth kind).
HELD_OUT = {
    "play": "shakespeare/tempest", "code": "stdlib/pydoc.py", "prose": "britannica-1911/shakespeare",
    "verse": "milton/paradiselost",
}  # fmt: skip
MIN_SEQ_LEN = 1024


def candidate_configs() -> dict[str, ha.HyperAttentionConfig]:
    """The presets and the variants of the default tried for issue 22 (keys per query in the names' comments)."""
    default = ha.HyperAttentionConfig(min_seq_len=MIN_SEQ_LEN)
    return {
        "paper": ha.HyperAttentionConfig.paper(min_seq_len=MIN_SEQ_LEN),
        "default": default,
        "accurate": ha.HyperAttentionConfig.accurate(min_seq_len=MIN_SEQ_LEN),
        # An exact window on top of the default (causal: 640 keys), and at the paper's 512 keys per query.
        "w128": default.replace(local_window=128),
        "b128+w128": default.replace(block_size=128, local_window=128),
        "m128+w128": default.replace(sample_size=128, local_window=128),
        # Heavy keys from the same 16-probe estimate: 128 exact global keys in place of half the block.
        "b128+h128": default.replace(block_size=128, num_heavy_keys=128),
        "b128+h128+w128": default.replace(block_size=128, num_heavy_keys=128, local_window=128),
        "b128+h64+w64": default.replace(block_size=128, num_heavy_keys=64, local_window=64),
        "b128+s32h96+w128": default.replace(block_size=128, num_sink_keys=32, num_heavy_keys=96, local_window=128),
        # Sample shrinkage: the fixed rule with c (lam = 1 / (1 + c * residual keys per sample); 1/32 was the default
        # before the adaptive lam) and none.
        "shrinkage_0": default.replace(sample_shrinkage=0.0),
        "shrinkage_1/32": default.replace(sample_shrinkage=1 / 32),
        "shrinkage_1/64": default.replace(sample_shrinkage=1 / 64),
        "shrinkage_1/16": default.replace(sample_shrinkage=1 / 16),
        "shrinkage_1/8": default.replace(sample_shrinkage=1 / 8),
    }


def load_layer(document: str, layer: int):
    from hyperattn_jax.data import capture_qkv

    captured = capture_qkv(document, [layer], 8192, progress=False)[layer]
    return jnp.asarray(captured.q), jnp.asarray(captured.k), jnp.asarray(captured.v), captured.scale


def exact_reference(document: str, layer: int, q, k, v, scale: float, causal: bool):
    """Exact float32 attention, cached under .carry/accuracy/exact (git-ignored)."""
    stem = f"{document.replace('/', '__')}_L{layer}_{'causal' if causal else 'noncausal'}"
    path = ROOT / ".carry" / "accuracy" / "exact" / f"{stem}.npy"
    if path.is_file():
        return jnp.asarray(np.load(path))
    ref = ha.exact_attention(q, k, v, causal=causal, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(ref))
    return ref


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15, 22])
    parser.add_argument("--kinds", nargs="+", default=None, help="default: every kind of the document set")
    parser.add_argument("--held-out", action="store_true", help="the HELD_OUT documents instead of the tuning ones")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=["causal", "noncausal"])
    parser.add_argument("--output", default="accuracy_kinds")
    args = parser.parse_args()
    documents = HELD_OUT if args.held_out else DOCUMENTS
    kinds = args.kinds or list(documents)
    configs = candidate_configs()
    if args.configs:
        configs = {name: configs[name] for name in args.configs}
    out_path = RESULTS / f"{args.output}.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.update(
        experiment="accuracy_kinds",
        data={kind: documents[kind] for kind in kinds},
        metric="relative Frobenius error per head vs exact float32 attention, mean over 9 heads and seeds",
    )
    results.setdefault("configs", {}).update(
        {n: {**{f: getattr(c, f) for f in c.__dataclass_fields__}, "keys_per_query": c.keys_per_query}
         for n, c in configs.items()}
    )  # fmt: skip
    results.setdefault("errors", {})
    for kind in kinds:
        for layer in args.layers:
            q, k, v, scale = load_layer(documents[kind], layer)
            for mode in args.modes:
                causal = mode == "causal"
                start = time.time()
                ref = exact_reference(documents[kind], layer, q, k, v, scale, causal)
                entry = results["errors"].setdefault(f"{kind}/L{layer}/{mode}", {})
                entry["uniform"] = per_head_error(uniform_attention(v, q.shape[2], causal), ref).tolist()
                for name, config in configs.items():
                    errors = [
                        per_head_error(
                            ha.hyper_attention(q, k, v, key=jax.random.key(seed), config=config, causal=causal,
                                               scale=scale), ref)
                        for seed in range(args.seeds)
                    ]  # fmt: skip
                    entry[name] = np.mean(errors, axis=0).tolist()
                summary = "  ".join(f"{n}={np.mean(e):.3f}" for n, e in entry.items())
                print(f"{kind} L{layer} {mode} ({time.time() - start:.0f}s): {summary}", flush=True)
                RESULTS.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(with_run_record(results), indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
