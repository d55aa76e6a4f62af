"""The `implementation="pallas_triton"` body of `hyper_attention`: the paper's dispatch on the fused kernels."""

from __future__ import annotations

from hyperattn_jax._layout import group_queries, heads_major, ungroup_output
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu._common import default_interpret
from hyperattn_jax.kernels.gpu.causal import causal_hyper_attention_pallas
from hyperattn_jax.kernels.gpu.flash import flash_attention
from hyperattn_jax.kernels.gpu.hyper import grouped_inputs, hyper_attention_pallas
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig
from hyperattn_jax.ops.causal import grouped_causal_attention, noncausal_is_exact
from hyperattn_jax.reference import grouped_exact_attention


def attention_pallas(q, k, v, key, kv_length, hash_key, *, config: HyperAttentionConfig, causal, scale):
    """Public layout in (q `[B, T, N, H]`, k, v `[B, S, K, H]`): exact below `min_seq_len`, the causal recursion above
    it, with the fused kernels in place of the jnp ones. Same plan and random draws as the xla path for the same key,
    so the two agree up to rounding. Returns out `[B, T, N, H]` and lse `[B, K, G, T]` float32.
    """
    tuning, interpret = TiledKernelConfig(), default_interpret()
    if not causal and not noncausal_is_exact(k.shape[1], config):
        return hyper_attention_pallas(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key, tuning=tuning
        )
    if causal:
        fused = causal_hyper_attention_pallas(
            q, k, v, key=key, config=config, scale=scale, tuning=tuning, interpret=interpret, hash_key=hash_key
        )
        if fused is not None:
            return fused

    # Everything else runs on the grouped layout: exact attention, and the ops recursion for shapes the fused causal
    # function does not take (sinks, windows, odd lengths), with the kernels for its parts.
    def noncausal(q, k, v, *, key, kv_length=None, config=config):  # the ops recursion may pass its own config
        if noncausal_is_exact(k.shape[2], config):
            if kv_length is not None:
                return grouped_exact_attention(q, k, v, scale=scale, kv_length=kv_length)
            return flash_attention(q, k, v, scale=scale)
        out, lse = hyper_attention_pallas(
            ungroup_output(q),
            heads_major(k),  # [B, K, S, H] -> [B, S, K, H] (the transpose is its own inverse)
            heads_major(v),
            key=key,
            config=config,
            scale=scale,
            kv_length=kv_length,
            hash_key=hash_key,
            tuning=tuning,
        )
        return group_queries(out, k.shape[1]), lse

    def exact_causal(q, k, v):
        return flash_attention(q, k, v, scale=scale, causal=True)

    q5, k4, v4 = grouped_inputs(q, k, v)
    if causal:
        out, lse = grouped_causal_attention(
            q5, k4, v4, key=key, config=config, scale=scale, noncausal_fn=noncausal, exact_fn=exact_causal
        )
    else:
        out, lse = noncausal(q5, k4, v4, key=key, kv_length=kv_length)
    return ungroup_output(out), lse
