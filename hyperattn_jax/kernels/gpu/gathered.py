"""Forward kernel with the sort gathers fused in: rows are loaded and stored by index, no sorted copies of q, k, v, out.

The tiled kernel (`tiled_attention.py`) reads queries and key blocks already gathered into sorted order and writes
outputs in sorted order, so XLA has to copy q, k, v into that order and the output back (about 1.5 ms of 6.5 ms at
131k tokens, H100). Here each program loads its queries `q[query_index]` and its key block `k[key_index]` straight
from the unsorted arrays and stores `out[query_index]`, `lse[query_index]` in place. Tiles shared by all query blocks
(samples, global keys) are small and stay pre-gathered.

The row indices come from the ops layout functions applied to a position array, so whatever order and padding `ops`
gives the tiles, the kernel reads the same rows. This assumes per-block tiles consist of rows of k and v (true for the
sorted blocks); a tile that transforms keys must stay on the pre-gathered path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyperattn_jax.kernels.gpu._common import LN_2, LOG2_E, NEG_START, triton_params
from hyperattn_jax.kernels.gpu.tiled_attention import TiledKernelConfig


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _gathered_forward_kernel(
    q_index_ref, q_ref, *refs, kinds: tuple[str, ...], lengths: tuple[int, ...], block_k: int, scale: float, rows: int
):
    """kinds[i] is "indexed" (refs: key index, k, v, w) or "gathered" (refs: k, v, w)."""
    o_ref, lse_ref = refs[-2:]
    q_index = q_index_ref[...]
    load_index = jnp.maximum(q_index, 0)  # padding rows (-1) read row 0 and store to the spare last row
    q = q_ref[load_index, :]
    qk_scale = scale * LOG2_E
    carry = (
        jnp.full((rows,), NEG_START, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q.shape[1]), jnp.float32),
    )
    position = 0
    for kind, length in zip(kinds, lengths, strict=True):
        if kind == "indexed":
            k_index_ref, k_ref, v_ref, w_ref = refs[position : position + 4]
            position += 4
        else:
            k_index_ref = None
            k_ref, v_ref, w_ref = refs[position : position + 3]
            position += 3
        chunk = min(block_k, length)

        def body(step, carry, k_index_ref=k_index_ref, k_ref=k_ref, v_ref=v_ref, w_ref=w_ref, chunk=chunk):
            row_max, row_sum, acc = carry
            keys = pl.ds(pl.multiple_of(step * chunk, chunk), chunk)
            if k_index_ref is None:
                k, v = k_ref[keys, :], v_ref[keys, :]
            else:
                index = jnp.maximum(k_index_ref[keys], 0)
                k, v = k_ref[index, :], v_ref[index, :]
            s = _dot_t(q, k) * qk_scale + w_ref[keys][None, :] * LOG2_E
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            p = jnp.exp2(s - new_max[:, None])
            correction = jnp.exp2(row_max - new_max)
            acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
            return new_max, row_sum * correction + jnp.sum(p, axis=1), acc

        carry = lax.fori_loop(0, length // chunk, body, carry)
    row_max, row_sum, acc = carry
    has_keys = row_sum > 0
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    store_index = jnp.where(q_index >= 0, q_index, o_ref.shape[0] - 1)
    o_ref[store_index, :] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
    lse_ref[store_index] = jnp.where(has_keys, (row_max + jnp.log2(safe_sum)) * LN_2, -jnp.inf)


def gathered_tiled_forward(q, k, v, query_index, tiles, tile_key_index, *, scale, tuning=None, interpret=False):
    """Forward of `ops.tiled_attention` on unsorted q, k, v, gathering rows in the kernel.

    Args:
      q: `[B, K, G, T, H]` in original order (H a power of two >= 16).
      k, v: `[B, K, S, H]` in original order.
      query_index: int32 `[B, K, G, nb, bq]` original row of each blocked query slot (bq a power of two), -1 = padding.
      tiles: the `KeyTile`s of the plan; `tile_key_index[i]` is None (use tile i's k, v as given: shared tiles) or
        int32 `[B, K, nb, t]` original key rows of per-block tile i (t a power of two; -1 = padding, whose
        log-weight must be -inf).
      scale: softmax scale.

    Returns:
      out `[B, K, G, T, H]` (q's dtype) and lse `[B, K, G, T]` float32, in original query order (no gradient rule:
      callers differentiate through the pre-gathered path).
    """
    tuning = TiledKernelConfig() if tuning is None else tuning
    b, kv_heads, g, t, h = q.shape
    nb, bq = query_index.shape[3], query_index.shape[4]
    bk = b * kv_heads
    rows = min(tuning.block_q, bq)
    splits = bq // rows
    padded_rows = math.prod(query_index.shape) != b * kv_heads * g * t  # some slots are padding: keep a spare row
    t_out = t + 1 if padded_rows else t
    grid = (bk, g, nb * splits)
    in_specs = [
        pl.BlockSpec((None, None, rows), lambda i, j, c: (i, j, c)),
        pl.BlockSpec((None, None, t, h), lambda i, j, c: (i, j, 0, 0)),
    ]
    args = [query_index.reshape(bk, g, nb * bq), q.reshape(bk, g, t, h)]
    kinds, lengths = [], []
    for tile, key_index in zip(tiles, tile_key_index, strict=True):
        length = tile.k.shape[3]
        per_block_weight = jnp.ndim(tile.log_weight) == 4 and tile.log_weight.shape[2] == nb and nb > 1
        w = jnp.asarray(tile.log_weight, jnp.float32)
        w = jnp.broadcast_to(
            w.reshape((1,) * (4 - w.ndim) + w.shape), (b, kv_heads, nb if per_block_weight else 1, length)
        )
        w_map = (lambda i, j, c: (i, c // splits, 0)) if per_block_weight else (lambda i, j, c: (i, 0, 0))
        w_spec = pl.BlockSpec((None, None, length), w_map)
        if key_index is not None:
            kinds.append("indexed")
            full_kv = pl.BlockSpec((None, k.shape[2], h), lambda i, j, c: (i, 0, 0))
            in_specs += [
                pl.BlockSpec((None, None, length), lambda i, j, c: (i, c // splits, 0)),
                full_kv,
                full_kv,
                w_spec,
            ]
            args += [key_index.reshape(bk, nb, length), k.reshape(bk, -1, h), v.reshape(bk, -1, h)]
        else:
            kinds.append("gathered")
            shared = tile.k.shape[2] == 1
            kv_map = (lambda i, j, c: (i, 0, 0, 0)) if shared else (lambda i, j, c: (i, c // splits, 0, 0))
            kv_spec = pl.BlockSpec((None, None, length, h), kv_map)
            in_specs += [kv_spec, kv_spec, w_spec]
            args += [tile.k.reshape(bk, tile.k.shape[2], length, h), tile.v.reshape(bk, tile.k.shape[2], length, h)]
        args.append(w.reshape(bk, -1, length))
        lengths.append(length)
    out, lse = pl.pallas_call(
        functools.partial(
            _gathered_forward_kernel,
            kinds=tuple(kinds),
            lengths=tuple(lengths),
            block_k=tuning.block_k,
            scale=scale,
            rows=rows,
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, t_out, h), lambda i, j, c: (i, j, 0, 0)),
            pl.BlockSpec((None, None, t_out), lambda i, j, c: (i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bk, g, t_out, h), q.dtype),
            jax.ShapeDtypeStruct((bk, g, t_out), jnp.float32),
        ],
        compiler_params=triton_params(tuning.num_warps, tuning.num_stages),
        interpret=interpret,
        name="hyper_gathered_attention_fwd",
    )(*args)
    out = out.reshape(b, kv_heads, g, t_out, h)[..., :t, :]
    return out, lse.reshape(b, kv_heads, g, t_out)[..., :t]
