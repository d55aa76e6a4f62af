"""Every kernel's static tuning, in one place: frozen, validated, hashable dataclasses (they ride in jit's static
arguments and custom_vjp's nondiff_argnums). Sizes are upper bounds: each kernel shrinks them to fit small problems.

GPU (Triton, `kernels/gpu/`): `TiledKernelConfig` (the tiled / row-indexed estimate kernels), `FlashConfig` (exact
flash attention, the causal base case). Block sizes are powers of two of at least 16 (Triton's `dot` needs them).
TPU (Mosaic, `kernels/tpu/`): `TpuTiling` (the tiled estimate kernels), `FlashTiling` (exact flash attention). Row
blocks are multiples of 16 (bf16 packs 16 rows per vreg), key blocks multiples of 128 (the lanes of a vreg).
GPU (Mosaic GPU, `kernels/mosaic_gpu/`): `MosaicTiling` (the tiled estimate forward). Query rows come 64 per compute
warpgroup (the M of one wgmma).
"""

from __future__ import annotations

import dataclasses

MIN_DOT = 16  # Triton's smallest dot operand dimension
TPU_ROW_MULTIPLE = 16  # bf16 sublane packing: rows per vreg
TPU_LANES = 128  # the minor dimension of a vreg and of every VMEM tile
ROWS_PER_WARPGROUP = 64  # the M of one Hopper warpgroup's wgmma


def _check_power_of_two(config, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < minimum or value & (value - 1):
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be a power of two >= {minimum}")


def _check_multiple(config, name: str, multiple: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0 or value % multiple:
        raise ValueError(f"{type(config).__name__}.{name}={value!r} must be a positive multiple of {multiple}")


def _check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class TiledKernelConfig:
    """GPU tiled and row-indexed estimate kernels (`tiled_attention.py`, `indexed_forward.py`,
    `indexed_backward.py`)."""

    block_q: int = 64  # queries per forward / dq program (64 beat 128 by 7% at 131k on the H100)
    block_k: int = 64  # keys per inner step
    block_q_bwd: int = 64  # queries per inner step of the dk/dv kernel
    block_k_bwd: int = 64  # keys per dk/dv program
    num_warps: int = 4
    num_stages: int = 2
    num_stages_bwd: int = 3  # the row-indexed backward's kernels: 3 beat 2 by 6% fwd+bwd at 131k (H100)
    shared_splits: int = 16  # partial sums of a shared tile's dk, dv (programs per key chunk)

    def __post_init__(self):
        _check_power_of_two(self, ("block_q", "block_k", "block_q_bwd", "block_k_bwd"), MIN_DOT)
        _check_power_of_two(self, ("num_warps",), 1)
        _check_positive(self, ("num_stages", "num_stages_bwd", "shared_splits"))

    replace = dataclasses.replace


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """GPU flash attention (`flash.py`). Backward blocks are equal-sized query/key chunks."""

    block_q: int = 128
    block_k: int = 64
    block_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 3  # 3 beat 2 by 9% fwd, 7% fwd+bwd on the causal base case at 131k (H100)

    def __post_init__(self):
        _check_power_of_two(self, ("block_q", "block_k", "block_bwd"), MIN_DOT)
        _check_power_of_two(self, ("num_warps",), 1)
        _check_positive(self, ("num_stages",))

    replace = dataclasses.replace


@dataclasses.dataclass(frozen=True)
class TpuTiling:
    """TPU tiled estimate kernels (`kernels/tpu/tiled_attention.py`). Multiples of 128 fill whole vregs and MXU
    passes."""

    block_q: int = 256  # most query rows per forward / dq step (bq is padded to a multiple of 16 below it)
    block_k: int = 512  # keys per online-softmax step inside a resident tile
    block_k_bwd: int = 256  # keys per dk/dv program

    def __post_init__(self):
        _check_multiple(self, "block_q", TPU_ROW_MULTIPLE)
        _check_multiple(self, "block_k", TPU_LANES)
        _check_multiple(self, "block_k_bwd", TPU_LANES)

    def validate(self) -> TpuTiling:  # checked at construction; kept for callers that validate explicitly
        return self


@dataclasses.dataclass(frozen=True)
class FlashTiling:
    """TPU flash attention (`kernels/tpu/flash.py`): query rows and keys per step."""

    block_q: int = 256
    block_k: int = 512

    def __post_init__(self):
        _check_multiple(self, "block_q", TPU_ROW_MULTIPLE)
        _check_multiple(self, "block_k", TPU_LANES)


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Static tuning of the Mosaic GPU tile-attention forward."""

    block_q: int = ROWS_PER_WARPGROUP  # query rows per compute warpgroup
    block_k: int = 128  # keys per double-buffered chunk (tiles are padded to a multiple, log-weight -inf)
    p_in_registers: bool = True  # the PV wgmma reads P from registers; the interpreter needs it in shared memory
    # Compute warpgroups per program, each with its own block_q rows of the same query block: with 2, one k/v chunk
    # in shared memory serves 2 * block_q queries (half the copies per query), as in FlashAttention-3. In the
    # row-gathering kernel each of them gathers half of every chunk's rows (or the producer gathers them all).
    compute_warpgroups: int = 1
    # Row-gathering kernel: each chunk's key rows reach shared memory by TMA a chunk ahead of its cp.async gathers
    # (False: the gathers load them from global memory, a dependent load before every copy issues; ignored with a
    # producer warpgroup, whose row loads hold up no product).
    stage_rows: bool = True
    stages: int = 2  # row-gathering kernel: key-chunk slots in its ring (stages - 1 chunks in flight)
    # Row-gathering kernel: the rows out and lse are stored at reach shared memory by TMA with the queries, so the
    # final scatter reads no index from global memory (the scatter was a quarter of a program's time on an H100).
    # Not yet measured on a GPU.
    stage_store_rows: bool = False
    # Row-gathering kernel: one more warpgroup issues the key chunks' copies while the others only multiply (warp
    # specialisation); its gathers arrive on a barrier as they land, so it never waits for its own copies.
    producer: bool = False
    # With a producer and 2 compute warpgroups: FlashAttention-3's ping-pong schedule (one warpgroup's softmax
    # while the other's products run) and registers moved from the producer to the compute warpgroups. Not yet run
    # on a GPU.
    pingpong: bool = False
    # With 2 compute warpgroups and grouped-query attention: the two take the same 64 slots of one query block for
    # two query heads of a kv head (G even), whose key chunks are the same, instead of 2 x 64 slots of one head.
    # Not yet run on a GPU.
    share_heads: bool = False

    def __post_init__(self):
        if self.block_q != ROWS_PER_WARPGROUP:
            raise ValueError(f"MosaicTiling.{self.block_q=} must be {ROWS_PER_WARPGROUP} (one warpgroup)")
        if self.block_k not in (64, 128, 256):
            raise ValueError(f"MosaicTiling.{self.block_k=} must be 64, 128 or 256")
        if self.stages not in (2, 3, 4):
            raise ValueError(f"MosaicTiling.{self.stages=} must be 2, 3 or 4")
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"MosaicTiling.{self.compute_warpgroups=} must be 1 or 2")
        if self.pingpong and not (self.producer and self.compute_warpgroups == 2):
            raise ValueError("MosaicTiling.pingpong needs producer=True and compute_warpgroups=2")
        if self.share_heads and self.compute_warpgroups != 2:
            raise ValueError("MosaicTiling.share_heads needs compute_warpgroups=2")

    @property
    def rows(self) -> int:
        """Query slots of one head per program (a multiple of it makes a query block)."""
        return self.block_q * (1 if self.share_heads else self.compute_warpgroups)

    @property
    def heads(self) -> int:
        """Query heads per program."""
        return self.compute_warpgroups if self.share_heads else 1

    replace = dataclasses.replace
