"""`HyperAttention`, a Flax nnx self-attention layer: projections, GQA, causal, RoPE hook, KV-cache decoding.

Randomness: the LSH hyperplanes come from a per-layer key drawn at construction (an `LSHKey` variable, never trained:
optimizers built with `wrt=nnx.Param` skip it); the residual samples come from the layer's own rng stream (forked from
`rngs.hyper_attention`, falling back to `rngs.params` when that stream is absent), so they differ per layer and call
and are reproducible under fixed seeds. With `deterministic=True` (e.g. after `model.eval()`) a fixed per-layer key
is used instead, so evaluation is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.nn.functional import (
    attend,
    check_attention_kind,
    decode_step_attention,
    eval_sample_key,
    layer_hash_key,
    write_cache,
)

RNG_STREAM = "hyper_attention"
DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()


class LSHKey(nnx.Variable):
    """A layer's fixed LSH key (raw uint32 key data); not a trainable parameter."""


def _stream_seed(rngs: nnx.Rngs):
    try:
        return getattr(rngs, RNG_STREAM)()
    except AttributeError:  # no such stream and no default stream
        return rngs.params()


class HyperAttention(nnx.Module):
    """Multi-head self-attention computed by HyperAttention (arXiv:2310.05869), for nnx.

    Args:
      in_features: input width D.
      num_heads: query heads N.
      num_kv_heads: key/value heads K (GQA/MQA), N % K == 0; default N.
      head_dim: H; default in_features // num_heads.
      out_features: output width; default in_features.
      config: `HyperAttentionConfig`; sequences of at most `config.min_seq_len` tokens get exact attention.
      causal: causal self-attention (default True).
      attention: "hyper", or "exact" / "cudnn" for exact attention with the same parameters.
      implementation: HyperAttention backend, None for the fastest available.
      qk_transform: optional hook `(q, k, positions) -> (q, k)` applied after the projections, e.g. `rope_qk()`.
      decode: use the KV cache made by `init_cache`: a call with T > 1 tokens is a prefill that starts a new sequence
        (HyperAttention over the prompt); a call with one token appends it and attends the filled cache exactly.
      deterministic: use a fixed per-layer sampling key instead of the rng stream (evaluation).
      rngs: `nnx.Rngs`; "params" initialises weights and the LSH key, "hyper_attention" seeds the sampling stream.

    Call: `layer(x [B, T, D], positions=None, kv_length=None, deterministic=None, sample_key=None)` ->
    `[B, T, out_features]`; `sample_key` overrides the layer's rng stream for this call.

    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> layer = HyperAttention(32, num_heads=4, num_kv_heads=2, config=cfg, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 512, 32))).shape
    (1, 512, 32)
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        config: HyperAttentionConfig | None = None,
        causal: bool = True,
        attention: str = "hyper",
        implementation: str | None = None,
        qk_transform: Callable | None = None,
        decode: bool = False,
        deterministic: bool = False,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable = DEFAULT_KERNEL_INIT,
        rngs: nnx.Rngs,
    ):
        check_attention_kind(attention)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads=} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or in_features // num_heads
        self.config = HyperAttentionConfig() if config is None else config
        self.causal = causal
        self.attention = attention
        self.implementation = implementation
        self.qk_transform = qk_transform
        self.decode = decode
        self.deterministic = deterministic
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.query = nnx.LinearGeneral(in_features, (num_heads, self.head_dim), **dense)
        self.key = nnx.LinearGeneral(in_features, (self.num_kv_heads, self.head_dim), **dense)
        self.value = nnx.LinearGeneral(in_features, (self.num_kv_heads, self.head_dim), **dense)
        self.out = nnx.LinearGeneral((num_heads, self.head_dim), out_features or in_features, axis=(-2, -1), **dense)
        self.lsh_key = LSHKey(jax.random.key_data(rngs.params()))
        self.sample_rngs = nnx.Rngs(**{RNG_STREAM: _stream_seed(rngs)})

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
        """Allocate the KV cache `[batch_size, max_length, K, H]` and reset its index (Flax's `nnx.Cache` variables)."""
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, x, *, positions=None, kv_length=None, deterministic: bool | None = None, sample_key=None):
        batch, t, _ = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        layer_key = jax.random.wrap_key_data(self.lsh_key[...])
        deterministic = self.deterministic if deterministic is None else deterministic
        if sample_key is None:
            sample_key = eval_sample_key(layer_key) if deterministic else getattr(self.sample_rngs, RNG_STREAM)()

        if self.decode and not hasattr(self, "cache_index"):
            raise ValueError("decode=True needs a KV cache: call layer.init_cache(batch_size, max_length) first")
        stepping = self.decode and t == 1
        if stepping:
            positions = jnp.full((batch, 1), self.cache_index[...])
        elif positions is None:
            positions = jnp.arange(t)
        if self.qk_transform is not None:
            q, k = self.qk_transform(q, k, positions)

        if self.decode:
            start = self.cache_index[...] if stepping else jnp.zeros((), jnp.int32)
            self.cached_key[...] = write_cache(self.cached_key[...], k, start)
            self.cached_value[...] = write_cache(self.cached_value[...], v, start)
            self.cache_index[...] = start + t
        if stepping:
            out = decode_step_attention(q, self.cached_key[...], self.cached_value[...], start)
        else:
            out = attend(
                q,
                k,
                v,
                attention=self.attention,
                config=self.config,
                causal=self.causal,
                key=sample_key,
                hash_key=layer_hash_key(layer_key),
                kv_length=kv_length,
                implementation=self.implementation,
            )
        return self.out(out)
