"""Each special op equals `dplr` called with its mapping (DESIGN.md's table), float64, on the
reference and xla backends; HDLA's rank-2 factors equal the direct triple product."""

import jax.numpy as jnp
import pytest
import numpy as np

from _ops_inputs import assert_close, call, cast, make_inputs, make_state
from dplr_jax import ops

# Every test here compares against a float64 reference: run them all with x64 on.
pytestmark = pytest.mark.usefixtures("x64")

BACKENDS = ("reference", "xla")


def _options(backend):
    return dict(backend=backend, chunk_size=16) if backend == "xla" else dict(backend=backend)


def _heads(x, hv):
    """Repeats key heads [B, T, H, ...] to value heads, so head h reads key head h // G."""
    return jnp.repeat(x, hv // x.shape[2], axis=2)


def _assert_same(name, args, dplr_args, h0):
    """op `name` on args == dplr on dplr_args (outputs and final states), on every backend."""
    for backend in BACKENDS:
        o, S = call(name, args, h0, **_options(backend))
        o_d, S_d = call("dplr", dplr_args, h0, **_options(backend))
        assert_close(o, o_d, 1e-10, f"o ({backend})")
        assert_close(S, S_d, 1e-10, f"final state ({backend})")


def _setup(name, rng, **kw):
    args = cast(make_inputs(name, rng, T=50, **kw), jnp.float64)
    return args, jnp.asarray(make_state(args, rng))


def test_gla_is_dplr_without_low_rank(rng):
    args, h0 = _setup("gla", rng)
    q, k, v, g = args
    zero = jnp.zeros_like(k)
    _assert_same("gla", args, (q, k, v, g, zero, zero), h0)  # rank-1 shorthand, a = b = 0
    zeros2 = jnp.zeros(k.shape[:3] + (2,) + k.shape[3:])
    _assert_same("gla", args, (q, k, v, g, zeros2, zeros2), h0)  # rank 2, zeros


def test_delta_rule_is_dplr(rng):
    args, h0 = _setup("delta_rule", rng, G=2)
    q, k, v, beta = args
    hv = v.shape[2]
    q, k = _heads(q, hv), _heads(k, hv)
    bk = beta[..., None] * k
    _assert_same("delta_rule", args, (q, bk, v, None, bk, k), h0)


def test_gated_delta_rule_is_dplr(rng):
    args, h0 = _setup("gated_delta_rule", rng, G=2)
    q, k, v, g, beta = args
    hv = v.shape[2]
    q, k = _heads(q, hv), _heads(k, hv)
    bk = beta[..., None] * k
    g_channels = jnp.broadcast_to(g[..., None], k.shape)
    _assert_same("gated_delta_rule", args,
                 (q, bk, v, g_channels, bk, jnp.exp(g)[..., None] * k), h0)


def test_kda_is_dplr(rng):
    args, h0 = _setup("kda", rng, G=2)
    q, k, v, g, beta = args
    hv = v.shape[2]
    q, k = _heads(q, hv), _heads(k, hv)
    bk = beta[..., None] * k
    _assert_same("kda", args, (q, bk, v, g, bk, jnp.exp(g) * k), h0)


def test_hdla_is_dplr_through_hdla_factors(rng):
    args, h0 = _setup("hdla", rng)
    q, k, v, g, beta = args
    g2, a, b = ops.hdla_factors(k, g, beta)
    assert a.shape == b.shape == k.shape[:3] + (2,) + k.shape[3:]
    _assert_same("hdla", args, (q, k, v, g2, a, b), h0)


def test_hdla_factors_equal_triple_product(rng):
    """(I - b k k^T) Diag(l) (I - b k k^T) == Diag(l) - A^T B as K x K matrices, for unit and
    non-unit keys, beta in (0, 2)."""
    K = 8
    k = rng.standard_normal((6, K))
    k[:3] /= np.linalg.norm(k[:3], axis=-1, keepdims=True)
    log_l = -rng.exponential(size=(6, K))
    beta = rng.uniform(0.0, 2.0, size=6)
    g, a, b = (np.asarray(x) for x in ops.hdla_factors(jnp.asarray(k), jnp.asarray(log_l),
                                                       jnp.asarray(beta)))
    np.testing.assert_array_equal(g, log_l)
    for i in range(6):
        house = np.eye(K) - beta[i] * np.outer(k[i], k[i])
        direct = house @ np.diag(np.exp(log_l[i])) @ house
        factored = np.diag(np.exp(g[i])) - a[i].T @ b[i]
        np.testing.assert_allclose(factored, direct, rtol=1e-12, atol=1e-12)


def test_gated_delta_product_is_gated_delta_rule_and_dplr(rng):
    """n = 1 is Gated DeltaNet; n = 2 is DPLR of rank 2 through the compact WY form
    e^g H2 H1 = e^g (I - b1 k1 k1^T - b2 k2 (k2 - b1 (k1.k2) k1)^T),
    update H2 b1 k1 v1^T + b2 k2 v2^T."""
    args, h0 = _setup("gated_delta_product", rng, n=1)
    q, k, v, g, beta = args
    gdr_args = (q, k[:, :, :, 0], v[:, :, :, 0], g, beta[:, :, :, 0])
    for backend in BACKENDS:
        o, S = call("gated_delta_product", args, h0, **_options(backend))
        o_r, S_r = call("gated_delta_rule", gdr_args, h0, **_options(backend))
        assert_close(o, o_r, 1e-10, f"o, n=1 ({backend})")
        assert_close(S, S_r, 1e-10, f"final state, n=1 ({backend})")

    args, h0 = _setup("gated_delta_product", rng, n=2)
    q, k, v, g, beta = args
    k1, k2 = k[:, :, :, 0], k[:, :, :, 1]
    b1, b2 = beta[..., 0, None], beta[..., 1, None]
    dot = jnp.sum(k1 * k2, axis=-1, keepdims=True)
    a = jnp.stack([b1 * k1, b2 * k2], axis=3)
    b = jnp.exp(g)[..., None, None] * jnp.stack([k1, k2 - b1 * dot * k1], axis=3)
    k_kv = jnp.stack([b1 * k1 - b1 * b2 * dot * k2, b2 * k2], axis=3)
    g_channels = jnp.broadcast_to(g[..., None], k1.shape)
    _assert_same("gated_delta_product", args, (q, k_kv, v, g_channels, a, b), h0)
