"""Strategy "all_to_all" (Ulysses-style): trade the sequence split for a head split, attend whole sequences locally.

Inside `shard_map`, each device holds `T/P` positions of every head. One `all_to_all` per tensor turns that into all
`T` positions of `N/P` query heads (and `K/P` kv heads: query head n uses kv head n // (N/K), and consecutive head
blocks keep that pairing), the single-device algorithm runs on whole sequences, and one more `all_to_all` turns the
output back. Per device this moves `(T N + 2 S K) H (P-1)/P^2` input elements and `T N (H+1) (P-1)/P^2` output
elements, and holds `(T N + 2 S K) H / P`: O((T+S)/P), as the sequence-sharded input itself.

Same answer as one device: the hash hyperplanes are shared by all heads (every device draws the same ones from the
same key) and the samples are drawn as the single-device `[B, K, m]` array and sliced to this device's heads (see
`_randomness.py`), at every level of the causal recursion too, which stacks its sub-problems on the batch axis.
"""

from __future__ import annotations

import jax

from hyperattn_jax._layout import group_queries, heads_major, ungroup_lse, ungroup_output
from hyperattn_jax.backends import xla
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.causal import AttentionParts, grouped_attention
from hyperattn_jax.ops.estimate import attend_tiles
from hyperattn_jax.ops.plan import make_plan
from hyperattn_jax.ops.tiles import hyper_attention_tiles
from hyperattn_jax.parallel._randomness import sample_slice


def axis_shards(axis_name) -> tuple[int, jax.Array | int]:
    """(number of shards, this device's index) along a mesh axis name (or tuple of names); (1, 0) for None."""
    if axis_name is None:
        return 1, 0
    return jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)


def check_head_split(num_heads: int, num_kv_heads: int, num_shards: int, seq_axis) -> None:
    if num_heads % num_shards or num_kv_heads % num_shards:
        raise ValueError(
            f'strategy="all_to_all" splits the heads over the {num_shards} devices of {seq_axis=}: it needs query '
            f"heads N={num_heads} and kv heads K={num_kv_heads} divisible by {num_shards}. With fewer heads than "
            'devices use strategy="bucket_dispatch" (non-causal), or put some devices on a data axis.'
        )


def grouped_attention_for_heads(
    q,
    k,
    v,
    *,
    key,
    config: HyperAttentionConfig,
    scale: float,
    causal: bool,
    samples_for,
    hash_key=None,
):
    """The single-device algorithm on whole sequences (grouped layout), with samples supplied by `samples_for`.

    q `[B, K, G, T, H]`, k, v `[B, K, S, H]`. `samples_for(key, stacked=, num_keys=)` returns the sample indices
    `[stacked * B, K, m]` of a non-causal problem over `num_keys` keys drawn from `key` (None without sampling).
    Returns out `[B, K, G, T, H]` and lse `[B, K, G, T]`, float32, like the single-device dispatch in `api.py`.
    """
    batch = q.shape[0]

    def estimate(q, k, v, *, key, config, kv_length):
        del kv_length  # the sharded strategies take no key padding
        plan = make_plan(q, k, key=key, config=config, hash_key=hash_key)
        plan = plan.replace(sample_index=samples_for(key, stacked=q.shape[0] // batch, num_keys=k.shape[2]))
        return attend_tiles(q, hyper_attention_tiles(k, v, plan), plan, scale=scale)

    parts = AttentionParts(estimate=estimate, exact=xla.parts(scale=scale, hash_key=hash_key).exact)
    return grouped_attention(q, k, v, key=key, config=config, causal=causal, parts=parts)


def head_sharded_hyper_attention(
    q,
    k,
    v,
    *,
    key,
    config: HyperAttentionConfig,
    scale: float,
    causal: bool,
    seq_axis,
    batch_axis=None,
    hash_key=None,
):
    """HyperAttention of sequence shards via a head split; call inside `shard_map`.

    Args:
      q: this device's queries `[B, T/P, N, H]` (positions split over `seq_axis`, P devices).
      k, v: this device's keys and values `[B, S/P, K, H]`.
      key, config, scale, causal, hash_key: as in `hyper_attention`; the key must be the same on every device.
      seq_axis: mesh axis name(s) the sequence is split over; N and K must be divisible by its size.
      batch_axis: mesh axis name(s) the batch is split over, or None.

    Returns:
      out `[B, T/P, N, H]` in q's dtype and lse `[B, N, T/P]` float32: this device's rows of the single-device result.
    """
    num_shards, head_index = axis_shards(seq_axis)
    batch_shards, batch_index = axis_shards(batch_axis)
    check_head_split(q.shape[2], k.shape[2], num_shards, seq_axis)
    # [B, T/P, N, H] -> [B, T, N/P, H]: send head block j to device j, stack the received positions in device order.
    q_heads, k_heads, v_heads = (jax.lax.all_to_all(x, seq_axis, 2, 1, tiled=True) for x in (q, k, v))
    local_kv_heads = k.shape[2] // num_shards

    def samples_for(key, *, stacked, num_keys):
        return sample_slice(
            key,
            local_batch=q.shape[0],
            batch_shards=batch_shards,
            batch_index=batch_index,
            kv_heads=local_kv_heads,
            head_shards=num_shards,
            head_index=head_index,
            num_keys=num_keys,
            config=config,
            stacked=stacked,
        )

    out, lse = grouped_attention_for_heads(
        group_queries(q_heads, local_kv_heads),
        heads_major(k_heads),
        heads_major(v_heads),
        key=key,
        config=config,
        scale=scale,
        causal=causal,
        samples_for=samples_for,
        hash_key=hash_key,
    )
    # Cast before sending (the single-device result is cast to q's dtype too): bf16 outputs move half the bytes.
    out = jax.lax.all_to_all(ungroup_output(out).astype(q.dtype), seq_axis, 1, 2, tiled=True)  # -> [B, T/P, N, H]
    lse = jax.lax.all_to_all(ungroup_lse(lse), seq_axis, 2, 1, tiled=True)  # [B, N/P, T] -> [B, N, T/P]
    return out, lse
