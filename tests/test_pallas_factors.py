"""The Pallas kernels for the rest of phase 1 (pallas/factors.py).

`factors.low_rank_factors` (CPU interpret mode) against XLA's `chunked.chunk_factors` on one
chunk: the factors (gamma, Z, W, X, Qs and O0, or without probed keys QF for the state pass)
and the cotangents of every input, for the delta family's form (probed keys), GLA's (plain
keys) and rank-1 DPLR's (both), per-channel, per-token and no decay, K and V over one and
several 64-column programs (padded), hard resets; float64 to rounding and float32 against
float64; which ops take the kernels; what the backward keeps.
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
from dplr_jax.ops.triangular import unit_lower_inverse

HIGHEST = jax.lax.Precision.HIGHEST
KERNELS = dict(interpret=True, precision=HIGHEST, exact=HIGHEST, launch=(Launch(), Launch()))
PRODUCTS = functools.partial(decayed.decayed_products, **KERNELS)


def chunk(rng, decay, C, K, V, strong=False, form="delta", m=1, rk=1):
    """One chunk of a form as float64 NumPy: q, g (None, [C] or [C, K]), E, y, P, F, Vk.
    "delta": E = beta k, y, P = k e^g (the probe reads the decayed state), no plain keys;
    "own": the same with P = k, the probe's decay left to the engine (own_decay, as the ops'
    forms build the delta family); "plain" (GLA): F = k, Vk = v only; "both" (DPLR): m probed
    keys E = a with y None (zero values) and probes P = b, rk plain keys F = k with values Vk;
    "both_y": the same with values y."""
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
    if form in ("both", "both_y"):
        b = rng.standard_normal((C, m, K)) / np.sqrt(K * m)
        a = rng.uniform(0.0, 2.0, (C, m, 1)) * b
        values = rng.standard_normal((C, m, V)) if form == "both_y" else None
        return (q, g, a, values, b, rng.standard_normal((C, rk, K)) / np.sqrt(K),
                rng.standard_normal((C, rk, V)))
    return q, g, (beta * k)[:, None], y, (k * (1.0 if form == "own" else eg))[:, None], None, None


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


def run_kernels(xs, cts, own=False):
    """The kernels' factors and input cotangents (jitted; CPU interpret mode)."""
    return jax.jit(lambda xs, cts: factors_and_pullback(
        functools.partial(factors.low_rank_factors, decayed=PRODUCTS, own_decay=own,
                          **KERNELS), xs, cts))(xs, cts)


def run_xla(xs, cts, own=False):
    """XLA's chunk_factors: the factors and input cotangents the kernels must reproduce."""
    return factors_and_pullback(functools.partial(chunked.chunk_factors, own_decay=own), xs,
                                cts)


def run_both(xs, cts, own=False):
    return run_kernels(xs, cts, own), run_xla(xs, cts, own)


def cotangents(rng, xs):
    """Random cotangents of the factors (gamma, Z, W, X, Qs, O0, QF) of a chunk's inputs;
    without probed keys None for W and O0, else for QF."""
    q, _, E, y, _, F, Vk = xs
    C, K = q.shape
    V = (y if Vk is None else Vk).shape[-1]
    ne, nf = (0 if x is None else C * x.shape[1] for x in (E, F))
    probed = E is not None
    shapes = [(K,), (ne + nf, K), (ne, K) if probed else None, (ne + nf, V), (C, K),
              (C, V) if probed else None, None if probed else (C, nf)]
    return tuple(None if s is None else rng.standard_normal(s) for s in shapes)


NAMES = ("gamma", "Z", "W", "X", "Qs", "O0", "QF")


def close(x, ref, tol, what):
    """assert_close, or exact zeros where the reference is all zeros (gamma after a reset
    of every channel)."""
    if not np.any(np.asarray(ref)):
        assert not np.any(np.asarray(x)), what
    else:
        assert_close(x, ref, tol, what)


def assert_float64_match(xs, cts, own=False):
    """Kernels vs chunk_factors in float64: every factor and every input cotangent to 1e-12."""
    (f_got, d_got), (f_ref, d_ref) = run_both(xs, cts, own)
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


@pytest.mark.parametrize("form", ["delta", "own", "plain", "both", "both_y"])
@pytest.mark.parametrize("decay", ["channel", "scalar", None])
@pytest.mark.parametrize("C,K,V,strong", [(64, 32, 16, False), (32, 100, 80, False),
                                          (16, 24, 200, True)])
def test_matches_xla_in_float64(form, decay, C, K, V, strong, rng, x64):
    """Same math as chunk_factors: every factor and every input cotangent to rounding. K and
    V of 100 / 128 / 200 run two to four 64-column programs, the padded ones included."""
    xs = cast(chunk(rng, decay, C, K, V, strong, form), jnp.float64)
    cts = cast(cotangents(rng, xs), jnp.float64)
    assert_float64_match(xs, cts, own=form == "own")


@pytest.mark.parametrize("form", ["delta", "both"])
def test_backward_in_32_key_columns(form, rng, x64):
    """At C = 64, where P's exponent sums are not q's (the delta form with P's own probe sums,
    as hdla's where probes are not one per query; dplr's form), the backward runs 32 key
    columns per program: at K = 100 four of them, the last padded. Every factor and input
    cotangent as chunk_factors, to rounding."""
    xs = cast(chunk(rng, "channel", 64, 100, 48, True, form), jnp.float64)
    fm = factors._Form(64, 1, 1 if form == "both" else 0, 1)
    assert factors._backward_key_block(fm, "channel", own=False) == 32
    assert factors._backward_key_block(fm, "channel", own=True) == 64  # kda: q's sums
    assert_float64_match(xs, cast(cotangents(rng, xs), jnp.float64))


@pytest.mark.parametrize("decay", ["channel", "scalar"])
@pytest.mark.parametrize("impl", ["xla", "kernels"])
def test_own_decay_is_the_probe_decayed_by_its_token(impl, decay, rng, x64):
    """own_decay with P = k (L from the same decays as QE, strictly below the diagonal; W
    from P's inclusive sums) is the engine with P = k e^g: every factor and the cotangents
    of q, g, E, y and k agree to float64 rounding, with hard resets."""
    q, g, E, y, k, _, _ = cast(chunk(rng, decay, 64, 32, 16, True, "own"), jnp.float64)
    cts = cast(cotangents(rng, (q, g, E, y, k, None, None)), jnp.float64)
    run = run_kernels if impl == "kernels" else run_xla
    own = run((q, g, E, y, k, None, None), cts, own=True)
    f = (chunked.chunk_factors if impl == "xla"
         else functools.partial(factors.low_rank_factors, decayed=PRODUCTS, **KERNELS))
    decayed_k = lambda g, k: k * jnp.exp(g if g.ndim == 2 else g[:, None])[:, None]
    ref, pull = jax.vjp(lambda q, g, E, y, k: f(q, g, E, y, decayed_k(g, k), None, None),
                        q, g, E, y, k)
    names = NAMES + tuple(f"d{n}" for n in "qgEyk")
    for name, u, v in zip(names, tuple(own[0]) + tuple(own[1]), tuple(ref) + pull(cts)):
        close(u, v, 1e-12, name)


@pytest.mark.parametrize("decay", [None, "scalar", "channel"])
def test_probed_keys_formed_from_beta(decay, rng, x64):
    """beta (the delta family's keys beta k formed on chip from E = k: a call without
    gradients, api.run_chunked) against E = beta k formed before: every factor and the
    cotangents of q, g, k, y and beta agree to float64 rounding, hard resets; the scalar
    products kernel scales its factors, the per-channel ones take the keys formed by XLA."""
    q, g, _, y, k, _, _ = cast(chunk(rng, decay, 64, 40, 24, True, "own"), jnp.float64)
    beta = jnp.asarray(rng.uniform(0.0, 2.0, 64))
    own = decay is not None

    def run(on_chip):
        def f(q, g, k, y, beta):
            E = k if on_chip else beta[:, None, None] * k
            return factors.low_rank_factors(q, g, E, y, k, None, None, beta if on_chip else None,
                                            decayed=PRODUCTS, own_decay=own, **KERNELS)
        args = (q, g, k, y, beta) if g is not None else (q, k, y, beta)
        fn = f if g is not None else lambda q, k, y, beta: f(q, None, k, y, beta)
        out, pull = jax.vjp(fn, *args)
        cts = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(
            x.shape)), out)
        return out, pull(cts)

    (out, grads), (ref, ref_grads) = run(True), run(False)
    for name, u, v in zip(NAMES, out, ref):
        if v is None:
            assert u is None, name
        else:
            close(u, v, 1e-12, name)
    names = ("dq",) + (() if g is None else ("dg",)) + ("dk", "dy", "dbeta")
    assert len(grads) == len(names)
    for name, u, v in zip(names, grads, ref_grads):
        close(u, v, 1e-12, name)


@pytest.mark.parametrize("form", ["both", "both_y"])
@pytest.mark.parametrize("decay", ["channel", "scalar"])
@pytest.mark.parametrize("C,m,rk", [(32, 2, 1), (32, 1, 2), (32, 2, 4), (16, 4, 2)])
def test_ranks_match_xla_in_float64(form, decay, C, m, rk, rng, x64):
    """DPLR of ranks 2 and 4 (m probed keys, rk plain keys per token; rows token-major): every
    factor and input cotangent as chunk_factors, to rounding, hard resets, K = 100 padded."""
    xs = cast(chunk(rng, decay, C, 100, 48, True, form, m, rk), jnp.float64)
    assert factors.takes(xs[2], xs[5])
    assert_float64_match(xs, cast(cotangents(rng, xs), jnp.float64))


def test_which_forms_the_kernels_take():
    """1, 2 or 4 keys of each kind per token; beyond one, at most 128 rows per chunk."""
    x = lambda C, r: jnp.zeros((C, r, 8))
    assert factors.takes(x(256, 1), x(256, 1))
    assert factors.takes(x(64, 2), None) and factors.takes(None, x(32, 4))
    assert not factors.takes(x(64, 4), x(64, 1))  # 256 probed rows
    assert not factors.takes(x(32, 3), x(32, 1))  # 96 rows: not a power of two
    assert not factors.takes(x(32, 1), x(32, 8))


@pytest.mark.parametrize("form,decay", [("delta", "channel"), ("delta", "scalar"),
                                        ("own", "channel"), ("own", "scalar"),
                                        ("plain", "channel"), ("both", "channel")])
def test_float32_against_float64(form, decay, rng):
    """float32 kernels vs the float64 XLA version (hard resets): relative RMSE < 1e-5."""
    xs = chunk(rng, decay, 64, 64, 64, strong=True, form=form)
    cts = cotangents(rng, xs)
    own = form == "own"
    with jax.enable_x64(True):
        f_ref, d_ref = run_xla(cast(xs, jnp.float64), cast(cts, jnp.float64), own)
        f_ref, d_ref = jax.tree.map(np.asarray, (f_ref, d_ref))
    f_got, d_got = run_kernels(cast(xs, jnp.float32), cast(cts, jnp.float32), own)
    names = NAMES + tuple(f"d{n}" for n, x in zip(("q", "g", "E", "y", "P", "F", "Vk"), xs)
                          if x is not None)
    pairs = [(n, u, v) for n, u, v in zip(names, tuple(f_got) + tuple(d_got),
                                          tuple(f_ref) + tuple(d_ref)) if v is not None]
    assert len(pairs) == len(names) - 1 - (xs[2] is None)  # QF or O0, and W without E
    for name, u, v in pairs:
        assert u.dtype == jnp.float32
        close(u, v, 1e-5, name)


@pytest.mark.parametrize("name,uses,ranks", [
    ("kda", True, {}), ("gated_delta_rule", True, {}), ("delta_rule", True, {}),
    ("hdla", True, {}), ("gated_delta_product", True, {}), ("gla", True, {}),
    ("dplr", True, {}), ("dplr", True, dict(R=2)), ("dplr", True, dict(Rkv=2)),
    ("dplr", False, dict(R=3)), ("dplr", False, dict(R=4))])
def test_which_ops_take_the_kernels(name, uses, ranks, rng):
    """Every op but DPLR of rank 3, or of rank 4 at chunk 64, runs the factors kernels once
    forward and once backward, and not XLA's chunk_factors (whose saved products carry the
    name chunked.SAVED)."""
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


@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_ut_inverse_kernel(n, rng, x64):
    """The UT inverse kernel (forward substitution on 16-row blocks, block merges) against
    NumPy's inverse in float64, and in float32 against triangular.py's XLA version where the
    powers of N are large (repeated keys with beta near 1; triangular.py says why the matmul
    product of powers is not used)."""
    cfg = factors._Cfg(True, HIGHEST, HIGHEST, Launch(), Launch())
    inverse = jax.jit(jax.vmap(lambda x: factors._inverse(x, cfg)))
    N = np.tril(0.3 * rng.standard_normal((3, n, n)), -1)
    got = np.asarray(inverse(jnp.asarray(N)))
    ref = np.linalg.inv(np.eye(n) + N)
    assert np.all(np.triu(got, 1) == 0)
    assert_close(got, ref, 1e-12, "Tinv")
    k = np.repeat(rng.standard_normal((n // 4, 8)), 4, axis=0)  # each key four times
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    hard = np.tril(0.99 * k @ k.T, -1)[None]
    ref = np.linalg.inv(np.eye(n) + hard)
    got32 = np.asarray(inverse(jnp.asarray(hard, jnp.float32)))
    xla32 = np.asarray(unit_lower_inverse(jnp.asarray(hard, jnp.float32)))
    assert np.abs(np.linalg.matrix_power(hard[0], n // 4)).max() > 10
    assert_close(got32, ref, 1e-5, "Tinv float32")
    assert np.sqrt(np.mean((got32 - ref) ** 2)) <= 2 * np.sqrt(np.mean((xla32 - ref) ** 2)) + 1e-12
