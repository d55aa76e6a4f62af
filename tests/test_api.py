"""The public entry point keeps dtypes, stays finite, and rejects bad input clearly. Determinism, vmap, jit and
checkpoint run over every backend in test_backend_suite.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import hyperattn_jax as ha
from hyperattn_jax.diagnostics import relative_error

CFG = ha.HyperAttentionConfig(block_size=32, sample_size=16, min_seq_len=64)


def test_raw_uint32_keys_are_accepted(rng):
    q, k, v = random_qkv(rng, t=128, n=2)
    typed = ha.hyper_attention(q, k, v, key=jax.random.key(3), config=CFG)
    raw = ha.hyper_attention(q, k, v, key=jax.random.PRNGKey(3), config=CFG)
    np.testing.assert_array_equal(typed, raw)


@pytest.mark.parametrize(
    ("dtype", "causal"), [(jnp.bfloat16, False), (jnp.bfloat16, True), (jnp.float16, False), (jnp.float32, True)]
)
def test_dtypes_keep_output_dtype_and_float32_statistics(rng, dtype, causal):
    q, k, v = random_qkv(rng, t=256, n=4, kv=2, dtype=dtype)
    out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=CFG, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    # Low precision changes the inputs' rounding only: the result stays close to the float32 computation.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref = ha.hyper_attention(q32, k32, v32, key=jax.random.key(0), config=CFG, causal=causal)
    assert float(relative_error(out, ref)) < {jnp.bfloat16: 3e-2, jnp.float16: 4e-3, jnp.float32: 1e-6}[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_no_nan_or_inf_for_extreme_finite_inputs(rng, dtype):
    q, k, v = random_qkv(rng, t=192, n=2)
    big = float(jnp.finfo(dtype).max) ** 0.5 / 8  # scores far beyond exp's range, inputs still representable
    q, k, v = (q * big).astype(dtype), (k * big).astype(dtype), v.astype(dtype)

    def loss(q, k, v):
        out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=CFG, causal=True, return_lse=True)
        return jnp.sum(out.astype(jnp.float32)), (out, lse)

    grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    for x in (out, lse, *grads):
        assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))


def _bad(rng, **overrides):
    q, k, v = random_qkv(rng, t=64, n=4, kv=2)
    args = dict(q=q, k=k, v=v, key=jax.random.key(0), config=CFG)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda q, k, v: dict(q=q[0]), r"q must have rank 4.*q.shape=\(64, 4, 16\)"),
        (lambda q, k, v: dict(v=v[:, :10]), r"k and v must have the same shape"),
        (lambda q, k, v: dict(k=k[..., :8], v=v[..., :8]), r"head dims differ"),
        (lambda q, k, v: dict(k=k[:, :, :1].repeat(3, 2), v=v[:, :, :1].repeat(3, 2)), r"query heads 4 .* kv heads 3"),
        (lambda q, k, v: dict(q=q.astype(jnp.int32)), r"q.dtype=int32"),
        (lambda q, k, v: dict(v=v.astype(jnp.bfloat16)), r"share a dtype"),
        (lambda q, k, v: dict(key=None), r"needs a PRNG key"),
        (lambda q, k, v: dict(key=3), r"key must be a jax PRNG key"),
        (lambda q, k, v: dict(config=dict(block_size=32)), r"config must be a HyperAttentionConfig"),
        (lambda q, k, v: dict(implementation="cuda"), r"implementation='cuda'"),
        (lambda q, k, v: dict(k=k[:, :32], v=v[:, :32], causal=True), r"causal attention needs equal .* T=64 S=32"),
        (lambda q, k, v: dict(scale=float("nan")), r"scale=nan"),
        (lambda q, k, v: dict(kv_length=jnp.ones((3,), jnp.int32)), r"kv_length must be an int array of shape \(1,\)"),
    ],
)
def test_bad_input_raises_a_clear_value_error(rng, make, message):
    args = _bad(rng)
    args.update(make(args["q"], args["k"], args["v"]))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        ha.hyper_attention(q, k, v, **args)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(block_size=100), r"block_size=100 must be a power of two"),
        (dict(block_size=8192), r"block_size=8192 must be at most 4096"),
        (dict(sample_size=-1), r"sample_size=-1 must be >= 0"),
        (dict(num_projections=0), r"num_projections=0"),
        (dict(min_seq_len=-5), r"min_seq_len=-5"),
        (dict(block_size=64.0), r"block_size=64.0 must be an int"),
    ],
)
def test_config_validation_names_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        ha.HyperAttentionConfig(**fields)


def test_config_is_hashable_and_static():
    assert hash(ha.HyperAttentionConfig()) == hash(ha.HyperAttentionConfig())
    with pytest.raises(AttributeError):
        ha.HyperAttentionConfig().block_size = 4  # frozen
