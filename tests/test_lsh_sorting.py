import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hyperattn_jax as ha
from hyperattn_jax.ops import gather_rows, sort_order, sort_orders, sort_rows, unsort_rows


@pytest.mark.parametrize("num_bits", [1, 3, 7, 10])
def test_consecutive_ranks_differ_in_exactly_one_hyperplane_bit(num_bits):
    codes = jnp.arange(2**num_bits, dtype=jnp.int32)
    ranks = np.asarray(ha.gray_rank(codes, num_bits))
    assert sorted(ranks) == list(range(2**num_bits)), "gray_rank must be a bijection on codes"
    codes_in_rank_order = np.argsort(ranks)
    flipped_bits = np.bitwise_xor(codes_in_rank_order[1:], codes_in_rank_order[:-1])
    assert all(bin(x).count("1") == 1 for x in flipped_bits)


def test_lsh_codes_are_hyperplane_sides(rng):
    x = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
    w = ha.lsh_projections(jax.random.key(0), 16, 5)
    expected = ((np.asarray(x) @ np.asarray(w)) > 0).astype(int) @ (2 ** np.arange(5))
    np.testing.assert_array_equal(ha.lsh_codes(x, w), expected)
    # Angular: scaling a vector by a positive number never changes its bucket.
    np.testing.assert_array_equal(ha.lsh_rank(3.7 * x, w), ha.lsh_rank(x, w))


@pytest.mark.parametrize("num_ranks", [256, 258, 2**30])  # uint8 pair sort, packed int32 sort, argsort fallback
def test_sort_order_is_the_stable_argsort(rng, num_ranks):
    rank = jnp.asarray(rng.integers(0, min(num_ranks, 300), (3, 40)), jnp.int32)
    order = sort_order(rank, num_ranks)
    np.testing.assert_array_equal(order.perm, np.argsort(np.asarray(rank), axis=-1, kind="stable"))
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(order.perm), np.asarray(order.inverse), -1), np.tile(np.arange(40), (3, 1))
    )


@pytest.mark.parametrize("key_length", [40, 24])  # one joint sort (equal lengths) or one sort each
def test_joint_sort_orders_equal_separate_sorts(rng, key_length):
    query_rank = jnp.asarray(rng.integers(0, 9, (2, 3, 4, 40)), jnp.int32)  # [B, K, G, T]: many ties
    key_rank = jnp.asarray(rng.integers(0, 9, (2, 3, key_length)), jnp.int32)
    for joint, rank in zip(sort_orders([query_rank, key_rank], 9), (query_rank, key_rank), strict=True):
        separate = sort_order(rank, 9)
        np.testing.assert_array_equal(joint.perm, separate.perm)
        np.testing.assert_array_equal(joint.inverse, separate.inverse)


def test_permutation_gather_gradient_is_a_gather_not_a_scatter(rng):
    x = jnp.asarray(rng.standard_normal((2, 30, 4)), jnp.float32)
    order = sort_order(jnp.asarray(rng.integers(0, 5, (2, 30)), jnp.int32), 5)
    np.testing.assert_array_equal(unsort_rows(sort_rows(x, order), order), x)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(x):
        return jnp.sum(sort_rows(x, order) * cotangent)

    np.testing.assert_allclose(jax.grad(loss)(x), unsort_rows(cotangent, order), rtol=0, atol=0)
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(x))
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(gather_rows(x, *order) ** 2)))(x))
