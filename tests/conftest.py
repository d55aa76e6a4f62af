"""Shared fixtures, and the process-wide jax setup every test file relies on.

Eight CPU devices: set here, before any test initialises a jax backend, so the multi-device tests of
`test_parallel.py` run in this process as ordinary tests. Single-device computations still run on device 0.
"""

import os
import zlib

import jax
import numpy as np
import pytest

# Before jax starts a backend: XLA:CPU compiles with LLVM's -O0. The suite's time goes to compiling many small
# programs (and Pallas interpret-mode kernels), not to running them; -O0 cuts it by 2-3x. Only LLVM's codegen changes:
# the HLO the library produces and XLA's HLO passes (fusion, layout, buffer assignment) are the same, so every test
# checks the same program; values move at float32 rounding level (a few ulp: vectorisation/FMA), far below any
# tolerance here, and comparisons of two paths in one test see the same compiler. Subprocesses (the notebooks'
# kernels) inherit it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

NUM_CPU_DEVICES = 8

# Before the first computation: jax reads it when it starts its backends (later it would raise).
jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)


def node_seed(nodeid: str) -> int:
    """A stable 32-bit seed from a test's node id (`tests/test_x.py::test_y[param]`), the same on every run."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from this test's node id: inputs depend on the test, never on scheduling or order."""
    return np.random.default_rng(node_seed(request.node.nodeid))
