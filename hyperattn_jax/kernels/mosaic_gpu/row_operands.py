"""The row-gathering Mosaic kernel's operands (`indexed_forward.py`), built with jnp before the call: every row it
reads or writes as an int32 row number of a flattened array (the kernel turns each into an address with one
multiply), and each tile's static facts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from hyperattn_jax.kernels.gpu.indexed_forward import row_coordinates, tile_log_weights
from hyperattn_jax.kernels.mosaic_gpu.tiled_attention import LOG2_E


class Tile(NamedTuple):
    """Static facts of one key tile in the kernel."""

    indexed: bool  # rows gathered in the kernel (else pre-gathered k, v copied by TMA)
    weighted: bool  # has log-weights (else every key counts once)
    length: int  # keys, a multiple of block_k


def _pad_last(x, size: int, value):
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return jnp.pad(x, pad, constant_values=value) if size != x.shape[-1] else x


def tile_operands(k, v, tiles, tile_key_index, *, problems: int, num_blocks: int, block_k: int):
    """Per tile: its `Tile` and arrays. Indexed: absolute rows of the flattened k, v `[P K, nb, t]` (-1 read as
    row 0, masked by weight -inf) and base-2 log-weights `[P K, nb | 1, t]` if any; pre-gathered: k, v
    `[P K, nb | 1, t, H]` and log-weights. Lengths padded to whole chunks (weight -inf)."""
    batch, keys, kv_heads, h = k.shape
    pk = problems * kv_heads
    facts, arrays = [], []
    for tile, index in zip(tiles, tile_key_index, strict=True):
        length = tile.k.shape[3] if index is None else index.shape[-1]
        padded = -(-length // block_k) * block_k
        w, _ = tile_log_weights(tile, problems=problems, kv_heads=kv_heads, num_blocks=num_blocks, length=length)
        if w is None and padded != length:
            w = jnp.zeros((pk, 1, length), jnp.float32)
        tile_arrays = []
        if index is not None:
            problem_batch, head = row_coordinates(index, batch)
            rows = (problem_batch * keys + jnp.maximum(index, 0)) * kv_heads + head
            tile_arrays.append(_pad_last(rows.reshape(pk, num_blocks, length).astype(jnp.int32), padded, 0))
        else:
            for x in (tile.k, tile.v):
                x = x.reshape(pk, x.shape[2], length, h)
                tile_arrays.append(jnp.pad(x, [(0, 0), (0, 0), (0, padded - length), (0, 0)]))
        if w is not None:  # base 2 here saves a multiply per score in the kernel
            tile_arrays.append(_pad_last(w * LOG2_E, padded, -jnp.inf))
        facts.append(Tile(index is not None, w is not None, padded))
        arrays.append(tile_arrays)
    return tuple(facts), arrays


def split_tile_refs(tiles, refs):
    """A kernel's refs that start with the tiles' inputs (in `tile_operands`' order), split: per tile its sources
    ((rows,) or (k, v)) and its weights or None, and the refs after the tiles'."""
    per_tile, position = [], 0
    for tile in tiles:
        count = (1 if tile.indexed else 2) + tile.weighted
        own = refs[position : position + count]
        per_tile.append((own[: count - tile.weighted], own[-1] if tile.weighted else None))
        position += count
    return per_tile, refs[position:]


def chunk_steps(tiles, block_k: int):
    """(tile, chunk) of every `block_k` keys of the tiles, in tile order: a kernel's static key-chunk schedule."""
    return [(i, c) for i, tile in enumerate(tiles) for c in range(tile.length // block_k)]


def block_entry(ref, block):
    """The query block's entry of a `[P K, nb | 1, ...]` operand (entry 0 of one shared by every block)."""
    return block if ref.shape[1] > 1 else 0


def query_rows(query_index, batch: int, t: int, groups: int, padded: bool):
    """Absolute rows of the flattened q `[B T K G, H]` each slot reads, of the flattened out `[B T' K G, H]` and
    lse `[B K G T']` it writes (T' = T + 1 with padding slots, which write the spare last position): `[P K, G, nb bq]`
    each."""
    problems, kv_heads = query_index.shape[:2]
    problem_batch, head = row_coordinates(query_index, batch)
    group = jnp.arange(groups).reshape(1, 1, groups, 1, 1)
    t_out = t + 1 if padded else t
    store = jnp.where(query_index >= 0, query_index, t)
    load = ((problem_batch * t + jnp.maximum(query_index, 0)) * kv_heads + head) * groups + group
    out = ((problem_batch * t_out + store) * kv_heads + head) * groups + group
    lse = ((problem_batch * kv_heads + head) * groups + group) * t_out + store
    return [x.reshape(problems * kv_heads, groups, -1).astype(jnp.int32) for x in (load, out, lse)]
