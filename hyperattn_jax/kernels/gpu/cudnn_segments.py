"""The causal recursion's exact base case, forward, through cuDNN's flash attention where it runs.

The base case is every segment of `min_seq_len` positions attending to itself causally: a batch of independent causal
problems, which q `[B, T, N, H]` already is after a free reshape to `[B * T / segment, segment, N, H]`. Merging it with
the recursion's levels needs its lse in float32, and jax's public `jax.nn.dot_product_attention(return_residual=True)`
casts the lse to the output dtype (bf16 keeps ~3 significant digits of a value ~10: merge weights off by several %).
So this calls the internal entry point that the public function wraps, and returns None (the caller then runs our
flash kernel) wherever that entry point is missing or has another signature, the backend is not a GPU, or cuDNN
rejects the shape while tracing. The backward never uses it: our flash kernels take the final lse (`causal.py`).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.cache
def _cudnn_module():
    """The internal module with a `dot_product_attention` that can return the float32 lse, or None (looked up once)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:
        return None
    parameters = inspect.signature(fused_attention_stablehlo.dot_product_attention).parameters
    if not {"scale", "mask_type", "return_residual"} <= parameters.keys():
        return None
    return fused_attention_stablehlo


def cudnn_segment_forward(q, k, v, *, scale: float, segment: int):
    """Causal attention within each `segment` positions of q `[B, T, N, H]`, k, v `[B, T, K, H]` (T a multiple of
    segment) through cuDNN: out `[B, T, N, H]` (q's dtype) and lse `[B, N, T]` float32 (natural log), or None where
    cuDNN cannot run it (see the module docstring)."""
    cudnn = _cudnn_module()
    if cudnn is None or jax.default_backend() != "gpu" or jnp.dtype(q.dtype) not in _CUDNN_DTYPES:
        return None
    b, t, n = q.shape[:3]
    if t % segment:
        return None

    def split(x):
        return x.reshape(b * t // segment, segment, *x.shape[2:])

    try:
        out, lse = cudnn.dot_product_attention(
            split(q), split(k), split(v), scale=scale, mask_type=cudnn.MaskType.CAUSAL, return_residual=True
        )
    except (NotImplementedError, RuntimeError, TypeError, ValueError):  # cuDNN missing, too old, or shape rejected
        return None
    # cuDNN returns the lse as [B * T / segment, N, segment] whatever the q layout
    lse = lse.reshape(b, t // segment, n, segment).transpose(0, 2, 1, 3).reshape(b, n, t)
    return out.reshape(q.shape), lse.astype(jnp.float32)
