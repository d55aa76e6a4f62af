"""HyperAttentionConfig: the static knobs of the algorithm (hashable, so it can be a static jit argument)."""

from __future__ import annotations

import dataclasses

# Sorting packs `rank * S + position` into one int32 (fast radix sort on GPU), so 2**P * S must stay below 2**31.
MAX_NUM_PROJECTIONS = 16
MAX_BLOCK_SIZE = 4096


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperAttentionConfig:
    """Static configuration of HyperAttention (arXiv:2310.05869); defaults are the paper's.

    Attributes:
      block_size: keys per sortLSH block (b). A power of two, at most 4096.
      sample_size: uniformly sampled residual keys per (batch, kv head) (m). 0 turns the residual off.
      num_projections: random hyperplanes of the angular LSH (P); 2**P buckets.
      min_seq_len: at or below this many keys, attention is computed exactly (the causal recursion's base case too).

    >>> cfg = HyperAttentionConfig(block_size=128, sample_size=128)
    >>> cfg.block_size
    128
    """

    block_size: int = 256
    sample_size: int = 256
    num_projections: int = 7
    min_seq_len: int = 4096

    def __post_init__(self):
        for name in ("block_size", "sample_size", "num_projections", "min_seq_len"):
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

    @property
    def num_buckets(self) -> int:
        return 2**self.num_projections

    def replace(self, **changes) -> HyperAttentionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
