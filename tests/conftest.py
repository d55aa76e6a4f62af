"""Shared fixtures."""

import itertools

import numpy as np
import pytest

_seeds = itertools.count(1000)


@pytest.fixture
def rng():
    """A fresh numpy Generator per test (different inputs every test, reproducible run to run)."""
    return np.random.default_rng(next(_seeds))
