"""Packed variable-length sequences (cu_seqlens) and single-token decoding steps.

Varlen equals running each sequence separately from its own initial state (empty sequences,
sequences shorter than the chunk and exactly one chunk long included); `<op>_step` rolled
over T equals the op. float64.
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

LENGTHS = (5, 0, 37, 16, 22, 0)  # chunk 16: shorter, empty, spanning 3 chunks, exactly one
VARLEN_CASES = [("kda", dict(G=2)), ("gla", {}), ("dplr", dict(R=2, Rkv=2)),
                ("gated_delta_product", dict(n=2)),
                ("gated_delta_product", dict(n=3))]  # virtual chunks split tokens' groups


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c[0] + "".join(
    f"-{k}{v}" for k, v in c[1].items()))
def test_varlen_equals_separate_sequences(case, rng):
    """Packed runs on both backends against each sequence run alone on the reference."""
    name, kw = case
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    args = cast(make_inputs(name, rng, B=1, T=int(cu[-1]), **kw), jnp.float64)
    h0 = jnp.asarray(make_state(args, rng, N=len(LENGTHS)))
    packed = {backend: call(name, args, h0, cu_seqlens=cu, backend=backend, chunk_size=16)
              for backend in ("reference", "xla")}
    for n, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        if start < end:
            piece = tuple(None if x is None else x[:, start:end] for x in args)
            o_n, S_n = call(name, piece, h0[n : n + 1], backend="reference")
        for backend, (o, S) in packed.items():
            assert S.shape == h0.shape
            if start == end:  # an empty sequence leaves its initial state as it is
                np.testing.assert_array_equal(S[n], h0[n], err_msg=backend)
                continue
            assert_close(o[:, start:end], o_n, 1e-10, f"o of sequence {n} ({backend})")
            assert_close(S[n : n + 1], S_n, 1e-10, f"final state of sequence {n} ({backend})")


STEP_CASES = [(name, dict(G=2) if name in GROUPED_OPS else {})
              for name in ALL_OPS]
STEP_CASES += [("dplr", dict(R=3, Rkv=2, decay=False)), ("gated_delta_product", dict(n=3))]


def _rolled_steps(name, args, h0):
    """`<op>_step` scanned over the T axis: (o [B, T, HV, V], final state)."""
    step = getattr(ops, name + "_step")

    def body(S, x):
        o, S = step(*x, S)
        return S, o

    xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in args)
    S, o = jax.lax.scan(body, h0, xs)
    return jnp.moveaxis(o, 0, 1), S


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c[0] + "".join(
    f"-{k}{v}" for k, v in c[1].items()))
def test_step_rolled_over_time_equals_op(case, rng):
    name, kw = case
    args = cast(make_inputs(name, rng, T=40, **kw), jnp.float64)
    h0 = jnp.asarray(make_state(args, rng))
    o_steps, S_steps = jax.jit(_rolled_steps, static_argnums=0)(name, args, h0)
    assert o_steps.dtype == S_steps.dtype == jnp.float64
    o, S = call(name, args, h0, backend="xla", chunk_size=16)
    assert_close(o_steps, o, 1e-10, "o")
    assert_close(S_steps, S, 1e-10, "final state")
