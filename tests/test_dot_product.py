"""`dot_product_attention` against `jax.nn.dot_product_attention`: the same call below min_seq_len (every mask, bias,
length and GQA), the same function as `hyper_attention` above it, clear errors for what it cannot express."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import clustered_qkv, random_qkv

from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax.dot_product import InexpressibleMaskError, dot_product_attention, key_from_inputs

T = 128
HYPER = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=64)
EXACT = HYPER.replace(min_seq_len=T)  # attends_exactly(T): the boundary itself is exact


def _tril(t):
    return jnp.tril(jnp.ones((t, t), bool))


def test_signature_is_jax_nn_plus_config_and_rng():
    ours = inspect.signature(dot_product_attention).parameters
    theirs = inspect.signature(jax.nn.dot_product_attention).parameters
    assert list(ours)[:5] == list(theirs)[:5] == ["query", "key", "value", "bias", "mask"]
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].kind == parameter.kind and ours[name].default == parameter.default, name
    assert set(ours) - set(theirs) == {"config", "rng"}


def _exact_cases(rng, b, n, kv):
    holes = jnp.asarray(rng.random((b, 1, T, T)) < 0.7)
    return {
        "mask with holes": dict(mask=holes),
        "per-head mask": dict(mask=jnp.asarray(rng.random((1, n, T, T)) < 0.5)),
        "bias": dict(bias=jnp.asarray(rng.standard_normal((b, n, T, T)), jnp.float32)),
        "bias and causal": dict(bias=jnp.asarray(rng.standard_normal((1, 1, T, T)), jnp.float32), is_causal=True),
        "causal": dict(is_causal=True),
        "lengths": dict(key_value_seq_lengths=jnp.array([T, 37]), query_seq_lengths=jnp.array([100, T])),
        "window": dict(local_window_size=(5, 3), scale=0.3),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_at_or_below_min_seq_len_equals_jax_nn_for_every_mask_and_bias(rng, dtype):
    b, n, kv = 2, 4, 2  # GQA
    q, k, v = random_qkv(rng, b=b, t=T, n=n, kv=kv, h=16, dtype=dtype)
    for name, kwargs in _exact_cases(rng, b, n, kv).items():
        if "bias" in kwargs:
            kwargs["bias"] = kwargs["bias"].astype(dtype)
        got = dot_product_attention(q, k, v, config=EXACT, **kwargs)
        want = jax.nn.dot_product_attention(q, k, v, **kwargs)
        assert got.dtype == want.dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name)
    got, residual = dot_product_attention(q, k, v, config=EXACT, is_causal=True, return_residual=True)
    want, want_residual = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    np.testing.assert_array_equal(np.asarray(residual, np.float32), np.asarray(want_residual, np.float32))


def test_above_min_seq_len_is_hyper_attention_with_the_same_rng(rng):
    q, k, v = random_qkv(rng, b=2, t=T, n=4, kv=2, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    lengths = jnp.array([T, 77])
    for kwargs, hyper_kwargs in (
        ({}, {}),
        (dict(is_causal=True), dict(causal=True)),
        (dict(key_value_seq_lengths=lengths), dict(kv_length=lengths)),
        (dict(scale=0.2), dict(scale=0.2)),
    ):
        got = dot_product_attention(q, k, v, config=HYPER, rng=key, **kwargs)
        want = hyper_attention(q, k, v, key=key, config=HYPER, **hyper_kwargs)
        np.testing.assert_array_equal(got, want, err_msg=str(kwargs))
    exact = jax.nn.dot_product_attention(q, k, v)
    assert float(jnp.max(jnp.abs(dot_product_attention(q, k, v, config=HYPER, rng=key) - exact))) > 1e-3


def test_concrete_causal_and_padding_masks_are_read_without_flags(rng):
    q, k, v = random_qkv(rng, b=2, t=T, n=4, kv=2, h=16)
    key = jax.random.key(3)
    run = lambda **kw: dot_product_attention(q, k, v, config=HYPER, rng=key, **kw)
    np.testing.assert_array_equal(run(mask=_tril(T)[None, None]), run(is_causal=True))
    lengths = jnp.array([T, 70])
    valid = jnp.arange(T) < lengths[:, None]  # [B, S]
    key_padding = valid[:, None, None, :]
    np.testing.assert_array_equal(run(mask=key_padding), run(key_value_seq_lengths=lengths))
    # The mask and is_causal combine, as in jax.nn: a padding mask with is_causal is a causal call.
    np.testing.assert_array_equal(run(mask=key_padding, is_causal=True)[:, :70], run(is_causal=True)[:, :70])
    # Causal + padding of keys and queries (Flax's combine_masks idiom): real rows are the causal call, padded
    # query rows attend nothing and are the mean of the values, exactly as jax.nn gives them.
    both = _tril(T)[None, None] & (valid[:, None, :, None] & valid[:, None, None, :])
    got = run(mask=both)
    np.testing.assert_array_equal(got[1, :70], run(is_causal=True)[1, :70])
    want = jax.nn.dot_product_attention(q, k, v, mask=both)
    np.testing.assert_allclose(got[1, 70:], want[1, 70:], atol=1e-6)
    np.testing.assert_array_equal(got[0], run(is_causal=True)[0])


def test_rows_without_keys_and_padded_queries_equal_jax_nn(rng):
    q, k, v = random_qkv(rng, b=2, t=T, n=4, kv=2, h=16)
    kwargs = dict(key_value_seq_lengths=jnp.array([0, T]), query_seq_lengths=jnp.array([T, 90]))
    got = dot_product_attention(q, k, v, config=HYPER, rng=jax.random.key(0), **kwargs)
    want = jax.nn.dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)  # no keys at all: the mean of the values, per kv head
    np.testing.assert_array_equal(got[1, 90:], 0.0)  # padded queries: zeros, as jax.nn
    assert float(jnp.linalg.norm(got[1, :90])) > 1.0


def test_what_it_cannot_express_above_min_seq_len_raises_naming_what_is_supported(rng):
    q, k, v = random_qkv(rng, b=1, t=T, n=2, h=16)
    with pytest.raises(ValueError, match=r"bias .*is_causal, key_value_seq_lengths"):
        dot_product_attention(q, k, v, jnp.zeros((1, 2, T, T)), config=HYPER)
    holes = _tril(T).at[50, 3].set(False)
    with pytest.raises(InexpressibleMaskError, match=r"neither causal nor right padding.*is_causal"):
        dot_product_attention(q, k, v, mask=holes[None, None], config=HYPER)
    left_padding = (jnp.arange(T) >= 5)[None, None, None, :]
    with pytest.raises(ValueError, match="neither causal"):
        dot_product_attention(q, k, v, mask=left_padding, config=HYPER)
    with pytest.raises(ValueError, match=r"traced.*is_causal=True"):
        jax.jit(lambda m: dot_product_attention(q, k, v, mask=m, config=HYPER))(_tril(T)[None, None])
    with pytest.raises(ValueError, match="local_window_size"):
        dot_product_attention(q, k, v, local_window_size=4, config=HYPER)
    with pytest.raises(ValueError, match="is_causal must be a Python bool"):
        dot_product_attention(q, k, v, is_causal="yes", config=HYPER)
    with pytest.raises(ValueError, match="is_causal must be a Python bool"):
        jax.jit(lambda c: dot_product_attention(q, k, v, is_causal=c, config=HYPER))(True)


def test_default_rng_is_derived_from_the_inputs(rng):
    q, k, v = random_qkv(rng, b=1, t=T, n=2, h=16)
    run = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, config=HYPER, is_causal=True))
    first = run(q, k, v)
    np.testing.assert_array_equal(first, run(q, k, v))  # deterministic for given inputs ...
    want = hyper_attention(q, k, v, key=key_from_inputs(q, k), config=HYPER, causal=True)
    np.testing.assert_array_equal(first, want)  # ... by the derivation the docstring states
    # New inputs draw new samples: the output differs from the same inputs under the old key.
    other = run(q, 1.001 * k, v)
    old_key = hyper_attention(q, 1.001 * k, v, key=key_from_inputs(q, k), config=HYPER, causal=True)
    assert float(jnp.max(jnp.abs(other - old_key))) > 1e-4


def test_unbatched_layout_residual_and_half_precision(rng):
    q, k, v = random_qkv(rng, b=1, t=T, n=4, kv=1, h=16, dtype=jnp.bfloat16)  # MQA
    key = jax.random.key(1)
    out, residual = dot_product_attention(q[0], k[0], v[0], config=HYPER, rng=key, return_residual=True)
    assert out.shape == (T, 4, 16) and out.dtype == jnp.bfloat16 and residual.shape == (T, 4)
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, config=HYPER, rng=key)[0])
    _, lse = hyper_attention(q, k, v, key=key, config=HYPER, return_lse=True)
    np.testing.assert_allclose(np.asarray(residual, np.float32), np.asarray(lse[0].T, np.float32), rtol=1e-2)


def test_approximation_finds_planted_structure(rng):
    """On clustered attention (large entries sortLSH must find), the error is far below uniform attention's."""
    q, k, v = clustered_qkv(rng, b=1, t=512, n=2, h=32)
    config = HyperAttentionConfig(block_size=64, sample_size=64, num_projections=4, min_seq_len=128)
    exact = jax.nn.dot_product_attention(q, k, v)
    got = dot_product_attention(q, k, v, config=config, rng=jax.random.key(0))
    error = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    uniform = float(jnp.linalg.norm(jnp.mean(v, axis=1, keepdims=True) - exact) / jnp.linalg.norm(exact))
    assert error < 0.25 * uniform, (error, uniform)
