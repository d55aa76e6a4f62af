"""Sorting by LSH rank and permutation gathers whose gradient is a gather, not a scatter-add."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_INT32_MAX = 2**31 - 1


class SortOrder(NamedTuple):
    """A stable sort of the last axis: `sorted = x[perm]` and `x = sorted[inverse]` (both int32 `[..., L]`)."""

    perm: jax.Array
    inverse: jax.Array


def sort_order(rank, num_ranks: int) -> SortOrder:
    """Stable sort order of int ranks in `[0, num_ranks)` along the last axis.

    Up to 256 ranks (hashes of up to 8 projections): a stable sort of (uint8 rank, int32 position) pairs, which XLA
    runs as a one-byte radix sort on the GPU (0.27 vs 0.47 ms for 32 x 65536 ranks on an H100, and 1.7-1.9x faster
    from 4096 to 131072 per row; `experiments/results/sort_probe.json`). More ranks: `rank * L + position` packed in
    one int32 (the position breaks ties and is recovered as the permutation), or a stable argsort where that would
    not fit in int32.
    """
    perm = _sort_permutation(rank, num_ranks)
    return SortOrder(perm, inverse_permutation(perm))


def _sort_permutation(rank, num_ranks: int):
    length = rank.shape[-1]
    axis = rank.ndim - 1
    position = jax.lax.broadcasted_iota(jnp.int32, rank.shape, axis)
    if num_ranks <= 256:
        _, perm = jax.lax.sort((rank.astype(jnp.uint8), position), dimension=axis, is_stable=True, num_keys=1)
        return perm
    if num_ranks * length <= _INT32_MAX:
        return jax.lax.sort(rank.astype(jnp.int32) * length + position, dimension=axis) % length
    return jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)


def sort_orders(ranks, num_ranks: int) -> list[SortOrder]:
    """`[sort_order(rank, num_ranks) for rank in ranks]`, as one sort where the arrays share their last axis length
    (e.g. the queries and keys of a self-attention plan): fewer small kernels between the attention kernels. Each
    array keeps its own inverse scatter, so XLA drops the ones a caller never reads (the fused forward reads only the
    keys')."""
    lengths = {rank.shape[-1] for rank in ranks}
    if len(ranks) == 1 or len(lengths) > 1:
        return [sort_order(rank, num_ranks) for rank in ranks]
    (length,) = lengths
    joint = _sort_permutation(jnp.concatenate([rank.reshape(-1, length) for rank in ranks]), num_ranks)
    orders, start = [], 0
    for rank in ranks:
        rows = rank.size // length
        perm = joint[start : start + rows].reshape(rank.shape)
        orders.append(SortOrder(perm, inverse_permutation(perm)))
        start += rows
    return orders


def _flat_rows(index, lead_shape, length: int):
    """index `[..., L']` into rows of length `length` (leading dims broadcast to lead_shape) as uint32 positions in
    the flattened `[*lead, length]` array: row r's entries offset by r * length. Unsigned indices promised in bounds
    keep jnp from wrapping negative ones and from building one index array per leading axis (XLA materialized those
    next to every gather and scatter); the offsets fuse into the consumer."""
    index = jnp.broadcast_to(index, (*lead_shape, index.shape[-1])).reshape(-1, index.shape[-1])
    if index.shape[0] * length >= 2**31:  # jnp indexes in int32 below that
        raise ValueError(f"at most 2**31 - 1 rows per gather, got {index.shape[0] * length}")
    offset = jax.lax.broadcasted_iota(jnp.uint32, index.shape, 0) * jnp.uint32(length)
    return (index.astype(jnp.uint32) + offset).reshape(-1)


def inverse_permutation(perm):
    """inverse[..., perm[..., i]] = i, as one scatter with unique indices (cheaper than a second sort)."""
    position = jax.lax.broadcasted_iota(perm.dtype, perm.shape, perm.ndim - 1).reshape(-1)
    flat = jnp.zeros(perm.size, perm.dtype).at[_flat_rows(perm, perm.shape[:-1], perm.shape[-1])]
    return flat.set(position, unique_indices=True, mode="promise_in_bounds").reshape(perm.shape)


def _take_rows(x, index):
    """`x[..., index, :]` along the second-to-last axis for int32 index `[..., L']` (leading dims broadcast with
    x's), as one gather of flattened rows."""
    lead = jnp.broadcast_shapes(x.shape[:-2], index.shape[:-1])
    x = jnp.broadcast_to(x, (*lead, *x.shape[-2:]))
    flat = _flat_rows(index, lead, x.shape[-2])
    rows = x.reshape(-1, x.shape[-1]).at[flat].get(mode="promise_in_bounds")
    return rows.reshape(*lead, index.shape[-1], x.shape[-1])


@jax.custom_vjp
def gather_rows(x, perm, inverse):
    """`x[..., perm, :]` along the second-to-last axis, for a permutation `perm` with inverse `inverse`.

    x `[..., L, H]`, perm and inverse `[..., L]` (leading dims broadcastable to x's). The gradient is the gather by
    the inverse permutation: autodiff of a gather would transpose to a slow, nondeterministic scatter-add.
    """
    return _take_rows(x, perm)


def _gather_rows_fwd(x, perm, inverse):
    return gather_rows(x, perm, inverse), inverse


def _gather_rows_bwd(inverse, grad):
    return _take_rows(grad, inverse), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def sort_rows(x, order: SortOrder):
    """Rows of x `[..., L, H]` in sorted order."""
    return gather_rows(x, order.perm, order.inverse)


def unsort_rows(x_sorted, order: SortOrder):
    """Inverse of `sort_rows`: rows back in their original order."""
    return gather_rows(x_sorted, order.inverse, order.perm)


def positions_mask(index, length: int):
    """bool `[..., length]`: True at the positions `index` `[..., n]` names (a scatter, not an n x length compare)."""
    flat = index.reshape(-1, index.shape[-1])
    marked = jnp.zeros((flat.shape[0], length), bool).at[jnp.arange(flat.shape[0])[:, None], flat].set(True)
    return marked.reshape(*index.shape[:-1], length)
