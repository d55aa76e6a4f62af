"""Strategy "all_to_all" (Ulysses-style): trade the sequence split for a head split, attend whole sequences locally.

Inside `shard_map`, each device holds `T/P` positions of every head. One `all_to_all` per tensor turns that into all
`T` positions of `N/P` query heads (and `K/P` kv heads: query head n uses kv head n // (N/K), and consecutive head
blocks keep that pairing), the backend the registry picks runs the single-device algorithm on whole sequences (any
config, causal or not: the column-mass probe, sinks, heavy keys and windows only ever read their own head), and one
more `all_to_all` turns the output back. Per device this moves `(T N + 2 S K) H (P-1)/P^2` input elements and
`T N (H+1) (P-1)/P^2` output elements, and holds `(T N + 2 S K) H / P`: O((T+S)/P), as the sequence-sharded input
itself. The plan needs no communication at all.

Same answer as one device: the backend gets a `ShardKey` (`ops/keys.py`), so every per-head draw (the samples, the
systematic offsets, at every level of the causal recursion) is the single-device draw for the whole batch and all kv
heads, sliced to this device's block; the hyperplanes and the probe rows are shared by all heads anyway.
"""

from __future__ import annotations

import jax

from hyperattn_jax._layout import ungroup_lse
from hyperattn_jax.backends.registry import get_backend
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.keys import ShardKey


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
            'devices use strategy="bucket_dispatch" (non-causal, HyperAttentionConfig.paper()), or put some devices '
            "on a data axis."
        )


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
    implementation: str,
    interpret: bool,
    batch_axis=None,
    hash_key=None,
):
    """HyperAttention of sequence shards via a head split; call inside `shard_map`.

    Args:
      q: this device's queries `[B, T/P, N, H]` (positions split over `seq_axis`, P devices).
      k, v: this device's keys and values `[B, S/P, K, H]`.
      key, config, scale, causal, hash_key: as in `hyper_attention`; the key must be the same on every device.
      seq_axis: mesh axis name(s) the sequence is split over; N and K must be divisible by its size.
      implementation, interpret: the backend that runs on each device (`backends.registry.choose`).
      batch_axis: mesh axis name(s) the batch is split over, or None.

    Returns:
      out `[B, T/P, N, H]` in q's dtype and lse `[B, N, T/P]` float32: this device's rows of the single-device result.
    """
    num_shards, head_index = axis_shards(seq_axis)
    batch_shards, batch_index = axis_shards(batch_axis)
    check_head_split(q.shape[2], k.shape[2], num_shards, seq_axis)
    # [B, T/P, N, H] -> [B, T, N/P, H]: send head block j to device j, stack the received positions in device order.
    q_heads, k_heads, v_heads = (jax.lax.all_to_all(x, seq_axis, 2, 1, tiled=True) for x in (q, k, v))
    block_key = ShardKey(key, batch_index, head_index, q.shape[0], batch_shards, num_shards)
    out, lse = get_backend(implementation).attention(
        q_heads, k_heads, v_heads, block_key, None, hash_key, config=config, causal=causal, scale=scale,
        interpret=interpret,
    )  # fmt: skip
    # Cast before sending (the single-device result is cast to q's dtype too): bf16 outputs move half the bytes.
    out = jax.lax.all_to_all(out.astype(q.dtype), seq_axis, 1, 2, tiled=True)  # -> [B, T/P, N, H]
    lse = jax.lax.all_to_all(ungroup_lse(lse), seq_axis, 2, 1, tiled=True)  # [B, N/P, T] -> [B, N, T/P]
    return out, lse
