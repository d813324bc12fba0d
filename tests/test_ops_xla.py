"""The chunked XLA backend against the token-by-token reference.

float64: agreement to rounding (< 1e-10) over chunk sizes 16/32/64 with T not a multiple of
the chunk, initial state and final state, grouped value heads, every DPLR rank combination.
float32 (and bf16 for KDA): outputs, final states and the gradients w.r.t. every input and
the initial state against the float64 reference on the same (rounded) inputs.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from _ops_inputs import (assert_close, call, cast, check_vjp, make_inputs, make_state,
                         random_cotangents)
from dplr_jax import ops

# Every test here compares against a float64 reference: run them all with x64 on.
pytestmark = pytest.mark.usefixtures("x64")

F64_CASES = [
    ("gla", {}),
    ("delta_rule", dict(G=2)),
    ("gated_delta_rule", dict(G=2)),
    ("kda", dict(G=2, K=16, V=8)),
    ("hdla", {}),
    ("gated_delta_product", dict(n=1)),
    ("gated_delta_product", dict(n=2)),
    ("gated_delta_product", dict(n=3, K=16)),
    # DPLR: every (R, Rkv) pair once, log_decay given and None alternating.
    ("dplr", dict(R=1, Rkv=1)),
    ("dplr", dict(R=1, Rkv=2, decay=False)),
    ("dplr", dict(R=2, Rkv=1, decay=False)),
    ("dplr", dict(R=2, Rkv=2, K=16)),
    ("dplr", dict(R=3, Rkv=1)),
    ("dplr", dict(R=3, Rkv=2, decay=False, K=32, V=8)),
]


def _case_id(case):
    name, kw = case
    return name + "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("case", F64_CASES, ids=_case_id)
def test_xla_matches_reference_float64(case, rng):
    name, kw = case
    args = cast(make_inputs(name, rng, T=100, **kw), jnp.float64)
    h0 = cast(make_state(args, rng), jnp.float64)
    o_ref, S_ref = call(name, args, h0, backend="reference")
    assert o_ref.dtype == S_ref.dtype == jnp.float64
    for chunk_size in (16, 32, 64):
        o, S = call(name, args, h0, backend="xla", chunk_size=chunk_size)
        assert o.dtype == S.dtype == jnp.float64
        assert_close(o, o_ref, 1e-10, f"o (chunk {chunk_size})")
        assert_close(S, S_ref, 1e-10, f"final state (chunk {chunk_size})")


def test_numpy_inputs_and_defaults(rng):
    """NumPy inputs and initial state are accepted; without initial_state the state starts at
    zero, and final_state is None unless output_final_state=True."""
    args = make_inputs("kda", rng, T=40)  # float64 NumPy
    h0 = make_state(args, rng)
    o, S = jax.jit(lambda: ops.kda(*args, initial_state=h0, output_final_state=True,
                                   backend="xla", chunk_size=16))()
    o_ref, S_ref = call("kda", cast(args, jnp.float64), jnp.asarray(h0), backend="reference")
    assert_close(o, o_ref, 1e-10, "o")
    assert_close(S, S_ref, 1e-10, "final state")
    o, S = jax.jit(lambda: ops.kda(*args, backend="xla", chunk_size=16))()
    assert S is None
    o_ref, _ = call("kda", cast(args, jnp.float64), None, backend="reference")
    assert_close(o, o_ref, 1e-10, "o from a zero state")


GRAD_CASES = [
    ("gla", {}),
    ("delta_rule", dict(G=2)),
    ("gated_delta_rule", dict(G=2)),
    ("kda", dict(G=2)),
    ("hdla", {}),
    ("gated_delta_product", dict(n=2)),
    ("dplr", dict(R=2, Rkv=2)),
    ("dplr", dict(R=3, Rkv=1, decay=False)),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_float32_forward_and_gradients(case, rng):
    name, kw = case
    args = cast(make_inputs(name, rng, T=50, **kw), jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    # With x64 on, float32 inputs must still compute in float32 (no float64 array anywhere;
    # weakly typed float64 scalar literals are fine), or this test proves nothing.
    jaxpr = jax.make_jaxpr(lambda a, h: ops.OPS[name](*a, initial_state=h, output_final_state=True,
                                                       backend="xla", chunk_size=16))(args, h0)
    assert not re.search(r"f64\[\d", str(jaxpr))
    o, S = call(name, args, h0, backend="xla", chunk_size=16)
    check_vjp(name, args, h0, random_cotangents(rng, o, S), 1e-5, 1e-5, lambda _: 1e-5,
              chunk_size=16)


def test_bfloat16_kda(rng):
    """bf16 inputs: DESIGN.md's bf16 tolerances (o/state 5e-3; dq/dk/dv/dh0 8e-3; gates 2e-2)."""
    args = cast(make_inputs("kda", rng, T=100, G=2, K=16, V=16), jnp.bfloat16)
    h0 = cast(make_state(args, rng), jnp.float32)
    o, S = call("kda", args, h0, backend="xla")
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    tol = lambda arg: 2e-2 if arg in ("log_decay", "beta") else 8e-3
    check_vjp("kda", args, h0, random_cotangents(rng, o, S), 5e-3, 5e-3, tol, chunk_size=32)
