"""Angular LSH with a Gray-code bucket order (DESIGN.md §1).

Each of P random hyperplanes contributes one bit; the bucket code is sorted by its position in the reflected Gray
sequence, so that neighbouring buckets in sorted order differ in exactly one hyperplane (are near in angle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lsh_projections(key, head_dim: int, num_projections: int, dtype=jnp.float32):
    """Gaussian hyperplane normals `[H, P]` drawn from `key`; queries and keys of one call share them."""
    return jax.random.normal(key, (head_dim, num_projections), dtype)


def split_hyperplanes(projections, dtype):
    """float32 hyperplanes `[H, P]` as a high and a low part in a half-precision `dtype`: for x exact in that dtype,
    x . high + x . low (float32 accumulation) is x . w to ~2^-16 relative, with no float32 matrix product."""
    projections = projections.astype(jnp.float32)
    high = projections.astype(dtype)
    return high, (projections - high.astype(jnp.float32)).astype(dtype)


def _hyperplane_scores(x, projections):
    # The scores are float32 whatever the input dtype, so bf16/fp16 inputs land in the buckets their float32 values
    # would. Half-precision inputs take two half-precision products against the split hyperplanes: exact products,
    # float32 sums, the same on every backend (a float32 product may be rounded to tf32 on GPUs) and what the hash
    # kernel computes; float32 inputs take one full-precision product.
    if x.dtype in (jnp.bfloat16, jnp.float16):
        high, low = split_hyperplanes(projections, x.dtype)
        scores = (jnp.einsum("...h,hp->...p", x, part, preferred_element_type=jnp.float32) for part in (high, low))
        return sum(scores)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.einsum("...h,hp->...p", x.astype(acc), projections.astype(acc), precision=jax.lax.Precision.HIGHEST)


def _codes(scores):
    powers = 2 ** jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return jnp.sum((scores > 0).astype(jnp.int32) * powers, axis=-1)


def lsh_codes(x, projections):
    """Bucket code `sum_r [x . w_r > 0] 2^r` as int32, for x `[..., H]` -> `[...]`."""
    return _codes(_hyperplane_scores(x, projections))


def gray_rank(codes, num_bits: int):
    """Position of each code in the reflected Gray sequence: the prefix XOR g ^ (g >> 1) ^ (g >> 2) ^ ...

    The Gray sequence maps rank r to code r ^ (r >> 1); this is its inverse, so ranks r and r + 1 belong to codes that
    differ in exactly one bit.
    """
    rank = codes
    shift = 1
    while shift < num_bits:  # log2(P) doubling steps compute the full prefix XOR.
        rank = rank ^ (rank >> shift)
        shift *= 2
    return rank


def lsh_rank(x, projections):
    """Sort key of each vector: Gray rank of its angular-LSH bucket, int32 in `[0, 2**P)`; x `[..., H]` -> `[...]`."""
    return gray_rank(lsh_codes(x, projections), projections.shape[-1])


def lsh_ranks(x, projection_sets):
    """`[lsh_rank(x, p) for p in projection_sets]` in one pass over x (one matrix product with all hyperplanes)."""
    scores = _hyperplane_scores(x, jnp.concatenate(projection_sets, axis=1))
    ranks, start = [], 0
    for projections in projection_sets:
        width = projections.shape[-1]
        ranks.append(gray_rank(_codes(scores[..., start : start + width]), width))
        start += width
    return ranks
