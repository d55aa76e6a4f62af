"""How hard an input is for HyperAttention, and how far an output is from exact attention.

The paper's guarantee (arXiv:2310.05869, Thm. 1) is stated in two parameters of the attention matrix
A = exp(scale * Q K^T) with row sums D:
  alpha = n * max_j ||(D^{-1} A)[:, j]||_2^2  -- the heaviest column of the normalised matrix (attention sinks blow it
          up; 1 means every column carries the same mass);
  kappa = max_i r_i / min_i r_i, r_i = sum_j (A - M o A)_ij  -- spread of the row sums left after removing the entries
          M that sortLSH puts in the block diagonal (the part the uniform sample must estimate).
Both are computed blockwise over query chunks (memory O(chunk * S)), so they run at 32k tokens on a laptop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax._checks import check_qkv, default_scale
from hyperattn_jax._layout import group_queries, heads_major, merge_query_chunks, split_query_chunks, ungroup_lse
from hyperattn_jax._numerics import masked_logsumexp
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.plan import make_plan


class Hardness(NamedTuple):
    """Per head `[B, N]` float32: alpha, and log(kappa) (kappa itself overflows easily on real attention)."""

    alpha: jax.Array
    log_kappa: jax.Array

    @property
    def kappa(self):
        return jnp.exp(self.log_kappa)


def hardness(q, k, *, key, config: HyperAttentionConfig | None = None, scale=None, query_chunk: int = 512) -> Hardness:
    """The paper's alpha and kappa for non-causal attention of q `[B, T, N, H]` over k `[B, S, K, H]`.

    `key` and `config` select the sortLSH hash whose block diagonal is removed for kappa (the same key as a
    `hyper_attention` call reproduces that call's blocks).

    >>> q = k = jax.random.normal(jax.random.key(0), (1, 256, 2, 16))
    >>> h = hardness(q, k, key=jax.random.key(1), config=HyperAttentionConfig(block_size=64))
    >>> h.alpha.shape
    (1, 2)
    """
    check_qkv(q, k, k, causal=False)
    config = HyperAttentionConfig() if config is None else config
    scale = default_scale(q.shape[-1], scale)
    return _hardness(group_queries(q, k.shape[2]), heads_major(k), key, config, scale, query_chunk)


@jax.jit(static_argnums=(3, 4, 5))
def _hardness(q, k, key, config, scale, query_chunk):
    t, s = q.shape[3], k.shape[2]
    plan = make_plan(q, k, key=key, config=config.replace(sample_size=0))
    query_block = plan.query_order.inverse // plan.query_block  # [B, K, G, T]
    key_block = plan.key_order.inverse // plan.key_block  # [B, K, S]
    q_chunks = split_query_chunks(q.astype(jnp.float32), query_chunk)
    block_chunks = split_query_chunks(query_block, query_chunk)
    valid_chunks = split_query_chunks(jnp.ones(q.shape[:4], bool), query_chunk)

    def scores(q_chunk):
        return jnp.einsum("bkgqh,bksh->bkgqs", q_chunk, k.astype(jnp.float32)) * scale

    def row_stats(args):
        q_chunk, block_chunk = args
        s_chunk = scores(q_chunk)
        found = block_chunk[..., None] == key_block[:, :, None, None, :]
        return masked_logsumexp(s_chunk), masked_logsumexp(jnp.where(found, -jnp.inf, s_chunk))

    lse, residual_log_rowsum = jax.lax.map(row_stats, (q_chunks, block_chunks))

    def add_column_norms(column_sq, args):
        q_chunk, lse_chunk, valid = args
        normalised = jnp.exp(scores(q_chunk) - lse_chunk[..., None])
        return column_sq + jnp.sum(jnp.where(valid[..., None], normalised**2, 0.0), axis=-2), None

    column_sq, _ = jax.lax.scan(
        add_column_norms, jnp.zeros((*q.shape[:3], s), jnp.float32), (q_chunks, lse, valid_chunks)
    )
    alpha = t * jnp.max(column_sq, axis=-1)
    residual = merge_query_chunks(residual_log_rowsum, t)
    has_residual = jnp.isfinite(residual)  # rows whose every key sits in their block have nothing left to estimate
    log_kappa = jnp.max(jnp.where(has_residual, residual, -jnp.inf), -1) - jnp.min(
        jnp.where(has_residual, residual, jnp.inf), -1
    )
    log_kappa = jnp.where(jnp.any(has_residual, -1), log_kappa, 0.0)
    return Hardness(ungroup_lse(alpha[..., None])[..., 0], ungroup_lse(log_kappa[..., None])[..., 0])


def relative_error(out, reference, *, per_head: bool = False):
    """Relative Frobenius error ||out - reference|| / ||reference|| of attention outputs `[B, T, N, H]`.

    Returns a float32 scalar over everything, or `[B, N]` per head with `per_head=True`.

    >>> x = jnp.ones((1, 4, 2, 8))
    >>> round(float(relative_error(1.1 * x, x)), 4)
    0.1
    """
    if out.shape != reference.shape:
        raise ValueError(f"shapes differ: out.shape={out.shape} reference.shape={reference.shape}")
    diff = (out.astype(jnp.float32) - reference.astype(jnp.float32)) ** 2
    ref = reference.astype(jnp.float32) ** 2
    axes = (1, 3) if per_head else None
    return jnp.sqrt(jnp.sum(diff, axis=axes) / jnp.sum(ref, axis=axes))
