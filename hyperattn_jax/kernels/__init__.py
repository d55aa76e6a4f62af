"""Pallas kernels. Each one has a jnp twin in `hyperattn_jax.ops` computing the same math (the tests compare them)."""
