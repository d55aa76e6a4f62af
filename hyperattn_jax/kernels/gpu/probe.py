"""The column-mass probe (`ops.probe_column_mass`) as two Pallas Triton kernels on the public layout.

The jnp probe writes a float32 score matrix `[B, K, probes, S]` and reads it back three times (max, exp-sum, mean);
in the causal recursion it also reads a transposed copy of k per level. Here k is read twice, in place, in the public
`[B, S, K, H]` layout: a first pass writes each probe query's max and exp-sum per key chunk, XLA combines those into
each probe's lse (a few KB), and a second pass recomputes the chunk's scores and writes only the mean softmax weight
per key. Same probe rows and natural-log arithmetic as the jnp twin, so the two agree to float32 round-off.
Non-causal, the first pass runs inside the hash kernel's read of k instead (`hash.py`, `probe_lse` combines either).

Problems come as `chunks` equal slices of the sequence: one (non-causal: every query over every key), or a causal
recursion level's 2**level chunks, whose problems are the second-half queries of each chunk over its first-half keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import MIN_DOT, NEG_START, div, dot_t, next_power_of_two, rem, triton_params

_KEY_CHUNKS = (256, 128, 64, 32, 16)
_CHUNKS_PER_PROGRAM = 16  # a loop over several chunks per program keeps loads in flight (num_stages)


def _program_keys(problems: int, kv_heads: int, stride: int, length: int, span: int, shift: int, chunk: int):
    """(first key of this program's span in the head's whole sequence, its first step whose keys are real): with a
    shift, the first problem's first keys lie before position 0 and are never read."""
    problem = rem(div(pl.program_id(0), kv_heads), problems)
    base = problem * (stride * length) - shift + pl.program_id(1) * span
    return base, jnp.maximum(-base, 0) // chunk


def _chunk(step, chunk: int, start=0):
    """Rows [start + step * chunk, + chunk) of a block (start a multiple of chunk)."""
    return pl.ds(pl.multiple_of(start + step * chunk, chunk), chunk)


def _stats_kernel(probe_ref, k_ref, max_ref, sum_ref, *, scale, chunk, steps, keys):
    probes = probe_ref[...]
    base, first = keys()

    def body(step, carry):  # online max and exp-sum of every probe row over this program's keys
        row_max, row_sum = carry
        s = dot_t(probes, k_ref[_chunk(step, chunk, base), :]) * scale
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(s - new_max[:, None]), axis=1)
        return new_max, row_sum

    start = (jnp.full((probes.shape[0],), NEG_START, jnp.float32), jnp.zeros((probes.shape[0],), jnp.float32))
    row_max, row_sum = lax.fori_loop(first, steps, body, start)
    max_ref[...] = row_max
    sum_ref[...] = row_sum


def _mass_kernel(probe_ref, k_ref, lse_ref, mass_ref, *, scale, chunk, steps, num_probes, keys):
    probes, lse = probe_ref[...], lse_ref[...]
    real = lax.broadcasted_iota(jnp.int32, (probes.shape[0], chunk), 0) < num_probes  # padded probes do not count
    base, first = keys()

    def before_start(step, carry):  # keys before position 0: no mass
        mass_ref[_chunk(step, chunk)] = jnp.zeros((chunk,), jnp.float32)
        return carry

    def body(step, carry):
        p = jnp.exp(dot_t(probes, k_ref[_chunk(step, chunk, base), :]) * scale - lse[:, None])
        mass_ref[_chunk(step, chunk)] = jnp.sum(jnp.where(real, p, 0.0), axis=0) / num_probes
        return carry

    lax.fori_loop(0, first, before_start, 0)
    lax.fori_loop(first, steps, body, 0)


def probe_key_chunk(length: int, head_dim: int, shift: int = 0) -> int | None:
    """Keys per inner step for a problem of `length` keys starting `shift` keys early, or None where the kernels
    cannot take the shape."""
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return None
    return next((c for c in _KEY_CHUNKS if length % c == 0 and shift % c == 0), None)


def probe_queries(q, index, *, num_kv_heads: int, chunks: int, halves: bool):
    """The probe rows `[B, C, K, R, H]` of public-layout q `[B, T, N, H]`: row r of a problem's grouped queries
    `[G, T', H]` (r = g * T' + t, as `probe_column_mass` numbers them) for each of the C problems."""
    _, t, n, _ = q.shape
    groups = n // num_kv_heads
    span = t // chunks
    queries = span // 2 if halves else span
    offset = queries if halves else 0
    group, position = index // queries, index % queries
    rows = jnp.arange(chunks)[:, None] * span + offset + position[None, :]  # [C, R]
    heads = jnp.arange(num_kv_heads)[:, None] * groups + group[None, :]  # [K, R]
    return q[:, rows[:, None, :], heads[None, :, :]]


def probe_lse(chunk_max, chunk_sum):
    """Each probe's lse `[..., R]` from per-key-run maxima and exp-sums `[..., runs, R]` (the first pass)."""
    top = jnp.max(chunk_max, axis=-2)
    return top + jnp.log(jnp.sum(chunk_sum * jnp.exp(chunk_max - top[..., None, :]), axis=-2))


def probe_column_mass_pallas(
    probes, k, *, chunks: int, halves: bool, scale: float, interpret: bool = False, lse=None, shift: int = 0
):
    """Column mass `[B, C, K, L]` (each problem's row sums to 1) of every problem's keys under its probe rows.

    probes `[B, C, K, R, H]` (from `probe_queries`); k `[B, S, K, H]` public layout, cut into C chunks (keys: the
    first half of each chunk when `halves`, else the whole chunk), each problem's keys starting `shift` keys early
    (the causal recursion's window: keys [a - w, mid - w) of chunk [a, b); the first chunk's keys before position 0
    get mass 0 and count in no lse); `lse` `[B, C, K, R]`, when the probes' lse over their problem's keys is known
    (the hash kernel computes it with the non-causal hash), skips the first pass. Not differentiated; shapes must
    pass `probe_key_chunk`.
    """
    b, c, kv_heads, num_probes, h = probes.shape
    s = k.shape[1]
    stride = 2 if halves else 1
    length = s // (chunks * stride)
    chunk = probe_key_chunk(length, h, shift)  # keys per inner step
    if chunk is None or s != length * chunks * stride:
        raise ValueError(f"probe kernels cannot take {chunks} chunks of {s} keys with head dim {h} and {shift=}")
    padded = next_power_of_two(num_probes, MIN_DOT)
    probes = jnp.pad(lax.stop_gradient(probes), [(0, 0)] * 3 + [(0, padded - num_probes), (0, 0)])
    steps = length // chunk
    per_program = next(d for d in range(min(_CHUNKS_PER_PROGRAM, steps), 0, -1) if steps % d == 0)
    span = chunk * per_program  # keys per program
    programs = length // span
    grid = (b * c * kv_heads, programs)
    keys = functools.partial(_program_keys, c, kv_heads, stride, length, span, shift, chunk)
    k = lax.stop_gradient(k)
    kernel_args = dict(scale=scale, chunk=chunk, steps=per_program, keys=keys)

    def unpack(i):  # program -> (batch, problem, kv head)
        return div(i, c * kv_heads), rem(div(i, kv_heads), c), rem(i, kv_heads)

    def probe_map(i, j):
        batch, problem, head = unpack(i)
        return batch, problem, head, 0, 0

    def key_map(i, j):  # the head's whole sequence: each program reads its span from it (shifted, `_program_keys`)
        batch, _, head = unpack(i)
        return batch, 0, head, 0

    probe_spec = pl.BlockSpec((None, None, None, padded, h), probe_map)
    key_spec = pl.BlockSpec((None, s, None, h), key_map)
    stat_spec = pl.BlockSpec((None, None, padded), lambda i, j: (i, j, 0))
    params = triton_params(num_warps=4, num_stages=3)
    if lse is None:
        chunk_max, chunk_sum = pl.pallas_call(
            functools.partial(_stats_kernel, **kernel_args),
            grid=grid,
            in_specs=[probe_spec, key_spec],
            out_specs=[stat_spec, stat_spec],
            out_shape=[jax.ShapeDtypeStruct((b * c * kv_heads, programs, padded), jnp.float32)] * 2,
            compiler_params=params,
            interpret=interpret,
            name="hyper_probe_stats",
        )(probes, k)
        lse = probe_lse(chunk_max, chunk_sum)
    else:
        lse = jnp.pad(lse.astype(jnp.float32), [(0, 0)] * 3 + [(0, padded - num_probes)]).reshape(-1, padded)
    return pl.pallas_call(
        functools.partial(_mass_kernel, num_probes=num_probes, **kernel_args),
        grid=grid,
        in_specs=[probe_spec, key_spec, pl.BlockSpec((None, padded), lambda i, j: (i, 0))],
        out_specs=pl.BlockSpec((None, None, None, span), lambda i, j: (*unpack(i), j)),
        out_shape=jax.ShapeDtypeStruct((b, c, kv_heads, length), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="hyper_probe_mass",
    )(probes, k, lse)
