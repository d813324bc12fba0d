"""Pallas kernels for the sequential part of the chunk engine: the inter-chunk state pass.

Phase 1 of the engine (chunked.py) gives, for every chunk c of every (batch row, head), an
affine map and an output map of the state S_c entering the chunk:

    S_{c+1} = M_c S_c + Bc_c,        o_c = Qs_c S_c + O0_c,

M_c [K, K] (or diagonal, stored [K, 1]), Bc_c [K, V], Qs_c [C, K], O0_c [C, V]. At a chunk
that starts a sequence (src_c >= 0) the state is reset to the initial state h0[src_c]
instead. The forward kernel runs this recurrence with S in float32, parallel over (batch *
heads, V blocks), and writes o and every S_c.

Saved for the backward: M, Qs (phase 1's outputs, already in memory) and S_in, K*V*4 bytes
per chunk (64 KB at K=V=128: as much as Bc; 268 MB at B=4, T=4096, H=16, C=64). Recomputing
S_in in the backward instead would need a second forward scan (the reverse recurrence needs
S_c in descending c) or storing every (1/r)-th state and re-scanning segments; at these sizes
one extra fp32 state per chunk is the cheaper choice.

The backward kernel runs the transposed recurrence from the last chunk down. With G_c the
cotangent of S_{c+1} as produced by chunk c (zero past a sequence's last chunk: its
successor resets, and the final state's cotangent reaches S_c through the caller's XLA
`finals = M S + Bc`, i.e. through dS_in):

    dM_c = G_c S_c^T,  dBc_c = G_c,  dQs_c = do_c S_c^T,  dO0_c = do_c,
    dS_c = M_c^T G_c + Qs_c^T do_c + dS_in_c,
    G_{c-1} = 0 and dh0[src_c] += dS_c if chunk c resets, else G_{c-1} = dS_c.

dM and dQs contract over V, so each V block writes its partial sum and the wrapper adds them.

Two launch forms share the per-chunk math (`_forward_chunk`, `_backward_chunk`):
- "loop" (GPU through Triton, and the CPU in interpret mode): grid (B*H, V/BV), a fori_loop
  over chunks inside the kernel, S in registers. Blocks are powers of two, dots are 2-D.
- "grid" (TPU through Mosaic): grid (B*H, V/BV, NC) with the chunk axis last ("arbitrary"),
  S in a VMEM scratch buffer, the reset sources in SMEM.
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
    (HIGH: tf32 on the GPU, bf16x3 on the TPU); fwd, bwd: launch parameters per kernel;
    products: (forward, backward) launch of phase 1's decayed-product kernels (decayed.py,
    "loop" form only), or None to leave them to XLA (engine.py); max_k: the largest padded
    key width the state pass takes (None: any), wider states use XLA's scan (engine.py).
    """

    form: str = "loop"
    interpret: object = False
    precision: object = jax.lax.Precision.HIGHEST
    precision_16bit: object = jax.lax.Precision.HIGH
    fwd: Launch = Launch()
    bwd: Launch = Launch()
    products: tuple[Launch, Launch] | None = None
    max_k: int | None = None


def _div(a, b):
    """a // b for nonnegative ints; lax.div needs no sign() (Mosaic lowers sign only on a TPU)."""
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def _rem(a, b):
    return jax.lax.rem(a, jnp.asarray(b, a.dtype))


def _dot(a, b, precision, trans_a=False, trans_b=False):
    """2-D a @ b (a^T, b^T on request), accumulated in float32 (float64 for float64 inputs,
    which only the CPU interpreter sees)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if isinstance(precision, jax.lax.Precision):
        precision = (precision, precision)
    return jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def _forward_chunk(c, src, S, m_ref, bc_ref, qs_ref, o0_ref, h0_ref, o_ref, sin_ref, *, diag,
                   precision):
    """One chunk of the forward recurrence: reset, save S_c, write o_c; returns S_{c+1}."""
    S = jnp.where(src >= 0, h0_ref[jnp.maximum(src, 0)].astype(jnp.float32), S)
    sin_ref[c] = S
    o_ref[c] = (_dot(qs_ref[c], S, precision) + o0_ref[c]).astype(o_ref.dtype)
    m = m_ref[c]
    MS = m * S if diag else _dot(m, S, precision)
    return MS + bc_ref[c]


def _backward_chunk(c, src, G, m_ref, qs_ref, sin_ref, do_ref, dsin_ref, dm_ref, dbc_ref,
                    dqs_ref, dh0_ref, *, diag, precision):
    """One chunk of the reverse recurrence; returns G_{c-1}."""
    S = sin_ref[c]
    do = do_ref[c].astype(jnp.float32)
    m = m_ref[c]
    if diag:
        dm_ref[c] = jnp.sum(G * S, axis=1, keepdims=True)
        dS = m * G
    else:
        dm_ref[c] = _dot(G, S, precision, trans_b=True)
        dS = _dot(m, G, precision, trans_a=True)
    dbc_ref[c] = G
    dqs_ref[c] = _dot(do, S, precision, trans_b=True)
    dS = dS + _dot(qs_ref[c], do, precision, trans_a=True) + dsin_ref[c]
    reset = src >= 0

    @pl.when(reset)
    def _():
        i = jnp.maximum(src, 0)
        dh0_ref[i] = dh0_ref[i] + dS

    return jnp.where(reset, jnp.zeros_like(dS), dS)


# ---- "loop" form: Triton on GPU, interpret mode on the CPU ----------------------------------

def _loop_forward_kernel(src_ref, m_ref, bc_ref, qs_ref, o0_ref, h0_ref, o_ref, sin_ref, *,
                         diag, precision):
    NC, K, BV = sin_ref.shape

    def body(c, S):
        return _forward_chunk(c, src_ref[c], S, m_ref, bc_ref, qs_ref, o0_ref, h0_ref, o_ref,
                              sin_ref, diag=diag, precision=precision)

    jax.lax.fori_loop(0, NC, body, jnp.zeros((K, BV), jnp.float32))


def _loop_backward_kernel(src_ref, m_ref, qs_ref, sin_ref, do_ref, dsin_ref, dm_ref, dbc_ref,
                          dqs_ref, dh0_ref, *, diag, precision):
    NC, K, BV = sin_ref.shape

    def clear(n, carry):
        dh0_ref[n] = jnp.zeros((K, BV), dh0_ref.dtype)
        return carry

    jax.lax.fori_loop(0, dh0_ref.shape[0], clear, 0)

    def body(i, G):
        c = NC - 1 - i
        return _backward_chunk(c, src_ref[c], G, m_ref, qs_ref, sin_ref, do_ref, dsin_ref,
                               dm_ref, dbc_ref, dqs_ref, dh0_ref, diag=diag,
                               precision=precision)

    jax.lax.fori_loop(0, NC, body, jnp.zeros((K, BV), jnp.float32))


def _loop_call(kernel, cfg, launch, grid, in_specs, out_specs, out_shape, name):
    params = None if cfg.interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                          out_specs=out_specs, interpret=cfg.interpret, compiler_params=params,
                          name=name)


def _loop_forward(cfg, M, Bc, Qs, O0, h0, src, H, o_dtype):
    BH, NC, C, K = Qs.shape
    V, Nb, BV = Bc.shape[-1], h0.shape[1], cfg.fwd.block_v
    diag = M.shape[-1] == 1
    row = lambda bh, j: (_div(bh, H), 0)
    per_chunk = lambda bh, j: (bh, 0, 0, 0)
    per_chunk_v = lambda bh, j: (bh, 0, 0, j)
    in_specs = [
        pl.BlockSpec((None, NC), row),
        pl.BlockSpec((None, NC) + M.shape[2:], per_chunk),
        pl.BlockSpec((None, NC, K, BV), per_chunk_v),
        pl.BlockSpec((None, NC, C, K), per_chunk),
        pl.BlockSpec((None, NC, C, BV), per_chunk_v),
        pl.BlockSpec((None, Nb, None, K, BV), lambda bh, j: (_div(bh, H), 0, _rem(bh, H), 0, j)),
    ]
    out_specs = [pl.BlockSpec((None, NC, C, BV), per_chunk_v),
                 pl.BlockSpec((None, NC, K, BV), per_chunk_v)]
    out_shape = [jax.ShapeDtypeStruct((BH, NC, C, V), o_dtype),
                 jax.ShapeDtypeStruct((BH, NC, K, V), jnp.float32)]
    kernel = functools.partial(_loop_forward_kernel, diag=diag, precision=cfg.precision)
    return _loop_call(kernel, cfg, cfg.fwd, (BH, V // BV), in_specs, out_specs, out_shape,
                      "dplr_state_pass_fwd")(src, M, Bc, Qs, O0, h0)


def _loop_backward(cfg, M, Qs, S_in, do, dS_in, src, h0_shape, H):
    BH, NC, C, K = Qs.shape
    V, Nb, BV = S_in.shape[-1], h0_shape[1], cfg.bwd.block_v
    nv = V // BV
    diag = M.shape[-1] == 1
    row = lambda bh, j: (_div(bh, H), 0)
    per_chunk = lambda bh, j: (bh, 0, 0, 0)
    per_chunk_v = lambda bh, j: (bh, 0, 0, j)
    partial_v = lambda bh, j: (bh, j, 0, 0, 0)
    in_specs = [
        pl.BlockSpec((None, NC), row),
        pl.BlockSpec((None, NC) + M.shape[2:], per_chunk),
        pl.BlockSpec((None, NC, C, K), per_chunk),
        pl.BlockSpec((None, NC, K, BV), per_chunk_v),
        pl.BlockSpec((None, NC, C, BV), per_chunk_v),
        pl.BlockSpec((None, NC, K, BV), per_chunk_v),
    ]
    out_specs = [
        pl.BlockSpec((None, None, NC) + M.shape[2:], partial_v),
        pl.BlockSpec((None, NC, K, BV), per_chunk_v),
        pl.BlockSpec((None, None, NC, C, K), partial_v),
        pl.BlockSpec((None, Nb, None, K, BV), lambda bh, j: (_div(bh, H), 0, _rem(bh, H), 0, j)),
    ]
    out_shape = [jax.ShapeDtypeStruct((BH, nv) + M.shape[1:], jnp.float32),
                 jax.ShapeDtypeStruct(S_in.shape, jnp.float32),
                 jax.ShapeDtypeStruct((BH, nv, NC, C, K), jnp.float32),
                 jax.ShapeDtypeStruct(h0_shape, jnp.float32)]
    kernel = functools.partial(_loop_backward_kernel, diag=diag, precision=cfg.precision)
    dM, dBc, dQs, dh0 = _loop_call(kernel, cfg, cfg.bwd, (BH, nv), in_specs, out_specs, out_shape,
                                   "dplr_state_pass_bwd")(src, M, Qs, S_in, do, dS_in)
    return dM.sum(1), dBc, dQs.sum(1), dh0


# ---- "grid" form: Mosaic on TPU (chunk axis last, state in VMEM scratch) ---------------------

def _grid_forward_kernel(src_ref, m_ref, bc_ref, qs_ref, o0_ref, h0_ref, o_ref, sin_ref, s_ref,
                         *, H, diag, precision):
    b, c = _div(pl.program_id(0), H), pl.program_id(2)
    s_ref[...] = _forward_chunk(0, src_ref[b, c], s_ref[...], m_ref, bc_ref, qs_ref, o0_ref,
                                h0_ref, o_ref, sin_ref, diag=diag, precision=precision)


def _grid_backward_kernel(src_ref, m_ref, qs_ref, sin_ref, do_ref, dsin_ref, dm_ref, dbc_ref,
                          dqs_ref, dh0_ref, g_ref, *, H, diag, precision):
    b, i = _div(pl.program_id(0), H), pl.program_id(2)
    NC = pl.num_programs(2)

    @pl.when(i == 0)
    def _():
        dh0_ref[...] = jnp.zeros_like(dh0_ref)
        g_ref[...] = jnp.zeros_like(g_ref)

    g_ref[...] = _backward_chunk(0, src_ref[b, NC - 1 - i], g_ref[...], m_ref, qs_ref, sin_ref,
                                 do_ref, dsin_ref, dm_ref, dbc_ref, dqs_ref, dh0_ref, diag=diag,
                                 precision=precision)


def _grid_params(cfg):
    return None if cfg.interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))


def _grid_forward(cfg, M, Bc, Qs, O0, h0, src, H, o_dtype):
    BH, NC, C, K = Qs.shape
    V, Nb, BV = Bc.shape[-1], h0.shape[1], cfg.fwd.block_v
    diag = M.shape[-1] == 1
    chunk = lambda bh, j, c: (bh, c, 0, 0)
    chunk_v = lambda bh, j, c: (bh, c, 0, j)
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((None, 1) + M.shape[2:], chunk),
        pl.BlockSpec((None, 1, K, BV), chunk_v),
        pl.BlockSpec((None, 1, C, K), chunk),
        pl.BlockSpec((None, 1, C, BV), chunk_v),
        pl.BlockSpec((None, Nb, None, K, BV), lambda bh, j, c: (_div(bh, H), 0, _rem(bh, H), 0, j)),
    ]
    out_specs = [pl.BlockSpec((None, 1, C, BV), chunk_v), pl.BlockSpec((None, 1, K, BV), chunk_v)]
    out_shape = [jax.ShapeDtypeStruct((BH, NC, C, V), o_dtype),
                 jax.ShapeDtypeStruct((BH, NC, K, V), jnp.float32)]
    kernel = functools.partial(_grid_forward_kernel, H=H, diag=diag, precision=cfg.precision)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(BH, V // BV, NC), in_specs=in_specs,
                          out_specs=out_specs, scratch_shapes=[pltpu.VMEM((K, BV), jnp.float32)],
                          interpret=cfg.interpret, compiler_params=_grid_params(cfg),
                          name="dplr_state_pass_fwd")(src, M, Bc, Qs, O0, h0)


def _grid_backward(cfg, M, Qs, S_in, do, dS_in, src, h0_shape, H):
    BH, NC, C, K = Qs.shape
    V, Nb, BV = S_in.shape[-1], h0_shape[1], cfg.bwd.block_v
    nv = V // BV
    diag = M.shape[-1] == 1
    chunk = lambda bh, j, i: (bh, NC - 1 - i, 0, 0)
    chunk_v = lambda bh, j, i: (bh, NC - 1 - i, 0, j)
    partial_v = lambda bh, j, i: (bh, j, NC - 1 - i, 0, 0)
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((None, 1) + M.shape[2:], chunk),
        pl.BlockSpec((None, 1, C, K), chunk),
        pl.BlockSpec((None, 1, K, BV), chunk_v),
        pl.BlockSpec((None, 1, C, BV), chunk_v),
        pl.BlockSpec((None, 1, K, BV), chunk_v),
    ]
    out_specs = [
        pl.BlockSpec((None, None, 1) + M.shape[2:], partial_v),
        pl.BlockSpec((None, 1, K, BV), chunk_v),
        pl.BlockSpec((None, None, 1, C, K), partial_v),
        pl.BlockSpec((None, Nb, None, K, BV), lambda bh, j, i: (_div(bh, H), 0, _rem(bh, H), 0, j)),
    ]
    out_shape = [jax.ShapeDtypeStruct((BH, nv) + M.shape[1:], jnp.float32),
                 jax.ShapeDtypeStruct(S_in.shape, jnp.float32),
                 jax.ShapeDtypeStruct((BH, nv, NC, C, K), jnp.float32),
                 jax.ShapeDtypeStruct(h0_shape, jnp.float32)]
    kernel = functools.partial(_grid_backward_kernel, H=H, diag=diag, precision=cfg.precision)
    dM, dBc, dQs, dh0 = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(BH, nv, NC), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((K, BV), jnp.float32)], interpret=cfg.interpret,
        compiler_params=_grid_params(cfg), name="dplr_state_pass_bwd",
    )(src, M, Qs, S_in, do, dS_in)
    return dM.sum(1), dBc, dQs.sum(1), dh0


_FORMS = {"loop": (_loop_forward, _loop_backward), "grid": (_grid_forward, _grid_backward)}


# ---- differentiable entry point ----------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _state_pass(cfg, H, o_dtype, M, Bc, Qs, O0, h0, src):
    return _FORMS[cfg.form][0](cfg, M, Bc, Qs, O0, h0, src, H, o_dtype)


def _state_pass_fwd(cfg, H, o_dtype, M, Bc, Qs, O0, h0, src):
    o, S_in = _FORMS[cfg.form][0](cfg, M, Bc, Qs, O0, h0, src, H, o_dtype)
    return (o, S_in), (M, Qs, S_in, src, h0.shape)


def _state_pass_bwd(cfg, H, o_dtype, res, cts):
    M, Qs, S_in, src, h0_shape = res
    do, dS_in = cts
    dM, dBc, dQs, dh0 = _FORMS[cfg.form][1](cfg, M, Qs, S_in, do, dS_in, src, h0_shape, H)
    return dM, dBc, dQs, do.astype(jnp.float32), dh0, None


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def _pow2(n):
    return max(16, 1 << (n - 1).bit_length())


def _pad_to(x, axis, n):
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def state_pass(M, Bc, Qs, O0, h0, src, cfg: Config):
    """The inter-chunk state pass; differentiable in (M, Bc, Qs, O0, h0).

    M [B, H, NC, K, K] or [B, H, NC, K] (diagonal), Bc [B, H, NC, K, V], Qs [B, H, NC, C, K],
    O0 [B, H, NC, C, V] (float32); h0 [B, Nb, H, K, V] the initial states that batch row b can
    load; src [B, NC] int32: the index into h0[b] that chunk c resets to, or -1 (no reset;
    chunk 0 of every row must reset). K and V are zero-padded to powers of two >= 16.
    Returns o [B, H, NC, C, V] float32 and S_in [B, H, NC, K, V] float32 (state entering
    each chunk).
    """
    B, H, NC, C, K = Qs.shape
    V = Bc.shape[-1]
    Kp, Vp = _pow2(K), _pow2(V)
    if M.ndim == 4:
        M = M[..., None]
    M = _pad_to(M, 3, Kp)
    if M.shape[-1] != 1:
        M = _pad_to(M, 4, Kp)
    Bc = _pad_to(_pad_to(Bc, 3, Kp), 4, Vp)
    Qs, O0 = _pad_to(Qs, 4, Kp), _pad_to(O0, 4, Vp)
    h0 = _pad_to(_pad_to(h0.astype(jnp.float32), 3, Kp), 4, Vp)
    fit = lambda launch: dataclasses.replace(launch, block_v=min(launch.block_v or Vp, Vp))
    cfg = dataclasses.replace(cfg, fwd=fit(cfg.fwd), bwd=fit(cfg.bwd))
    flat = lambda x: x.reshape((B * H,) + x.shape[2:])
    o, S_in = _state_pass(cfg, H, jnp.float32, flat(M), flat(Bc), flat(Qs), flat(O0), h0, src)
    o = o.reshape(B, H, NC, C, Vp)[..., :V]
    S_in = S_in.reshape(B, H, NC, Kp, Vp)[..., :K, :V]
    return o, S_in
