"""Pallas kernels for the rest of phase 1 of rank-1 forms (at most one probed key E and one
plain key F per token: delta_rule, gated_delta_rule, kda, and hdla / gated_delta_product as
virtual tokens, which have E only; gla, which has F only; rank-1 dplr, which has both): per
chunk, they turn the intra-chunk products into the chunk's factored transition, forward and
backward.

chunked.chunk_factors computes, per chunk of C tokens with (inclusive, exclusive, suffix)
sums of the log decays I, J, S (each a sum of the tokens it covers) and the products
L = decayed(P, E, probe), QE = decayed(q, E), QF = decayed(q, F) and PF = decayed(P, F,
probe) (decayed.py or XLA):

    A = P e^J,  Tinv = (I + L)^-1,  W = Tinv A,  X0 = Tinv (y - PF Vk),
    Qs = q e^I - QE W,  O0 = QE X0 + QF Vk,  Z = [E; F] e^S,  X = [X0; Vk],
    gamma = e^{sum of the chunk's g}

(the terms of a part the form lacks drop out; without E, X is Vk itself). In XLA these are
~30 kernels over [C, K] float32 tensors per chunk, each written to HBM and read back, plus
their transposes and the layout moves between them: at B=4, T=4096, H=16, K=V=128 on the
H100 about 2 ms of kda's 4.5 ms forward and ~6 ms of its backward, and 1.1 ms of GLA's
2.4 ms forward (benchmarks/NOTES.md). Here one program per (chunk, block of 64 key or value
columns) reads its columns of the inputs and the C x C products once and writes its columns
of the factors; the backward (custom_vjp) likewise reads the inputs and the factors'
cotangents and writes the inputs' cotangents, with the C x C ones (sums over columns) per
program for XLA to add. The UT inverse stays in XLA (forward substitution on 16-row blocks,
then block merges: triangular.py); its cotangent needs no inverse of its own. With rhs =
y - PF Vk:

    dW' = dW - QE^T dQs,   dX' = dX0 + QE^T dO0,   dA = Tinv^T dW',   drhs = Tinv^T dX',
    dQE = dO0 X0^T - dQs W^T,   dL = -(Tinv^T dTinv) Tinv^T = -(dA W^T + drhs X0^T),
    dy = drhs,   dVk = dX_F + QF^T dO0 - PF^T drhs,   dQF = dO0 Vk^T,   dPF = -drhs Vk^T,

dL because dTinv = dW' A^T + dX' rhs^T and A^T Tinv^T = W^T, rhs^T Tinv^T = X0^T. The log
decays' cotangent collects dI = dQs q e^I, dJ = dA A, dS = dZ Z and the total's d gamma
gamma through the same 0/1 sums, transposed: dg_u = sum_{t>=u} dI_t + sum_{t>u} dJ_t +
sum_{t<u} dS_t + d total. The prefix sums run at float32 accuracy (`exact`) so that no
exponent is a difference of cumulative sums (chunked.py says why); the other dots at
`precision`.

Per-channel decays g [C, K] take their prefix sums as 0/1 dots; scalar decays (one per token)
arrive as a row g [1, C] and take them as masked row sums; no decay (delta_rule) skips them.

Saved for the backward: the inputs (the chunked copies phase 1 reads anyway), the products
and Tinv (C x C per chunk, 16 KB each at C=64). W and X0 are recomputed (C x C x K dots), and
so are the products where XLA forms them (rank1_factors), rather than keeping XLA's
intermediates.
Cost per chunk at C=64, K=V=128, float32, and at B=4, T=4096, H=16 (4096 chunks) at 3 TB/s:
the delta family's forward reads 160 KB + 32 KB and writes 160 KB (1.44 GB: 0.48 ms), its
backward reads 352 KB and writes 288 KB (of which 128 KB are the four programs' C x C
partials; 2.6 GB: 0.87 ms, and XLA then reads the partials once more to add them); ~14
MFLOP forward, ~30 backward (tf32 / 3-pass tf32: not the limit). Measured for kda there
(bf16 inputs; benchmarks/NOTES.md): 0.68 ms forward, 2.14 backward. GLA's forward reads
144 KB and writes 96 (0.98 GB: 0.33 ms), its backward reads 240 and writes 160 (1.6 GB:
0.55 ms); rank-1 DPLR's forward reads 288 KB and writes 224 (2.1 GB: 0.70 ms). Not yet
measured on a GPU (benchmarks/NOTES.md gives the prediction).
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


def _blocks(Kp, Vp):
    """(key block, value block, key-block programs, programs per chunk): program j < nk takes
    key columns [j bk, (j + 1) bk), the others value columns."""
    bk, bv = min(BLOCK, Kp), min(BLOCK, Vp)
    return bk, bv, Kp // bk, Kp // bk + Vp // bv


def _decays(r, decay, ks, exact):
    """The prefix sums of key columns ks (all of them per token) and the log of gamma there."""
    if decay is None:
        return (None, None, None), None
    g = r["g"][:, ks] if decay == "channel" else r["g"][...]
    return _prefix_sums(g, decay, exact), jnp.sum(g, axis=0 if decay == "channel" else 1,
                                                  keepdims=True)


def _parts(r):
    """Which parts the form has (probed keys E, plain keys F) and the row offset of the plain
    rows in Z and X (after the C probed ones)."""
    C = r["q"].shape[0]
    has_e, has_f = "e" in r, "f" in r
    return has_e, has_f, pl.ds(0, C), pl.ds(C if has_e else 0, C)


# One program per (chunk, block of 64 key or value columns): the key columns of Z, W, Qs and
# the value columns of X0, O0 need nothing from each other, and the backward's C x C
# cotangents (sums over columns) come out per program for XLA to add. Whole chunks per
# program (all columns in one, [64, 128] float32 tiles) took 1.7 ms forward and 5.8 backward
# for kda on the H100, with columns looped inside one program 1.8 and 7.6 (8 warps).
def _forward_kernel(*refs, names, decay, precision, exact):
    r = dict(zip(names, refs))
    has_e, has_f, e_rows, f_rows = _parts(r)
    bk, bv, nk, _ = _blocks(r["q"].shape[1], r["o0"].shape[1])
    j = pl.program_id(0)

    @pl.when(j < nk)
    def _keys():
        ks = pl.ds(j * bk, bk)
        (incl, excl, suffix), total = _decays(r, decay, ks, exact)
        if has_e:  # W before q is loaded: fewer registers live across its dot
            W = _dot(r["ti"][...], _scaled(r["p"][:, ks], excl), precision)
            r["w"][:, ks] = W.astype(r["w"].dtype)
            Qs = _scaled(r["q"][:, ks], incl) - _dot(r["qe"][...], W, precision)
            r["z"][e_rows, ks] = _scaled(r["e"][:, ks], suffix).astype(r["z"].dtype)
        else:
            Qs = _scaled(r["q"][:, ks], incl)
        if has_f:
            r["z"][f_rows, ks] = _scaled(r["f"][:, ks], suffix).astype(r["z"].dtype)
        r["qs"][:, ks] = Qs.astype(r["qs"].dtype)
        gam = jnp.ones((1, 1), r["gam"].dtype) if total is None else jnp.exp(total)
        r["gam"][:, ks] = jnp.broadcast_to(gam, (1, bk)).astype(r["gam"].dtype)

    @pl.when(j >= nk)
    def _values():
        vs = pl.ds((j - nk) * bv, bv)
        O0 = 0.0
        if has_f:
            Vk = r["vk"][:, vs]
            O0 = _dot(r["qf"][...], Vk, precision)
        if has_e:
            rhs = r["y"][:, vs]
            if has_f:
                rhs = rhs - _dot(r["pf"][...], Vk, precision)
                r["x"][f_rows, vs] = Vk.astype(r["x"].dtype)
            X0 = _dot(r["ti"][...], rhs, precision)
            r["x"][e_rows, vs] = X0.astype(r["x"].dtype)
            O0 = O0 + _dot(r["qe"][...], X0, precision)
        r["o0"][:, vs] = O0.astype(r["o0"].dtype)


def _backward_kernel(*refs, names, decay, precision, exact):
    r = dict(zip(names, refs))
    has_e, has_f, e_rows, f_rows = _parts(r)
    C = r["q"].shape[0]
    bk, bv, nk, _ = _blocks(r["q"].shape[1], r["do0"].shape[1])
    j = pl.program_id(0)
    incl_mask, excl_mask, suffix_mask = _masks(C)

    def partial(name, d, mask, program):  # this program's rows of a C x C cotangent
        r[name][pl.ds(program * C, C), :] = jnp.where(mask, d, 0.0).astype(r[name].dtype)

    def probed_partials(dQE, dL):
        partial("dqe", dQE, incl_mask, j)
        partial("dl", -dL, excl_mask, j)

    @pl.when(j < nk)
    def _keys():  # A = P e^J, W = Tinv A, Qs = q e^I - QE W, Z = [E; F] e^S, gamma = e^{sum g}
        ks = pl.ds(j * bk, bk)
        (incl, excl, suffix), total = _decays(r, decay, ks, exact)
        dQs = r["dqs"][:, ks]
        dq = _scaled(dQs, incl)
        r["dq"][:, ks] = dq.astype(r["dq"].dtype)
        parts = [(incl_mask, dq * r["q"][:, ks])]  # the log decays' terms, by their sums
        if has_e:
            Tinv, P = r["ti"][...], r["p"][:, ks]
            W = _dot(Tinv, _scaled(P, excl), precision)
            dA = _dot(Tinv, r["dw"][:, ks] - _dot(r["qe"][...], dQs, precision, trans_a=True),
                      precision, trans_a=True)
            probed_partials(-_dot(dQs, W, precision, trans_b=True),
                            _dot(dA, W, precision, trans_b=True))
            dP = _scaled(dA, excl)
            dE = _scaled(r["dz"][e_rows, ks], suffix)
            r["dp"][:, ks] = dP.astype(r["dp"].dtype)
            r["de"][:, ks] = dE.astype(r["de"].dtype)
            parts += [(excl_mask, dP * P), (suffix_mask, dE * r["e"][:, ks])]
        if has_f:
            dF = _scaled(r["dz"][f_rows, ks], suffix)
            r["df"][:, ks] = dF.astype(r["df"].dtype)
            parts.append((suffix_mask, dF * r["f"][:, ks]))
        if decay is None:
            return
        # The log decays: through I, J, S and the total (d gamma gamma).
        dtotal = r["dgam"][:, ks] * jnp.exp(total)
        if decay == "channel":
            dg = sum(_dot(m.astype(d.dtype), d, exact, trans_a=True) for m, d in parts)
            r["dg"][:, ks] = (dg + dtotal).astype(r["dg"].dtype)
        else:  # this key block's share of the row [1, C]: [t, u] masks summed over t
            dg = sum(jnp.sum(jnp.where(m, jnp.sum(d, axis=1, keepdims=True), 0.0), axis=0,
                             keepdims=True) for m, d in parts)
            r["dg"][pl.ds(j, 1), :] = (dg + jnp.sum(dtotal, axis=1, keepdims=True)).astype(
                r["dg"].dtype)

    @pl.when(j >= nk)
    def _values():  # X0 = Tinv (y - PF Vk), O0 = QE X0 + QF Vk
        vs = pl.ds((j - nk) * bv, bv)
        dO0 = r["do0"][:, vs]
        if has_f:
            Vk = r["vk"][:, vs]
            dVk = _dot(r["qf"][...], dO0, precision, trans_a=True)
            partial("dqf", _dot(dO0, Vk, precision, trans_b=True), incl_mask, j - nk)
        if has_e:
            Tinv = r["ti"][...]
            rhs = r["y"][:, vs]
            if has_f:
                rhs = rhs - _dot(r["pf"][...], Vk, precision)
            X0 = _dot(Tinv, rhs, precision)
            drhs = _dot(Tinv, r["dx"][e_rows, vs]
                        + _dot(r["qe"][...], dO0, precision, trans_a=True),
                        precision, trans_a=True)
            r["dy"][:, vs] = drhs.astype(r["dy"].dtype)
            probed_partials(_dot(dO0, X0, precision, trans_b=True),
                            _dot(drhs, X0, precision, trans_b=True))
            if has_f:
                dVk = dVk + r["dx"][f_rows, vs] - _dot(r["pf"][...], drhs, precision,
                                                       trans_a=True)
                partial("dpf", -_dot(drhs, Vk, precision, trans_b=True), excl_mask, j - nk)
        if has_f:
            r["dvk"][:, vs] = dVk.astype(r["dvk"].dtype)


def _decay_mode(g):
    return None if g is None else ("scalar" if g.ndim == 1 else "channel")


# Operand names in call order; a name whose array is None (the form lacks that part) is left
# out, so the kernels see only what the form has.
_IN = ("q", "g", "e", "p", "y", "qe", "ti", "f", "vk", "qf", "pf")
_CTS = ("dgam", "dz", "dw", "dx", "dqs", "do0")


def _kernel_inputs(q, g, E, y, P, QE, Tinv, F, Vk, QF, PF):
    """(names, arrays, Kp, Vp) of the present inputs: K and V padded to powers of two >= 16
    (zeros add nothing; padded decays are 0), a per-token decay as a row."""
    Kp, Vp = _pow2(q.shape[-1]), _pow2((y if Vk is None else Vk).shape[-1])
    pk = lambda x: None if x is None else _pad_to(x, 1, Kp)
    pv = lambda x: None if x is None else _pad_to(x, 1, Vp)
    if g is not None:
        g = g[None, :] if g.ndim == 1 else pk(g)
    ins = (pk(q), g, pk(E), pk(P), pv(y), QE, Tinv, pk(F), pv(Vk), QF, PF)
    live = [(n, x) for n, x in zip(_IN, ins) if x is not None]
    return tuple(n for n, _ in live), tuple(x for _, x in live), Kp, Vp


def _launch(kernel, args, outs, interpret, launch, Kp, Vp, name):
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=outs, grid=(_blocks(Kp, Vp)[3],),
                          interpret=interpret, compiler_params=params, name=name)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _tail(q, g, E, y, P, L, QE, F, Vk, QF, PF, cfg):
    return _tail_fwd(q, g, E, y, P, L, QE, F, Vk, QF, PF, cfg)[0]


def _tail_fwd(q, g, E, y, P, L, QE, F, Vk, QF, PF, cfg):
    C, K = q.shape
    V = (y if Vk is None else Vk).shape[-1]
    has_e, has_f = E is not None, F is not None
    Tinv = unit_lower_inverse(L, block=SUB) if has_e else None
    res = (q, g, E, y, P, QE, Tinv, F, Vk, QF, PF)
    names, ins, Kp, Vp = _kernel_inputs(*res)
    f = lambda *s: jax.ShapeDtypeStruct(s, q.dtype)
    n_rows = C * (has_e + has_f)
    outs = {"gam": f(1, Kp), "z": f(n_rows, Kp), "w": f(C, Kp) if has_e else None,
            "x": f(n_rows, Vp) if has_e else None, "qs": f(C, Kp), "o0": f(C, Vp)}
    outs = {n: s for n, s in outs.items() if s is not None}
    kernel = functools.partial(_forward_kernel, names=names + tuple(outs),
                               decay=_decay_mode(g), precision=cfg.precision, exact=cfg.exact)
    got = dict(zip(outs, _launch(kernel, ins, list(outs.values()), cfg.interpret, cfg.fwd,
                                 Kp, Vp, "dplr_factors_fwd")))
    # Without probed keys X is the plain values themselves (chunked.chunk_factors).
    X = got["x"][:, :V] if has_e else Vk
    W = got["w"][:, :K] if has_e else None
    out = (got["gam"][0, :K], got["z"][:, :K], W, X, got["qs"][:, :K], got["o0"][:, :V])
    return out, res


def _tail_bwd(cfg, res, cts):
    q, g, E, y, P, QE, Tinv, F, Vk, QF, PF = res
    C, K = q.shape
    V = (y if Vk is None else Vk).shape[-1]
    has_e, has_f = E is not None, F is not None
    names, ins, Kp, Vp = _kernel_inputs(*res)
    dgam, dZ, dW, dX, dQs, dO0 = cts
    pk = lambda x: _pad_to(x, x.ndim - 1, Kp)
    pv = lambda x: _pad_to(x, 1, Vp)
    cts = {"dgam": pk(dgam[None, :]), "dz": pk(dZ), "dw": pk(dW) if has_e else None,
           "dx": pv(dX) if has_e else None, "dqs": pk(dQs), "do0": pv(dO0)}
    cts = {n: x for n, x in cts.items() if x is not None}
    f = lambda *s: jax.ShapeDtypeStruct(s, q.dtype)
    _, _, nk, n = _blocks(Kp, Vp)
    decay = _decay_mode(g)
    outs = {"dq": f(C, Kp)}
    if has_e:
        outs.update(de=f(C, Kp), dp=f(C, Kp), dy=f(C, Vp), dl=f(n * C, C), dqe=f(n * C, C))
    if has_f:
        outs.update(df=f(C, Kp), dvk=f(C, Vp), dqf=f((n - nk) * C, C))
        if has_e:
            outs["dpf"] = f((n - nk) * C, C)
    if decay is not None:
        outs["dg"] = f(C, Kp) if decay == "channel" else f(nk, C)
    kernel = functools.partial(_backward_kernel, names=names + tuple(cts) + tuple(outs),
                               decay=decay, precision=cfg.precision, exact=cfg.exact)
    got = dict(zip(outs, _launch(kernel, ins + tuple(cts.values()), list(outs.values()),
                                 cfg.interpret, cfg.bwd, Kp, Vp, "dplr_factors_bwd")))
    total = lambda name: got[name].reshape(-1, C, C).sum(axis=0) if name in got else None
    key = lambda name: got[name][:, :K] if name in got else None
    dg = None if decay is None else (got["dg"][:, :K] if decay == "channel"
                                     else jnp.sum(got["dg"], axis=0))
    dy = got["dy"][:, :V] if has_e else None
    dVk = None
    if has_f:  # plain values without probed keys are X itself: dX reaches them directly
        dVk = got["dvk"][:, :V] + (0.0 if has_e else dX)
    return (key("dq"), dg, key("de"), dy, key("dp"), total("dl"), total("dqe"), key("df"),
            dVk, total("dqf"), total("dpf"))


_tail.defvjp(_tail_fwd, _tail_bwd)


def rank1_factors(q, g, E, y, P, F, Vk, *, decayed, interpret, precision, exact, launch):
    """chunked.chunk_factors for one chunk of a rank-1 form (E, y, P [C, 1, ...] or None, F,
    Vk [C, 1, ...] or None, not both None), with the intra-chunk products from `decayed` and
    the rest in the kernels above. launch: (forward, backward) Launch."""
    def products(q, g, E, P, F):
        one = lambda X, Y, probe: (None if X is None or Y is None
                                   else decayed(X[:, None], Y[:, None], g, probe)[:, 0, :, 0])
        return one(P, E, True), one(q, E, False), one(q, F, False), one(P, F, True)

    # Rematerialized in the backward pass, not saved: XLA's products (per-token or no decay)
    # would keep their C x C intermediates (2.9x the residual bytes of XLA's checkpointed
    # phase 1 for gated_delta_rule at T=512, K=V=64: tests/test_pallas_factors.py), and its
    # per-channel ones [C, 16, K] pairwise decays; the kernels' (decayed.py) keep only their
    # inputs, which are saved anyway (as the [C, K] arrays the tail keeps: products of the
    # [C, 1, K] ones would have XLA save both), and are not run again.
    E, y, P, F, Vk = (None if x is None else x[:, 0] for x in (E, y, P, F, Vk))
    L, QE, QF, PF = jax.checkpoint(products, policy=jax.checkpoint_policies.nothing_saveable)(
        q, g, E, P, F)
    return _tail(q, g, E, y, P, L, QE, F, Vk, QF, PF, _Cfg(interpret, precision, exact, *launch))
