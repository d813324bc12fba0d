"""Pallas kernels for phase 1's decayed products with per-channel log decays (kda, gla, dplr,
hdla) and with scalar ones: the whole [C, C] intra-chunk matrix of one chunk per program.

chunked.decayed_products needs, per chunk of C tokens and one head,

    D[t, s] = sum_k X[t, k] Y[s, k] exp(sum_{s < u <= t} g[u, k])      (s <= t),

or with probe=True the decay sum over s < u <= t - 1 and only s < t. No exponent may be a
difference of cumulative sums (chunked.py says why). In XLA that costs [16, 16, K] pairwise
tensors for the diagonal 16 x 16 blocks and [n-1, C, K] decayed key factors for the
off-diagonal ones, all written to HBM and read back, in the forward and again in the
backward. Here one program per chunk keeps them on chip. Sub-chunks i = 0..n-1 (16 tokens):

- the diagonal block by rows t with a running [16, K] exponent d[s] = sum_{s<u<=t} g_u (one
  add of g_t per row, one exp and one reduction over K per row); the same loop yields the
  sub-chunk's prefix sums (the query side), its suffix sums (d after the last row) and its
  total, each a sum of the tokens it covers;
- the blocks (i, j < i) as one [16, K] x [K, 16] dot of the query side X_i e^{prefix_i},
  times e^{(whole sub-chunks between j and i)}, against the key side Y_j e^{suffix_j}: every
  factor <= 1, and the exponents add up exactly to the pair's decay sum.

With the ops' log_decay_lower_bound (every g >= L >= -5, `bounded`), the backward's diagonal
blocks need no row loop: the sub-chunk's prefix sums P (one 0/1 dot at float32 precision)
give factors X e^{Pq - m} and Y e^{m - P} around the middle row m, at most e^{8|L|} each,
and dX, dY of the block are two [16, 16] x [16, K] dots (the off-diagonal blocks are
unchanged; their suffix sums and totals are then differences of sums of <= 16 tokens). The
forward keeps its row loop even then: on the H100 every bounded forward tried was slower
than it (benchmarks/NOTES.md).

Backward (custom_vjp; one program per chunk): the same loops give dX (row-block i: diagonal
rows plus the dots with dD_ij) and dY (accumulated per key sub-chunk over the query
sub-chunks after it, kept on chip until the end). The log-decay gradient needs no exponent:
with R = X * dX and Q = Y * dY per channel, the pairs (t, s) whose decay contains g_u are those
with s < u <= t, so dg_u = sum_{t >= u} R_t - sum_{s >= u} Q_s (probe: minus R_u as well),
formed in the kernel after the loops, per sub-chunk from the last: the sum over its rows
t >= u (its total less a cumulative sum: Triton has no reverse one) plus the totals of the
sub-chunks after it. R goes to dg's rows as each sub-chunk's dX is done and comes back after a
barrier. R and Q leave out the pairs whose decay is empty (s = t; probe: s = t - 1): they
cancel in dg, but their float32 rounding would not (with every g at -5, dg was off by 5e-5 to
1.4e-4 relative, benchmarks/decayed_dg_cpu.py); the wrapper adds their dX, dY. Until the
eleventh session XLA formed dg from dX and dY; in the kernel it costs each backward product
0.95 -> 1.17 ms and saves 0.85 ms of XLA's layout moves and 0/1 dots, kda 10.89 -> 10.48 ms
forward+backward on the H100 (benchmarks/NOTES.md: holding R in registers and forming the
pairs without decay by dots in the kernel made it 1.75-2.1 ms).
Nothing is saved but the inputs.

Cost per chunk (C = 64, K = 128, float32): reads 3 C K values (96 KB), writes C^2 (16 KB);
C 16 K exps on the diagonal blocks (131 K) and ~3 C K for the factors; off-diagonal dots
n(n-1)/2 x 2 * 16^2 K = 0.4 MFLOP. At B=4, T=4096, H=16 (4096 chunks): 0.46 GB (0.15 ms
at 3 TB/s) and 0.54 G exps (0.13 ms at 16 exp/clk/SM). What bounds it is instruction issue
at low occupancy (Nsight Compute, benchmarks/NOTES.md, tenth session): 255 registers per
thread leave 2 warps per scheduler, and the row loop's [16, K] tile costs ~16 instructions
per element and row in Triton 3.6's SASS (adds, selects, the reduction's shuffles; 24 while
exp was libdevice's nine-instruction expf, before state_pass._exp). Measured on the H100:
0.72 and 0.77 ms for kda's two forward products (0.85 and 0.77 with libdevice's exp), 1.17
ms backward. Splitting the row steps over programs, splitting the key columns, fusing two
products, running products instead of exps, fewer live registers (sixth session) and
loading x and g rows broadcast to the tile (tenth) were each slower or no faster.

Scalar decays (one per token: gated_delta_rule, gated_delta_product) need no sub-chunks: the
chunk's pairwise decay sums S [C, C] are one scan over t of the masked per-token decays
(sums of the tokens each covers), D = (X Y^T) e^S is one dot, and the backward is three
dots with the log decays' gradient formed in the kernel (a 0/1 dot over s, a masked sum
over t; one program per 64 key columns, XLA adds their shares). On the H100 (kda's L shape,
4 warps): 0.15 ms forward against XLA's 0.27, 0.59 forward+backward against 0.68; Gated
DeltaNet 2.43 -> 2.21 ms forward, 7.60 -> 6.95 forward+backward in one device call
(benchmarks/NOTES.md).

The kernels run on the GPU through Triton and on the CPU in interpret mode; the TPU
configuration keeps XLA's version. K is padded with zeros to a power of two >= 16 (zeros add
nothing); C is a power of two >= 16 (api.py validates chunk_size).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops import chunked
from dplr_jax.ops.pallas.state_pass import LOG2E, Launch, _dot, _exp, _mask_dot, _pad_to, _pow2

SUB = chunked.SUB


class _Cfg(NamedTuple):
    """Static configuration of one kernel pair (hashable: a custom_vjp nondiff argument)."""

    interpret: object
    precision: object  # of the products
    exact: object  # float32-accurate: of the in-kernel prefix sums of the log decays
    bounded: bool  # log decays >= chunked.MIN_BOUND: the backward's diagonal blocks as dots
    fwd: Launch
    bwd: Launch


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _decayed_pairs(probe, boundary=False):
    """[s, t] mask of the pairs whose decay spans at least one token, in a diagonal block (s < t
    - 1 with probe, else s < t), or with boundary=True in the probe block (i, i - 1): all but
    (s = 15, t = 0). The backward leaves the pairs without decay to the wrapper."""
    s, t = _iota((SUB, SUB), 0), _iota((SUB, SUB), 1)
    if boundary:
        return (s != SUB - 1) | (t != 0)
    return s < t - 1 if probe else s < t


def _bounded_block(probe, g, exact):
    """Under the bound (g [16, K] >= MIN_BOUND): the diagonal block's query and key factors
    e^{Pq - m} and e^{m - P} (chunked.bounded_factors: P the prefix sums, by a 0/1 dot at
    float32 precision, m its middle row), and the query-side prefix sums, exclusive suffix
    sums and total that _block_rows yields, here as differences of sums of <= 16 tokens."""
    incl = _mask_dot(_iota((SUB, SUB), 1) <= _iota((SUB, SUB), 0), g, exact)
    total = jnp.sum(g, axis=0, keepdims=True)
    mid = jnp.sum(jnp.where(_iota(g.shape, 0) == SUB // 2 - 1, incl, 0.0), axis=0,
                  keepdims=True)
    pre = incl - g if probe else incl
    return _exp(pre - mid), _exp(mid - incl), pre, total - incl, total


def _block_rows(probe, base, y, x_ref, g_ref, step, init, near=True):
    """The row loop of sub-chunk rows [base, base + 16): step(t, e, keep, x_t, carry) per row
    with e[s, k] = exp(the pair's decay sum), keep[s] the row's valid columns (near=False:
    without the pair that has no decay, s = t, or s = t - 1 with probe) and x_t the row of
    x_ref. With near=True e is already 0 off keep (the running exponent holds -inf on the
    rows s > t, so exp2 zeroes them: no [16, K] select per row), and a step may ignore keep.
    Returns (carry, pre, suffix, total): the query-side prefix sums of the sub-chunk
    (inclusive, or exclusive with probe), its exclusive suffix sums and its total [1, K].

    In the forward without probe the loop adds g_{t+1} after step t (the sums start at row
    0's), so that a step's exp2 never waits on the add of its own row, as with probe; the
    backward without probe adds row t's token first (on the H100 each order was slower in
    the other kernel: benchmarks/NOTES.md, tenth session). The rows of x and g are loaded a
    step ahead. The loop sums g log2(e), so that each e is one exp2 (state_pass._exp), and
    returns the sums in base e."""
    s = _iota(y.shape, 0)
    s1 = _iota((SUB, 1), 0)
    lead = int(near and not probe)  # step t is followed by token t + lead's add
    late = not (probe or near)  # step t is preceded by token t's add

    def reset(u):  # the rows the sums restart at when token u is added: s = u, 0 beyond
        return jnp.where(s1 == u, 0.0, -jnp.inf) if near else 0.0

    def add(d, p, g_u, u):
        return jnp.where(s < u, d + g_u, reset(u)), p + g_u

    def rows(t):  # x row t and g row t + lead (0 past the sub-chunk; clamped into it)
        u = t + lead
        g = g_ref[pl.ds(base + jnp.minimum(u, SUB - 1), 1), :].astype(y.dtype) * LOG2E
        x = x_ref[pl.ds(base + jnp.minimum(t, SUB - 1), 1), :]
        return x, jnp.where(u < SUB, g, 0.0) if lead else g

    def body(t, state):
        d, p, pre, (x_t, g_u), carry = state
        ahead = rows(t + 1)
        if late:
            d, p = add(d, p, g_u, t)
        keep = s1 < t + lead if near else s1 < t - int(probe)
        carry = step(t, jnp.exp2(d), keep, x_t, carry)
        pre = jnp.where(s == t, p, pre)
        if not late:
            d, p = add(d, p, g_u, t + lead)
        return d, p, pre, ahead, carry

    zero = jnp.zeros_like(y)
    p0 = jnp.zeros((1, y.shape[1]), y.dtype)
    d0 = jnp.full_like(y, -jnp.inf) if near else zero  # probe: row 0 sees no pair
    if lead:  # row 0's sums: token 0 added
        d0, p0 = add(d0, p0, g_ref[pl.ds(base, 1), :].astype(y.dtype) * LOG2E, 0)
    d, p, pre, _, carry = jax.lax.fori_loop(0, SUB, body, (d0, p0, zero, rows(0), init))
    ln2 = 1 / LOG2E
    return carry, pre * ln2, d * ln2, p * ln2


def _forward_kernel(x_ref, y_ref, g_ref, d_ref, *, probe, precision):
    C = x_ref.shape[0]
    n = C // SUB
    keys, totals = [], []  # per earlier sub-chunk j: Y_j e^{suffix_j} [16, K], total [1, K]
    for i in range(n):
        rows = pl.ds(i * SUB, SUB)
        Y = y_ref[rows, :]

        def step(t, e, keep, x_t, carry, i=i, Y=Y):  # e is 0 off keep (near=True)
            row = jnp.sum(Y * e * x_t, axis=1)
            d_ref[pl.ds(i * SUB + t, 1), rows] = row[None, :].astype(d_ref.dtype)
            return carry

        _, pre, suffix, total = _block_rows(probe, i * SUB, Y, x_ref, g_ref, step, 0)
        Xq = x_ref[rows, :] * _exp(pre)
        for j in reversed(range(i)):  # between = totals of the sub-chunks j+1 .. i-1
            d_ij = _dot(Xq, keys[j], precision, trans_b=True)
            d_ref[rows, pl.ds(j * SUB, SUB)] = d_ij.astype(d_ref.dtype)
            Xq = Xq * _exp(totals[j])
        for j in range(i + 1, n):
            d_ref[rows, pl.ds(j * SUB, SUB)] = jnp.zeros((SUB, SUB), d_ref.dtype)
        keys.append(Y * _exp(suffix))
        totals.append(total)


def _backward_kernel(x_ref, y_ref, g_ref, ddt_ref, dx_ref, dy_ref, dg_ref, *, probe, precision,
                     exact, bounded, sync):
    C = x_ref.shape[0]
    n = C // SUB
    r16 = _iota((SUB, 1), 0)
    c16 = _iota((SUB, SUB), 1)
    decays, totals, dkeys = [], [], []  # per key sub-chunk j: e^{suffix_j}, total, dY_j so far
    for i in range(n):
        rows = pl.ds(i * SUB, SUB)
        Y = y_ref[rows, :]
        Xq = x_ref[rows, :]
        ddt = ddt_ref[rows, rows]  # (dD_ii)^T: [s, t]
        if bounded:
            eq, ek, pre, suffix, total = _bounded_block(probe, g_ref[rows, :], exact)
            ddt = jnp.where(_decayed_pairs(probe), ddt, 0.0)
            dX = _dot(ddt, Y * ek, precision, trans_a=True) * eq
            dY = _dot(ddt, Xq * eq, precision) * ek
        else:
            def step(t, e, keep, x_t, carry, Y=Y, ddt=ddt):
                dX, dY = carry
                w = jnp.where(keep, jnp.sum(jnp.where(c16 == t, ddt, 0.0), axis=1,
                                            keepdims=True), 0.0)
                we = w * e
                dx_t = jnp.sum(we * Y, axis=0, keepdims=True)
                dX = jnp.where(r16 == t, dx_t, dX)
                return dX, dY + we * x_t

            zero = jnp.zeros_like(Y)
            (dX, dY), pre, suffix, total = _block_rows(probe, i * SUB, Y, x_ref, g_ref, step,
                                                       (zero, zero), near=False)
        eq = _exp(pre)
        for j in reversed(range(i)):
            key = y_ref[pl.ds(j * SUB, SUB), :] * decays[j]
            ddt_ji = ddt_ref[pl.ds(j * SUB, SUB), rows]  # (dD_ij)^T: [s in j, t in i]
            if probe and j == i - 1:  # (first row of i, last of j): no decay, the wrapper's
                ddt_ji = jnp.where(_decayed_pairs(probe, boundary=True), ddt_ji, 0.0)
            dX = dX + _dot(ddt_ji, key, precision, trans_a=True) * eq
            dkeys[j] = dkeys[j] + _dot(ddt_ji, Xq * eq, precision) * decays[j]
            eq = eq * _exp(totals[j])
        dg_ref[rows, :] = (Xq * dX).astype(dg_ref.dtype)  # R, read back below
        dx_ref[rows, :] = dX.astype(dx_ref.dtype)
        decays.append(_exp(suffix))
        totals.append(total)
        dkeys.append(dY)
    # The log decays: dg_u = sum_{t >= u} R_t - sum_{s >= u} Q_s (probe: - R_u as well), by
    # sub-chunks from the last: the sum over the sub-chunk's rows t >= u, as its total less the
    # rows before u, plus the sub-chunks after it.
    if sync:  # the R rows come back to other threads than wrote them
        pl_triton.debug_barrier()
    later = 0.0
    for j in reversed(range(n)):
        rows = pl.ds(j * SUB, SUB)
        dy_ref[rows, :] = dkeys[j].astype(dy_ref.dtype)
        R = dg_ref[rows, :]
        rq = R - y_ref[rows, :] * dkeys[j]
        total = jnp.sum(rq, axis=0, keepdims=True)
        dg = (later + total) - (jnp.cumsum(rq, axis=0) - rq)
        dg_ref[rows, :] = (dg - R if probe else dg).astype(dg_ref.dtype)
        later = later + total


def _acc(ref):
    return jnp.promote_types(ref.dtype, jnp.float32)  # float32 (float64 in interpret mode)


def _scalar_decays(g_row, probe):
    """[t, s] factors e^{S[t, s]} of a chunk's pairs for scalar log decays g_row [1, C], S the
    sum of g_u over s < u <= t (probe: s < u <= t - 1) by a scan over t (sums of the tokens
    each covers), 0 off the pairs (s <= t; probe s < t)."""
    C = g_row.shape[1]
    t, s = _iota((C, C), 0), _iota((C, C), 1)
    p = 1 if probe else 0
    g_t = jnp.sum(jnp.where(s == t - p, g_row, 0.0), axis=1, keepdims=True)  # g[t - p]
    S = jnp.cumsum(jnp.where(t > s + p, g_t, 0.0), axis=0)
    return jnp.where(t >= s + p, _exp(S), 0.0)


def _scalar_forward_kernel(x_ref, y_ref, g_ref, d_ref, *, probe, precision):
    """Scalar decays: the whole chunk as one dot X Y^T times the pairs' decay factors."""
    W = _scalar_decays(g_ref[...].astype(_acc(x_ref)), probe)
    d_ref[...] = (_dot(x_ref[...], y_ref[...], precision, trans_b=True) * W).astype(
        d_ref.dtype)


def _scalar_backward_kernel(x_ref, y_ref, g_ref, dd_ref, dx_ref, dy_ref, dg_ref, *, probe,
                            precision):
    """One program per block of _SCALAR_BLOCK key columns: its columns of dX = (dD e^S) Y and
    dY = (dD e^S)^T X, and its share [1, C] of the log decays' gradient, dg_u = the sum of dD D
    over the pairs whose decay spans u (s < u <= t; probe t - 1; D = X Y^T e^S is a sum over
    the key columns), as a 0/1 dot over s and a masked sum over t; XLA adds the shares. The
    pairs without decay stay out of that sum (they span no token; their float32 rounding
    would enter it as a difference of large terms)."""
    f = _acc(x_ref)
    C, K = x_ref.shape
    kb = min(_SCALAR_BLOCK, K)
    j = pl.program_id(0)
    cols = pl.ds(j * kb, kb)
    X, Y = x_ref[:, cols], y_ref[:, cols]
    A = dd_ref[...].astype(f) * _scalar_decays(g_ref[...].astype(f), probe)
    dx_ref[:, cols] = _dot(A, Y, precision).astype(dx_ref.dtype)
    dy_ref[:, cols] = _dot(A, X, precision, trans_a=True).astype(dy_ref.dtype)
    t, u = _iota((C, C), 0), _iota((C, C), 1)
    p = 1 if probe else 0
    dS = jnp.where(t > u + p, A * _dot(X, Y, precision, trans_b=True), 0.0)  # [t, s]
    before = _dot(dS, (t < u).astype(f), precision)  # [t, u]: the sum over s < u
    dg_ref[pl.ds(j, 1), :] = jnp.sum(jnp.where(t >= u + p, before, 0.0), axis=0,
                                     keepdims=True).astype(dg_ref.dtype)


_SCALAR_BLOCK = 64  # key columns per program of the scalar backward


def _call(kernel, args, outs, interpret, launch, name, grid=()):
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=outs, grid=grid, interpret=interpret,
                          compiler_params=params, name=name)(*args)


def _pad_k(*xs):
    """Zero-pads the key axis (last) to a power of two >= 16."""
    return tuple(_pad_to(x, x.ndim - 1, _pow2(x.shape[-1])) for x in xs)


def _kernel_inputs(X, Y, g):
    """K padded (_pad_k); a scalar decay per token as a row [1, C]."""
    return _pad_k(X, Y) + ((g[None, :],) if g.ndim == 1 else _pad_k(g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _products(X, Y, g, probe, cfg):
    C = X.shape[0]
    out = jax.ShapeDtypeStruct((C, C), X.dtype)
    scalar = g.ndim == 1
    kernel = functools.partial(_scalar_forward_kernel if scalar else _forward_kernel,
                               probe=probe, precision=cfg.precision)
    return _call(kernel, _kernel_inputs(X, Y, g), [out], cfg.interpret, cfg.fwd,
                 "dplr_decayed_scalar_fwd" if scalar else "dplr_decayed_fwd")[0]


def _products_fwd(X, Y, g, probe, cfg):
    return _products(X, Y, g, probe, cfg), (X, Y, g)


def _products_bwd(probe, cfg, res, dD):
    X, Y, g = res
    Xp, Yp, gp = _kernel_inputs(X, Y, g)
    outs = [jax.ShapeDtypeStruct(Xp.shape, X.dtype)] * 2
    K = X.shape[-1]
    if g.ndim == 1:
        kernel = functools.partial(_scalar_backward_kernel, probe=probe,
                                   precision=cfg.precision)
        n = max(Xp.shape[1] // _SCALAR_BLOCK, 1)
        dX, dY, dg = _call(kernel, (Xp, Yp, gp, dD.astype(X.dtype)),
                           outs + [jax.ShapeDtypeStruct((n, gp.shape[1]), g.dtype)],
                           cfg.interpret, cfg.bwd, "dplr_decayed_scalar_bwd", grid=(n,))
        return dX[:, :K], dY[:, :K], dg.sum(axis=0)
    kernel = functools.partial(_backward_kernel, probe=probe, precision=cfg.precision,
                               exact=cfg.exact, bounded=cfg.bounded, sync=not cfg.interpret)
    # dg's rows hold R first (the kernel reads it back): X's dtype, cast to g's at the end.
    dX, dY, dg = _call(kernel, (Xp, Yp, gp, dD.T.astype(X.dtype)),
                       outs + [jax.ShapeDtypeStruct(gp.shape, X.dtype)], cfg.interpret, cfg.bwd,
                       "dplr_decayed_bwd")
    # The pairs (t, t - p) without decay depend on no g: added here, after dg (see above).
    p = 1 if probe else 0
    d = jnp.pad(jnp.diagonal(dD, offset=-p), (p, 0)).astype(X.dtype)[:, None]  # dD[t, t-p]
    dX = dX[:, :K] + d * jnp.pad(Y, ((p, 0), (0, 0)))[:Y.shape[0]]
    dY = dY[:, :K] + jnp.pad((d * X)[p:], ((0, p), (0, 0)))
    return dX, dY, dg[:, :K].astype(g.dtype)


_products.defvjp(_products_fwd, _products_bwd)


def decayed_products(X, Y, g, probe, bounded=False, *, interpret, precision, exact, launch,
                     scalar_launch=None):
    """Drop-in for chunked.decayed_products (one chunk): the kernels for per-channel and
    scalar decays, XLA's version without decay. precision: of the products; exact: a
    float32-accurate one for the bounded path's prefix sums; launch, scalar_launch: (forward,
    backward) Launch of the per-channel and the scalar kernels (scalar_launch None: XLA's
    version for scalar decays)."""
    if g is None or (g.ndim == 1 and scalar_launch is None):
        return chunked.decayed_products(X, Y, g, probe)
    cfg = _Cfg(interpret, precision, exact, bounded, *(scalar_launch if g.ndim == 1 else launch))
    rows = [[_products(X[:, i], Y[:, j], g, probe, cfg) for j in range(Y.shape[1])]
            for i in range(X.shape[1])]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=1)  # [C, a, C, b]
