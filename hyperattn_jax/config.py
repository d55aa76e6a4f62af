"""HyperAttentionConfig: the static knobs of the algorithm (hashable, so it can be a static jit argument)."""

from __future__ import annotations

import dataclasses

# Sorting packs `rank * S + position` into one int32 (fast radix sort on GPU), so 2**P * S must stay below 2**31.
MAX_NUM_PROJECTIONS = 16
MAX_BLOCK_SIZE = 4096
SAMPLE_DISTRIBUTIONS = ("uniform", "value_norm", "column_mass")
SAMPLE_SCHEMES = ("independent", "systematic")


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperAttentionConfig:
    """Static configuration of HyperAttention (arXiv:2310.05869) and of our accuracy options (docs/accuracy.md).

    The default keeps the paper's hash, sample count, base case and causal recursion (7 projections, 256 samples,
    min_seq_len 4096) and changes what each query attends exactly: blocks of 128 keys, the 128 heaviest key columns
    found by 16 probe queries (the same 512 keys per query as the paper), and, causally, each query's 256 most recent
    keys (`local_window`); the residual is sampled by probed column mass (systematic draws, mixed 50/50 with uniform,
    unbiased weights), and non-causally each sampled value is pulled toward the samples' mean value as far as the
    probe queries show the samples disagree (`sample_shrinkage="adaptive"`). On real LM attention (SmolLM2-135M,
    8192 tokens, every layer replaced, docs/accuracy.md "Perplexity by kind of text") perplexity is 1.027x / 1.055x /
    1.013x exact on plays / Python code / prose, against 2.7x / 2.4x / 3.0x for the published algorithm; the output
    error is 0.07x the paper's causal and 0.36-0.39x non-causal (0.40-0.43x on documents never tuned on). It
    costs 1.09-1.17x the paper config's GPU time forward+backward and 1.19-1.32x forward (one H100, 32k and 131k,
    causal and not, pipelined timings; docs/accuracy.md, "Sample shrinkage").
    `HyperAttentionConfig.paper()` is the published algorithm exactly; `HyperAttentionConfig.accurate()` adds sinks
    and a block of 64 (lowest non-causal error measured, 0.35x the paper's; slower, and not better on perplexity).

    Attributes:
      block_size: keys per sortLSH block (b). A power of two, at most 4096.
      sample_size: sampled residual keys per (batch, kv head) (m). 0 turns the residual off.
      num_projections: random hyperplanes of the angular LSH (P); 2**P buckets.
      min_seq_len: at or below this many keys, attention is computed exactly (the causal recursion's base case too).
        Causal calls above it run the recursion on T rounded up to a multiple of block_size * 2**levels (padding
        last, hidden by causality): under T / 16 more positions at the default (min_seq_len is 32 blocks), T / 8
        for paper() (16 blocks), none for powers of two. Smaller is faster at long context but estimates more:
        2048 made the causal forward+backward at 131k 7-9% faster on an H100 (docs/speed.md).
      num_sink_keys: the first g key positions (attention sinks) are attended exactly by every query and left out of
        the blocks and the sample. Causal: taken out once, before the recursion.
      num_heavy_keys: this many further keys, the heaviest columns by a probe of `num_probe_queries` queries, are
        attended exactly by every query of a non-causal call and left out of the blocks and the sample.
      sample_distribution: "uniform" (the paper), "value_norm" (p_j ~ ||v_j||^2, the paper's matrix-product
        sampling) or "column_mass" (p_j ~ the probed attention mass of key j); mixed with uniform by
        `uniform_fraction`. Samples carry the unbiased weight 1 / (m p_j).
      sample_scheme: "independent" (i.i.d. draws, with replacement: the paper) or "systematic" (m points 1/m apart
        with one random offset on the distribution's CDF, keys in hash order: still unbiased, each key drawn at most
        once when m p_j <= 1, i.e. without replacement, and spread evenly over the hash buckets).
      uniform_fraction: weight of the uniform distribution in the mixture (keeps every 1 / (m p_j) bounded).
      num_probe_queries: queries whose exact attention rows estimate the column mass (for "column_mass" and heavy
        keys); they cost num_probe_queries * S scores per (batch, kv head).
      local_window: causal only: every diagonal block of the recursion reaches w keys further left, so every query
        attends at least its w most recent keys exactly (the base case attends each segment's w preceding keys; the
        lower-left quarters are the paper's size, shifted w keys left). At most half of max(min_seq_len,
        block_size); larger values are clamped to that.
      sample_shrinkage: non-causal only: "adaptive", or a number c >= 0. Each sampled value is pulled toward the
        samples' weighted mean value before it is attended, v_s <- lam v_s + (1 - lam) mean(v), one lam per batch
        element and kv head (`ops.shrinkage`). The residual's estimate is then its sampled mass times the mean value
        (low variance) plus lam times the samples' deviation from it (signal, and noise where few samples stand for
        many keys). "adaptive" fits lam to the data: the positive-part James-Stein factor of that deviation seen by
        the probe queries (`num_probe_queries`), near 1 where the residual is peaked, near 0 where the samples only
        disagree. A number c is the fixed rule lam = 1 / (1 + c r), r = residual keys per sample (valid keys that
        are not sinks or heavy keys, over m). 0 is the unbiased estimate (the paper's). The causal recursion's
        quarters never shrink: there it cost perplexity (docs/accuracy.md, "Sample shrinkage").

    >>> cfg = HyperAttentionConfig(block_size=128, sample_size=128)
    >>> cfg.block_size
    128
    >>> HyperAttentionConfig.paper().sample_distribution
    'uniform'
    >>> HyperAttentionConfig().sample_distribution
    'column_mass'
    """

    block_size: int = 128
    sample_size: int = 256
    num_projections: int = 7
    min_seq_len: int = 4096
    num_sink_keys: int = 0
    num_heavy_keys: int = 128
    sample_distribution: str = "column_mass"
    sample_scheme: str = "systematic"
    uniform_fraction: float = 0.5
    num_probe_queries: int = 16
    local_window: int = 256
    sample_shrinkage: float | str = "adaptive"

    def __post_init__(self):
        int_fields = ("block_size", "sample_size", "num_projections", "min_seq_len", "num_sink_keys", "num_heavy_keys")
        for name in (*int_fields, "num_probe_queries", "local_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an int")
        block_size, sample_size = self.block_size, self.sample_size
        num_projections, min_seq_len = self.num_projections, self.min_seq_len
        if not _is_power_of_two(block_size):
            raise ValueError(f"{block_size=} must be a power of two")
        if block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"{block_size=} must be at most {MAX_BLOCK_SIZE}")
        if sample_size < 0:
            raise ValueError(f"{sample_size=} must be >= 0")
        if not 1 <= num_projections <= MAX_NUM_PROJECTIONS:
            raise ValueError(f"{num_projections=} must be in [1, {MAX_NUM_PROJECTIONS}]")
        if min_seq_len < 0:
            raise ValueError(f"{min_seq_len=} must be >= 0")
        for name in ("num_sink_keys", "num_heavy_keys", "local_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.num_probe_queries < 1:
            raise ValueError(f"num_probe_queries={self.num_probe_queries} must be >= 1")
        if self.sample_distribution not in SAMPLE_DISTRIBUTIONS:
            raise ValueError(f"sample_distribution={self.sample_distribution!r} is not one of {SAMPLE_DISTRIBUTIONS}")
        if self.sample_scheme not in SAMPLE_SCHEMES:
            raise ValueError(f"sample_scheme={self.sample_scheme!r} is not one of {SAMPLE_SCHEMES}")
        shrinkage = self.sample_shrinkage
        is_number = isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool)
        if shrinkage != "adaptive" and not (is_number and 0.0 <= shrinkage < 1e30):
            raise ValueError(f"sample_shrinkage={shrinkage!r} must be 'adaptive' or a finite number >= 0")
        fraction = self.uniform_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"uniform_fraction={fraction!r} must be a number in (0, 1]")

    @classmethod
    def paper(cls, **changes) -> HyperAttentionConfig:
        """The published algorithm exactly: block 256, 256 uniform samples with replacement (weight S/m, own-block
        samples excluded, no shrinkage), 7 projections, min_seq_len 4096 (the official code's), no sinks, heavy keys
        or window.

        `changes` override fields, e.g. `HyperAttentionConfig.paper(min_seq_len=1024)`.

        >>> HyperAttentionConfig.paper(min_seq_len=1024).sample_distribution
        'uniform'
        """
        return cls(
            block_size=256,
            sample_size=256,
            num_projections=7,
            min_seq_len=4096,
            num_sink_keys=0,
            num_heavy_keys=0,
            sample_distribution="uniform",
            sample_scheme="independent",
            uniform_fraction=0.5,
            num_probe_queries=64,
            local_window=0,
            sample_shrinkage=0.0,
        ).replace(**changes)

    @classmethod
    def accurate(cls, **changes) -> HyperAttentionConfig:
        """The variant with the lowest non-causal error measured on real LM attention at the paper's 512 keys per
        query (docs/accuracy.md): block 64, 256 samples drawn systematically by probed column mass (80/20 with
        uniform), 32 sink keys, 96 heavy keys, and a 64-key window when causal. Causally the default is more
        accurate (its 256-key window) and faster. Every tile is a power of two (GPU kernel).

        >>> HyperAttentionConfig.accurate().keys_per_query
        512
        """
        return cls(
            block_size=64,
            sample_size=256,
            num_projections=7,
            min_seq_len=4096,
            num_sink_keys=32,
            num_heavy_keys=96,
            sample_distribution="column_mass",
            sample_scheme="systematic",
            uniform_fraction=0.2,
            num_probe_queries=64,
            local_window=64,
            sample_shrinkage="adaptive",
        ).replace(**changes)

    @property
    def num_buckets(self) -> int:
        return 2**self.num_projections

    @property
    def needs_probe(self) -> bool:
        """Whether a plan estimates column masses from probe queries."""
        return self.num_heavy_keys > 0 or self.sample_distribution == "column_mass"

    @property
    def keys_per_query(self) -> int:
        """Nominal keys each query attends: b + m + sinks + heavy in every estimated part, plus the causal window's w
        (attended exactly in the base case)."""
        return self.block_size + self.sample_size + self.num_sink_keys + self.num_heavy_keys + self.local_window

    def attends_exactly(self, num_keys: int) -> bool:
        """Whether a call over `num_keys` keys is computed exactly, causal or not: `num_keys <= min_seq_len` (or one
        block holds every key, where the estimate is exact anyway).

        >>> HyperAttentionConfig(min_seq_len=4096).attends_exactly(4096)
        True
        """
        return num_keys <= max(self.min_seq_len, self.block_size)

    def replace(self, **changes) -> HyperAttentionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
