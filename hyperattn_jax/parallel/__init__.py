"""Sequence-sharded HyperAttention with `jax.shard_map` (docs/sharding.md).

`sharded_hyper_attention` takes global arrays sharded over a mesh axis; `hyper_attention_shard` is the same inside a
user's own `shard_map`. Both give the single-device `hyper_attention` result for the same key. No pmap-style wrapper:
jax steers users to `shard_map`, and a mesh plus `NamedSharding` describes every layout a pmap could.
"""

from hyperattn_jax.parallel.sharded import STRATEGIES, hyper_attention_shard, sharded_hyper_attention

__all__ = ["STRATEGIES", "hyper_attention_shard", "sharded_hyper_attention"]
