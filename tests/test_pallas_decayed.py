"""The Pallas kernels for phase 1's decayed products of per-channel decays (pallas/decayed.py).

The kernels (CPU interpret mode) against XLA's `chunked.decayed_products` on one chunk: values
and every cotangent (X, Y and the log decays, whose gradient the kernel forms from sums over
its sub-chunks), chunks of 1, 2 and 4 sub-chunks, several probes / keys per token, K padded,
hard resets, per-channel and scalar decays, the diagonal kernels at every row group, query
sides and the probe products they stand for; float32 against float64;
backend="pallas" through them against the float64 reference at chunk 64 with hard resets;
which ops use them.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import assert_close, cast, make_inputs, make_state
from dplr_jax import ops
from dplr_jax.ops import chunked
from dplr_jax.ops.pallas import decayed
from dplr_jax.ops.pallas.state_pass import Launch
from test_pallas_ops import check_pallas_vjp

KERNEL = functools.partial(decayed.decayed_products, interpret=True,
                           precision=jax.lax.Precision.HIGHEST, exact=jax.lax.Precision.HIGHEST,
                           launch=(Launch(), Launch()),
                           scalar_launch=(Launch(), Launch()))


def chunk(rng, C=64, a=1, b=1, K=32, strong=False, scalar=False):
    """X [C, a, K], Y [C, b, K], log decays g [C, K] (scalar: [C]) as float64 NumPy."""
    g = -np.logaddexp(0.0, -(1.5 * rng.standard_normal((C,) if scalar else (C, K)) + 3.0))
    if strong:
        g = np.where(rng.random(g.shape) < 0.05, -1000.0, 10.0 * g)
        g[C // 2 + 3] = -1000.0
    return (rng.standard_normal((C, a, K)), rng.standard_normal((C, b, K)), g)


def value_and_pullback(fn, xs, ct):
    out, pull = jax.vjp(fn, *xs)
    return (out,) + pull(ct)


@pytest.mark.parametrize("C,a,b,K,strong", [(64, 1, 1, 32, False), (64, 1, 1, 32, True),
                                            (32, 2, 1, 40, False), (16, 1, 3, 16, True),
                                            (64, 1, 2, 24, True), (32, 2, 1, 100, True),
                                            (64, 2, 1, 72, False), (128, 2, 1, 40, True)])
def test_matches_xla_in_float64(C, a, b, K, strong, rng, x64):
    """Same math as XLA's version: values and cotangents agree to rounding (float64); K = 100:
    two programs of the backward's key-column blocks, the padded columns included; C >= 64:
    the backward's pairs across 32-row blocks (_cross_blocks), at C = 128 with blocks between
    them; K = 72 (padded to 128) in two column blocks of 64 there."""
    xs = cast(chunk(rng, C=C, a=a, b=b, K=K, strong=strong), jnp.float64)
    ct = jnp.asarray(rng.standard_normal((C, a, C, b)))
    ref = value_and_pullback(chunked.decayed_products, xs, ct)
    got = jax.jit(lambda ct, *x: value_and_pullback(KERNEL, x, ct))(ct, *xs)
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.shape == v.shape and u.dtype == jnp.float64
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_diagonal_kernels_at_fewer_rows_per_program(rows, rng, x64, monkeypatch):
    """The diagonal kernels at the GPU's row groups (the interpreter runs whole sub-chunks):
    a group's first and last rows and the sub-chunk's last row (the key factors); hard
    resets."""
    monkeypatch.setattr(decayed, "INTERPRET_ROWS", rows)
    xs = cast(chunk(rng, C=32, K=24, strong=True), jnp.float64)
    ct = jnp.asarray(rng.standard_normal((32, 1, 32, 1)))
    ref = value_and_pullback(chunked.decayed_products, xs, ct)
    got = jax.jit(lambda ct, *x: value_and_pullback(KERNEL, x, ct))(ct, *xs)
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("C,a,b,K,strong", [(64, 1, 2, 40, False), (64, 1, 1, 32, True),
                                            (16, 2, 1, 16, True), (32, 1, 1, 100, True)])
def test_scalar_decays_match_xla_in_float64(C, a, b, K, strong, rng, x64):
    """One log decay per token (gated_delta_rule's products): the scalar kernels (K = 100:
    two programs of the backward, their shares of dg added)."""
    xs = cast(chunk(rng, C=C, a=a, b=b, K=K, strong=strong, scalar=True), jnp.float64)
    ct = jnp.asarray(rng.standard_normal((C, a, C, b)))
    ref = value_and_pullback(chunked.decayed_products, xs, ct)
    fn = lambda ct, *x: value_and_pullback(KERNEL, x, ct)
    text = str(jax.make_jaxpr(fn)(ct, *xs))
    assert "dplr_decayed_scalar_fwd" in text and "dplr_decayed_scalar_bwd" in text
    got = jax.jit(fn)(ct, *xs)
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.shape == v.shape and u.dtype == jnp.float64
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("every", [1, 2])
def test_no_decay_matches_xla_in_float64(every, rng, x64):
    """g None (delta_rule): the scalar kernels with factors of 1, two query sides (the second
    strict) against two key ranks, one side with the rows of every `every`-th token; values
    and cotangents as XLA's products (K = 40, padded)."""
    X, Y, _ = chunk(rng, C=64, a=1, b=2, K=40)
    q, p = jnp.asarray(X[every - 1::every]), jnp.asarray(rng.standard_normal((64, 1, 40)))
    Y = jnp.asarray(Y)
    cts = (jnp.asarray(rng.standard_normal((64 // every, 1, 64, 2))),
           jnp.asarray(rng.standard_normal((64, 1, 64, 2))))
    run = lambda fn: jax.jit(lambda cts, *x: value_and_pullback(
        lambda q, p, Y: fn((q, p), Y, None, False, (False, True)), x, cts))(cts, q, p, Y)
    got, ref = run(KERNEL), run(chunked.decayed_products)
    for name, u, v in zip(("QE", "L", "dq", "dp", "dY"), got[0] + got[1:], ref[0] + ref[1:]):
        assert u.shape == v.shape and u.dtype == jnp.float64
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
@pytest.mark.parametrize("n", [2, 4])
def test_rows_of_every_nth_token(n, scalar, rng, x64):
    """X with the rows of the last of every n tokens only (the multi-factor ops' queries; the
    scalar kernel takes them as they are, the per-channel ones one row per token): the rows
    n - 1, 2n - 1, ... of the product whose other rows of X are zero; hard resets."""
    X, Y, g = cast(chunk(rng, C=64, K=40, strong=True, scalar=scalar), jnp.float64)
    X = X[n - 1::n]
    ct = jnp.asarray(rng.standard_normal((64 // n, 1, 64, 1)))
    full = lambda X, Y, g: chunked.decayed_products(
        jnp.zeros((64,) + X.shape[1:], X.dtype).at[n - 1::n].set(X), Y, g)[n - 1::n]
    ref = value_and_pullback(full, (X, Y, g), ct)
    for fn in (KERNEL, chunked.decayed_products):
        got = jax.jit(lambda ct, *x: value_and_pullback(fn, x, ct))(ct, X, Y, g)
        for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
            assert u.shape == v.shape
            assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("C,a,b,K", [(64, 1, 1, 32), (32, 2, 1, 100), (16, 1, 3, 16),
                                     (128, 2, 1, 72)])
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_bounded_path_matches_exact_in_float64(impl, C, a, b, K, rng, x64):
    """bounded=True (log decays >= MIN_BOUND = -5, a third of them at the bound, so sub-chunk
    sums reach -80) against the exact path: values and cotangents to float64 rounding (C =
    128: 32-row blocks with blocks between them; two query sides: 32 key columns per
    program, four of them over K = 72 padded to 128)."""
    X, Y, g = chunk(rng, C=C, a=a, b=b, K=K)
    g = chunked.MIN_BOUND * rng.random(g.shape) ** 0.5
    g = np.where(rng.random(g.shape) < 1 / 3, chunked.MIN_BOUND, g)
    xs = cast((X, Y, g), jnp.float64)
    ct = jnp.asarray(rng.standard_normal((C, a, C, b)))
    ref = value_and_pullback(chunked.decayed_products, xs, ct)
    fn = KERNEL if impl == "pallas" else chunked.decayed_products
    got = jax.jit(lambda ct, *x: value_and_pullback(
        lambda *y: fn(*y, True), x, ct))(ct, *xs)
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert_close(u, v, 1e-12, name)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
def test_float32_against_float64_with_hard_resets(scalar, rng, x64):
    xs = chunk(rng, strong=True, scalar=scalar)
    ct = rng.standard_normal((64, 1, 64, 1))
    ref = value_and_pullback(chunked.decayed_products,
                             cast(xs, jnp.float64), jnp.asarray(ct))
    got = jax.jit(lambda ct, *x: value_and_pullback(KERNEL, x, ct))(
        *cast((ct,) + xs, jnp.float32))
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(u))), name
        assert_close(u, v, 1e-5, name)


@pytest.mark.parametrize("impl", ["pallas", "pallas-bounded", "xla-bounded"])
def test_float32_log_decay_gradient_when_every_decay_is_strong(impl, rng, x64):
    """Every log decay -5 (the bound): the pairs without decay must not enter d(log decay),
    which is ~e^-5 times smaller than the products (through them: 4e-5 to 1.4e-4 relative
    RMSE in float32). Values and all cotangents within 1e-5 of float64."""
    X, Y, _ = chunk(rng)
    g = np.full((64, 32), chunked.MIN_BOUND)
    ct = rng.standard_normal((64, 1, 64, 1))
    ref = value_and_pullback(chunked.decayed_products,
                             cast((X, Y, g), jnp.float64), jnp.asarray(ct))
    bounded = impl.endswith("bounded")
    fn = KERNEL if impl.startswith("pallas") else chunked.decayed_products
    got = jax.jit(lambda ct, *x: value_and_pullback(lambda *y: fn(*y, bounded), x, ct))(
        *cast((ct, X, Y, g), jnp.float32))
    for name, u, v in zip(("D", "dX", "dY", "dg"), got, ref):
        assert u.dtype == jnp.float32
        assert_close(u, v, 1e-5, name)


def test_vmapped_over_chunks(rng):
    """Under vmap (as phase 1 calls it, once per batch row, head and chunk)."""
    xs = cast(tuple(np.stack(z) for z in zip(*(chunk(rng, C=32) for _ in range(3)))),
              jnp.float32)
    got = jax.jit(jax.vmap(KERNEL))(*xs)
    ref = jax.vmap(chunked.decayed_products)(*xs)
    assert_close(got, ref, 1e-5, "D")


@pytest.mark.parametrize("name", ["kda", "gla", "gated_delta_rule"])
def test_backend_pallas_chunk_64_hard_resets(name, rng, x64):
    """backend="pallas" (four sub-chunks per chunk through the kernels) vs the float64
    reference at T=130: gates x10 with 5% hard resets, an initial state, every gradient."""
    args = list(make_inputs(name, rng, B=1, T=130, K=32, V=32, G=2 if name == "kda" else 1))
    g = 10 * args[3]
    args[3] = np.where(rng.random(g.shape) < 0.05, -1000.0, g)
    args = cast(tuple(args), jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=64)


def test_used_for_per_channel_and_scalar_decays():
    def jaxpr(name):
        args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=20), jnp.float32)
        fn = lambda *a: ops.OPS[name](*a, backend="pallas", chunk_size=16)[0].sum()
        return str(jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args))

    for name in ("kda", "gla", "dplr", "hdla"):
        text = jaxpr(name)
        assert "dplr_decayed_fwd" in text and "dplr_decayed_bwd" in text, name
        assert "dplr_decayed_scalar" not in text, name
    for name in ("gated_delta_rule", "gated_delta_product"):
        text = jaxpr(name)
        assert "dplr_decayed_scalar_fwd" in text and "dplr_decayed_scalar_bwd" in text, name
        assert "dplr_decayed_fwd" not in text, name
    # without decay: the scalar kernels, with factors of 1
    text = jaxpr("delta_rule")
    assert "dplr_decayed_scalar_fwd" in text and "dplr_decayed_scalar_bwd" in text
    assert "dplr_decayed_fwd" not in text


def sides_chunk(rng, scalar, every):
    """Two query sides against one key rank: q with the rows of every `every`-th token and
    p with a row per token (as phase 1's QE and L), hard resets; NumPy float64."""
    X, Y, g = chunk(rng, C=64, a=1, b=1, K=40, strong=True, scalar=scalar)
    return X[every - 1::every], rng.standard_normal((64, 1, 40)), Y, g


@pytest.mark.parametrize("bounded", [False, True], ids=["exact", "bounded"])
@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
@pytest.mark.parametrize("every", [1, 2])
def test_query_sides_match_xla_in_float64(every, scalar, bounded, rng, x64):
    """X a tuple of query sides (q and p, the second strict: s < t with the decay to t) in one
    pass: each side's values and every cotangent as XLA's products of the sides one by one."""
    q, p, Y, g = cast(sides_chunk(rng, scalar, every), jnp.float64)
    if bounded:
        g = jnp.maximum(g, chunked.MIN_BOUND)
    cts = (jnp.asarray(rng.standard_normal((64 // every, 1, 64, 1))),
           jnp.asarray(rng.standard_normal((64, 1, 64, 1))))
    run = lambda fn: jax.jit(lambda cts, *x: value_and_pullback(
        lambda q, p, Y, g: fn((q, p), Y, g, bounded, (False, True)), x, cts))(
            cts, q, p, Y, g)
    got, ref = run(KERNEL), run(chunked.decayed_products)
    for name, u, v in zip(("QE", "L"), got[0], ref[0]):
        assert u.shape == v.shape
        assert_close(u, v, 1e-12, name)
    assert not np.any(np.asarray(np.diagonal(got[0][1][:, 0, :, 0])))  # strict
    for name, u, v in zip(("dq", "dp", "dY", "dg"), got[1:], ref[1:]):
        assert_close(u, v, 1e-12, name)


def probe_products(P, Y, g):
    """A probe reads the state before its token's decay: [t, a, s, b] sum_k P[t, a, k] Y[s, b, k]
    e^{sum of g_u over s < u < t}, for s < t, by masked sums of the tokens (float64)."""
    C = Y.shape[0]
    t = np.arange(C)
    span = ((t[None, :, None] < t[None, None, :]) & (t[None, None, :] < t[:, None, None]))
    g = g if g.ndim == 2 else np.broadcast_to(g[:, None], (C, Y.shape[-1]))
    decay = np.exp(np.einsum("tsu,uk->tsk", span.astype(float), g)) * (t[:, None] > t)[..., None]
    return np.einsum("tak,sbk,tsk->tasb", P, Y, decay)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
def test_probe_products_as_query_sides(scalar, rng, x64):
    """The identities chunked.intra_products rests on, in XLA's version and the kernels', hard
    resets: a probe's products are a query's of the token before (P moved up a row, the
    product moved back down), and with the probe p e^g carrying its own token's decay
    (own_decay) p's strict products."""
    _, p, Y, g = sides_chunk(rng, scalar, 1)
    eg = np.exp(g if g.ndim == 2 else g[:, None])[:, None]
    for fn in (chunked.decayed_products, KERNEL):
        run = jax.jit(lambda *x: fn(*x[:3], strict=x[3]), static_argnums=3)
        got = chunked._rows_down(run(chunked._rows_up(jnp.asarray(p)), Y, g, False))
        assert_close(got, probe_products(p, Y, g), 1e-12, "moved up")
        assert_close(run(p, Y, g, True), probe_products(p * eg, Y, g), 1e-12, "own decay")


def test_query_sides_run_in_one_kernel_pass(rng):
    """Both sides (and a DPLR probe's two ranks) take one pass of the kernels per key rank:
    per-channel decays the diagonal and per-chunk kernels forward and backward, scalar ones
    the scalar forward kernel (its backward runs per side)."""
    q, p, Y, g = cast(sides_chunk(rng, False, 2), jnp.float32)

    def count(fn, *x):
        text = str(jax.make_jaxpr(jax.grad(lambda *x: sum(
            jnp.sum(d) for d in jax.tree.leaves(fn(*x))), argnums=tuple(range(len(x)))))(*x))
        return collections.Counter(re.findall(r"name=(dplr_decayed_\w+)", text))

    once = dict.fromkeys(("dplr_decayed_diag", "dplr_decayed_fwd", "dplr_decayed_diag_bwd",
                          "dplr_decayed_bwd"), 1)
    sides = lambda q, p, Y, g: KERNEL((q, p), Y, g, False, (False, True))
    assert count(sides, q, p, Y, g) == once
    ranks = lambda P, Y, g: KERNEL(P, Y, g)
    assert count(ranks, jnp.concatenate([p, p], axis=1), Y, g) == once
    assert count(sides, q, p, Y, g[:, 0]) == {"dplr_decayed_scalar_fwd": 1,
                                              "dplr_decayed_scalar_bwd": 2}
