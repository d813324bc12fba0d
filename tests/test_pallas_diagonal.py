"""The Pallas kernels for phase 1's exact-decay diagonal sub-blocks (ops/pallas/diagonal.py).

The kernels (CPU interpret mode) against XLA's `chunked.diagonal_blocks`: values and every
cotangent (X, Y and the log decays, whose gradient the wrapper forms from two reverse
cumulative sums), probe and plain, several probes / keys per token, K padded, hard resets;
float32 against float64; backend="pallas" through them against the float64 reference at
chunk 64 (four sub-chunks) with hard resets; which ops use them; Triton lowering.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import assert_close, cast, make_inputs, make_state
from dplr_jax import ops
from dplr_jax.ops import chunked
from dplr_jax.ops.pallas import diagonal
from test_pallas_ops import check_pallas_vjp


def blocks(rng, n=3, a=1, b=1, K=32, strong=False):
    """Xs [n, 16, a, K], Ys [n, 16, b, K], log decays gs [n, 16, K] as float64 NumPy."""
    g = -np.logaddexp(0.0, -(1.5 * rng.standard_normal((n, 16, K)) + 3.0))
    if strong:
        g = np.where(rng.random(g.shape) < 0.05, -1000.0, 10.0 * g)
        g[0, 7] = -1000.0
    return (rng.standard_normal((n, 16, a, K)), rng.standard_normal((n, 16, b, K)), g)


def value_and_pullback(fn, xs, ct):
    out, pull = jax.vjp(fn, *xs)
    return (out,) + pull(ct)


@pytest.mark.parametrize("probe", [False, True], ids=["plain", "probe"])
@pytest.mark.parametrize("a,b,K,strong", [(1, 1, 32, False), (1, 1, 32, True), (2, 1, 40, False),
                                          (1, 3, 16, True)])
def test_matches_xla_in_float64(probe, a, b, K, strong, rng, x64):
    """Same math as XLA's version: values and cotangents agree to rounding (float64)."""
    xs = cast(blocks(rng, a=a, b=b, K=K, strong=strong), jnp.float64)
    ct = jnp.asarray(rng.standard_normal((3, 16, a, 16, b)))
    ref = value_and_pullback(lambda *x: chunked.diagonal_blocks(*x, probe), xs, ct)
    got = jax.jit(lambda ct, *x: value_and_pullback(
        lambda *y: diagonal.diagonal_blocks(*y, probe, interpret=True), x, ct))(ct, *xs)
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.shape == v.shape and u.dtype == jnp.float64
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("probe", [False, True], ids=["plain", "probe"])
def test_float32_against_float64_with_hard_resets(probe, rng, x64):
    xs = blocks(rng, strong=True)
    ct = rng.standard_normal((3, 16, 1, 16, 1))
    ref = value_and_pullback(lambda *x: chunked.diagonal_blocks(*x, probe),
                             cast(xs, jnp.float64), jnp.asarray(ct))
    got = jax.jit(lambda ct, *x: value_and_pullback(
        lambda *y: diagonal.diagonal_blocks(*y, probe, interpret=True), x, ct))(
        *cast((ct,) + xs, jnp.float32))
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(u))), name
        assert_close(u, v, 1e-5, name)


@pytest.mark.parametrize("name", ["kda", "gla"])
def test_backend_pallas_chunk_64_hard_resets(name, rng, x64):
    """backend="pallas" (four sub-chunks per chunk through the kernels) vs the float64
    reference at T=130: gates x10 with 5% hard resets, an initial state, every gradient."""
    args = list(make_inputs(name, rng, B=1, T=130, K=32, V=32, G=2 if name == "kda" else 1))
    g = 10 * args[3]
    args[3] = np.where(rng.random(g.shape) < 0.05, -1000.0, g)
    args = cast(tuple(args), jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=64)


def test_used_for_per_channel_decays_only():
    def jaxpr(name):
        args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=20), jnp.float32)
        fn = lambda *a: ops.OPS[name](*a, backend="pallas", chunk_size=16)[0].sum()
        return str(jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args))

    for name in ("kda", "gla", "dplr", "hdla"):
        text = jaxpr(name)
        assert "dplr_diagonal_fwd" in text and "dplr_diagonal_bwd" in text, name
    for name in ("gated_delta_rule", "delta_rule", "gated_delta_product"):
        assert "dplr_diagonal" not in jaxpr(name), name
