"""Native linen and nnx HyperAttention layers: equal to the functional call, to Flax's attention below min_seq_len,
deterministic under a key yet fresh per layer and step, gradients everywhere, scan/remat, no recompilation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax.nn import linen as ha_linen
from hyperattn_jax.nn import nnx as ha_nnx
from hyperattn_jax.nn import rope_qk
from hyperattn_jax.nn.functional import layer_hash_key

HYPER = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=64)
# The accuracy options (sinks, heavy keys, importance sampling) go through the layers unchanged.
WITH_OPTIONS = HyperAttentionConfig(
    block_size=16,
    sample_size=16,
    num_projections=4,
    min_seq_len=64,
    num_sink_keys=4,
    num_heavy_keys=8,
    num_probe_queries=8,
    local_window=4,
    sample_distribution="column_mass",
    sample_scheme="systematic",
)
EXACT = HyperAttentionConfig.paper(block_size=32, sample_size=32, num_projections=4, min_seq_len=4096)


def _inputs(rng, b=2, t=128, d=32):
    return jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)


def _project(x, kernel):
    return jnp.einsum("btd,dnh->btnh", x, kernel)


def _functional(x, kernels, lsh_seed, sample_key, config, causal=True, transform=None):
    q, k, v = (_project(x, kernels[name]) for name in ("query", "key", "value"))
    if transform is not None:
        q, k = transform(q, k, jnp.arange(x.shape[1]))
    hash_key = layer_hash_key(jax.random.wrap_key_data(lsh_seed))
    out = hyper_attention(q, k, v, key=sample_key, hash_key=hash_key, config=config, causal=causal)
    return jnp.einsum("btnh,nhd->btd", out, kernels["out"])


def test_linen_layer_equals_functional_call(rng):
    x = _inputs(rng)
    layer = ha_linen.HyperAttention(num_heads=4, num_kv_heads=2, config=WITH_OPTIONS, qk_transform=rope_qk())
    variables = layer.init(jax.random.key(0), x)
    key = jax.random.key(int(rng.integers(1 << 30)))
    got = layer.apply(variables, x, sample_key=key)
    kernels = {name: p["kernel"] for name, p in variables["params"].items()}
    want = _functional(x, kernels, variables["lsh"]["hash_seed"], key, WITH_OPTIONS, transform=rope_qk())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_nnx_layer_equals_functional_call(rng):
    x = _inputs(rng)
    layer = ha_nnx.HyperAttention(32, 4, num_kv_heads=2, config=HYPER, causal=False, rngs=nnx.Rngs(3))
    key = jax.random.key(int(rng.integers(1 << 30)))
    got = layer(x, sample_key=key)
    kernels = {name: getattr(layer, name).kernel[...] for name in ("query", "key", "value", "out")}
    want = _functional(x, kernels, layer.lsh_key[...], key, HYPER, causal=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_linen_layer_below_min_seq_len_equals_flax_attention(rng):
    x = _inputs(rng, t=96)
    ours = ha_linen.HyperAttention(num_heads=4, config=EXACT)
    variables = ours.init(jax.random.key(1), x)
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, use_bias=False)
    want = flax_mha.apply({"params": variables["params"]}, x, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    got = ours.apply(variables, x, rngs={"hyper_attention": jax.random.key(2)})
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_nnx_layer_below_min_seq_len_equals_flax_attention(rng):
    x = _inputs(rng, t=96)
    ours = ha_nnx.HyperAttention(32, 4, config=EXACT, rngs=nnx.Rngs(0))
    flax_mha = nnx.MultiHeadAttention(4, 32, use_bias=False, decode=False, rngs=nnx.Rngs(1))
    for name in ("query", "key", "value", "out"):
        getattr(flax_mha, name).kernel[...] = getattr(ours, name).kernel[...]
    np.testing.assert_allclose(ours(x), flax_mha(x, is_causal=True), atol=2e-5, rtol=2e-5)


def test_linen_randomness_fixed_key_per_step_and_per_layer(rng):
    x = _inputs(rng)
    layer = ha_linen.HyperAttention(num_heads=4, num_kv_heads=2, config=HYPER)
    variables = layer.init(jax.random.key(0), x)
    run = jax.jit(lambda key: layer.apply(variables, x, rngs={"hyper_attention": key}))
    a, a_again, b = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(a, a_again)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # a new step's key draws new samples
    # No rng stream (evaluation): a fixed per-layer key, so repeated evaluation is identical.
    evaluate = jax.jit(lambda: layer.apply(variables, x))
    np.testing.assert_array_equal(evaluate(), evaluate())

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = ha_linen.HyperAttention(num_heads=4, config=HYPER, name=f"attn_{i}")(x)
            return x

    seeds = Two().init(jax.random.key(0), x[:, :16])["lsh"]
    assert not np.array_equal(seeds["attn_0"]["hash_seed"], seeds["attn_1"]["hash_seed"])


def test_linen_missing_lsh_collection_is_a_clear_error(rng):
    x = _inputs(rng, t=64)
    layer = ha_linen.HyperAttention(num_heads=4, config=HYPER)
    params = layer.init(jax.random.key(0), x)["params"]
    try:
        layer.apply({"params": params}, x)
    except ValueError as error:
        assert "'lsh' collection" in str(error)
    else:
        raise AssertionError("applying without the 'lsh' collection must fail")


def test_linen_key_padding_ignores_padded_tokens(rng):
    x = _inputs(rng, b=2, t=128)
    kv_length = jnp.array([128, 77])
    layer = ha_linen.HyperAttention(num_heads=4, config=EXACT, causal=False)
    variables = layer.init(jax.random.key(0), x)
    noisy = x.at[1, 77:].set(100.0 * x[1, 77:])
    a = layer.apply(variables, x, kv_length=kv_length)
    b = layer.apply(variables, noisy, kv_length=kv_length)
    np.testing.assert_allclose(a[:, :77], b[:, :77], atol=1e-5)


def test_nnx_scan_remat_gradients_and_no_recompilation(rng):
    num_layers = 2
    x = _inputs(rng, b=1, t=128)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_layers(rngs):
        return ha_nnx.HyperAttention(32, 4, num_kv_heads=2, config=HYPER, rngs=rngs)

    layers = make_layers(nnx.Rngs(params=0, hyper_attention=1))
    assert not np.array_equal(layers.lsh_key[...][0], layers.lsh_key[...][1])  # one hash per layer

    def forward(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, layer):
            return x + layer(x)

        return body(x, layers)

    traces = []

    @nnx.jit
    def loss_and_grads(layers, x):
        traces.append(1)
        return nnx.value_and_grad(lambda m: jnp.mean(forward(m, x) ** 2))(layers)

    first_loss, grads = loss_and_grads(layers, x)
    second_loss, _ = loss_and_grads(layers, x)
    assert len(traces) == 1  # the rng counters advance as state, not as new static values
    assert float(first_loss) != float(second_loss)  # ... and each call draws fresh samples
    for path, grad in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        norms = jnp.sqrt(jnp.sum(jnp.reshape(grad, (num_layers, -1)) ** 2, axis=1))
        assert bool(jnp.all(norms > 0)) and bool(jnp.all(jnp.isfinite(norms))), path


def test_linen_scan_remat_matches_unrolled_exact(rng):
    """nn.scan + nn.remat over layers computes the same function as separate layers with the same weights."""
    x = _inputs(rng, b=1, t=64)

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + ha_linen.HyperAttention(num_heads=4, config=EXACT, attention="exact")(x), None

    stacked = nn.scan(nn.remat(Body), variable_axes={"params": 0, "lsh": 0}, split_rngs={"params": True}, length=2)(
        name="stack"
    )
    variables = stacked.init(jax.random.key(0), x, None)
    got, _ = stacked.apply(variables, x, None)
    want = x
    for i in range(2):
        layer_vars = jax.tree.map(lambda a, i=i: a[i], variables)
        want = want + ha_linen.HyperAttention(num_heads=4, config=EXACT, attention="exact").apply(
            {"params": layer_vars["params"]["HyperAttention_0"], "lsh": layer_vars["lsh"]["HyperAttention_0"]}, want
        )
    np.testing.assert_allclose(got, want, atol=1e-5)
