"""Pallas kernels for the rest of phase 1 of the delta family (one probed key per token, no
plain keys: delta_rule, gated_delta_rule, kda, and hdla / gated_delta_product as virtual
tokens): per chunk, they turn the intra-chunk products into the chunk's factored transition,
forward and backward.

chunked.chunk_factors computes, per chunk of C tokens with (inclusive, exclusive, suffix)
sums of the log decays I, J, S (each a sum of the tokens it covers) and the products
L = decayed(P, E, probe) and QE = decayed(q, E) (decayed.py or XLA):

    A = P e^J,  Tinv = (I + L)^-1,  W = Tinv A,  X0 = Tinv y,
    Qs = q e^I - QE W,  O0 = QE X0,  Z = E e^S,  gamma = e^{sum of the chunk's g}.

In XLA these are ~30 kernels over [C, K] float32 tensors per chunk, each written to HBM and
read back, plus their transposes and the layout moves between them: at B=4, T=4096, H=16,
K=V=128 on the H100 about 2 ms of kda's 4.5 ms forward and ~6 ms of its backward
(benchmarks/NOTES.md). Here one program per (chunk, block of 64 key or value columns) reads
its columns of q, E, P, y, g and the C x C QE and Tinv once and writes its columns of the
factors; the backward (custom_vjp) likewise reads the inputs and the factors' cotangents
and writes the inputs' cotangents, with the C x C ones (sums over columns) per program for
XLA to add. The UT inverse stays in XLA (forward substitution on 16-row
blocks, then block merges: triangular.py); its cotangent needs no inverse of its own:

    dW' = dW - QE^T dQs,   dX' = dX0 + QE^T dO0,   dA = Tinv^T dW',   dy = Tinv^T dX',
    dQE = dO0 X0^T - dQs W^T,   dL = -(Tinv^T dTinv) Tinv^T = -(dA W^T + dy X0^T),

the last because dTinv = dW' A^T + dX' y^T and A^T Tinv^T = W^T, y^T Tinv^T = X0^T. The log
decays' cotangent collects dI = dQs q e^I, dJ = dA A, dS = dZ Z and the total's d gamma gamma
through the same 0/1 sums, transposed: dg_u = sum_{t>=u} dI_t + sum_{t>u} dJ_t + sum_{t<u}
dS_t + d total. The prefix sums run at float32 accuracy (`exact`) so that no exponent is a
difference of cumulative sums (chunked.py says why); the other dots at `precision`.

Per-channel decays g [C, K] take their prefix sums as 0/1 dots; scalar decays (one per token)
arrive as a row g [1, C] and take them as masked row sums; no decay (delta_rule) skips them.

Saved for the backward: the inputs (the chunked copies phase 1 reads anyway), QE and Tinv
(C x C per chunk, 16 KB each at C=64). W and X0 are recomputed (two C x C x K dots), and so
are the products where XLA forms them (delta_factors), rather than keeping XLA's
intermediates.
Cost per chunk at C=64, K=V=128, float32: forward reads 160 KB + 32 KB and writes 160 KB
(1.44 GB at B=4, T=4096, H=16: 0.48 ms at 3 TB/s), backward reads 352 KB and writes 288 KB
(of which 128 KB are the four programs' C x C partials; 2.6 GB: 0.87 ms, and XLA then reads
the partials once more to add them); ~14 MFLOP forward, ~30 backward (tf32 / 3-pass tf32:
not the limit). Measured for kda there (bf16 inputs; benchmarks/NOTES.md): 0.68 ms
forward, 2.14 backward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops.chunked import SUB
from dplr_jax.ops.pallas.decayed import _iota
from dplr_jax.ops.pallas.state_pass import Launch, _dot, _pad_to, _pow2
from dplr_jax.ops.triangular import unit_lower_inverse

BLOCK = 64  # columns of K (and V) per program


class _Cfg(NamedTuple):
    """Static configuration (hashable: a custom_vjp nondiff argument)."""

    interpret: object
    precision: object  # of the dots
    exact: object  # float32-accurate: of the 0/1 sums of log decays
    fwd: Launch
    bwd: Launch


def _masks(C):
    t, u = _iota((C, C), 0), _iota((C, C), 1)
    return u <= t, u < t, u > t  # [t, u]: inclusive prefix, exclusive prefix, suffix


def _prefix_sums(g, decay, exact):
    """(I, J, S): inclusive prefix, exclusive prefix and suffix sums over a chunk's tokens,
    each a sum of the tokens it covers. Per channel g [C, k] -> [C, k] each (0/1 dots at
    float32 accuracy), per token g a row [1, C] -> [C, 1] each; None without decay."""
    if decay is None:
        return None, None, None
    masks = _masks(g.shape[0] if decay == "channel" else g.shape[1])
    if decay == "channel":
        return tuple(_dot(m.astype(g.dtype), g, exact) for m in masks)
    return tuple(jnp.sum(jnp.where(m, g, 0.0), axis=1, keepdims=True) for m in masks)


def _scaled(x, e):
    return x if e is None else x * jnp.exp(e)


def _split(refs, decay):
    """(q, g, E, P, y, QE, Tinv) refs (g None without decay) and the rest."""
    if decay is None:
        q, e, p, y, qe, ti, *rest = refs
        return (q, None, e, p, y, qe, ti), rest
    return tuple(refs[:7]), refs[7:]


def _blocks(Kp, Vp):
    """(key block, value block, key-block programs, programs per chunk): program j < nk takes
    key columns [j bk, (j + 1) bk), the others value columns."""
    bk, bv = min(BLOCK, Kp), min(BLOCK, Vp)
    return bk, bv, Kp // bk, Kp // bk + Vp // bv


def _decays(g_ref, decay, ks, exact):
    """The prefix sums of key columns ks (all of them per token) and the log of gamma there."""
    if decay is None:
        return (None, None, None), None
    g = g_ref[:, ks] if decay == "channel" else g_ref[...]
    return _prefix_sums(g, decay, exact), jnp.sum(g, axis=0 if decay == "channel" else 1,
                                                  keepdims=True)


# One program per (chunk, block of 64 key or value columns): the key columns of Z, W, Qs and
# the value columns of X0, O0 need nothing from each other, and the backward's C x C
# cotangents (sums over columns) come out per program for XLA to add. Whole chunks per
# program (all columns in one, [64, 128] float32 tiles) took 1.7 ms forward and 5.8 backward
# for kda on the H100, with columns looped inside one program 1.8 and 7.6 (8 warps).
def _forward_kernel(*refs, decay, precision, exact):
    (q_ref, g_ref, e_ref, p_ref, y_ref, qe_ref, ti_ref), outs = _split(refs, decay)
    gam_ref, z_ref, w_ref, x_ref, qs_ref, o0_ref = outs
    bk, bv, nk, _ = _blocks(q_ref.shape[1], y_ref.shape[1])
    j = pl.program_id(0)

    @pl.when(j < nk)
    def _keys():
        ks = pl.ds(j * bk, bk)
        (incl, excl, suffix), total = _decays(g_ref, decay, ks, exact)
        W = _dot(ti_ref[...], _scaled(p_ref[:, ks], excl), precision)
        w_ref[:, ks] = W.astype(w_ref.dtype)
        qs_ref[:, ks] = (_scaled(q_ref[:, ks], incl) - _dot(qe_ref[...], W, precision)).astype(
            qs_ref.dtype)
        z_ref[:, ks] = _scaled(e_ref[:, ks], suffix).astype(z_ref.dtype)
        gam = jnp.ones((1, 1), gam_ref.dtype) if total is None else jnp.exp(total)
        gam_ref[:, ks] = jnp.broadcast_to(gam, (1, bk)).astype(gam_ref.dtype)

    @pl.when(j >= nk)
    def _values():
        vs = pl.ds((j - nk) * bv, bv)
        X0 = _dot(ti_ref[...], y_ref[:, vs], precision)
        x_ref[:, vs] = X0.astype(x_ref.dtype)
        o0_ref[:, vs] = _dot(qe_ref[...], X0, precision).astype(o0_ref.dtype)


def _backward_kernel(*refs, decay, precision, exact):
    (q_ref, g_ref, e_ref, p_ref, y_ref, qe_ref, ti_ref), rest = _split(refs, decay)
    dgam_ref, dz_ref, dw_ref, dx_ref, dqs_ref, do0_ref, *outs = rest
    dq_ref, de_ref, dp_ref, dy_ref, dl_ref, dqe_ref = outs[:6]
    C = q_ref.shape[0]
    bk, bv, nk, _ = _blocks(q_ref.shape[1], y_ref.shape[1])
    j = pl.program_id(0)
    masks = _masks(C)
    rows = pl.ds(j * C, C)  # this program's part of the C x C cotangents

    def partials(dQE, dL):
        dqe_ref[rows, :] = jnp.where(masks[0], dQE, 0.0).astype(dqe_ref.dtype)
        dl_ref[rows, :] = jnp.where(masks[1], -dL, 0.0).astype(dl_ref.dtype)

    @pl.when(j < nk)
    def _keys():  # A = P e^J, W = Tinv A, Qs = q e^I - QE W, Z = E e^S, gamma = e^{sum g}
        ks = pl.ds(j * bk, bk)
        (incl, excl, suffix), total = _decays(g_ref, decay, ks, exact)
        Tinv = ti_ref[...]
        P = p_ref[:, ks]
        W = _dot(Tinv, _scaled(P, excl), precision)
        dQs = dqs_ref[:, ks]
        dA = _dot(Tinv, dw_ref[:, ks] - _dot(qe_ref[...], dQs, precision, trans_a=True),
                  precision, trans_a=True)
        partials(-_dot(dQs, W, precision, trans_b=True), _dot(dA, W, precision, trans_b=True))
        dP = _scaled(dA, excl)
        dq = _scaled(dQs, incl)
        dE = _scaled(dz_ref[:, ks], suffix)
        dp_ref[:, ks] = dP.astype(dp_ref.dtype)
        dq_ref[:, ks] = dq.astype(dq_ref.dtype)
        de_ref[:, ks] = dE.astype(de_ref.dtype)
        if decay is None:
            return
        # The log decays: through I (dq q), J (dP P), S (dE E) and the total (d gamma gamma).
        parts = (dq * q_ref[:, ks], dP * P, dE * e_ref[:, ks])
        dtotal = dgam_ref[:, ks] * jnp.exp(total)
        if decay == "channel":
            dg = sum(_dot(m.astype(d.dtype), d, exact, trans_a=True)
                     for m, d in zip(masks, parts))
            outs[6][:, ks] = (dg + dtotal).astype(outs[6].dtype)
        else:  # this key block's share of the row [1, C]: [t, u] masks summed over t
            dg = sum(jnp.sum(jnp.where(m, jnp.sum(d, axis=1, keepdims=True), 0.0), axis=0,
                             keepdims=True) for m, d in zip(masks, parts))
            outs[6][pl.ds(j, 1), :] = (dg + jnp.sum(dtotal, axis=1, keepdims=True)).astype(
                outs[6].dtype)

    @pl.when(j >= nk)
    def _values():  # X0 = Tinv y, O0 = QE X0
        vs = pl.ds((j - nk) * bv, bv)
        Tinv = ti_ref[...]
        X0 = _dot(Tinv, y_ref[:, vs], precision)
        dO0 = do0_ref[:, vs]
        dy = _dot(Tinv, dx_ref[:, vs] + _dot(qe_ref[...], dO0, precision, trans_a=True),
                  precision, trans_a=True)
        dy_ref[:, vs] = dy.astype(dy_ref.dtype)
        partials(_dot(dO0, X0, precision, trans_b=True), _dot(dy, X0, precision, trans_b=True))


def _decay_mode(g):
    return None if g is None else ("scalar" if g.ndim == 1 else "channel")


def _kernel_inputs(q, g, E, y, P, QE, Tinv):
    """Pads K and V to powers of two >= 16 (zeros add nothing; padded decays are 0) and puts
    a per-token decay in a row."""
    Kp, Vp = _pow2(q.shape[-1]), _pow2(y.shape[-1])
    q, E, P = (_pad_to(x, 1, Kp) for x in (q, E, P))
    if g is not None:
        g = g[None, :] if g.ndim == 1 else _pad_to(g, 1, Kp)
    ins = (q, g, E, P, _pad_to(y, 1, Vp), QE, Tinv)
    return tuple(x for x in ins if x is not None), Kp, Vp


def _launch(kernel, args, outs, interpret, launch, Kp, Vp, name):
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=outs, grid=(_blocks(Kp, Vp)[3],),
                          interpret=interpret, compiler_params=params, name=name)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _tail(q, g, E, y, P, L, QE, cfg):
    return _tail_fwd(q, g, E, y, P, L, QE, cfg)[0]


def _tail_fwd(q, g, E, y, P, L, QE, cfg):
    C, K = q.shape
    V = y.shape[-1]
    Tinv = unit_lower_inverse(L, block=SUB)
    ins, Kp, Vp = _kernel_inputs(q, g, E, y, P, QE, Tinv)
    f = lambda *s: jax.ShapeDtypeStruct(s, q.dtype)
    outs = [f(1, Kp), f(C, Kp), f(C, Kp), f(C, Vp), f(C, Kp), f(C, Vp)]
    kernel = functools.partial(_forward_kernel, decay=_decay_mode(g), precision=cfg.precision,
                               exact=cfg.exact)
    gam, Z, W, X0, Qs, O0 = _launch(kernel, ins, outs, cfg.interpret, cfg.fwd, Kp, Vp,
                                    "dplr_factors_fwd")
    out = (gam[0, :K], Z[:, :K], W[:, :K], X0[:, :V], Qs[:, :K], O0[:, :V])
    return out, (q, g, E, y, P, QE, Tinv)


def _tail_bwd(cfg, res, cts):
    q, g, E, y, P, QE, Tinv = res
    C, K = q.shape
    V = y.shape[-1]
    ins, Kp, Vp = _kernel_inputs(q, g, E, y, P, QE, Tinv)
    dgam, dZ, dW, dX0, dQs, dO0 = cts
    pk = lambda x: _pad_to(x, x.ndim - 1, Kp)
    cts = (pk(dgam[None, :]), pk(dZ), pk(dW), _pad_to(dX0, 1, Vp), pk(dQs), _pad_to(dO0, 1, Vp))
    f = lambda *s: jax.ShapeDtypeStruct(s, q.dtype)
    _, _, nk, n = _blocks(Kp, Vp)
    outs = [f(C, Kp), f(C, Kp), f(C, Kp), f(C, Vp), f(n * C, C), f(n * C, C)]
    decay = _decay_mode(g)
    if decay is not None:
        outs.append(f(C, Kp) if decay == "channel" else f(nk, C))
    kernel = functools.partial(_backward_kernel, decay=decay, precision=cfg.precision,
                               exact=cfg.exact)
    dq, dE, dP, dy, dL, dQE, *dg = _launch(kernel, ins + cts, outs, cfg.interpret, cfg.bwd,
                                           Kp, Vp, "dplr_factors_bwd")
    if decay is not None:
        dg = dg[0][:, :K] if decay == "channel" else jnp.sum(dg[0], axis=0)
    else:
        dg = None
    dL, dQE = (x.reshape(n, C, C).sum(axis=0) for x in (dL, dQE))
    return dq[:, :K], dg, dE[:, :K], dy[:, :V], dP[:, :K], dL, dQE


_tail.defvjp(_tail_fwd, _tail_bwd)


def delta_factors(q, g, E, y, P, *, decayed, interpret, precision, exact, launch):
    """chunked.chunk_factors for one chunk of the delta family (E, y, P [C, 1, ...], no plain
    keys), with the intra-chunk products from `decayed` and the rest in the kernels above.
    launch: (forward, backward) Launch."""
    def products(q, g, E, P):
        return (decayed(P, E, g, probe=True)[:, 0, :, 0],
                decayed(q[:, None], E, g, probe=False)[:, 0, :, 0])

    # Rematerialized in the backward pass, not saved: XLA's products (per-token or no decay)
    # would keep their C x C intermediates (2.9x the residual bytes of XLA's checkpointed
    # phase 1 for gated_delta_rule at T=512, K=V=64: tests/test_pallas_factors.py), and its
    # per-channel ones [C, 16, K] pairwise decays; the kernels' (decayed.py) keep only their
    # inputs, which are saved anyway, and are not run again.
    L, QE = jax.checkpoint(products, policy=jax.checkpoint_policies.nothing_saveable)(q, g, E, P)
    cfg = _Cfg(interpret, precision, exact, *launch)
    gamma, Z, W, X0, Qs, O0 = _tail(q, g, E[:, 0], y[:, 0], P[:, 0], L, QE, cfg)
    return gamma, Z, W, X0, Qs, O0
