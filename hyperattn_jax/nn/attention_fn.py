"""`make_attention_fn`: HyperAttention as a drop-in `attention_fn` for Flax's own multi-head attention modules.

`flax.linen.MultiHeadDotProductAttention` passes only the keyword names the function's signature declares;
`flax.nnx.MultiHeadAttention` always passes mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype,
precision, module and is_causal (and input_positions when given). The adapter declares all of them.

Masks: a mask is read as "causal (if requested) plus right padding of the keys", the two patterns HyperAttention
expresses. Any other mask (holes, left padding, block patterns) raises a ValueError: immediately when the mask is a
concrete array, otherwise when the jitted computation runs (a host callback checks it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.nn.functional import attend, check_attention_kind, layer_hash_key


def _content_key(seed: int, q, k):
    """A sampling key seeded by the activations: new every step and layer, identical for identical inputs.

    The adapter has no rng stream (Flax calls it as a plain function), so it hashes bits of q and k instead. Integer
    sums wrap around and do not depend on reduction order, so the key is bit-reproducible on every backend.
    """

    def bits(x):
        first_feature = jax.lax.stop_gradient(x[..., 0]).astype(jnp.float32)
        return jnp.sum(jax.lax.bitcast_convert_type(first_feature, jnp.uint32), dtype=jnp.uint32)

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), bits(q)), bits(k))


def _raise_if_inexpressible(bad, mask_shape):
    if bad:
        raise ValueError(
            f"the attention mask of shape {mask_shape} is neither causal nor right key padding (or their combination), "
            "which HyperAttention cannot express; pass causal=True / is_causal=True with a key padding mask "
            "(flax.linen.make_attention_mask(q_valid, kv_valid) with valid prefixes), or use exact attention"
        )


def mask_to_kv_length(mask, batch: int, t: int, s: int, *, causal: bool):
    """Read a boolean mask `[B, 1 or heads, 1 or T, S]` as right key padding: returns kv_length int `[B]` and `bad`.

    `bad` (a bool scalar) is True when the mask differs from `(j < kv_length) & (j <= i if causal)` on a row that
    matters: all-False rows (padded queries) are ignored, and with `causal` so are rows i >= kv_length.
    """
    mask = jnp.broadcast_to(mask, (batch, *mask.shape[1:-1], s)).astype(bool)
    kv_length = jnp.max(jnp.sum(mask, axis=-1), axis=(1, 2)).astype(jnp.int32)  # [B]
    key_pos = jnp.arange(s)
    query_pos = jnp.arange(mask.shape[2])[:, None]
    expected = key_pos < kv_length[:, None, None, None]
    checked_rows = jnp.any(mask, axis=-1, keepdims=True)
    if causal:
        expected = expected & (key_pos <= query_pos)
        checked_rows = checked_rows & (query_pos < kv_length[:, None, None, None])
    bad = jnp.any(checked_rows & (mask != expected))
    return kv_length, bad


def make_attention_fn(
    config: HyperAttentionConfig | None = None,
    *,
    causal: bool = False,
    seed: int = 0,
    attention: str = "hyper",
    implementation: str | None = None,
):
    """HyperAttention as the `attention_fn` of `flax.linen.MultiHeadDotProductAttention` or `nnx.MultiHeadAttention`.

    Args:
      config: `HyperAttentionConfig`; inputs with at most `config.min_seq_len` keys get exact attention.
      causal: treat attention as causal (linen has no `is_causal`; nnx's `is_causal=True` also turns it on).
      seed: seeds the LSH hyperplanes (fixed) and the per-call sampling keys, which are hashed from the activations,
        so outputs are deterministic for given inputs yet differ between layers and steps.
      attention: "hyper" (default), or "exact" / "cudnn" to swap in exact attention with the same call.
      implementation: HyperAttention backend (None: the fastest available).

    Returns:
      `attention_fn(query, key, value, ...)`: query `[batch..., T, N, H]`, key, value `[batch..., S, K, H]` ->
      `[batch..., T, N, H]`.

    >>> import flax.linen as nn
    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(cfg, causal=True))
    >>> x = jnp.ones((1, 256, 16))
    >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
    (1, 256, 16)
    """
    config = HyperAttentionConfig() if config is None else config
    check_attention_kind(attention)
    hash_key = layer_hash_key(jax.random.key(seed))

    def attention_fn(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout=True,
        dropout_rng=None,
        dropout_rate=0.0,
        deterministic=True,
        dtype=None,
        precision=None,
        module=None,
        is_causal=False,
        **unused,
    ):
        del broadcast_dropout, dropout_rng, precision, module, unused  # precision: accumulation is float32 anyway
        if bias is not None:
            raise ValueError(f"HyperAttention cannot add an attention bias; got bias of shape {jnp.shape(bias)}")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(
                f"{dropout_rate=}: HyperAttention has no attention-probability dropout; set dropout_rate=0.0 "
                "(or deterministic=True) and put dropout on the residual stream instead"
            )
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        *batch_dims, t, num_heads, head_dim = query.shape
        s = key.shape[-3]
        batch = math.prod(batch_dims)
        q = query.reshape(batch, t, num_heads, head_dim)
        k = key.reshape(batch, s, *key.shape[-2:])
        v = value.reshape(batch, s, *value.shape[-2:])
        wants_causal = bool(causal or is_causal)
        if wants_causal and t != s and t != 1:
            raise ValueError(f"causal attention needs equal query and key lengths, got T={t} S={s}")
        # One query (a decode step, whose mask marks the filled cache slots) is cheap exactly: never approximate it.
        step = t == 1 and s > 1
        causal_here = wants_causal and not step
        kv_length = None
        if mask is not None:
            mask = jnp.asarray(mask)
            mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)  # at least [heads, T, S]
            flat_mask = jnp.broadcast_to(mask, (*batch_dims, *mask.shape[-3:])).reshape(batch, *mask.shape[-3:])
            kv_length, bad = mask_to_kv_length(flat_mask, batch, t, s, causal=causal_here)
            try:
                concrete_bad = bool(bad)
            except jax.errors.ConcretizationTypeError:  # traced (under jit): check when the computation runs
                jax.debug.callback(functools.partial(_raise_if_inexpressible, mask_shape=mask.shape), bad)
            else:
                _raise_if_inexpressible(concrete_bad, mask.shape)
        out = attend(
            q,
            k,
            v,
            attention="exact" if step and attention == "hyper" else attention,
            config=config,
            causal=causal_here,
            key=_content_key(seed, q, k),
            hash_key=hash_key,
            kv_length=kv_length,
            implementation=implementation,
        )
        return out.reshape(*batch_dims, t, num_heads, head_dim)

    return attention_fn
