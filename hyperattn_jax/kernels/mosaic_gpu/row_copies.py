"""Row copies by index between global and shared memory, for the Mosaic GPU kernels (Hopper has no gather-TMA).

TMA copies boxes of contiguous rows; reading the rows a plan names (`q[query_index]`, `k[key_index]`) needs one copy
per row. Without a gathering TMA the usual way is cp.async: each of the warpgroup's 128 threads issues 16-byte
`cp.async` copies from its rows' addresses in global memory into shared memory, 8 consecutive threads covering one
128-byte row segment (coalesced). Pallas exposes no gathered `cp.async` (jax's own cp.async copy refuses gathers),
so these helpers write it in Mosaic GPU's MLIR through `plgpu.inline_mgpu` (experimental APIs: jaxlib's MLIR dialects
and `jax.experimental.mosaic.gpu.utils`; tested on jax 0.11.2 and 0.12).

The destination is the layout wgmma and TMA use (`swizzled`): (8, 64)-element tiles of 1024 bytes, row-major, and
inside a tile the 16-byte piece j of row r stored at piece j XOR (r mod 8) (the 128-byte swizzle). Outputs go the
other way: 16-byte vector loads from the swizzled shared buffer, stored at their rows in global memory.

A warpgroup that only gathers for others (a producer) should not wait for its own copies before it tells the
consumers: `gather_rows(..., arrive_on=...)` ends the copies with `cp.async.mbarrier.arrive.noinc`, which arrives
on an mbarrier once this thread's copies have landed, so the producer goes on issuing while they are in flight
(`gather_barriers`, `init_gather_barriers`, `wait_gather_barrier`: plain mbarriers, since Pallas barriers cannot be
named inside inline Mosaic GPU code; the interpreter gets Pallas barriers and `announce_gathered` instead).

In jax's Mosaic GPU interpreter (CPU tests) the same helpers copy one row at a time with Pallas loads and stores: the
interpreter models shared memory logically, so its tests check which rows go where, and the device check the
swizzle arithmetic and the cp.async synchronisation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, llvm, memref, nvvm

WARPGROUP = 128  # threads
PIECE = 16  # bytes per cp.async copy and per vector load/store
TILE = (8, 64)  # elements of a swizzled tile (16-bit): 8 rows of 128 bytes
SWIZZLED = (plgpu.TilingTransform(TILE), plgpu.SwizzleTransform(128))
# float32 rows the same way: tiles of (8, 32) elements, 8 rows of 128 bytes (Mosaic GPU stores a WGMMA-layout float32
# accumulator only to swizzled shared memory)
SWIZZLED_FLOAT32 = (plgpu.TilingTransform((TILE[0], TILE[1] // 2)), plgpu.SwizzleTransform(128))


def _ref_type(transforms=(), *, write: bool = True):
    """`plgpu.RefType` for an inline_mgpu argument. jax >= 0.12 needs read-only inputs marked (write=False, else the
    kernel is refused for writing to an input); jax 0.11 has no such field."""
    if "write" in {field.name for field in dataclasses.fields(plgpu.RefType)}:
        return plgpu.RefType(transforms, write=write)
    return plgpu.RefType(transforms)


def swizzled(shape, dtype):
    """Shared memory laid out for TMA, wgmma and these copies: (8, 64)-element tiles of 16-bit values ((8, 32) of
    float32), 128-byte swizzle."""
    transforms = SWIZZLED_FLOAT32 if jnp.dtype(dtype).itemsize == 4 else SWIZZLED
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _int(value: int, bits: int = 32):
    return mgpu_utils.c(value, ir.IntegerType.get_signless(bits))


def _pieces(num_rows: int, head_dim: int, itemsize: int = 2):
    """(row, piece) i32 values of every 16-byte piece this thread copies, and the pieces per row. Piece number
    L = 128 i + thread covers row L // pieces_per_row: consecutive threads read consecutive bytes of a row."""
    pieces_per_row = head_dim * itemsize // PIECE
    total = num_rows * pieces_per_row
    if total % WARPGROUP:
        raise ValueError(f"{num_rows} rows of {head_dim} {8 * itemsize}-bit elements are not a whole number of "
                         f"16-byte pieces per thread")  # fmt: skip
    thread = arith.remui(mgpu_utils.thread_idx(), _int(WARPGROUP))
    for i in range(total // WARPGROUP):
        linear = arith.addi(thread, _int(i * WARPGROUP))
        yield arith.divui(linear, _int(pieces_per_row)), arith.remui(linear, _int(pieces_per_row)), pieces_per_row


def _swizzled_offset(row, piece, pieces_per_row: int):
    """Byte offset of 16-byte `piece` of `row` in a swizzled buffer (`swizzled`): tile (row // 8, piece // 8) of
    1024 bytes, then row r = row mod 8 at 128 r, then piece (piece mod 8) XOR r."""
    r = arith.remui(row, _int(8))
    tile = arith.addi(arith.muli(arith.divui(row, _int(8)), _int(pieces_per_row // 8)), arith.divui(piece, _int(8)))
    inside = arith.addi(arith.muli(r, _int(128)), arith.muli(arith.xori(arith.remui(piece, _int(8)), r), _int(PIECE)))
    return arith.addi(arith.muli(tile, _int(1024)), inside)


def _global_offset(row_value, piece, row_bytes: int):
    """Byte offset (i64) of 16-byte `piece` of row `row_value` (i32) of a row-major global array."""
    i64 = ir.IntegerType.get_signless(64)
    row_offset = arith.muli(arith.extui(i64, row_value), _int(row_bytes, 64))
    return arith.addi(row_offset, arith.extui(i64, arith.muli(piece, _int(PIECE))))


def _global_pointer(ref):
    return llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(ref))


def _byte(pointer, offset):
    return mgpu_utils.getelementptr(pointer, [offset], ir.IntegerType.get_signless(8))


def _load_index(ref, position):
    return memref.load(ref, [arith.index_cast(ir.IndexType.get(), position)])


def gather_rows(rows_ref, pairs, *, first: int = 0, interpret: bool, arrive_on=None):
    """For each (src, dst) in pairs: dst[first + i] = src[rows[i]] for every row i of rows_ref, where src is a
    global `[R, H]` 16-bit array, rows_ref int32 `[n]` global or shared (valid rows only) and dst a `swizzled` shared
    `[first + n or more, H]` buffer (`first` a multiple of 8). On the GPU the copies are asynchronous: one cp.async
    group for all pairs, complete after `wait_gathers`; or, with `arrive_on=(barriers, i)`, each thread arrives on
    gather barrier i once its copies have landed (`wait_gather_barrier`)."""
    (num_rows,) = rows_ref.shape
    if interpret:

        def copy_row(i, carry):
            row = rows_ref[i]
            for src, dst in pairs:
                dst[pl.ds(first + i, 1), :] = src[pl.ds(row, 1), :]
            return carry

        lax.fori_loop(0, num_rows, copy_row, 0)
        return
    head_dim = pairs[0][1].shape[1]
    if first % TILE[0]:
        raise ValueError(f"gathered rows start at a whole swizzle tile of {TILE[0]} rows, got {first=}")
    read = _ref_type(write=False)
    barrier_refs = [] if arrive_on is None else [arrive_on[0]]
    pair_types = [(read, _ref_type(SWIZZLED)) for _ in pairs]

    @plgpu.inline_mgpu(arg_types=(read, pair_types, [_ref_type()] * len(barrier_refs)))
    def gather(ctx, rows, refs, barriers):
        del ctx
        pointers = [(_global_pointer(src), mgpu_utils.memref_ptr(dst)) for src, dst in refs]
        for row, piece, pieces_per_row in _pieces(num_rows, head_dim):
            source = _global_offset(_load_index(rows, row), piece, head_dim * 2)
            target = _swizzled_offset(arith.addi(row, _int(first)), piece, pieces_per_row)
            for src_pointer, dst_pointer in pointers:
                nvvm.cp_async_shared_global(
                    _byte(dst_pointer, target), _byte(src_pointer, source), PIECE, nvvm.LoadCacheModifierKind.CG
                )
        if barriers:  # no .inc: this is the thread's one arrival of the phase, made when its copies complete
            nvvm.cp_async_mbarrier_arrive(_barrier(barriers[0], arrive_on[1]).get_ptr(), noinc=True)
        else:
            nvvm.cp_async_commit_group()

    gather(rows_ref, list(pairs), barrier_refs)


def wait_gathers(pending: int, *, interpret: bool):
    """Wait until at most `pending` of this thread's most recent gather groups are in flight, then make every
    thread's copies visible to the warpgroup and to wgmma (a proxy fence and a warpgroup barrier)."""
    if not interpret:

        @plgpu.inline_mgpu()
        def wait(ctx):
            del ctx
            nvvm.cp_async_wait_group(pending)

        wait()
    plgpu.commit_smem()


def empty_gather_group(*, interpret: bool):
    """Commit a cp.async group with no copies, so that a loop whose steps gather only sometimes (not in its last
    step) keeps one group per step and `wait_gathers` the same count in every step. Nothing in the interpreter."""
    if not interpret:

        @plgpu.inline_mgpu()
        def commit(ctx):
            del ctx
            nvvm.cp_async_commit_group()

        commit()


def gather_barriers(count: int, warpgroups: int, *, interpret: bool):
    """Scratch for `count` gather barriers, which `warpgroups` warpgroups' gathers fill: on the GPU one 8-byte mbarrier
    word each (`init_gather_barriers`), arrived on by the copies as they land; in the interpreter, which runs no
    inline Mosaic GPU code and copies synchronously, a Pallas barrier the gatherers arrive on once their copies are
    issued (`announce_gathered`)."""
    if interpret:
        return plgpu.Barrier(num_arrivals=warpgroups, num_barriers=count)
    return plgpu.SMEM((count,), jnp.int64)


def _barrier(barriers, index: int):
    return mgpu_utils.BarrierRef(mgpu_utils.memref_ptr(barriers), _int(index), None, 1)


def init_gather_barriers(barriers_ref, warpgroups: int, *, interpret: bool):
    """Make every gather barrier expect one arrival per thread of `warpgroups` warpgroups per phase. Every thread of
    the block runs it once, before any use: one thread writes the barriers, then a block-wide barrier (bar.sync 0, as
    Mosaic GPU's own prologue) publishes them. Nothing in the interpreter (Pallas set its barriers up)."""
    if interpret:
        return

    @plgpu.inline_mgpu(arg_types=(_ref_type(),))
    def init(ctx, barriers):
        del ctx
        first_thread = mgpu_utils.single_thread_predicate(mgpu_utils.ThreadSubset.BLOCK)
        for index in range(barriers_ref.shape[0]):
            address = _barrier(barriers, index).get_ptr()
            nvvm.mbarrier_init(address, _int(warpgroups * WARPGROUP), predicate=first_thread)
        gpu.barrier()

    init(barriers_ref)


def announce_gathered(barriers_ref, index: int, *, interpret: bool):
    """A gathering warpgroup's announcement that its copies into slot `index` are done: the interpreter's (whose
    copies are complete when issued); nothing on the GPU, where the copies arrive themselves as they land."""
    if interpret:
        plgpu.barrier_arrive(barriers_ref.at[index])


def wait_gather_barrier(barriers_ref, index: int, parity: int, *, interpret: bool):
    """Wait until gather barrier `index` completes the phase of this `parity` (the n-th use of the barrier has parity
    n mod 2), then make the copies visible to the warpgroup and to wgmma (a proxy fence on the reading side: the
    writing threads never waited for their copies)."""
    if interpret:
        plgpu.barrier_wait(barriers_ref.at[index])
    else:

        @plgpu.inline_mgpu(arg_types=(_ref_type(write=False),))
        def wait(ctx, barriers):
            del ctx
            _barrier(barriers, index).wait_parity(_int(parity, 1))

        wait(barriers_ref)
    plgpu.commit_smem()


def scatter_rows(src_smem, rows_ref, dst_ref, *, interpret: bool):
    """dst[rows[i]] = src[i] for every row i of the `swizzled` shared `[n, H]` src (written and committed before
    the call): dst a global `[R, H]` array of src's dtype, rows_ref int32 `[n]` global. Synchronous stores."""
    num_rows, head_dim = src_smem.shape
    if interpret:

        def copy_row(i, carry):
            dst_ref[pl.ds(rows_ref[i], 1), :] = src_smem[pl.ds(i, 1), :]
            return carry

        lax.fori_loop(0, num_rows, copy_row, 0)
        return

    @plgpu.inline_mgpu(arg_types=(_ref_type(SWIZZLED, write=False), _ref_type(write=False), _ref_type()))
    def scatter(ctx, src, rows, dst):
        del ctx
        vector = ir.VectorType.get((PIECE // 4,), ir.IntegerType.get_signless(32))
        src_pointer, dst_pointer = mgpu_utils.memref_ptr(src), _global_pointer(dst)
        for row, piece, pieces_per_row in _pieces(num_rows, head_dim):
            value = llvm.load(vector, _byte(src_pointer, _swizzled_offset(row, piece, pieces_per_row)))
            llvm.store(value, _byte(dst_pointer, _global_offset(_load_index(rows, row), piece, head_dim * 2)))

    scatter(src_smem, rows_ref, dst_ref)


def scatter_add_rows(src_smem, rows_ref, dst_ref, *, interpret: bool):
    """dst[rows[i]] += src[i] for every row i of the float32 `swizzled` shared `[n, H]` src (written and committed
    before the call): dst a float32 global `[R, H]` array (a gradient accumulator), rows_ref int32 `[n]` global,
    every row named at most once by all programs of the call (read-modify-write, no atomics). Synchronous."""
    num_rows, head_dim = src_smem.shape
    if interpret:

        def add_row(i, carry):
            row = pl.ds(rows_ref[i], 1)
            dst_ref[row, :] = dst_ref[row, :] + src_smem[pl.ds(i, 1), :]
            return carry

        lax.fori_loop(0, num_rows, add_row, 0)
        return

    arg_types = (_ref_type(SWIZZLED_FLOAT32, write=False), _ref_type(write=False), _ref_type())

    @plgpu.inline_mgpu(arg_types=arg_types)
    def scatter_add(ctx, src, rows, dst):
        del ctx
        vector = ir.VectorType.get((PIECE // 4,), ir.F32Type.get())
        src_pointer, dst_pointer = mgpu_utils.memref_ptr(src), _global_pointer(dst)
        for row, piece, pieces_per_row in _pieces(num_rows, head_dim, itemsize=4):
            source = _byte(src_pointer, _swizzled_offset(row, piece, pieces_per_row))
            target = _byte(dst_pointer, _global_offset(_load_index(rows, row), piece, head_dim * 4))
            llvm.store(arith.addf(llvm.load(vector, target), llvm.load(vector, source)), target)

    scatter_add(src_smem, rows_ref, dst_ref)


def _copy_values(src, index_ref, dst, *, gather: bool, interpret: bool):
    """float32 values by index between global memory and a plain `[n]` shared buffer, one thread per value (n <=
    128): dst[i] = src[index[i]] (`gather`, src global) or dst[index[i]] = src[i] (src shared). Synchronous."""
    count = index_ref.shape[0]
    if interpret:

        def copy_value(i, carry):
            source, target = (pl.ds(index_ref[i], 1), pl.ds(i, 1)) if gather else (pl.ds(i, 1), pl.ds(index_ref[i], 1))
            dst[target] = src[source]
            return carry

        lax.fori_loop(0, count, copy_value, 0)
        return
    if count > WARPGROUP:
        raise ValueError(f"one value per thread: {count} > {WARPGROUP}")
    read = _ref_type(write=False)

    @plgpu.inline_mgpu(arg_types=(read, read, _ref_type()))
    def copy(ctx, src, index, dst):
        del ctx
        thread = arith.remui(mgpu_utils.thread_idx(), _int(WARPGROUP))
        with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, thread, _int(count))):
            position = arith.index_cast(ir.IndexType.get(), _load_index(index, thread))
            own = arith.index_cast(ir.IndexType.get(), thread)
            source, target = (position, own) if gather else (own, position)
            memref.store(memref.load(src, [source]), dst, [target])

    copy(src, index_ref, dst)


def gather_values(src_ref, index_ref, dst_smem, *, interpret: bool):
    """dst[i] = src[index[i]] for float32 src in global memory, index int32 `[n]` (global) and dst `[n]` in shared
    memory (plain layout): one thread per value, n <= 128. Synchronous loads; the stores are visible to the
    warpgroup after a `plgpu.commit_smem` (e.g. `wait_gathers`')."""
    _copy_values(src_ref, index_ref, dst_smem, gather=True, interpret=interpret)


def scatter_values(src_smem, index_ref, dst_ref, *, interpret: bool):
    """dst[index[i]] = src[i] for float32 src `[n]` in shared memory (plain layout, committed), index int32 `[n]`
    and dst float32 in global memory: one thread per value, n <= 128."""
    _copy_values(src_smem, index_ref, dst_ref, gather=False, interpret=interpret)
