"""Shared helpers for the op tests: random inputs for every op, jitted calls, relative RMSE.

Inputs follow each op's intended regime: keys L2-normalized for the delta family, beta in
(0, 2), log decays negative (log-sigmoid of normals), DPLR's low-rank part built so the
transition stays bounded over a few hundred tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax import ops


ALL_OPS = ("gla", "delta_rule", "gated_delta_rule", "kda", "dplr", "hdla", "gated_delta_product")
GROUPED_OPS = ("delta_rule", "gated_delta_rule", "kda")  # ops that accept HV = G*H value heads
DECAY_OPS = ("gla", "gated_delta_rule", "kda", "dplr", "hdla", "gated_delta_product")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_inputs(name, rng, *, B=2, T=50, H=2, K=8, V=16, G=1, R=1, Rkv=1, n=2, decay=True):
    """Positional inputs of op `name` as float64 NumPy arrays, in the op's argument order.

    G: value heads per key head (delta family only); R, Rkv: DPLR ranks of (a, b) and (k, v);
    n: Gated DeltaProduct's Householders per token; decay=False gives dplr log_decay None.
    """
    HV = G * H
    normal = rng.standard_normal
    q = normal((B, T, H, K))
    beta = lambda *s: 2.0 / (1.0 + np.exp(-normal((B, T) + s)))  # in (0, 2)
    log_decay = lambda *s: _log_sigmoid(1.5 * normal((B, T) + s) + 3.0)  # mostly in (-1, 0)
    if name == "gla":
        return q, normal((B, T, H, K)), normal((B, T, H, V)), log_decay(H, K)
    if name == "delta_rule":
        return q, _unit(normal((B, T, H, K))), normal((B, T, HV, V)), beta(HV)
    if name == "gated_delta_rule":
        return q, _unit(normal((B, T, H, K))), normal((B, T, HV, V)), log_decay(HV), beta(HV)
    if name == "kda":
        return q, _unit(normal((B, T, H, K))), normal((B, T, HV, V)), log_decay(HV, K), beta(HV)
    if name == "dplr":
        u = _unit(normal((B, T, H, R, K)))
        a = (beta(H, R) / R)[..., None] * _unit(u + 0.5 * normal(u.shape))
        k = _unit(normal((B, T, H, Rkv, K)))
        return q, k, normal((B, T, H, Rkv, V)), log_decay(H, K) if decay else None, a, u
    if name == "hdla":
        return q, _unit(normal((B, T, H, K))), normal((B, T, H, V)), log_decay(H, K), beta(H)
    if name == "gated_delta_product":
        return (q, _unit(normal((B, T, H, n, K))), normal((B, T, H, n, V)), log_decay(H),
                beta(H, n))
    raise ValueError(name)


def make_state(args, rng, N=None):
    """A random initial state [N, HV, K, V] for an op's inputs (N defaults to B), float64 NumPy.
    HV is v's head axis, K q's last axis, V v's last axis."""
    B, K = args[0].shape[0], args[0].shape[-1]
    return 0.5 * rng.standard_normal((N or B, args[2].shape[2], K, args[2].shape[-1]))


def cast(xs, dtype):
    """NumPy/JAX arrays (or a tuple of them, None passing through) -> jnp arrays of `dtype`."""
    if isinstance(xs, (tuple, list)):
        return tuple(cast(x, dtype) for x in xs)
    return None if xs is None else jnp.asarray(xs).astype(dtype)


def call(name, args, h0=None, **options):
    """(o, final_state) of op `name` under jit; `options` are its (static) keyword options."""
    fn = lambda args, h0: ops.OPS[name](*args, initial_state=h0, output_final_state=True,
                                        **options)
    return jax.jit(fn)(tuple(args), h0)


def call_vjp(name, args, h0, do, dS, **options):
    """(o, final_state, d_args, d_h0) of op `name` under jit, pulling back cotangents (do, dS)."""
    def fn(args, h0, do, dS):
        f = lambda args, h0: ops.OPS[name](*args, initial_state=h0, output_final_state=True,
                                           **options)
        (o, S), pull = jax.vjp(f, args, h0)
        d_args, d_h0 = pull((do, dS))
        return o, S, d_args, d_h0

    return jax.jit(fn)(tuple(args), h0, do, dS)


def random_cotangents(rng, o, S):
    """Standard normal cotangents (float64 NumPy) shaped like o and the final state."""
    return rng.standard_normal(o.shape), rng.standard_normal(S.shape)


def check_vjp(name, args, h0, cot, tol_o, tol_S, tol_grad, *, chunk_size, cu_seqlens=None,
              backend="xla", **options):
    """Forward and pullback of `backend` (inputs in their dtype; `options`: more keyword
    options of the op) against the float64 reference on float64 copies of the same inputs
    and cotangents (x64 must be on).

    tol_grad(arg_name) is the tolerance for the gradient w.r.t. that input or "initial_state".
    """
    dtype = args[0].dtype
    ref = call_vjp(name, cast(args, jnp.float64), cast(h0, jnp.float64), *cast(cot, jnp.float64),
                   backend="reference", cu_seqlens=cu_seqlens)
    o, S, d_args, d_h0 = call_vjp(name, args, h0, cast(cot[0], dtype), cast(cot[1], jnp.float32),
                                  backend=backend, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                                  **options)
    assert o.dtype == dtype and S.dtype == d_h0.dtype == jnp.float32
    assert_close(o, ref[0], tol_o, "o")
    assert_close(S, ref[1], tol_S, "final state")
    names = ("q", "k", "v") + ops.api.SPECS[name].gates
    for arg_name, x, d, d_ref in zip(names, args, d_args, ref[2]):
        if x is not None:
            assert d.dtype == x.dtype
            assert_close(d, d_ref, tol_grad(arg_name), f"d {arg_name}")
    assert_close(d_h0, ref[3], tol_grad("initial_state"), "d initial_state")


def rel_rmse(x, ref):
    """||x - ref||_2 / ||ref||_2 over all entries, in float64 (NaN if either has NaN)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    return float(np.sqrt(np.sum((x - ref) ** 2) / np.sum(ref**2)))


def assert_close(x, ref, tol, what):
    """Relative RMSE of x against ref below tol (fails on NaN/inf, or on an all-zero ref)."""
    ref64 = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(ref64)), f"{what}: reference is not finite"
    assert np.any(ref64 != 0), f"{what}: reference is all zeros, the comparison means nothing"
    err = rel_rmse(x, ref)
    assert err < tol, f"{what}: relative RMSE {err:.3g} >= {tol:.0e}"
