"""Context parallelism (dplr_jax.parallel) against the single-device op, on 8 virtual CPU devices.

Every check pulls random cotangents back through jax.vjp, so outputs, final states and the
gradients of every input (initial_state included) are compared, and input gradients are
compared shard by shard: a bug that only breaks non-last shards cannot hide in the total.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ops_inputs import assert_close, make_inputs
from jax.sharding import AxisType, PartitionSpec

from dplr_jax import ops, parallel

TOL = 1e-5  # float32 paths, relative RMSE (DESIGN.md)
TOL64 = 1e-10  # float64: sharded and single-device differ only by rounding
H, K, V = 2, 16, 16
C = 16  # chunk size: several chunks per shard at 2 and 4 shards of T = 128


def _inputs(name, rng, *, B, T, N=None, dtype=jnp.float32, **kw):
    """Op inputs, an initial state [N, HV, K, V] and cotangents for (o, final_state)."""
    args = tuple(None if a is None else jnp.asarray(a, dtype)
                 for a in make_inputs(name, rng, B=B, T=T, H=H, K=K, V=V, **kw))
    HV = args[2].shape[2]
    h0 = jnp.asarray(0.5 * rng.standard_normal((N or B, HV, K, V)), dtype)
    do = jnp.asarray(rng.standard_normal((B, T, HV, V)), dtype)
    dS = jnp.asarray(rng.standard_normal(h0.shape), dtype)
    return args, h0, do, dS


def _vjp(f, args, h0, cu, do, dS):
    """(o, final_state, d_args, d_h0) of f(args, h0, cu) under jit; cu is traced."""
    def run(args, h0, cu, do, dS):
        (o, S), pull = jax.vjp(lambda a, h: f(a, h, cu), args, h0)
        return (o, S) + pull((do, dS))
    return jax.tree.map(np.asarray, jax.jit(run)(args, h0, cu, do, dS))


def _single(name, args, h0, do, dS, cu=None):
    f = lambda a, h, c: ops.OPS[name](*a, initial_state=h, output_final_state=True,
                                      cu_seqlens=c, backend="xla", chunk_size=C)
    return _vjp(f, args, h0, cu, do, dS)


def _sharded(name, args, h0, do, dS, mesh, cu=None, **kw):
    f = lambda a, h, c: parallel.context_parallel(name, *a, mesh=mesh, initial_state=h,
                                                  output_final_state=True, cu_seqlens=c,
                                                  backend="xla", chunk_size=C, **kw)
    return _vjp(f, args, h0, cu, do, dS)


def _compare(got, ref, shards, what, tol=TOL):
    """Outputs, final state and d_h0 whole; o and every input gradient shard by shard."""
    o, S, d_args, d_h0 = got
    o_r, S_r, d_args_r, d_h0_r = ref
    assert_close(S, S_r, tol, f"{what}: final state")
    assert_close(d_h0, d_h0_r, tol, f"{what}: d initial_state")
    T = o_r.shape[1]
    L = T // shards
    named = [("o", o, o_r)] + [(f"d arg {i}", d, d_r) for i, (d, d_r)
                               in enumerate(zip(d_args, d_args_r)) if d_r is not None]
    for label, x, x_r in named:
        for p in range(shards):
            sl = slice(p * L, (p + 1) * L)
            assert_close(x[:, sl], x_r[:, sl], tol, f"{what}: {label}, shard {p}")


def _seq_mesh(shards):
    return jax.make_mesh((shards,), ("seq",), devices=jax.devices()[:shards])


CASES = [("kda", {}), ("gated_delta_rule", {}), ("gla", {}), ("dplr", {"R": 1}),
         ("dplr", {"R": 2})]


@pytest.mark.parametrize("name,kw", CASES, ids=["kda", "gdr", "gla", "dplr_r1", "dplr_r2"])
def test_sharded_equals_single_device(name, kw, rng):
    """2, 4 and 8 shards, both strategies, against one single-device result."""
    args, h0, do, dS = _inputs(name, rng, B=2, T=128, **kw)
    ref = _single(name, args, h0, do, dS)
    for shards in (2, 4, 8):
        mesh = _seq_mesh(shards)
        for strategy in parallel.STRATEGIES:
            got = _sharded(name, args, h0, do, dS, mesh, strategy=strategy)
            _compare(got, ref, shards, f"{name} {kw} P={shards} {strategy}")


def test_other_ops_and_grouped_heads(rng):
    """delta_rule with grouped value heads, hdla and gated_delta_product (virtual tokens)."""
    mesh = _seq_mesh(4)
    for name, kw in [("delta_rule", {"G": 2}), ("hdla", {}), ("gated_delta_product", {})]:
        args, h0, do, dS = _inputs(name, rng, B=1, T=64, **kw)
        _compare(_sharded(name, args, h0, do, dS, mesh), _single(name, args, h0, do, dS), 4,
                 name)


def test_lower_bound_reaches_the_op(rng):
    """log_decay_lower_bound goes through context_parallel to the op on every shard: the
    bounded sharded run equals the exact single-device one, and a bound out of range is
    refused by the op's own check."""
    args, h0, do, dS = _inputs("kda", rng, B=1, T=64)
    args = args[:3] + (jnp.maximum(args[3], -5.0),) + args[4:]
    mesh = _seq_mesh(4)
    _compare(_sharded("kda", args, h0, do, dS, mesh, log_decay_lower_bound=-5.0),
             _single("kda", args, h0, do, dS), 4, "kda, bound -5")
    with pytest.raises(ValueError, match="log_decay_lower_bound"):
        _sharded("kda", args, h0, do, dS, mesh, log_decay_lower_bound=-6.0)
    # concrete decays below the bound are refused before shard_map traces them
    low = args[:3] + (args[3].at[0, 5].set(-30.0),) + args[4:]
    with pytest.raises(ValueError, match="'log_decay' has entries below"):
        parallel.context_parallel("kda", *low, mesh=mesh, backend="xla", chunk_size=C,
                                  log_decay_lower_bound=-5.0)


# Packed sequences over T = 128: one crossing several shard boundaries, an empty one, one
# ending exactly on a boundary (32 = 4 x 8 = 2 x 16), one starting there, one of length 1.
CU = [0, 5, 5, 50, 64, 100, 101, 128]


@pytest.mark.parametrize("name,shards", [("kda", 4), ("kda", 8), ("gla", 8),
                                         ("gated_delta_rule", 4)])
def test_varlen_across_shard_boundaries(name, shards, rng, x64):
    """float64, so the check is tight; kda adds a hard reset (log decay -1000) mid-sequence."""
    args, h0, do, dS = _inputs(name, rng, B=1, T=128, N=len(CU) - 1, dtype=jnp.float64)
    if name == "kda":
        args = args[:3] + (args[3].at[:, 70].set(-1000.0),) + args[4:]
    cu = jnp.asarray(CU, jnp.int32)
    ref = _single(name, args, h0, do, dS, cu)
    mesh = _seq_mesh(shards)
    for strategy in parallel.STRATEGIES:
        got = _sharded(name, args, h0, do, dS, mesh, cu, strategy=strategy)
        _compare(got, ref, shards, f"{name} varlen P={shards} {strategy}", TOL64)


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_data_and_sequence_parallel(strategy, rng):
    """Batch sharded over "data" (2), sequence over "seq" (4); outputs keep that sharding."""
    args, h0, do, dS = _inputs("kda", rng, B=4, T=128)
    mesh = parallel.make_mesh(data=2, seq=4)
    got = _sharded("kda", args, h0, do, dS, mesh, batch_axis="data", strategy=strategy)
    _compare(got, _single("kda", args, h0, do, dS), 4, f"data x seq {strategy}")
    o, S = jax.jit(lambda a, h: parallel.context_parallel(
        "kda", *a, mesh=mesh, batch_axis="data", initial_state=h, output_final_state=True))(
        args, h0)
    assert tuple(o.sharding.spec)[:2] == ("data", "seq")
    assert tuple(S.sharding.spec)[:1] == ("data",)


def test_context_mesh_auto_axes_and_defaults(rng):
    """Mesh from jax.set_mesh with Auto axes; "data" left to the compiler; no initial_state;
    no final state; and a mesh axis of size 1 runs the op itself."""
    args, _, _, _ = _inputs("gated_delta_rule", rng, B=2, T=64)
    ref, _ = ops.gated_delta_rule(*args, backend="xla")
    mesh = jax.make_mesh((2, 4), ("data", "seq"), (AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh):
        o, S = jax.jit(lambda a: parallel.context_parallel(ops.gated_delta_rule, *a,
                                                           strategy="ppermute"))(args)
    assert S is None
    assert_close(o, ref, TOL, "context mesh, Auto axes")
    one = jax.make_mesh((1,), ("seq",), devices=jax.devices()[:1])
    o1, _ = parallel.context_parallel("gated_delta_rule", *args, mesh=one, backend="xla")
    assert_close(o1, ref, TOL, "one shard")


def test_local_entry_inside_user_shard_map(rng):
    """context_parallel_local called from a user's own shard_map (default check_vma=True)."""
    args, h0, _, _ = _inputs("kda", rng, B=1, T=64)
    ref_o, ref_S = ops.kda(*args, initial_state=h0, output_final_state=True, backend="xla")
    mesh = jax.make_mesh((4,), ("seq",), (AxisType.Auto,), devices=jax.devices()[:4])
    spec = PartitionSpec(None, "seq")

    def body(args, h0):
        return parallel.context_parallel_local(ops.kda, *args, axis="seq", initial_state=h0,
                                               output_final_state=True, backend="xla")

    o, S = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=((spec,) * 5, PartitionSpec()),
                                 out_specs=(spec, PartitionSpec())))(args, h0)
    assert_close(o, ref_o, TOL, "local entry: o")
    assert_close(S, ref_S, TOL, "local entry: final state")


def test_bad_arguments(rng):
    args, h0, _, _ = _inputs("gla", rng, B=2, T=60)
    mesh = _seq_mesh(8)
    with pytest.raises(ValueError, match="T = 60 tokens; expected a multiple of the 8 shards"):
        parallel.context_parallel("gla", *args, mesh=mesh)
    with pytest.raises(ValueError, match="argument 'strategy'"):
        parallel.context_parallel("gla", *args, mesh=_seq_mesh(2), strategy="ring")
    with pytest.raises(ValueError, match="argument 'axis' is 'sequence'"):
        parallel.context_parallel("gla", *args, mesh=mesh, axis="sequence")
    with pytest.raises(ValueError, match="argument 'op'"):
        parallel.context_parallel("softmax", *args, mesh=mesh)
    with pytest.raises(ValueError, match="argument 'mesh' is None and no mesh is set"):
        parallel.context_parallel("gla", *args)
    with pytest.raises(ValueError, match="argument 'initial_state'"):
        parallel.context_parallel("gla", *args, mesh=_seq_mesh(2), initial_state=h0[:1])
    mesh2 = parallel.make_mesh(data=2, seq=4)
    packed = tuple(a[:1, :32] for a in args)
    with pytest.raises(ValueError, match="argument 'cu_seqlens'.*batch_axis"):
        parallel.context_parallel("gla", *packed, mesh=mesh2, batch_axis="data",
                                  cu_seqlens=jnp.array([0, 10, 32], jnp.int32))
    with pytest.raises(ValueError, match="argument 'data'"):
        parallel.make_mesh(data=3)
