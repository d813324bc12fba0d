"""Pallas kernels for the sequential part of the chunk engine: the inter-chunk state pass.

Phase 1 of the engine (chunked.chunk_factors) gives, for every chunk c of every (batch row,
head), the chunk's transition in factored form and an output map of the state S_c entering
it:

    S_{c+1} = gamma_c * S_c + Z_c^T U_c,   U_c = X_c - [W_c; 0] S_c,   o_c = Qs_c S_c + O0_c,

gamma_c [K] (the decay across the chunk), Z_c [n, K] (keys decayed to the chunk end), W_c
[ne, K] (the probes of Z's first ne rows; absent for GLA), X_c [n, V], Qs_c [C, K], O0_c [C,
V], or where W is absent O0_c = QF_c X_c from the products QF_c [C, n]. At a chunk that
starts a sequence (src_c >= 0) the state is reset to the initial state h0[src_c] instead,
and at a sequence's last chunk (dst_c >= 0) S_{c+1} is that sequence's final state. The
forward kernel runs this recurrence with S in float32, parallel over (batch * heads, V
blocks), and writes o, the final states and, for the backward, every S_c. The rows of Z, W
and X, and the query rows of Qs and o, go through the dots in blocks of RB = min(C, 64) (one
or two blocks for the delta family, more for rank-r ops), so the tiles on chip grow neither
with the rank nor with the chunk.

O0_c = QF_c X_c (GLA: X_c is the values) is formed here rather than in phase 1, whose
programs would otherwise read the values only for it: on the H100 at B=4, T=4096, H=16,
K=V=128 this took GLA from 1.40 to 1.35 ms forward and from 4.91 to 4.64 forward+backward
(phase 1's kernels -0.35 ms, XLA's copy of dO0 and sums of the dQF partials -0.14, this
file's kernels +0.21, of which the gradient kernel +0.17). There X is the values as given,
which the kernels read in their dtype (16-bit: half the bytes, and no float32 copy in XLA)
and whose cotangent they write in it (GLA 1.35 -> 1.30 ms forward, 4.65 -> 4.51
forward+backward). For the forms with probed rows phase 1 forms O0 with X0 (X's probed
rows), and forming [QE | QF] X here instead cost more than it saved: kda 7.58 -> 8.07 ms,
the gradient kernel 1.02 -> 1.50 and the forward 0.51 -> 0.71 (benchmarks/NOTES.md,
twentieth session).

Why factors and not M = Diag(gamma) - Z_E^T W: at C=64, K=V=128 the factors Z, W, X are
96 KB of float32 per chunk where M and Bc are 128 KB, and forming M, Bc was two batched
XLA matmuls forward (0.7 ms of 3.0 for gated_delta_rule at B=4, T=4096, H=16 on the H100)
and more in the backward. The kernel does the same dot FLOPs either way (W S and Z^T U are
C x K x V each, M S is K x K x V, with C = K/2).

Saved for the backward: the factors and Qs (phase 1's outputs, already in memory; X only
where the gradient kernel reads it: plain rows or QF), S_in, K*V*4 bytes per chunk (64 KB at
K=V=128; 268 MB at B=4, T=4096, H=16, C=64), and U_c = X_c - W_c S_c on the probed rows (ne*V*4
bytes per chunk, in place of X's for the delta family: no more memory at that shape).
Recomputing S_in instead would need a second forward scan (the reverse recurrence needs S_c
in descending c) or storing every (1/r)-th state and re-scanning segments; at these sizes one
extra fp32 state per chunk is the cheaper choice. U is the forward's own intermediate: saved,
the gradient kernel forms no W S and holds no W rows (on the H100 at the shape above: the
gradient kernel 1.02 -> 0.89 ms for kda, 1.41 -> 1.26 for rank-1 dplr, 1.95 -> 1.66 for
hdla; the forward kernel, writing it, +0.06 to +0.07; benchmarks/NOTES.md, twenty-first
session).

The backward has a sequential half and a parallel half. With G_c the cotangent of S_{c+1} as
produced by chunk c (at a sequence's last chunk the final state's cotangent dfin[dst_c]: its
successor resets), the sequential kernel runs the transposed recurrence from the last chunk
down and writes every G_c (K*V*4 bytes per chunk, like S_in):

    dS_c = gamma_c * G_c - W_c^T (Z_c G_c)[:ne] + Qs_c^T do_c,
    G_{c-1} = 0 and dh0[src_c] += dS_c if chunk c resets, else G_{c-1} = dS_c.

The final states come out of the kernel, not from S_in (its gather and the final transition
in XLA): so the backward reads no dense cotangent of S_in, which was zero but at the final
chunks (a 268 MB zero-filled array at the shape above, written and read per call).

Then one program per chunk (all of V, so nothing is left to sum over V blocks) forms

    dX_c = Z_c G_c,  dZ_c = U_c G_c^T (U_c: X_c on rows without probes),  dW_c = -dX_c[:ne] S_c^T,
    dgamma_c = rowsum(G_c * S_c),  dQs_c = do_c S_c^T,  dO0_c = do_c
    (with QF_c: dX_c += QF_c^T do_c and dQF_c = do_c X_c^T instead of dO0_c).

One kernel doing both (each V block writing partial dZ, dW, dQs for XLA to sum) took 2.2 ms
on the H100 at B=4, T=4096, H=16, K=V=128 against 0.7 for the forward: seven dependent dots
per chunk on the sequential path instead of three.

Two launch forms share the per-chunk math (`_forward_chunk`, `_backward_chunk`):
- "loop" (GPU through Triton, and the CPU in interpret mode): grid (B*H, V/BV), a fori_loop
  over chunks inside the kernel, S in registers. Blocks are powers of two, dots are 2-D.
- "grid" (TPU through Mosaic): grid (B*H, V/BV, NC) with the chunk axis last ("arbitrary"),
  S in a VMEM scratch buffer, the reset sources in SMEM.
The parallel gradient kernel has grid (B*H, NC) in both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton


@dataclasses.dataclass(frozen=True)
class Launch:
    """Triton launch parameters of one kernel: V block per program (None: all of V), warps,
    software-pipelining stages."""

    block_v: int | None = None
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """How to launch the state pass (hashable: a static argument of the custom_vjp).

    form: "loop" (Triton GPU / CPU interpret) or "grid" (Mosaic TPU); interpret: False, True,
    or a pltpu.InterpretParams(); precision: of the in-kernel dots for float32 inputs (a
    lax.Precision or a lax.DotAlgorithmPreset: on the GPU TF32_TF32_F32_X3, three tf32 passes,
    because Triton's IEEE float32 dot is ~200x slower); precision_16bit: for bf16/fp16 inputs
    (HIGH: tf32 on the GPU, bf16x3 on the TPU); fwd, bwd, grads: launch parameters of the
    forward, the sequential backward and the parallel gradient kernel (its block_v: the value
    columns per pass, None: 64);
    products: (forward, backward) launch of phase 1's decayed-product kernels (decayed.py,
    "loop" form only), or None to leave them to XLA (engine.py); scalar_products: likewise
    for the products of scalar decays (one per token); factors: likewise for the rest of
    phase 1 of rank-1 forms (factors.py); max_k: the largest padded
    key width the state pass takes (None: any), wider states use XLA's scan (engine.py).
    """

    form: str = "loop"
    interpret: object = False
    precision: object = jax.lax.Precision.HIGHEST
    precision_16bit: object = jax.lax.Precision.HIGH
    fwd: Launch = Launch()
    bwd: Launch = Launch()
    grads: Launch = Launch()
    products: tuple[Launch, Launch] | None = None
    scalar_products: tuple[Launch, Launch] | None = None
    factors: tuple[Launch, Launch] | None = None
    max_k: int | None = None


def _div(a, b):
    """a // b for nonnegative ints; lax.div needs no sign() (Mosaic lowers sign only on a TPU)."""
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def _rem(a, b):
    return jax.lax.rem(a, jnp.asarray(b, a.dtype))


LOG2E = 1.4426950408889634  # exp(x) = 2^(x LOG2E)


def _exp(x):
    """exp in kernels, as 2^(x log2 e): JAX lowers exp of float32 for Triton to libdevice's
    __nv_expf (nine instructions: range reduction, then MUFU.EX2 and a rescale), exp2 to one
    MUFU.EX2 (flushing subnormal results to zero, which these decay factors <= 1 may); relative
    error ~2 ulp. The diagonal kernels of decayed.py skip the multiply by working in base 2."""
    return jnp.exp2(x * LOG2E)


def _dot(a, b, precision, trans_a=False, trans_b=False):
    """2-D a @ b (a^T, b^T on request), accumulated in float32 (float64 for float64 inputs:
    exact in the CPU interpreter; Triton's dots compute float64 inputs in float32, which the
    state pass avoids by casting, and phase 1's kernels inherit under x64 on a GPU)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if isinstance(precision, jax.lax.Precision):
        precision = (precision, precision)
    return jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def _mask_dot(mask, x, exact, trans_a=False):
    """mask @ x (mask^T @ x with trans_a) for a bool mask, at float32 accuracy: the sums of log
    decays and of their gradients. With the GPU's `exact`, the three-pass TF32_TF32_F32_X3,
    two passes suffice, since the 0/1 factor is exact in tf32: x = hi + lo with hi its top 10
    mantissa bits (exact in tf32: mask @ hi is exact but for the float32 accumulation) and lo
    rounded to tf32 (2^-21 of x), as the preset's passes round them; its third pass, with the
    mask's low part, is zero. Other precisions: one dot at `exact`."""
    m = mask.astype(x.dtype)
    if exact != jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 or x.dtype != jnp.float32:
        return _dot(m, x, exact, trans_a)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFE000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    tf32 = jax.lax.Precision.HIGH
    return _dot(m, hi, tf32, trans_a) + _dot(m, x - hi, tf32, trans_a)


# Operand names of the kernels, in call order; each op has "o0" or "qf", and "w" (with "dw",
# and the forward's saved U: "u") only with probed rows.
_FWD_IN = ("src", "dst", "gam", "z", "w", "x", "qs", "o0", "qf", "h0")
_BWD_IN = ("src", "dst", "gam", "z", "w", "qs", "do", "dfin")
_GRAD_IN = ("sin", "g", "z", "u", "x", "qf", "do")
_GRAD_OUT = ("dgam", "dz", "dw", "dx", "dqs", "dqf")
_GRAD_OF = {"dw": "u", "dqf": "qf"}  # a part's cotangent, and the input that says it exists
_V_BLOCKED = ("x", "u", "o0", "o", "sin", "do", "g")
# "loop" form: blocks of [B, NC * C, H, V], the tokens' layout (X and its cotangent too where
# X is given so: state_pass's x_tokens)
_TOKEN_ROWS = ("o", "do")
_X_TOKEN_ROWS = ("x", "dx")
_STATES = ("h0", "dh0", "fin", "dfin")  # [B, Nb, H, K, V]: one state per sequence a row holds


def _outputs(names, ins):
    """names less the cotangents of parts the op lacks (dw: probed rows, dqf: QF)."""
    return tuple(n for n in names if n not in _GRAD_OF or _GRAD_OF[n] in ins)


def _row_blocks(r, rb, probed_only=False):
    """Static (rows, probed) per block of rb rows of Z / X: probed rows also have W (and U)."""
    n = r["z"].shape[-2]
    ne = next((r[p].shape[-2] for p in ("w", "u") if p in r), 0)
    return [(pl.ds(i, rb), i < ne) for i in range(0, ne if probed_only else n, rb)]


def _query_blocks(C, rb):
    """Static blocks of (at most) rb of a chunk's C query rows (of Qs, o, do)."""
    rb = min(rb, C)
    return [pl.ds(i, rb) for i in range(0, C, rb)]


def _chunk_rows(ref, c, rows, C):
    """The index of chunk c's rows `rows` (a static pl.ds of its C) in o, its cotangent or X:
    a [NC, C, BV] block (the "grid" form's [1, C, BV]), or the "loop" form's [NC * C, BV] (one
    batch row and head of the tokens' layout, _TOKEN_ROWS)."""
    return (c, rows) if ref.ndim == 3 else (pl.ds(c * C + rows.start, rows.size),)


def _forward_chunk(c, src, dst, S, r, *, rb, precision, scale):
    """One chunk of the forward recurrence: reset, save S_c (when "sin" is an output), write
    o_c = scale (Qs_c S_c + O0_c), and S_{c+1} as final state dst if dst >= 0; returns
    S_{c+1}. r: the kernel's refs by name."""
    S = jnp.where(src >= 0, r["h0"][jnp.maximum(src, 0)].astype(jnp.float32), S)
    if "sin" in r:
        r["sin"][c] = S
    C = r["qs"].shape[-2]
    queries = _query_blocks(C, rb)

    def write(q, o):
        r["o"][_chunk_rows(r["o"], c, q, C)] = (scale * o).astype(r["o"].dtype)

    o = []  # with QF, the rows' Qs S, to which O0 = QF X adds with X's blocks
    for q in queries:
        oq = _dot(r["qs"][c, q], S, precision)
        if "qf" in r:
            o.append(oq)
        else:  # written now: no o tile live through the update (kda: 0.05 ms on the H100)
            write(q, oq + r["o0"][c, q])
    out = r["gam"][c] * S
    # X's blocks loaded once (o first, loading them twice, took gla's forward kernel 1.35 ->
    # 1.42 ms on the H100)
    for rows, probed in _row_blocks(r, rb):
        U = r["x"][_chunk_rows(r["x"], c, rows, C)].astype(jnp.float32)
        if "qf" in r:
            o = [oq + _dot(r["qf"][c, q, rows], U, precision) for oq, q in zip(o, queries)]
        if probed:
            U = U - _dot(r["w"][c, rows], S, precision)
            if "u" in r:  # saved for the gradient kernel
                r["u"][c, rows] = U
        out = out + _dot(r["z"][c, rows], U, precision, trans_a=True)
    for q, oq in zip(queries, o):
        write(q, oq)

    @pl.when(dst >= 0)
    def _():
        r["fin"][jnp.maximum(dst, 0)] = out

    return out


def _backward_chunk(c, src, dst, G, r, *, rb, precision, scale):
    """One chunk of the reverse recurrence: saves G_c; returns G_{c-1}."""
    # A sequence's last chunk: its S_{c+1} is the final state (the next chunk resets).
    G = jax.lax.cond(dst >= 0, lambda: G + r["dfin"][jnp.maximum(dst, 0)], lambda: G)
    r["g"][c] = G
    dS = r["gam"][c] * G
    C = r["qs"].shape[-2]
    for rows in _query_blocks(C, rb):
        do = scale * r["do"][_chunk_rows(r["do"], c, rows, C)].astype(jnp.float32)  # o's dtype
        dS = dS + _dot(r["qs"][c, rows], do, precision, trans_a=True)
    for rows, _ in _row_blocks(r, rb, probed_only=True):
        dU = _dot(r["z"][c, rows], G, precision)
        dS = dS - _dot(r["w"][c, rows], dU, precision, trans_a=True)
    reset = src >= 0

    @pl.when(reset)
    def _():
        i = jnp.maximum(src, 0)
        r["dh0"][i] = r["dh0"][i] + dS

    return jnp.where(reset, jnp.zeros_like(dS), dS)


def _grads_kernel(*refs, names, rb, bv, precision, sync, scale):
    """The factors' and Qs's gradients of one chunk from its S_c and G_c (and the forward's U_c
    on the probed rows), all of V in blocks of bv columns. One [rb, K] float32 accumulator is
    live at a time (dQs of each query row block, dZ of each row block of Z, dW of each probed
    one, then QF's of each query block); S and G are re-read per pass (from L2) rather than
    held, and dW = -dX S^T reads dX back from its output (sync: on the GPU, after a barrier,
    since other threads wrote it) rather than keeping Z's rows live beside dW's accumulator."""
    r = dict(zip(names, refs))
    V = r["sin"].shape[1]
    cols = [pl.ds(j, bv) for j in range(0, V, bv)]
    queries = _query_blocks(r["dqs"].shape[-2], rb)
    load = lambda name, col: r[name][:, col]
    do = lambda rows, col: scale * r["do"][rows, col].astype(jnp.float32)  # in o's dtype
    dgam = 0.0
    for col in cols:
        dgam = dgam + jnp.sum(load("g", col) * load("sin", col), axis=1, keepdims=True)
    r["dgam"][...] = dgam
    for rows in queries:
        dqs = 0.0
        for col in cols:
            dqs = dqs + _dot(do(rows, col), load("sin", col), precision, trans_b=True)
        r["dqs"][rows] = dqs
    for rows, _ in _row_blocks(r, rb):
        Zb = r["z"][rows]
        for col in cols:
            dX = _dot(Zb, load("g", col), precision)
            if "qf" in r:  # through O0 = QF X
                for q in queries:
                    dX = dX + _dot(r["qf"][q, rows], do(q, col), precision, trans_a=True)
            r["dx"][rows, col] = dX.astype(r["dx"].dtype)
    for rows, probed in _row_blocks(r, rb):
        dZ = 0.0
        for col in cols:  # U = X - W S on the probed rows, X on the others
            U = r["u" if probed else "x"][rows, col].astype(jnp.float32)
            dZ = dZ + _dot(U, load("g", col), precision, trans_b=True)
        r["dz"][rows] = dZ
        if "qf" in r:
            for q in queries:
                dQ = 0.0
                for col in cols:
                    dQ = dQ + _dot(do(q, col), r["x"][rows, col].astype(jnp.float32),
                                   precision, trans_b=True)
                r["dqf"][q, rows] = dQ
    if "u" not in r:
        return
    if sync:
        pl_triton.debug_barrier()
    for rows, _ in _row_blocks(r, rb, probed_only=True):
        dW = 0.0
        for col in cols:
            dW = dW - _dot(r["dx"][rows, col], load("sin", col), precision, trans_b=True)
        r["dw"][rows] = dW


# ---- sequential kernels: "loop" form (Triton on GPU, interpret mode on the CPU) and "grid"
# form (Mosaic on TPU: chunk axis last, state in VMEM scratch) ------------------------------

def _clear(ref):
    """Zeros a [Nb, K, BV] block of states (written or accumulated per sequence)."""
    def body(n, carry):
        ref[n] = jnp.zeros(ref.shape[1:], ref.dtype)
        return carry

    jax.lax.fori_loop(0, ref.shape[0], body, 0)


def _loop_forward_kernel(*refs, names, rb, precision, scale):
    r = dict(zip(names, refs))
    NC = r["src"].shape[0]
    _, K, BV = r["fin"].shape
    _clear(r["fin"])

    def body(c, S):
        return _forward_chunk(c, r["src"][c], r["dst"][c], S, r, rb=rb, precision=precision,
                              scale=scale)

    jax.lax.fori_loop(0, NC, body, jnp.zeros((K, BV), jnp.float32))


def _loop_backward_kernel(*refs, names, rb, precision, scale):
    r = dict(zip(names, refs))
    NC, K, BV = r["g"].shape
    _clear(r["dh0"])

    def body(i, G):
        c = NC - 1 - i
        return _backward_chunk(c, r["src"][c], r["dst"][c], G, r, rb=rb, precision=precision,
                               scale=scale)

    jax.lax.fori_loop(0, NC, body, jnp.zeros((K, BV), jnp.float32))


def _grid_forward_kernel(*refs, names, H, rb, precision, scale):
    r, s_ref = dict(zip(names, refs)), refs[-1]
    b, c = _div(pl.program_id(0), H), pl.program_id(2)

    @pl.when(c == 0)
    def _():
        r["fin"][...] = jnp.zeros_like(r["fin"])

    s_ref[...] = _forward_chunk(0, r["src"][b, c], r["dst"][b, c], s_ref[...], r, rb=rb,
                                precision=precision, scale=scale)


def _grid_backward_kernel(*refs, names, H, rb, precision, scale):
    r, g_ref = dict(zip(names, refs)), refs[-1]
    b, i = _div(pl.program_id(0), H), pl.program_id(2)
    NC = pl.num_programs(2)

    @pl.when(i == 0)
    def _():
        r["dh0"][...] = jnp.zeros_like(r["dh0"])
        g_ref[...] = jnp.zeros_like(g_ref)

    g_ref[...] = _backward_chunk(0, r["src"][b, NC - 1 - i], r["dst"][b, NC - 1 - i],
                                 g_ref[...], r, rb=rb, precision=precision, scale=scale)


def _params(cfg, launch, semantics):
    """Compiler parameters: Triton's launch ("loop" form) or Mosaic's dimension semantics."""
    if cfg.interpret:
        return None
    if cfg.form == "grid":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return pl_triton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _sequential(cfg, launch, ins, outs, state, H, rb, reverse, scale, tokens=_TOKEN_ROWS):
    """pallas_call of the forward (reverse=False) or backward sequential kernel over named
    [BH, NC, a, b] inputs (and src, dst [B, NC], the states h0, dh0, fin, dfin [B, Nb, H, K,
    V], and in the "loop" form those named in `tokens`, [B, NC * C, H, V]: o, do, and X where
    state_pass takes it so) and (name, shape, dtype) outputs, for
    a state of shape `state` = (K, V), o = scale (Qs S + O0): grid (BH, V/BV) with the whole
    chunk axis per program ("loop"), or (BH, V/BV, NC) with one chunk per step, descending if
    reverse ("grid")."""
    BH, NC = ins["z"].shape[:2]
    K, V = state
    BV = launch.block_v
    grid_form = cfg.form == "grid"
    at = (lambda i: NC - 1 - i) if reverse else (lambda i: i)

    def spec(name, shape):
        vj = name in _V_BLOCKED
        bv = BV if vj else shape[-1]
        if name in ("src", "dst"):
            return (pl.BlockSpec(memory_space=pltpu.SMEM) if grid_form else
                    pl.BlockSpec((None, NC), lambda bh, j: (_div(bh, H), 0)))
        if name in _STATES:
            index = lambda bh, j, *i: (_div(bh, H), 0, _rem(bh, H), 0, j)
            return pl.BlockSpec((None, shape[1], None, shape[3], BV), index)
        if grid_form:
            return pl.BlockSpec((None, 1, shape[2], bv),
                                lambda bh, j, i: (bh, at(i), 0, j if vj else 0))
        if name in tokens:
            return pl.BlockSpec((None, shape[1], None, BV),
                                lambda bh, j: (_div(bh, H), 0, _rem(bh, H), j))
        return pl.BlockSpec((None, NC, shape[2], bv), lambda bh, j: (bh, 0, 0, j if vj else 0))

    names = tuple(ins) + tuple(n for n, *_ in outs)
    if grid_form:
        kernel = _grid_backward_kernel if reverse else _grid_forward_kernel
        kernel = functools.partial(kernel, names=names, H=H, rb=rb, precision=cfg.precision,
                                   scale=scale)
        grid, scratch = (BH, V // BV, NC), [pltpu.VMEM((K, BV), jnp.float32)]
    else:
        kernel = _loop_backward_kernel if reverse else _loop_forward_kernel
        kernel = functools.partial(kernel, names=names, rb=rb, precision=cfg.precision,
                                   scale=scale)
        grid, scratch = (BH, V // BV), ()
    return pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in outs],
        grid=grid, in_specs=[spec(n, x.shape) for n, x in ins.items()],
        out_specs=[spec(n, shape) for n, shape, _ in outs], scratch_shapes=scratch,
        interpret=cfg.interpret,
        compiler_params=_params(cfg, launch, ("parallel", "parallel", "arbitrary")),
        name="dplr_state_pass_" + ("bwd" if reverse else "fwd"))(*ins.values())


def _grads(cfg, ins, rb, H, qs_shape, scale, tokens=_TOKEN_ROWS):
    """The parallel half of the backward: one program per (batch * head, chunk); the inputs
    and outputs named in `tokens` in the tokens' layout (_sequential)."""
    BH, NC, K, V = ins["sin"].shape
    C = qs_shape[2]
    shapes = {"dgam": (BH, NC, K, 1), "dqs": qs_shape, "dz": ins["z"].shape,
              "dx": ins["x"].shape if "dx" in tokens else ins["z"].shape[:3] + (V,)}
    if "u" in ins:
        shapes["dw"] = ins["u"].shape[:3] + (K,)
    if "qf" in ins:
        shapes["dqf"] = ins["qf"].shape
    names = _outputs(_GRAD_OUT, ins)
    chunk = lambda shape: pl.BlockSpec((None, None) + shape[2:], lambda bh, c: (bh, c, 0, 0))
    rows = pl.BlockSpec((None, C, None, V), lambda bh, c: (_div(bh, H), c, _rem(bh, H), 0))
    spec = lambda name, shape: (rows if name in tokens and cfg.form == "loop"
                                else chunk(shape))
    # Column blocks (cfg.grads.block_v, None: 64) keep the GPU's tiles small; on the TPU a
    # 64-lane slice of a 128-lane tile would cost relayouts, so it takes all of V at once.
    bv = V if cfg.form == "grid" else min(V, cfg.grads.block_v or 64)
    kernel = functools.partial(_grads_kernel, names=tuple(ins) + names, rb=rb, bv=bv,
                               precision=cfg.precision,
                               sync=cfg.form == "loop" and not cfg.interpret, scale=scale)
    # dX in X's dtype: 16-bit where X is the values as given (then without probed rows, so
    # that dW reads back no rounded dX).
    dtype = lambda n: ins["x"].dtype if n == "dx" and "x" in ins else jnp.float32
    res = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct(shapes[n], dtype(n)) for n in names],
        grid=(BH, NC), in_specs=[spec(n, x.shape) for n, x in ins.items()],
        out_specs=[spec(n, shapes[n]) for n in names], interpret=cfg.interpret,
        compiler_params=_params(cfg, cfg.grads, ("parallel", "parallel")),
        name="dplr_state_pass_grads")(*ins.values())
    return dict(zip(names, res))


# ---- differentiable entry point ----------------------------------------------------------------

def _pick(names, **arrays):
    return {n: arrays[n] for n in names if arrays[n] is not None}


def _o_shape(cfg, H, qs_shape, V):
    """o, and its cotangent: in the "loop" form (GPU) written in the tokens' layout [B, NC * C,
    H, V] that the op returns (for T a multiple of C a reshape away; the move to it took 0.046
    ms of kda's forward at B=4, T=4096, H=16 on the H100 and do's 0.045 of its backward), in
    the "grid" form (TPU: Mosaic's blocks keep the head axis out of their last two) [B * H, NC,
    C, V]."""
    BH, NC, C, _ = qs_shape
    return (BH // H, NC * C, H, V) if cfg.form == "loop" else (BH, NC, C, V)


def _tokens(x_tokens):
    """The operands in the tokens' layout ("loop" form): o, do, and X, dX where x_tokens."""
    return _TOKEN_ROWS + (_X_TOKEN_ROWS if x_tokens else ())


def _forward(cfg, H, rb, o_dtype, scale, x_tokens, gam, Z, W, X, Qs, O0, QF, h0, src, dst,
             save):
    """The forward kernel: o (in o_dtype; _o_shape), the final states and, with save, every S_c
    (for the backward; 268 MB at B=4, T=4096, H=16, K=V=128, so a call without gradients does
    not write them)."""
    BH, NC, C, K = Qs.shape
    V = X.shape[-1]
    ins = _pick(_FWD_IN, src=src, dst=dst, gam=gam, z=Z, w=W, x=X, qs=Qs, o0=O0, qf=QF, h0=h0)
    outs = [("o", _o_shape(cfg, H, Qs.shape, V), o_dtype), ("fin", h0.shape, jnp.float32)]
    if save:  # and U = X - W S on the probed rows, for the gradient kernel
        outs.append(("sin", (BH, NC, K, V), jnp.float32))
        if W is not None:
            outs.append(("u", (BH, NC, W.shape[-2], V), jnp.float32))
    return _sequential(cfg, cfg.fwd, ins, outs, (K, V), H, rb, reverse=False, scale=scale,
                       tokens=_tokens(x_tokens))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _state_pass(cfg, H, rb, o_dtype, scale, x_tokens, *args):
    return tuple(_forward(cfg, H, rb, o_dtype, scale, x_tokens, *args, save=False))


def _state_pass_fwd(cfg, H, rb, o_dtype, scale, x_tokens, gam, Z, W, X, Qs, O0, QF, h0, src,
                    dst):
    o, fin, S_in, *U = _forward(cfg, H, rb, o_dtype, scale, x_tokens, gam, Z, W, X, Qs, O0, QF,
                                h0, src, dst, save=True)
    U = U[0] if U else None
    # The gradient kernel reads X only where U does not cover it: plain rows, or QF.
    if U is not None and U.shape[-2] == X.shape[-2] and QF is None:
        X = None
    return (o, fin), (gam, Z, W, U, X, Qs, QF, S_in, src, dst, h0.shape)


def _state_pass_bwd(cfg, H, rb, o_dtype, scale, x_tokens, res, cts):
    gam, Z, W, U, X, Qs, QF, S_in, src, dst, h0_shape = res
    do, dfin = cts
    ins = _pick(_BWD_IN, src=src, dst=dst, gam=gam, z=Z, w=W, qs=Qs, do=do, dfin=dfin)
    G, dh0 = _sequential(cfg, cfg.bwd, ins, [("g", S_in.shape, jnp.float32),
                                             ("dh0", h0_shape, jnp.float32)],
                         S_in.shape[-2:], H, rb, reverse=True, scale=scale)
    d = _grads(cfg, _pick(_GRAD_IN, sin=S_in, g=G, z=Z, u=U, x=X, qf=QF, do=do), rb, H,
               Qs.shape, scale, _tokens(x_tokens))
    dO0 = None
    if QF is None:  # O0 was given
        BH, NC, C, _ = Qs.shape
        dO0 = scale * do.astype(jnp.float32)
        if cfg.form == "loop":  # O0's layout
            dO0 = jnp.moveaxis(dO0.reshape(BH // H, NC, C, H, -1), 3, 1).reshape(BH, NC, C, -1)
    return (d["dgam"], d["dz"], d.get("dw"), d["dx"], d["dqs"], dO0, d.get("dqf"), dh0, None,
            None)


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def _pow2(n):
    return max(16, 1 << (n - 1).bit_length())


def _pad_to(x, axis, n):
    if x is None or x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def fit_launches(cfg, rows, probed_rows, Kp, Vp, rb):
    """cfg with the sequential kernels' launches fitted to the shapes: V blocks of at most Vp,
    and pipelining stages lowered to 1 where they would not fit in shared memory.

    Triton's pipelined loads (num_stages > 1) keep that many chunks' tiles in shared memory:
    with one rb-row block of the rows a kernel loads (all rows of Z forward, the probed rows
    backward), K <= 128 and the 16-bit inputs' single-pass dots, 2 stages fit the H100's
    227 KB; in the forward, two blocks (rank-1 DPLR: 245 KB), K = 256 (360 KB) or the float32
    path's 3-pass dots do not, and the backward is held to the same limits (benchmarks/NOTES.md,
    fourth and ninth sessions)."""
    small = Kp <= 128 and cfg.precision == cfg.precision_16bit

    def fit(launch, n):
        return dataclasses.replace(launch, block_v=min(launch.block_v or Vp, Vp),
                                   num_stages=launch.num_stages if small and n <= rb else 1)

    return dataclasses.replace(cfg, fwd=fit(cfg.fwd, rows), bwd=fit(cfg.bwd, probed_rows))


def state_pass(gamma, Z, W, X, Qs, O0, QF, h0, src, dst, cfg: Config, o_dtype=jnp.float32,
               scale=1.0, x_tokens=False):
    """The inter-chunk state pass on factored transitions; differentiable in (gamma, Z, W, X,
    Qs, O0 or QF, h0).

    gamma [B, H, NC, K], Z [B, H, NC, n, K], W [B, H, NC, ne, K] or None, X [B, H, NC, n, V],
    Qs [B, H, NC, C, K], and O0 [B, H, NC, C, V] or (only where W is None) QF [B, H, NC, C, n],
    the other None: O0 = QF X (float32, but for X where W is None: the values, which may be
    16-bit, their cotangent then too; chunked.chunk_factors per chunk; C query rows, n and
    ne multiples of 16); h0 [B, Nb, H, K, V] the initial states that batch
    row b can load; src [B, NC] int32: the index into h0[b] that chunk c resets to, or -1 (no
    reset; chunk 0 of every row must reset); dst [B, NC] int32: the index into the final states of
    row b that the state leaving chunk c is written to, or -1 (the engine names each
    sequence's last chunk; an index no chunk names stays zero). K and V are zero-padded to
    powers of two >= 16. Returns o = scale (Qs S + O0) [B, NC, C, H, V] (the tokens' layout
    in chunks) in o_dtype (the caller's output dtype: o rounded once, by the kernel, and half
    the bytes of float32 for 16-bit outputs; its cotangent arrives in the same dtype) and the
    final states [B, Nb, H, K, V], float32. scale (a Python number) is the op's: the kernels
    apply it to o and to o's cotangent, so that q reaches phase 1 unscaled (api.run_chunked).
    x_tokens ("loop" form only, W None, n = C): X comes as [B, NC, C, H, V], the tokens'
    layout in chunks, as o leaves (the values as given, read where they lie: no move of them
    to the chunk-major layout, and none of their cotangent back).
    """
    B, H, NC, C, K = Qs.shape
    if x_tokens and (cfg.form != "loop" or W is not None
                     or X.shape != (B, NC, C, H, X.shape[-1])):
        raise ValueError(f"state_pass: x_tokens takes X [B, NC, C, H, V] = {(B, NC, C, H)} + "
                         f"(V,), without W, in the \"loop\" form; X {X.shape}, W "
                         f"{None if W is None else W.shape}, form {cfg.form!r}")
    V = X.shape[-1]
    Kp, Vp = _pow2(K), _pow2(V)
    # Rows per block: 64, or the largest power of two dividing the rows of Z and W (the
    # chunk's tokens C, or C * rank, when C < 64).
    rb = min([64] + [x.shape[-2] & -x.shape[-2] for x in (Z, W) if x is not None])
    if rb < 16 or C % min(rb, C):
        raise ValueError(f"state_pass: rows of Z {Z.shape} and W "
                         f"{None if W is None else W.shape} must be multiples of 16, and "
                         f"Qs's {C} rows a multiple of the block {rb} or less")
    shape = lambda x: None if x is None else x.shape
    if (O0 is None) == (QF is None) or (QF is not None and W is not None) or (
            shape(O0) not in (None, Qs.shape[:4] + (V,))
            or shape(QF) not in (None, Qs.shape[:4] + (Z.shape[-2],))):
        raise ValueError(f"state_pass: O0 {shape(O0)} [B, H, NC, C, V] or (without W, here "
                         f"{shape(W)}) QF {shape(QF)} [B, H, NC, C, n] must be given, not both; "
                         f"Qs {Qs.shape}, Z {Z.shape}, X {X.shape}")
    if W is not None and jnp.dtype(X.dtype).itemsize < 4:  # dW reads dX back, unrounded
        raise ValueError(f"state_pass: X ({X.dtype}) must be float32 where W is given; "
                         f"16-bit only for the values of forms without probed rows")
    gamma = _pad_to(gamma, 3, Kp)[..., None]
    Z, W, Qs = (_pad_to(x, 4, Kp) for x in (Z, W, Qs))
    X, O0 = _pad_to(X, 4, Vp), _pad_to(O0, 4, Vp)
    h0 = _pad_to(_pad_to(h0.astype(jnp.float32), 3, Kp), 4, Vp)
    cfg = fit_launches(cfg, Z.shape[-2], 0 if W is None else W.shape[-2], Kp, Vp, rb)
    flat = lambda x: None if x is None else x.reshape((B * H,) + x.shape[2:])
    X = X.reshape(B, NC * C, H, Vp) if x_tokens else flat(X)
    o, finals = _state_pass(cfg, H, rb, jnp.dtype(o_dtype), float(scale), x_tokens,
                            *(flat(x) for x in (gamma, Z, W)), X,
                            *(flat(x) for x in (Qs, O0, QF)), h0, src, dst)
    o = (o.reshape(B, NC, C, H, Vp) if cfg.form == "loop"
         else jnp.moveaxis(o.reshape(B, H, NC, C, Vp), 1, 3))
    return o[..., :V], finals[..., :K, :V]
