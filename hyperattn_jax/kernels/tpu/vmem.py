"""VMEM budgets of the TPU kernels: what one grid step keeps in VMEM, checked against the limit the kernels request.

A Pallas TPU kernel double-buffers every block (the DMA of step i+1 overlaps the compute of step i), so each input and
output block costs twice its VMEM footprint; scratch accumulators cost once; the float32 temporaries of one step
(scores, probabilities, their gradients) live in VMEM too once they exceed the 64 vregs. VMEM stores arrays in
(sublane, 128-lane) tiles, so a block's footprint rounds its last dim up to 128 lanes (a head dim of 64 costs as much
as 128) and its second-to-last up to 8 rows of 32 bits (16 rows of bf16).

The limit: every kernel requests `VMEM_LIMIT_BYTES` = 32 MiB of scoped VMEM rather than inheriting Mosaic's default
(part of the physical VMEM, differing by generation). The physical VMEM is 128 MiB (v5e, v6e) and 64 MiB (v5p, v7x
per TensorCore; `pltpu.get_tpu_info_for_chip`), so 32 MiB is granted on every generation the tiling targets, with
half of the smallest VMEM left to the compiler's own scratch. v4 and older have 16 MiB of VMEM and are not targeted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

VMEM_LIMIT_BYTES = 32 * 2**20
_LANES = 128


def tile_bytes(shape: tuple[int, ...], dtype) -> int:
    """VMEM bytes of an array of `shape` (leading dims multiply): the last two dims padded to the (8 x 32-bit, 128)
    tiles VMEM stores."""
    itemsize = np.dtype(dtype).itemsize
    sublanes = 8 * max(1, 4 // itemsize)
    shape = (1, 1, *shape)
    rows = -(-shape[-2] // sublanes) * sublanes
    lanes = -(-shape[-1] // _LANES) * _LANES
    return math.prod(shape[:-2]) * rows * lanes * itemsize


class VmemBudget(NamedTuple):
    """Bytes of VMEM one grid step of a kernel needs: double-buffered blocks, scratch and float32 temporaries."""

    kernel: str
    blocks: dict[str, int]  # one buffer each; counted twice
    scratch: dict[str, int]
    temporaries: dict[str, int]

    @property
    def total(self) -> int:
        return 2 * sum(self.blocks.values()) + sum(self.scratch.values()) + sum(self.temporaries.values())

    def reason_over_limit(self, limit: int = VMEM_LIMIT_BYTES) -> str | None:
        """None when the budget fits `limit`, else a message naming the sizes."""
        if self.total <= limit:
            return None
        biggest = max({**self.blocks, **self.scratch, **self.temporaries}.items(), key=lambda kv: kv[1])
        return (
            f"{self.kernel} needs {self.total / 2**20:.1f} MiB of VMEM per grid step, over the {limit / 2**20:.0f} "
            f"MiB requested (largest buffer: {biggest[0]} = {biggest[1] / 2**20:.1f} MiB)"
        )

    def check(self, limit: int = VMEM_LIMIT_BYTES) -> None:
        reason = self.reason_over_limit(limit)
        if reason is not None:
            raise ValueError(reason)
