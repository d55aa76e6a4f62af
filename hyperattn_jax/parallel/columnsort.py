"""A distributed sort with fixed-size collectives (Leighton's Columnsort), replayable on data and invertible.

Sorting by LSH rank sends each element to the device that owns its sorted position, and how many elements go from
device i to device j depends on the data. `ragged_all_to_all` would move exactly those, but XLA:CPU does not implement
it and padding every message to its worst case costs O(S) per device. Columnsort (T. Leighton, "Tight bounds on the
complexity of parallel sorting", 1985) sorts an r x s matrix held one column per device with four local sorts and
four fixed data movements (two all_to_all, two half-column shifts to a neighbour), provided r >= 2 (s - 1)^2 and s
divides r. Every message has a static size, so each step moves r / s rows per device pair: O(S/P) per device.

`column_sort` sorts unique int keys and records the local permutations (a `ColumnSortNetwork`); `route` replays the
network on data rows (k, v or q) and `unroute` sends rows back where they came from. Both are linear maps built from
`gather_rows`, `all_to_all` and `ppermute`, so they differentiate (their transposes are each other).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax.ops.sorting import SortOrder, gather_rows, inverse_permutation


class ColumnSortNetwork(NamedTuple):
    """The local sorts of one distributed sort (each `[..., r]`): steps 1, 3, 5 of Columnsort and the shifted step 7."""

    first: SortOrder
    second: SortOrder
    third: SortOrder
    shifted: SortOrder


def min_column_length(num_shards: int) -> int:
    """Columnsort's condition r >= 2 (s - 1)^2 for s columns (devices)."""
    return 2 * (num_shards - 1) ** 2


def column_sort_problem(length: int, num_shards: int) -> str | None:
    """Why `length` rows per device cannot be column-sorted over `num_shards` devices, or None if they can."""
    need = min_column_length(num_shards)
    if length < need:
        return f"{length} rows per device is below Columnsort's minimum 2 (P - 1)^2 = {need} for P={num_shards}"
    if length % num_shards or length % 2:
        return f"{length} rows per device must be even and divisible by the number of devices P={num_shards}"
    return None


def _local_sort(keys):
    """Sort the last axis of int `keys`; returns the sorted keys and the `SortOrder` that did it."""
    last = keys.ndim - 1
    position = jax.lax.broadcasted_iota(jnp.int32, keys.shape, last)
    # The keys (rank * length + global position) carry no local index, so the permutation rides along as a second
    # operand: a pair sort, slower than one packed int32 on GPU, but it needs no second sort.
    sorted_keys, perm = jax.lax.sort((keys, position), dimension=last, num_keys=1, is_stable=True)
    return sorted_keys, SortOrder(perm, inverse_permutation(perm))


def _deal(x, axis: int, axis_name, num_shards: int):
    """Columnsort's "transpose": row i of device j goes to device i % P, row j * r / P + i // P there."""
    r = x.shape[axis]
    x = x.reshape(*x.shape[:axis], r // num_shards, num_shards, *x.shape[axis + 1 :])
    x = jax.lax.all_to_all(x, axis_name, axis + 1, axis, tiled=True)
    return x.reshape(*x.shape[:axis], r, *x.shape[axis + 2 :])


def _undeal(x, axis: int, axis_name, num_shards: int):
    """The inverse of `_deal`: row j * r / P + t of device c goes back to device j, row t * P + c."""
    r = x.shape[axis]
    x = x.reshape(*x.shape[:axis], num_shards, r // num_shards, 1, *x.shape[axis + 1 :])
    x = jax.lax.all_to_all(x, axis_name, axis, axis + 2, tiled=True)
    return x.reshape(*x.shape[:axis], r, *x.shape[axis + 3 :])


def _to_next(x, axis_name, num_shards: int):
    return jax.lax.ppermute(x, axis_name, [(j, j + 1) for j in range(num_shards - 1)])


def _to_previous(x, axis_name, num_shards: int):
    return jax.lax.ppermute(x, axis_name, [(j + 1, j) for j in range(num_shards - 1)])


def column_sort(keys, axis_name):
    """Sort unique int keys `[..., r]` held as r-row columns along `axis_name`; call inside `shard_map`.

    Every leading index is an independent sort. After it, device j holds the sorted positions [j r, (j + 1) r) of the
    concatenation of all devices' keys. Needs `column_sort_problem(r, P) is None`. Returns the sorted keys `[..., r]`
    and the `ColumnSortNetwork` that `route` and `unroute` replay on data.
    """
    num_shards, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    last = keys.ndim - 1
    keys, first = _local_sort(keys)
    keys, second = _local_sort(_deal(keys, last, axis_name, num_shards))
    keys, third = _local_sort(_undeal(keys, last, axis_name, num_shards))
    # Shift by half a column: device j sorts [bottom half of device j-1; its own top half] (device 0 puts sentinels
    # below everything in the missing half) and sends the first half of the result back to j-1 as its bottom half.
    half = keys.shape[-1] // 2
    top, bottom = keys[..., :half], keys[..., half:]
    received = _to_next(bottom, axis_name, num_shards)
    received = jnp.where(index == 0, jnp.iinfo(keys.dtype).min, received)
    merged, shifted = _local_sort(jnp.concatenate([received, top], axis=-1))
    returned = _to_previous(merged[..., :half], axis_name, num_shards)
    bottom = jnp.where(index == num_shards - 1, bottom, returned)  # the last device's bottom half is already final
    return jnp.concatenate([merged[..., half:], bottom], axis=-1), ColumnSortNetwork(first, second, third, shifted)


def route(x, network: ColumnSortNetwork, axis_name):
    """Move data rows `x` `[..., r, F]` the way `column_sort` moved their keys (leading dims broadcast to the keys')."""
    num_shards, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    rows = x.ndim - 2
    x = gather_rows(x, network.first.perm, network.first.inverse)
    x = gather_rows(_deal(x, rows, axis_name, num_shards), network.second.perm, network.second.inverse)
    x = gather_rows(_undeal(x, rows, axis_name, num_shards), network.third.perm, network.third.inverse)
    half = x.shape[-2] // 2
    top, bottom = x[..., :half, :], x[..., half:, :]
    # Device 0 receives zeros here: they sit where its sentinels sorted, and that half is sent to no one.
    merged = jnp.concatenate([_to_next(bottom, axis_name, num_shards), top], axis=-2)
    merged = gather_rows(merged, network.shifted.perm, network.shifted.inverse)
    returned = _to_previous(merged[..., :half, :], axis_name, num_shards)
    bottom = jnp.where(index == num_shards - 1, bottom, returned)
    return jnp.concatenate([merged[..., half:, :], bottom], axis=-2)


def unroute(y, network: ColumnSortNetwork, axis_name):
    """The inverse of `route`: rows `[..., r, F]` in sorted placement go back to where their keys started."""
    num_shards, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    rows = y.ndim - 2
    half = y.shape[-2] // 2
    top, bottom = y[..., :half, :], y[..., half:, :]
    merged = jnp.concatenate([_to_next(bottom, axis_name, num_shards), top], axis=-2)
    merged = gather_rows(merged, network.shifted.inverse, network.shifted.perm)
    returned = _to_previous(merged[..., :half, :], axis_name, num_shards)
    bottom = jnp.where(index == num_shards - 1, bottom, returned)
    x = jnp.concatenate([merged[..., half:, :], bottom], axis=-2)
    x = _deal(gather_rows(x, network.third.inverse, network.third.perm), rows, axis_name, num_shards)
    x = _undeal(gather_rows(x, network.second.inverse, network.second.perm), rows, axis_name, num_shards)
    return gather_rows(x, network.first.inverse, network.first.perm)
