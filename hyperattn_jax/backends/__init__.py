"""Backends: one module per technology behind one signature, and the registry that picks which runs.

A backend module provides `NAME`, `PLATFORMS` (the jax platforms it targets, None for any), `unsupported(*, dtype,
head_dim, config, causal) -> str | None` (why it cannot take a call) and `attention(q, k, v, key, kv_length,
hash_key, *, config, causal, scale, interpret)` -> (out `[B, T, N, H]`, lse `[B, K, G, T]` float32), computed on the
plan `ops.make_plan` draws for `key`. Adding a backend is adding a module and its name to `registry.BACKENDS`.
"""

from hyperattn_jax.backends.registry import BACKENDS, Choice, choose, explain, get_backend

__all__ = ["BACKENDS", "Choice", "choose", "explain", "get_backend"]
