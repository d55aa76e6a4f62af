"""The random-key schedule: every random draw of HyperAttention comes from one PRNG key through these functions.

A plan's key splits into the LSH hyperplanes' key and a sample key; plans with accuracy options split the sample key
again into the column-mass probe's key and the sample draws' key. The causal recursion splits its key once per level
into that level's off-diagonal key and the key of the levels below. Backends (the kernels, the sharded paths) take
their keys from here, so the same key gives the same hash, probe rows and samples everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class PlanKeys(NamedTuple):
    """The keys of one plan: `hash` draws the LSH hyperplanes, `samples` the paper's uniform samples, `probe` the
    column-mass probe rows and `draws` the option plans' sample positions."""

    hash: jax.Array
    samples: jax.Array
    probe: jax.Array
    draws: jax.Array


def plan_keys(key, hash_key=None) -> PlanKeys:
    """The keys `make_plan(key=key, hash_key=hash_key)` uses; `hash_key`, when given, replaces the hyperplanes' key.

    >>> keys = plan_keys(jax.random.key(0))
    >>> bool(jax.numpy.all(jax.random.key_data(keys.hash) != jax.random.key_data(keys.samples)))
    True
    """
    own_hash_key, sample_key = jax.random.split(key)
    probe_key, draw_key = jax.random.split(sample_key)
    return PlanKeys(own_hash_key if hash_key is None else hash_key, sample_key, probe_key, draw_key)


def split_level(key) -> tuple[jax.Array, jax.Array]:
    """(this level's off-diagonal key, the key of the levels below) in the causal recursion."""
    off_diagonal_key, deeper_key = jax.random.split(key)
    return off_diagonal_key, deeper_key


def level_keys(key, depth: int) -> list[jax.Array]:
    """The off-diagonal keys of the causal recursion's `depth` levels, top level first (`split_level` repeated)."""
    keys = []
    for _ in range(depth):
        off_diagonal_key, key = split_level(key)
        keys.append(off_diagonal_key)
    return keys
