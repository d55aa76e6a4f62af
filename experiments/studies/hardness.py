"""Hardness: do the paper's alpha and kappa predict HyperAttention's error on real LM attention? What does?

Command:  python3 experiments/studies/hardness.py [--errors experiments/results/quality_vs_cost.json]
              [--mode noncausal] [--budget 512]
Hardware: CPU (2 cores); jax >= 0.11.2. Needs the q/k/v captures quality_vs_cost.py used (cached on disk).
Runtime:  ~10-30 s per (document, layer) at 4096 tokens, 3 heads, on 2 shared cores.
Expected: alpha (the heaviest normalised column: attention sinks) and the first-token mass rank the paper config's
          error well; kappa (row-sum spread of the residual) much less; the default and accurate() errors depend
          less on alpha, since they attend heavy columns exactly or sample them by mass.
Writes experiments/results/hardness.{json,png}.

For every (document, layer, query head) that quality_vs_cost.json measured: alpha and log kappa
(`hyperattn_jax.diagnostics.hardness`, non-causal, the paper config's hash for the same key as the error run), plus
three plain statistics of the exact attention matrix: the mean attention on the first token (sink mass), the mean row
entropy divided by log(S) (1 = uniform rows) and the mass the top-`budget` keys of each row hold (the oracle's share).
Spearman's rank correlation of each against each preset's error, over all points and per kind of text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_vs_cost import load, preset_config
from run_record import with_run_record

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
PREDICTORS = ("alpha", "log_kappa", "sink_mass", "row_entropy", "top_budget_mass")
PRESETS = ("paper", "default", "accurate")


@jax.jit(static_argnums=(3,))
def attention_statistics(q, k, scale, budget: int):
    """Per head of q `[1, T, n, H]`, k `[1, S, n, H]` (kv heads repeated): sink mass, entropy/log S, top mass."""

    def one_head(args):
        q_h, k_h = args

        def chunk_stats(q_chunk):
            logits = (q_chunk @ k_h.T) * scale
            p = jax.nn.softmax(logits, axis=-1)
            entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
            top = jnp.sum(jax.lax.top_k(p, budget)[0], axis=-1)
            return jnp.stack([p[:, 0], entropy / jnp.log(k_h.shape[0]), top], axis=-1)

        stats = jax.lax.map(chunk_stats, q_h.reshape(-1, 512, q_h.shape[-1]))
        return stats.reshape(-1, 3).mean(0)

    return jax.lax.map(one_head, (jnp.moveaxis(q[0], 1, 0), jnp.moveaxis(k[0], 1, 0)))


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties are negligible for these continuous values); None below 3 points."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rank = lambda a: np.argsort(np.argsort(np.asarray(a, float)))
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--errors", default=str(RESULTS / "quality_vs_cost.json"))
    parser.add_argument("--mode", default="noncausal")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--output", default=str(RESULTS / "hardness.json"))
    args = parser.parse_args()
    errors = json.loads(Path(args.errors).read_text())
    cfg = errors["config"]
    points = []
    for kind, by_mode in errors["results"].items():
        for layer, entry in by_mode.get(args.mode, {}).items():
            q, k, _, scale = load(cfg["documents"][kind], int(layer), cfg["tokens"], cfg["heads"])
            key = jax.random.key(cfg["seed"])
            hard = ha.diagnostics.hardness(q, k, key=key, config=preset_config("paper", args.budget), scale=scale)
            stats = np.asarray(attention_statistics(q, k, scale, args.budget))
            for i, head in enumerate(cfg["heads"]):
                points.append({
                    "kind": kind, "layer": int(layer), "head": head,
                    "alpha": float(hard.alpha[0, i]), "log_kappa": float(hard.log_kappa[0, i]),
                    "sink_mass": float(stats[i, 0]), "row_entropy": float(stats[i, 1]),
                    "top_budget_mass": float(stats[i, 2]),
                    "error": {p: entry[p][str(args.budget)][i] for p in PRESETS if p in entry},
                })  # fmt: skip
            print(f"{kind} L{layer}: alpha={np.asarray(hard.alpha[0]).round(1).tolist()}", flush=True)
    presets = [p for p in PRESETS if all(p in pt["error"] for pt in points)]
    correlation = {
        p: {f: spearman([pt[f] for pt in points], [pt["error"][p] for pt in points]) for f in PREDICTORS}
        for p in presets
    }
    per_kind = {
        kind: {
            p: {f: spearman([pt[f] for pt in mine], [pt["error"][p] for pt in mine]) for f in PREDICTORS}
            for p in presets
        }
        for kind in sorted({pt["kind"] for pt in points})
        if len(mine := [pt for pt in points if pt["kind"] == kind]) >= 4
    }
    result = {
        "experiment": "hardness", "errors_from": Path(args.errors).name, "mode": args.mode, "budget": args.budget,
        "config": cfg, "predictors": list(PREDICTORS), "presets": presets,
        "spearman": correlation, "spearman_per_kind": per_kind, "points": points,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(with_run_record(result), indent=1))
    for p in presets:
        print(p, {f: round(r, 2) for f, r in correlation[p].items()})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
