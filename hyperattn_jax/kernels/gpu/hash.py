"""LSH ranks (`lsh.lsh_ranks`) as one Pallas Triton kernel on the public layout: integer ranks out, no float32 scores.

The jnp hash writes the float32 hyperplane scores `[B, T, N, P]` (P = 35 for the five causal levels of a 131k-token
call: 0.6 GB per input) and reads them back, transposed, to form each level's bucket codes: about 2 ms of the causal
forward on an H100. Here a program hashes runs of `rows` positions of one head in a loop: the scores stay in
registers, the sign bits of every level's hyperplanes become the levels' codes through one small matrix product with
powers of two, and their Gray ranks are stored as one `[rows, levels]` tile of `[B, N, T, levels]` (uint8 for codes
of <= 8 bits); each level's `[B, N, T]` column is the grouped `[B, K, G, T]` layout the plans take (a free reshape).
The tile form was the fastest of the variants tried (`experiments/results/hash_variants_h200.json`).

Precision: x (bf16/fp16) times float32 hyperplanes is computed as two half-precision products against the hyperplanes
split into a high and a low half-precision part (`lsh.split_hyperplanes`), accumulated in float32, exactly as the jnp
hash does for half-precision inputs: the two agree up to float32 summation order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import MIN_DOT, dot, dot_t, next_power_of_two, triton_params
from hyperattn_jax.kernels.gpu.probe import probe_lse
from hyperattn_jax.lsh import gray_rank, split_hyperplanes

_ROWS = (128, 64, 32, 16)
_CHUNKS = 8  # steps per program: 0.50 vs 0.57 ms for one per 131k x 32-head input (probe_hash_chunks.json)


def _hash_kernel(x_ref, high_ref, low_ref, powers_ref, *refs, rows: int, width: int, scale: float | None):
    """Ranks of a program's positions of one head, `rows` at a time (a loop Triton pipelines: the next rows load
    while these are hashed), each as a `[rows, levels]` tile. With `scale` (keys with probe queries), refs start with
    the probes `[R, H]` and end with the probes' max and exp-sum over each `rows` keys: the probe's first pass
    (`probe.py`), done while the keys are loaded for the hash."""
    rank_ref = refs[1] if scale is not None else refs[0]

    def hash_chunk(chunk, carry):
        part = pl.ds(pl.multiple_of(chunk * rows, rows), rows)
        x = x_ref[part, :]  # [rows, H]
        if scale is not None:
            s = dot_t(refs[0][...], x) * scale  # [probes, rows]
            row_max = jnp.max(s, axis=1)
            refs[-2][chunk, :] = row_max
            refs[-1][chunk, :] = jnp.sum(jnp.exp(s - row_max[:, None]), axis=1)
        scores = dot(x, high_ref[...]) + dot(x, low_ref[...])  # [rows, hyperplanes]
        bits = (scores > 0).astype(x.dtype)  # 0 / 1, exact in half precision
        # [rows, levels (padded)]: each level's code as a sum of distinct powers of two below 2**width, exact in
        # float32; the Gray ranks follow elementwise, so no per-level reductions or selections
        codes = dot(bits, powers_ref[...])
        rank_ref[part, :] = gray_rank((codes + 0.5).astype(jnp.int32), width).astype(rank_ref.dtype)
        return carry

    lax.fori_loop(0, x_ref.shape[0] // rows, hash_chunk, 0)


def hash_rows(length: int, head_dim: int, dtype, width: int) -> int | None:
    """Positions per step for a sequence of `length`, or None where the kernel does not take the shape (codes of
    more than 20 hyperplanes would not sum exactly in the float32 code product)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or width > 20:
        return None
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return None
    return next((r for r in _ROWS if length % r == 0), None)


def lsh_ranks_pallas(
    x,
    projection_sets,
    *,
    interpret: bool = False,
    probes=None,
    scale: float | None = None,
    rows=None,
    chunks=None,
    num_warps=4,
):
    """`lsh.lsh_ranks` of public-layout x `[B, T, N, H]` under each projection set (`[H, P]`, equal P): a list of
    int32 ranks `[B, N, T]`, one per set. Shapes must pass `hash_rows`; `rows` (positions per step, default
    `hash_rows`'s choice), `chunks` (steps per program, default as many as divide T up to `_CHUNKS`) and
    `num_warps` tune the launch.

    With `probes` `[B, N, R, H]` (x the keys, N their heads) and `scale`, also returns each probe query's natural-log
    lse over all T keys `[B, N, R]` float32: the column-mass probe's first pass, fused into the hash's read of x.
    """
    b, t, n, h = x.shape
    width = projection_sets[0].shape[1]
    if any(p.shape != (h, width) for p in projection_sets):
        raise ValueError("every projection set must be [H, P] with the same P")
    rows = hash_rows(t, h, x.dtype, width) if rows is None else rows
    if rows is None or t % rows:
        raise ValueError(f"the hash kernel cannot take T={t}, H={h}, {width} hyperplanes, dtype {x.dtype}")
    if chunks is None:
        chunks = math.gcd(t // rows, _CHUNKS)
    if (t // rows) % chunks:
        raise ValueError(f"{chunks} steps of {rows} positions per program do not divide T={t}")
    span = rows * chunks
    levels = len(projection_sets)
    planes = levels * width
    padded_planes = next_power_of_two(planes, MIN_DOT)
    padded_levels = next_power_of_two(levels, MIN_DOT)
    projections = jnp.concatenate([p.astype(jnp.float32) for p in projection_sets], axis=1)
    projections = jnp.pad(projections, [(0, 0), (0, padded_planes - planes)])
    high, low = split_hyperplanes(projections, x.dtype)  # [H, hyperplanes] each
    # powers[l * width + j, l] = 2**j (exact in half precision): level l's code from its hyperplanes' sign bits
    plane = jnp.arange(padded_planes, dtype=jnp.int32)
    powers = jnp.where(
        (plane[:, None] // width == jnp.arange(padded_levels)[None, :]) & (plane[:, None] < planes),
        jnp.left_shift(1, plane % width).astype(jnp.float32)[:, None],  # exact powers of two (exp2 may round)
        0.0,
    ).astype(x.dtype)
    # Heads vary fastest over the grid: programs that run together read whole rows of x (all heads of a position).
    plane_spec = pl.BlockSpec((h, padded_planes), lambda j, c, i: (0, 0))
    rank_dtype = jnp.uint8 if width <= 8 else jnp.int32
    in_specs = [
        pl.BlockSpec((None, span, None, h), lambda j, c, i: (i, c, j, 0)),
        plane_spec,
        plane_spec,
        pl.BlockSpec((padded_planes, padded_levels), lambda j, c, i: (0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, span, padded_levels), lambda j, c, i: (i, j, c, 0))]
    out_shape, args = [jax.ShapeDtypeStruct((b, n, t, padded_levels), rank_dtype)], []
    if probes is not None:
        num_probes = probes.shape[2]
        padded = next_power_of_two(num_probes, MIN_DOT)
        args = [jnp.pad(lax.stop_gradient(probes), [(0, 0), (0, 0), (0, padded - num_probes), (0, 0)])]
        in_specs.append(pl.BlockSpec((None, None, padded, h), lambda j, c, i: (i, j, 0, 0)))
        stat_spec = pl.BlockSpec((None, None, chunks, padded), lambda j, c, i: (i, j, c, 0))
        out_specs += [stat_spec, stat_spec]
        out_shape += [jax.ShapeDtypeStruct((b, n, t // rows, padded), jnp.float32)] * 2
    outputs = pl.pallas_call(
        functools.partial(_hash_kernel, rows=rows, width=width, scale=None if probes is None else float(scale)),
        grid=(n, t // span, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="hyper_lsh_hash",
    )(x, high, low, powers, *args)
    # one int32 rank array per level (XLA fuses the column slices into their consumers)
    ranks = [outputs[0][..., level].astype(jnp.int32) for level in range(levels)]
    if probes is None:
        return ranks
    return ranks, probe_lse(outputs[1], outputs[2])[..., :num_probes]
