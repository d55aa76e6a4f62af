"""Flax integration: `make_attention_fn` (drop-in `attention_fn`), and native layers in `hyperattn_jax.nn.linen` and
`hyperattn_jax.nn.nnx`. This is the only subpackage that imports Flax; import the layer module you need.

>>> from hyperattn_jax.nn import make_attention_fn
>>> import flax.linen as nn
>>> layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn())
"""

from hyperattn_jax.nn.attention_fn import make_attention_fn
from hyperattn_jax.nn.functional import ATTENTION_KINDS, apply_rope, attend, rope_qk

__all__ = ["ATTENTION_KINDS", "apply_rope", "attend", "make_attention_fn", "rope_qk"]
