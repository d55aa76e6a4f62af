"""Key tiles: what each sorted query block attends, cut from the plan.

A tile's keys either belong to one query block each (`[B, K, nb, t, H]`: the sortLSH blocks) or are shared by all
blocks (`[B, K, 1, t, H]`: the global keys, the sampled residual), each key with an additive log-weight (0 ordinary,
-inf masked, log w counted w times). `estimate.py` attends blocked queries over any list of tiles in one softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax.ops.plan import SortLSHPlan
from hyperattn_jax.ops.sorting import positions_mask, sort_rows, unsort_rows


class KeyTile(NamedTuple):
    """Keys and values seen by each query block, with an additive log-weight per key.

    k, v: `[B, K, nb | 1, t, H]`; log_weight: broadcastable to `[B, K, nb, t]` (0 = ordinary key, -inf = masked,
    log(w) = key counted w times).
    """

    k: jax.Array
    v: jax.Array
    log_weight: jax.Array


class TileShape(NamedTuple):
    """What a tile kernel's static layout needs of one `KeyTile`."""

    length: int  # t
    shared: bool  # one key set for every query block (`[B, K, 1, t, H]` with nb > 1)
    weight_per_block: bool  # log-weights differ between query blocks


def tile_shapes(q_shape, tiles_shapes) -> list[TileShape]:
    """Each tile's `TileShape` from blocked queries' shape `[B, K, G, nb, bq, H]` and every tile's (k shape,
    log-weight shape); raises on a tile whose keys are not `[B, K, nb | 1, t, H]`."""
    batch, kv_heads, _, nb, _, h = q_shape
    shapes = []
    for k_shape, w_shape in tiles_shapes:
        if (
            len(k_shape) != 5
            or tuple(k_shape[:2]) != (batch, kv_heads)
            or k_shape[2] not in (1, nb)
            or k_shape[-1] != h
        ):
            raise ValueError(
                f"tile keys must be [B, K, nb | 1, t, H] = [{batch}, {kv_heads}, {nb} | 1, t, {h}], got {k_shape}"
            )
        w_shape = (1,) * (4 - len(w_shape)) + tuple(w_shape)
        shapes.append(TileShape(k_shape[3], k_shape[2] == 1 and nb > 1, w_shape[2] != 1 and nb > 1))
    return shapes


def _pad_axis(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def block_query_layout(q, plan: SortLSHPlan):
    """Queries sorted and cut into blocks: `[B, K, G, T, H]` -> `[B, K, G, nb, bq, H]` (zero rows pad the end)."""
    q_sorted = _pad_axis(sort_rows(q, plan.query_order), 3, plan.num_blocks * plan.query_block)
    return q_sorted.reshape(*q.shape[:3], plan.num_blocks, plan.query_block, q.shape[-1])


def unblock_query_layout(x_blocks, plan: SortLSHPlan, num_queries: int):
    """Inverse of `block_query_layout` for outputs `[B, K, G, nb, bq, H]` -> `[B, K, G, T, H]`."""
    x = x_blocks.reshape(*x_blocks.shape[:3], -1, x_blocks.shape[-1])[..., :num_queries, :]
    return unsort_rows(x, plan.query_order)


def _block_tile_from_sorted(k_sorted, v_sorted, plan: SortLSHPlan) -> KeyTile:
    padded = plan.num_blocks * plan.key_block
    shape = (*k_sorted.shape[:2], plan.num_blocks, plan.key_block, k_sorted.shape[-1])
    k_blocks = _pad_axis(k_sorted[:, :, :padded], 2, padded).reshape(shape)
    v_blocks = _pad_axis(v_sorted[:, :, :padded], 2, padded).reshape(shape)
    is_real = (jnp.arange(padded) < plan.num_valid_keys[:, None])[:, None]  # valid keys sort first, padding last
    if plan.global_index is not None:  # global keys keep their slot in the hash order, masked there
        slot = jnp.take_along_axis(plan.key_order.inverse, plan.global_index, axis=-1)
        is_real = is_real & ~_pad_axis(positions_mask(slot, k_sorted.shape[2]), 2, padded)
    log_weight = jnp.where(is_real, 0.0, -jnp.inf).reshape(*is_real.shape[:2], plan.num_blocks, plan.key_block)
    return KeyTile(k_blocks, v_blocks, log_weight)


def _sorted_keys(k, v, plan: SortLSHPlan):
    return sort_rows(k, plan.key_order), sort_rows(v, plan.key_order)


def block_diagonal_tile(k, v, plan: SortLSHPlan) -> KeyTile:
    """The sortLSH key tile: sorted key block i for query block i; padding and global keys get log-weight -inf."""
    return _block_tile_from_sorted(*_sorted_keys(k, v, plan), plan)


def global_key_tile(k, v, plan: SortLSHPlan) -> KeyTile:
    """The exact global keys (sinks, heavy keys) shared by all query blocks, log-weight 0 (-inf for padding picked
    where too few keys are valid): `[B, K, 1, g, H]`."""
    index = plan.global_index
    is_real = index < plan.num_valid_keys[:, None, None]
    log_weight = jnp.where(is_real, 0.0, -jnp.inf)[:, :, None, :]
    return KeyTile(_take_keys(k, index), _take_keys(v, index), log_weight)


def _take_keys(x, index):
    """Rows `index` `[B, K, n]` of x `[B, K, S, H]`, as a shared tile `[B, K, 1, n, H]`."""
    return jnp.take_along_axis(x, index[..., None], axis=2)[:, :, None]


def sample_log_weights(plan: SortLSHPlan):
    """Each sample's log-weight log(1 / (m p_j)) as float32 `[B, K, m]` (-inf for dropped samples), before own-block
    exclusion; log(S / m) under the paper's uniform sampling."""
    if plan.sample_log_weight is None:
        m = plan.sample_index.shape[-1]
        return jnp.broadcast_to(jnp.log(plan.num_valid_keys / m)[:, None, None], plan.sample_index.shape)
    return plan.sample_log_weight


def sample_value_mix(plan: SortLSHPlan):
    """(lam `[B, K]`, mix `[B, K, m]`) such that the sampled values are attended as lam v_s + sum_t mix_t v_t
    (`shrink_sample_values`), or None when the plan has no lam. mix = (1 - lam) w_t / sum(w): the samples' mean value
    under their weights (`sample_log_weights`), an estimate of the residual keys' mean value."""
    if plan.sample_value_weight is None:
        return None
    weight = jnp.exp(sample_log_weights(plan))
    lam = plan.sample_value_weight
    total = jnp.maximum(jnp.sum(weight, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return lam, (1.0 - lam)[..., None] * weight / total


def shrink_sample_values(v_samples, plan: SortLSHPlan):
    """The sampled values as attended: lam v_s + (1 - lam) v_mean (`sample_value_mix`, lam the plan's
    `sample_value_weight` of `HyperAttentionConfig.sample_shrinkage`). Linear in v_samples `[B, K, 1, m, H]`;
    returned unchanged when the plan has no lam."""
    value_mix = sample_value_mix(plan)
    if value_mix is None:
        return v_samples
    lam, mix = value_mix
    acc = jnp.promote_types(v_samples.dtype, jnp.float32)
    mean = jnp.einsum("bkm,bkmh->bkh", mix, v_samples[:, :, 0].astype(acc))[:, :, None, None]
    return (lam[..., None, None, None] * v_samples.astype(acc) + mean).astype(v_samples.dtype)


def shrink_sample_values_transpose(d_values, lam, mix):
    """The transpose of `shrink_sample_values` for its (lam, mix): the cotangent of the raw sample values from that
    of the attended ones, d_values `[B, K, 1, m, H]`: lam d_s + mix_s sum_t d_t."""
    total = jnp.sum(d_values, axis=3, keepdims=True)
    return lam[..., None, None, None] * d_values + mix[:, :, None, :, None] * total


def sampled_residual_tile(k, v, plan: SortLSHPlan) -> KeyTile:
    """The residual tile: m sampled keys shared by all query blocks, weight 1/(m p_j), excluded from their own block,
    values shrunk toward their mean by the plan's lam (`shrink_sample_values`).

    Under the paper's uniform sampling the weight is S/m.
    """
    index = plan.sample_index
    sorted_position = jnp.take_along_axis(plan.key_order.inverse, index, axis=2)
    sample_block = sorted_position // plan.key_block  # [B, K, m]
    in_own_block = sample_block[:, :, None, :] == jnp.arange(plan.num_blocks)[:, None]  # [B, K, nb, m]
    log_weight = jnp.where(in_own_block, -jnp.inf, sample_log_weights(plan)[:, :, None, :])
    return KeyTile(_take_keys(k, index), shrink_sample_values(_take_keys(v, index), plan), log_weight)


def hyper_attention_tiles(k, v, plan: SortLSHPlan) -> list[KeyTile]:
    """Every key tile of non-causal HyperAttention under `plan`: blocks, then global keys, then samples."""
    tiles = [block_diagonal_tile(k, v, plan)]
    if plan.num_global:
        tiles.append(global_key_tile(k, v, plan))
    if plan.sample_index is not None:
        tiles.append(sampled_residual_tile(k, v, plan))
    return tiles


class TileRows(NamedTuple):
    """One key tile of a plan as row indices: `rows` int32 `[B, K, nb | 1, t]` (the key row in each slot, -1 for
    padding) and its additive `log_weight`, broadcastable to `[B, K, nb, t]` (see `KeyTile`)."""

    rows: jax.Array
    log_weight: jax.Array


def plan_rows(plan: SortLSHPlan, query_rows, key_rows) -> tuple[jax.Array, list[TileRows]]:
    """The plan as int32 row indices, the form kernels consume: (the query row in every blocked slot `[B, K, G, nb,
    bq]`, the tiles of `hyper_attention_tiles` as `TileRows`); -1 marks padding.

    `query_rows` int32 `[B, K, G, T, 1]` and `key_rows` `[B, K, S, 1]` name the row each of the plan's queries and
    keys stands for (e.g. its position in a larger array the kernel reads: the causal levels cut their problems from
    one sequence); `jnp.arange` rows give positions within the plan's own problem.

    >>> import hyperattn_jax as ha
    >>> q = jax.random.normal(jax.random.key(0), (1, 1, 1, 64, 8))  # [B, K, G, T, H]
    >>> config = ha.HyperAttentionConfig.paper(block_size=16)
    >>> plan = ha.ops.make_plan(q, q[:, :, 0], key=jax.random.key(1), config=config)
    >>> rows = jnp.arange(64, dtype=jnp.int32)[:, None]
    >>> query_index, tiles = plan_rows(plan, jnp.broadcast_to(rows, (1, 1, 1, 64, 1)), rows[None, None])
    >>> query_index.shape, [tile.rows.shape for tile in tiles]
    ((1, 1, 1, 4, 16), [(1, 1, 4, 16), (1, 1, 1, 256)])
    """
    # Shifted by one so that the zero rows the layout functions pad with read as -1.
    query_index = block_query_layout(query_rows + 1, plan)[..., 0] - 1
    key_rows = key_rows + 1
    row_tiles = hyper_attention_tiles(key_rows, key_rows, plan.replace(sample_value_weight=None))  # rows: no shrinking
    tiles = [TileRows(tile.k[..., 0] - 1, tile.log_weight) for tile in row_tiles]
    return query_index, tiles
