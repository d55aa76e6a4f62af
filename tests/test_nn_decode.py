"""KV-cache decoding of the native layers: prefill, then one token at a time, against full forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.nn import linen as ha_linen
from hyperattn_jax.nn import nnx as ha_nnx
from hyperattn_jax.nn import rope_qk

PROMPT, STEPS = 128, 6
EXACT = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=4096)
HYPER = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=64)


def _x(rng):
    return jnp.asarray(rng.standard_normal((2, PROMPT + STEPS, 32)), jnp.float32)


def _linen_decode(config, x, sample_key):
    """Returns (prefill output, step outputs, params) of a linen layer decoding x after a PROMPT-token prefill."""
    make = lambda decode: ha_linen.HyperAttention(
        num_heads=4, num_kv_heads=2, config=config, qk_transform=rope_qk(), decode=decode
    )
    variables = make(True).init(jax.random.key(0), x)  # sizes the cache to the full length
    params, lsh, cache = variables["params"], variables["lsh"], variables["cache"]
    decoder = make(True)

    @jax.jit
    def call(cache, tokens):
        out, updated = decoder.apply(
            {"params": params, "lsh": lsh, "cache": cache}, tokens, sample_key=sample_key, mutable=["cache"]
        )
        return out, updated["cache"]

    prefill, cache = call(cache, x[:, :PROMPT])
    steps = []
    for i in range(PROMPT, PROMPT + STEPS):
        out, cache = call(cache, x[:, i : i + 1])
        steps.append(out)
    assert int(cache["cache_index"]) == PROMPT + STEPS
    return prefill, jnp.concatenate(steps, axis=1), {"params": params, "lsh": lsh}, make(False)


def test_linen_decode_equals_full_forward_when_exact(rng):
    x = _x(rng)
    prefill, steps, variables, full_layer = _linen_decode(EXACT, x, jax.random.key(1))
    full = full_layer.apply(variables, x)
    np.testing.assert_allclose(prefill, full[:, :PROMPT], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(steps, full[:, PROMPT:], atol=2e-5, rtol=2e-5)


def test_linen_hyper_prefill_then_exact_steps_over_the_cache(rng):
    x = _x(rng)
    key = jax.random.key(2)
    prefill, steps, variables, full_layer = _linen_decode(HYPER, x, key)
    # The prefill is HyperAttention over the prompt, the same call as a plain forward with the same key ...
    np.testing.assert_allclose(prefill, full_layer.apply(variables, x[:, :PROMPT], sample_key=key), atol=2e-5)
    # ... and each step attends the cache exactly (a single layer's keys do not depend on earlier outputs).
    exact = full_layer.clone(attention="exact").apply(variables, x)
    np.testing.assert_allclose(steps, exact[:, PROMPT:], atol=2e-5, rtol=2e-5)


def test_nnx_decode_matches_full_forward(rng):
    x = _x(rng)
    key = jax.random.key(3)
    step = nnx.jit(lambda m, t: m(t, sample_key=key))
    for config in (EXACT, HYPER):
        layer = ha_nnx.HyperAttention(32, 4, num_kv_heads=2, config=config, qk_transform=rope_qk(), rngs=nnx.Rngs(0))
        prefill_want = layer(x[:, :PROMPT], sample_key=key)
        layer.attention = "exact"
        steps_want = layer(x)[:, PROMPT:]
        layer.attention = "hyper"
        layer.init_cache(2, PROMPT + STEPS)
        layer.decode = True
        prefill = step(layer, x[:, :PROMPT])
        steps = jnp.concatenate([step(layer, x[:, i : i + 1]) for i in range(PROMPT, PROMPT + STEPS)], axis=1)
        np.testing.assert_allclose(prefill, prefill_want, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(steps, steps_want, atol=2e-5, rtol=2e-5)


def test_nnx_decode_without_cache_is_a_clear_error(rng):
    layer = ha_nnx.HyperAttention(32, 4, config=EXACT, decode=True, rngs=nnx.Rngs(0))
    try:
        layer(_x(rng)[:, :1])
    except ValueError as error:
        assert "init_cache" in str(error)
    else:
        raise AssertionError("decoding without a cache must fail")


def test_flax_cache_layout(rng):
    """The cache follows Flax's conventions: cached_key/cached_value [B, L, K, H] and an int32 cache_index."""
    x = _x(rng)
    cache = ha_linen.HyperAttention(num_heads=4, num_kv_heads=2, decode=True).init(jax.random.key(0), x)["cache"]
    assert cache["cached_key"].shape == cache["cached_value"].shape == (2, PROMPT + STEPS, 2, 8)
    assert cache["cache_index"].dtype == jnp.int32 and int(cache["cache_index"]) == 0
