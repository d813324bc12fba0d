"""The Pallas phase-1 kernel (ops/pallas/chunk_prepare.py) of the delta-rule family.

The kernel (CPU interpret mode) against the float64 XLA `chunked.chunk_summary` on the same
float32 inputs, per gate kind (per channel, scalar, none), with strong decay and hard resets
(log decay -1000); backend="pallas" through it against the float64 reference (outputs, final
states, every gradient); and its Triton lowering for CUDA at K = V = 128.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh

from _ops_inputs import assert_close, cast, make_inputs, make_state
from dplr_jax import ops
from dplr_jax.ops import backends
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, chunk_prepare, engine
from test_pallas_ops import check_pallas_vjp

INTERPRET = chunk_prepare.PrepareConfig(interpret=True)
WITH_KERNEL = {p: dataclasses.replace(c, phase1_kernel=True) for p, c in PLATFORM_CONFIGS.items()}


@pytest.fixture
def phase1_kernel(monkeypatch):
    """backend="pallas" on the CPU with phase 1 in the kernel (no registered config has it on)."""
    for name in ops.OPS:
        monkeypatch.setitem(backends._KERNELS, (name, "cpu"),
                            engine.kernel(name, WITH_KERNEL["cpu"]))


def engine_chunks(rng, gate, strong, N=3, C=64, K=32, V=32):
    """Flat chunks (q, g, E, y, P) of the delta-rule engine form as float64 NumPy:
    E = beta k, P = e^g k, keys unit norm, beta in (0, 2); strong: gates x10, hard resets."""
    q = rng.standard_normal((N, C, K))
    k = rng.standard_normal((N, C, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 2.0 / (1.0 + np.exp(-rng.standard_normal((N, C, 1))))
    g = None
    P = k
    if gate is not None:
        shape = (N, C, K) if gate == "channel" else (N, C)
        g = -np.logaddexp(0.0, -(1.5 * rng.standard_normal(shape) + 3.0))
        if strong:  # hard resets in every chunk but the last (whose M must stay nonzero)
            reset = (rng.random(shape) < 0.05) & (np.arange(N) < N - 1).reshape(
                (N,) + (1,) * (len(shape) - 1))
            reset[0, 30] = True
            g = np.where(reset, -1000.0, 10.0 * g)
        P = k * np.exp(g if gate == "channel" else g[..., None])
    return q, g, beta * k, rng.standard_normal((N, C, V)), P


@pytest.mark.parametrize("gate,strong,K,V", [
    ("channel", False, 32, 32), ("channel", True, 32, 32), ("scalar", False, 32, 32),
    ("scalar", True, 32, 32), (None, False, 32, 32), ("channel", False, 24, 40),
])
def test_kernel_matches_chunk_summary(gate, strong, K, V, rng, x64):
    """M, Bc, Qs, O0 of float32 inputs against chunk_summary in float64, to 1e-5 relative;
    K=24, V=40 are zero-padded to 32 and 64 inside."""
    xs = engine_chunks(rng, gate, strong, K=K, V=V)
    got = jax.jit(lambda *a: chunk_prepare._prepare(INTERPRET, *a))(*cast(xs, jnp.float32))
    ref = jax.jit(chunk_prepare._xla_summaries)(*cast(xs, jnp.float64))
    for name, a, b in zip(("M", "Bc", "Qs", "O0"), got, ref):
        assert a.dtype == jnp.float32 and a.shape == b.shape
        assert np.all(np.isfinite(np.asarray(a))), name
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("name", ["kda", "gated_delta_rule", "delta_rule"])
def test_backend_pallas_strong_decay(name, rng, x64, phase1_kernel):
    """backend="pallas" (phase 1 in the kernel) vs the float64 reference at T=130, chunk 64:
    gates x10 with 5% hard resets, an initial state, grouped value heads, every gradient."""
    args = list(make_inputs(name, rng, B=1, T=130, K=32, V=32, G=2 if name != "delta_rule" else 1))
    if name != "delta_rule":
        g = 10 * args[3]
        args[3] = np.where(rng.random(g.shape) < 0.05, -1000.0, g)
    args = cast(tuple(args), jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=64)


def test_engine_uses_the_kernel_for_the_delta_family_only(phase1_kernel):
    def jaxpr(name):
        args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=20), jnp.float32)
        return str(jax.make_jaxpr(lambda *a: ops.OPS[name](*a, backend="pallas",
                                                           chunk_size=16)[0])(*args))

    for name in ("kda", "gated_delta_rule", "delta_rule", "hdla", "gated_delta_product"):
        assert "dplr_chunk_prepare" in jaxpr(name), name
    for name in ("gla", "dplr"):
        assert "dplr_chunk_prepare" not in jaxpr(name), name


@pytest.mark.parametrize("name,dtype", [("kda", jnp.bfloat16), ("gated_delta_rule", jnp.bfloat16),
                                        ("delta_rule", jnp.float32)])
def test_lowers_for_cuda(name, dtype):
    """Forward and gradient of the op with the phase-1 kernel lower through Triton at
    K = V = 128 (lowering only, on an abstract H100)."""
    args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=128, H=1, K=128, V=128),
                dtype)
    fn = engine.kernel(name, WITH_KERNEL["gpu"])

    def loss(*a):
        o, S = fn(*a, scale=128 ** -0.5, initial_state=None, cu_seqlens=None, chunk_size=64)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "dplr_chunk_prepare" in text
