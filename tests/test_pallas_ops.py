"""backend="pallas" (the Pallas state-pass kernels, interpret mode on the CPU) vs the reference.

Outputs, final states and the gradients w.r.t. every input and the initial state, against
the float64 token-by-token reference on the same (rounded) inputs and cotangents: float32
to 1e-5, bf16 to DESIGN.md's tolerances. Cases: T not a multiple of the chunk, initial
state, packed sequences with hard resets (log decay -1000), grouped value heads, head dims
that need padding, and the TPU form of the kernels under the TPU interpreter.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from _ops_inputs import (assert_close, call, cast, check_vjp, make_inputs,
                         make_state, random_cotangents)
from dplr_jax import ops
from dplr_jax.ops import backends
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, engine
from dplr_jax.ops.pallas.state_pass import Config

BF16_TOL = {"q": 8e-3, "k": 8e-3, "v": 8e-3, "initial_state": 8e-3, "log_decay": 2e-2,
            "beta": 2e-2}


def check_pallas_vjp(name, args, h0, rng, tol_o, tol_S, tol_grad, *, chunk_size=16,
                     cu_seqlens=None, backend="pallas", **options):
    """`backend` (default "pallas") forward and pullback against the float64 reference,
    random cotangents; `options`: more keyword options of the op."""
    o, S = call(name, args, h0, backend="reference", cu_seqlens=cu_seqlens)
    check_vjp(name, args, h0, random_cotangents(rng, o, S), tol_o, tol_S, tol_grad,
              chunk_size=chunk_size, cu_seqlens=cu_seqlens, backend=backend, **options)


def test_kernels_registered_for_every_op_and_platform():
    for name in ops.OPS:
        for platform in ("cpu", "gpu", "tpu"):
            assert backends.lookup(name, platform) is not None, (name, platform)


def test_pallas_runs_a_pallas_call():
    args = cast(make_inputs("kda", np.random.default_rng(0), T=20), jnp.float32)
    fn = lambda *a: ops.kda(*a, backend="pallas", chunk_size=16)[0]
    assert "pallas_call" in str(jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum()))(*args))


def _moves(jaxpr, shape, prims=("transpose",), dtype=None):
    """How many eqns of `prims` (transposes) the jaxpr (and the ones inside it) applies to an
    array of `shape` (an int: of that size) and, if given, `dtype`."""
    n = 0
    for eqn in jaxpr.eqns:
        aval = eqn.invars[0].aval if eqn.invars else None
        n += (eqn.primitive.name in prims
              and (aval.size if isinstance(shape, int) else aval.shape) == shape
              and dtype in (None, aval.dtype))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _moves(inner, shape, prims, dtype)
    return n


def test_float32_log_decays_reach_the_kernels_unmoved():
    """api.run_chunked: log decays as given (float32) go to the Pallas phase 1 in their
    [B, NC, C, H, K] chunks, where q (the same shape for gla) is moved to [B, H, NC, C, K]
    with the rest under jax.vjp (a call without gradients reads it in place too); cast
    decays (bf16 in, float32 out) are a copy anyway and move with it."""
    B, T, H, K, C = 1, 64, 2, 16, 16
    args = make_inputs("gla", np.random.default_rng(0), B=B, T=T, H=H, K=K, V=K)
    chunks = (B, T // C, C, H, K)

    def moves(decay_dtype, vjp):
        a = list(cast(args, jnp.float32))
        a[3] = a[3].astype(decay_dtype)
        fn = lambda *x: ops.gla(*x, backend="pallas", chunk_size=C)[0]
        return _moves(jax.make_jaxpr(lambda *x: jax.vjp(fn, *x) if vjp else fn(*x))(*a).jaxpr,
                      chunks)

    assert moves(jnp.bfloat16, vjp=True) == 2  # q's and the decays'
    assert moves(jnp.float32, vjp=True) == 1  # q's
    assert moves(jnp.bfloat16, vjp=False) == 1  # the decays'
    assert moves(jnp.float32, vjp=False) == 0


@pytest.mark.parametrize("name", ["kda", "gated_delta_rule", "delta_rule"])
def test_16bit_values_reach_the_kernels_unmoved_and_uncast(name):
    """api.run_chunked: where phase 1's kernels take the form, the values v go to them as
    given, bf16 in their [B, NC, C, H, V] chunks (the kernels cast them), and their cotangent
    comes back bf16: no convert and no transpose of a bf16 array of v's size in the forward
    (o, the only other one, is written in place); the backend "xla" casts v (one convert)."""
    B, T, H, K, V, C = 1, 64, 2, 16, 32, 16
    args = cast(make_inputs(name, np.random.default_rng(0), B=B, T=T, H=H, K=K, V=V),
                jnp.bfloat16)
    fn = lambda backend: lambda *a: getattr(ops, name)(*a, backend=backend, chunk_size=C)[0]
    count = lambda backend: _moves(jax.make_jaxpr(fn(backend))(*args).jaxpr, B * T * H * V,
                                   ("transpose", "convert_element_type"), jnp.bfloat16)
    assert count("pallas") == 0
    assert count("xla") == 1


FP32_CASES = [
    ("kda", dict(G=2)),
    ("gated_delta_rule", dict(G=2)),
    ("delta_rule", {}),
    ("gla", {}),
    ("kda", dict(K=24, V=40)),  # padded to 32 and 64 inside the kernel
    ("dplr", dict(R=2, Rkv=1)),
    ("dplr", dict(R=4, Rkv=2, decay=False)),  # 6 row blocks in the state pass, no log decay
    # Virtual tokens: at chunk 16 every virtual token's output (8 query rows would be below
    # the kernels' 16), at 32 and 64 only the last of each token's (16 query rows).
    ("hdla", {}),
    ("hdla", dict(chunk=32)),
    ("gated_delta_product", dict(n=2)),
    ("gated_delta_product", dict(n=2, chunk=32)),
    ("gated_delta_product", dict(n=4, chunk=64, K=8, V=8)),
    ("gated_delta_product", dict(n=3, K=8, V=8)),  # virtual chunks split tokens' groups
]


@pytest.mark.parametrize("case", FP32_CASES,
                         ids=lambda c: c[0] + "".join(f"-{k}{v}" for k, v in c[1].items()))
def test_float32_forward_and_gradients(case, rng, x64):
    """T = 50 with chunk 16 (T % C != 0), an initial state, every gradient, to 1e-5."""
    name, kw = case
    kw = dict(kw)
    chunk = kw.pop("chunk", 16)
    args = cast(make_inputs(name, rng, T=50, K=kw.pop("K", 16), V=kw.pop("V", 16), **kw),
                jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=chunk)


@pytest.mark.parametrize("name", ["kda", "gla", "hdla"])
def test_bfloat16(name, rng, x64):
    args = cast(make_inputs(name, rng, T=100, K=16, V=32), jnp.bfloat16)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 5e-3, 5e-3, BF16_TOL.__getitem__, chunk_size=32)


VARLEN_CASES = [  # (op, dtype, hard resets with 10x gates)
    ("kda", jnp.float32, True),
    ("gated_delta_rule", jnp.float32, True),
    ("gla", jnp.float32, True),
    ("kda", jnp.bfloat16, True),
    ("hdla", jnp.float32, True),  # chunks of 32 virtual tokens: 16 query rows
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "-".join(
    [c[0], jnp.dtype(c[1]).name, "strong" if c[2] else "plain"]))
def test_varlen(case, rng, x64):
    """Packed sequences (one shorter than a chunk, one empty), grouped value heads where the
    op has them; strong: gates x10 and 5% of log decays -1000 (hard resets)."""
    name, dtype, strong = case
    grouped = name in ("kda", "gated_delta_rule")
    args = list(make_inputs(name, rng, B=1, T=70, K=16, V=16, G=2 if grouped else 1))
    if strong:
        g = 10 * args[3]
        args[3] = np.where(rng.random(g.shape) < 0.05, -1000.0, g)
    args = cast(tuple(args), dtype)
    cu = jnp.array([0, 9, 9, 70], jnp.int32)
    h0 = cast(make_state(args, rng, N=3), jnp.float32)
    chunk = 32 if name == "hdla" else 16
    if dtype == jnp.float32:
        check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, cu_seqlens=cu,
                         chunk_size=chunk)
    else:
        check_pallas_vjp(name, args, h0, rng, 5e-3, 5e-3, BF16_TOL.__getitem__, cu_seqlens=cu,
                         chunk_size=chunk)


FORWARD_ONLY_CASES = [  # (op, dtype, options): calls without gradients (engine.op's primal)
    ("kda", jnp.bfloat16, dict(G=2)),
    ("gla", jnp.bfloat16, {}),
    ("dplr", jnp.bfloat16, {}),
    ("hdla", jnp.bfloat16, dict(chunk=32)),
    ("gated_delta_rule", jnp.bfloat16, {}),
    ("delta_rule", jnp.bfloat16, {}),
    ("gated_delta_product", jnp.bfloat16, dict(n=3)),  # virtual chunks split tokens' groups
    ("kda", jnp.float32, dict(K=24, V=40)),  # padded inside the kernels
    ("dplr", jnp.float32, dict(R=3, Rkv=2)),  # rank 3: XLA's phase 1 on inputs as given
    ("kda", jnp.bfloat16, dict(varlen=True)),
    ("gla", jnp.float32, dict(varlen=True)),
    # beta k formed by the kernels (Form.beta), grouped value heads, hard resets
    ("gated_delta_rule", jnp.float32, dict(varlen=True, G=2)),
]


@pytest.mark.parametrize("case", FORWARD_ONLY_CASES, ids=lambda c: "-".join(
    [c[0], jnp.dtype(c[1]).name] + [f"{k}{v}" for k, v in c[2].items()]))
def test_forward_only(case, rng, x64):
    """A call without gradients reads q and the keys as given (engine._forward_only): o and
    the final state against the reference, T % C != 0, an initial state; varlen: packed
    sequences with hard resets and gates x10, as test_varlen."""
    name, dtype, kw = case
    kw = dict(kw)
    chunk, varlen = kw.pop("chunk", 16), kw.pop("varlen", False)
    args = list(make_inputs(name, rng, B=1 if varlen else 2, T=70 if varlen else 50,
                            K=kw.pop("K", 16), V=kw.pop("V", 16), **kw))
    cu = None
    if varlen:
        g = 10 * args[3]
        args[3] = np.where(rng.random(g.shape) < 0.05, -1000.0, g)
        cu = jnp.array([0, 9, 9, 70], jnp.int32)
    args = cast(tuple(args), dtype)
    h0 = cast(make_state(args, rng, N=3 if varlen else None), jnp.float32)
    o, S = call(name, args, h0, backend="pallas", chunk_size=chunk, cu_seqlens=cu)
    o_ref, S_ref = call(name, cast(args, jnp.float64), cast(h0, jnp.float64),
                        backend="reference", cu_seqlens=cu)
    assert o.dtype == dtype and S.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 5e-3
    assert_close(o, o_ref, tol, "o")
    assert_close(S, S_ref, 1e-5 if dtype == jnp.float32 else 5e-3, "final state")


# bf16 arrays of q's size cast to float32 and moved in a call without gradients: gla's v is
# read by the state pass in the tokens' layout (chunked.chunked's values); Gated DeltaNet's
# beta k is formed by the kernels from k as given (Form.beta); kda's q and keys are cast
# (api.run_chunked: per-channel decays with probed keys), k once for beta k.
AS_GIVEN = {"gla": (0, 0), "gated_delta_rule": (0, 0), "kda": (3, 0)}


@pytest.mark.parametrize("name", sorted(AS_GIVEN))
def test_forward_only_reads_q_and_keys_as_given(name):
    """Without gradients q and the keys of rank 1 are read as given and in place (AS_GIVEN
    counts the casts and moves that remain); under jax.vjp q and the keys are cast (the kernels'
    float32 cotangents are summed before one rounding)."""
    B, T, H, K, C = 1, 64, 2, 16, 16
    args = list(cast(make_inputs(name, np.random.default_rng(0), B=B, T=T, H=H, K=K, V=K),
                     jnp.bfloat16))
    args[3] = args[3].astype(jnp.float32)  # decays as given in float32: read in place
    fn = lambda *a: getattr(ops, name)(*a, backend="pallas", chunk_size=C)[0]
    count = lambda jaxpr, prim: _moves(jaxpr, B * T * H * K, (prim,), jnp.bfloat16)
    forward = jax.make_jaxpr(fn)(*args).jaxpr
    casts, moves = AS_GIVEN[name]
    assert count(forward, "convert_element_type") == casts
    assert count(forward, "transpose") == moves
    vjp = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a))(*args).jaxpr
    assert count(vjp, "convert_element_type") >= 2  # q's and k's at least


@pytest.mark.parametrize("name,chunk", [("kda", 16), ("gla", 16), ("dplr", 16), ("hdla", 32)])
def test_tpu_form_under_tpu_interpreter(name, chunk, rng, x64):
    """The Mosaic kernels (chunk axis on the grid, state in VMEM, resets in SMEM) run with TPU
    semantics by the TPU interpreter and agree with the reference (hdla: one query row per
    two virtual tokens)."""
    args = cast(make_inputs(name, rng, T=40, K=16, V=16), jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    fn = engine.kernel(name, Config(form="grid", interpret=pltpu.InterpretParams()))
    o, S = jax.jit(lambda a, h: fn(*a, scale=0.25, initial_state=h, cu_seqlens=None,
                                   chunk_size=chunk))(args, h0)
    o_ref, S_ref = call(name, cast(args, jnp.float64), cast(h0, jnp.float64), scale=0.25,
                        backend="reference")
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(S, S_ref, 1e-5, "final state")
    grad = lambda f: jax.jit(jax.grad(lambda a, h: jnp.sum(f(a, h)[0] ** 2), argnums=(0, 1)))
    g_tpu = grad(lambda a, h: fn(*a, scale=0.25, initial_state=h, cu_seqlens=None,
                                 chunk_size=chunk))(args, h0)
    g_ref = grad(lambda a, h: ops.OPS[name](*a, scale=0.25, initial_state=h,
                                            backend="reference"))(args, h0)
    for i, (a, b) in enumerate(zip(jax.tree.leaves(g_tpu), jax.tree.leaves(g_ref))):
        assert_close(a, b, 1e-5, f"gradient {i}")


def test_states_wider_than_max_k_scan_in_xla(rng, x64):
    """Config.max_k (GPU: 256, the state pass's shared-memory limit): wider keys run XLA's
    scan for phases 2 and 3, still with the decayed-product kernels, and agree with the
    reference; at or below it the state-pass kernel runs."""
    args = cast(make_inputs("kda", rng, T=40, K=24, V=16), jnp.float32)  # K pads to 32
    h0 = cast(make_state(args, rng), jnp.float32)
    cpu = dataclasses.replace(PLATFORM_CONFIGS["cpu"], max_k=16)
    fn = engine.kernel("kda", cpu)
    run = lambda a, h: fn(*a, scale=0.25, initial_state=h, cu_seqlens=None, chunk_size=16)
    text = str(jax.make_jaxpr(run)(args, h0))
    assert "dplr_state_pass" not in text and "dplr_decayed_fwd" in text
    o, S = jax.jit(run)(args, h0)
    o_ref, S_ref = call("kda", cast(args, jnp.float64), cast(h0, jnp.float64), scale=0.25,
                        backend="reference")
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(S, S_ref, 1e-5, "final state")
    grad = lambda f, a, h: jax.jit(jax.grad(lambda a, h: jnp.sum(f(a, h)[0] ** 2),
                                            argnums=(0, 1)))(a, h)
    got = grad(run, args, h0)
    ref = grad(lambda a, h: ops.kda(*a, scale=0.25, initial_state=h, backend="reference"),
               cast(args, jnp.float64), cast(h0, jnp.float64))
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref))):
        assert_close(a, b, 1e-5, f"gradient {i}")
    wide = engine.kernel("kda", dataclasses.replace(cpu, max_k=32))
    assert "dplr_state_pass" in str(jax.make_jaxpr(
        lambda a, h: wide(*a, scale=0.25, initial_state=h, cu_seqlens=None,
                          chunk_size=16))(args, h0))


@pytest.mark.parametrize("name", ["kda", "dplr"])
def test_backward_keeps_phase1_products(rng, name):
    """Phase 1 keeps its decayed products for the backward (dplr: under jax.checkpoint with
    the policy chunked.SAVED; kda: as residuals of the factors kernels, factors.py): the
    gradient runs each product kernel once forward and once backward, never again to
    rematerialize, and the state pass's three kernels once each."""
    args = cast(make_inputs(name, rng, T=64, K=16, V=16), jnp.float32)
    loss = lambda *a: jnp.sum(getattr(ops, name)(*a, backend="pallas")[0] ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args))
    names = re.findall(r"name=(dplr_\w+)", text)
    # kda: L and QE in one pass; dplr: QE with L, QF with PF (chunked.intra_products); each
    # product's exact kernels and its bounded one, chosen per chunk (decayed._products)
    products = 1 if name == "kda" else 2
    for kernel in ("fwd", "bwd"):
        assert names.count(f"dplr_decayed_{kernel}") == 2 * products, names
    assert names.count("dplr_decayed_diag") == names.count("dplr_decayed_diag_bwd") == products
    for kernel in ("fwd", "bwd", "grads"):
        assert names.count(f"dplr_state_pass_{kernel}") == 1, names


def test_traced_scale(rng, x64):
    """A scale traced under jit (not a Python number) cannot be the state pass's static scale:
    q is multiplied in XLA instead (api.run_chunked), forward and gradients still exact."""
    args = cast(make_inputs("gla", rng, T=40, K=16, V=16), jnp.float32)
    run = lambda s, *a: ops.gla(*a, scale=s, backend="pallas", chunk_size=16)[0]
    loss = lambda s, *a: jnp.sum(run(s, *a) ** 2)
    o, grads = jax.jit(lambda s, *a: (run(s, *a), jax.grad(loss, argnums=1)(s, *a)))(
        jnp.float32(0.3), *args)
    a64 = cast(args, jnp.float64)
    o_ref = ops.gla(*a64, scale=0.3, backend="reference")[0]
    dq_ref = jax.grad(lambda q: jnp.sum(ops.gla(q, *a64[1:], scale=0.3,
                                                backend="reference")[0] ** 2))(a64[0])
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(grads, dq_ref, 1e-5, "d q")
