"""Input validation shared by every entry point: clear errors before anything is traced."""

from __future__ import annotations

import math

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def check_qkv(q, k, v, *, causal: bool) -> None:
    """Raise ValueError naming the offending values if q `[B,T,N,H]`, k, v `[B,S,K,H]` do not fit together."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got {name}.shape={tuple(x.shape)}"
            )
        if not any(x.dtype == d for d in SUPPORTED_DTYPES):
            raise ValueError(f"{name}.dtype={x.dtype} must be one of bfloat16, float16, float32, float64")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k.shape={tuple(k.shape)} v.shape={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q.shape={tuple(q.shape)} k.shape={tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q.shape={tuple(q.shape)} k.shape={tuple(k.shape)}")
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {num_kv_heads} (N % K == 0)")
    if min(q.shape[1], k.shape[1]) == 0:
        raise ValueError(f"sequence lengths must be positive: q.shape={tuple(q.shape)} k.shape={tuple(k.shape)}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs equal query and key lengths, got T={q.shape[1]} S={k.shape[1]}")


def default_scale(head_dim: int, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{scale=} must be a finite Python number")
    return float(scale)
