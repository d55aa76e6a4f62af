"""Why the non-causal estimate can lose to uniform attention: where each head's attention mass sits, and how well the
sampled residual's mass is estimated, on real q/k/v.

Command:  python3 experiments/studies/residual_diagnosis.py [--document shakespeare/hamlet] [--layer 2]
Hardware: CPU (2 cores); any jax >= 0.11.2. Runtime: ~1 minute (the q/k/v capture cached after the first run).
Expected: on layer 2's first kv-head group, most of each row's mass in the sampled residual, its mass estimated to a
          few percent, and the error above uniform attention's without sample shrinkage (the value-weighted sum is
          what the samples get wrong), below it with shrinkage (the fixed rule c = 1/32 and the default's adaptive
          lam).
Writes experiments/results/residual_diagnosis_cpu.json.

Per query head, non-causal, seed 0, `min_seq_len` 1024, for the default without shrinkage (`sample_shrinkage=0`),
with the fixed rule (1/32) and the default (adaptive): relative error against exact float32 attention; the exact
attention mass on the keys the estimate attends exactly (block and heavy keys), its complement (the residual's true
mass) and the estimate's residual mass (the sample tile's share of its softmax), mean over queries, and the mean
|estimated - true| residual mass; the error of uniform attention; the mean of each row's largest attention
probability.
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
from hyperattn_jax import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_qkv import per_head_error, uniform_attention
from run_record import with_run_record

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def residual_masses(q5, k4, v4, config, scale):
    """(true, estimated) residual mass `[K, G, T]` of the estimate under the plan of key(0)."""
    plan = ops.make_plan(q5, k4, key=jax.random.key(0), config=config, v=v4, scale=scale)
    tiles = ops.hyper_attention_tiles(k4, v4, plan)
    q_blocks = ops.block_query_layout(q5, plan)
    _, lse = ops.tiled_attention(q_blocks, tiles, scale=scale)
    _, lse_samples = ops.tiled_attention(q_blocks, tiles[-1:], scale=scale)
    _, lse_exact_part = ops.tiled_attention(q_blocks, tiles[:-1], scale=scale)
    t = q5.shape[3]
    unblock = lambda x: ops.unblock_query_layout(x[..., None], plan, t)[..., 0]
    lse_all = jax.nn.logsumexp(jnp.einsum("bkgth,bksh->bkgts", q5, k4) * scale, axis=-1)
    true = 1.0 - jnp.exp(unblock(lse_exact_part) - lse_all)
    estimated = jnp.exp(unblock(lse_samples - lse))
    return true[0], estimated[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--document", default="shakespeare/hamlet")
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args()
    from hyperattn_jax.data import capture_qkv

    captured = capture_qkv(args.document, [args.layer], 8192, progress=False)[args.layer]
    q, k, v, scale = (jnp.asarray(captured.q), jnp.asarray(captured.k), jnp.asarray(captured.v), captured.scale)
    q5, k4, v4 = ops.group_queries(q, k.shape[2]), ops.heads_major(k), ops.heads_major(v)
    ref = ha.exact_attention(q, k, v, scale=scale)
    probabilities = jax.nn.softmax(jnp.einsum("bkgth,bksh->bkgts", q5, k4) * scale, axis=-1)
    record = {
        "experiment": "residual_diagnosis",
        "document": args.document,
        "layer": args.layer,
        "uniform_error": per_head_error(uniform_attention(v, q.shape[2], False), ref).tolist(),
        "mean_max_probability": np.asarray(jnp.mean(jnp.max(probabilities, -1), -1)[0]).reshape(-1).tolist(),
        "configs": {},
    }
    for name, shrinkage in (("no_shrinkage", 0.0), ("fixed_1/32", 1 / 32), ("default", "adaptive")):
        config = ha.HyperAttentionConfig(min_seq_len=1024, sample_shrinkage=shrinkage)
        out = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=config, scale=scale)
        true, estimated = residual_masses(q5, k4, v4, config, scale)
        record["configs"][name] = {
            "error": per_head_error(out, ref).tolist(),
            "true_residual_mass": np.asarray(jnp.mean(true, -1)).reshape(-1).tolist(),
            "estimated_residual_mass": np.asarray(jnp.mean(estimated, -1)).reshape(-1).tolist(),
            "mean_abs_mass_difference": np.asarray(jnp.mean(jnp.abs(estimated - true), -1)).reshape(-1).tolist(),
        }
        rows = record["configs"][name]
        print(name, "error", np.round(rows["error"], 2), "uniform", np.round(record["uniform_error"], 2))
        print("  residual mass true", np.round(rows["true_residual_mass"], 2), "|est - true|",
              np.round(rows["mean_abs_mass_difference"], 2))  # fmt: skip
    (RESULTS / "residual_diagnosis_cpu.json").write_text(json.dumps(with_run_record(record), indent=1))


if __name__ == "__main__":
    main()
