"""Quality vs cost: HyperAttention's presets, its ablations and other approximate attentions at matched keys per query.

Command:  python3 experiments/studies/quality_vs_cost.py [--tokens 4096] [--layers 2 15 29] [--heads 0 3 6]
              [--budgets 256 512 1024] [--modes noncausal causal] [--documents shakespeare/hamlet ...]
          The recorded run: --layers 15 2 29 8 22 0 11 18 25 5 --budgets 256 512 1024 (other arguments default).
Hardware: CPU (2 shared cores are enough); jax >= 0.11.2; `pip install -e '.[experiments]'` (the q/k/v capture
          downloads SmolLM2-135M and the texts on first use, ~2-10 min per document for 30 layers).
Runtime:  ~1-3 min per (document, layer, mode) at 4096 tokens, 3 heads, 3 budgets on 2 shared cores (the top-k
          oracle's full score matrix dominates). Results are written after every layer.
Expected: the top-k oracle lowest, uniform attention highest; the published algorithm ("paper") near or above
          uniform non-causally, the default and `accurate()` far below it; Performer near 1 on real LM attention.
Writes experiments/results/quality_vs_cost.{json,png}.

Inputs: real post-RoPE q/k/v of SmolLM2-135M (`hyperattn_jax.data.capture_qkv`, 8192-token captures, the first
--tokens positions: the model is causal, so they equal a capture of that length) on one document per text kind.
Metric: relative Frobenius error ||out_h - exact_h|| / ||exact_h|| per query head, float32, one seed.
Cost: keys each query attends (Performer: random features, the same work). Causal: every method runs inside the
paper's causal recursion with exact attention at or below min_seq_len=1024 keys (HyperAttention's own, the others
through `baselines.causal_recursion`); the budget is the keys per query of each off-diagonal quarter.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # baselines beside this file
import baselines
from run_record import with_run_record

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
MIN_SEQ_LEN = 1024
DOCUMENTS = {"play": "shakespeare/hamlet", "code": "stdlib/typing.py", "prose": "milton/areopagitica"}
PRESETS = ("paper", "default", "accurate", "blocks_only")


def preset_config(name: str, budget: int) -> ha.HyperAttentionConfig:
    """Our configs scaled to `budget` keys per query (the presets themselves at 512)."""
    f = budget / 512
    if name == "paper":
        return ha.HyperAttentionConfig.paper(block_size=budget // 2, sample_size=budget // 2, min_seq_len=MIN_SEQ_LEN)
    if name == "default":
        return ha.HyperAttentionConfig(block_size=budget // 2, sample_size=budget // 2, min_seq_len=MIN_SEQ_LEN)
    if name == "accurate":
        return ha.HyperAttentionConfig.accurate(
            block_size=int(64 * f), sample_size=int(256 * f), num_sink_keys=int(32 * f),
            num_heavy_keys=int(96 * f), local_window=int(64 * f), min_seq_len=MIN_SEQ_LEN,
        )  # fmt: skip
    if name == "blocks_only":  # ablation: sortLSH blocks alone, no residual
        return ha.HyperAttentionConfig.paper(block_size=budget, sample_size=0, min_seq_len=MIN_SEQ_LEN)
    raise KeyError(name)


def keys_per_query(name: str, budget: int, causal: bool) -> int:
    if name in PRESETS:
        config = preset_config(name, budget)
        return config.keys_per_query - (0 if causal else config.local_window)  # the window is causal only
    return budget


def load(document: str, layer: int, tokens: int, heads: list[int]):
    from hyperattn_jax.data import capture_qkv

    captured = capture_qkv(document, [layer], 8192, progress=False)[layer]
    group = captured.q.shape[2] // captured.k.shape[2]
    q = jnp.asarray(captured.q[:, :tokens, heads])
    kv_heads = [h // group for h in heads]
    k, v = jnp.asarray(captured.k[:, :tokens, kv_heads]), jnp.asarray(captured.v[:, :tokens, kv_heads])
    return q, k, v, captured.scale


def errors_per_head(out, ref) -> list[float]:
    return np.asarray(ha.diagnostics.relative_error(out, ref, per_head=True))[0].tolist()


def measure_layer(q, k, v, scale, *, causal: bool, budgets: list[int], methods: list[str], seed: int) -> dict:
    """{method: {budget: [error per head]}} plus "uniform": [error per head] for one layer and mode."""
    heads_first = lambda x: jnp.moveaxis(x[0], 1, 0)  # [1, T, n, H] -> [n, T, H]
    qh, kh, vh = heads_first(q) * scale, heads_first(k), heads_first(v)
    ref = ha.exact_attention(q, k, v, causal=causal, scale=scale)
    uniform = jax.vmap(lambda q_, k_, v_: baselines.uniform(q_, k_, v_, causal=causal)[0])(qh, kh, vh)
    result = {"uniform": errors_per_head(jnp.moveaxis(uniform, 0, 1)[None], ref)}
    key = jax.random.key(seed)
    for method in methods:
        result[method] = {}
        for budget in budgets:
            if method in PRESETS:
                out = ha.hyper_attention(q, k, v, key=key, config=preset_config(method, budget), causal=causal,
                                         scale=scale)  # fmt: skip
            else:
                out = baselines.attend_heads(qh, kh, vh, key, method=method, budget=budget, causal=causal,
                                             min_seq_len=MIN_SEQ_LEN)  # fmt: skip
                out = jnp.moveaxis(out, 0, 1)[None]
            result[method][str(budget)] = errors_per_head(out, ref)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 2, 29])
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 3, 6], help="query heads (SmolLM2 has 9)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=["noncausal", "causal"])
    parser.add_argument("--kinds", nargs="+", default=list(DOCUMENTS))
    parser.add_argument("--methods", nargs="+", default=[*PRESETS, *baselines.METHODS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "quality_vs_cost.json"))
    args = parser.parse_args()
    results = {
        "experiment": "quality_vs_cost",
        "data": "SmolLM2-135M-Instruct post-RoPE q/k/v (hyperattn_jax.data.capture_qkv), first --tokens tokens",
        "metric": "relative Frobenius error per query head vs exact float32 attention, one seed",
        "config": {k: getattr(args, k) for k in ("tokens", "layers", "heads", "budgets", "modes", "seed")}
        | {"min_seq_len": MIN_SEQ_LEN, "documents": {kind: DOCUMENTS[kind] for kind in args.kinds}},
        "keys_per_query": {
            mode: {m: {str(b): keys_per_query(m, b, mode == "causal") for b in args.budgets} for m in args.methods}
            for mode in args.modes
        },
        "results": {},
    }
    for layer in args.layers:  # every kind of text for a layer before the next layer: a cut-short run covers all
        for kind in args.kinds:
            q, k, v, scale = load(DOCUMENTS[kind], layer, args.tokens, args.heads)
            for mode in args.modes:
                start = time.time()
                entry = measure_layer(q, k, v, scale, causal=mode == "causal", budgets=args.budgets,
                                      methods=args.methods, seed=args.seed)  # fmt: skip
                results["results"].setdefault(kind, {}).setdefault(mode, {})[str(layer)] = entry
                mid = str(args.budgets[len(args.budgets) // 2])
                line = "  ".join(f"{m}={np.mean(entry[m][mid]):.3f}" for m in args.methods)
                print(f"{kind} L{layer} {mode} ({time.time() - start:.0f}s) @{mid}: uniform="
                      f"{np.mean(entry['uniform']):.3f}  {line}", flush=True)  # fmt: skip
                Path(args.output).write_text(json.dumps(with_run_record(results), indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
