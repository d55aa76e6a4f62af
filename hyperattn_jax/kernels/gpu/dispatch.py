"""The `implementation="pallas_triton"` body of `hyper_attention`: the paper's dispatch on the fused kernels."""

from __future__ import annotations

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.gpu._common import default_interpret
from hyperattn_jax.kernels.gpu.causal import grouped_causal_hyper_attention_pallas
from hyperattn_jax.kernels.gpu.flash import flash_attention
from hyperattn_jax.kernels.gpu.hyper import grouped_hyper_attention_pallas
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig
from hyperattn_jax.ops.causal import grouped_causal_attention, noncausal_is_exact
from hyperattn_jax.reference import grouped_exact_attention


def grouped_attention_pallas(q, k, v, key, kv_length, hash_key, *, config: HyperAttentionConfig, causal, scale):
    """Grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`): exact below `min_seq_len`, the causal recursion
    above it, with the fused kernels in place of the jnp ones. Same plan and random draws as the xla path for the same
    key, so the two agree up to rounding. Returns out and lse `[B, K, G, T]`.
    """
    tuning, interpret = TiledKernelConfig(), default_interpret()

    def noncausal(q, k, v, *, key, kv_length=None, config=config):  # the ops recursion may pass its own config
        if noncausal_is_exact(k.shape[2], config):
            if kv_length is not None:
                return grouped_exact_attention(q, k, v, scale=scale, kv_length=kv_length)
            return flash_attention(q, k, v, scale=scale)
        return grouped_hyper_attention_pallas(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key, tuning=tuning
        )

    if not causal:
        return noncausal(q, k, v, key=key, kv_length=kv_length)
    fused = grouped_causal_hyper_attention_pallas(
        q, k, v, key=key, config=config, scale=scale, tuning=tuning, interpret=interpret, hash_key=hash_key
    )
    if fused is not None:
        return fused

    def exact_causal(q, k, v):
        return flash_attention(q, k, v, scale=scale, causal=True)

    return grouped_causal_attention(
        q, k, v, key=key, config=config, scale=scale, noncausal_fn=noncausal, exact_fn=exact_causal
    )
