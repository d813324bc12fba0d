"""Pallas kernels for the exact-decay diagonal sub-blocks of phase 1 (per-channel decays).

With one log decay per key channel, phase 1 (chunked.decayed_products) needs, for every
16-token sub-chunk, the 16 x 16 block

    D[t, s] = sum_k X[t, k] Y[s, k] exp(sum_{s < u <= t} g[u, k])     (s <= t),

or with probe=True the decay sum over s < u <= t - 1 and only s < t. The pairwise exponent
must be a sum over the tokens it spans, not a difference of cumulative sums (chunked.py says
why), so it depends on (t, s, k) and no matmul factors it. XLA materializes it: a
[16, 16, K] float32 tensor per sub-chunk (2 GB per call at B=4, T=4096, H=16, K=128), and the
H100 profile put 3.6 of kda's 7.6 ms forward there (benchmarks/NOTES.md).

Here one program per sub-chunk keeps it in registers. Rows t go in order with a running
[16, K] exponent d[s] = sum_{s<u<=t} g_u (one add of g_t per row: exactly the sum over the
tokens spanned), one exp and one reduction over K per row. Per sub-chunk: reads 3 x 16 x K
values, writes 16 x 16; 16^2 K exps and ~3 * 16^2 K flops.

Backward (custom_vjp): a second kernel recomputes the same exponents row by row and forms

    dX[t] = sum_s dD[t, s] Y[s] e[t, s],     dY[s] = sum_t dD[t, s] X[t] e[t, s];

the decay gradient then needs no exponent: with R = X * dX and Q = Y * dY (per channel), the
pairs (t, s) whose exponent contains g_u are those with s < u <= t, so

    dg_u = sum_{t >= u} R_t - sum_{s >= u} Q_s       (probe: minus R_u as well),

reverse cumulative sums, done in the wrapper (chunked.masked_sums). Nothing is saved but
the inputs.

Launch: grid over sub-chunks (vmapped callers add grid axes; Triton folds them). K is padded
to a power of two >= 16 with zeros, which add nothing. The kernels run on the GPU through
Triton and on the CPU in interpret mode; the TPU configuration keeps XLA's version.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops import chunked
from dplr_jax.ops.pallas.state_pass import Launch


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _rows(probe, y_ref, g_ref, step, init):
    """Runs step(t, e, keep, carry) for rows t = 0..c-1 with e[s, k] = exp(pairwise decay sum)
    and keep[s] the mask of the row's valid columns (both [c, K] / [c, 1] shaped)."""
    c, K = y_ref.shape
    s = _iota((c, K), 0)
    s1 = _iota((c, 1), 0)

    def body(t, carry):
        d, carry = carry
        g_t = g_ref[pl.ds(t, 1), :].astype(d.dtype)
        if probe:  # decays over s < u <= t - 1: the previous row's sums
            carry = step(t, jnp.exp(d), s1 < t, carry)
            d = jnp.where(s < t, d + g_t, 0.0)
        else:
            d = jnp.where(s < t, d + g_t, 0.0)
            carry = step(t, jnp.exp(d), s1 <= t, carry)
        return d, carry

    return jax.lax.fori_loop(0, c, body, (jnp.zeros((c, K), y_ref.dtype), init))[1]


def _forward_kernel(x_ref, y_ref, g_ref, d_ref, *, probe):
    Y = y_ref[...]

    def step(t, e, keep, carry):
        x_t = x_ref[pl.ds(t, 1), :]
        row = jnp.sum(jnp.where(keep, Y * e, 0.0) * x_t, axis=1)  # [c]
        d_ref[pl.ds(t, 1), :] = row[None, :].astype(d_ref.dtype)
        return carry

    _rows(probe, y_ref, g_ref, step, 0)


def _backward_kernel(x_ref, y_ref, g_ref, ddt_ref, dx_ref, dy_ref, *, probe):
    Y = y_ref[...]
    ddt = ddt_ref[...]  # [s, t]: the cotangent transposed, so a row's weights are a column
    cols = _iota(ddt.shape, 1)

    def step(t, e, keep, dY):
        w = jnp.where(keep, jnp.sum(jnp.where(cols == t, ddt, 0.0), axis=1, keepdims=True), 0.0)
        we = w * e  # [c, K]
        dx_ref[pl.ds(t, 1), :] = jnp.sum(we * Y, axis=0, keepdims=True).astype(dx_ref.dtype)
        return dY + we * x_ref[pl.ds(t, 1), :]

    dy_ref[...] = _rows(probe, y_ref, g_ref, step, jnp.zeros_like(Y)).astype(dy_ref.dtype)


def _call(kernel, args, outs, interpret, launch, name):
    """pallas_call over the leading axis of every arg (one sub-chunk per program)."""
    spec = lambda a: pl.BlockSpec((None,) + a.shape[1:], lambda i: (i,) + (0,) * (a.ndim - 1))
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=outs, grid=(args[0].shape[0],),
                          in_specs=[spec(a) for a in args], out_specs=[spec(o) for o in outs],
                          interpret=interpret, compiler_params=params, name=name)(*args)


def _pad_k(*xs):
    K = xs[0].shape[-1]
    Kp = max(16, 1 << (K - 1).bit_length())
    return tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Kp - K)]) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blocks(X, Y, g, probe, interpret, launch):
    n, c, K = X.shape
    out = jax.ShapeDtypeStruct((n, c, c), X.dtype)
    return _call(functools.partial(_forward_kernel, probe=probe), _pad_k(X, Y, g), [out],
                 interpret, launch, "dplr_diagonal_fwd")[0]


def _blocks_fwd(X, Y, g, probe, interpret, launch):
    return _blocks(X, Y, g, probe, interpret, launch), (X, Y, g)


def _blocks_bwd(probe, interpret, launch, res, dD):
    X, Y, g = res
    Xp, Yp, gp = _pad_k(X, Y, g)
    outs = [jax.ShapeDtypeStruct(Xp.shape, X.dtype)] * 2
    dX, dY = _call(functools.partial(_backward_kernel, probe=probe),
                   (Xp, Yp, gp, jnp.swapaxes(dD, 1, 2).astype(X.dtype)), outs, interpret,
                   launch, "dplr_diagonal_bwd")
    K = X.shape[-1]
    dX, dY = dX[..., :K], dY[..., :K]
    R = X * dX
    dg = chunked.masked_sums(R - Y * dY, 1, jnp.less_equal)  # sum over u >= t
    return dX, dY, (dg - R if probe else dg).astype(g.dtype)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def diagonal_blocks(Xs, Ys, gs, probe, *, interpret=False, launch=Launch(num_warps=4,
                                                                          num_stages=1)):
    """Drop-in for chunked.diagonal_blocks: Xs [n, c, a, K], Ys [n, c, b, K], gs [n, c, K]
    -> [n, c, a, c, b] (one kernel call per (a, b) pair)."""
    rows = [[_blocks(Xs[:, :, i], Ys[:, :, j], gs, probe, interpret, launch)
             for j in range(Ys.shape[2])] for i in range(Xs.shape[2])]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=2)
