"""`HyperAttention`, a Flax linen self-attention layer: projections, GQA, causal, RoPE hook, KV-cache decoding.

Randomness: the LSH hyperplanes come from a per-layer key drawn once at init (variable collection "lsh", fixed for the
layer's lifetime); the residual samples come from the "hyper_attention" rng stream (`self.make_rng`), so they differ
per layer and step and are reproducible under a fixed key. Without that stream (evaluation) a fixed per-layer key is
used. Parameters are named like `flax.linen.MultiHeadDotProductAttention`'s (query, key, value, out), so with
`num_kv_heads == num_heads` the two share checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.nn.functional import (
    attend,
    check_attention_kind,
    decode_step_attention,
    eval_sample_key,
    layer_hash_key,
    write_cache,
)

LSH_COLLECTION = "lsh"
RNG_STREAM = "hyper_attention"


class HyperAttention(nn.Module):
    """Multi-head self-attention computed by HyperAttention (arXiv:2310.05869), for linen.

    Attributes:
      num_heads: query heads N.
      num_kv_heads: key/value heads K (GQA/MQA), N % K == 0; default N.
      head_dim: H; default features // num_heads.
      out_features: output width; default the input width.
      config: `HyperAttentionConfig`; sequences of at most `config.min_seq_len` tokens get exact attention.
      causal: causal self-attention (default True).
      attention: "hyper", or "exact" / "cudnn" for exact attention with the same parameters (baselines, A/B evals).
      implementation: HyperAttention backend, None for the fastest available.
      qk_transform: optional hook `(q, k, positions) -> (q, k)` applied after the projections, e.g. `rope_qk()`.
      decode: keep a KV cache ("cache" collection, Flax conventions). Init with the full length to size the cache;
        a call with T > 1 tokens is a prefill that starts a new sequence (HyperAttention over the prompt); a call with
        one token appends it and attends the filled cache exactly.
      use_bias, dtype, param_dtype, kernel_init: as in `flax.linen.DenseGeneral`.

    Call: `layer(x [B, T, D], positions=None [B, T] or [T], kv_length=None [B], sample_key=None)` ->
    `[B, T, out_features]`. `kv_length` marks right padding (for non-causal attention; causal attention needs no
    padding mask). `sample_key` overrides the rng stream for this call.

    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> layer = HyperAttention(num_heads=4, num_kv_heads=2, config=cfg)
    >>> x = jnp.ones((1, 512, 32))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x, rngs={"hyper_attention": jax.random.key(1)}).shape
    (1, 512, 32)
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    config: HyperAttentionConfig | None = None
    causal: bool = True
    attention: str = "hyper"
    implementation: str | None = None
    qk_transform: Callable | None = None
    decode: bool = False
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    def _dense(self, features, name, axis=-1):
        return nn.DenseGeneral(
            features,
            axis=axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name=name,
        )

    def _layer_key(self):
        if self.has_variable(LSH_COLLECTION, "hash_seed") or self.is_initializing():
            stored = self.variable(LSH_COLLECTION, "hash_seed", lambda: jax.random.key_data(self.make_rng("params")))
            return jax.random.wrap_key_data(stored.value)
        raise ValueError(
            f"{self.name}: the '{LSH_COLLECTION}' collection (each layer's fixed LSH key) is missing; apply with "
            f"every collection that init returned, e.g. model.apply({{'params': p, '{LSH_COLLECTION}': v['lsh']}}, x)"
        )

    @nn.compact
    def __call__(self, x, *, positions=None, kv_length=None, sample_key=None):
        check_attention_kind(self.attention)
        config = HyperAttentionConfig() if self.config is None else self.config
        batch, t, features = x.shape
        num_kv_heads = self.num_kv_heads or self.num_heads
        head_dim = self.head_dim or features // self.num_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        q = self._dense((self.num_heads, head_dim), "query")(x)
        k = self._dense((num_kv_heads, head_dim), "key")(x)
        v = self._dense((num_kv_heads, head_dim), "value")(x)

        layer_key = self._layer_key()
        if sample_key is None and self.has_rng(RNG_STREAM):
            sample_key = self.make_rng(RNG_STREAM)
        elif sample_key is None:
            sample_key = eval_sample_key(layer_key)

        decoding = self.decode and self.has_variable("cache", "cached_key")
        cached_key = cached_value = cache_index = None
        if self.decode:
            cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if decoding and t == 1:
            positions = jnp.full((batch, 1), cache_index.value)
        elif positions is None:
            positions = jnp.arange(t)
        if self.qk_transform is not None:
            q, k = self.qk_transform(q, k, positions)

        if decoding:
            start = cache_index.value if t == 1 else jnp.zeros((), jnp.int32)
            cached_key.value = write_cache(cached_key.value, k, start)
            cached_value.value = write_cache(cached_value.value, v, start)
            cache_index.value = start + t
        if decoding and t == 1:
            out = decode_step_attention(q, cached_key.value, cached_value.value, start)
        else:
            out = attend(
                q,
                k,
                v,
                attention=self.attention,
                config=config,
                causal=self.causal,
                key=sample_key,
                hash_key=layer_hash_key(layer_key),
                kv_length=kv_length,
                implementation=self.implementation,
            )
        return self._dense(self.out_features or features, "out", axis=(-2, -1))(out)
