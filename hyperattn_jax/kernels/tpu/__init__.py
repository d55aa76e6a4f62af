"""Pallas TPU (Mosaic) kernels. Each has a jnp `_reference` twin beside it; on CPU they run in TPU interpret mode."""

from hyperattn_jax.kernels.tpu.tiled_attention import TpuTiling, tiled_attention_tpu
from hyperattn_jax.kernels.tpu.vmem import VMEM_LIMIT_BYTES

__all__ = ["VMEM_LIMIT_BYTES", "TpuTiling", "tiled_attention_tpu"]
