"""The column-mass probe (`ops.probe_column_mass`) as two Pallas Triton kernels on the public layout.

The jnp probe writes a float32 score matrix `[B, K, probes, S]` and reads it back three times (max, exp-sum, mean);
in the causal recursion it also reads a transposed copy of k per level. Here k is read twice, in place, in the public
`[B, S, K, H]` layout: a first pass writes each probe query's max and exp-sum per key span, XLA combines those into
each probe's lse (a few KB), and a second pass recomputes the span's scores and writes only the mean softmax weight
per key. Same probe rows and natural-log arithmetic as the jnp twin, so the two agree to float32 round-off.
Non-causal, the first pass runs inside the hash kernel's read of k instead (`hash.py`, `probe_lse` combines either).

Problems come as cuts of the sequence, all probed in the same two passes: a cut (length L, keys n) is the sequence
in chunks of L whose problems' keys are each chunk's first n. Non-causal: one cut (S, S), every query over every
key. The causal recursion: one cut per level l, (T / 2**l, T / 2**(l + 1)) (second-half queries over first-half
keys), all levels' keys shifted w left by its window (keys [a - w, mid - w) of chunk [a, b); the first chunk's keys
before position 0 get no mass and count in no lse). Each program reads one span of keys once and scores it against
the probes of the problem that span belongs to in every cut.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax._layout import group_queries, heads_major
from hyperattn_jax.kernels.gpu._common import MIN_DOT, NEG_START, div, dot_t, next_power_of_two, rem, triton_params
from hyperattn_jax.ops.plan import probe_column_mass, probe_index

_KEY_CHUNKS = (256, 128, 64, 32, 16)
# Elements of one k chunk [chunk, H]: Triton keeps num_stages (3) of them in shared memory, 192 KiB at 256 x 64 in
# 16 bits. 256 keys at H 128 asked for 260 KiB of the H100's 227 (RESOURCE_EXHAUSTED on the device, 2026-12-07).
_KEY_TILE_ELEMENTS = 256 * 64
_CHUNKS_PER_PROGRAM = 16  # a loop over several chunks per program keeps loads in flight (num_stages)


def _program_span(cuts, span: int, shift: int, chunk: int):
    """(this program's first key in the head's sequence, its first step whose keys are real, whether its span is a
    problem's keys in each cut): the span [j * span, (j + 1) * span) of the sequence shifted by `shift` lies in one
    chunk of every cut (span divides every cut's key count)."""
    start = pl.program_id(1) * span
    base = start - shift
    return base, jnp.maximum(-base, 0) // chunk, [(start % length) < keys for length, keys in cuts]


def _chunk(step, chunk: int, start=0):
    """Rows [start + step * chunk, + chunk) of a block (start a multiple of chunk)."""
    return pl.ds(pl.multiple_of(start + step * chunk, chunk), chunk)


def _stats_kernel(*refs, scale, chunk, steps, cuts, program_span):
    n = len(cuts)
    probe_refs, k_ref, max_refs, sum_refs = refs[:n], refs[n], refs[n + 1 : 2 * n + 1], refs[2 * n + 1 :]
    base, first, members = program_span()
    probes = [ref[...] for ref in probe_refs]

    def body(step, carry):  # the online max and exp-sum over this program's keys of every cut they belong to
        keys = k_ref[_chunk(step, chunk, base), :]

        def update(rows, state):
            row_max, row_sum = state
            s = dot_t(rows, keys) * scale
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(s - new_max[:, None]), axis=1)
            return new_max, row_sum

        return [
            lax.cond(member, functools.partial(update, rows), lambda state: state, state)
            for rows, member, state in zip(probes, members, carry, strict=True)
        ]

    rows = probes[0].shape[0]
    start = [(jnp.full((rows,), NEG_START, jnp.float32), jnp.zeros((rows,), jnp.float32)) for _ in probes]
    final = lax.fori_loop(first, steps, body, start)  # a cut this span is not in keeps the start: adds nothing
    for (row_max, row_sum), max_ref, sum_ref in zip(final, max_refs, sum_refs, strict=True):
        max_ref[...] = row_max
        sum_ref[...] = row_sum


def _mass_kernel(*refs, scale, chunk, steps, cuts, program_span, num_probes):
    n = len(cuts)
    probe_refs, k_ref, lse_refs, mass_refs = refs[:n], refs[n], refs[n + 1 : 2 * n + 1], refs[2 * n + 1 :]
    base, first, members = program_span()
    probes, lses = [ref[...] for ref in probe_refs], [ref[...] for ref in lse_refs]
    real = lax.broadcasted_iota(jnp.int32, (probes[0].shape[0], chunk), 0) < num_probes  # padded probes do not count

    def before_start(step, carry):  # keys before position 0: no mass
        for mass_ref in mass_refs:
            mass_ref[_chunk(step, chunk)] = jnp.zeros((chunk,), jnp.float32)
        return carry

    def body(step, carry):  # scores only for the cuts whose problem keys these are; zeros for the others
        keys = k_ref[_chunk(step, chunk, base), :]
        where = _chunk(step, chunk)
        for rows, lse, member, mass_ref in zip(probes, lses, members, mass_refs, strict=True):

            @pl.when(member)
            def _(rows=rows, lse=lse, mass_ref=mass_ref):
                p = jnp.exp(dot_t(rows, keys) * scale - lse[:, None])
                mass_ref[where] = jnp.sum(jnp.where(real, p, 0.0), axis=0) / num_probes

            @pl.when(jnp.logical_not(member))
            def _(mass_ref=mass_ref):
                mass_ref[where] = jnp.zeros((chunk,), jnp.float32)

        return carry

    lax.fori_loop(0, first, before_start, 0)
    lax.fori_loop(first, steps, body, 0)


def probe_key_chunk(length: int, head_dim: int, shift: int = 0) -> int | None:
    """Keys per inner step for a problem of `length` keys starting `shift` keys early, or None where the kernels
    cannot take the shape."""
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return None
    fits = [c for c in _KEY_CHUNKS if c * head_dim <= _KEY_TILE_ELEMENTS]
    return next((c for c in fits if length % c == 0 and shift % c == 0), None)


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


def probe_mass_pallas(probes_by_cut, k, *, cuts, shift: int = 0, scale: float, interpret: bool = False, lse=None):
    """Column mass of every problem of every cut (module docstring), each problem's row summing to 1, in two passes
    over k for all cuts together.

    probes_by_cut: per cut (length L, keys n), the probe rows `[B, T / L, K, R, H]` of its problems (from
    `probe_queries`); k `[B, T, K, H]` public layout; `shift`: every problem's keys start that many keys early;
    `lse` (one cut only) `[B, 1, K, R]`, when the probes' lse over their problem's keys is known (the hash kernel
    computes it with the non-causal hash), skips the first pass. Returns per cut the mass `[B, T / L, K, n]`. Not
    differentiated; shapes must pass `probe_key_chunk` for every cut's key count and the shift.
    """
    b, _, kv_heads, num_probes, h = probes_by_cut[0].shape
    t = k.shape[1]
    fewest = min(keys for _, keys in cuts)
    chunk = probe_key_chunk(fewest, h, shift)  # keys per inner step
    if chunk is None or any(t % length or length % keys or keys % fewest for length, keys in cuts):
        raise ValueError(f"probe kernels cannot take the cuts {cuts} of {t} keys with head dim {h} and {shift=}")
    padded = next_power_of_two(num_probes, MIN_DOT)
    pad = [(0, 0)] * 3 + [(0, padded - num_probes), (0, 0)]
    probes_by_cut = [jnp.pad(lax.stop_gradient(probes), pad) for probes in probes_by_cut]
    steps = fewest // chunk
    per_program = next(d for d in range(min(_CHUNKS_PER_PROGRAM, steps), 0, -1) if steps % d == 0)
    span = chunk * per_program  # keys per program
    grid = (b * kv_heads, t // span)
    program_span = functools.partial(_program_span, tuple(cuts), span, shift, chunk)
    kernel_args = dict(scale=scale, chunk=chunk, steps=per_program, cuts=tuple(cuts), program_span=program_span)

    def problem_spec(length, *block):  # the problem (of a cut) that this program's span lies in
        def index(i, j):
            return div(i, kv_heads), (j * span) // length, rem(i, kv_heads), *(0 for _ in block)

        return pl.BlockSpec((None, None, None, *block), index)

    probe_specs = [problem_spec(length, padded, h) for length, _ in cuts]
    key_spec = pl.BlockSpec((None, t, None, h), lambda i, j: (div(i, kv_heads), 0, rem(i, kv_heads), 0))
    params = triton_params(num_warps=4, num_stages=3)
    k = lax.stop_gradient(k)
    if lse is None:
        stat_spec = pl.BlockSpec((None, None, None, padded), lambda i, j: (div(i, kv_heads), j, rem(i, kv_heads), 0))
        stats = pl.pallas_call(
            functools.partial(_stats_kernel, **kernel_args),
            grid=grid,
            in_specs=[*probe_specs, key_spec],
            out_specs=[stat_spec] * (2 * len(cuts)),
            out_shape=[jax.ShapeDtypeStruct((b, t // span, kv_heads, padded), jnp.float32)] * (2 * len(cuts)),
            compiler_params=params,
            interpret=interpret,
            name="hyper_probe_stats",
        )(*probes_by_cut, k)
        lses = cut_lses(stats, cuts, span=span)
    else:
        lses = [jnp.pad(lse.astype(jnp.float32), [(0, 0)] * 3 + [(0, padded - num_probes)])]
    masses = pl.pallas_call(
        functools.partial(_mass_kernel, num_probes=num_probes, **kernel_args),
        grid=grid,
        in_specs=[*probe_specs, key_spec, *(problem_spec(length, padded) for length, _ in cuts)],
        out_specs=[pl.BlockSpec((None, None, span), lambda i, j: (div(i, kv_heads), rem(i, kv_heads), j))] * len(cuts),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, t), jnp.float32)] * len(cuts),
        compiler_params=params,
        interpret=interpret,
        name="hyper_probe_mass",
    )(*probes_by_cut, k, *lses)
    return cut_masses(masses, cuts)


def cut_lses(stats, cuts, *, span: int):
    """Each cut's problems' probe lse `[B, T / L, K, R]` from the first pass's per-span maxima and exp-sums `[B, T /
    span, K, R]` (one array per cut: the maxima, then the sums): the spans of a problem's chunk (spans outside its
    keys count 0)."""
    n = len(cuts)
    b, spans, kv_heads, rows = stats[0].shape
    return [
        probe_lse(*(x.reshape(b, spans * span // length, length // span, kv_heads, rows).swapaxes(2, 3) for x in pair))
        for (length, _), pair in zip(cuts, zip(stats[:n], stats[n:], strict=True), strict=True)
    ]


def cut_masses(masses, cuts):
    """Each cut's second-pass masses `[B, K, T]` as its problems' keys in sequence order, `[B, T / L, K, n]`."""
    return [
        jnp.moveaxis(mass.reshape(*mass.shape[:2], mass.shape[2] // length, length)[..., :keys], 2, 1)
        for mass, (length, keys) in zip(masses, cuts, strict=True)
    ]


def probe_mass_reference(q, k, probe_keys, *, cuts, shift: int = 0, scale: float, num_probes: int):
    """The jnp twin of `probe_mass_pallas`: `ops.probe_column_mass` on each cut's problems, cut from public-layout
    q `[B, T, N, H]` and k `[B, T, K, H]` as the kernels cut them (module docstring), with probe rows drawn by
    `probe_keys` (one per cut). Returns per cut the mass `[B, T / L, K, n]` and the probe rows `[B, T / L, K, R, H]`
    that `probe_mass_pallas` takes."""
    b, t, n = q.shape[:3]
    kv_heads = k.shape[2]
    shifted = jnp.roll(k, shift, axis=1)  # problem keys start `shift` early; the first chunk's wrap around: masked
    masses, probes = [], []
    for (length, keys), probe_key in zip(cuts, probe_keys, strict=True):
        chunks = t // length
        # the problems as grouped arrays `[C * B, ...]` (chunk-major), queries the last `keys` of each chunk
        q_problems = jnp.concatenate([q[:, c * length + length - keys : (c + 1) * length] for c in range(chunks)])
        k_problems = jnp.concatenate([shifted[:, c * length : c * length + keys] for c in range(chunks)])
        first = jnp.where(jnp.arange(chunks * b) < b, shift, 0)  # the first chunk's keys before position 0
        key_valid = (jnp.arange(keys) >= first[:, None])[:, None]
        mass = probe_column_mass(
            group_queries(q_problems, kv_heads), heads_major(k_problems), key=probe_key, num_probes=num_probes,
            scale=scale, key_valid=key_valid,
        )  # fmt: skip
        masses.append(mass.reshape(chunks, b, kv_heads, keys).swapaxes(0, 1))
        index = probe_index(probe_key, n // kv_heads * keys, num_probes)
        probes.append(probe_queries(q, index, num_kv_heads=kv_heads, chunks=chunks, halves=keys < length))
    return masses, probes
