"""The Pallas TPU kernels on a CPU: results in TPU interpret mode against their jnp twins, and lowering for a real TPU.

Interpret mode checks the math (forward, gradients, lse cotangents); `jax.export(..., platforms=["tpu"])` runs the
Pallas -> Mosaic lowering, which rejects block shapes that break the TPU tiling rules (interpret mode lets them
through). Sizes are tiny: every grid step of an interpreted kernel costs host time.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import hyperattn_jax as ha
from hyperattn_jax.backends import pallas_tpu
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.kernels.tpu._common import compiler_params
from hyperattn_jax.kernels.tpu.flash import flash_attention_tpu, flash_attention_tpu_reference
from hyperattn_jax.kernels.tpu.tiled_attention import tiled_attention_tpu, tiled_attention_tpu_reference
from hyperattn_jax.kernels.tpu.vmem import VMEM_LIMIT_BYTES, tile_bytes
from hyperattn_jax.ops import KeyTile


@pytest.fixture
def rng(request):
    """Inputs seeded from the test's name: fresh per test, the same run to run."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _assert_close(got, want, dtype, scale_tol=None):
    """Float32: same math, tight. bfloat16: the kernels round P to bf16 before the P V and dS K products (the twin
    keeps float32), so errors of a few bf16 ulps (2^-8) of the largest entry."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = scale_tol or (2e-5 if dtype == jnp.float32 else 2e-2)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(want)))))


def _vjp_both(f, twin, args, rng):
    """(out, lse) and the gradients for random cotangents of both, from the kernel and from its twin."""
    (out, lse), pull = jax.vjp(f, *args)
    (want_out, want_lse), pull_twin = jax.vjp(twin, *args)
    d_out = _normal(rng, out.shape, jnp.float32)
    d_lse = _normal(rng, lse.shape, jnp.float32)
    grads = pull((d_out.astype(out.dtype), d_lse))
    want_grads = pull_twin((d_out.astype(want_out.dtype), d_lse))
    return (out, lse, *grads), (want_out, want_lse, *want_grads)


# ------------------------------------------------------------------------------------------------ interpret mode


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiled_kernel_matches_its_twin(rng, dtype):
    """GQA (G=2 query heads per kv head), an odd query block (13 rows), a per-block tile with padding keys, a shared
    tile with per-block weights (samples: log w, -inf in their own block) and a shared tile of global keys."""
    b, kv, g, nb, bq, h = 1, 1, 2, 2, 13, 64
    q = _normal(rng, (b, kv, g, nb, bq, h), dtype)
    block_k, block_v = (_normal(rng, (b, kv, nb, 24, h), dtype) for _ in range(2))
    block_w = jnp.where(jnp.arange(24) < 21, 0.0, -jnp.inf)
    sample_k, sample_v = (_normal(rng, (b, kv, 1, 10, h), dtype) for _ in range(2))
    sample_w = jnp.where(jnp.asarray(rng.random((b, kv, nb, 10)) < 0.3), -jnp.inf, np.log(4.0))
    global_k, global_v = (_normal(rng, (b, kv, 1, 5, h), dtype) for _ in range(2))
    weights = (block_w, sample_w, jnp.zeros((b, kv, 1, 5)))

    def tiles(k1, v1, k2, v2, k3, v3):
        return [KeyTile(k, v, w) for (k, v), w in zip(((k1, v1), (k2, v2), (k3, v3)), weights, strict=True)]

    def kernel(q, *kv_arrays):
        return tiled_attention_tpu(q, tiles(*kv_arrays), scale=0.3, interpret=True)

    def twin(q, *kv_arrays):
        out, lse = tiled_attention_tpu_reference(q, tiles(*kv_arrays), scale=0.3)
        return out.astype(q.dtype), lse

    args = (q, block_k, block_v, sample_k, sample_v, global_k, global_v)
    got, want = _vjp_both(kernel, twin, args, rng)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert np.isfinite(np.asarray(got[1], np.float32)).all()
    for a, b_ in zip(got, want, strict=True):
        _assert_close(a, b_, dtype)


@pytest.mark.parametrize("dtype, causal, kv_length", [(jnp.bfloat16, True, None), (jnp.float32, False, (131, 70))])
def test_flash_kernel_matches_its_twin(rng, dtype, causal, kv_length):
    """Odd length 131 in blocks of 64 queries and 128 keys: three query blocks, two key blocks, so causal runs skip
    (and do not refetch) the key block above the diagonal; GQA; key padding (kv_length) when not causal."""
    from hyperattn_jax.kernels.tpu.flash import FlashTiling

    q = _normal(rng, (2, 1, 2, 131, 64), dtype)
    k, v = (_normal(rng, (2, 1, 131, 64), dtype) for _ in range(2))
    lengths = None if kv_length is None else jnp.asarray(kv_length, jnp.int32)

    def kernel(q, k, v):
        return flash_attention_tpu(
            q,
            k,
            v,
            scale=0.2,
            causal=causal,
            kv_length=lengths,
            tiling=FlashTiling(block_q=64, block_k=128),
            interpret=True,
        )

    def twin(q, k, v):
        out, lse = flash_attention_tpu_reference(q, k, v, scale=0.2, causal=causal, kv_length=lengths)
        return out.astype(q.dtype), lse

    got, want = _vjp_both(kernel, twin, (q, k, v), rng)
    for a, b_ in zip(got, want, strict=True):
        _assert_close(a, b_, dtype)


# The backend against the xla path for the same key (out, lse, gradients, causal and not, float32 at 1e-4 of the
# largest entry) runs in the shared backend suite (tests/test_backend_suite.py).


_CAUSAL_LEVELS = {
    # two levels, every quarter estimated (the last ones hold min_seq_len keys)
    "paper": (dict(), 256),
    # heavy keys and the window as global keys of every level's plan, column-mass samples
    "heavy+window": (dict(num_heavy_keys=16, local_window=8, sample_distribution="column_mass"), 256),
    # sinks: exact over them, the levels on the positions after them (ops.without_sinks), with heavy keys and a window
    "sinks+heavy+window": (dict(num_sink_keys=4, num_heavy_keys=12, local_window=8), 256),
    # 384 -> 192 -> 96 -> 48: the last level's quarters (48 keys < min_seq_len) are exact, as in the recursion
    "exact_last_quarters": (dict(), 384),
    # 200 positions run as 256 (ops.causal_padded_length: whole blocks at every level), the padding dropped
    "padded_length": (dict(num_sink_keys=3), 200),
}


@pytest.mark.parametrize("name", list(_CAUSAL_LEVELS))
def test_causal_levels_equal_the_ops_recursion(rng, name):
    """The TPU backend's level-by-level causal path against the xla path's recursion (same problems, keys and merge
    order): out, lse and gradients in float32, to float32 rounding."""
    from hyperattn_jax.ops.causal import causal_padded_length, level_shape

    options, t = _CAUSAL_LEVELS[name]
    config = HyperAttentionConfig.paper(block_size=32, sample_size=32, min_seq_len=64, **options)
    assert level_shape(causal_padded_length(t, config), config) is not None  # the level-by-level path runs
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, 64)), jnp.float32) for n in (2, 1, 1))
    weight = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def run(implementation):
        def loss(q, k, v):
            out, lse = ha.hyper_attention(q, k, v, key=jax.random.key(3), config=config, causal=True,
                                          return_lse=True, implementation=implementation, interpret=True)  # fmt: skip
            return jnp.sum(out * weight) + jnp.sum(jnp.sin(lse)), (out, lse)

        (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [*outputs, *grads]

    for got, want in zip(run("pallas_tpu"), run("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------ lowering for a TPU


def _export_for_tpu(f, *args):
    return jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()


def test_tpu_lowering_rejects_a_block_that_breaks_the_tiling():
    """The check the lowering tests rely on: a (3, 100) block fails the Mosaic lowering on a CPU, (8, 128) passes."""

    def copy(block):
        spec = pl.BlockSpec(block, lambda i, j: (i, j))
        return pl.pallas_call(
            lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2),
            grid=(2, 2),
            in_specs=[spec],
            out_specs=spec,
            out_shape=jax.ShapeDtypeStruct((2 * block[0], 2 * block[1]), jnp.float32),
        )

    good = jax.ShapeDtypeStruct((16, 256), jnp.float32)
    assert "tpu_custom_call" in _export_for_tpu(copy((8, 128)), good)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _export_for_tpu(copy((3, 100)), jax.ShapeDtypeStruct((6, 200), jnp.float32))


CONFIGS = {
    "paper": HyperAttentionConfig.paper(),
    "default": HyperAttentionConfig(),
    "accurate": HyperAttentionConfig.accurate(),
}


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_tiled_kernels_lower_for_tpu(config_name, head_dim):
    """Forward and backward of the tiled kernel for a config's tile shapes (block, global keys, samples; an odd query
    block of 251 rows), bf16, GQA: every pallas_call lowers to a Mosaic custom call."""
    lengths = pallas_tpu.config_tile_lengths(CONFIGS[config_name], causal=False)
    b, kv, g, nb = 1, 2, 2, 4
    sd = jax.ShapeDtypeStruct
    q = sd((b, kv, g, nb, 251, head_dim), jnp.bfloat16)
    flat = []
    for i, t in enumerate(lengths):
        blocks = nb if i == 0 else 1  # the sortLSH block is per query block; global keys and samples are shared
        flat += [sd((b, kv, blocks, t, head_dim), jnp.bfloat16)] * 2 + [sd((b, kv, nb, t), jnp.float32)]

    def forward(q, *flat):
        tiles = [KeyTile(*flat[i : i + 3]) for i in range(0, len(flat), 3)]
        return tiled_attention_tpu(q, tiles, scale=head_dim**-0.5, interpret=False)

    def backward(q, *flat):
        def loss(q, *kv_arrays):
            merged = [a for i in range(len(lengths)) for a in (*kv_arrays[2 * i : 2 * i + 2], flat[3 * i + 2])]
            out, lse = forward(q, *merged)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

        kv_arrays = [a for i in range(len(lengths)) for a in flat[3 * i : 3 * i + 2]]
        return jax.grad(loss, argnums=tuple(range(1 + len(kv_arrays))))(q, *kv_arrays)

    assert _export_for_tpu(forward, q, *flat).count("tpu_custom_call") == 1
    # dq and one dk/dv kernel per tile, after the forward
    assert _export_for_tpu(backward, q, *flat).count("tpu_custom_call") == 2 + len(lengths)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flash_kernels_lower_for_tpu(head_dim):
    """The causal base case at min_seq_len = 4096 (forward, dq, dk/dv) and a padded non-causal call, bf16, GQA."""
    sd = jax.ShapeDtypeStruct
    q, kv = sd((1, 2, 4, 4096, head_dim), jnp.bfloat16), sd((1, 2, 4096, head_dim), jnp.bfloat16)

    def loss(q, k, v, causal, kv_length=None):
        out, lse = flash_attention_tpu(q, k, v, scale=0.1, causal=causal, kv_length=kv_length, interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    causal_grad = jax.grad(lambda q, k, v: loss(q, k, v, True), argnums=(0, 1, 2))
    assert _export_for_tpu(causal_grad, q, kv, kv).count("tpu_custom_call") == 3
    short_q, short_kv = sd((2, 1, 2, 1000, head_dim), jnp.float32), sd((2, 1, 1000, head_dim), jnp.float32)
    padded_grad = jax.grad(lambda q, k, v, n: loss(q, k, v, False, n), argnums=(0, 1, 2))
    assert _export_for_tpu(padded_grad, short_q, short_kv, short_kv, sd((2,), jnp.int32)).count("tpu_custom_call") == 3


@pytest.mark.parametrize("causal", [False, True])
def test_backend_lowers_for_tpu(causal):
    """The whole backend at 8192 tokens under the default config (plan, gathers, kernels, recursion) exports for TPU."""
    sd = jax.ShapeDtypeStruct
    q, kv = sd((1, 8192, 4, 128), jnp.bfloat16), sd((1, 8192, 2, 128), jnp.bfloat16)
    config = HyperAttentionConfig()

    def grads(q, k, v):
        def loss(q, k, v):
            out, lse = pallas_tpu.attention(
                q, k, v, jax.random.key(0), None, None, config=config, causal=causal, scale=128**-0.5
            )
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert "tpu_custom_call" in _export_for_tpu(grads, q, kv, kv)


# ------------------------------------------------------------------------------------------------ VMEM budget


def test_vmem_footprint_pads_to_vreg_tiles():
    assert tile_bytes((256, 64), jnp.bfloat16) == tile_bytes((256, 128), jnp.bfloat16) == 256 * 128 * 2
    assert tile_bytes((13, 1), jnp.float32) == 16 * 128 * 4
    assert tile_bytes((2, 16, 128), jnp.bfloat16) == 2 * 16 * 128 * 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_every_kernel_fits_the_vmem_it_requests(dtype, causal):
    """Paper, default and accurate configs at every supported head dim: each kernel configuration's double-buffered
    blocks, scratch and float32 temporaries stay below the scoped limit the kernels request (32 MiB)."""
    assert compiler_params(("parallel",)).vmem_limit_bytes == VMEM_LIMIT_BYTES == 32 * 2**20
    for config in CONFIGS.values():
        for head_dim in pallas_tpu.HEAD_DIMS:
            budgets = pallas_tpu.kernel_budgets(dtype=dtype, head_dim=head_dim, config=config, causal=causal)
            assert len(budgets) >= 6
            for budget in budgets:
                assert 0 < budget.total <= VMEM_LIMIT_BYTES, (budget.kernel, budget.total)
            assert pallas_tpu.unsupported(dtype=dtype, head_dim=head_dim, config=config, causal=causal) is None


def test_unsupported_names_the_reason():
    big = HyperAttentionConfig(block_size=4096, sample_size=4096)
    reason = pallas_tpu.unsupported(dtype=jnp.float32, head_dim=256, config=big, causal=False)
    assert reason is not None and "VMEM" in reason and "32 MiB" in reason
    assert "head dims" in pallas_tpu.unsupported(dtype=jnp.bfloat16, head_dim=96, config=big, causal=False)
    assert "float16" in pallas_tpu.unsupported(dtype=jnp.float16, head_dim=128, config=big, causal=False)
