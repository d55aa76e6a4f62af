"""Helpers shared by the Pallas Triton kernels: compiler parameters across jax versions, padding to powers of two."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# The running max starts finite, so that a row whose keys so far are all masked (-inf) gives exp2(-inf - m) = 0
# instead of exp2(-inf + inf) = NaN; real scores never come near it.
NEG_START = -1e30
MIN_DOT = 16  # Triton's tensor-core dots need every dimension >= 16.


def triton_params(num_warps: int, num_stages: int):
    """`CompilerParams` of the Triton lowering (the class moved between jax versions; passing it picks Triton)."""
    from jax.experimental.pallas import triton as pallas_triton

    params = getattr(pallas_triton, "CompilerParams", None)
    if params is None:  # jax versions before the rename
        from jax.experimental.pallas import gpu as pallas_gpu

        params = pallas_gpu.TritonCompilerParams
    return params(num_warps=num_warps, num_stages=num_stages)


def dot(a, b):
    """a @ b inside a kernel, float32 accumulation."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_t(a, b):
    """a @ b.T inside a kernel, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def next_power_of_two(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def pad_to(x, axis: int, size: int, value=0):
    """Pad `axis` of x at the end up to `size` (no copy when it already has that size)."""
    axis = axis % x.ndim
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def default_interpret() -> bool:
    """Run kernels in interpret mode wherever there is no GPU (tests on CPU)."""
    return jax.default_backend() != "gpu"


def div(x, y):
    """Integer x // y inside a kernel, for x, y >= 0 (jnp's floor division lowers to ops Triton rejects)."""
    return jax.lax.div(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))


def rem(x, y):
    """Integer x % y inside a kernel, for x, y >= 0."""
    return jax.lax.rem(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))
