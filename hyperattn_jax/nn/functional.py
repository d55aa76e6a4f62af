"""Framework-free pieces shared by the Flax layers: attention dispatch, RoPE, key derivation, KV-cache updates.

Nothing here imports Flax, so the linen and nnx modules (and the `attention_fn` adapter) compute exactly the same math.
Layout is the public one: q `[B, T, N, H]`, k, v `[B, S, K, H]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax.api import hyper_attention
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.reference import exact_attention

# "hyper": HyperAttention (exact below config.min_seq_len); "exact": the float32 reference oracle (any device);
# "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), the fastest exact baseline on NVIDIA GPUs.
ATTENTION_KINDS = ("hyper", "exact", "cudnn")

# Salts folded into a layer's key, so the hash key and the fallback sampling key never coincide.
_HASH_SALT = 0x4A5B
_EVAL_SAMPLE_SALT = 0x5C6D


def check_attention_kind(attention: str) -> None:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"{attention=} must be one of {', '.join(map(repr, ATTENTION_KINDS))}")


def layer_hash_key(layer_key):
    """The per-layer LSH key (fixed for the layer's lifetime) from the key drawn at init."""
    return jax.random.fold_in(layer_key, _HASH_SALT)


def eval_sample_key(layer_key):
    """Sampling key used when no rng stream is given (evaluation): fixed per layer, so eval is deterministic."""
    return jax.random.fold_in(layer_key, _EVAL_SAMPLE_SALT)


def attend(
    q,
    k,
    v,
    *,
    attention: str = "hyper",
    config: HyperAttentionConfig | None = None,
    causal: bool,
    key=None,
    hash_key=None,
    kv_length=None,
    implementation: str | None = None,
):
    """One attention call, by kind (see `ATTENTION_KINDS`); q `[B, T, N, H]`, k, v `[B, S, K, H]` -> `[B, T, N, H]`.

    `kv_length` int `[B]` marks right padding of the keys. With `causal`, right padding needs no mask for the real
    queries (query i < length only sees keys j <= i < length), so it is dropped; padded query rows are don't-care.
    """
    check_attention_kind(attention)
    if causal:
        kv_length = None
    if attention == "exact":
        return exact_attention(q, k, v, causal=causal, kv_length=kv_length)
    if attention == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=kv_length, implementation="cudnn"
        )
    return hyper_attention(
        q,
        k,
        v,
        key=key,
        hash_key=hash_key,
        config=config,
        causal=causal,
        kv_length=kv_length,
        implementation=implementation,
    )


def rope_frequencies(head_dim: int, theta: float = 10_000.0):
    """Rotary inverse frequencies `[H // 2]`, float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim=}")
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, theta: float = 10_000.0):
    """Rotary position embedding (rotate-half form) of x `[B, T, heads, H]` at int positions `[B, T]` or `[T]`.

    >>> x = jnp.ones((1, 3, 2, 4))
    >>> apply_rope(x, jnp.arange(3)).shape
    (1, 3, 2, 4)
    """
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
    angles = positions[..., None, None] * rope_frequencies(x.shape[-1], theta)  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def rope_qk(theta: float = 10_000.0):
    """A q/k hook `(q, k, positions) -> (q, k)` applying RoPE with base `theta`, for the layers' `qk_transform`."""

    def transform(q, k, positions):
        return apply_rope(q, positions, theta), apply_rope(k, positions, theta)

    return transform


def write_cache(cached, new, index):
    """Write new keys or values `[B, T, K, H]` into the cache `[B, L, K, H]` at position `index` (int scalar)."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (zero, index.astype(jnp.int32), zero, zero))


def decode_step_attention(q, cached_k, cached_v, index):
    """Exact attention of one new query `[B, 1, N, H]` over the cache filled up to and including `index`.

    A single query costs O(L) exactly, so decode steps never approximate: they read what prefill and earlier steps
    wrote, masked to the `index + 1` filled slots.
    """
    batch = q.shape[0]
    filled = jnp.full((batch,), index + 1, jnp.int32)
    return exact_attention(q, cached_k.astype(q.dtype), cached_v.astype(q.dtype), kv_length=filled)
