"""Pallas kernel for phase 1 of the chunk engine on the delta-rule family (`chunk_summary`).

For an engine form with one probed key per token and no plain keys (m = 1, no F: delta_rule,
gated_delta_rule, kda, and the virtual-token ops hdla and gated_delta_product), one program
per (batch * head, chunk) computes the chunk's summaries

    M [K, K], Bc [K, V], Qs [C, K], O0 [C, V]:   S_C = M S_0 + Bc,  o = Qs S_0 + O0,

exactly what the state pass (state_pass.py) consumes, with the same math as
chunked.chunk_summary and the same numerics, so the forward never builds XLA's [n, c, c, K]
decay temporaries (~2 GB per call at B=4, T=4096, H=16, K=128). Inside a chunk of C tokens,
split into n = C / 16 sub-chunks (every array the kernel holds is 2-D, at least 16 wide):

- gate sums (float32): inclusive / exclusive prefix sums and exclusive suffix sums inside each
  sub-chunk by dots with 16 x 16 triangular ones matrices, sub-chunk totals by a reduction;
  chunk-level prefix/suffix sums and the decay between two sub-chunks are sums of those
  totals. No exponent is a difference of two cumulative sums, and none is positive;
- L[t, s] = P_t^T e^{sum_{s<u<t} g_u} E_s (s < t) and QE[t, s] = q_t^T e^{sum_{s<u<=t} g_u} E_s
  (s <= t) as n x n grids of 16 x 16 blocks: off-diagonal blocks factored through the
  boundary of the query's sub-chunk (query side: prefix inside its sub-chunk; key side:
  suffix inside its sub-chunk plus the whole sub-chunks between); diagonal blocks row by row
  from exact per-pair decays (a running [16, K] exponent, one exp and one reduction per row);
- T = (I + L)^-1 by forward substitution on the 16 x 16 diagonal blocks and block forward
  substitution below them (no triangular_solve, no powers of L);
- W = T (P e^{excl}), X0 = T y, Qs = q e^{incl} - QE W, O0 = QE X0,
  M = Diag(e^{total}) - (E e^{suffix})^T W, Bc = (E e^{suffix})^T X0, all 2-D dots.

Speed (H100, B=4 T=4096 H=16 K=V=128, benchmarks/NOTES.md): correct, but slower than the XLA
phase 1 it replaces (7.3 ms against ~4.3 ms): the per-row loops (16 sequential rows per
diagonal block, each with row loads and cross-thread reductions; 15 per 16 x 16 inverse)
and the many live [16, K] float32 values of a whole chunk in one program dominate.

Gates: per channel [C, K] (kda, hdla), one scalar per token [C] (gated_delta_rule,
gated_delta_product; broadcast over K inside the kernel), or none (delta_rule).

Backward: the custom_vjp recomputes the XLA `chunked.chunk_summary` (vmapped over chunks) and
pulls the cotangents back through it with jax.vjp; a Pallas backward of this phase is not
written yet. The forward saves only its inputs (the engine form, already in memory).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops import chunked as xla_chunked
from dplr_jax.ops.pallas.state_pass import Launch, _dot

SUB = xla_chunked.SUB


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """How to launch the phase-1 kernel (hashable: a static argument of the custom_vjp).

    interpret: False (Triton on the GPU) or True (CPU interpreter); precision: of the dots on
    the data (q, k, v products); gate_precision: of the dots that sum log decays, which must
    be float32-accurate (HIGHEST on the CPU, TF32_TF32_F32_X3 on the GPU); launch: Triton
    warps and stages (block_v unused).
    """

    interpret: object = False
    precision: object = jax.lax.Precision.HIGHEST
    gate_precision: object = jax.lax.Precision.HIGHEST
    launch: Launch = Launch(num_warps=4, num_stages=1)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _gate_rows(g_ref, start, size, K, gate):
    """Log decays of rows [start, start + size) as float32 [size, K] (zeros without a gate)."""
    if gate is None:
        return jnp.zeros((size, K), jnp.float32)
    g = g_ref[pl.ds(start, size)].astype(jnp.float32)
    return g if gate == "channel" else jnp.broadcast_to(g[:, None], (size, K))


def _rows(ref, start, size):
    return ref[pl.ds(start, size), :].astype(jnp.float32)


def _diagonal_blocks(i, q_ref, g_ref, p_ref, E, *, K, gate):
    """Diagonal 16 x 16 blocks (L_ii, QE_ii) of sub-chunk i from exact per-pair decays.

    Row r: d[s] = sum_{s<u<=r} g_u for s <= r (a running sum, extended by one token per row),
    QE[r, s] = sum_k q_r E_s e^{d[s]}, and L[r, s] uses the previous row's exponents
    (sum_{s<u<r} g_u) for s < r.
    """
    s_idx = _iota((SUB, K), 0)
    rows = _iota((SUB, SUB), 0)
    cols = _iota((SUB, SUB), 1)
    base = i * SUB

    def row(r, carry):
        d, ex, Ld, QEd = carry
        p_r = _rows(p_ref, base + r, 1)
        l_r = jnp.sum(p_r * E * ex, axis=1)  # ex = e^{sum_{s<u<r}} from the previous row
        Ld = jnp.where((rows == r) & (cols < r), l_r[None, :], Ld)
        g_r = _gate_rows(g_ref, base + r, 1, K, gate)
        d = jnp.where(s_idx < r, d + g_r, 0.0)
        ex = jnp.exp(d)
        q_r = _rows(q_ref, base + r, 1)
        qe_r = jnp.sum(q_r * E * ex, axis=1)
        QEd = jnp.where((rows == r) & (cols <= r), qe_r[None, :], QEd)
        return d, ex, Ld, QEd

    zero = jnp.zeros((SUB, SUB), jnp.float32)
    init = (jnp.zeros((SUB, K), jnp.float32), jnp.ones((SUB, K), jnp.float32), zero, zero)
    _, _, Ld, QEd = jax.lax.fori_loop(0, SUB, row, init)
    return Ld, QEd


def _unit_lower_inverse_16(L):
    """(I + L)^-1 for a strictly lower-triangular 16 x 16 L by forward substitution on rows."""
    rows = _iota((SUB, SUB), 0)
    cols = _iota((SUB, SUB), 1)

    def row(r, X):
        l_r = jnp.sum(jnp.where(rows == r, L, 0.0), axis=0)  # row r of L, indexed by column
        x_r = jnp.where(_iota((SUB,), 0) == r, 1.0, 0.0) - jnp.sum(l_r[:, None] * X, axis=0)
        return jnp.where(rows == r, x_r[None, :], X)

    return jax.lax.fori_loop(1, SUB, row, jnp.where(rows == cols, 1.0, 0.0))


def _prepare_kernel(q_ref, g_ref, e_ref, y_ref, p_ref, m_ref, bc_ref, qs_ref, o0_ref, *, gate,
                    precision, gate_precision):
    C, K = q_ref.shape
    n = C // SUB
    dot = functools.partial(_dot, precision=precision)
    gdot = functools.partial(_dot, precision=gate_precision)
    r16, c16 = _iota((SUB, SUB), 0), _iota((SUB, SUB), 1)
    ones_incl = jnp.where(c16 <= r16, 1.0, 0.0)  # [t, u]: u <= t
    ones_excl = jnp.where(c16 < r16, 1.0, 0.0)  # u < t
    ones_suffix = jnp.where(c16 > r16, 1.0, 0.0)  # [s, u]: u > s

    # Gate sums per sub-chunk (float32, each a sum over the tokens it covers).
    g = [_gate_rows(g_ref, l * SUB, SUB, K, gate) for l in range(n)]
    sub_incl = [gdot(ones_incl, x) for x in g]
    sub_excl = [gdot(ones_excl, x) for x in g]
    sub_suffix = [gdot(ones_suffix, x) for x in g]
    tot = [jnp.sum(x, axis=0, keepdims=True) for x in g]  # [1, K] per sub-chunk

    def tot_sum(lo, hi):  # sum of whole sub-chunks lo <= l < hi, [1, K]
        acc = jnp.zeros((1, K), jnp.float32)
        for l in range(lo, hi):
            acc = acc + tot[l]
        return acc

    q = [_rows(q_ref, l * SUB, SUB) for l in range(n)]
    E = [_rows(e_ref, l * SUB, SUB) for l in range(n)]
    P = [_rows(p_ref, l * SUB, SUB) for l in range(n)]
    y = [_rows(y_ref, l * SUB, SUB) for l in range(n)]

    # Intra-chunk blocks L[i][j] (strictly lower) and QE[i][j] (lower), j <= i.
    L = [[None] * n for _ in range(n)]
    QE = [[None] * n for _ in range(n)]
    for i in range(n):
        L[i][i], QE[i][i] = _diagonal_blocks(i, q_ref, g_ref, p_ref, E[i], K=K, gate=gate)
        if i == 0:
            continue
        Xp = P[i] * jnp.exp(sub_excl[i])  # probe: decays up to t - 1 inside sub-chunk i
        Xq = q[i] * jnp.exp(sub_incl[i])
        for j in range(i):
            Yh = E[j] * jnp.exp(sub_suffix[j] + tot_sum(j + 1, i))
            L[i][j] = dot(Xp, Yh, trans_b=True)
            QE[i][j] = dot(Xq, Yh, trans_b=True)

    # T = (I + L)^-1: diagonal blocks by forward substitution, then block rows below them.
    Tinv = [[None] * n for _ in range(n)]
    for i in range(n):
        Tinv[i][i] = _unit_lower_inverse_16(L[i][i])
        for j in range(i):
            acc = dot(L[i][j], Tinv[j][j])
            for l in range(j + 1, i):
                acc = acc + dot(L[i][l], Tinv[l][j])
            Tinv[i][j] = -dot(Tinv[i][i], acc)

    # W = T (P e^{excl}), X0 = T y, blockwise; chunk-level exponents from sub-chunk totals.
    Pe = [P[j] * jnp.exp(sub_excl[j] + tot_sum(0, j)) for j in range(n)]
    W, X0 = [], []
    for i in range(n):
        w, x = dot(Tinv[i][0], Pe[0]), dot(Tinv[i][0], y[0])
        for j in range(1, i + 1):
            w = w + dot(Tinv[i][j], Pe[j])
            x = x + dot(Tinv[i][j], y[j])
        W.append(w)
        X0.append(x)

    total = tot_sum(0, n)
    M = jnp.where(_iota((K, K), 0) == _iota((K, K), 1), jnp.exp(total), 0.0)
    Bc = jnp.zeros(bc_ref.shape, jnp.float32)
    for i in range(n):
        qs = q[i] * jnp.exp(sub_incl[i] + tot_sum(0, i))
        o0 = jnp.zeros((SUB, y_ref.shape[1]), jnp.float32)
        for j in range(i + 1):
            qs = qs - dot(QE[i][j], W[j])
            o0 = o0 + dot(QE[i][j], X0[j])
        qs_ref[pl.ds(i * SUB, SUB), :] = qs
        o0_ref[pl.ds(i * SUB, SUB), :] = o0
        Ee = E[i] * jnp.exp(sub_suffix[i] + tot_sum(i + 1, n))
        M = M - dot(Ee, W[i], trans_a=True)
        Bc = Bc + dot(Ee, X0[i], trans_a=True)
    m_ref[...] = M
    bc_ref[...] = Bc


def _pow2(n):
    return max(16, 1 << (n - 1).bit_length())


def _pad_last(x, n):
    return x if x is None or x.shape[-1] == n else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _prepare_call(cfg, q, g, E, y, P):
    """The kernel on flat chunks: q, E, P [N, C, K], y [N, C, V], g None, [N, C] or [N, C, K]
    (K, V powers of two >= 16). Returns float32 M [N, K, K], Bc [N, K, V], Qs, O0."""
    N, C, K = q.shape
    V = y.shape[-1]
    gate = None if g is None else ("scalar" if g.ndim == 2 else "channel")
    spec = lambda *s: pl.BlockSpec((None,) + s, lambda c: (c,) + (0,) * len(s))
    args = [q] + ([] if g is None else [g]) + [E, y, P]
    in_specs = [spec(C, K)] + ([] if g is None else [spec(*g.shape[1:])]) + [
        spec(C, K), spec(C, V), spec(C, K)]
    out_shape = [jax.ShapeDtypeStruct((N, K, K), jnp.float32),
                 jax.ShapeDtypeStruct((N, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((N, C, K), jnp.float32),
                 jax.ShapeDtypeStruct((N, C, V), jnp.float32)]
    out_specs = [spec(K, K), spec(K, V), spec(C, K), spec(C, V)]
    kernel = functools.partial(_prepare_kernel, gate=gate, precision=cfg.precision,
                               gate_precision=cfg.gate_precision)
    if g is None:
        kernel = functools.partial(lambda k, q_ref, *refs: k(q_ref, None, *refs), kernel)
    params = None if cfg.interpret else pl_triton.CompilerParams(
        num_warps=cfg.launch.num_warps, num_stages=cfg.launch.num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(N,), in_specs=in_specs,
                          out_specs=out_specs, interpret=cfg.interpret, compiler_params=params,
                          name="dplr_chunk_prepare")(*args)


def _xla_summaries(q, g, E, y, P):
    """chunked.chunk_summary over flat chunks [N, C, ...] (m = 1 axis restored, no F)."""
    one = lambda x: x[:, :, None, :]
    fn = jax.vmap(lambda q, g, E, y, P: xla_chunked.chunk_summary(q, g, E, y, P, None, None))
    return fn(q, g, one(E), one(y), one(P))


def _padded_call(cfg, q, g, E, y, P):
    K, V = q.shape[-1], y.shape[-1]
    Kp, Vp = _pow2(K), _pow2(V)
    gp = g if g is None or g.ndim == 2 else _pad_last(g, Kp)
    M, Bc, Qs, O0 = _prepare_call(cfg, _pad_last(q, Kp), gp, _pad_last(E, Kp), _pad_last(y, Vp),
                                  _pad_last(P, Kp))
    return M[:, :K, :K], Bc[:, :K, :V], Qs[..., :K], O0[..., :V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _prepare(cfg, q, g, E, y, P):
    return _padded_call(cfg, q, g, E, y, P)


def _prepare_fwd(cfg, q, g, E, y, P):
    return _padded_call(cfg, q, g, E, y, P), (q, g, E, y, P)


def _prepare_bwd(cfg, res, cts):
    q, g, E, y, P = res
    if g is None:
        out, pull = jax.vjp(lambda q, E, y, P: _xla_summaries(q, None, E, y, P), q, E, y, P)
        dq, dE, dy, dP = pull(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))
        return dq, None, dE, dy, dP
    out, pull = jax.vjp(_xla_summaries, q, g, E, y, P)
    return pull(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))


_prepare.defvjp(_prepare_fwd, _prepare_bwd)


def summaries(layout, q, g, E, y, P, cfg: PrepareConfig):
    """Phase 1 over all (batch, head, chunk) with the Pallas kernel; differentiable.

    Same contract as chunked._summaries for an engine form with m = 1 and no F: q [B, T, H, K],
    g None, [B, T, H] or [B, T, H, K], E, P [B, T, H, 1, K], y [B, T, H, 1, V] in the
    accumulation dtype. Returns float32 M [B, H, NC, K, K], Bc [B, H, NC, K, V],
    Qs [B, H, NC, C, K], O0 [B, H, NC, C, V].
    """
    B, H = q.shape[0], q.shape[2]

    def flat(x):  # [B, T, H, ...] -> [B * H * NC, C, ...]
        if x is None:
            return None
        x = jnp.moveaxis(layout.to_chunks(x), 3, 1)
        return x.reshape((-1,) + x.shape[3:])

    outs = _prepare(cfg, flat(q), flat(g), flat(E[..., 0, :]), flat(y[..., 0, :]),
                    flat(P[..., 0, :]))
    return tuple(x.reshape((B, H, layout.NC) + x.shape[1:]) for x in outs)
