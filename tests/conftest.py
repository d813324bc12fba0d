"""Test setup: 8 virtual CPU devices (for sharding tests), LLVM optimization level 0 for
XLA:CPU, and an opt-in float64 fixture.

XLA_FLAGS must be set before JAX initializes its backend, so it is set here, at import.
The suite compiles far more than it runs (Pallas interpret mode, shard_map over 8 devices,
jit per test); with --xla_backend_optimization_level=0 XLA:CPU skips LLVM's optimization
passes, which cuts compile times by about a third (CPU code quality only: the same HLO,
the same numerics checks). Tests that start processes pass XLA_FLAGS on (xla_flags).
"""

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def xla_flags(devices):
    """This process's XLA_FLAGS for a child process, with `devices` virtual CPU devices."""
    flags = [f for f in os.environ["XLA_FLAGS"].split()
             if "xla_force_host_platform_device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


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
