"""Strategy "bucket_dispatch": the LSH sort order decides which device computes which sortLSH blocks.

Inside `shard_map`, device d holds positions [d S/P, (d+1) S/P) of every head. The single-device algorithm sorts keys
(and queries) by (LSH rank, position) and cuts the sorted keys into blocks of b. Here:

1. every device hashes its own keys and queries with the hyperplanes of the single-device call (same key);
2. a distributed sort (`columnsort.py`, fixed-size collectives) moves every key and query to the device that owns
   its sorted position: device d gets sorted keys [d S/P, (d+1) S/P) and sorted queries [d T/P, (d+1) T/P);
3. when S/P is a multiple of b and T of the number of blocks nb = S/b, those ranges are exactly query blocks
   [d nb/P, (d+1) nb/P) and their key blocks, so the block-diagonal part is local;
4. the m samples per (batch, kv head) are the single-device draw; their keys and values are gathered to every device
   (a masked gather and a `psum` of m H numbers per head), and each sample is excluded from its own sortLSH block,
   found by searching the sorted keys of the device that holds it;
5. each query's output and lse travel back to the device and position it came from (the sort, run backwards).

What it equals: exactly the single-device `hyper_attention` for the same key (the same sorted order, blocks and
samples), up to float summation order. Non-causal only: the causal recursion splits the sequence in halves that lie on
different devices (see docs/sharding.md for the scheme and why it is not here yet).

Per device it sends about 3 (S K 2H + T N H) / P elements for the inputs and 3 T N (H+1) / P for the output and lse
(each sort moves every row about three times), plus P-independent O(B K m H) for the samples; memory O((T+S)/P).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax._layout import group_queries, heads_major, ungroup_lse, ungroup_output
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.lsh import lsh_rank
from hyperattn_jax.ops.estimate import tiled_attention
from hyperattn_jax.ops.keys import ShardKey, draw_index, plan_keys
from hyperattn_jax.ops.plan import plan_projections
from hyperattn_jax.ops.tiles import KeyTile
from hyperattn_jax.parallel.columnsort import column_sort, column_sort_problem, route, unroute
from hyperattn_jax.parallel.head_sharded import axis_shards
from hyperattn_jax.reference import grouped_exact_attention

_INT32_MAX = 2**31 - 1
# The published plan's values of the accuracy options. Global keys (sinks, heavy keys) would be one tile gathered from
# the devices holding them (not written), and data-dependent draws (a CDF over all keys of a head in hash order) would
# need a distributed prefix sum whose rounding differs from one device's, flipping draws near a boundary.
_PAPER_VALUES = {
    "num_sink_keys": 0,
    "num_heavy_keys": 0,
    "sample_distribution": "uniform",
    "sample_scheme": "independent",
    "local_window": 0,
    "sample_shrinkage": 0.0,
}


def check_paper_plan(config: HyperAttentionConfig) -> None:
    """Raise ValueError naming every accuracy option that differs from the published algorithm."""
    changed = {name: getattr(config, name) for name, paper in _PAPER_VALUES.items() if getattr(config, name) != paper}
    if changed:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        raise ValueError(
            f'strategy="bucket_dispatch" reproduces the published plan only (uniform independent samples, no sinks, '
            f'heavy keys, window or sample shrinkage); got {settings}. Use strategy="all_to_all" (every config, '
            "causal or not) or HyperAttentionConfig.paper(...)."
        )


def check_bucket_dispatch(num_queries: int, num_keys: int, num_shards: int, config: HyperAttentionConfig) -> None:
    """Raise ValueError naming the sizes when the sorted ranges of P devices cannot hold whole sortLSH blocks."""
    check_paper_plan(config)
    if config.attends_exactly(num_keys):
        return  # computed exactly, no sort
    b, p = config.block_size, num_shards
    where = f'strategy="bucket_dispatch" with T={num_queries}, S={num_keys}, P={p}, block_size={b}'
    if num_keys % (p * b):
        raise ValueError(f"{where}: S/P = {num_keys / p:g} keys per device must be a multiple of block_size")
    num_blocks = num_keys // b
    if num_queries % num_blocks:
        raise ValueError(f"{where}: T must be divisible by the number of blocks S/block_size = {num_blocks}")
    for name, length in (("keys", num_keys), ("queries", num_queries)):
        problem = column_sort_problem(length // p, p)
        if problem:
            raise ValueError(f"{where}: cannot sort the {name}: {problem}")
        if config.num_buckets * length > _INT32_MAX:
            raise ValueError(
                f"{where}: the sort packs rank * length + position into int32, and 2**num_projections * {length} "
                f"= {config.num_buckets * length} does not fit; use fewer projections"
            )


def _sorted_block_of_samples(sorted_packed, sample_packed, block_size: int):
    """Local sortLSH block `[B, K, m]` of each sample on this device, or -1 if another device holds it after the sort.

    sorted_packed `[B, K, r]` (ascending), sample_packed `[B, K, m]`: both rank * S + position, unique per key.
    """
    search = jax.vmap(jax.vmap(lambda row, x: jnp.searchsorted(row, x)))
    where = search(sorted_packed, sample_packed).astype(jnp.int32)
    found = jnp.take_along_axis(sorted_packed, jnp.minimum(where, sorted_packed.shape[-1] - 1), axis=-1)
    return jnp.where(found == sample_packed, where // block_size, -1)


def bucket_dispatch_hyper_attention(
    q,
    k,
    v,
    *,
    key,
    config: HyperAttentionConfig,
    scale: float,
    seq_axis,
    batch_axis=None,
    hash_key=None,
):
    """Non-causal HyperAttention of sequence shards by a distributed LSH sort; call inside `shard_map`.

    Args:
      q: this device's queries `[B, T/P, N, H]` (positions split over `seq_axis`, P devices).
      k, v: this device's keys and values `[B, S/P, K, H]`.
      key, config, scale, hash_key: as in `hyper_attention`; the key must be the same on every device.
      seq_axis: mesh axis name(s) the sequence is split over.
      batch_axis: mesh axis name(s) the batch is split over, or None.

    Returns:
      out `[B, T/P, N, H]` in q's dtype and lse `[B, N, T/P]` float32: this device's rows of the single-device result.
    """
    num_shards, index = axis_shards(seq_axis)
    batch_shards, batch_index = axis_shards(batch_axis)
    batch, local_t, _, head_dim = q.shape
    local_s, kv_heads = k.shape[1], k.shape[2]
    t, s = local_t * num_shards, local_s * num_shards
    check_bucket_dispatch(t, s, num_shards, config)
    qg, kg, vg = group_queries(q, kv_heads), heads_major(k), heads_major(v)
    if config.attends_exactly(s):
        # The single-device call is exact attention here (short keys): gather them, O(S) but S <= min_seq_len.
        k_all, v_all = (jax.lax.all_gather(x, seq_axis, axis=2, tiled=True) for x in (kg, vg))
        out, lse = grouped_exact_attention(qg, k_all, v_all, scale=scale)
        return ungroup_output(out), ungroup_lse(lse)

    projections = plan_projections(key, head_dim, config, hash_key)
    key_position = index * local_s + jnp.arange(local_s, dtype=jnp.int32)
    query_position = index * local_t + jnp.arange(local_t, dtype=jnp.int32)
    # The single-device stable sort by rank is the sort by (rank, global position): one unique int32 per row.
    key_packed = lsh_rank(kg, projections) * s + key_position  # [B, K, S/P]
    query_packed = lsh_rank(qg, projections) * t + query_position  # [B, K, G, T/P]
    sorted_key_packed, key_network = column_sort(key_packed, seq_axis)
    _, query_network = column_sort(query_packed, seq_axis)
    kv_sorted = route(jnp.concatenate([kg, vg], axis=-1), key_network, seq_axis)  # one movement for k and v
    q_sorted = route(qg, query_network, seq_axis)

    b = config.block_size
    local_blocks = local_s // b
    q_blocks = q_sorted.reshape(*qg.shape[:3], local_blocks, local_t // local_blocks, head_dim)
    kv_blocks = kv_sorted.reshape(*kg.shape[:2], local_blocks, b, 2 * head_dim)
    tiles = [KeyTile(kv_blocks[..., :head_dim], kv_blocks[..., head_dim:], jnp.zeros((1, 1, 1, 1), jnp.float32))]

    if config.sample_size:
        # The single-device draw for the whole batch, this device's batch block (`ops/keys.py`).
        sample_key = plan_keys(ShardKey(key, batch_index, 0, batch, batch_shards)).samples
        sample_index = draw_index(sample_key, (batch, kv_heads, config.sample_size), s)
        local = sample_index - index * local_s
        mine = (local >= 0) & (local < local_s)
        local = jnp.clip(local, 0, local_s - 1)
        sampled = jnp.take_along_axis(jnp.concatenate([kg, vg], axis=-1), local[..., None], axis=2)
        sampled = jax.lax.psum(jnp.where(mine[..., None], sampled, 0), seq_axis)  # [B, K, m, 2H] on every device
        sample_packed = jax.lax.psum(jnp.where(mine, jnp.take_along_axis(key_packed, local, axis=2), 0), seq_axis)
        sample_block = _sorted_block_of_samples(sorted_key_packed, sample_packed, b)
        in_own_block = sample_block[:, :, None, :] == jnp.arange(local_blocks)[:, None]  # [B, K, nb/P, m]
        log_weight = jnp.where(in_own_block, -jnp.inf, jnp.log(s / config.sample_size)).astype(jnp.float32)
        tiles.append(KeyTile(sampled[:, :, None, :, :head_dim], sampled[:, :, None, :, head_dim:], log_weight))

    out, lse = tiled_attention(q_blocks, tiles, scale=scale)
    # The output travels back in q's dtype (the single-device result is cast to it too: bf16 moves half the bytes),
    # the lse in float32.
    out = unroute(out.reshape(*qg.shape[:4], head_dim).astype(q.dtype), query_network, seq_axis)
    lse = unroute(lse.reshape(*qg.shape[:4], 1), query_network, seq_axis)[..., 0]
    return ungroup_output(out), ungroup_lse(lse)
