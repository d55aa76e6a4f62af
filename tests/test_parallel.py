"""hyperattn_jax.parallel on 8 CPU devices (tests/conftest.py sets `jax_num_cpu_devices=8` before jax starts), and
its single-device contracts."""

import functools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_qkv
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.ops.keys import ShardKey
from hyperattn_jax.parallel import hyper_attention_shard, sharded_hyper_attention
from hyperattn_jax.parallel.bucket_dispatch import check_paper_plan
from hyperattn_jax.parallel.columnsort import column_sort, route, unroute

TOL = dict(rtol=2e-5, atol=2e-5)


def paper_config(**fields):
    """The published plan with small sizes (explicit, so that changed library defaults do not change the tests)."""
    paper = getattr(ha.HyperAttentionConfig, "paper", None)
    return paper(**fields) if paper is not None else ha.HyperAttentionConfig(**fields)


# 1024 positions on 8 devices: 128 per device, four 32-key blocks each, above Columnsort's minimum of 98 rows.
CFG = paper_config(block_size=32, sample_size=16, num_projections=4, min_seq_len=64)
# HyperAttentionConfig() (column-mass probe, systematic draws, heavy keys, window) and .accurate() (plus sinks), at
# the same small sizes: every random draw and every data-dependent choice of the plan is exercised.
DEFAULT = ha.HyperAttentionConfig(
    block_size=32, sample_size=16, num_projections=4, min_seq_len=64, num_probe_queries=8, num_heavy_keys=8,
    local_window=16,
)  # fmt: skip
ACCURATE = ha.HyperAttentionConfig.accurate(
    block_size=16, sample_size=16, num_projections=4, min_seq_len=64, num_sink_keys=4, num_heavy_keys=8,
    local_window=16, num_probe_queries=8,
)  # fmt: skip
PLANS = {"default": DEFAULT, "accurate": ACCURATE}
MESHES = {"2": ((2,), ("seq",), None), "4": ((4,), ("seq",), None), "8": ((8,), ("seq",), None)}
MESHES["2x4"] = ((2, 4), ("data", "seq"), "data")


def test_conftest_gave_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets jax_num_cpu_devices=8 before jax starts its backends"


def single_device(q, k, v, key, *, causal, config=CFG, **kw):
    return ha.hyper_attention(q, k, v, key=key, config=config, causal=causal, return_lse=True, **kw)


def assert_same(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


@pytest.mark.parametrize(
    ("strategy", "p", "heads", "t"),
    [
        ("bucket_dispatch", 8, (4, 1), 1024),  # MQA: one kv head on 8 devices, impossible for a head split
    ],
)
def test_noncausal_equals_single_device(rng, strategy, p, heads, t):
    n, kv = heads
    q, k, v = random_qkv(rng, b=1, t=t, n=n, kv=kv, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((p,), ("seq",))
    out, lse = sharded_hyper_attention(
        q, k, v, key=key, config=CFG, mesh=mesh, seq_axis="seq", strategy=strategy, return_lse=True
    )
    ref_out, ref_lse = single_device(q, k, v, key, causal=False)
    assert_same(out, ref_out)
    assert_same(lse, ref_lse)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "seq")), out.ndim)
    assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "seq")), lse.ndim)
    # The estimate is not exact attention: equality above is a property of the same plan, not of an easy problem.
    assert float(jnp.max(jnp.abs(out - ha.exact_attention(q, k, v)))) > 1e-2


@pytest.mark.parametrize(
    ("plan", "causal", "mesh_name"),
    [("default", False, "2"), ("default", True, "8"), ("accurate", False, "4"), ("accurate", True, "2x4")],
)
def test_all_to_all_runs_every_plan_as_one_device(rng, plan, causal, mesh_name):
    # The accuracy options (probe, systematic column-mass draws, sinks, heavy keys, window) give the single-device
    # result: every per-head draw is the single-device one for the whole batch and all heads (ops.keys.ShardKey).
    shape, axes, batch_axis = MESHES[mesh_name]
    q, k, v = random_qkv(rng, b=2, t=256, n=8, kv=8 if causal else 4, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh(shape, axes)
    config = PLANS[plan]
    out, lse = sharded_hyper_attention(
        q, k, v, key=key, config=config, mesh=mesh, seq_axis="seq", batch_axis=batch_axis, causal=causal,
        return_lse=True,
    )  # fmt: skip
    ref_out, ref_lse = single_device(q, k, v, key, causal=causal, config=config)
    assert float(jnp.max(jnp.abs(out - ref_out))) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - ref_lse))) <= 1e-5
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axis, "seq")), out.ndim)
    # A different key gives a different plan: the equality above is a property of the same draws.
    other = single_device(q, k, v, jax.random.key(int(rng.integers(1 << 30))), causal=causal, config=config)[0]
    assert float(jnp.max(jnp.abs(other - ref_out))) > 1e-3


@pytest.mark.parametrize(("implementation", "dtype"), [("pallas_triton", jnp.bfloat16), ("pallas_tpu", jnp.float32)])
def test_kernels_run_inside_shard_map(rng, implementation, dtype):
    # Each device runs the kernel backend (Pallas interpreter here; check_vma off for the pallas_call) on its heads.
    q, k, v = random_qkv(rng, b=1, t=256, n=4, kv=2, h=64 if implementation == "pallas_tpu" else 16, dtype=dtype)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((2,), ("seq",))
    kernels = dict(implementation=implementation, interpret=True)
    out, lse = sharded_hyper_attention(
        q, k, v, key=key, config=DEFAULT, mesh=mesh, seq_axis="seq", return_lse=True, **kernels
    )
    ref_out, ref_lse = single_device(q, k, v, key, causal=False, config=DEFAULT, **kernels)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 outputs: one rounding of the same float32 numbers
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)))) <= tol
    assert float(jnp.max(jnp.abs(lse - ref_lse))) <= 1e-5


def test_config_defaults_as_in_hyper_attention():
    from hyperattn_jax.parallel.sharded import _check_common

    assert _check_common(None, "all_to_all", False) == ha.HyperAttentionConfig()
    with pytest.raises(ValueError, match="causal must be a bool"):
        _check_common(None, "all_to_all", jnp.asarray(True))


@pytest.mark.parametrize(("strategy", "causal"), [("bucket_dispatch", False)])
def test_data_and_sequence_mesh(rng, strategy, causal):
    # 2 x 4 mesh: the batch split over "data", the sequence over "seq"; each batch shard must see its own samples.
    q, k, v = random_qkv(rng, b=2, t=256 if causal else 512, n=4, kv=4, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    out, lse = sharded_hyper_attention(
        q, k, v, key=key, config=CFG, mesh=mesh, seq_axis="seq", batch_axis="data", causal=causal, strategy=strategy,
        return_lse=True,
    )  # fmt: skip
    ref_out, ref_lse = single_device(q, k, v, key, causal=causal)
    assert_same(out, ref_out)
    assert_same(lse, ref_lse)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "seq")), out.ndim)


@pytest.mark.parametrize(
    ("strategy", "causal", "p", "config"), [("all_to_all", True, 8, ACCURATE), ("bucket_dispatch", False, 4, CFG)]
)
def test_values_and_gradients_equal_single_device(rng, strategy, causal, p, config):
    n, kv = (8, 8) if strategy == "all_to_all" else (4, 2)
    q, k, v = random_qkv(rng, b=1, t=256 if causal else 512, n=n, kv=kv, h=16)
    weight = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((p,), ("seq",))

    def loss_sharded(q, k, v):
        out = sharded_hyper_attention(
            q, k, v, key=key, config=config, mesh=mesh, seq_axis="seq", causal=causal, strategy=strategy
        )
        return jnp.sum(out * weight), out

    def loss_single(q, k, v):
        out = ha.hyper_attention(q, k, v, key=key, config=config, causal=causal)
        return jnp.sum(out * weight), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss_sharded, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref_out), ref = jax.jit(jax.value_and_grad(loss_single, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_same(out, ref_out)
    for g, r in zip(grads, ref, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * scale)


def test_user_jit_and_user_shard_map(rng):
    q, k, v = random_qkv(rng, b=1, t=256, n=4, kv=2, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((4,), ("seq",))
    rows = NamedSharding(mesh, P(None, "seq"))
    hash_key = jax.random.key(int(rng.integers(1 << 30)))  # fixed per-layer hyperplanes, as the Flax layers use
    ref_out = ha.hyper_attention(q, k, v, key=key, hash_key=hash_key, config=CFG)

    # 1. Under the user's jit with explicit in/out shardings.
    @functools.partial(jax.jit, in_shardings=(rows, rows, rows), out_shardings=rows)
    def step(q, k, v):
        return sharded_hyper_attention(
            q, k, v, key=key, hash_key=hash_key, config=CFG, mesh=mesh, seq_axis="seq", strategy="bucket_dispatch"
        )

    out = step(*(jax.device_put(x, rows) for x in (q, k, v)))
    assert out.sharding.is_equivalent_to(rows, out.ndim)
    assert_same(out, ref_out)

    # 2. Inside the user's own shard_map, on local shards.
    def local(q, k, v, key, hash_key):
        return hyper_attention_shard(
            q, k, v, key=key, hash_key=hash_key, config=CFG, seq_axis="seq", strategy="bucket_dispatch"
        )

    spec = P(None, "seq")
    mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=spec))
    assert_same(mapped(*(jax.device_put(x, rows) for x in (q, k, v)), key, hash_key), ref_out)


@pytest.mark.parametrize("plan", ["paper", "default", "causal accurate"])
def test_shard_key_plans_are_slices_of_the_single_device_plan(rng, plan):
    # A device holding batch block i of 2 and kv-head block j of 4 makes the single-device plan's slice, draws included
    # (the causal recursion's stacked levels: ops.grouped_causal_attention splits the key once per level).
    b, kv, t = 4, 8, 128
    config = {"paper": CFG, "default": DEFAULT, "causal accurate": ACCURATE}[plan]
    key = jax.random.key(int(rng.integers(1 << 30)))
    if plan == "causal accurate":
        key = ops.split_level(ops.split_level(key)[1])[0]  # the second level's off-diagonal key
    q, k, v = random_qkv(rng, b=b, t=t, n=kv, kv=kv, h=16)
    qg, kg, vg = ops.group_queries(q, kv), ops.heads_major(k), ops.heads_major(v)
    make_plan = jax.jit(functools.partial(ops.make_plan, config=config))  # one compilation for the 8 blocks
    full = make_plan(qg, kg, key=key, v=vg)
    draws = []
    for i, j in np.ndindex(2, 4):
        rows, heads = slice(i * b // 2, (i + 1) * b // 2), slice(j * kv // 4, (j + 1) * kv // 4)
        shard_key = ShardKey(key, i, j, local_batch=b // 2, batch_shards=2, head_shards=4)
        mine = make_plan(qg[rows, heads], kg[rows, heads], key=shard_key, v=vg[rows, heads])
        np.testing.assert_array_equal(mine.sample_index, full.sample_index[rows, heads])
        if full.sample_log_weight is not None:  # from the probe's einsum: rounding may differ with the batch shape
            np.testing.assert_allclose(mine.sample_log_weight, full.sample_log_weight[rows, heads], rtol=1e-6)
        np.testing.assert_array_equal(mine.key_order.perm, full.key_order.perm[rows, heads])
        draws.append(np.asarray(mine.sample_index).tobytes())
    assert len(set(draws)) == 8  # eight devices, eight different sample sets

    # Had every head shard drawn its own [B, K/P, m] from the same key, the answer would differ from one device's.
    q, k, v = random_qkv(rng, b=1, t=128, n=4, kv=4, h=16)
    naive = jnp.concatenate(
        [ha.hyper_attention(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], key=key, config=config)
         for i in range(4)], axis=2,
    )  # fmt: skip
    assert float(jnp.max(jnp.abs(naive - single_device(q, k, v, key, causal=False, config=config)[0]))) > 1e-3


def test_short_sequences_are_exact_attention(rng):
    # Below min_seq_len the single-device call is exact attention; bucket_dispatch then gathers k and v instead.
    q, k, v = random_qkv(rng, b=1, t=256, n=4, kv=2, h=16)
    mesh = jax.make_mesh((2,), ("seq",))
    exact = ha.exact_attention(q, k, v)
    for strategy in ("all_to_all", "bucket_dispatch"):
        out = sharded_hyper_attention(
            q, k, v, key=jax.random.key(0), config=CFG.replace(min_seq_len=512), mesh=mesh, seq_axis="seq",
            strategy=strategy,
        )  # fmt: skip
        assert_same(out, exact)


def test_column_sort_sorts_and_routes_back(rng):
    p, r = 8, 104  # r >= 2 (p - 1)^2 = 98, even, divisible by p
    mesh = jax.make_mesh((p,), ("seq",))
    # Adversarial keys: few distinct ranks (long runs of ties broken by position), and one batch row reversed.
    ranks = rng.integers(0, 3, (2, p * r)).astype(np.int32)
    ranks[1] = np.arange(p * r)[::-1] // 7
    packed = jnp.asarray(ranks * (p * r) + np.arange(p * r), jnp.int32)
    data = jnp.asarray(rng.standard_normal((2, p * r, 3)), jnp.float32)

    def body(keys, x):
        sorted_keys, network = column_sort(keys, "seq")
        routed = route(x, network, "seq")
        return sorted_keys, routed, unroute(routed, network, "seq")

    specs = (P(None, "seq"), P(None, "seq"))
    rows = NamedSharding(mesh, P(None, "seq"))
    mapped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs + specs[:1]))
    sorted_keys, routed, back = mapped(jax.device_put(packed, rows), jax.device_put(data, rows))
    order = np.argsort(np.asarray(packed), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(sorted_keys), np.take_along_axis(np.asarray(packed), order, -1))
    np.testing.assert_array_equal(np.asarray(routed), np.take_along_axis(np.asarray(data), order[..., None], 1))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(data))


def test_clear_errors(rng):
    mesh = jax.make_mesh((4,), ("seq",))
    key = jax.random.key(0)
    q, k, v = random_qkv(rng, b=1, t=512, n=4, kv=2, h=16)
    call = functools.partial(sharded_hyper_attention, key=key, config=CFG, mesh=mesh, seq_axis="seq")
    with pytest.raises(ValueError, match=r"K=2 divisible by 4"):
        call(q, k, v, strategy="all_to_all")
    with pytest.raises(ValueError, match="causal=True is not supported"):
        call(q, k, v, strategy="bucket_dispatch", causal=True)
    with pytest.raises(ValueError, match="multiple of block_size"):
        call(q[:, :384], k[:, :384], v[:, :384], strategy="bucket_dispatch", config=CFG.replace(block_size=64))
    with pytest.raises(ValueError, match="Columnsort's minimum"):
        call(q, k, v, strategy="bucket_dispatch", mesh=jax.make_mesh((8,), ("seq",)))  # 64 rows per device < 98
    with pytest.raises(ValueError, match="not one of the mesh's axes"):
        call(q, k, v, seq_axis="sequence")


def test_flax_training_step_on_a_sequence_mesh(rng):
    # Auto axes: Flax's Dense layers leave the activations' sharding to the compiler.
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    key = jax.random.key(int(rng.integers(1 << 30)))

    def attention_fn(sharded):
        def attend(query, key_, value, **unused):
            if sharded:
                return sharded_hyper_attention(
                    query, key_, value, key=key, config=DEFAULT, mesh=mesh, seq_axis="seq", batch_axis="data",
                    causal=True,
                )  # fmt: skip
            return ha.hyper_attention(query, key_, value, key=key, config=DEFAULT, causal=True)

        return attend

    class Block(flax_nn.Module):
        sharded: bool

        @flax_nn.compact
        def __call__(self, x):
            attention = flax_nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=attention_fn(self.sharded))
            return flax_nn.Dense(1)(x + attention(x))

    x = jnp.asarray(rng.standard_normal((2, 128, 32)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 128, 1)), jnp.float32)
    params = Block(sharded=False).init(jax.random.key(0), x)
    tx = optax.sgd(0.1)

    def train_step(model, params, opt_state, x, target):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - target) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rows = NamedSharding(mesh, P("data", "seq"))
    sharded_step = jax.jit(functools.partial(train_step, Block(sharded=True)))
    single_step = jax.jit(functools.partial(train_step, Block(sharded=False)))
    new_params, _, loss = sharded_step(params, tx.init(params), jax.device_put(x, rows), jax.device_put(target, rows))
    ref_params, _, ref_loss = single_step(params, tx.init(params), x, target)
    assert_same(loss, ref_loss, dict(rtol=1e-5, atol=1e-6))
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params), strict=True):
        assert_same(a, b, dict(rtol=1e-4, atol=1e-6))


def test_one_device_mesh_equals_hyper_attention(rng):
    cfg = paper_config(block_size=32, sample_size=16, num_projections=4, min_seq_len=64)
    q, k, v = random_qkv(rng, b=1, t=256, n=2, kv=1, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((1,), ("seq",))
    ref = ha.hyper_attention(q, k, v, key=key, config=cfg)
    for strategy in ("all_to_all", "bucket_dispatch"):
        out = sharded_hyper_attention(q, k, v, key=key, config=cfg, mesh=mesh, seq_axis="seq", strategy=strategy)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_bucket_dispatch_refuses_the_accuracy_options_by_name():
    check_paper_plan(paper_config())  # the published plan passes
    options = {"num_sink_keys": 4, "local_window": 8, "sample_distribution": "column_mass", "sample_shrinkage": 0.5}
    for name, value in options.items():
        with pytest.raises(ValueError, match=f"published plan only.*{name}={value!r}.*all_to_all"):
            check_paper_plan(paper_config(**{name: value}))


def test_bad_strategy_is_named(rng):
    q, k, v = random_qkv(rng, b=1, t=64, n=2, h=16)
    with pytest.raises(ValueError, match="strategy='ring'"):
        sharded_hyper_attention(
            q, k, v, key=jax.random.key(0), config=paper_config(), mesh=jax.make_mesh((1,), ("seq",)),
            seq_axis="seq", strategy="ring",
        )  # fmt: skip
