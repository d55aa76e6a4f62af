"""Shared fixtures, and the process-wide jax setup every test file relies on.

Eight CPU devices: set here, before any test initialises a jax backend, so the multi-device tests of
`test_parallel.py` run in this process as ordinary tests. Single-device computations still run on device 0.
"""

import zlib

import jax
import numpy as np
import pytest

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
