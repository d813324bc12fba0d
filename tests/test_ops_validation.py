"""Bad inputs raise a ValueError naming the argument; NaN propagates; strong decay is safe.

Validation runs before any computation, so these tests are cheap except the last group,
which compares float32 xla against the float64 reference under decays 10x stronger than
usual and hard resets (log decay -1000) in packed sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import (ALL_OPS, DECAY_OPS, GROUPED_OPS, assert_close, call,
                         call_vjp, cast, check_vjp, make_inputs, make_state, random_cotangents)
from dplr_jax import ops
from dplr_jax.ops import affine

# Every test here compares against a float64 reference: run them all with x64 on.
pytestmark = pytest.mark.usefixtures("x64")


def _names(name):
    return ("q", "k", "v") + ops.api.SPECS[name].gates


def _inputs(name, rng, T=20, **kw):
    """float32 inputs, H = 2 key heads (HV = 4 value heads where grouping exists; DPLR rank 2)."""
    kw = dict(G=2, **kw) if name in GROUPED_OPS else kw
    if name == "dplr":
        kw = dict(R=2, Rkv=2, **kw)
    return cast(make_inputs(name, rng, T=T, **kw), jnp.float32)


def _raises(arg, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises a ValueError whose message names `arg` (quoted)."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert f"'{arg}'" in str(info.value), str(info.value)
    return str(info.value)


def _replace(args, i, x):
    return args[:i] + (x,) + args[i + 1 :]


@pytest.mark.parametrize("name", ALL_OPS)
def test_wrong_rank_and_shape_name_the_argument(name, rng):
    args = _inputs(name, rng)
    op = ops.OPS[name]
    for i, arg in enumerate(_names(name)):
        x = args[i]
        msg = _raises(arg, op, *_replace(args, i, x[..., None]))  # one axis too many
        assert str(tuple(x.shape) + (1,)) in msg  # the shape it got
        assert "rank" in msg
        _raises(arg, op, *_replace(args, i, x[..., 0]))  # one axis too few
        if i == 0:
            continue  # q binds the dimensions; a wrong q size is reported at the next argument
        wrong_T = jnp.concatenate([x, x[:, :1]], axis=1)
        msg = _raises(arg, op, *_replace(args, i, wrong_T))
        assert str(tuple(wrong_T.shape)) in msg
    k = args[1]
    wrong_K = k[..., :-1]  # K differs from q's
    assert "expected" in _raises("k", op, *_replace(args, 1, wrong_K))


@pytest.mark.parametrize("name", GROUPED_OPS)
def test_value_heads_not_a_multiple_of_key_heads(name, rng):
    args = _inputs(name, rng)  # H = 2, HV = 4
    three = tuple(x if i < 2 else x[:, :, :3] for i, x in enumerate(args))  # HV = 3
    msg = _raises("v", ops.OPS[name], *three)
    assert "multiple" in msg
    # The gates must have the same HV as v.
    mixed = _replace(args, len(args) - 1, args[-1][:, :, :2])
    _raises(_names(name)[-1], ops.OPS[name], *mixed)


@pytest.mark.parametrize("name", ALL_OPS)
def test_non_float_dtype_names_the_argument(name, rng):
    args = _inputs(name, rng)
    for i in (0, len(args) - 1):  # q and the last gate
        msg = _raises(_names(name)[i], ops.OPS[name], *_replace(args, i, args[i].astype(jnp.int32)))
        assert "int32" in msg


@pytest.mark.parametrize("chunk_size", [8, 48, 0, 100, 32.0])
def test_bad_chunk_size(chunk_size, rng):
    _raises("chunk_size", ops.kda, *_inputs("kda", rng), chunk_size=chunk_size)


def test_unknown_backend(rng):
    _raises("backend", ops.gla, *_inputs("gla", rng), backend="cuda")


@pytest.mark.parametrize("cu", [[0, 30, 20, 40], [0, 10, 30], [5, 10, 40], [[0, 40]],
                                [0.0, 40.0], [40]],
                         ids=["non-monotone", "not-ending-at-T", "not-starting-at-0", "2-d",
                              "float", "too-short"])
def test_bad_cu_seqlens(cu, rng):
    args = cast(make_inputs("kda", rng, B=1, T=40), jnp.float32)
    _raises("cu_seqlens", ops.kda, *args, cu_seqlens=np.asarray(cu))


def test_cu_seqlens_needs_batch_one(rng):
    args = _inputs("gla", rng)  # B = 2
    msg = _raises("cu_seqlens", ops.gla, *args, cu_seqlens=np.asarray([0, 5, 20], np.int32))
    assert "B == 1" in msg


@pytest.mark.parametrize("name", ["kda", "dplr", "gated_delta_product"])
def test_initial_state_of_wrong_shape_or_dtype(name, rng):
    args = _inputs(name, rng)
    h0 = jnp.asarray(make_state(args, rng), jnp.float32)
    op = ops.OPS[name]
    bad_shapes = [h0[:1], h0[..., :-1], h0[:, :1], h0[0]]
    for bad in bad_shapes:
        msg = _raises("initial_state", op, *args, initial_state=bad)
        assert str(tuple(bad.shape)) in msg and str(tuple(h0.shape)) in msg
    _raises("initial_state", op, *args, initial_state=h0.astype(jnp.int32))
    # With cu_seqlens, N is the number of sequences, not B.
    packed = tuple(None if x is None else x[:1] for x in args)
    _raises("initial_state", op, *packed, initial_state=h0[:1],
            cu_seqlens=np.asarray([0, 7, 20], np.int32))


@pytest.mark.parametrize("name", DECAY_OPS)
def test_positive_log_decay(name, rng):
    args = _inputs(name, rng)
    i = _names(name).index("log_decay")
    g = np.asarray(args[i]).copy()
    g[0, 3] = 0.5
    bad = _replace(args, i, jnp.asarray(g))
    _raises("log_decay", ops.OPS[name], *bad)
    _raises("log_decay", jax.jit(lambda: ops.OPS[name](*bad)))  # concrete, closed over by jit


@pytest.mark.parametrize("name", ALL_OPS)
def test_step_with_wrong_state_shape(name, rng):
    args = tuple(None if x is None else x[:, 0] for x in _inputs(name, rng))
    h0 = jnp.asarray(make_state(_inputs(name, rng), rng), jnp.float32)
    step = getattr(ops, name + "_step")
    o, S = step(*args, h0)  # the right shape works
    assert S.shape == h0.shape
    for bad in (h0[..., :-1], h0[:1], h0[:, :1], h0[0], None):
        _raises("state", step, *args, bad)


def test_affine_transition_unknown_op(rng):
    args = _inputs("gla", rng)
    _raises("op", affine.transition, "mamba", *args)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_nan_in_gives_nan_out(name, backend, rng):
    """A NaN in one key channel of one token (batch row 0, key head 0, t0 = 21) makes every
    output of the value heads reading that key head NaN from t0 on, and the final state; the
    other batch row and heads, and chunks before t0's chunk, stay finite."""
    args = _inputs(name, rng, T=50)
    k = np.asarray(args[1]).copy()
    t0, chunk = 21, 16
    k[(0, t0, 0) + (0,) * (k.ndim - 3)] = np.nan
    args = _replace(args, 1, jnp.asarray(k))
    h0 = jnp.asarray(make_state(args, rng), jnp.float32)
    o, S = (np.asarray(x) for x in call(name, args, h0, backend=backend, chunk_size=chunk))
    G = o.shape[2] // args[0].shape[2]
    hit = slice(0, G)  # the value heads that read key head 0
    assert np.isnan(o[0, t0:, hit]).all()
    assert np.isnan(S[0, hit]).any()
    assert np.isfinite(o[0, : t0 // chunk * chunk]).all()
    assert np.isfinite(o[1]).all() and np.isfinite(S[1]).all()
    assert np.isfinite(o[0, :, G:]).all() and np.isfinite(S[0, G:]).all()


CU_STRONG = np.asarray([0, 7, 40, 40, 90], np.int32)  # varlen, with an empty sequence


def _strong_decay_inputs(name, rng, resets):
    """Packed inputs (B = 1, T = 90) with log decays x10, optionally -1000 at three tokens
    just after two sequence starts (so most of their chunks follow a reset)."""
    args = list(_inputs(name, rng, B=1, T=int(CU_STRONG[-1])))
    i = _names(name).index("log_decay")
    g = 10.0 * np.asarray(args[i], np.float64)
    if resets:
        g[:, [9, 41, 42]] = -1000.0
    args[i] = jnp.asarray(g, jnp.float32)
    return tuple(args), jnp.asarray(make_state(args, rng, N=len(CU_STRONG) - 1), jnp.float32)


def _forward_against_reference(name, args, h0):
    o, S = call(name, args, h0, backend="xla", chunk_size=32, cu_seqlens=CU_STRONG)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(S)).all()
    o_ref, S_ref = call(name, cast(args, jnp.float64), cast(h0, jnp.float64),
                        backend="reference", cu_seqlens=CU_STRONG)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(S, S_ref, 1e-5, "final state")


@pytest.mark.parametrize("name", DECAY_OPS)
def test_strong_decay_matches_reference(name, rng):
    _forward_against_reference(name, *_strong_decay_inputs(name, rng, resets=False))


def test_strong_decay_gradients(rng):
    """KDA's gradients w.r.t. every input and the initial state under x10 decays, varlen."""
    name = "kda"
    args, h0 = _strong_decay_inputs(name, rng, resets=False)
    o, S = call(name, args, h0, backend="xla", chunk_size=32, cu_seqlens=CU_STRONG)
    check_vjp(name, args, h0, random_cotangents(rng, o, S), 1e-5, 1e-5, lambda _: 1e-5,
              chunk_size=32, cu_seqlens=CU_STRONG)


@pytest.mark.parametrize("name", DECAY_OPS)
def test_hard_resets_stay_finite(name, rng):
    """Outputs and final states of the xla path stay finite with log decays of -1000, and so
    do the gradients (checked for KDA, whose compile is the cheapest)."""
    args, h0 = _strong_decay_inputs(name, rng, resets=True)
    o, S = call(name, args, h0, backend="xla", chunk_size=32, cu_seqlens=CU_STRONG)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(S)).all()
    if name == "kda":
        out = call_vjp(name, args, h0, *cast(random_cotangents(rng, o, S), jnp.float32),
                       backend="xla", chunk_size=32, cu_seqlens=CU_STRONG)
        for x in [out[3]] + [d for d in out[2] if d is not None]:
            assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("name", ["gla", "kda", "dplr"])
def test_hard_resets_match_reference(name, rng):
    _forward_against_reference(name, *_strong_decay_inputs(name, rng, resets=True))
