"""The affine form: a segment maps S_in to M S_in + B; segments compose associatively.

Against the reference recurrence in float64: one segment applied to a random initial state;
consecutive segments (one of them empty) folded with `compose` and prefix-scanned with
`scan` equal the recurrence over the concatenated tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import assert_close, call, cast, make_inputs, make_state
from dplr_jax import ops
from dplr_jax.ops import affine

# Every test here compares against a float64 reference: run them all with x64 on.
pytestmark = pytest.mark.usefixtures("x64")

CASES = [("kda", dict(G=2)), ("gated_delta_rule", dict(G=2)), ("gla", {}),
         ("dplr", dict(R=2, Rkv=2)), ("hdla", {}), ("gated_delta_product", dict(n=2))]
CUTS = (0, 20, 20, 37, 60)  # four segments, the second one empty


def _transition(name, args, **options):
    """affine.transition under jit, given the op function (q passed as None: it is unused)."""
    fn = functools.partial(affine.transition, ops.OPS[name], **options)
    return jax.jit(lambda k, v, gates: fn(None, k, v, *gates))(args[1], args[2], args[3:])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_transition_then_apply_equals_final_state(case, rng):
    name, kw = case
    args = cast(make_inputs(name, rng, B=2, T=45, **kw), jnp.float64)
    h0 = jnp.asarray(make_state(args, rng))
    M, B = _transition(name, args, chunk_size=16)
    HV, K, V = h0.shape[1:]
    assert M.shape == (2, HV, K, K) and B.shape == (2, HV, K, V)
    assert M.dtype == B.dtype == jnp.float64
    _, S_ref = call(name, args, h0, backend="reference")
    assert_close(affine.apply((M, B), h0), S_ref, 1e-10, "M h0 + B")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_composed_and_scanned_segments_equal_recurrence(case, rng):
    name, kw = case
    args = cast(make_inputs(name, rng, B=1, T=CUTS[-1], **kw), jnp.float64)
    h0 = jnp.asarray(make_state(args, rng))
    M, B = _transition(name, args, chunk_size=16, cu_seqlens=np.asarray(CUTS, np.int32))
    n_seg = len(CUTS) - 1
    assert M.shape[0] == B.shape[0] == n_seg
    segments = [(M[i : i + 1], B[i : i + 1]) for i in range(n_seg)]
    np.testing.assert_allclose(segments[1][0][0], np.broadcast_to(np.eye(M.shape[-1]),
                                                                  M.shape[1:]), atol=1e-15)
    np.testing.assert_array_equal(segments[1][1], 0.0)  # the empty segment is the identity

    total = segments[0]
    for seg in segments[1:]:
        total = affine.compose(seg, total)
    _, S_all = call(name, args, h0, backend="reference")
    assert_close(affine.apply(total, h0), S_all, 1e-10, "composed segments")

    prefixes = affine.scan((M, B))
    assert prefixes[0].shape == M.shape and prefixes[1].shape == B.shape
    S_prefix = {CUTS[-1]: S_all}
    for i, end in enumerate(CUTS[1:]):
        if end not in S_prefix:
            prefix_args = tuple(None if x is None else x[:, :end] for x in args)
            S_prefix[end] = call(name, prefix_args, h0, backend="reference")[1]
        got = affine.apply((prefixes[0][i : i + 1], prefixes[1][i : i + 1]), h0)
        assert_close(got, S_prefix[end], 1e-10, f"scan prefix {i} (tokens [0, {end}))")
