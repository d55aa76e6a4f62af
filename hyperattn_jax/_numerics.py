"""Softmax statistics that stay finite (and have finite gradients) when every key of a row is masked."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_logsumexp(s, axis=-1):
    """logsumexp over `axis` that returns -inf for an all -inf row with a zero (not NaN) gradient."""
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=axis, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    total = jnp.sum(jnp.exp(s - row_max), axis=axis)
    has_keys = total > 0
    lse = jnp.log(jnp.where(has_keys, total, 1.0)) + jnp.squeeze(row_max, axis)
    return jnp.where(has_keys, lse, -jnp.inf)


def finite_or_zero(lse):
    """lse with -inf replaced by 0, so that exp(s - lse) is 0 rather than NaN on rows without keys."""
    return jnp.where(jnp.isfinite(lse), lse, 0.0)
