"""A call without gradients in fewer passes: phase 1's factors formed on chip in the state pass.

With gradients, phase 1 writes each chunk's factored transition (gamma, Z, W, X, Qs, O0:
factors.py) in float32 for the state pass to read, and the backward reads them again. A
call without gradients (pallas.engine's forward-only primal) needs them only once, inside
the state pass. For the forms of one key per token whose probes carry their own decay or
none (delta_rule, gated_delta_rule, kda) and of plain keys only (gla), this kernel forms
them there from the inputs and the C x C products, and never writes them:

    delta family:  W = Tinv (p e^I),  U = Tinv y - W S,  o = (q e^I) S + QE U,
                   S' = gamma S + (E e^S)^T U
    gla:           o = (q e^I) S + QF v,                 S' = gamma S + (k e^S)^T v

(I, S the inclusive prefix and the suffix sums of the log decays in the chunk, gamma e^{the
chunk's sum}: chunked.chunk_factors' algebra, with Qs S + O0 = (q e^I) S + QE (X0 - W S)
regrouped so that Qs and O0 are never formed). Phase 1 before it keeps the intra-chunk
products and the UT inverse (decayed.py, factors._inverse): per chunk, the delta family's
Tinv and QE, gla's QF.

Cost per chunk and 64-column block of V at C = 64, K = 128, float32 on chip: the delta
family reads Tinv and QE (32 KB), q, p and y as given (16-bit: 40 KB), E (32 KB: beta k,
formed by XLA) and writes o (8 KB), where the factors kernel and the state pass read and
wrote ~290 KB per chunk; its dots are W (C x C x K, formed again per V block), Tinv y, W S,
(q e^I) S, QE U, Z^T U: 2.5 M multiply-adds. At B=4, T=4096, H=16, V = 2 blocks on the H100:
0.94 GB (0.31 ms at 3 TB/s) and 41 GFLOP of tf32 (0.08 ms at the dense peak, more at these
tiles' efficiency), on 128 programs, one per SM.

On the GPU ("loop" form; on the CPU in interpret mode) for power-of-two K and V >= 16
(`plan`); other shapes and forms keep the two passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops.pallas import factors
from dplr_jax.ops.pallas.state_pass import _clear, _div, _dot, _exp, _rem

_IN = ("src", "dst", "q", "g", "e", "p", "y", "f", "vk", "ti", "qe", "qf", "h0")
_KEYS = ("q", "e", "p", "f")  # [B, NC, C, H, K]: read whole per chunk
_VALUES = ("y", "vk")  # [B, NC, C, H, V]: a block of columns per program


def _kernel(*refs, names, decay, precision, exact, scale):
    r = dict(zip(names, refs))
    NC, C, K = r["q"].shape
    BV = r["fin"].shape[-1]
    f32 = jnp.float32
    incl_mask, _, suffix_mask = factors._masks(C, C, 1)
    _clear(r["fin"])

    def body(c, S):
        src, dst = r["src"][c], r["dst"][c]
        S = jnp.where(src >= 0, r["h0"][jnp.maximum(src, 0)].astype(f32), S)
        load = lambda name: r[name][c].astype(f32)
        incl = suffix = None
        gamma = 1.0
        if decay is not None:
            g = load("g") if decay == "channel" else r["g"][pl.ds(c, 1), :].astype(f32)
            incl = factors._token_sums(incl_mask, g, decay, exact)
            suffix = factors._token_sums(suffix_mask, g, decay, exact)
            total = jnp.sum(g, axis=0 if decay == "channel" else 1, keepdims=True)
            gamma = _exp(total.T if decay == "channel" else total)  # [K, 1] or [1, 1]
        q = factors._scaled(load("q"), incl)
        if "e" in r:
            W = _dot(r["ti"][c], factors._scaled(load("p"), incl), precision)
            U = _dot(r["ti"][c], load("y"), precision) - _dot(W, S, precision)
            o = _dot(q, S, precision) + _dot(r["qe"][c], U, precision)
            Z = factors._scaled(load("e"), suffix)
        else:
            U = load("vk")
            o = _dot(q, S, precision) + _dot(r["qf"][c], U, precision)
            Z = factors._scaled(load("f"), suffix)
        r["o"][pl.ds(c * C, C)] = (scale * o).astype(r["o"].dtype)
        out = gamma * S + _dot(Z, U, precision, trans_a=True)

        @pl.when(dst >= 0)
        def _():
            r["fin"][jnp.maximum(dst, 0)] = out

        return out

    jax.lax.fori_loop(0, NC, body, jnp.zeros((K, BV), f32))


def _products(q, g, E, y, P, F, Vk, *, decayed, own_decay, cfg):
    """Phase 1 of one chunk as far as the kernel takes it: (Tinv, QE) with probed keys,
    else (QF,)."""
    C = (E if E is not None else F).shape[0]
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])
    L, QE, QF, _ = factors.intra(q, g, flat(E), flat(P), flat(F), C=C, decayed=decayed,
                                 own_decay=own_decay)
    return (QF,) if E is None else (factors._inverse(L, cfg), QE)


def _scan(layout, xs, products, h0, *, cfg, launch, o_dtype, scale):
    """The kernel over all (batch row, head, V block): xs the inputs by kernel name in their
    chunks [B, NC, C, H, ...] (rank axes dropped; g [B, NC, C, H] per token), products phase
    1's [B, H, NC, C, C], h0 [N, H, K, V] float32. Returns o [B, NC, C, H, V] in o_dtype and
    the final states [N, H, K, V]."""
    B, NC, C, H, K = xs["q"].shape
    N = h0.shape[0]
    src, dst = layout.state_rows(N)
    h0 = h0.reshape((B, N // B) + h0.shape[1:])
    V = xs["y" if "y" in xs else "vk"].shape[-1]
    BV = min(launch.block_v or V, V)
    decay = None if "g" not in xs else ("channel" if xs["g"].ndim == 5 else "scalar")
    names = ("ti", "qe") if "e" in xs else ("qf",)
    ins = {"src": src, "dst": dst, **xs, **{n: p.reshape((B * H,) + p.shape[2:])
                                          for n, p in zip(names, products)}, "h0": h0}
    ins = {n: ins[n] for n in _IN if n in ins}
    row, head = lambda bh: _div(bh, H), lambda bh: _rem(bh, H)

    def spec(name, shape):
        if name in ("src", "dst"):
            return pl.BlockSpec((None, NC), lambda bh, j: (row(bh), 0))
        if name in ("h0", "fin"):
            return pl.BlockSpec((None, shape[1], None, K, BV),
                                lambda bh, j: (row(bh), 0, head(bh), 0, j))
        if name == "o":
            return pl.BlockSpec((None, NC * C, None, BV),
                                lambda bh, j: (row(bh), 0, head(bh), j))
        if name in ("ti", "qe", "qf"):
            return pl.BlockSpec((None, NC, C, C), lambda bh, j: (bh, 0, 0, 0))
        if name == "g" and decay == "scalar":
            return pl.BlockSpec((None, NC, C, None), lambda bh, j: (row(bh), 0, 0, head(bh)))
        cols = BV if name in _VALUES else K
        return pl.BlockSpec((None, NC, C, None, cols),
                            lambda bh, j: (row(bh), 0, 0, head(bh), j if name in _VALUES else 0))

    outs = {"o": jax.ShapeDtypeStruct((B, NC * C, H, V), o_dtype),
            "fin": jax.ShapeDtypeStruct(h0.shape, jnp.float32)}
    kernel = functools.partial(_kernel, names=tuple(ins) + tuple(outs), decay=decay,
                               precision=cfg.precision, exact=cfg.exact, scale=scale)
    params = None if cfg.interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    o, fin = pl.pallas_call(
        kernel, out_shape=list(outs.values()), grid=(B * H, V // BV),
        in_specs=[spec(n, x.shape) for n, x in ins.items()],
        out_specs=[spec(n, x.shape) for n, x in outs.items()], interpret=cfg.interpret,
        compiler_params=params, name="dplr_fused_fwd")(*ins.values())
    return o.reshape(B, NC, C, H, V), fin.reshape((N,) + fin.shape[2:])


def _pow2(n):
    return n >= 16 and n & (n - 1) == 0


def plan(n, q, g, E, y, P, F, Vk, *, own_decay, chunk_size, cfg, launch, o_dtype, scale):
    """(per-chunk phase 1, scan) for chunked.chunked's `fused` where the kernel takes the
    form: one token per query (n = 1), and either one probed key per token with its values
    and probes carrying their own decay or none (the delta family), or one plain key per
    token (gla); K, V and the chunk powers of two >= 16. Else None."""
    one = lambda x: x is not None and x.ndim == 5 and x.shape[3] == 1
    delta = one(E) and one(y) and one(P) and F is None and (own_decay or g is None)
    plain = E is None and y is None and P is None and one(F) and one(Vk)
    values = y if delta else Vk
    if not (n == 1 and (delta or plain) and _pow2(q.shape[-1]) and _pow2(values.shape[-1])
            and _pow2(chunk_size)):
        return None
    return (functools.partial(_products, cfg=cfg),
            functools.partial(_scan, cfg=cfg, launch=launch, o_dtype=o_dtype, scale=scale))
