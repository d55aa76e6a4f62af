"""Property-based tests (hypothesis) over shapes, odd lengths, GQA head counts and config options, against the exact
reference and the dense estimator. Examples are few and tiny (each new shape compiles) and derandomized: the same
cases every run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_estimator, dense_estimator_weights

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hyperattn_jax as ha  # noqa: E402

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw, max_len=96):
    """q `[B, T, N, H]`, k, v `[B, S, K, H]` with odd lengths and N % K == 0, drawn from a numpy seed."""
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, max_len))
    s = draw(st.integers(1, max_len))
    kv = draw(st.sampled_from([1, 2]))
    n = kv * draw(st.sampled_from([1, 2, 4]))
    h = draw(st.sampled_from([8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h))
    )
    return q, k, v


def _repeat_heads(x, n):
    return np.repeat(np.asarray(x, np.float64), n // x.shape[2], axis=2)


@SETTINGS
@given(problems(), st.booleans())
def test_exact_lse_bounds_and_outputs_are_convex_combinations(problem, causal):
    q, k, v = problem
    if causal:
        k, v = k[:, : q.shape[1]], v[:, : q.shape[1]]
        if k.shape[1] < q.shape[1]:
            q = q[:, : k.shape[1]]
    out, lse = ha.exact_attention(q, k, v, causal=causal, return_lse=True)
    kr, vr = _repeat_heads(k, q.shape[2]), _repeat_heads(v, q.shape[2])
    scores = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), kr) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    top = scores.max(-1)
    allowed = np.isfinite(scores).sum(-1)
    # lse = log sum_j e^{s_ij}: at least the largest score, at most that plus log(number of keys).
    assert np.all(np.asarray(lse) >= top - 1e-4)
    assert np.all(np.asarray(lse) <= top + np.log(allowed) + 1e-4)
    # Every output row is a convex combination of v rows of its kv head.
    lo, hi = vr.min(1)[:, None], vr.max(1)[:, None]  # [B, 1, N, H]
    assert np.all(np.asarray(out) >= lo - 1e-5) and np.all(np.asarray(out) <= hi + 1e-5)


@SETTINGS
@given(problems(), st.data())
def test_merge_of_key_partitions_is_associative_and_exact(problem, data):
    q, k, v = problem
    s = k.shape[1]
    if s < 3:
        k, v, s = jnp.concatenate([k] * 3, 1), jnp.concatenate([v] * 3, 1), 3 * s
    a = data.draw(st.integers(1, s - 2))
    c = data.draw(st.integers(a + 1, s - 1))
    parts = [ha.exact_attention(q, k[:, x:y], v[:, x:y], return_lse=True) for x, y in ((0, a), (a, c), (c, s))]
    left = ha.merge_attention(*ha.merge_attention(*parts[0], *parts[1]), *parts[2])
    right = ha.merge_attention(*parts[0], *ha.merge_attention(*parts[1], *parts[2]))
    full = ha.exact_attention(q, k, v, return_lse=True)
    for got in (left, right):
        for x, y in zip(got, full, strict=True):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)


OPTIONS = st.fixed_dictionaries(
    {
        "num_sink_keys": st.sampled_from([0, 3]),
        "num_heavy_keys": st.sampled_from([0, 4]),
        "sample_distribution": st.sampled_from(["uniform", "column_mass"]),
        "sample_size": st.sampled_from([0, 16]),
    }
)


@SETTINGS
@given(problems(), OPTIONS)
def test_one_block_covering_every_key_is_exact_attention(problem, options):
    # Sinks and heavy keys count once, every other key sits in the one block, and samples there are excluded.
    q, k, v = problem
    config = ha.HyperAttentionConfig(block_size=128, min_seq_len=0, num_probe_queries=8, **options)
    out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(0), config=config, return_lse=True)
    ref_out, ref_lse = ha.exact_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)


@SETTINGS
@given(problems(max_len=200), OPTIONS, st.booleans())
def test_estimate_outputs_are_convex_combinations_of_values(problem, options, causal):
    # Whatever the plan, the estimator's weights are non-negative and normalised: out lies in [min v, max v].
    q, k, v = problem
    if causal:
        length = min(q.shape[1], k.shape[1])
        q, k, v = q[:, :length], k[:, :length], v[:, :length]
    config = ha.HyperAttentionConfig(block_size=16, min_seq_len=32, num_probe_queries=8, **options)
    out = ha.hyper_attention(q, k, v, key=jax.random.key(1), config=config, causal=causal)
    vr = _repeat_heads(v, q.shape[2])
    lo, hi = vr.min(1)[:, None], vr.max(1)[:, None]
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.asarray(out) >= lo - 1e-4) and np.all(np.asarray(out) <= hi + 1e-4)


@SETTINGS
@given(
    problems(max_len=120),
    st.sampled_from([8, 16, 32]),
    st.sampled_from([0, 8, 24]),
    st.integers(0, 2**31 - 1),
)
def test_estimate_equals_the_dense_estimator_for_its_plan(problem, block_size, sample_size, seed):
    # The published plan (sorted blocks + uniform samples of weight S/m outside the block) over random shapes and
    # sizes: out and lse equal the dense masked estimator built from the same plan (tests/helpers.py).
    q, k, v = problem
    config = ha.HyperAttentionConfig.paper(block_size=block_size, sample_size=sample_size, min_seq_len=0)
    key = jax.random.key(seed)
    scale = q.shape[-1] ** -0.5

    @jax.jit  # one compilation per example instead of one per eager op
    def dense(q, k, v, key):
        q5, k4, v4 = ha.ops.group_queries(q, k.shape[2]), ha.ops.heads_major(k), ha.ops.heads_major(v)
        weights = dense_estimator_weights(ha.ops.make_plan(q5, k4, key=key, config=config), q.shape[1], k.shape[1])
        return dense_estimator(q5, k4, v4, weights, scale)

    ref_out, ref_lse = dense(q, k, v, key)
    out, lse = ha.hyper_attention(q, k, v, key=key, config=config, return_lse=True, implementation="xla")
    np.testing.assert_allclose(out, ha.ops.ungroup_output(ref_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ha.ops.ungroup_lse(ref_lse), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    st.integers(1, 6),
    st.integers(0, 100),
    st.integers(0, 2**32 - 1),
    st.sampled_from([3, 40]),
    st.sampled_from([None, 4, 64]),
)
def test_two_stage_top_k_is_lax_top_k(k, extra, seed, levels, chunk):
    # Mostly zeros with about k larger entries scattered over chunks, so the k-th value is often a tie across chunks
    # whose maxima differ; -inf entries; a length that is not a whole number of chunks. None: the default chunk.
    from hyperattn_jax.ops import top_k_index
    from hyperattn_jax.ops.plan import top_k_chunk

    s = 4 * k * (chunk or 64) + extra
    assert chunk is not None or top_k_chunk(s, k) is not None  # the two stages run
    rng = np.random.default_rng(seed)
    x = np.zeros((3, s), np.float32)
    for row in x:
        row[rng.integers(0, s, 2 * k)] = rng.integers(-levels, levels, 2 * k)
        row[rng.random(s) < 0.2] = -np.inf
    got = np.asarray(jax.jit(top_k_index, static_argnums=(1, 2))(jnp.asarray(x), k, chunk))
    np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]))
