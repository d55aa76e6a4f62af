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

from hyperattn_jax.kernels.gpu._common import MIN_DOT, NEG_START, dot, dot_t, next_power_of_two, triton_params
from hyperattn_jax.kernels.gpu.probe import probe_lse
from hyperattn_jax.lsh import gray_rank, split_hyperplanes

_ROWS = (128, 64, 32, 16)
_CHUNKS = 8  # steps per program: 0.50 vs 0.57 ms for one per 131k x 32-head input (probe_hash_chunks.json)


def _hash_kernel(x_ref, high_ref, low_ref, powers_ref, *refs, rows: int, width: int, probing):
    """Ranks of a program's positions of one head, `rows` at a time (a loop Triton pipelines: the next rows load
    while these are hashed), each as a `[rows, levels]` tile. With `probing` = (scale, cuts, shift, length) (keys
    with probe queries), refs start with each cut's probes `[C, R, H]` (one row set per problem) and end with each
    cut's probe max and exp-sum over every `rows` keys: the probe's first pass (`probe.py`), done while the keys are
    loaded for the hash; a run of keys outside its cut's problem keys gets the empty max and sum."""
    cuts = () if probing is None else probing[1]
    probe_refs, rank_ref = refs[: len(cuts)], refs[len(cuts)]
    max_refs, sum_refs = refs[len(cuts) + 1 :: 2], refs[len(cuts) + 2 :: 2]
    program_start = pl.program_id(1) * x_ref.shape[0]

    def probe_stats(chunk, x):
        scale, _, shift, length = probing
        # the run's first key, in the coordinates of the cuts (problem keys start `shift` keys early)
        position = program_start + chunk * rows + shift
        for (cut_length, cut_keys), probe_ref, max_ref, sum_ref in zip(cuts, probe_refs, max_refs, sum_refs):
            problem = position // cut_length

            def score(probe_ref=probe_ref, problem=problem):
                s = dot_t(probe_ref[problem], x) * scale  # [probes, rows]
                row_max = jnp.max(s, axis=1)
                return row_max, jnp.sum(jnp.exp(s - row_max[:, None]), axis=1)

            def empty(probe_ref=probe_ref):
                return jnp.full(probe_ref.shape[1:2], NEG_START, jnp.float32), jnp.zeros(probe_ref.shape[1:2])

            if cut_keys == cut_length and shift == 0:  # every key is a problem key (non-causal)
                row_max, row_sum = score()
            else:  # rows divides the shift and every cut's key count: the run is all problem keys or none
                member = (position < length) & (position % cut_length < cut_keys)
                row_max, row_sum = lax.cond(member, score, empty)
            max_ref[chunk, :] = row_max
            sum_ref[chunk, :] = row_sum

    def hash_chunk(chunk, carry):
        part = pl.ds(pl.multiple_of(chunk * rows, rows), rows)
        x = x_ref[part, :]  # [rows, H]
        if probing is not None:
            probe_stats(chunk, x)
        scores = dot(x, high_ref[...]) + dot(x, low_ref[...])  # [rows, hyperplanes]
        bits = (scores > 0).astype(x.dtype)  # 0 / 1, exact in half precision
        # [rows, levels (padded)]: each level's code as a sum of distinct powers of two below 2**width, exact in
        # float32; the Gray ranks follow elementwise, so no per-level reductions or selections
        codes = dot(bits, powers_ref[...])
        rank_ref[part, :] = gray_rank((codes + 0.5).astype(jnp.int32), width).astype(rank_ref.dtype)
        return carry

    lax.fori_loop(0, x_ref.shape[0] // rows, hash_chunk, 0)


def hash_rows(length: int, head_dim: int, dtype, width: int, divides=()) -> int | None:
    """Positions per step for a sequence of `length` (a step size that also divides each of `divides`), or None
    where the kernel does not take the shape (codes of more than 20 hyperplanes would not sum exactly in the float32
    code product)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or width > 20:
        return None
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return None
    return next((r for r in _ROWS if all(x % r == 0 for x in (length, *divides))), None)


def lsh_ranks_pallas(
    x,
    projection_sets,
    *,
    interpret: bool = False,
    probes=None,
    cuts=None,
    shift: int = 0,
    scale: float | None = None,
    rows=None,
    chunks=None,
    num_warps=4,
):
    """`lsh.lsh_ranks` of public-layout x `[B, T, N, H]` under each projection set (`[H, P]`, equal P): a list of
    int32 ranks `[B, N, T]`, one per set. Shapes must pass `hash_rows`; `rows` (positions per step, default
    `hash_rows`'s choice), `chunks` (steps per program, default as many as divide T up to `_CHUNKS`) and
    `num_warps` tune the launch.

    With `probes` (x the keys, N their heads) and `scale`, also returns each probe query's natural-log lse over its
    problem's keys: the column-mass probe's first pass, fused into the hash's read of x. The problems are
    `probe.py`'s: per cut (length L, keys n) of `cuts` (default one cut (T, T): every key), the keys
    [c L - shift, c L - shift + n) of problem c (positions before 0 are no keys); `probes` holds per cut the probe
    rows `[B, T / L, N, R, H]` of its problems, and the lse comes per cut as `[B, T / L, N, R]` float32. `rows` must
    divide the shift and every cut's n.
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
    out_shape, args, probing = [jax.ShapeDtypeStruct((b, n, t, padded_levels), rank_dtype)], [], None
    if probes is not None:
        cuts = [(t, t)] if cuts is None else [tuple(cut) for cut in cuts]
        if any(t % length or length % keys or keys % rows for length, keys in cuts) or shift % rows:
            raise ValueError(f"{rows} positions per step must divide the {shift=} and every cut of {cuts} ({t=})")
        num_probes = probes[0].shape[3]
        padded = next_power_of_two(num_probes, MIN_DOT)
        pad = [(0, 0)] * 3 + [(0, padded - num_probes), (0, 0)]
        args = [jnp.pad(lax.stop_gradient(cut_probes), pad) for cut_probes in probes]
        in_specs += [
            pl.BlockSpec((None, t // length, None, padded, h), lambda j, c, i: (i, 0, j, 0, 0)) for length, _ in cuts
        ]
        stat_spec = pl.BlockSpec((None, None, chunks, padded), lambda j, c, i: (i, j, c, 0))
        out_specs += [stat_spec] * (2 * len(cuts))
        out_shape += [jax.ShapeDtypeStruct((b, n, t // rows, padded), jnp.float32)] * (2 * len(cuts))
        probing = (float(scale), tuple(cuts), shift, t)
    outputs = pl.pallas_call(
        functools.partial(_hash_kernel, rows=rows, width=width, probing=probing),
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
    lses = []
    for (length, _), chunk_max, chunk_sum in zip(cuts, outputs[1::2], outputs[2::2], strict=True):
        # runs in the cuts' coordinates (rolled by the shift: the runs that wrap around are no problem's keys),
        # grouped by problem: [B, N, T / L, L / rows, R] -> each problem's lse [B, T / L, N, R]
        by_problem = [
            jnp.roll(x, shift // rows, axis=2).reshape(b, n, t // length, length // rows, padded)
            for x in (chunk_max, chunk_sum)
        ]
        lses.append(jnp.swapaxes(probe_lse(*by_problem), 1, 2)[..., :num_probes])
    return ranks, lses
