"""One softmax over several key tiles with per-key log-weights, and the lse merge of partial attentions.

This is the readable twin of the fused GPU kernel: a query block attends, in one online softmax, to its sortLSH key
block, to the sampled residual keys (log-weight log(S/m), -inf where excluded), and to any further tile, e.g.
always-attended global keys. A tile's keys either belong to one query block each (`[..., nb, t, H]`) or are shared by
all blocks (`[..., 1, t, H]`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax._numerics import finite_or_zero, masked_logsumexp


class KeyTile(NamedTuple):
    """Keys and values seen by each query block, with an additive log-weight per key.

    k, v: `[B, K, nb | 1, t, H]`; log_weight: broadcastable to `[B, K, nb, t]` (0 = ordinary key, -inf = masked,
    log(w) = key counted w times).
    """

    k: jax.Array
    v: jax.Array
    log_weight: jax.Array


def tiled_attention(q_blocks, tiles: list[KeyTile] | tuple[KeyTile, ...], *, scale: float):
    """Attention of blocked queries over a list of key tiles, in one softmax.

    Args:
      q_blocks: `[B, K, G, nb, bq, H]` (G query heads per kv head, nb query blocks of bq queries).
      tiles: key tiles, see `KeyTile`.
      scale: softmax scale.

    Returns:
      out `[B, K, G, nb, bq, H]` float32 and lse `[B, K, G, nb, bq]` float32 (natural log, log-weights included).
    """
    acc = jnp.promote_types(q_blocks.dtype, jnp.float32)
    scores, values = [], []
    nb = q_blocks.shape[3]
    for tile in tiles:
        s = jnp.einsum("bkgnqh,bknth->bkgnqt", q_blocks, tile.k, preferred_element_type=acc) * scale
        log_weight = jnp.broadcast_to(tile.log_weight, (*tile.k.shape[:2], nb, tile.k.shape[3]))
        scores.append(s + log_weight[:, :, None, :, None, :].astype(acc))
        values.append(tile.v)
    s = jnp.concatenate(scores, axis=-1)
    lse = masked_logsumexp(s)
    p = jnp.exp(s - finite_or_zero(lse)[..., None])
    out = 0.0
    start = 0
    for v in values:
        width = v.shape[3]
        out = out + jnp.einsum("bkgnqt,bknth->bkgnqh", p[..., start : start + width], v.astype(acc))
        start += width
    return out, lse


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
