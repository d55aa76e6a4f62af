"""The causal recursion's exact base case, forward, through cuDNN's flash attention where it runs.

The base case is every segment of `min_seq_len` positions attending to itself causally: a batch of independent causal
problems, which q `[B, T, N, H]` already is after a free reshape to `[B * T / segment, segment, N, H]`. Merging it with
the recursion's levels needs its lse in float32, and jax's public `jax.nn.dot_product_attention(return_residual=True)`
casts the lse to the output dtype (bf16 keeps ~3 significant digits of a value ~10: merge weights off by several %).
So this calls the internal entry point that the public function wraps, and returns None (the caller then runs our
flash kernel) wherever that entry point is missing or has another signature, the backend is not a GPU, or cuDNN
rejects the shape while tracing.

The backward (`cudnn_segment_backward`) runs cuDNN's flash backward on the base case as one PART of the merged
attention. A part's gradient needs the final normaliser: its probabilities are P = exp(s - lse_final) and
dS = P (dO.v - D) with D = rowsum(dO * O_final). cuDNN's backward forms P from the lse it is given and D from the
output and dO it is given, so it gets the base case's own lse, the FINAL output and dO scaled per row by
c = exp(lse_own - lse_final) (<= 1): then P_own c = P, D' = c D, dS' = P (dO.v - D) and dV' = (P_own c)^T dO =
P^T dO, the part's exact share (`rescaled_cotangent`; tests/test_kernels.py checks the identity against the
flash twin). That needs the rules of the internal custom_vjp function, called with the base case's residuals and
the final output in place of its own (`_causal_call`).
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


def _causal_call(q, k, v, scale: float):
    """(fwd rule, bwd rule, positional arguments, nondiff positions) of the internal custom_vjp attention function
    for causal attention on q `[B', L, N, H]`, k, v `[B', L, K, H]`, built by parameter name from its forward rule's
    signature (the public wrapper's choices for no bias, mask, padding or dropout), or None where the rules or a
    parameter are not the ones known here (another jax version)."""
    cudnn = _cudnn_module()
    function = getattr(cudnn, "_dot_product_attention", None)
    if function is None or not all(hasattr(function, a) for a in ("fwd", "bwd", "nondiff_argnums")):
        return None
    not_used = jnp.zeros(0, q.dtype)
    try:
        values = {
            "query": q, "key": k, "value": v, "bias": not_used, "q_seqlen": not_used, "kv_seqlen": not_used,
            "q_offsets": not_used, "kv_offsets": not_used, "page_table_k": not_used, "page_table_v": not_used,
            "score_mod_args": (), "scale": scale, "seed": 42, "dropout_rate": 0.0, "variadic_args": (False, False),
            "mask_type": cudnn.MaskType.CAUSAL, "layout": cudnn._normalize_layout("BTNH").value,
            "sliding_window_length": None, "score_mod": None, "cudnn_version": cudnn.check_cudnn_version(),
            "return_residual": True,
        }  # fmt: skip
        names = list(inspect.signature(function.fwd).parameters)
        arguments = [values[name] for name in names]
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):  # another version, or no cuDNN
        return None
    return function.fwd, function.bwd, arguments, tuple(function.nondiff_argnums)


def _split(x, segment: int):
    """`[B, T, ...]` -> `[B * T / segment, segment, ...]`: every segment one batch element (free)."""
    return x.reshape(x.shape[0] * x.shape[1] // segment, segment, *x.shape[2:])


def _public_rows(lse, batch: int):
    """cuDNN's lse `[B * T / segment, N, segment]` -> `[B, N, T]` (its layout whatever the q layout)."""
    chunks, n, segment = lse.shape
    return lse.reshape(batch, chunks // batch, n, segment).transpose(0, 2, 1, 3).reshape(batch, n, -1)


def cudnn_segment_forward(q, k, v, *, scale: float, segment: int):
    """Causal attention within each `segment` positions of q `[B, T, N, H]`, k, v `[B, T, K, H]` (T a multiple of
    segment) through cuDNN: out `[B, T, N, H]` (q's dtype), lse `[B, N, T]` float32 (natural log) and the residuals
    `cudnn_segment_backward` needs (None where this jax has no usable backward rule), or None where cuDNN cannot run
    it (see the module docstring)."""
    cudnn = _cudnn_module()
    if cudnn is None or jax.default_backend() != "gpu" or jnp.dtype(q.dtype) not in _CUDNN_DTYPES:
        return None
    b, t = q.shape[:2]
    if t % segment:
        return None
    split_q, split_k, split_v = (_split(x, segment) for x in (q, k, v))
    call = _causal_call(split_q, split_k, split_v, scale)
    try:
        if call is None:
            out, lse = cudnn.dot_product_attention(
                split_q, split_k, split_v, scale=scale, mask_type=cudnn.MaskType.CAUSAL, return_residual=True
            )
            residuals = None
        else:
            forward_rule, _, arguments, _ = call
            (out, lse), residuals = forward_rule(*arguments)
            residuals = (*residuals[:-1], None)  # its own output is not needed: the backward takes the final one
    except (NotImplementedError, RuntimeError, TypeError, ValueError):  # cuDNN missing, too old, or shape rejected
        return None
    return out.reshape(q.shape), _public_rows(lse, b).astype(jnp.float32), residuals


def rescaled_cotangent(d_out, lse_own, lse_final):
    """dO `[..., T, N, H]` scaled per row by exp(lse_own - lse_final) (lse `[..., N, T]`): the cotangent that makes a
    flash backward given a part's own lse and the final output return that part's share of the merged gradient
    (module docstring)."""
    weight = jnp.exp(lse_own - lse_final)  # <= 1: the part's share of the final normaliser
    return (d_out.astype(jnp.float32) * jnp.swapaxes(weight, -1, -2)[..., None]).astype(d_out.dtype)


def cudnn_segment_backward(residuals, out, lse, d_out, *, scale: float, segment: int):
    """dq `[B, T, N, H]`, dk, dv `[B, T, K, H]` (q's dtype) of the base case as a part of a merged attention whose
    final output is out `[B, T, N, H]` and final lse `[B, N, T]` float32, for cotangent d_out (no lse cotangent:
    the caller adds none), through cuDNN's backward. `residuals` are `cudnn_segment_forward`'s; its own lse is in
    them. Trace-time failures return None (the caller runs our flash backward)."""
    b, t = out.shape[:2]
    q, k, v = residuals[:3]
    call = _causal_call(q, k, v, scale)
    if call is None:
        return None
    _, backward_rule, arguments, nondiff = call
    own_lse = _public_rows(residuals[-2], b).astype(jnp.float32)
    cotangent = rescaled_cotangent(d_out, own_lse, lse)
    with_final_output = (*residuals[:-1], _split(out.astype(q.dtype), segment))
    try:
        dq, dk, dv = backward_rule(
            *(arguments[i] for i in nondiff), with_final_output, (_split(cotangent, segment), None)
        )[:3]
    except (NotImplementedError, RuntimeError, TypeError, ValueError):
        return None
    return dq.reshape(out.shape), dk.reshape(b, t, *dk.shape[2:]), dv.reshape(b, t, *dv.shape[2:])
