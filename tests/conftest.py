"""Test setup: 8 virtual CPU devices (for sharding tests) and an opt-in float64 fixture.

XLA_FLAGS must be set before JAX initializes its backend, so it is set here, at import.
"""

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs the test with float64 enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng(request):
    """A fresh, test-specific NumPy generator (seeded from the test id, so failures reproduce)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
