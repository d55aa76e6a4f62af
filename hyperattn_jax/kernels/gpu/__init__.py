"""Pallas GPU kernels, lowered through Triton (they also run in the Pallas interpreter on CPU, for tests)."""

from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig, fused_tiled_attention

__all__ = ["TiledKernelConfig", "fused_tiled_attention"]
