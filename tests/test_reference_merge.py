import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import hyperattn_jax as ha


def numpy_attention(q, k, v, causal=False, kv_length=None):
    """Float64 textbook attention with repeated kv heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t, length = q.shape[1], k.shape[1]
    mask = np.ones((t, length), bool)
    if causal:
        mask = np.tril(mask)
    mask = np.broadcast_to(mask, (q.shape[0], 1, t, length)).copy()
    if kv_length is not None:
        mask &= np.arange(length) < np.asarray(kv_length)[:, None, None, None]
    s = np.where(mask, s, -np.inf)
    lse = np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1)) + s.max(-1)
    return np.einsum("bnts,bsnh->btnh", np.exp(s - lse[..., None]), v), lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_exact_attention_matches_float64_textbook(rng, causal, heads):
    q, k, v = random_qkv(rng, b=2, t=70, n=heads[0], kv=heads[1])
    out, lse = ha.exact_attention(q, k, v, causal=causal, return_lse=True, query_chunk=32)  # 3 chunks, ragged end
    ref_out, ref_lse = numpy_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == jnp.float32 and lse.shape == (2, heads[0], 70)


def test_exact_attention_cross_attention_and_padding(rng):
    q, k, v = random_qkv(rng, b=2, t=20, s=50, n=2)
    kv_length = jnp.array([50, 17])
    out = ha.exact_attention(q, k, v, kv_length=kv_length)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, kv_length=kv_length)[0], rtol=1e-5, atol=1e-5)


def test_merge_attention_is_exact_and_associative(rng):
    q, k, v = random_qkv(rng, b=1, t=32, s=60, n=2)
    parts = [(0, 10), (10, 35), (35, 60)]
    partial = [ha.exact_attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in parts]
    left = ha.merge_attention(*ha.merge_attention(*partial[0], *partial[1]), *partial[2])
    right = ha.merge_attention(*partial[0], *ha.merge_attention(*partial[1], *partial[2]))
    full_out, full_lse = ha.exact_attention(q, k, v, return_lse=True)
    for out, lse in (left, right):
        np.testing.assert_allclose(out, full_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, full_lse, rtol=1e-5, atol=1e-5)


def test_merge_attention_rejects_mismatched_layouts(rng):
    q, k, v = random_qkv(rng, t=8, n=2)
    out, lse = ha.exact_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        ha.merge_attention(out, lse.transpose(0, 2, 1), out, lse)


def test_exact_attention_gradient_memory_stays_chunked(rng):
    # The backward pass rematerialises each query chunk: no [T, S] buffer appears in the gradient program.
    q, k, v = random_qkv(rng, t=512, n=1, h=8)
    grad = jax.jit(jax.grad(lambda q: ha.exact_attention(q, k, v, query_chunk=64).sum()))
    text = grad.lower(q).as_text()
    assert "512x512" not in text and "64x512" in text
