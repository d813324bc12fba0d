"""The reference backend, the ground truth of every other test, checked on its own terms.

1. Against a NumPy loop that builds each token's K x K transition matrix and K x V update
   literally from the table in issue 2 / DESIGN.md (no shared code with the library).
2. Its gradients (JAX autodiff through lax.scan) against central finite differences in
   float64, along random directions in every input and the initial state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import (ALL_OPS, GROUPED_OPS, assert_close, call, cast,
                         make_inputs, make_state)
from dplr_jax import ops

# Every test here compares against a float64 reference: run them all with x64 on.
pytestmark = pytest.mark.usefixtures("x64")


def _transition(name, x):
    """(A, U): one token's transition matrix [K, K] and update [K, V] for one value head;
    x holds the token's inputs for that head (B, T and head axes removed) by argument name."""
    K = x["q"].shape[-1]
    eye = np.eye(K)
    house = lambda k, b: eye - b * np.outer(k, k)
    if name == "gla":
        return np.diag(np.exp(x["log_decay"])), np.outer(x["k"], x["v"])
    if name == "delta_rule":
        return house(x["k"], x["beta"]), x["beta"] * np.outer(x["k"], x["v"])
    if name == "gated_delta_rule":
        return (house(x["k"], x["beta"]) * np.exp(x["log_decay"]),
                x["beta"] * np.outer(x["k"], x["v"]))
    if name == "kda":
        return (house(x["k"], x["beta"]) @ np.diag(np.exp(x["log_decay"])),
                x["beta"] * np.outer(x["k"], x["v"]))
    if name == "dplr":
        D = eye if x["log_decay"] is None else np.diag(np.exp(x["log_decay"]))
        return D - x["a"].T @ x["b"], x["k"].T @ x["v"]
    if name == "hdla":
        Hh = house(x["k"], x["beta"])
        return Hh @ np.diag(np.exp(x["log_decay"])) @ Hh, np.outer(x["k"], x["v"])
    if name == "gated_delta_product":
        A, U = np.exp(x["log_decay"]) * eye, np.zeros((K, x["v"].shape[-1]))
        for k, v, b in zip(x["k"], x["v"], x["beta"]):
            A, U = house(k, b) @ A, house(k, b) @ U + b * np.outer(k, v)
        return A, U
    raise ValueError(name)


def _numpy_recurrence(name, args, h0, scale):
    """o [B, T, HV, V] and final state [B, HV, K, V] by S_t = A_t S_{t-1} + U_t per head."""
    names = ("q", "k", "v") + ops.api.SPECS[name].gates
    B, T = args[0].shape[:2]
    H, HV = args[0].shape[2], h0.shape[1]
    o = np.zeros((B, T, HV, h0.shape[-1]))
    S = h0.copy()
    for b in range(B):
        for hv in range(HV):
            hk = hv // (HV // H)
            for t in range(T):
                # Arguments with HV heads are read at hv, those with H heads at hk.
                x = {n: None if a is None else a[b, t, hv if a.shape[2] == HV else hk]
                     for n, a in zip(names, args)}
                A, U = _transition(name, x)
                S[b, hv] = A @ S[b, hv] + U
                o[b, t, hv] = scale * S[b, hv].T @ x["q"]
    return o, S


CASES = [(name, dict(G=2) if name in GROUPED_OPS else {})
         for name in ALL_OPS if name != "dplr"]
CASES += [("dplr", dict(R=2, Rkv=2)), ("dplr", dict(R=3, Rkv=1, decay=False)),
          ("gated_delta_product", dict(n=3))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "".join(f"-{k}{v}" for k, v in
                                                                      c[1].items()))
def test_reference_matches_literal_recurrence(case, rng):
    name, kw = case
    args = make_inputs(name, rng, B=2, T=7, H=2, K=4, V=3, **kw)
    h0 = make_state(args, rng)
    o_np, S_np = _numpy_recurrence(name, args, h0, scale=0.7)
    o, S = call(name, cast(args, jnp.float64), jnp.asarray(h0), backend="reference", scale=0.7)
    assert_close(o, o_np, 1e-12, "o")
    assert_close(S, S_np, 1e-12, "final state")


FD_CASES = [("kda", dict(G=2)), ("dplr", dict(R=2, Rkv=2)), ("hdla", {}),
            ("gated_delta_product", dict(n=2))]


@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: c[0])
def test_reference_gradients_match_finite_differences(case, rng):
    """<grad f, d> = (f(x + eps d) - f(x - eps d)) / (2 eps) for f = <do, o> + <dS, S_final>,
    one random direction d per input (log decays perturbed multiplicatively, staying < 0)."""
    name, kw = case
    args = cast(make_inputs(name, rng, B=1, T=5, H=1, K=3, V=3, **kw), jnp.float64)
    h0 = jnp.asarray(make_state(args, rng))
    names = ("q", "k", "v") + ops.api.SPECS[name].gates + ("initial_state",)
    primals = args + (h0,)
    o, S = call(name, args, h0, backend="reference")
    do, dS = (jnp.asarray(rng.standard_normal(x.shape)) for x in (o, S))

    @jax.jit
    def f(primals):
        o, S = ops.OPS[name](*primals[:-1], initial_state=primals[-1], output_final_state=True,
                             backend="reference")
        return jnp.sum(do * o) + jnp.sum(dS * S)

    grads = jax.grad(f)(primals)
    eps = 1e-5
    for i, (arg_name, x) in enumerate(zip(names, primals)):
        d = rng.standard_normal(x.shape)
        if arg_name == "log_decay":
            d = d * np.asarray(x)
        shifted = lambda s: tuple(p if j != i else p + s * eps * d for j, p in enumerate(primals))
        fd = (f(shifted(1.0)) - f(shifted(-1.0))) / (2 * eps)
        ad = float(jnp.sum(grads[i] * d))
        assert abs(fd - ad) <= 1e-7 * max(1.0, abs(ad)), (arg_name, fd, ad)
