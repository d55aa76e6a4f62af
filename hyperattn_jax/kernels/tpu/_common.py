"""Helpers shared by the Pallas TPU kernels: padding to the (8, 128) tiling, compiler and interpret parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from hyperattn_jax.kernels.tpu.vmem import VMEM_LIMIT_BYTES

NUM_LANES = 128  # the minor dimension of a vreg and of every VMEM tile
NUM_SUBLANES = 8  # the second-minor dimension of a float32 vreg
ROW_MULTIPLE = 16  # query rows per block: a multiple of the bf16 sublane packing (16 rows per vreg)
# The running max starts finite, so that a row whose keys so far are all masked (-inf) gives exp(-inf - m) = 0
# instead of exp(-inf + inf) = NaN; real scores never come near it.
NEG_START = -1e30


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_to(x, axis: int, size: int, value=0):
    """Pad `axis` of x at the end up to `size` (no copy when it already has that size)."""
    axis = axis % x.ndim
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def compiler_params(semantics: tuple[str, ...]):
    """Mosaic parameters: grid axes "parallel" (split across TensorCores) or "arbitrary" (a reduction, kept in order),
    and the scoped VMEM limit every kernel here is budgeted against (`vmem.py`)."""
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def interpret_arg(interpret: bool):
    """`pallas_call(interpret=...)`: TPU interpret mode (runs on CPU, simulating VMEM and the pipeline) or compile."""
    return pltpu.InterpretParams() if interpret else False


def default_interpret() -> bool:
    """Interpret wherever there is no TPU (tests on CPU)."""
    return jax.default_backend() != "tpu"


def dot(a, b):
    """a @ b inside a kernel, float32 accumulation (bf16 operands go to the MXU as they are)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_t(a, b):
    """a @ b.T inside a kernel, float32 accumulation (the MXU takes the transposed operand directly)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a.T @ b inside a kernel, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def div(x, y):
    """x // y for non-negative ints inside kernels and index maps (jnp's floor division lowers through `sign`, whose
    TPU lowering asks for the chip generation, which a CPU export does not know)."""
    return jax.lax.div(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))
