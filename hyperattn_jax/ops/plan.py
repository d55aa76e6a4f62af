"""The plan: the random, piecewise-constant part of one HyperAttention call, drawn once.

Hash queries and keys (`lsh.py`), sort them by rank (`sorting.py`), pick the global keys (sinks, probed heavy columns)
and draw the residual samples with their weights. Every backend consumes the plan as it is (the contract between the
algorithm and its backends); given the plan, the estimator is a smooth function of q, k, v and `jax.grad` is exact.
Grouped layout: queries `[B, K, G, T, H]`, keys `[B, K, S, H]` (see `_layout.py`). Random keys: `keys.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.lsh import lsh_projections, lsh_rank
from hyperattn_jax.ops.keys import draw_index, draw_uniform, plan_keys
from hyperattn_jax.ops.shrinkage import adaptive_value_weight, fixed_value_weight
from hyperattn_jax.ops.sorting import SortOrder, positions_mask, sort_orders

_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=(
        "query_order",
        "key_order",
        "sample_index",
        "num_valid_keys",
        "sample_log_weight",
        "num_block_keys",
        "global_index",
        "sample_value_weight",
    ),
    meta_fields=("num_blocks", "query_block", "key_block", "num_global"),
)
@dataclasses.dataclass(frozen=True)
class SortLSHPlan:
    """The random, piecewise-constant part of HyperAttention for one call (treated as constants by gradients).

    A pytree whose sizes are static metadata, so a plan can pass through `jit` and be kept as a custom_vjp residual.

    query_order: sort of queries `[B, K, G, T]` by LSH rank; key_order: of keys `[B, K, S]`.
    num_blocks: nb; query_block: queries per block (bq = ceil(T / nb)); key_block: keys per block (b).
    sample_index: int32 `[B, K, m]` sampled key indices (original positions), or None when sampling is off.
    num_valid_keys: float32 `[B]`, the real key count S (per batch element when kv_length is given).
    num_global: static count of exact keys (sinks + heavy keys), attended by every query.
    sample_log_weight: float32 `[B, K, m]` log of each sample's weight 1 / (m p_j); None means log(S / m).
    num_block_keys: int32 `[B, K]` real keys in the blocks (valid keys that are not global); None means S.
    global_index: int32 `[B, K, num_global]` the global keys (original positions), or None when there are none. They
      keep their place in the hash order, and their block slots are masked (`ops.tiles`): the block grid is the
      paper's whatever the number of global keys (power-of-two blocks for the kernels, shard boundaries kept).
    sample_value_weight: float32 `[B, K]` lam of `config.sample_shrinkage` (`ops.shrinkage`): attended sample values
      are lam v_s + (1 - lam) times the samples' weighted mean value (`ops.tiles.shrink_sample_values`); None: v_s
      as they are.
    """

    query_order: SortOrder
    key_order: SortOrder
    num_blocks: int
    query_block: int
    key_block: int
    sample_index: jax.Array | None
    num_valid_keys: jax.Array
    num_global: int = 0
    sample_log_weight: jax.Array | None = None
    num_block_keys: jax.Array | None = None
    global_index: jax.Array | None = None
    sample_value_weight: jax.Array | None = None

    def replace(self, **changes) -> SortLSHPlan:
        return dataclasses.replace(self, **changes)


def probe_index(key, num_rows: int, num_probes: int):
    """Which of a problem's `num_rows` = G * T grouped query rows (row g * T + t) the column-mass probe reads: int32
    `[min(num_probes, num_rows)]`, shared by every batch element and kv head."""
    return jax.random.randint(key, (min(num_probes, num_rows),), 0, num_rows)


def probe_column_mass(q, k, *, key, num_probes: int, scale: float, key_valid=None):
    """Estimated attention mass of each key `[B, K, S]` (sums to 1 per row), from `num_probes` random queries.

    Each probe query's exact softmax row over all keys is computed (num_probes * S scores per kv head) and the rows are
    averaged: an unbiased estimate of the column sums of the attention matrix divided by the number of queries.
    q `[B, K, G, T, H]`, k `[B, K, S, H]`, key_valid optional bool `[B, 1 | K, S]`. Not differentiated.
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    rows = q.reshape(*q.shape[:2], -1, q.shape[-1])
    index = probe_index(key, rows.shape[2], num_probes)
    s = jnp.einsum("bkrh,bksh->bkrs", rows[:, :, index], k, preferred_element_type=jnp.float32) * scale
    if key_valid is not None:
        s = jnp.where(key_valid[:, :, None, :], s, -jnp.inf)
    return jnp.mean(jax.nn.softmax(s, axis=-1), axis=2)


def top_k_chunk(s: int, k: int) -> int | None:
    """Keys per chunk of `top_k_index`'s first stage over `s` keys, or None where one full top-k is used: the power of
    two nearest sqrt(s / k), so that both stages sort about sqrt(s k) entries per row (s / chunk maxima, then k chunks'
    k * chunk entries) instead of s, and only where that is at most a quarter of s (s >= 16 k, e.g. 2048 for the
    default's 128 heavy keys). On an H100 at the causal levels' shapes the two stages are 1.9-7x faster than one
    full top-k; fixed chunks of 8 to 64 keys differ by less than the run's spread
    (experiments/results/bench_top_k_levels_h100.json)."""
    if k < 1 or s < 16 * k:
        return None
    chunk = 1 << max(2, math.floor(math.log2(math.sqrt(s / k)) + 0.5))
    return chunk if s >= 4 * k * chunk else None


def top_k_index(x, k: int, chunk: int | None = None):
    """`jax.lax.top_k(x, k)[1]` over the last axis, same indices in the same order (ties: lowest index first).

    A full top-k sorts every entry (on a GPU a radix sort of all S keys, ~1.2 ms for 32 rows of 131072). With chunks
    (`chunk`, default `top_k_chunk(S, k)`), first pick the k chunks with the largest maxima (ties: lowest chunk
    first), then the top k of those k * chunk entries, in index order: every entry of the full top k lies in a picked
    chunk (a chunk that is not picked has k picked chunks ranked above it, each holding an entry that ranks above all
    of its own), so the result is identical.
    """
    s = x.shape[-1]
    chunk = top_k_chunk(s, k) if chunk is None else chunk
    if chunk is None or s < 4 * k * chunk:
        return jax.lax.top_k(x, k)[1].astype(jnp.int32)
    pad = -s % chunk
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    chunks = x.reshape(*x.shape[:-1], -1, chunk)
    best = jnp.sort(jax.lax.top_k(jnp.max(chunks, axis=-1), k)[1], axis=-1)
    candidate = jnp.take_along_axis(chunks, best[..., None], axis=-2).reshape(*x.shape[:-1], k * chunk)
    pick = jax.lax.top_k(candidate, k)[1]
    return (jnp.take_along_axis(best, pick // chunk, axis=-1) * chunk + pick % chunk).astype(jnp.int32)


def _global_keys(q, k, mass_key, config, scale, key_valid, probe):
    """The keys attended exactly by every query: the first sinks and the probed heaviest columns. Returns their mask
    `[B, K, S]`, their positions `[B, K, g]` int32 (None when g = 0) and the probed column mass (or None)."""
    s = k.shape[2]
    num_sinks = min(config.num_sink_keys, s)
    num_heavy = min(config.num_heavy_keys, s - num_sinks)
    is_sink = jnp.broadcast_to(jnp.arange(s) < num_sinks, k.shape[:3])
    mass = None
    if config.needs_probe and probe is not None:
        mass = probe(mass_key)
    elif config.needs_probe:
        mass = probe_column_mass(
            q, k, key=mass_key, num_probes=config.num_probe_queries, scale=scale, key_valid=key_valid
        )
    index = jnp.broadcast_to(jnp.arange(num_sinks, dtype=jnp.int32), (*k.shape[:2], num_sinks))
    if num_heavy > 0:
        # Padding ranks below every real key but above the sinks, so the picks never repeat one and the count of
        # global keys stays exactly g (padding picked when too few keys are valid is masked).
        candidate = jnp.where(is_sink, -jnp.inf, jnp.where(key_valid, mass, -1.0))
        heavy = top_k_index(candidate, num_heavy)
        index = jnp.concatenate([index, heavy], axis=-1)
    if index.shape[-1] == 0:
        return is_sink, None, mass
    return positions_mask(index, s), index, mass


def _sample_probabilities(k, v, config, mass, is_normal):
    """The sampling distribution over keys `[B, K, S]`: zero off `is_normal`, mixed with uniform, summing to one."""
    uniform = is_normal.astype(jnp.float32)
    uniform = uniform / jnp.maximum(jnp.sum(uniform, -1, keepdims=True), 1.0)
    if config.sample_distribution == "uniform":
        return uniform
    if config.sample_distribution == "value_norm":
        score = jnp.sum(jnp.square(jax.lax.stop_gradient(v).astype(jnp.float32)), axis=-1)
    else:
        score = mass
    score = jnp.where(is_normal, score, 0.0)
    total = jnp.sum(score, -1, keepdims=True)
    score = jnp.where(total > 0, score / jnp.where(total > 0, total, 1.0), uniform)
    return (1.0 - config.uniform_fraction) * score + config.uniform_fraction * uniform


def _draw_sorted_positions(key, probability_sorted, m: int, scheme: str):
    """m draws of sorted key positions from `probability_sorted` `[B, K, S]` by inverse CDF.

    "independent": i.i.d. uniforms; "systematic": the points (i + u) / m with one uniform u, so key j is drawn
    m p_j times in expectation (unbiased weights 1 / (m p_j)), at most once when m p_j <= 1, and the draws are spread
    evenly along the hash order.
    """
    cdf = jnp.cumsum(probability_sorted, axis=-1)
    cdf = cdf / cdf[..., -1:]
    if scheme == "systematic":
        offset = draw_uniform(key, (*cdf.shape[:2], 1))
        # (m - 1 + offset) / m can round up to 1: keep every point below 1
        u = jnp.minimum((jnp.arange(m, dtype=jnp.float32) + offset) / m, _BELOW_ONE)
    else:
        u = draw_uniform(key, (*cdf.shape[:2], m))
    # The binary search is a loop, which on a GPU costs a host round trip per step (~17 steps): unrolled there. Not on
    # the CPU, where XLA takes minutes to compile the unrolled search (same results either way).
    method = "scan_unrolled" if jax.default_backend() == "gpu" else "scan"
    search = jax.vmap(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right", method=method)))
    # The normalised cdf is exactly 1 from the last key with probability on (x / x), so every u < 1 lands on a key
    # with probability; the bound only matters for a row without any (its cdf is NaN; every draw is dropped).
    return jnp.minimum(search(cdf, u).astype(jnp.int32), cdf.shape[-1] - 1)


def sample_value_weight(plan: SortLSHPlan, config: HyperAttentionConfig, q, k, v, *, probe_key, scale: float):
    """lam `[B, K]` of `config.sample_shrinkage` for `plan`'s samples (`ops.shrinkage`), or None where shrinkage is
    off or nothing is sampled: a number c gives the fixed rule 1 / (1 + c r), r = residual keys per sample;
    "adaptive" fits lam to the data from the probe rows `probe_index(probe_key, ...)` of q (the column-mass probe's
    queries) and the sampled k, v."""
    shrinkage, index = config.sample_shrinkage, plan.sample_index
    if shrinkage == 0 or index is None:
        return None
    if shrinkage != "adaptive":
        residual = plan.num_valid_keys[:, None] if plan.num_block_keys is None else plan.num_block_keys
        return fixed_value_weight(shrinkage, residual, index.shape[-1], index.shape[:2])
    if v is None:
        raise ValueError("sample_shrinkage='adaptive' needs the values: make_plan(..., v=v)")
    rows = q.reshape(*q.shape[:2], -1, q.shape[-1])
    probes = rows[:, :, probe_index(probe_key, rows.shape[2], config.num_probe_queries)]
    log_weight = jnp.zeros(index.shape, jnp.float32) if plan.sample_log_weight is None else plan.sample_log_weight
    take = functools.partial(jnp.take_along_axis, indices=index[..., None], axis=2)
    return adaptive_value_weight(probes, take(k), take(v), log_weight, scale=scale)


def plan_projections(key, head_dim: int, config: HyperAttentionConfig, hash_key=None):
    """The LSH hyperplanes `[H, P]` that `make_plan(key=key, hash_key=hash_key)` uses."""
    return lsh_projections(plan_keys(key, hash_key).hash, head_dim, config.num_projections)


def make_plan(
    q,
    k,
    *,
    key,
    config: HyperAttentionConfig,
    kv_length=None,
    hash_key=None,
    sample_index=None,
    v=None,
    scale=None,
    ranks=None,
    probe=None,
) -> SortLSHPlan:
    """Hash queries `[B, K, G, T, H]` and keys `[B, K, S, H]`, sort them, pick global keys and draw the samples.

    `hash_key`, when given, draws the LSH hyperplanes (e.g. fixed per layer, as in the paper's code) and `key` only the
    samples; otherwise both come from `key`. `sample_index` int `[B, K, m]`, when given, replaces the drawn samples
    (uniform weight: valid keys / m). `v` `[B, K, S, H]` is needed for sample_distribution="value_norm" and for
    sample_shrinkage="adaptive"; `scale` (default 1/sqrt(H)) for the column-mass probe and the adaptive shrinkage.
    `ranks` (query_rank `[B, K, G, T]`, key_rank `[B, K, S]`), when given, are `lsh_rank` of q and k under
    `plan_projections(key, H, config, hash_key)`, computed by the caller (the kernels hash all causal levels in one
    pass over the unsorted inputs); q and k are then read only for their shapes, the column-mass probe and the
    adaptive shrinkage (its probe rows and sampled keys). `probe`, when given, replaces `probe_column_mass`: a
    function of the probe's random key returning the column mass `[B, K, S]` of the same probe rows
    (`probe_index`), e.g. the kernels'.
    """
    batch, _, _, t, head_dim = q.shape
    s = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    keys = plan_keys(key, hash_key)
    if ranks is None:
        projections = plan_projections(key, head_dim, config, hash_key)
        ranks = lsh_rank(q, projections), lsh_rank(k, projections)
    query_rank, key_rank = ranks
    if kv_length is None:
        num_valid = jnp.full((batch,), s, jnp.int32)
    else:
        num_valid = jnp.clip(kv_length.astype(jnp.int32), 1, s)
    key_valid = jnp.broadcast_to((jnp.arange(s) < num_valid[:, None])[:, None], k.shape[:3])
    uses_options = config.num_sink_keys or config.num_heavy_keys or config.needs_probe
    paper_sampling = config.sample_distribution == "uniform" and config.sample_scheme == "independent"

    def with_shrinkage(plan):
        lam = sample_value_weight(plan, config, q, k, v, probe_key=keys.probe, scale=scale)
        return plan.replace(sample_value_weight=lam)

    if not uses_options and paper_sampling:
        return with_shrinkage(
            _paper_plan(q, query_rank, key_rank, key_valid, num_valid, keys.samples, config, sample_index)
        )

    is_global, global_index, mass = _global_keys(q, k, keys.probe, config, scale, key_valid, probe)
    is_normal = key_valid & ~is_global
    # Every valid key keeps its hash rank, global keys too (their block slots are masked), and padding sorts last:
    # the blocks are the paper's, whatever the number of global keys.
    key_rank = jnp.where(key_valid, key_rank, config.num_buckets)
    query_order, key_order = sort_orders([query_rank, key_rank], config.num_buckets + 1)
    num_block_keys = jnp.sum(is_normal, axis=-1, dtype=jnp.int32)
    num_blocks = -(-s // config.block_size)
    sample_log_weight = None
    if sample_index is not None:
        sample_index = sample_index.astype(jnp.int32)
        rate = num_block_keys.astype(jnp.float32) / sample_index.shape[-1]
        # Given samples that hit a global key or padding are dropped: those keys are counted exactly (or not at all).
        drawn_normal = jnp.take_along_axis(is_normal, sample_index, axis=-1)
        sample_log_weight = jnp.where(drawn_normal, jnp.log(rate)[..., None], -jnp.inf)
    elif config.sample_size > 0:
        m = config.sample_size
        probability = jax.lax.stop_gradient(_sample_probabilities(k, v, config, mass, is_normal))
        probability_sorted = jnp.take_along_axis(probability, key_order.perm, axis=-1)
        position = _draw_sorted_positions(keys.draws, probability_sorted, m, config.sample_scheme)
        sample_index = jnp.take_along_axis(key_order.perm, position, axis=-1)
        drawn = jnp.take_along_axis(probability_sorted, position, axis=-1)
        sample_log_weight = jnp.where(drawn > 0, -jnp.log(m * jnp.where(drawn > 0, drawn, 1.0)), -jnp.inf)
    plan = SortLSHPlan(
        query_order=query_order,
        key_order=key_order,
        num_blocks=num_blocks,
        query_block=-(-t // num_blocks),
        key_block=config.block_size,
        sample_index=sample_index,
        num_valid_keys=num_valid.astype(jnp.float32),
        num_global=0 if global_index is None else global_index.shape[-1],
        sample_log_weight=sample_log_weight,
        num_block_keys=num_block_keys,
        global_index=global_index,
    )
    return with_shrinkage(plan)


def exact_plan(q_shape, num_keys: int, *, block_size: int, kv_length=None) -> SortLSHPlan:
    """A plan under which every query attends every key exactly, with no samples and no hashing: the causal
    recursion's exact parts (its exact quarters, the base case's prefixes) on the kernels that take plans. q_shape
    `[B, K, G, T, H]`; kv_length `[B]` or None. Queries and keys keep their order. With `block_size >= num_keys`
    one block holds every key and every query; else the queries are cut into ceil(num_keys / block_size) blocks and
    every key is global (attended by every block; their block slots masked), for kernels that need shorter query
    blocks."""
    batch, kv_heads, groups, t = q_shape[:4]

    def identity(shape):
        order = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), shape)
        return SortOrder(order, order)

    num_blocks = -(-num_keys // block_size)
    if kv_length is None:
        num_valid = jnp.full((batch,), num_keys, jnp.float32)
    else:
        num_valid = jnp.clip(kv_length, 1, num_keys).astype(jnp.float32)
    every_key_global = num_blocks > 1
    return SortLSHPlan(
        query_order=identity((batch, kv_heads, groups, t)),
        key_order=identity((batch, kv_heads, num_keys)),
        num_blocks=num_blocks,
        query_block=-(-t // num_blocks),
        key_block=min(block_size, num_keys),
        sample_index=None,
        num_valid_keys=num_valid,
        num_global=num_keys if every_key_global else 0,
        num_block_keys=jnp.zeros((batch, kv_heads), jnp.int32) if every_key_global else None,
        global_index=identity((batch, kv_heads, num_keys)).perm if every_key_global else None,
    )


def _paper_plan(q, query_rank, key_rank, key_valid, num_valid, sample_key, config, sample_index) -> SortLSHPlan:
    """The published plan: every key hashed into blocks, m uniform samples with replacement (weight S/m)."""
    batch, kv_heads, _, t, _ = q.shape
    s = key_rank.shape[-1]
    # Padding keys get a rank past every bucket, so they sort to the end and fill the last blocks.
    key_rank = jnp.where(key_valid, key_rank, config.num_buckets)
    query_order, key_order = sort_orders([query_rank, key_rank], config.num_buckets + 1)
    num_blocks = -(-s // config.block_size)
    if sample_index is not None:
        sample_index = sample_index.astype(jnp.int32)
    elif config.sample_size > 0:
        sample_index = draw_index(sample_key, (batch, kv_heads, config.sample_size), num_valid[:, None, None])
    return SortLSHPlan(
        query_order=query_order,
        key_order=key_order,
        num_blocks=num_blocks,
        query_block=-(-t // num_blocks),
        key_block=config.block_size,
        sample_index=sample_index,
        num_valid_keys=num_valid.astype(jnp.float32),
    )
