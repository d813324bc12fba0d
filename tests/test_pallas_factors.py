"""The Pallas kernels for the rest of phase 1 of rank-1 forms (pallas/factors.py).

`factors.rank1_factors` (CPU interpret mode) against XLA's `chunked.chunk_factors` on one
chunk: the six factors and the cotangents of every input, for the delta family's form (probed
keys), GLA's (plain keys) and rank-1 DPLR's (both), per-channel, per-token and no decay, K
and V over one and several 64-column programs (padded), hard resets; float64 to rounding and
float32 against float64; which ops take the kernels; what the backward keeps.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import assert_close, cast, make_inputs
from dplr_jax import ops
from dplr_jax.ops import chunked
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, decayed, engine, factors
from dplr_jax.ops.pallas.state_pass import Launch

HIGHEST = jax.lax.Precision.HIGHEST
KERNELS = dict(interpret=True, precision=HIGHEST, exact=HIGHEST, launch=(Launch(), Launch()))
PRODUCTS = functools.partial(decayed.decayed_products, **KERNELS)


def chunk(rng, decay, C, K, V, strong=False, form="delta"):
    """One chunk of a rank-1 form as float64 NumPy: q, g (None, [C] or [C, K]), E, y, P, F, Vk.
    "delta": E = beta k, y, P = k e^g (as the ops' forms build them: the probe reads the
    decayed state), no plain keys; "plain" (GLA): F = k, Vk = v only; "both" (rank-1 DPLR):
    E = a, y = 0, P = b and F = k, Vk = v."""
    q = rng.standard_normal((C, K))
    k = rng.standard_normal((C, K)) / np.sqrt(K)
    beta = rng.uniform(0.0, 2.0, (C, 1))
    y = rng.standard_normal((C, 1, V))
    shape = {"channel": (C, K), "scalar": (C,)}.get(decay)
    g = None if shape is None else -np.logaddexp(0.0, -(1.5 * rng.standard_normal(shape) + 3.0))
    if strong and g is not None:
        g = np.where(rng.random(shape) < 0.05, -1000.0, 10.0 * g)
        g[C // 2 + 3] = -1000.0
    if form == "plain":
        return q, g, None, None, None, k[:, None], y
    eg = 1.0 if g is None else np.exp(g if g.ndim == 2 else g[:, None])
    if form == "both":
        b = rng.standard_normal((C, K)) / np.sqrt(K)
        return (q, g, (beta * b)[:, None], np.zeros_like(y), b[:, None], k[:, None], y)
    return q, g, (beta * k)[:, None], y, (k * eg)[:, None], None, None


def factors_and_pullback(fn, xs, cts):
    """The factors and the cotangents of the inputs that are not None."""
    live = [i for i, x in enumerate(xs) if x is not None]

    def f(*a):
        full = list(xs)
        for i, x in zip(live, a):
            full[i] = x
        return fn(*full)

    out, pull = jax.vjp(f, *(xs[i] for i in live))
    return out, pull(cts)


def run_both(xs, cts):
    ref = factors_and_pullback(chunked.chunk_factors, xs, cts)
    got = jax.jit(lambda xs, cts: factors_and_pullback(
        functools.partial(factors.rank1_factors, decayed=PRODUCTS, **KERNELS), xs,
        cts))(xs, cts)
    return got, ref


def cotangents(rng, xs):
    """Random cotangents of the factors (gamma, Z, W, X, Qs, O0) of a chunk's inputs; None
    for W without probed keys."""
    q, _, E, y, _, F, Vk = xs
    C, K = q.shape
    V = (y if Vk is None else Vk).shape[-1]
    rows = C * ((E is not None) + (F is not None))
    shapes = [(K,), (rows, K), None if E is None else (C, K), (rows, V), (C, K), (C, V)]
    return tuple(None if s is None else rng.standard_normal(s) for s in shapes)


NAMES = ("gamma", "Z", "W", "X", "Qs", "O0")


def close(x, ref, tol, what):
    """assert_close, or exact zeros where the reference is all zeros (gamma after a reset
    of every channel)."""
    if not np.any(np.asarray(ref)):
        assert not np.any(np.asarray(x)), what
    else:
        assert_close(x, ref, tol, what)


@pytest.mark.parametrize("form", ["delta", "plain", "both"])
@pytest.mark.parametrize("decay", ["channel", "scalar", None])
@pytest.mark.parametrize("C,K,V,strong", [(64, 32, 16, False), (32, 100, 80, False),
                                          (16, 24, 200, True)])
def test_matches_xla_in_float64(form, decay, C, K, V, strong, rng, x64):
    """Same math as chunk_factors: every factor and every input cotangent to rounding. K and
    V of 100 / 128 / 200 run two to four 64-column programs, the padded ones included."""
    xs = cast(chunk(rng, decay, C, K, V, strong, form), jnp.float64)
    cts = cast(cotangents(rng, xs), jnp.float64)
    (f_got, d_got), (f_ref, d_ref) = run_both(xs, cts)
    for name, u, v in zip(NAMES, f_got, f_ref):
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.shape == v.shape and u.dtype == jnp.float64, name
            close(u, v, 1e-12, name)
    names = [n for n, x in zip(("q", "g", "E", "y", "P", "F", "Vk"), xs) if x is not None]
    assert len(d_got) == len(d_ref) == len(names)
    for name, u, v in zip(names, d_got, d_ref):
        assert u.shape == v.shape and bool(jnp.all(jnp.isfinite(u))), name
        close(u, v, 1e-12, f"d{name}")


@pytest.mark.parametrize("form,decay", [("delta", "channel"), ("delta", "scalar"),
                                        ("plain", "channel"), ("both", "channel")])
def test_float32_against_float64(form, decay, rng):
    """float32 kernels vs the float64 XLA version (hard resets): relative RMSE < 1e-5."""
    xs = chunk(rng, decay, 64, 64, 64, strong=True, form=form)
    cts = cotangents(rng, xs)
    with jax.enable_x64(True):
        _, (f_ref, d_ref) = run_both(cast(xs, jnp.float64), cast(cts, jnp.float64))
        f_ref, d_ref = jax.tree.map(np.asarray, (f_ref, d_ref))
    (f_got, d_got), _ = run_both(cast(xs, jnp.float32), cast(cts, jnp.float32))
    names = NAMES + tuple(f"d{n}" for n, x in zip(("q", "g", "E", "y", "P", "F", "Vk"), xs)
                          if x is not None)
    pairs = [(n, u, v) for n, u, v in zip(names, tuple(f_got) + tuple(d_got),
                                          tuple(f_ref) + tuple(d_ref)) if v is not None]
    assert len(pairs) == len(names) - (xs[2] is None)  # all but W without probed keys
    for name, u, v in pairs:
        assert u.dtype == jnp.float32
        close(u, v, 1e-5, name)


@pytest.mark.parametrize("name,uses,ranks", [
    ("kda", True, {}), ("gated_delta_rule", True, {}), ("delta_rule", True, {}),
    ("hdla", True, {}), ("gated_delta_product", True, {}), ("gla", True, {}),
    ("dplr", True, {}), ("dplr", False, dict(R=2)), ("dplr", False, dict(Rkv=2))])
def test_which_ops_take_the_kernels(name, uses, ranks, rng):
    """Rank-1 forms (the delta family, GLA, rank-1 DPLR) run the factors kernels once forward
    and once backward, and not XLA's chunk_factors (whose saved products carry the name
    chunked.SAVED); DPLR of a higher rank keeps XLA's chunk_factors."""
    args = cast(make_inputs(name, rng, T=64, K=16, V=16, **ranks), jnp.float32)
    loss = lambda *a: jnp.sum(getattr(ops, name)(*a, backend="pallas")[0] ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args))
    kernels = re.findall(r"name=(dplr_factors_\w+)", text)
    assert kernels == (["dplr_factors_fwd", "dplr_factors_bwd"] if uses else []), kernels
    assert (chunked.SAVED in text) != uses


@pytest.mark.parametrize("name", ["gated_delta_rule", "kda", "gla", "dplr"])
def test_residuals_no_larger_than_xla_phase1(name, rng):
    """What the backward keeps (the bytes of jax's saved residuals) with the factors kernels
    is within 10% of XLA's checkpointed phase 1: the products are rematerialized, not saved
    (without that, gated_delta_rule kept 61% more: XLA's C x C intermediates per chunk)."""
    from jax._src.ad_checkpoint import saved_residuals  # no public API returns them

    args = cast(make_inputs(name, rng, B=1, T=512, H=1, K=64, V=64), jnp.float32)
    cpu = PLATFORM_CONFIGS["cpu"]
    sizes = []
    for cfg in (cpu, dataclasses.replace(cpu, factors=None)):
        fn = engine.kernel(name, cfg)
        loss = lambda *a, fn=fn: jnp.sum(fn(*a, scale=0.125, initial_state=None,
                                            cu_seqlens=None, chunk_size=64)[0])
        sizes.append(sum(a.size * a.dtype.itemsize for a, _ in saved_residuals(loss, *args)))
    assert sizes[0] <= 1.1 * sizes[1], sizes
