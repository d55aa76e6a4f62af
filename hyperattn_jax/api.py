"""The public entry points: `hyper_attention` (with backend dispatch) and `merge_attention`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperattn_jax._checks import check_qkv, default_scale
from hyperattn_jax._layout import group_queries, heads_major, ungroup_lse, ungroup_output
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.causal import grouped_causal_attention, noncausal_is_exact
from hyperattn_jax.ops.sortlsh import grouped_hyper_attention
from hyperattn_jax.ops.tiles import merge_partials
from hyperattn_jax.reference import grouped_exact_attention

IMPLEMENTATIONS = ("xla", "pallas_triton")


def _resolve_implementation(implementation, dtype):
    """None -> the fastest path on this backend: the fused Pallas kernels on GPU for bf16/fp16, xla otherwise.

    The kernels take half-precision inputs only; float32/float64 always run on the xla path.
    """
    half = dtype in (jnp.bfloat16, jnp.float16)
    if implementation is None:
        return "pallas_triton" if half and jax.default_backend() == "gpu" else "xla"
    return implementation if half else "xla"


def _check_key(key):
    if key is None:
        raise ValueError(
            "hyper_attention needs a PRNG key: pass key=jax.random.key(seed) (it draws hashes and samples)"
        )
    if not hasattr(key, "dtype"):
        raise ValueError(f"key must be a jax PRNG key, got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got key.shape={key.shape}")
    elif not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise ValueError(f"key must be jax.random.key(...) or a raw uint32[2] key, got {key.dtype}{list(key.shape)}")


def _check_kv_length(kv_length, batch: int):
    if kv_length is None:
        return
    if (
        not hasattr(kv_length, "shape")
        or kv_length.shape != (batch,)
        or not jnp.issubdtype(kv_length.dtype, jnp.integer)
    ):
        raise ValueError(f"kv_length must be an int array of shape ({batch},), got {kv_length!r}")


@functools.partial(jax.jit, static_argnames=("config", "causal", "scale", "implementation"))
def _hyper_attention(q, k, v, key, kv_length, hash_key, *, config, causal, scale, implementation):
    """Public layout in and out: out `[B, T, N, H]`, lse `[B, K, G, T]`. The kernels take the public layout as it is
    (no transposes); the jnp path works on the grouped layout."""
    if implementation == "pallas_triton":
        from hyperattn_jax.kernels.gpu.dispatch import attention_pallas  # kernels import ops, not the reverse

        return attention_pallas(q, k, v, key, kv_length, hash_key, config=config, causal=causal, scale=scale)

    def noncausal(q, k, v, *, key, kv_length=None, config=config):  # causal recursion may pass a config (sinks off)
        if noncausal_is_exact(k.shape[2], config):
            return grouped_exact_attention(q, k, v, scale=scale, kv_length=kv_length)
        return grouped_hyper_attention(
            q, k, v, key=key, config=config, scale=scale, kv_length=kv_length, hash_key=hash_key
        )

    q, k, v = group_queries(q, k.shape[2]), heads_major(k), heads_major(v)
    if causal:
        out, lse = grouped_causal_attention(q, k, v, key=key, config=config, scale=scale, noncausal_fn=noncausal)
    else:
        out, lse = noncausal(q, k, v, key=key, kv_length=kv_length)
    return ungroup_output(out), lse


def hyper_attention(
    q,
    k,
    v,
    *,
    key=None,
    config: HyperAttentionConfig | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    kv_length=None,
    hash_key=None,
):
    """HyperAttention (arXiv:2310.05869): near-linear-time approximate softmax attention.

    Args:
      q: queries `[B, T, N, H]` (bfloat16, float16, float32 or float64).
      k: keys `[B, S, K, H]` with N % K == 0 (GQA/MQA); S may differ from T unless causal.
      v: values `[B, S, K, H]`.
      key: PRNG key for the LSH hyperplanes and the residual samples. Same key -> bit-identical output.
      config: `HyperAttentionConfig` (static); default `HyperAttentionConfig()`: the paper's blocks and sample count
        with column-mass sampling (`HyperAttentionConfig.paper()` is the published algorithm).
      causal: query i attends keys j <= i, via the paper's recursion (exact at or below `config.min_seq_len`).
      scale: softmax scale, default `1 / sqrt(H)`.
      return_lse: also return the natural-log normaliser `[B, N, T]`, float32 (float64 for float64 inputs).
      implementation: None (fastest available: "pallas_triton" on GPU for bf16/fp16, else "xla"), "xla" (pure jnp)
        or "pallas_triton" (fused Pallas GPU kernels; float32 inputs fall back to "xla").
      kv_length: optional int `[B]` (non-causal): keys at positions >= kv_length[b] are padding.
      hash_key: optional PRNG key for the LSH hyperplanes alone (e.g. fixed per layer); `key` then draws only the
        samples. Default: both from `key`.

    Returns:
      out `[B, T, N, H]` in q's dtype, and lse `[B, N, T]` if `return_lse`.

    >>> q = k = v = jax.random.normal(jax.random.key(1), (1, 512, 4, 32))
    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> hyper_attention(q, k, v, key=jax.random.key(0), config=cfg).shape
    (1, 512, 4, 32)
    """
    config = HyperAttentionConfig() if config is None else config
    if not isinstance(config, HyperAttentionConfig):
        raise ValueError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"{implementation=} is not one of None, {', '.join(map(repr, IMPLEMENTATIONS))}")
    check_qkv(q, k, v, causal=causal)
    _check_key(key)
    _check_kv_length(kv_length, q.shape[0])
    if hash_key is not None:
        _check_key(hash_key)
    if causal and kv_length is not None:
        raise ValueError("kv_length (key padding) is supported for non-causal attention only")
    scale = default_scale(q.shape[-1], scale)
    out, lse = _hyper_attention(
        q,
        k,
        v,
        key,
        kv_length,
        hash_key,
        config=config,
        causal=bool(causal),
        scale=scale,
        implementation=_resolve_implementation(implementation, q.dtype),
    )
    out = out.astype(q.dtype)
    if not return_lse:
        return out
    return out, ungroup_lse(lse).astype(jnp.promote_types(q.dtype, jnp.float32))


def merge_attention(out1, lse1, out2, lse2):
    """Attention over the union of two disjoint key sets from the two partial results.

    Args:
      out1, out2: `[B, T, N, H]` partial attention outputs.
      lse1, lse2: `[B, N, T]` their natural-log normalisers (e.g. from `return_lse=True`).

    Returns:
      (out `[B, T, N, H]` in out1's dtype, lse `[B, N, T]` float32). Exact and associative.

    >>> o = jnp.zeros((1, 4, 2, 8)); l = jnp.zeros((1, 2, 4))
    >>> merge_attention(o, l, o, l)[1][0, 0, 0]  # log(e^0 + e^0)
    Array(0.6931472, dtype=float32)
    """
    if (
        out1.shape != out2.shape
        or lse1.shape != lse2.shape
        or lse1.shape != (out1.shape[0], out1.shape[2], out1.shape[1])
    ):
        raise ValueError(
            f"expected out [B,T,N,H] and lse [B,N,T] pairs of equal shapes, got out {out1.shape}, {out2.shape}, "
            f"lse {lse1.shape}, {lse2.shape}"
        )
    to_rows = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # lse [B,N,T] <-> [B,T,N], aligned with out[..., 0]
    out, lse = merge_partials(out1, to_rows(lse1).astype(jnp.float32), out2, to_rows(lse2).astype(jnp.float32))
    return out.astype(out1.dtype), to_rows(lse)
