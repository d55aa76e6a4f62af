"""`dot_product_attention`: HyperAttention behind the signature of `jax.nn.dot_product_attention`.

Swapping `jax.nn.dot_product_attention` for `hyperattn_jax.dot_product_attention` is the whole change: same argument
names, layout `[B, T, N, H]` (or unbatched `[T, N, H]`), GQA, output dtype. Calls over at most `config.min_seq_len`
keys (`config.attends_exactly(S)`) ARE `jax.nn.dot_product_attention`, so every bias and mask it accepts works there.
Above that, HyperAttention expresses causal attention and right padding of keys and queries; a mask is read as one of
those patterns when it is a concrete array, and anything else is a ValueError that says what is supported.

This module imports no Flax; `hyperattn_jax.nn` reuses its mask reading and its input-derived key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax.api import hyper_attention
from hyperattn_jax.config import HyperAttentionConfig

_EXACT_ONLY_IMPLEMENTATIONS = ("cudnn",)  # jax.nn's own; valid only where attention is exact

SUPPORTED_ABOVE_MIN_SEQ_LEN = (
    "is_causal, key_value_seq_lengths, query_seq_lengths, and a concrete boolean mask that is causal and/or right "
    "padding of keys and queries"
)


def key_from_inputs(query, key, seed: int = 0):
    """A PRNG key derived from the inputs: identical for identical inputs, new for new ones (each layer, each step).

    `fold_in(fold_in(jax.random.key(seed), bits(query)), bits(key))`, where `bits(x)` is the wrapping uint32 sum of
    the float32 bit patterns of `x[..., 0]` (first feature of every token and head). Integer sums do not depend on
    reduction order, so the key is bit-reproducible on every backend, under jit or not.

    >>> x = jnp.ones((1, 4, 2, 8))
    >>> bool(jnp.all(jax.random.key_data(key_from_inputs(x, x)) == jax.random.key_data(key_from_inputs(x, x))))
    True
    """

    def bits(x):
        first_feature = jax.lax.stop_gradient(x[..., 0]).astype(jnp.float32)
        return jnp.sum(jax.lax.bitcast_convert_type(first_feature, jnp.uint32), dtype=jnp.uint32)

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), bits(query)), bits(key))


class InexpressibleMaskError(ValueError):
    """A mask that HyperAttention cannot express above `min_seq_len` (holes, left padding, a traced mask, ...)."""


@dataclasses.dataclass(frozen=True)
class MaskPattern:
    """What a boolean mask `[B|1, N|1, T|1, S]` means in HyperAttention's terms.

    causal: the mask is causal (j <= i) on every row that attends anything.
    kv_length: int32 `[B]` right key padding (non-causal patterns), None when every key is attended.
    empty_rows: bool `[B, N|1, T]`, rows that attend no key (padded queries), None when there are none. `jax.nn`
      gives such a row the mean of all values (a softmax over equal logits), and so do we.
    """

    causal: bool
    kv_length: np.ndarray | None
    empty_rows: np.ndarray | None


def concrete_or_none(x):
    """`x` as a numpy array when it is concrete, None when it is traced (inside jit, grad or vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def read_mask(mask, *, batch: int, t: int, s: int, is_causal: bool) -> MaskPattern:
    """Read a CONCRETE boolean mask broadcastable to `[B, N, T, S]` (True = attend) as causal and/or right padding.

    With `is_causal` the mask is first intersected with the causal mask, as `jax.nn` does. Every row must be a prefix
    of the keys (or empty); all non-empty rows of a batch element then either have the same length L (right key
    padding, non-causal) or length min(i + 1, L) (causal, with T == S). Raises `InexpressibleMaskError` otherwise.
    """
    m = np.asarray(mask).astype(bool)
    shape = m.shape
    if m.ndim > 4 or m.shape[-1] != s:
        raise InexpressibleMaskError(f"mask of shape {shape} must broadcast to [B, N, T, S] with S={s}")
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if is_causal:
        if t != s:
            raise ValueError(f"is_causal needs equal query and key lengths above min_seq_len, got T={t} S={s}")
        m = m & np.tril(np.ones((t, s), bool))
    counts = m.sum(axis=-1)  # [B|1, N|1, T|1]
    is_prefix = np.all(m == (np.arange(s) < counts[..., None]), axis=-1)
    lengths = counts.max(axis=(1, 2))  # [B|1]: the longest row of each batch element
    attending = counts > 0
    row_length = lengths[:, None, None]
    as_padding = np.all(is_prefix) and np.all(~attending | (counts == row_length))
    query_pos = np.arange(m.shape[2])[None, None, :]
    as_causal = (
        np.all(is_prefix)
        and t == s
        and m.shape[2] == t
        and np.all(~attending | (counts == np.minimum(query_pos + 1, row_length)))
    )
    if not (as_padding or as_causal):
        raise InexpressibleMaskError(
            f"the mask of shape {shape} is neither causal nor right padding (nor both), which HyperAttention cannot "
            f"express above min_seq_len; supported there: {SUPPORTED_ABOVE_MIN_SEQ_LEN}. Raise config.min_seq_len "
            f"to at least S={s} to apply any mask exactly"
        )
    lengths = np.broadcast_to(lengths, (batch,)).astype(np.int32)
    kv_length = None if not as_padding or np.all(lengths == s) else lengths
    empty = ~np.broadcast_to(attending, (batch, attending.shape[1], t))
    return MaskPattern(causal=not bool(as_padding), kv_length=kv_length, empty_rows=empty if empty.any() else None)


def _check_is_causal(is_causal) -> bool:
    if isinstance(is_causal, (bool, np.bool_)):
        return bool(is_causal)
    raise ValueError(
        f"is_causal must be a Python bool (it decides the algorithm when the call is traced), got {is_causal!r}"
    )


def _mean_values_per_head(value, num_heads: int):
    """The output of a row that attends no key: the mean of all values, per query head `[B, 1, N, H]`."""
    mean = jnp.mean(value.astype(jnp.float32), axis=1)  # [B, K, H]
    return jnp.repeat(mean, num_heads // value.shape[2], axis=1)[:, None]


def approximate_attention(
    query,
    key,
    value,
    *,
    pattern: MaskPattern,
    config: HyperAttentionConfig,
    rng,
    hash_key=None,
    scale=None,
    key_value_seq_lengths=None,
    implementation=None,
    return_lse: bool = False,
):
    """HyperAttention of q `[B, T, N, H]`, k, v `[B, S, K, H]` under a mask `pattern` (plus traced lengths `[B]`).

    Rows that attend no key get the mean of all values, as in `jax.nn`. With causal attention, right key padding is
    not applied: it changes no real query i < L; padded query rows i >= L are unspecified.
    """
    kv_length = None if pattern.kv_length is None else jnp.asarray(pattern.kv_length)
    empty = None if pattern.empty_rows is None else jnp.swapaxes(jnp.asarray(pattern.empty_rows), 1, 2)  # [B,T,N|1]
    if key_value_seq_lengths is not None:
        lengths = jnp.asarray(key_value_seq_lengths).astype(jnp.int32)
        no_keys = (lengths == 0)[:, None, None]
        empty = no_keys if empty is None else empty | no_keys
        if not pattern.causal:
            kv_length = lengths if kv_length is None else jnp.minimum(kv_length, lengths)
    result = hyper_attention(
        query,
        key,
        value,
        key=rng,
        hash_key=hash_key,
        config=config,
        causal=pattern.causal,
        scale=scale,
        kv_length=kv_length,
        implementation=implementation,
        return_lse=return_lse,
    )
    out, lse = result if return_lse else (result, None)
    if empty is not None:
        mean = _mean_values_per_head(value, query.shape[2]).astype(out.dtype)
        out = jnp.where(empty[..., None], mean, out)
    return (out, lse) if return_lse else out


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    implementation: str | None = None,
    return_residual: bool = False,
    config: HyperAttentionConfig | None = None,
    rng=None,
):
    """`jax.nn.dot_product_attention` computed by HyperAttention above `config.min_seq_len` keys.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key, value: `[B, S, K, H]` (or `[S, K, H]`), N % K == 0 (GQA/MQA).
      bias: additive logits bias broadcastable to `[B, N, T, S]`; exact calls only (`config.attends_exactly(S)`).
      mask: boolean, True = attend, broadcastable to `[B, N, T, S]`. Exact calls: any mask. Above: a concrete mask
        that is causal and/or right padding of keys and queries (e.g. `tril`, `valid[:, None, None, :]`, their
        combination); a traced one (built inside jit) cannot be read before it runs, so pass `is_causal` and
        `key_value_seq_lengths` instead.
      scale: logits scale, default `1 / sqrt(H)`.
      is_causal: causal attention (a Python bool).
      query_seq_lengths: int `[B]`; output rows at or beyond the length are zeros (as in `jax.nn`).
      key_value_seq_lengths: int `[B]`; keys at or beyond the length are padding.
      local_window_size: as in `jax.nn`; exact calls only.
      implementation: None (fastest available), "xla", or a HyperAttention kernel such as "pallas_triton"; exact
        calls run `jax.nn.dot_product_attention` with None ("xla"), or "cudnn" when asked for.
      return_residual: also return the natural-log normaliser `[B, T, N]` (as `jax.nn` does).
      config: `HyperAttentionConfig`; `config.attends_exactly(S)` (S <= min_seq_len) decides exact vs approximate.
      rng: PRNG key for the LSH hyperplanes and the samples. Default: `key_from_inputs(query, key)`, a key folded
        from the bits of `query[..., 0]` and `key[..., 0]`, so a call is deterministic for given inputs yet draws
        new samples for new inputs (pass your own key per layer and step to control it).

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`) in query's dtype, and the residual `[B, T, N]` if `return_residual`.

    Above `min_seq_len` with causal attention and right key padding, rows of padded queries (i >= the key length)
    are not the same as `jax.nn`'s: they are padding. Rows that attend no key are the mean of the values, as there.

    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 512, 4, 32))
    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> dot_product_attention(q, k, v, is_causal=True, config=cfg).shape
    (1, 512, 4, 32)
    """
    config = HyperAttentionConfig() if config is None else config
    if not isinstance(config, HyperAttentionConfig):
        raise ValueError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
    is_causal = _check_is_causal(is_causal)
    s = key.shape[-3]
    if config.attends_exactly(s):
        exact_implementation = implementation if implementation in _EXACT_ONLY_IMPLEMENTATIONS else None
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=scale,
            is_causal=is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size,
            implementation=exact_implementation,
            return_residual=return_residual,
        )
    above = f"above config.min_seq_len={config.min_seq_len} keys (S={s})"
    if bias is not None:
        raise ValueError(
            f"bias of shape {jnp.shape(bias)}: {above} HyperAttention cannot add a bias; supported there: "
            f"{SUPPORTED_ABOVE_MIN_SEQ_LEN}. Raise config.min_seq_len to at least {s} to attend exactly"
        )
    if local_window_size is not None:
        raise ValueError(f"{local_window_size=}: {above} HyperAttention has no local window mask")
    if implementation in _EXACT_ONLY_IMPLEMENTATIONS:
        raise ValueError(f"{implementation=} computes exact attention only; {above} use None, 'xla' or a kernel")
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    batch, t = query.shape[:2]
    pattern = MaskPattern(causal=is_causal, kv_length=None, empty_rows=None)
    if mask is not None:
        concrete = concrete_or_none(mask)
        if concrete is None:
            raise InexpressibleMaskError(
                f"mask is traced (built inside jit, grad or vmap), so its pattern cannot be read before it runs, and "
                f"{above} HyperAttention expresses only {SUPPORTED_ABOVE_MIN_SEQ_LEN}: pass is_causal=True and/or "
                "key_value_seq_lengths=lengths [B] instead of the mask, or pass the mask as a concrete array"
            )
        pattern = read_mask(concrete, batch=batch, t=t, s=s, is_causal=is_causal)
    if pattern.causal and t != s:
        raise ValueError(f"causal attention {above} needs equal query and key lengths, got T={t} S={s}")
    rng = key_from_inputs(query, key) if rng is None else rng
    out = approximate_attention(
        query,
        key,
        value,
        pattern=pattern,
        config=config,
        rng=rng,
        scale=scale,
        key_value_seq_lengths=key_value_seq_lengths,
        implementation=implementation,
        return_lse=return_residual,
    )
    out, lse = out if return_residual else (out, None)
    if query_seq_lengths is not None:
        real = jnp.arange(t) < jnp.asarray(query_seq_lengths)[:, None]  # [B, T]
        out = jnp.where(real[..., None, None], out, jnp.zeros((), out.dtype))
    if unbatched:
        out, lse = out[0], None if lse is None else lse[0]
    if not return_residual:
        return out
    return out, jnp.swapaxes(lse, -1, -2).astype(value.dtype)  # [B, N, T] -> [B, T, N], key dtype as jax.nn
