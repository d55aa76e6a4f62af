"""The random draws of the single-device plan, reproduced for a device that holds a slice of the batch or the heads.

`make_plan` draws the LSH hyperplanes from `plan_keys(key).hash` (shared by every batch element and head) and the
residual samples as one `[B, K, m]` array from `plan_keys(key).samples`. A sharded device must see exactly the
slice of that array that the single-device call gives its batch elements and heads, so it draws the whole array (B*K*m
int32: tiny) and slices it. Folding the axis index into the key instead would give every shard fresh, different
samples: still a valid estimator, but no longer the single-device answer. `tests/test_parallel.py` checks these
draws against `make_plan` itself, so a change of the single-device draws shows up as a failing test, not a silent drift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.ops.keys import plan_keys

# Options of the accuracy work whose draws depend on all keys of a head (probes, weighted sampling) or that change the
# recursion (windows): the sharded strategies reproduce the published plan only, so they refuse these by name.
_PAPER_VALUES = {
    "num_sink_keys": 0,
    "num_heavy_keys": 0,
    "sample_distribution": "uniform",
    "sample_scheme": "independent",
    "local_window": 0,
}


def check_paper_plan(config: HyperAttentionConfig, where: str) -> None:
    """Raise ValueError naming every accuracy option that differs from the published algorithm."""
    changed = {
        name: getattr(config, name) for name, paper in _PAPER_VALUES.items() if getattr(config, name, paper) != paper
    }
    if changed:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        raise ValueError(
            f"{where} reproduces the published plan only (uniform independent samples, no sinks, heavy keys or "
            f"window); got {settings}. Use HyperAttentionConfig.paper(...) or the single-device hyper_attention."
        )


def plan_sample_index(key, *, batch: int, kv_heads: int, num_keys: int, config: HyperAttentionConfig):
    """The samples `make_plan(key=key)` draws for `batch` x `kv_heads` heads over `num_keys` keys: int32 `[B, K, m]`."""
    if config.sample_size == 0:
        return None
    sample_key = plan_keys(key).samples
    num_valid = jnp.full((batch,), num_keys, jnp.int32)
    shape = (batch, kv_heads, config.sample_size)
    return jax.random.randint(sample_key, shape, 0, num_valid[:, None, None], dtype=jnp.int32)


def sample_slice(
    key,
    *,
    local_batch: int,
    batch_shards: int,
    batch_index,
    kv_heads: int,
    head_shards: int,
    head_index,
    num_keys: int,
    config: HyperAttentionConfig,
    stacked: int = 1,
):
    """This device's slice of the single-device samples: int32 `[stacked * local_batch, kv_heads, m]`, or None.

    The full problem has `local_batch * batch_shards` batch elements and `kv_heads * head_shards` kv heads; this device
    holds batch block `batch_index` and head block `head_index` (traced ints from `jax.lax.axis_index`). `stacked`: the
    causal recursion stacks its sub-problems on the batch axis (index = copy * batch + b), `stacked` copies of it.
    """
    full = plan_sample_index(
        key,
        batch=stacked * local_batch * batch_shards,
        kv_heads=kv_heads * head_shards,
        num_keys=num_keys,
        config=config,
    )
    if full is None:
        return None
    full = full.reshape(stacked, local_batch * batch_shards, kv_heads * head_shards, config.sample_size)
    mine = jax.lax.dynamic_slice_in_dim(full, batch_index * local_batch, local_batch, axis=1)
    mine = jax.lax.dynamic_slice_in_dim(mine, head_index * kv_heads, kv_heads, axis=2)
    return mine.reshape(stacked * local_batch, kv_heads, config.sample_size)
