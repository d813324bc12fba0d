"""The state-pass kernels alone (ops/pallas/state_pass.py) against a jnp scan over each chunk's
factored transition, on random factored transitions: outputs, final states and every gradient
(gamma, Z, W, X, Qs, O0 or QF, h0), float32 to 1e-5.

The op tests reach the kernels only at C <= 64 and V <= 64; these cover what they do not:
several V blocks (block_v < V, V padded from 160 to 256), chunks of 128 rows (two row blocks
of Z and of Qs), no probed rows (GLA: W is None, and O0 = QF X formed in the kernels),
probed and plain rows together (DPLR-like, m = 2 probed and r = 1 plain rows per token),
resets to several initial states with final states leaving from several chunks of a row (in
any order), and the TPU form under the TPU interpreter (with O0, and with QF).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from _ops_inputs import assert_close
from dplr_jax.ops.pallas.state_pass import Config, Launch, state_pass


def transition(gamma, Z, W, X, S):
    """S_C from S_0 through one chunk's factors (chunked.chunk_factors), S [..., K, V]."""
    U = X
    if W is not None:
        n = W.shape[-2]
        U = jnp.concatenate([X[..., :n, :] - W @ S, X[..., n:, :]], axis=-2)
    return gamma[..., None] * S + jnp.swapaxes(Z, -1, -2) @ U


def scan_reference(gamma, Z, W, X, Qs, O0, QF, h0, src, dst):
    """o [B, NC, C, H, V] (state_pass's layout) and the final states [B, Nb, H, K, V] by a
    plain scan per batch row: finals[b, dst[b, c]] is the state leaving chunk c where
    dst[b, c] >= 0. O0 None: O0 = QF X."""
    B, H, NC = Qs.shape[:3]

    def row(b):
        def body(S, c):
            i = src[b, c]
            S = jnp.where(i >= 0, h0[b, jnp.maximum(i, 0)], S)
            at = lambda x: None if x is None else x[b, :, c]
            o0 = QF[b, :, c] @ X[b, :, c] if O0 is None else O0[b, :, c]
            o = jnp.einsum("hck,hkv->hcv", Qs[b, :, c], S) + o0
            S = transition(at(gamma), at(Z), at(W), at(X), S)
            return S, (o, S)

        _, (o, S_out) = jax.lax.scan(body, jnp.zeros(h0.shape[2:], h0.dtype), jnp.arange(NC))
        order = np.argsort(np.where(np.asarray(dst[b]) >= 0, np.asarray(dst[b]), NC + 1))
        return jnp.moveaxis(o, 1, 2), S_out[order[:h0.shape[1]]]

    o, finals = zip(*[row(b) for b in range(B)])
    return jnp.stack(o), jnp.stack(finals)


LOOP = Config(form="loop", interpret=True)
CASES = {  # name: (config, C, K, V, m probed rows per token, r plain rows per token, NC)
    "loop-vblocks-C128": (Config(form="loop", interpret=True, fwd=Launch(block_v=16),
                                 bwd=Launch(block_v=32)), 128, 24, 160, 1, 1, 3),
    "loop-no-probes": (LOOP, 64, 16, 48, 0, 1, 3),
    "loop-m2-r1": (LOOP, 32, 16, 80, 2, 1, 3),
    "grid-m1-r1": (Config(form="grid", interpret=pltpu.InterpretParams()), 32, 16, 80, 1, 1, 3),
    "grid-no-probes": (Config(form="grid", interpret=pltpu.InterpretParams()), 32, 16, 48, 0, 1,
                       3),
    "grid-vblocks-C128": (Config(form="grid", interpret=pltpu.InterpretParams(),
                                 fwd=Launch(block_v=32), bwd=Launch(block_v=32)),
                          128, 16, 64, 1, 1, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_pass_matches_scan(case):
    cfg, C, K, V, m, r, NC = CASES[case]
    B, H, Nb = 2, 2, 2
    rng = np.random.default_rng(sum(map(ord, case)))
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    gamma = jnp.asarray(rng.uniform(0.5, 1.0, (B, H, NC, K)), jnp.float32)
    Z = 0.05 * normal(B, H, NC, C * (m + r), K)
    W = None if m == 0 else 0.05 * normal(B, H, NC, C * m, K)
    X = normal(B, H, NC, C * (m + r), V)
    Qs = normal(B, H, NC, C, K)
    O0 = None if m == 0 else normal(B, H, NC, C, V)
    QF = None if m else 0.1 * normal(B, H, NC, C, C * r)
    h0 = normal(B, Nb, H, K, V)
    # Resets to both states; row 0 ends its sequences at chunks 1 and 2, row 1 at 0 and 2. At
    # NC = 2, row 0 also exports the state leaving chunk 0, which chunk 1 goes on from (its
    # gradient adds to the one flowing back from chunk 1).
    src = jnp.asarray([[0, -1, 1], [1, 0, -1]], jnp.int32)[:, :NC]
    dst = jnp.asarray([[-1, 1, 0], [0, -1, 1]] if NC == 3 else [[1, 0], [0, 1]], jnp.int32)
    args = (gamma, Z, W, X, Qs, O0, QF, h0)
    out, pull = jax.vjp(lambda *a: state_pass(*a, src, dst, cfg), *args)
    with jax.default_matmul_precision("highest"):
        ref, pull_ref = jax.vjp(lambda *a: scan_reference(*a, src, dst), *args)
        cts = (normal(*ref[0].shape), normal(*ref[1].shape))
        grads_ref = pull_ref(cts)
    for got, want, what in zip(out, ref, ("o", "final states")):
        assert_close(got, want, 1e-5, what)
    names = ("gamma", "Z", "W", "X", "Qs", "O0", "QF", "h0")
    for got, want, what in zip(pull(cts), grads_ref, names):
        assert (got is None) == (want is None), what
        if want is not None:
            assert_close(got, want, 1e-5, f"d{what}")


def test_o0_or_qf_exactly_one():
    """state_pass takes O0, or (without probed rows) QF, not both or neither, and says so."""
    B, H, NC, C, K, V = 1, 1, 2, 16, 16, 16
    z = lambda *s: jnp.zeros(s, jnp.float32)
    gamma, Z, X, Qs = z(B, H, NC, K), z(B, H, NC, C, K), z(B, H, NC, C, V), z(B, H, NC, C, K)
    h0, idx = z(B, 1, H, K, V), jnp.zeros((B, NC), jnp.int32)
    O0, QF = z(B, H, NC, C, V), z(B, H, NC, C, C)
    for o0, qf, W in ((O0, QF, None), (None, None, None), (None, QF, z(B, H, NC, C, K)),
                      (None, z(B, H, NC, C, C + 16), None)):
        with pytest.raises(ValueError, match="QF"):
            state_pass(gamma, Z, W, X, Qs, o0, qf, h0, idx, idx, LOOP)


def values_case(seed, B, H, NC, C, K, V):
    """Random factored transitions without probed rows (GLA's: X the bf16 values, O0 = QF X):
    (normal, gamma, Z, Qs, X, QF), normal drawing more from the same generator."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    gamma = jnp.asarray(rng.uniform(0.5, 1.0, (B, H, NC, K)), jnp.float32)
    Z, Qs = 0.05 * normal(B, H, NC, C, K), normal(B, H, NC, C, K)
    X, QF = normal(B, H, NC, C, V).astype(jnp.bfloat16), 0.1 * normal(B, H, NC, C, C)
    return normal, gamma, Z, Qs, X, QF


@pytest.mark.parametrize("form", ["loop", "grid"])
def test_16bit_values_without_probes(form):
    """X may be 16-bit where W is None (the values as given: GLA): the kernels read it as it
    is, and its cotangent comes back in its dtype, the float32 one rounded once; everything
    else as from the float32 copy of X. With W, a 16-bit X is refused (dW reads dX back)."""
    cfg = LOOP if form == "loop" else Config(form="grid", interpret=pltpu.InterpretParams())
    B, H, NC, C, K, V = 1, 2, 2, 32, 16, 32
    normal, gamma, Z, Qs, X, QF = values_case(7, B, H, NC, C, K, V)
    h0, src = normal(B, 1, H, K, V), jnp.asarray([[0, -1]], jnp.int32)
    dst = jnp.asarray([[-1, 0]], jnp.int32)
    run = lambda x: jax.vjp(lambda *a: state_pass(*a, src, dst, cfg),
                            gamma, Z, None, x, Qs, None, QF, h0)
    (o, fin), pull = run(X)
    (o32, fin32), pull32 = run(X.astype(jnp.float32))
    cts = (normal(*o.shape), normal(*fin.shape))
    grads, grads32 = pull(cts), pull32(cts)
    assert_close(o, o32, 1e-6, "o")
    assert_close(fin, fin32, 1e-6, "final states")
    for i, (got, want) in enumerate(zip(grads, grads32)):
        if i == 3:
            assert got.dtype == jnp.bfloat16
            want = want.astype(jnp.bfloat16)
        if want is not None:
            assert_close(got.astype(jnp.float32), want.astype(jnp.float32), 1e-6, f"grad {i}")
    with pytest.raises(ValueError, match="float32 where W"):
        state_pass(gamma, Z, Z, X, Qs, normal(B, H, NC, C, V), None, h0, src, dst, cfg)


def test_values_in_tokens_layout():
    """x_tokens: X (the values, W None) given in the tokens' layout [B, NC, C, H, V] gives
    what the chunk-major X gives, o, final states and every gradient (dX in the same layout
    and dtype), here with several V blocks and V padded (80 -> 128); W or the "grid" form
    with it is refused."""
    cfg = Config(form="loop", interpret=True, fwd=Launch(block_v=32), bwd=Launch(block_v=32))
    B, H, NC, C, K, V = 2, 2, 3, 16, 16, 80
    normal, gamma, Z, Qs, X, QF = values_case(11, B, H, NC, C, K, V)
    h0 = normal(B, 2, H, K, V)
    src = jnp.asarray([[0, -1, 1], [1, 0, -1]], jnp.int32)
    dst = jnp.asarray([[-1, 1, 0], [0, -1, 1]], jnp.int32)
    run = lambda x, tokens: jax.vjp(
        lambda *a: state_pass(*a, src, dst, cfg, x_tokens=tokens), gamma, Z, None, x, Qs, None,
        QF, h0)
    (o, fin), pull = run(jnp.moveaxis(X, 1, 3), True)
    (o_ref, fin_ref), pull_ref = run(X, False)
    cts = (normal(*o.shape), normal(*fin.shape))
    assert_close(o, o_ref, 1e-6, "o")
    assert_close(fin, fin_ref, 1e-6, "final states")
    grads, grads_ref = list(pull(cts)), pull_ref(cts)
    assert grads[3].shape == (B, NC, C, H, V) and grads[3].dtype == jnp.bfloat16
    grads[3] = jnp.moveaxis(grads[3], 3, 1)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        if want is not None:
            assert_close(got.astype(jnp.float32), want.astype(jnp.float32), 1e-6, f"grad {i}")
    Xt = jnp.moveaxis(X, 1, 3).astype(jnp.float32)
    for W, form in ((Z, cfg), (None, Config(form="grid", interpret=pltpu.InterpretParams()))):
        with pytest.raises(ValueError, match="x_tokens"):
            state_pass(gamma, Z, W, Xt, Qs, None if W is None else normal(B, H, NC, C, V),
                       QF if W is None else None, h0, src, dst, form, x_tokens=True)


@pytest.mark.parametrize("rows, probed, Kp, sixteen_bit, want", [
    (64, 64, 128, True, (2, 2)),    # kda, gated_delta_rule: one row block of Z and of W
    (64, 0, 64, True, (2, 2)),      # gla: no probed rows
    (128, 64, 128, True, (1, 2)),   # rank-1 DPLR: two blocks of Z, one of W
    (128, 128, 128, True, (1, 1)),  # chunk 128, or DPLR of rank 2
    (64, 64, 256, True, (1, 1)),    # K = 256
    (64, 64, 128, False, (1, 1)),   # the float32 path's 3-pass dots
])
def test_gpu_launch_stages_fit_shared_memory(rows, probed, Kp, sixteen_bit, want):
    """The GPU launches' pipelining stages are lowered to 1 wherever Triton's 2 stages
    overflowed (or were not shown to fit) the H100's shared memory: a compile failure there
    would only show on a GPU. V blocks shrink to a narrow V."""
    from dplr_jax.ops.pallas import PLATFORM_CONFIGS
    from dplr_jax.ops.pallas.state_pass import fit_launches
    gpu = PLATFORM_CONFIGS["gpu"]
    assert (gpu.fwd.num_stages, gpu.bwd.num_stages) == (2, 2)
    cfg = dataclasses.replace(gpu, precision=gpu.precision_16bit) if sixteen_bit else gpu
    got = fit_launches(cfg, rows, probed, Kp, 128, rb=64)
    assert (got.fwd.num_stages, got.bwd.num_stages) == want
    assert fit_launches(cfg, rows, probed, Kp, 32, rb=64).fwd.block_v == 32


@pytest.mark.parametrize("trans_a", [False, True])
def test_mask_dot_two_pass_split(trans_a, rng):
    """state_pass._mask_dot with the GPU's three-pass preset takes two tf32 passes over x = hi +
    lo: its 0/1 sums agree with float64 to float32 rounding, over magnitudes from 1e-3 to 1e3.
    In interpret mode the passes run in float32, so this checks the split loses nothing; the
    tf32 rounding itself is checked on the GPU (ops_gpu.py's float32 checks, 1e-5)."""
    from dplr_jax.ops.pallas.state_pass import _mask_dot
    x = (rng.standard_normal((32, 16)) * 10.0 ** rng.uniform(-3, 3, (32, 16))).astype(np.float32)
    mask = np.tril(np.ones((32, 32), bool))
    x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3

    def kernel(m_ref, x_ref, o_ref):
        o_ref[...] = _mask_dot(m_ref[...] != 0, x_ref[...], x3, trans_a)

    got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((32, 16), jnp.float32),
                         interpret=True)(jnp.asarray(mask, jnp.int32), jnp.asarray(x))
    ref = (mask.T if trans_a else mask).astype(np.float64) @ x.astype(np.float64)
    assert_close(got, ref, 1e-6, "mask dot")
    text = str(jax.make_jaxpr(lambda m, x: _mask_dot(m, x, x3, trans_a))(mask, x))
    assert text.count("dot_general") == 2 and "bitcast_convert_type" in text
