"""The lse merge of partial attentions over disjoint key sets (exact, associative)."""

from __future__ import annotations

import jax.numpy as jnp

from hyperattn_jax._numerics import finite_or_zero


def merge_partials(out1, lse1, out2, lse2):
    """Merge two attentions over disjoint key sets: `out [..., H]`, `lse [...]` aligned with `out[..., 0]`.

    The result is the attention over the union: weights e^{lse_i - lse} per part, lse = logaddexp(lse1, lse2).
    Exact and associative; a part with lse = -inf (no keys) contributes nothing.
    """
    lse = jnp.logaddexp(lse1, lse2)
    safe = finite_or_zero(lse)
    w1 = jnp.exp(lse1 - safe)[..., None]
    w2 = jnp.exp(lse2 - safe)[..., None]
    out = w1 * out1.astype(w1.dtype) + w2 * out2.astype(w2.dtype)
    return out, lse
