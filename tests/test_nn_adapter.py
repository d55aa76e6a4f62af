"""`make_attention_fn` as the attention_fn of Flax's own modules (linen and nnx): signature, masks, errors."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.nn import make_attention_fn

EXACT = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=4096)
HYPER = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=64)
# Every keyword nnx.MultiHeadAttention passes, and those linen passes when the signature declares them.
NNX_KWARGS = ("mask", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype", "precision")
NNX_KWARGS += ("module", "is_causal")


def _x(rng, b=2, t=96, d=32):
    return jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)


def test_signature_accepts_what_flax_passes():
    params = inspect.signature(make_attention_fn(EXACT)).parameters
    assert list(params)[:3] == ["query", "key", "value"]
    assert set(NNX_KWARGS) <= set(params)
    assert "bias" in params


def test_linen_adapter_equals_flax_attention_with_causal_and_padding_masks(rng):
    x = _x(rng)
    lengths = jnp.array([96, 61])
    valid = jnp.arange(x.shape[1]) < lengths[:, None]
    causal_mask = nn.make_causal_mask(valid)
    padding_mask = nn.make_attention_mask(valid, valid)
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=4)
    params = flax_layer.init(jax.random.key(0), x)
    both = nn.combine_masks(causal_mask, padding_mask)
    for causal, mask in ((True, causal_mask), (True, both), (False, padding_mask)):
        ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(EXACT, causal=causal))
        got = jax.jit(lambda p, x, m, ours=ours: ours.apply(p, x, mask=m))(params, x, mask)
        want = flax_layer.apply(params, x, mask=mask)
        # Rows of padded queries are unspecified; real queries must agree.
        np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(got[1, :61], want[1, :61], atol=2e-5, rtol=2e-5)


def test_nnx_adapter_equals_flax_attention(rng):
    x = _x(rng)
    ours = nnx.MultiHeadAttention(4, 32, attention_fn=make_attention_fn(EXACT), decode=False, rngs=nnx.Rngs(0))
    flax_layer = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0))  # same seed: same weights
    np.testing.assert_allclose(ours(x, is_causal=True), flax_layer(x, is_causal=True), atol=2e-5, rtol=2e-5)
    lengths = jnp.array([96, 50])
    valid = jnp.arange(96) < lengths[:, None]
    mask = nnx.make_attention_mask(valid, valid)
    np.testing.assert_allclose(ours(x, mask=mask)[1, :50], flax_layer(x, mask=mask)[1, :50], atol=2e-5, rtol=2e-5)


def test_adapter_hyper_path_is_deterministic_and_approximate(rng):
    x = _x(rng, b=1, t=128)
    layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(HYPER, causal=True))
    exact_layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(EXACT, causal=True))
    params = layer.init(jax.random.key(0), x)
    run = jax.jit(layer.apply)
    first, again = run(params, x), run(params, x)
    np.testing.assert_array_equal(first, again)  # the sampling key is hashed from the inputs
    assert float(jnp.max(jnp.abs(first - run(params, 1.01 * x)))) > 0  # new inputs, new samples
    exact = exact_layer.apply(params, x)
    error = float(jnp.linalg.norm(first - exact) / jnp.linalg.norm(exact))
    assert 0 < error < 0.5, error  # approximate, not exact, and not garbage


def test_arbitrary_dense_mask_raises(rng):
    x = _x(rng, b=1, t=64)
    layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(EXACT, causal=True))
    params = layer.init(jax.random.key(0), x)
    holes = nn.make_causal_mask(jnp.ones((1, 64))).at[..., 40, 3].set(False)
    with pytest.raises(ValueError, match="cannot express"):
        layer.apply(params, x, mask=holes)  # concrete mask: checked at once
    with pytest.raises(Exception, match="cannot express"):  # traced mask: checked when the computation runs
        jax.block_until_ready(jax.jit(lambda p, m: layer.apply(p, x, mask=m))(params, holes))


def test_unsupported_arguments_raise(rng):
    x = _x(rng, b=1, t=16)
    fn = make_attention_fn(EXACT)
    q = x.reshape(1, 16, 2, 16)
    with pytest.raises(ValueError, match="bias"):
        fn(q, q, q, bias=jnp.zeros((1, 2, 16, 16)))
    with pytest.raises(ValueError, match="dropout_rate"):
        fn(q, q, q, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0))


def test_linen_decode_with_adapter_matches_full_forward(rng):
    x = _x(rng, b=1, t=12)
    fn = make_attention_fn(EXACT, causal=True)
    full = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=fn)
    step = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=fn, decode=True)
    params = full.init(jax.random.key(0), x)["params"]
    cache = step.init(jax.random.key(0), x)["cache"]
    want = full.apply({"params": params}, x, mask=nn.make_causal_mask(jnp.ones((1, 12))))
    outputs = []
    for i in range(12):
        out, updated = step.apply({"params": params, "cache": cache}, x[:, i : i + 1], mutable=["cache"])
        cache = updated["cache"]
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), want, atol=2e-5, rtol=2e-5)


def test_nnx_decode_with_adapter_matches_full_forward(rng):
    x = _x(rng, b=1, t=10)
    layer = nnx.MultiHeadAttention(4, 32, attention_fn=make_attention_fn(EXACT), decode=False, rngs=nnx.Rngs(0))
    want = layer(x, is_causal=True)
    layer.init_cache(x.shape)
    steps = [layer(x[:, i : i + 1], decode=True) for i in range(10)]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), want, atol=2e-5, rtol=2e-5)
