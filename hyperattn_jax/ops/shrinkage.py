"""Sample shrinkage (`HyperAttentionConfig.sample_shrinkage`): lam, the weight each sampled value keeps against the
samples' weighted mean value (`ops.tiles.shrink_sample_values`), one per batch element and kv head.

With the samples' normalised weights w, their mean value v_bar = sum_s w_s v_s and a query's attention p over the
sample tile, the residual's estimate is its sampled mass times v_bar + lam D, D = sum_s p_s (v_s - v_bar). D carries
what the samples say about where the query looks (signal) and sampling noise; where few samples stand for many keys
the noise can exceed the signal, and lam < 1 trades a small bias for less variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fixed_value_weight(shrinkage: float, num_residual_keys, num_samples: int, shape):
    """lam = 1 / (1 + c r), c = `shrinkage`, r = residual keys per sample (`num_residual_keys` broadcastable to
    `shape` = `[B, K]`, over `num_samples`), as float32 `shape`."""
    keys_per_sample = jnp.asarray(num_residual_keys, jnp.float32) / num_samples
    return jnp.broadcast_to(1.0 / (1.0 + shrinkage * keys_per_sample), shape)


def adaptive_value_weight(queries, k_samples, v_samples, log_weight, *, scale: float):
    """lam `[B, K]` fitted to the data: the positive-part James-Stein factor of D over a few probe queries.

    For each probe query, D (module docstring) is a self-normalised importance-sampling mean whose noise has the
    estimated energy N = sum_s p_s^2 |v_s - v_bar - D|^2; lam = max(0, 1 - sum N / sum |D|^2) over the probes keeps
    D where it stands well above its noise (a peaked residual) and shrinks it toward 0 where it does not (a spread
    residual whose samples mostly disagree). queries `[B, K, R, H]` (e.g. the column-mass probe's rows), k_samples
    and v_samples `[B, K, m, H]`, log_weight `[B, K, m]` (log of the samples' weights, -inf for dropped samples).
    A plan constant: not differentiated. Where no sample is live, lam = 1.
    """
    f32 = jnp.float32
    queries, k_samples, v_samples, log_weight = (
        jax.lax.stop_gradient(x).astype(f32) for x in (queries, k_samples, v_samples, log_weight)
    )
    live = jnp.isfinite(log_weight)
    log_weight = jnp.where(live, log_weight, -jnp.inf)
    weight = jax.nn.softmax(log_weight, axis=-1, where=live)
    deviation = v_samples - jnp.einsum("bkm,bkmh->bkh", weight, v_samples)[:, :, None]
    scores = jnp.einsum("bkrh,bkmh->bkrm", queries, k_samples) * scale + log_weight[:, :, None]
    p = jax.nn.softmax(scores, axis=-1, where=live[:, :, None])
    signal = jnp.einsum("bkrm,bkmh->bkrh", p, deviation)
    # sum_s p_s^2 |d_s - D|^2, expanded so that no [B, K, R, m, H] array is formed.
    p2 = jnp.square(p)
    noise = (
        jnp.einsum("bkrm,bkm->bkr", p2, jnp.sum(jnp.square(deviation), -1))
        - 2.0 * jnp.einsum("bkrh,bkrh->bkr", signal, jnp.einsum("bkrm,bkmh->bkrh", p2, deviation))
        + jnp.sum(jnp.square(signal), -1) * jnp.sum(p2, -1)
    )
    energy = jnp.sum(jnp.square(signal), axis=(-2, -1))
    lam = 1.0 - jnp.sum(noise, -1) / jnp.where(energy > 0, energy, 1.0)
    return jnp.where((energy > 0) & jnp.any(live, -1), jnp.clip(lam, 0.0, 1.0), 1.0)
