"""Does the causal window need to reach every query of a quarter, or only the queries next to its boundary?

Command:  python3 experiments/studies/window_scope.py --out experiments/results --tokens-file FILE
          [--variant boundary|shifted] [--configs default b128+h128+w512] [--seeds 0 1]
Hardware: any; ~45 s per document, config and seed on 2 CPU cores (8192 tokens, all 30 layers), plus ~70 s per
          document for the exact baseline.
Expected: if the window only matters to the queries whose recent keys cross a quarter's boundary, perplexity within
          ~0.005 of the library's window (perplexity_kinds_candidates_h100.json, same documents and seeds).

Why: the library's window (`local_window` w) makes the last w keys of every lower-left quarter global keys of its
plan: every second-half query attends them exactly, at every level. Only the queries of the second half's first
base segment need them (their w most recent keys lie just before the boundary); for the others they are keys
thousands of positions back. On the GPU that is w more keys per query per level (768 instead of 512 at the
default), most of the default's causal time over `paper()`.

The variant measured here ("boundary"): in each lower-left quarter the queries of the second half's first base
segment are estimated as now (window exact, left out of their blocks and sample), the other second-half queries by
a plan without the window (the window keys in their blocks and sample like any key). Two plans per quarter, with
independent draws (a kernel version would share one plan and mask the window keys for the first segment's queries,
the same estimator family). The library's recursion on the xla backend, float32, with that split in its estimate.

The variant "shifted" gets the same scope from the recursion itself, with no window in the quarters: every diagonal
block reaches w keys further left. A node (queries [a, b)) owns keys [a - w, b), its first w (the prefix) visible to
all its queries; its halves are nodes of the same form (the second one's prefix is [mid - w, mid)), and its
lower-left problem is queries [mid, b) over keys [a - w, mid - w): half x half, the paper's size, estimated with no
window. The base case is each segment's causal attention plus its prefix, exactly. Every key before a query is
counted once (in one quarter or in its base case), so the estimator keeps the recursion's form; every query sees
its w most recent keys exactly; the window keys of far queries fall into smaller quarters further down. On a GPU the
quarters would cost what `paper()`'s cost (no window tile) and the base case w keys more per query (dense). The
sequence's first segment has no prefix (its positions before 0 are padding: moved to the end of a quarter's keys
and cut off by kv_length).

Writes window_scope_cpu.json (boundary) or window_scope_shifted_cpu.json under --out: per document and seed the
ratio to exact perplexity of each config, and the per-kind summary (as perplexity_kinds.json).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax.backends import xla
from hyperattn_jax.ops import (
    group_queries,
    grouped_causal_attention,
    heads_major,
    merge_partials,
    quarter_is_exact,
    split_level,
    ungroup_output,
)
from hyperattn_jax.ops.causal import causal_base_length, causal_padded_length, level_shape, pad_positions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_perplexity import (
    DOCUMENTS,
    MIN_SEQ_LEN,
    SOURCES,
    Model,
    all_configs,
    document_tokens,
    kinds_summary,
    write,
)


def _grouped_on_xla(q, k, v, config):
    """(the xla backend's parts, q, k, v in the grouped layout) for a study recursion; configs without sinks."""
    if config.num_sink_keys:
        raise ValueError("the study's recursions have no sinks")
    parts = xla.parts(scale=q.shape[-1] ** -0.5, hash_key=None)
    return parts, group_queries(q, k.shape[2]), heads_major(k), heads_major(v)


def boundary_window_attention(q, k, v, *, key, config):
    """Causal HyperAttention (public layout) by the library's recursion, the window given only to the queries of each
    quarter's first base segment: its parts are the xla backend's with an estimate that splits the quarter's queries
    where the library asks for the window (`recent_keys`)."""
    parts, q5, k4, v4 = _grouped_on_xla(q, k, v, config)
    segment = level_shape(causal_padded_length(q5.shape[3], config), config)[1]

    def estimate(q, k, v, *, key, config, kv_length, recent_keys=0):
        near = min(segment, q.shape[3])  # the queries whose w most recent keys end at the boundary
        if not recent_keys or near == q.shape[3]:
            return parts.estimate(q, k, v, key=key, config=config, kv_length=kv_length, recent_keys=recent_keys)
        key_near, key_far = jax.random.split(key)
        near_part = parts.estimate(q[..., :near, :], k, v, key=key_near, config=config, kv_length=kv_length,
                                   recent_keys=recent_keys)  # fmt: skip
        far_part = parts.estimate(q[..., near:, :], k, v, key=key_far, config=config, kv_length=kv_length)
        return tuple(jnp.concatenate([a, b], axis=3) for a, b in zip(near_part, far_part, strict=True))

    out, _ = grouped_causal_attention(q5, k4, v4, key=key, config=config, parts=parts._replace(estimate=estimate))
    return ungroup_output(out).astype(q.dtype)


def shifted_window_attention(q, k, v, *, key, config):
    """Causal HyperAttention (public layout) by the shifted recursion (module docstring): diagonal blocks reach
    `local_window` keys further left, the quarters carry no window. Configs without sinks."""
    parts, q5, k4, v4 = _grouped_on_xla(q, k, v, config)
    t = q5.shape[3]
    length = causal_padded_length(t, config)
    w = config.local_window
    plain = config.replace(local_window=0)

    def prefix_part(q, k, v, valid):
        """Every query over its node's prefix, exactly; nothing (lse -inf) where the prefix is padding."""
        out, lse = parts.exact(q, k, v, causal=False, kv_length=None)
        return (jnp.where(valid[:, None, None, None, None], out, 0.0),
                jnp.where(valid[:, None, None, None], lse, -jnp.inf))  # fmt: skip

    def recurse(q, k_ext, v_ext, valid, key):
        """q `[B', K, G, T', H]`; k_ext, v_ext `[B', K, w + T', H]` (the prefix first); valid `[B']` bool."""
        t = q.shape[3]
        if t <= causal_base_length(config):
            own = parts.exact(q, k_ext[:, :, w:], v_ext[:, :, w:], causal=True, kv_length=None)
            return merge_partials(*own, *prefix_part(q, k_ext[:, :, :w], v_ext[:, :, :w], valid)) if w else own
        half, batch = t // 2, q.shape[0]
        key_off_diagonal, key_deeper = split_level(key)
        diag_out, diag_lse = recurse(
            jnp.concatenate([q[..., :half, :], q[..., half:, :]], axis=0),
            jnp.concatenate([k_ext[:, :, : w + half], k_ext[:, :, half:]], axis=0),
            jnp.concatenate([v_ext[:, :, : w + half], v_ext[:, :, half:]], axis=0),
            jnp.concatenate([valid, jnp.ones_like(valid)]),  # the second half's prefix is real keys
            key_deeper,
        )
        # Keys [a - w, mid - w): the prefix moved last, where kv_length cuts it off when it is padding.
        k_low, v_low = (jnp.concatenate([x[:, :, w:half], x[:, :, :w]], axis=2) for x in (k_ext, v_ext))
        kv_length = jnp.where(valid, half, half - w).astype(jnp.int32)
        if quarter_is_exact(half, config):
            low = parts.exact(q[..., half:, :], k_low, v_low, causal=False, kv_length=kv_length)
        else:
            low = parts.estimate(q[..., half:, :], k_low, v_low, key=key_off_diagonal, config=plain,
                                 kv_length=kv_length)  # fmt: skip
        second_out, second_lse = merge_partials(diag_out[batch:], diag_lse[batch:], *low)
        return (jnp.concatenate([diag_out[:batch], second_out], axis=3),
                jnp.concatenate([diag_lse[:batch], second_lse], axis=3))  # fmt: skip

    k_ext, v_ext = (pad_positions(x, length, axis=2) for x in (k4, v4))
    k_ext, v_ext = (jnp.pad(x, [(0, 0), (0, 0), (w, 0), (0, 0)]) for x in (k_ext, v_ext))
    valid = jnp.zeros((q5.shape[0],), bool)  # the sequence's first segment has no prefix
    out, _ = recurse(pad_positions(q5, length, axis=3), k_ext, v_ext, valid, key)
    return ungroup_output(out[..., :t, :]).astype(q.dtype)


VARIANTS = {"boundary": boundary_window_attention, "shifted": shifted_window_attention}
VARIANT_NOTES = {
    "boundary": "window only for each quarter's first base segment of queries (see the script)",
    "shifted": "diagonal blocks reach local_window keys further left; no window in the quarters (see the script)",
}
OUTPUTS = {"boundary": "window_scope_cpu.json", "shifted": "window_scope_shifted_cpu.json"}


@functools.cache
def _jitted(config, variant: str):
    return jax.jit(lambda q, k, v, key: VARIANTS[variant](q, k, v, key=key, config=config))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--tokens-file", default=None)
    parser.add_argument("--configs", nargs="+", default=["default", "b128+h128+w512"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="boundary")
    args = parser.parse_args()
    begin = time.time()
    configs = {f"{name}/{args.variant}": all_configs([name])[name] for name in args.configs}
    docs = list(DOCUMENTS)
    tokens = document_tokens(args.tokens, args.tokens_file, [d[0] for d in docs])
    model = Model()
    every_layer = frozenset(range(model.n_layers))
    result = {"configs": {n: {f: getattr(c, f) for f in c.__dataclass_fields__} for n, c in configs.items()},
              "variant": VARIANT_NOTES[args.variant],
              "seeds": args.seeds, "min_seq_len": MIN_SEQ_LEN, "sources": SOURCES, "tokens": args.tokens,
              "documents": {}}  # fmt: skip
    prefixes = {}
    for name, kind, held_out, first in docs:
        ce, prefixes[name], _ = model.run(tokens[name], frozenset(), None, keep=True)
        result["documents"][name] = {"kind": kind, "held_out": held_out, "first_token": first,
                                     "exact": {"cross_entropy": ce, "perplexity": float(np.exp(ce))}}  # fmt: skip
        print(f"{name}: exact ppl {np.exp(ce):.3f} ({time.time() - begin:.0f}s)", flush=True)
    for seed in args.seeds:
        for config_name, config in configs.items():
            fn = _jitted(config, args.variant)

            def attend(q, k, v, *, layer, fn=fn, seed=seed):
                return fn(q, k, v, jax.random.fold_in(jax.random.key(seed), layer))

            for name, *_ in docs:
                entry = result["documents"][name]
                ce, _, _ = model.run(tokens[name], every_layer, attend, prefix=prefixes[name])
                ratio = float(np.exp(ce - entry["exact"]["cross_entropy"]))
                entry[f"{config_name}/seed{seed}"] = {"cross_entropy": ce, "perplexity": float(np.exp(ce)),
                                                      "ratio_to_exact": ratio}  # fmt: skip
                print(f"{name} {config_name} seed{seed}: {ratio:.4f}x ({time.time() - begin:.0f}s)", flush=True)
                result["summary"] = kinds_summary(result["documents"], configs)
                write(Path(args.out) / OUTPUTS[args.variant], result)
    print(f"done in {time.time() - begin:.0f}s", flush=True)


if __name__ == "__main__":
    main()
