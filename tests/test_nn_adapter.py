"""`make_attention_fn` as the attention_fn of Flax's own modules (linen and nnx): Flax's own result wherever the call
is exact (any mask), Flax's mask idioms recognised above min_seq_len, ValueErrors for what it cannot express."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax.dot_product import key_from_inputs
from hyperattn_jax.nn import make_attention_fn
from hyperattn_jax.nn.functional import layer_hash_key

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


def test_at_or_below_min_seq_len_any_mask_bias_and_dropout_equal_flax(rng):
    """Exact calls are Flax's own attention: holes, left padding, bias, dropout, traced masks, the boundary S itself."""
    x = _x(rng, b=2, t=64)
    at_boundary = HYPER.replace(min_seq_len=64)  # attends_exactly(64): the boundary is exact
    holes = jnp.asarray(rng.random((2, 1, 64, 64)) < 0.7)
    left_padded = nn.make_attention_mask(jnp.ones((2, 64)), jnp.arange(64) >= jnp.array([[0], [9]]))
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(at_boundary))
    params = flax_layer.init(jax.random.key(0), x)
    for mask in (holes, left_padded, nn.combine_masks(holes, nn.make_causal_mask(jnp.ones((2, 64))))):
        got = jax.jit(lambda p, m: ours.apply(p, x, mask=m))(params, mask)  # a traced mask: fine when exact
        np.testing.assert_allclose(got, flax_layer.apply(params, x, mask=mask), atol=1e-6, rtol=1e-6)
    nnx_ours = nnx.MultiHeadAttention(
        4, 32, attention_fn=make_attention_fn(at_boundary), decode=False, rngs=nnx.Rngs(0)
    )
    nnx_flax = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(nnx_ours(x, mask=holes, is_causal=True), nnx_flax(x, mask=holes, is_causal=True))
    q = x.reshape(2, 64, 2, 16)
    bias = jnp.asarray(rng.standard_normal((2, 2, 64, 64)), jnp.float32)
    dropout = dict(dropout_rate=0.2, deterministic=False, dropout_rng=jax.random.key(7))
    fn = make_attention_fn(at_boundary)
    np.testing.assert_array_equal(
        fn(q, q, q, bias=bias, **dropout), nnx.dot_product_attention(q, q, q, bias, **dropout)
    )


def test_concrete_causal_mask_is_recognised_without_a_flag(rng):
    """Flax's idiom: nnx.MultiHeadAttention(attention_fn=make_attention_fn(cfg))(x, mask=nnx.make_causal_mask(...))."""
    x = _x(rng, b=2, t=128)
    ours = nnx.MultiHeadAttention(4, 32, attention_fn=make_attention_fn(HYPER), decode=False, rngs=nnx.Rngs(0))
    causal = nnx.make_causal_mask(jnp.ones((2, 128)))
    np.testing.assert_array_equal(ours(x, mask=causal), ours(x, is_causal=True))
    # With padding of keys and queries combined in (nn.combine_masks): real rows are the causal call, and padded
    # query rows (which attend nothing) are Flax's own result for them, the mean of the values.
    valid = jnp.arange(128) < jnp.array([[128], [70]])
    both = nn.combine_masks(nn.make_causal_mask(valid), nn.make_attention_mask(valid, valid))
    layer = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(HYPER))
    flagged = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(HYPER, causal=True))
    params = layer.init(jax.random.key(0), x)
    got = layer.apply(params, x, mask=both)
    np.testing.assert_array_equal(got[0], flagged.apply(params, x)[0])
    np.testing.assert_array_equal(got[1, :70], flagged.apply(params, x)[1, :70])
    flax_own = nn.MultiHeadDotProductAttention(num_heads=4).apply(params, x, mask=both)
    np.testing.assert_allclose(got[1, 70:], flax_own[1, 70:], atol=1e-5)


def test_concrete_key_padding_mask_is_hyper_attention_with_kv_length(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((2, 128, 2, 16)), jnp.float32) for _ in range(3))
    lengths = jnp.array([128, 75])
    mask = nn.make_attention_mask(jnp.ones((2, 128)), jnp.arange(128) < lengths[:, None])
    got = make_attention_fn(HYPER, seed=4)(q, k, v, mask=mask)
    want = hyper_attention(
        q,
        k,
        v,
        key=key_from_inputs(q, k, 4),
        hash_key=layer_hash_key(jax.random.key(4)),
        config=HYPER,
        kv_length=lengths,
    )
    np.testing.assert_array_equal(got, want)


def test_masks_it_cannot_express_above_min_seq_len_raise_value_errors(rng):
    x = _x(rng, b=1, t=128)
    holes = nn.make_causal_mask(jnp.ones((1, 128))).at[..., 40, 3].set(False)
    causal_mask = nn.make_causal_mask(jnp.ones((1, 128)))
    for flag in (False, True):
        layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(HYPER, causal=flag))
        params = layer.init(jax.random.key(0), x)
        with pytest.raises(ValueError, match="neither causal nor right padding"):
            layer.apply(params, x, mask=holes)  # concrete: read at once
        traced = jax.jit(lambda p, m, layer=layer: layer.apply(p, x, mask=m))
        for mask in (holes, causal_mask):  # traced: cannot be read at trace time, whatever it holds
            with pytest.raises(ValueError, match=r"traced .*causal=True.*check_on_device"):
                traced(params, mask)


def test_traced_masks_checked_on_device_when_asked(rng):
    x = _x(rng, b=2, t=128)
    valid = jnp.arange(128) < jnp.array([[128], [80]])
    padding = nn.make_attention_mask(jnp.ones((2, 128)), valid)
    fn = make_attention_fn(HYPER, traced_mask="check_on_device")
    layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=fn)
    params = layer.init(jax.random.key(0), x)
    traced = jax.jit(lambda p, m: layer.apply(p, x, mask=m))
    np.testing.assert_allclose(traced(params, padding), layer.apply(params, x, mask=padding), atol=1e-6)
    holes = padding.at[1, 0, 5, 2].set(0.0)
    with pytest.raises(Exception, match="cannot express"):  # the check runs with the computation
        jax.block_until_ready(traced(params, holes))
    with pytest.raises(ValueError, match="traced_mask"):
        make_attention_fn(HYPER, traced_mask="ignore")


def test_unsupported_arguments_raise(rng):
    q = _x(rng, b=1, t=128).reshape(1, 128, 2, 16)
    fn = make_attention_fn(HYPER)
    with pytest.raises(ValueError, match="bias"):
        fn(q, q, q, bias=jnp.zeros((1, 2, 128, 128)))
    with pytest.raises(ValueError, match="dropout_rate"):
        fn(q, q, q, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="is_causal must be a Python bool"):
        fn(q, q, q, is_causal="yes")
    with pytest.raises(ValueError, match="causal must be a Python bool"):
        make_attention_fn(HYPER, causal=jnp.array(True))


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
