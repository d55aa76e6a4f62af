"""Sequence-sharded HyperAttention: `sharded_hyper_attention` (global arrays), `hyper_attention_shard` (in shard_map).

Both take the public layout `[B, T, N, H]` with the sequence split over a mesh axis and give the single-device
`hyper_attention` result for the same key, split the same way. Two strategies:

- "all_to_all" (Ulysses-style, `head_sharded.py`, the default): re-shard sequence -> heads, run the backend the
  registry picks for this platform (the fused kernels on GPU) on whole sequences for N/P heads, re-shard back. Every
  config, causal and non-causal. Needs N and K divisible by P.
- "bucket_dispatch" (`bucket_dispatch.py`): a distributed sort by LSH rank gives each device a contiguous range of
  the sorted order, the block-diagonal part is computed where the blocks land, the m samples per head are gathered to
  every device, and the results go back to their owners. Any number of heads; non-causal, published plan only
  (`HyperAttentionConfig.paper()`), pure jnp on each device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hyperattn_jax._checks import check_qkv, default_scale
from hyperattn_jax.backends.registry import choose
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.parallel.bucket_dispatch import bucket_dispatch_hyper_attention, check_paper_plan
from hyperattn_jax.parallel.head_sharded import head_sharded_hyper_attention

STRATEGIES = ("all_to_all", "bucket_dispatch")


def _check_key(key, name: str) -> None:
    if key is None or not hasattr(key, "dtype"):
        raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    is_typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not ((is_typed and key.shape == ()) or (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ValueError(f"{name} must be a single PRNG key, got {key.dtype}{list(key.shape)}")


def _check_common(config, strategy: str, causal) -> HyperAttentionConfig:
    """The config (default `HyperAttentionConfig()`, as in `hyper_attention`), after checking the call's options."""
    config = HyperAttentionConfig() if config is None else config
    if not isinstance(config, HyperAttentionConfig):
        raise ValueError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if strategy not in STRATEGIES:
        raise ValueError(f"{strategy=} is not one of {', '.join(map(repr, STRATEGIES))}")
    if causal and strategy == "bucket_dispatch":
        raise ValueError(
            'causal=True is not supported by strategy="bucket_dispatch": the causal recursion splits the sequence in '
            'halves across devices (see docs/sharding.md); use strategy="all_to_all" (N and K divisible by the '
            "number of sequence shards)."
        )
    if strategy == "bucket_dispatch":
        check_paper_plan(config)
    return config


def _choose_backend(q, config, causal: bool, implementation, interpret: bool, strategy: str):
    """The registry's pick for each device (`hyper_attention`'s rule); bucket_dispatch runs jnp on every device."""
    if strategy == "bucket_dispatch":
        if implementation not in (None, "xla"):
            raise ValueError(f'strategy="bucket_dispatch" runs the pure-jnp path on each device, got {implementation=}')
        return "xla", False
    choice = choose(
        implementation=implementation, dtype=q.dtype, head_dim=q.shape[-1], config=config, causal=causal,
        interpret=bool(interpret),
    )  # fmt: skip
    return choice.name, choice.interpret


def hyper_attention_shard(
    q,
    k,
    v,
    *,
    key,
    seq_axis,
    config: HyperAttentionConfig | None = None,
    causal: bool = False,
    strategy: str = "all_to_all",
    batch_axis=None,
    scale: float | None = None,
    return_lse: bool = False,
    hash_key=None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """HyperAttention of this device's sequence shard; call inside `jax.shard_map` (with `check_vma=False` when the
    backend runs Pallas kernels: on GPU, or with `interpret=True`).

    Args:
      q: this device's queries `[B, T/P, N, H]`: positions [i T/P, (i+1) T/P) on device i of `seq_axis` (P devices).
      k, v: this device's keys and values `[B, S/P, K, H]`, split the same way.
      key: PRNG key, the same on every device (replicated); the same key gives the single-device answer.
      seq_axis: the mesh axis name (or tuple of names) the sequence is split over.
      config: `HyperAttentionConfig`; default `HyperAttentionConfig()`, as in `hyper_attention`.
      causal: causal attention (strategy "all_to_all" only).
      strategy: "all_to_all" or "bucket_dispatch", see the module docstring.
      batch_axis: mesh axis name(s) the batch is split over, or None: the random draws of the single-device call are
        sliced to this device's batch elements.
      scale, return_lse, hash_key: as in `hyper_attention`.
      implementation, interpret: the backend each device runs, as in `hyper_attention` (None: the registry's pick for
        this platform); "all_to_all" only.

    Returns:
      out `[B, T/P, N, H]` in q's dtype, and lse `[B, N, T/P]` float32 if `return_lse`.
    """
    config = _check_common(config, strategy, causal)
    check_qkv(q, k, v, causal=causal)
    _check_key(key, "key")
    if hash_key is not None:
        _check_key(hash_key, "hash_key")
    implementation, interpret = _choose_backend(q, config, bool(causal), implementation, interpret, strategy)
    return _shard_body(
        q, k, v, key, hash_key, config=config, seq_axis=seq_axis, batch_axis=batch_axis, causal=bool(causal),
        strategy=strategy, scale=default_scale(q.shape[-1], scale), return_lse=return_lse,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip


def _shard_body(
    q, k, v, key, hash_key, *, config, seq_axis, batch_axis, causal, strategy, scale, return_lse, implementation,
    interpret,
):  # fmt: skip
    """`hyper_attention_shard` after validation, with the backend resolved."""
    common = dict(key=key, config=config, scale=scale, seq_axis=seq_axis, batch_axis=batch_axis, hash_key=hash_key)
    if strategy == "all_to_all":
        out, lse = head_sharded_hyper_attention(
            q, k, v, causal=causal, implementation=implementation, interpret=interpret, **common
        )
    else:
        out, lse = bucket_dispatch_hyper_attention(q, k, v, **common)
    out = out.astype(q.dtype)
    if not return_lse:
        return out
    return out, lse.astype(jnp.promote_types(q.dtype, jnp.float32))


def _axis_size(mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"mesh axis {name!r} is not one of the mesh's axes {tuple(mesh.shape)}")
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def _in_layout(x, mesh, spec):
    """x laid out as `spec` on `mesh` (a no-op when it already is), as shard_map expects its inputs.

    On meshes with explicit axes (the default of `jax.make_mesh`) shard_map refuses a mismatch and `jax.reshard` moves
    the data; on auto axes a sharding constraint lets the compiler do it.
    """
    if x is None:
        return None
    sharding = NamedSharding(mesh, spec)
    if all(axis_type == jax.sharding.AxisType.Explicit for axis_type in mesh.axis_types):
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


_STATIC = ("config", "mesh", "seq_axis", "batch_axis", "causal", "strategy", "scale", "return_lse")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "implementation", "interpret"))
def _sharded(q, k, v, key, hash_key, *, mesh, **static):
    rows = PartitionSpec(static["batch_axis"], static["seq_axis"])
    lse_rows = PartitionSpec(static["batch_axis"], None, static["seq_axis"])
    out_specs = (rows, lse_rows) if static["return_lse"] else rows
    in_specs = (rows, rows, rows, PartitionSpec(), PartitionSpec())
    args = [_in_layout(x, mesh, spec) for x, spec in zip((q, k, v, key, hash_key), in_specs, strict=True)]
    # A pallas_call has no rule for shard_map's varying-manual-axes check: turn it off for the kernel backends.
    mapped = jax.shard_map(
        functools.partial(_shard_body, **static),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=static["implementation"] == "xla",
    )
    return mapped(*args)


def sharded_hyper_attention(
    q,
    k,
    v,
    *,
    key,
    mesh: jax.sharding.Mesh,
    seq_axis,
    config: HyperAttentionConfig | None = None,
    causal: bool = False,
    strategy: str = "all_to_all",
    batch_axis=None,
    scale: float | None = None,
    return_lse: bool = False,
    hash_key=None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """HyperAttention of sequence-sharded arrays on `mesh`: the single-device result, sharded the same way.

    Args:
      q: queries `[B, T, N, H]`; any sharding (jit moves it), best already `NamedSharding(mesh, P(batch_axis,
        seq_axis))`.
      k, v: keys and values `[B, S, K, H]`, N % K == 0.
      key: PRNG key; the same key gives the same answer as `hyper_attention(q, k, v, key=key, ...)` on one device.
      mesh: a `jax.sharding.Mesh`.
      seq_axis: mesh axis name (or tuple of names) to split the sequence over; T and S must be divisible by its size.
      config: `HyperAttentionConfig`; default `HyperAttentionConfig()`, as in `hyper_attention`. Every config runs
        with "all_to_all"; "bucket_dispatch" takes `HyperAttentionConfig.paper(...)` only.
      causal: a Python bool, causal attention ("all_to_all" only).
      strategy: "all_to_all" (N, K divisible by the seq_axis size) or "bucket_dispatch" (any heads, non-causal, the
        published plan; needs S/P a multiple of block_size and T divisible by the number of blocks S/block_size).
      batch_axis: mesh axis name(s) to split the batch over (data parallelism), or None.
      scale, return_lse, hash_key: as in `hyper_attention`.
      implementation, interpret: the backend each device runs, as in `hyper_attention`: None picks what
        `hyper_attention` would on this platform (the fused kernels on GPU for bf16/fp16); "all_to_all" only.

    Returns:
      out `[B, T, N, H]` sharded `P(batch_axis, seq_axis)`, and lse `[B, N, T]` sharded `P(batch_axis, None,
      seq_axis)` if `return_lse`.

    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jax.random.normal(jax.random.key(1), (1, 512, 4, 32))
    >>> cfg = HyperAttentionConfig(block_size=64, sample_size=64, min_seq_len=128)
    >>> out = sharded_hyper_attention(q, k, v, key=jax.random.key(0), config=cfg, mesh=mesh, seq_axis="seq")
    >>> out.shape, out.sharding.spec[1]
    ((1, 512, 4, 32), 'seq')
    """
    config = _check_common(config, strategy, causal)
    check_qkv(q, k, v, causal=causal)
    _check_key(key, "key")
    if hash_key is not None:
        _check_key(hash_key, "hash_key")
    num_shards = _axis_size(mesh, seq_axis)
    if batch_axis is not None:
        batch_shards = _axis_size(mesh, batch_axis)
        if q.shape[0] % batch_shards:
            raise ValueError(f"batch {q.shape[0]} is not divisible by the {batch_shards} devices of {batch_axis=}")
    if q.shape[1] % num_shards or k.shape[1] % num_shards:
        raise ValueError(
            f"sequence lengths T={q.shape[1]}, S={k.shape[1]} must be divisible by the {num_shards} devices of "
            f"{seq_axis=}"
        )
    implementation, interpret = _choose_backend(q, config, bool(causal), implementation, interpret, strategy)
    return _sharded(
        q,
        k,
        v,
        key,
        hash_key,
        config=config,
        mesh=mesh,
        seq_axis=seq_axis,
        batch_axis=batch_axis,
        causal=bool(causal),
        strategy=strategy,
        scale=default_scale(q.shape[-1], scale),
        return_lse=bool(return_lse),
        implementation=implementation,
        interpret=interpret,
    )
