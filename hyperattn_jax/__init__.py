"""hyperattn_jax: HyperAttention (arXiv:2310.05869), near-linear-time approximate attention for JAX.

>>> import jax, hyperattn_jax as ha
>>> q = k = v = jax.random.normal(jax.random.key(0), (1, 1024, 2, 32))
>>> ha.hyper_attention(q, k, v, key=jax.random.key(1), config=ha.HyperAttentionConfig(min_seq_len=256)).shape
(1, 1024, 2, 32)
"""

from hyperattn_jax import diagnostics, ops, parallel
from hyperattn_jax.api import hyper_attention, merge_attention
from hyperattn_jax.backends import explain
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.dot_product import dot_product_attention
from hyperattn_jax.lsh import gray_rank, lsh_codes, lsh_projections, lsh_rank
from hyperattn_jax.reference import exact_attention

__version__ = "0.1.0"

__all__ = [
    "HyperAttentionConfig",
    "diagnostics",
    "dot_product_attention",
    "exact_attention",
    "explain",
    "gray_rank",
    "hyper_attention",
    "lsh_codes",
    "lsh_projections",
    "lsh_rank",
    "merge_attention",
    "ops",
    "parallel",
]
