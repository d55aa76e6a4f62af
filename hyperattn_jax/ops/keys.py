"""The random-key schedule: every random draw of HyperAttention comes from one PRNG key through these functions.

A plan's key splits into the LSH hyperplanes' key and a sample key; plans with accuracy options split the sample key
again into the column-mass probe's key and the sample draws' key. The causal recursion splits its key once per level
into that level's off-diagonal key and the key of the levels below. Backends (the kernels, the sharded paths) take
their keys from here, so the same key gives the same hash, probe rows and samples everywhere.

The draws that have one value per problem and kv head (`draw_uniform`, `draw_index`: `[P, K, ...]`, P = batch
elements, stacked per recursion level) take either a key or a `ShardKey`: the key of a device that holds a block of
the batch and of the kv heads (the sequence-sharded strategies). A `ShardKey` draws the whole problem's array and keeps
its block, so a device's plan is the single-device plan's slice for the same key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class PlanKeys(NamedTuple):
    """The keys of one plan: `hash` draws the LSH hyperplanes, `samples` the paper's uniform samples, `probe` the
    column-mass probe rows and `draws` the option plans' sample positions."""

    hash: jax.Array
    samples: jax.Array
    probe: jax.Array
    draws: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("key", "batch_index", "head_index"),
    meta_fields=("local_batch", "batch_shards", "head_shards"),
)
@dataclasses.dataclass(frozen=True)
class ShardKey:
    """A PRNG key for one device's block of a problem: batch elements `[batch_index * local_batch, ...)` of
    `local_batch * batch_shards` and kv-head block `head_index` of `head_shards` equal blocks.

    Pass it wherever a plan's key goes (a backend's `attention`, `make_plan`): the per-head draws are the
    single-device draws of `key` for the whole problem, sliced to this block (stacked recursion levels included, whose
    problem index is copy * batch + b). The indices may be traced (`jax.lax.axis_index`).
    """

    key: jax.Array
    batch_index: jax.Array | int
    head_index: jax.Array | int
    local_batch: int
    batch_shards: int = 1
    head_shards: int = 1

    def take(self, draw, shape, tile=()):
        """`draw(full_shape, *tiled)` for the whole problem, cut to this block's `shape` `[stacked * local_batch, K,
        ...]`; each of `tile` (broadcastable to `shape`) is repeated over the other blocks first."""
        problems, heads, *rest = shape
        if problems % self.local_batch:
            raise ValueError(f"{problems=} draws are not whole copies of this block's local_batch={self.local_batch}")
        stacked = problems // self.local_batch
        blocked = (stacked, self.local_batch, heads, *rest)
        repeats = (1, self.batch_shards, self.head_shards, *[1] * len(rest))
        full_shape = (problems * self.batch_shards, heads * self.head_shards, *rest)
        tiled = [jnp.tile(jnp.broadcast_to(x, shape).reshape(blocked), repeats).reshape(full_shape) for x in tile]
        full = draw(full_shape, *tiled).reshape(stacked, self.local_batch * self.batch_shards, -1, *rest)
        mine = jax.lax.dynamic_slice_in_dim(full, self.batch_index * self.local_batch, self.local_batch, axis=1)
        return jax.lax.dynamic_slice_in_dim(mine, self.head_index * heads, heads, axis=2).reshape(shape)


def _split(key):
    """jax.random.split for a key or a ShardKey (both halves keep the block)."""
    if isinstance(key, ShardKey):
        first, second = jax.random.split(key.key)
        return dataclasses.replace(key, key=first), dataclasses.replace(key, key=second)
    first, second = jax.random.split(key)
    return first, second


def _plain(key):
    return key.key if isinstance(key, ShardKey) else key


def plan_keys(key, hash_key=None) -> PlanKeys:
    """The keys `make_plan(key=key, hash_key=hash_key)` uses; `hash_key`, when given, replaces the hyperplanes' key.
    `hash` and `probe` draw arrays shared by every head (plain keys); `samples` and `draws` keep a `ShardKey`'s block.

    >>> keys = plan_keys(jax.random.key(0))
    >>> bool(jax.numpy.all(jax.random.key_data(keys.hash) != jax.random.key_data(keys.samples)))
    True
    """
    own_hash_key, sample_key = _split(key)
    probe_key, draw_key = _split(sample_key)
    return PlanKeys(_plain(own_hash_key) if hash_key is None else hash_key, sample_key, _plain(probe_key), draw_key)


def split_level(key) -> tuple[jax.Array, jax.Array]:
    """(this level's off-diagonal key, the key of the levels below) in the causal recursion."""
    off_diagonal_key, deeper_key = _split(key)
    return off_diagonal_key, deeper_key


def level_keys(key, depth: int) -> list[jax.Array]:
    """The off-diagonal keys of the causal recursion's `depth` levels, top level first (`split_level` repeated)."""
    keys = []
    for _ in range(depth):
        off_diagonal_key, key = split_level(key)
        keys.append(off_diagonal_key)
    return keys


def draw_uniform(key, shape) -> jax.Array:
    """float32 uniforms in [0, 1) of `shape` `[P, K, ...]` (one row per problem and kv head) from a key or ShardKey."""
    if isinstance(key, ShardKey):
        return key.take(lambda full: jax.random.uniform(key.key, full, jnp.float32), shape)
    return jax.random.uniform(key, shape, jnp.float32)


def draw_index(key, shape, num_valid) -> jax.Array:
    """int32 indices uniform in [0, num_valid) of `shape` `[P, K, ...]` (num_valid broadcastable to it) from a key or
    ShardKey: the paper's samples with replacement."""
    if isinstance(key, ShardKey):
        return key.take(
            lambda full, high: jax.random.randint(key.key, full, 0, high, dtype=jnp.int32), shape, (num_valid,)
        )
    return jax.random.randint(key, shape, 0, num_valid, dtype=jnp.int32)
