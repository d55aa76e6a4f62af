"""`make_attention_fn`: HyperAttention as a drop-in `attention_fn` for Flax's own multi-head attention modules.

`flax.linen.MultiHeadDotProductAttention` passes only the keyword names the function's signature declares;
`flax.nnx.MultiHeadAttention` always passes mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype,
precision, module and is_causal (and input_positions when given). The adapter declares all of them.

Exact calls (`config.attends_exactly(S)`, and single-query decode steps) are Flax's own `dot_product_attention`,
so every mask, bias and dropout Flax accepts works there and gives Flax's result. Above `min_seq_len` a mask is read
as causal and/or right padding (the patterns HyperAttention expresses) when it is a concrete array; see
`make_attention_fn` for traced masks.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.dot_product import (
    SUPPORTED_ABOVE_MIN_SEQ_LEN,
    InexpressibleMaskError,
    MaskPattern,
    approximate_attention,
    concrete_or_none,
    key_from_inputs,
    read_mask,
)
from hyperattn_jax.nn.functional import check_attention_kind, layer_hash_key

TRACED_MASK_MODES = ("raise", "check_on_device")


def _check_flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be a Python bool (it picks the algorithm at trace time), got {value!r}")


def _raise_if_inexpressible(bad, mask_shape):
    if bad:
        raise InexpressibleMaskError(
            f"the traced attention mask of shape {mask_shape} is not right key padding (plus causal when declared), "
            "which HyperAttention cannot express; pass causal=True / is_causal=True with a key padding mask "
            "(flax.linen.make_attention_mask(q_valid, kv_valid) with valid prefixes), or use exact attention"
        )


def mask_to_kv_length(mask, batch: int, t: int, s: int, *, causal: bool):
    """Read a boolean mask `[B, 1 or heads, 1 or T, S]` as right key padding: returns kv_length int `[B]` and `bad`.

    Works on traced masks. `bad` (a bool scalar) is True when the mask differs from `(j < kv_length) & (j <= i if
    causal)` on a row that matters: all-False rows (padded queries) are ignored, and with `causal` so are rows
    i >= kv_length.
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


def _traced_mask_error(mask_shape, config: HyperAttentionConfig, s: int) -> InexpressibleMaskError:
    return InexpressibleMaskError(
        f"the attention mask of shape {mask_shape} is traced (built inside jit), so its pattern cannot be read before "
        f"it runs, and above config.min_seq_len={config.min_seq_len} keys (S={s}) HyperAttention expresses only "
        "causal attention and right key padding. For a causal mask, declare it and drop the mask: "
        "make_attention_fn(cfg, causal=True) (linen) or is_causal=True (nnx); causal attention needs no padding "
        "mask for the real queries. Otherwise build the mask outside jit (a concrete mask is read at once), or "
        "make_attention_fn(..., traced_mask='check_on_device') to read it as right key padding (plus causal when "
        "declared) and check it on the device when the computation runs"
    )


def _flax_attention(query, key, value, bias, mask, *, causal: bool, linen_caller: bool, **flax_kwargs):
    """Flax's own exact attention: linen's `dot_product_attention` when linen calls, nnx's otherwise."""
    if not linen_caller:
        return nnx.dot_product_attention(query, key, value, bias, mask, is_causal=causal, **flax_kwargs)
    if causal:
        causal_mask = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
        mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
    return nn.dot_product_attention(query, key, value, bias, mask, **flax_kwargs)


def make_attention_fn(
    config: HyperAttentionConfig | None = None,
    *,
    causal: bool = False,
    seed: int = 0,
    attention: str = "hyper",
    implementation: str | None = None,
    traced_mask: str = "raise",
):
    """HyperAttention as the `attention_fn` of `flax.linen.MultiHeadDotProductAttention` or `nnx.MultiHeadAttention`.

    Args:
      config: `HyperAttentionConfig`; calls with `config.attends_exactly(S)` keys are Flax's own exact attention
        (any mask, bias or dropout).
      causal: treat attention as causal (linen has no `is_causal`; nnx's `is_causal=True` also turns it on). Default
        False, like Flax's modules; a concrete causal mask (`make_causal_mask`) is recognised without it.
      seed: seeds the LSH hyperplanes (fixed) and the per-call sampling keys, which are hashed from the activations,
        so outputs are deterministic for given inputs yet differ between layers and steps.
      attention: "hyper" (default), or "exact" / "cudnn" to swap in exact attention with the same call.
      implementation: HyperAttention backend (None: the fastest available).
      traced_mask: what to do, above `min_seq_len`, with a mask that is traced (built inside jit) and so cannot be
        read at trace time: "raise" (default) a ValueError saying what to pass instead, or "check_on_device": read
        it as right key padding (plus causal when declared) and check it when the computation runs (an
        inexpressible mask then fails at run time, as a `JaxRuntimeError`).

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
    causal = _check_flag(causal, "causal")
    if traced_mask not in TRACED_MASK_MODES:
        raise ValueError(f"{traced_mask=} must be one of {', '.join(map(repr, TRACED_MASK_MODES))}")
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
        force_fp32_for_softmax=None,  # only linen passes it (when declared): it tells a linen caller
        **unused,
    ):
        del unused
        *batch_dims, t, num_heads, head_dim = query.shape
        s = key.shape[-3]
        wants_causal = causal or _check_flag(is_causal, "is_causal")
        # One query (a decode step, whose mask marks the filled cache slots) is cheap exactly: never approximate it,
        # and never apply a causal tril to it (it would keep only the first cached key).
        step = t == 1 and s > 1
        causal_here = wants_causal and not step
        if attention == "exact" or (attention == "hyper" and (step or config.attends_exactly(s))):
            linen_caller = force_fp32_for_softmax is not None or isinstance(module, nn.Module)
            extra = {"force_fp32_for_softmax": bool(force_fp32_for_softmax)} if linen_caller else {}
            return _flax_attention(
                query,
                key,
                value,
                bias,
                mask,
                causal=causal_here,
                linen_caller=linen_caller,
                broadcast_dropout=broadcast_dropout,
                dropout_rng=dropout_rng,
                dropout_rate=dropout_rate,
                deterministic=deterministic,
                dtype=dtype,
                precision=precision,
                module=module,
                **extra,
            )
        above = f"above config.min_seq_len={config.min_seq_len} keys (S={s})"
        if bias is not None:
            raise ValueError(
                f"HyperAttention cannot add an attention bias {above}; got bias of shape {jnp.shape(bias)}. "
                f"Supported there: {SUPPORTED_ABOVE_MIN_SEQ_LEN}"
            )
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(
                f"{dropout_rate=}: HyperAttention has no attention-probability dropout {above}; set "
                "dropout_rate=0.0 (or deterministic=True) and put dropout on the residual stream instead"
            )
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        batch = math.prod(batch_dims)
        q = query.reshape(batch, t, num_heads, head_dim)
        k = key.reshape(batch, s, *key.shape[-2:])
        v = value.reshape(batch, s, *value.shape[-2:])
        if causal_here and t != s:
            raise ValueError(f"causal attention needs equal query and key lengths, got T={t} S={s}")
        flat_mask = None
        if mask is not None:
            mask = jnp.asarray(mask)
            mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)  # at least [heads, T, S]
            flat_mask = jnp.broadcast_to(mask, (*batch_dims, *mask.shape[-3:])).reshape(batch, *mask.shape[-3:])
        if attention == "cudnn":
            flat_mask = None if flat_mask is None else flat_mask.astype(bool)
            out = jax.nn.dot_product_attention(q, k, v, mask=flat_mask, is_causal=causal_here, implementation="cudnn")
            return out.reshape(*batch_dims, t, num_heads, head_dim)
        pattern, lengths = MaskPattern(causal=causal_here, kv_length=None, empty_rows=None), None
        if flat_mask is not None:
            concrete = concrete_or_none(flat_mask)
            if concrete is not None:
                pattern = read_mask(concrete, batch=batch, t=t, s=s, is_causal=causal_here)
            elif traced_mask == "raise":
                raise _traced_mask_error(mask.shape, config, s)
            else:
                lengths, bad = mask_to_kv_length(flat_mask, batch, t, s, causal=causal_here)
                jax.debug.callback(functools.partial(_raise_if_inexpressible, mask_shape=mask.shape), bad)
        out = approximate_attention(
            q,
            k,
            v,
            pattern=pattern,
            config=config,
            rng=key_from_inputs(q, k, seed),
            hash_key=hash_key,
            key_value_seq_lengths=lengths,
            implementation=implementation,
        )
        return out.reshape(*batch_dims, t, num_heads, head_dim)

    return attention_fn


__all__ = ["TRACED_MASK_MODES", "make_attention_fn", "mask_to_kv_length"]
