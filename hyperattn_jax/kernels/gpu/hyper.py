"""HyperAttention on the fused Pallas Triton kernels, grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`).

The plan (LSH hash, int32 packed-key sort, samples) and the tiles come from `ops`, unchanged, so any tile kind the
jnp path has (sorted blocks, sampled residual, global keys) runs here too; only the attention over the tiles is the
fused kernel instead of `ops.tiled_attention`.
"""

from __future__ import annotations

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu.flash import flash_attention
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig, fused_tiled_attention
from hyperattn_jax.ops.causal import grouped_causal_attention, noncausal_is_exact
from hyperattn_jax.ops.sortlsh import block_query_layout, hyper_attention_tiles, make_plan, unblock_query_layout
from hyperattn_jax.reference import grouped_exact_attention


def grouped_hyper_attention_pallas(
    q,
    k,
    v,
    *,
    key,
    config: HyperAttentionConfig,
    scale: float,
    kv_length=None,
    tuning: TiledKernelConfig | None = None,
    interpret: bool | None = None,
    **plan_options,
):
    """Non-causal HyperAttention with the fused kernel; same estimator (and same plan for the same key) as
    `ops.grouped_hyper_attention`.

    Returns out `[B, K, G, T, H]` in q's dtype and lse `[B, K, G, T]` float32.
    """
    plan = make_plan(q, k, key=key, config=config, kv_length=kv_length, **plan_options)
    tiles = hyper_attention_tiles(k, v, plan)
    out, lse = fused_tiled_attention(
        block_query_layout(q, plan), tiles, scale=scale, tuning=tuning, interpret=interpret
    )
    t = q.shape[3]
    out = unblock_query_layout(out, plan, t)
    lse = unblock_query_layout(lse[..., None], plan, t)[..., 0]
    return out, lse


def grouped_attention_pallas(q, k, v, key, kv_length, hash_key, *, config: HyperAttentionConfig, causal, scale):
    """The `implementation="pallas_triton"` body of `hyper_attention`, grouped layout: the paper's dispatch (exact below
    `min_seq_len`, causal recursion above it) with the fused kernels in place of the jnp ones. Same plan and random
    draws as the xla path for the same key, so the two agree up to rounding.
    """

    def noncausal(q, k, v, *, key, kv_length=None, config=config):  # the causal recursion may pass its own config
        if noncausal_is_exact(k.shape[2], config):
            if kv_length is not None:
                return grouped_exact_attention(q, k, v, scale=scale, kv_length=kv_length)
            return flash_attention(q, k, v, scale=scale)
        return grouped_hyper_attention_pallas(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key
        )

    if causal:

        def exact_causal(q, k, v):
            return flash_attention(q, k, v, scale=scale, causal=True)

        return grouped_causal_attention(
            q, k, v, key=key, config=config, scale=scale, noncausal_fn=noncausal, exact_fn=exact_causal
        )
    return noncausal(q, k, v, key=key, kv_length=kv_length)
