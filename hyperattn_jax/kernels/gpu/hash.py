"""LSH ranks (`lsh.lsh_ranks`) as one Pallas Triton kernel on the public layout: int32 ranks out, no float32 scores.

The jnp hash writes the float32 hyperplane scores `[B, T, N, P]` (P = 35 for the five causal levels of a 131k-token
call: 0.6 GB per input) and reads them back, transposed, to form each level's bucket codes: about 2 ms of the causal
forward on an H100. Here a program hashes `rows` positions of one head: the scores stay in registers, the sign bits
of each level's hyperplanes become its code through a small matrix product with powers of two, and the Gray rank of
each level is stored `[B, N, T]`, which is the grouped `[B, K, G, T]` layout the plans take (a free reshape).

Precision: x (bf16/fp16) times float32 hyperplanes is computed as two half-precision products against the hyperplanes
split into a high and a low half-precision part (`lsh.split_hyperplanes`), accumulated in float32, exactly as the jnp
hash does for half-precision inputs: the two agree up to float32 summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import MIN_DOT, next_power_of_two, triton_params
from hyperattn_jax.lsh import gray_rank, split_hyperplanes

_ROWS = (128, 64, 32, 16)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _hash_kernel(x_ref, high_ref, low_ref, powers_ref, *rank_refs, width: int):
    x = x_ref[...]  # [rows, H]
    scores = _dot_t(high_ref[...], x) + _dot_t(low_ref[...], x)  # [hyperplanes, rows]
    bits = (scores > 0).astype(jnp.float32)
    codes = _dot(powers_ref[...], bits)  # [levels (padded), rows]: sums of distinct powers of two, exact
    level_of_row = lax.broadcasted_iota(jnp.int32, codes.shape, 0)
    for level, rank_ref in enumerate(rank_refs):
        code = (jnp.sum(jnp.where(level_of_row == level, codes, 0.0), axis=0) + 0.5).astype(jnp.int32)
        rank_ref[...] = gray_rank(code, width)


def hash_rows(length: int, head_dim: int, dtype, width: int) -> int | None:
    """Positions per program for a sequence of `length`, or None where the kernel does not take the shape (codes of
    more than 20 hyperplanes would not sum exactly in the float32 code product)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or width > 20:
        return None
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return None
    return next((r for r in _ROWS if length % r == 0), None)


def lsh_ranks_pallas(x, projection_sets, *, interpret: bool = False):
    """`lsh.lsh_ranks` of public-layout x `[B, T, N, H]` under each projection set (`[H, P]`, equal P): a list of
    int32 ranks `[B, N, T]`, one per set. Shapes must pass `hash_rows`."""
    b, t, n, h = x.shape
    width = projection_sets[0].shape[1]
    if any(p.shape != (h, width) for p in projection_sets):
        raise ValueError("every projection set must be [H, P] with the same P")
    rows = hash_rows(t, h, x.dtype, width)
    if rows is None:
        raise ValueError(f"the hash kernel cannot take T={t}, H={h}, {width} hyperplanes, dtype {x.dtype}")
    levels = len(projection_sets)
    planes = levels * width
    padded_planes = next_power_of_two(planes, MIN_DOT)
    padded_levels = next_power_of_two(levels, MIN_DOT)
    projections = jnp.concatenate([p.astype(jnp.float32) for p in projection_sets], axis=1)
    projections = jnp.pad(projections, [(0, 0), (0, padded_planes - planes)])
    high, low = (part.T for part in split_hyperplanes(projections, x.dtype))  # [hyperplanes, H] each
    # powers[l, l * width + j] = 2**j: level l's code from its hyperplanes' sign bits
    plane = jnp.arange(padded_planes, dtype=jnp.int32)
    powers = jnp.where(
        (plane[None, :] // width == jnp.arange(padded_levels)[:, None]) & (plane[None, :] < planes),
        jnp.left_shift(1, plane % width).astype(jnp.float32)[None, :],  # exact powers of two (exp2 may round)
        0.0,
    )
    plane_spec = pl.BlockSpec((padded_planes, h), lambda c, j, i: (0, 0))
    rank_spec = pl.BlockSpec((None, None, rows), lambda c, j, i: (i, j, c))
    ranks = pl.pallas_call(
        functools.partial(_hash_kernel, width=width),
        grid=(t // rows, n, b),
        in_specs=[
            pl.BlockSpec((None, rows, None, h), lambda c, j, i: (i, c, j, 0)),
            plane_spec,
            plane_spec,
            pl.BlockSpec((padded_levels, padded_planes), lambda c, j, i: (0, 0)),
        ],
        out_specs=[rank_spec] * levels,
        out_shape=[jax.ShapeDtypeStruct((b, n, t), jnp.int32)] * levels,
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="hyper_lsh_hash",
    )(x, high, low, powers)
    return list(ranks)
