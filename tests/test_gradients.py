"""jax.grad through hyper_attention is the exact gradient of the estimator for a fixed key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_estimator, dense_estimator_weights, random_qkv

import hyperattn_jax as ha
from hyperattn_jax import ops

# The published plan: its dense masked re-implementation (tests/helpers.py) uses uniform samples of weight S/m.
CFG = ha.HyperAttentionConfig.paper(block_size=32, sample_size=24, min_seq_len=0)


def _grouped(q, k, v):
    return ops.group_queries(q, k.shape[2]), ops.heads_major(k), ops.heads_major(v)


@pytest.mark.parametrize(("t", "s", "n", "kv"), [(70, 101, 4, 2), (64, 128, 3, 1)])
def test_forward_and_gradients_match_dense_masked_estimator(rng, t, s, n, kv):
    q, k, v = random_qkv(rng, b=2, t=t, s=s, n=n, kv=kv)
    key = jax.random.key(int(rng.integers(1 << 30)))
    scale = 1 / np.sqrt(q.shape[-1])
    q5, k4, _ = _grouped(q, k, v)
    weights = dense_estimator_weights(ops.make_plan(q5, k4, key=key, config=CFG), t, s)
    cotangent_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    cotangent_lse = jnp.asarray(rng.standard_normal((2, n, t)), jnp.float32)

    def ours(q, k, v):
        out, lse = ha.hyper_attention(q, k, v, key=key, config=CFG, return_lse=True)
        return jnp.sum(out * cotangent_out) + jnp.sum(lse * cotangent_lse), (out, lse)

    def dense(q, k, v):
        out, lse = dense_estimator(*_grouped(q, k, v), weights, scale)
        out, lse = ops.ungroup_output(out), ops.ungroup_lse(lse)
        return jnp.sum(out * cotangent_out) + jnp.sum(lse * cotangent_lse), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, (ref_out, ref_lse)), ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_finite_differences(rng, causal):
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, b=1, t=64, n=2, kv=1, h=8, dtype=jnp.float64)
        # The published plan is piecewise constant in q, k, so finite differences see the estimator's gradient. With
        # column-mass sampling (the default) the sample weights move smoothly with q, k, while gradients hold the plan
        # fixed by design (docs/accuracy.md): tests/test_accuracy_options.py checks those gradients against dense
        # definitions for a fixed plan instead.
        cfg = ha.HyperAttentionConfig.paper(block_size=16, sample_size=8, min_seq_len=16)
        key = jax.random.key(7)
        cotangent = jnp.asarray(rng.standard_normal(q.shape))

        def loss(q, k, v):
            out, lse = ha.hyper_attention(q, k, v, key=key, config=cfg, causal=causal, return_lse=True)
            return jnp.sum(out * cotangent) + jnp.sum(jnp.sin(lse))

        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        eps = 1e-6
        for arg, grad in enumerate(grads):
            for _ in range(3):  # random directional derivatives
                direction = jnp.asarray(rng.standard_normal(q.shape if arg == 0 else k.shape))
                args_plus = [q, k, v]
                args_minus = [q, k, v]
                args_plus[arg] = args_plus[arg] + eps * direction
                args_minus[arg] = args_minus[arg] - eps * direction
                numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * eps)
                np.testing.assert_allclose(jnp.sum(grad * direction), numeric, rtol=1e-6, atol=1e-8)


def test_gradient_program_has_no_scatter_and_no_quadratic_buffer(rng):
    q, k, v = random_qkv(rng, b=1, t=2048, n=1, h=8)
    # The published plan: every key reaches the blocks through permutations (global keys are gathered rows, whose
    # transpose is a small scatter-add).
    cfg = ha.HyperAttentionConfig.paper(block_size=64, sample_size=0, min_seq_len=0)

    def loss(q, k, v):
        return jnp.sum(ha.hyper_attention(q, k, v, key=jax.random.key(0), config=cfg) ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    assert "scatter-add" not in str(jax.make_jaxpr(grad)(q, k, v))  # permutation gathers transpose to gathers
    assert "2048x2048" not in jax.jit(grad).lower(q, k, v).as_text()
