"""The public entry points: `hyper_attention` (validation, then the backend the registry picks) and
`merge_attention`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax._checks import check_qkv, default_scale
from hyperattn_jax._layout import ungroup_lse
from hyperattn_jax.backends.registry import choose, get_backend
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.merge import merge_partials


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
        return None
    kv_length = jnp.asarray(kv_length)
    if kv_length.shape != (batch,) or not jnp.issubdtype(kv_length.dtype, jnp.integer):
        raise ValueError(f"kv_length must be an int array of shape ({batch},), got {kv_length!r}")
    return kv_length


def check_causal(causal) -> bool:
    """`causal` as a Python bool; a traced or non-boolean value is an error (it selects the algorithm statically)."""
    if isinstance(causal, jax.core.Tracer):
        raise ValueError("causal must be a Python bool, got a traced value: it selects the algorithm at trace time")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    return bool(causal)


@functools.cache
def _compiled(name: str):
    """The backend's `attention`, jitted once per backend (config, causal, scale, interpret static): the api calls it
    directly, so the kernels sit three calls below `hyper_attention` (docs/architecture.md)."""
    return jax.jit(get_backend(name).attention, static_argnames=("config", "causal", "scale", "interpret"))


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
    interpret: bool = False,
):
    """HyperAttention (arXiv:2310.05869): near-linear-time approximate softmax attention.

    Args:
      q: queries `[B, T, N, H]` (bfloat16, float16, float32 or float64).
      k: keys `[B, S, K, H]` with N % K == 0 (GQA/MQA); S may differ from T unless causal.
      v: values `[B, S, K, H]`.
      key: PRNG key for the LSH hyperplanes and the residual samples. Same key -> bit-identical output.
      config: `HyperAttentionConfig` (static); default `HyperAttentionConfig()`: the paper's blocks and sample count
        with column-mass sampling (`HyperAttentionConfig.paper()` is the published algorithm).
      causal: a Python bool; query i attends keys j <= i, via the paper's recursion. Causal or not, a call over
        S <= `config.min_seq_len` keys is exact (`config.attends_exactly(S)`).
      scale: softmax scale, default `1 / sqrt(H)`.
      return_lse: also return the natural-log normaliser `[B, N, T]`, float32 (float64 for float64 inputs).
      implementation: None (the fastest backend that takes the call on this platform: "pallas_triton" on GPU for
        bf16/fp16, else "xla"), "xla" (pure jnp, anywhere), "pallas_triton" (fused Pallas GPU kernels; float32
        inputs run on "xla") or "pallas_tpu". A kernel backend on a platform it does not target raises ValueError
        unless `interpret=True`. `hyperattn_jax.explain(...)` says which runs and why.
      kv_length: optional int `[B]` (non-causal): keys at positions >= kv_length[b] are padding; 0 gives zeros.
      hash_key: optional PRNG key for the LSH hyperplanes alone (e.g. fixed per layer); `key` then draws only the
        samples. Default: both from `key`.
      interpret: run a kernel backend's Pallas kernels in the interpreter (any platform; slow: for tests).

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
    causal = check_causal(causal)
    check_qkv(q, k, v, causal=causal)
    _check_key(key)
    kv_length = _check_kv_length(kv_length, q.shape[0])
    if hash_key is not None:
        _check_key(hash_key)
    if causal and kv_length is not None:
        raise ValueError("kv_length (key padding) is supported for non-causal attention only")
    scale = default_scale(q.shape[-1], scale)
    choice = choose(
        implementation=implementation, dtype=q.dtype, head_dim=q.shape[-1], config=config, causal=causal,
        interpret=bool(interpret),
    )  # fmt: skip
    out, lse = _compiled(choice.name)(
        q, k, v, key, kv_length, hash_key, config=config, causal=causal, scale=scale, interpret=choice.interpret
    )
    if kv_length is not None:  # no keys: zeros and lse -inf, as exact attention gives
        has_keys = kv_length > 0
        out = jnp.where(has_keys[:, None, None, None], out, 0)
        lse = jnp.where(has_keys[:, None, None, None], lse, -jnp.inf)
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
