"""Pallas kernels for the rest of phase 1 of rank-1 forms (at most one probed key E and one
plain key F per token: delta_rule, gated_delta_rule, kda, and hdla / gated_delta_product as
virtual tokens, which have E only; gla, which has F only; rank-1 dplr, which has both): per
chunk, they turn the intra-chunk products into the chunk's factored transition, forward and
backward.

chunked.chunk_factors computes, per chunk of C tokens with (inclusive, exclusive, suffix)
sums of the log decays I, J, S (each a sum of the tokens it covers) and the intra-chunk
products L, QE, QF and PF (chunked.intra_products; decayed.py or XLA):

    A = P e^J,  Tinv = (I + L)^-1,  W = Tinv A,  X0 = Tinv (y - PF Vk),
    Qs = q e^I - QE W,  O0 = QE X0 + QF Vk,  Z = [E; F] e^S,  X = [X0; Vk],
    gamma = e^{sum of the chunk's g}

(the terms of a part the form lacks drop out; DPLR's y is zero and absent). Without E, X is
Vk itself and O0 = QF Vk is left to the state pass (state_pass.py, which reads X anyway):
the kernels then have no value columns to write, and run no value programs. Where P holds p
and the probes are p e^g (own_decay: the delta family), A = p e^I, and with one probe and
one query per token the kernels take P's sums from q's.
In XLA these are ~30 kernels over [C, K] float32 tensors per chunk, each written to HBM and
read back, plus their transposes and the layout moves between them: at
B=4, T=4096, H=16, K=V=128 on the H100 about 2 ms of kda's 4.5 ms forward and ~6 ms of its
backward, and 1.1 ms of GLA's 2.4 ms forward (benchmarks/NOTES.md). Here one program per
(chunk, block of 64 key or value columns; the backward's key blocks 32 columns for some forms,
_backward_key_block) reads its columns of the inputs and the C x C
products once and writes its columns of the factors; the backward (custom_vjp) likewise
reads the inputs and the factors' cotangents and writes the inputs' cotangents, with the
C x C ones (sums over columns) per program for XLA to add. The UT inverse runs before them in
a kernel of its own, one program per chunk (_inverse_kernel: triangular.py's forward
substitution on 16-row blocks, then block merges; XLA's version of it took 0.27 ms of kda's
forward at the benchmark shape on the H100, the kernel 0.09); its cotangent needs no inverse
of its own. With rhs = y - PF Vk:

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

The values (y, Vk) arrive as the op was given them, 16-bit for 16-bit inputs, and the delta
family's y in its [B, NC, C, H, V] chunks where it lies (api.run_chunked): the kernels cast
them on chip and write their cotangents in that dtype (their only consumer here, so rounded
once, as before). On the H100 at the shape below this dropped XLA's float32 copy of v (0.07
ms) and halved the kernels' reads of it: gated_delta_rule 1.63 -> 1.55 ms forward, 6.01 ->
5.80 forward+backward (benchmarks/NOTES.md, twenty-first session).
Saved for the backward: the inputs (the chunked copies phase 1 reads anyway), the products
and Tinv (C x C per chunk, 16 KB each at C=64). W and X0 are recomputed (C x C x K dots), and
so are the products where XLA forms them (rank1_factors), rather than keeping XLA's
intermediates.
Cost per chunk at C=64, K=V=128, float32, and at B=4, T=4096, H=16 (4096 chunks) at 3 TB/s:
the delta family's forward reads 160 KB + 32 KB and writes 160 KB (1.44 GB: 0.48 ms), its
backward reads 352 KB and writes 288 KB (of which 128 KB are the four programs' C x C
partials; 2.6 GB: 0.87 ms, and XLA then reads the partials once more to add them); ~14
MFLOP forward, ~30 backward (tf32 / 3-pass tf32: not the limit). Measured for kda there
(bf16 inputs; benchmarks/results/profile_h100_session16.json): 0.63 ms forward, 1.37
backward. GLA's forward reads
144 KB and writes 96 (0.98 GB: 0.33 ms), its backward reads 240 and writes 160 (1.6 GB:
0.55 ms); rank-1 DPLR's forward reads 256 KB and writes 224 (2.0 GB: 0.66 ms). Measured
(the same file): GLA 0.38 ms forward, 0.69 backward; rank-1 DPLR 0.83 forward, 2.0-2.1
backward (it spilled at 64 key columns: 3.1 ms, benchmarks/kernel_registers.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dplr_jax.ops.chunked import SUB, intra_products
from dplr_jax.ops.pallas.decayed import _acc, _iota, _rank, _tokens
from dplr_jax.ops.pallas.state_pass import Launch, _dot, _exp, _mask_dot, _pad_to, _pow2

BLOCK = 64  # columns of K (and V) per program


class _Cfg(NamedTuple):
    """Static configuration (hashable: a custom_vjp nondiff argument)."""

    interpret: object
    precision: object  # of the dots
    exact: object  # float32-accurate: of the 0/1 sums of log decays
    fwd: Launch
    bwd: Launch


def _masks(rows, C, per):
    """[row, u] masks of rows of `per` per token (row // per is its token t) against the C
    tokens u: inclusive prefix u <= t, exclusive prefix u < t, suffix u > t."""
    t, u = _iota((rows, C), 0) // per, _iota((rows, C), 1)
    return u <= t, u < t, u > t


def _prefix_mask(fm):
    """[query row, u] mask of the tokens u <= the row's token: the queries' inclusive sums."""
    return _iota((fm.C // fm.n, fm.C), 1) <= _tokens((fm.C // fm.n, fm.C), fm.n)


def _pairs(shape, per_row, per_col, strict, every=1):
    """[row, col] mask of the pairs of a C x C product of ranks (per_row, per_col) that may be
    nonzero: key token <= query token (< if strict, the probes'). every: the query rows are
    one per `every` tokens (per_row 1), the last of each."""
    t, s = _tokens(shape, every) // per_row, _iota(shape, 1) // per_col
    return s < t if strict else s <= t


def _token_sums(mask, g, decay, exact):
    """sum of g_u over the tokens u the mask [rows, C] keeps, per row: per channel g [C, k] ->
    [rows, k] (a 0/1 dot at float32 accuracy), per token g a row [1, C] -> [rows, 1]; each a
    sum of the tokens it covers."""
    if decay == "channel":
        return _mask_dot(mask, g, exact)
    return jnp.sum(jnp.where(mask, g, 0.0), axis=1, keepdims=True)


def _scaled(x, e):
    return x if e is None else x * _exp(e)


def _blocks(Kp, Vp, key_block=None):
    """(key block, value block, key-block programs, programs per chunk): program j < nk takes
    key columns [j bk, (j + 1) bk) (bk: key_block, None: BLOCK), the others value columns;
    none with Vp = 0 (forms without probed keys)."""
    bk, bv = min(key_block or BLOCK, Kp), min(BLOCK, Vp)
    return bk, bv, Kp // bk, Kp // bk + (Vp // bv if Vp else 0)


class _Form(NamedTuple):
    """A chunk's shape in the kernel: C tokens, m probed and rk plain keys per token (0: the
    form has none; rows token-major), queries of one token in n (the last of each n: C / n
    query rows), and the rows of Z and X the probed and plain rows take."""

    C: int
    m: int
    rk: int
    n: int

    @staticmethod
    def of(r, n):
        C = r["q"].shape[0] * n
        return _Form(C, r["e"].shape[0] // C if "e" in r else 0,
                     r["f"].shape[0] // C if "f" in r else 0, n)

    @property
    def e_rows(self):
        return pl.ds(0, self.C * self.m)

    @property
    def f_rows(self):
        return pl.ds(self.C * self.m, self.C * self.rk)


def _probe_masks(fm, own):
    """[row, u] masks of P's rows: the tokens u in its exponent (u <= t where P holds p and
    the probe is p e^{g_t}, `own`; else u < t) and those in E's (u > t)."""
    upto, before, after = _masks(fm.C * fm.m, fm.C, fm.m)
    return (upto if own else before), after


def _probes_as_queries(fm, own):
    """Whether P's rows take the exponents of q's: one probe and one query per token, P
    holding p (own_decay). Then one sum serves both, forward and backward."""
    return own and fm.m == 1 and fm.n == 1


def _decays(r, fm, decay, ks, exact, own):
    """For key columns ks (all of them per token): the exponents of q's rows (inclusive prefix
    sums), of P's (exclusive; inclusive if `own`), of E's and F's (suffix), and the log of
    gamma; Nones without decay."""
    if decay is None:
        return None, None, None, None, None
    g = r["g"][:, ks] if decay == "channel" else r["g"][...]
    incl = _token_sums(_prefix_mask(fm), g, decay, exact)
    excl = suffix_e = suffix_f = None
    if fm.m:
        probe, after = _probe_masks(fm, own)
        excl = incl if _probes_as_queries(fm, own) else _token_sums(probe, g, decay, exact)
        suffix_e = _token_sums(after, g, decay, exact)
    if fm.rk:
        suffix_f = _token_sums(_masks(fm.C * fm.rk, fm.C, fm.rk)[2], g, decay, exact)
    total = jnp.sum(g, axis=0 if decay == "channel" else 1, keepdims=True)
    return incl, excl, suffix_e, suffix_f, total


def _load(r, name, cols):
    """Columns `cols` of input `name` in the kernels' dtype (decayed._acc). The values y, Vk
    arrive as the op was given them (16-bit values: half the bytes, and no float32 copy in
    XLA; api.run_chunked), and so do q and the keys in a call without gradients for the
    forms whose kernels gain by it (api.run_chunked's forward_only): cast as loaded."""
    return r[name][:, cols].astype(_acc(r["q"]))


def _rhs(r, vs, Vk, precision):
    """Value columns vs of y - PF Vk (y absent: zero; Vk None: no plain keys)."""
    if Vk is None:
        return _load(r, "y", vs)
    PFV = _dot(r["pf"][...], Vk, precision)
    return -PFV if "y" not in r else _load(r, "y", vs) - PFV


# One program per (chunk, block of 64 key or value columns): the key columns of Z, W, Qs and
# the value columns of X0, O0 need nothing from each other, and the backward's C x C
# cotangents (sums over columns) come out per program for XLA to add. Whole chunks per
# program (all columns in one, [64, 128] float32 tiles) took 1.7 ms forward and 5.8 backward
# for kda on the H100, with columns looped inside one program 1.8 and 7.6 (8 warps).
def _forward_kernel(*refs, names, n, own, decay, precision, exact):
    r = dict(zip(names, refs))
    fm = _Form.of(r, n)
    bk, bv, nk, _ = _blocks(r["q"].shape[1], r["o0"].shape[1] if fm.m else 0)
    j = pl.program_id(0)

    @pl.when(j < nk)
    def _keys():
        ks = pl.ds(j * bk, bk)
        incl, excl, suffix_e, suffix_f, total = _decays(r, fm, decay, ks, exact, own)
        if fm.m:  # W before q is loaded: fewer registers live across its dot
            W = _dot(r["ti"][...], _scaled(_load(r, "p", ks), excl), precision)
            r["w"][:, ks] = W.astype(r["w"].dtype)
            Qs = _scaled(_load(r, "q", ks), incl) - _dot(r["qe"][...], W, precision)
            E = _load(r, "e", ks)
            if "eb" in r:  # E = beta k, formed here
                E = E * r["eb"][...].astype(E.dtype)
            r["z"][fm.e_rows, ks] = _scaled(E, suffix_e).astype(r["z"].dtype)
        else:
            Qs = _scaled(_load(r, "q", ks), incl)
        if fm.rk:
            r["z"][fm.f_rows, ks] = _scaled(_load(r, "f", ks), suffix_f).astype(r["z"].dtype)
        r["qs"][:, ks] = Qs.astype(r["qs"].dtype)
        gam = jnp.ones((1, 1), r["gam"].dtype) if total is None else _exp(total)
        r["gam"][:, ks] = jnp.broadcast_to(gam, (1, bk)).astype(r["gam"].dtype)

    if not fm.m:  # X is Vk itself, O0 the state pass's
        return

    @pl.when(j >= nk)
    def _values():  # X = [X0; Vk], O0 = QE X0 + QF Vk
        vs = pl.ds((j - nk) * bv, bv)
        O0 = 0.0
        Vk = None
        if fm.rk:
            Vk = _load(r, "vk", vs)
            O0 = _dot(r["qf"][...], Vk, precision)
            r["x"][fm.f_rows, vs] = Vk.astype(r["x"].dtype)
        X0 = _dot(r["ti"][...], _rhs(r, vs, Vk, precision), precision)
        r["x"][fm.e_rows, vs] = X0.astype(r["x"].dtype)
        O0 = O0 + _dot(r["qe"][...], X0, precision)
        r["o0"][:, vs] = O0.astype(r["o0"].dtype)


def _backward_kernel(*refs, names, n, own, decay, precision, exact, key_block):
    r = dict(zip(names, refs))
    fm = _Form.of(r, n)
    C, m, rk, _ = fm
    bk, bv, nk, _ = _blocks(r["q"].shape[1], r["do0"].shape[1] if m else 0, key_block)
    j = pl.program_id(0)

    def partial(name, d, mask, program):  # this program's rows of a C x C cotangent
        rows = mask.shape[0]
        r[name][pl.ds(program * rows, rows), :] = jnp.where(mask, d, 0.0).astype(r[name].dtype)

    def probed_partials(dQE, dL):
        partial("dqe", dQE, _pairs(dQE.shape, 1, m, False, n), j)
        partial("dl", -dL, _pairs(dL.shape, m, m, True), j)

    @pl.when(j < nk)
    def _keys():  # A = P e^J (own: p e^I), W = Tinv A, Qs = q e^I - QE W, Z = [E; F] e^S,
        # gamma = e^{sum g}
        ks = pl.ds(j * bk, bk)
        incl, excl, suffix_e, suffix_f, total = _decays(r, fm, decay, ks, exact, own)
        # Each term of the log decays' cotangent, with the mask of the sums its exponent is
        # made of, goes into dg as soon as it is formed: fewer [C, 64] tiles live at once.
        dg = 0.0

        def add(mask, d):
            nonlocal dg
            if decay == "channel":
                dg = dg + _mask_dot(mask, d, exact, trans_a=True)
            else:  # this key block's share of the row [1, C]: [row, u] masks summed over rows
                dg = dg + jnp.sum(jnp.where(mask, jnp.sum(d, axis=1, keepdims=True), 0.0),
                                  axis=0, keepdims=True)

        qpart = None  # q's term, where P's rows share q's sums
        if m:
            Tinv, P = r["ti"][...], r["p"][:, ks]
            W = _dot(Tinv, _scaled(P, excl), precision)
            dA = _dot(Tinv, r["dw"][:, ks] - _dot(r["qe"][...], r["dqs"][:, ks], precision,
                                                  trans_a=True),
                      precision, trans_a=True)
            probed_partials(-_dot(r["dqs"][:, ks], W, precision, trans_b=True),
                            _dot(dA, W, precision, trans_b=True))
            dP = _scaled(dA, excl)
            r["dp"][:, ks] = dP.astype(r["dp"].dtype)
            before, after = _probe_masks(fm, own)
            if _probes_as_queries(fm, own):  # q's mask: one sum for both
                qpart = dP * P
            elif decay is not None:
                add(before, dP * P)
        dq = _scaled(r["dqs"][:, ks], incl)
        r["dq"][:, ks] = dq.astype(r["dq"].dtype)
        if decay is not None:
            add(_prefix_mask(fm), dq * r["q"][:, ks] + (0.0 if qpart is None else qpart))
        if m:
            dE = _scaled(r["dz"][fm.e_rows, ks], suffix_e)
            r["de"][:, ks] = dE.astype(r["de"].dtype)
            if decay is not None:
                add(after, dE * r["e"][:, ks])
        if rk:
            dF = _scaled(r["dz"][fm.f_rows, ks], suffix_f)
            r["df"][:, ks] = dF.astype(r["df"].dtype)
            if decay is not None:
                add(_masks(C * rk, C, rk)[2], dF * r["f"][:, ks])
        if decay is None:
            return
        # ... and through the total (d gamma gamma).
        dtotal = r["dgam"][:, ks] * _exp(total)
        if decay == "channel":
            r["dg"][:, ks] = (dg + dtotal).astype(r["dg"].dtype)
        else:
            r["dg"][pl.ds(j, 1), :] = (dg + jnp.sum(dtotal, axis=1, keepdims=True)).astype(
                r["dg"].dtype)

    if not m:  # X is Vk itself, O0 the state pass's: dVk is dX
        return

    @pl.when(j >= nk)
    def _values():  # X0 = Tinv (y - PF Vk), O0 = QE X0 + QF Vk
        vs = pl.ds((j - nk) * bv, bv)
        dO0 = r["do0"][:, vs]
        Vk = None
        if rk:
            Vk = _load(r, "vk", vs)
            dVk = _dot(r["qf"][...], dO0, precision, trans_a=True)
            dQF = _dot(dO0, Vk, precision, trans_b=True)
            partial("dqf", dQF, _pairs(dQF.shape, 1, rk, False, n), j - nk)
        Tinv = r["ti"][...]
        X0 = _dot(Tinv, _rhs(r, vs, Vk, precision), precision)
        drhs = _dot(Tinv, r["dx"][fm.e_rows, vs]
                    + _dot(r["qe"][...], dO0, precision, trans_a=True),
                    precision, trans_a=True)
        if "dy" in r:
            r["dy"][:, vs] = drhs.astype(r["dy"].dtype)
        probed_partials(_dot(dO0, X0, precision, trans_b=True),
                        _dot(drhs, X0, precision, trans_b=True))
        if rk:
            dVk = dVk + r["dx"][fm.f_rows, vs] - _dot(r["pf"][...], drhs, precision,
                                                      trans_a=True)
            r["dvk"][:, vs] = dVk.astype(r["dvk"].dtype)
            dPF = -_dot(drhs, Vk, precision, trans_b=True)
            partial("dpf", dPF, _pairs(dPF.shape, m, rk, True), j - nk)


def _backward_key_block(fm, decay, own):
    """Key columns per program of the backward: 32 where P's exponent sums are a tile of their
    own (per-channel decays, probed keys, P's sums not q's: dplr, hdla) in chunks of 64 rows
    or more, whose key half holds too many [C, 64] tiles at 64 (255 registers and spilling,
    benchmarks/kernel_registers.py); else BLOCK. On the H100 (B=4, T=4096, H=16, one call)
    at C = 64: the kernel 2.77 -> 2.03 ms for dplr, 2.92 -> 2.72 for hdla; kda 1.37 -> 1.44
    and gated_delta_rule 1.23 -> 1.44 the other way. At C = 32 it cost dplr and hdla 0.7-1.3
    ms of the whole op (benchmarks/NOTES.md, sixteenth session)."""
    if decay == "channel" and fm.m and fm.C >= 64 and not _probes_as_queries(fm, own):
        return BLOCK // 2
    return BLOCK


def _decay_mode(g):
    return None if g is None else ("scalar" if g.ndim == 1 else "channel")


# Operand names in call order; a name whose array is None (the form lacks that part) is left
# out, so the kernels see only what the form has.
_IN = ("q", "g", "e", "p", "y", "qe", "ti", "f", "vk", "qf", "pf", "eb")


def _kernel_inputs(q, g, E, y, P, QE, Tinv, F, Vk, QF, PF, eb=None):
    """(names, arrays, Kp, Vp) of the present inputs: K and V padded to powers of two >= 16
    (zeros add nothing; padded decays are 0), a per-token decay as a row; Vp = 0 without
    values (y and Vk None: no value programs, _blocks)."""
    values = Vk if Vk is not None else y
    Kp, Vp = _pow2(q.shape[-1]), 0 if values is None else _pow2(values.shape[-1])
    pk = lambda x: None if x is None else _pad_to(x, 1, Kp)
    pv = lambda x: None if x is None else _pad_to(x, 1, Vp)
    if g is not None:
        g = g[None, :] if g.ndim == 1 else pk(g)
    ins = (pk(q), g, pk(E), pk(P), pv(y), QE, Tinv, pk(F), pv(Vk), QF, PF,
           None if eb is None else eb[:, None])
    live = [(n, x) for n, x in zip(_IN, ins) if x is not None]
    return tuple(n for n, _ in live), tuple(x for _, x in live), Kp, Vp


def _launch(kernel, args, outs, interpret, launch, Kp, Vp, name, key_block=None):
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return pl.pallas_call(kernel, out_shape=outs, grid=(_blocks(Kp, Vp, key_block)[3],),
                          interpret=interpret, compiler_params=params, name=name)(*args)


INVERSE_WARPS = 2  # [16, 16] tiles: 944 SASS instructions per warp at 2 warps, 3216 at 4


def _inverse_kernel(n_ref, t_ref, *, precision, sync):
    """(I + N)^-1 of one chunk's strictly lower-triangular N [n, n], n = 16 * 2^j, as
    triangular.unit_lower_inverse computes it: forward substitution on the 16-row diagonal
    blocks, then pairwise merges [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]. Each
    level's blocks go to t_ref and come back for the next after a barrier (sync: on the GPU,
    where they return to other threads than wrote them)."""
    n = n_ref.shape[0]
    r, c = _iota((SUB, SUB), 0), _iota((SUB, SUB), 1)
    e = _iota((1, SUB), 1)
    for b in range(n // SUB):
        rows = pl.ds(b * SUB, SUB)
        Nt = n_ref[rows, rows].T  # [j, i] = N[i, j]

        def row(i, X, Nt=Nt):  # X[i] = e_i - N[i] X: N[i, j] = 0 for j >= i, unfinished rows
            n_i = jnp.sum(jnp.where(c == i, Nt, 0.0), axis=1, keepdims=True)  # [j, 1]
            x_i = jnp.where(e == i, 1.0, 0.0) - jnp.sum(n_i * X, axis=0, keepdims=True)
            return jnp.where(r == i, x_i, X)

        X = jax.lax.fori_loop(1, SUB, row, jnp.where(r == c, 1.0, 0.0).astype(Nt.dtype))
        t_ref[rows, rows] = X.astype(t_ref.dtype)
    s = SUB
    while s < n:
        if sync:
            pl_triton.debug_barrier()
        for a in range(0, n, 2 * s):
            first, second = pl.ds(a, s), pl.ds(a + s, s)
            lower = _dot(_dot(t_ref[second, second], n_ref[second, first], precision),
                         t_ref[first, first], precision)
            t_ref[second, first] = (-lower).astype(t_ref.dtype)
            t_ref[first, second] = jnp.zeros((s, s), t_ref.dtype)  # the upper blocks
        s *= 2


def _inverse(L, cfg):
    """(I + L)^-1 for one chunk's L [n, n] (strictly lower triangular) in _inverse_kernel."""
    params = None if cfg.interpret else pl_triton.CompilerParams(num_warps=INVERSE_WARPS,
                                                                   num_stages=1)
    kernel = functools.partial(_inverse_kernel, precision=cfg.precision,
                               sync=not cfg.interpret)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(L.shape, L.dtype),
                          interpret=cfg.interpret, compiler_params=params,
                          name="dplr_ut_inverse")(L)


@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13, 14))
def _tail(q, g, E, y, P, L, QE, F, Vk, QF, PF, eb, cfg, n, own):
    return _tail_fwd(q, g, E, y, P, L, QE, F, Vk, QF, PF, eb, cfg, n, own)[0]


def _tail_fwd(q, g, E, y, P, L, QE, F, Vk, QF, PF, eb, cfg, n, own):
    """eb: None, or the probed keys' row scale [ne] (beta: E is beta k, formed on chip)."""
    Cq, K = q.shape  # query rows: one token in n
    ne, nf = (0 if x is None else x.shape[0] for x in (E, F))  # probed and plain rows
    Tinv = None if E is None else _inverse(L, cfg)
    # Without probed keys X is the plain values themselves and O0 the state pass's
    # (chunked.chunk_factors): the kernels read no values (QF is None).
    res = (q, g, E, y, P, QE, Tinv, F, Vk if ne else None, QF, PF, eb)
    names, ins, Kp, Vp = _kernel_inputs(*res)
    f = lambda *s: jax.ShapeDtypeStruct(s, _acc(q))
    outs = {"gam": f(1, Kp), "z": f(ne + nf, Kp), "qs": f(Cq, Kp)}
    if ne:
        outs.update(w=f(ne, Kp), x=f(ne + nf, Vp), o0=f(Cq, Vp))
    kernel = functools.partial(_forward_kernel, names=names + tuple(outs), n=n, own=own,
                               decay=_decay_mode(g), precision=cfg.precision, exact=cfg.exact)
    got = dict(zip(outs, _launch(kernel, ins, list(outs.values()), cfg.interpret, cfg.fwd,
                                 Kp, Vp, "dplr_factors_fwd")))
    if not ne:
        return (got["gam"][0, :K], got["z"][:, :K], None, Vk, got["qs"][:, :K], None), res
    V = (y if Vk is None else Vk).shape[-1]
    return (got["gam"][0, :K], got["z"][:, :K], got["w"][:, :K], got["x"][:, :V],
            got["qs"][:, :K], got["o0"][:, :V]), res


def _tail_bwd(cfg, n, own, res, cts):
    *res, eb = res
    if eb is not None:  # through E = eb k, formed here
        E = res[2]
        res[2] = E.astype(_acc(E)) * eb[:, None]
        d = _tail_bwd(cfg, n, own, tuple(res) + (None,), cts)
        dE = d[2]
        return (*d[:2], (dE * eb[:, None]).astype(E.dtype), *d[3:-1],
                jnp.sum(dE * E.astype(dE.dtype), axis=1).astype(eb.dtype))
    q, g, E, y, P, QE, Tinv, F, Vk, QF, PF = res
    Cq, K = q.shape
    C = Cq * n  # tokens
    ne, nf = (0 if x is None else x.shape[0] for x in (E, F))
    names, ins, Kp, Vp = _kernel_inputs(*res)
    dgam, dZ, dW, dX, dQs, dO0 = cts
    pk = lambda x: _pad_to(x, x.ndim - 1, Kp)
    pv = lambda x: _pad_to(x, 1, Vp)
    cts = {"dgam": pk(dgam[None, :]), "dz": pk(dZ), "dw": pk(dW) if ne else None,
           "dx": pv(dX) if ne else None, "dqs": pk(dQs), "do0": pv(dO0) if ne else None}
    cts = {name: x for name, x in cts.items() if x is not None}
    f = lambda *s: jax.ShapeDtypeStruct(s, q.dtype)
    decay = _decay_mode(g)
    key_block = _backward_key_block(_Form(C, ne // C, nf // C, n), decay, own)
    _, _, nk, progs = _blocks(Kp, Vp, key_block)
    # The C x C cotangents as [programs * rows, columns], one block of rows per program.
    outs = {"dq": f(Cq, Kp)}
    if ne:
        outs.update(de=f(ne, Kp), dp=f(ne, Kp), dl=f(progs * ne, ne), dqe=f(progs * Cq, ne))
        if y is not None:
            outs["dy"] = jax.ShapeDtypeStruct((ne, Vp), y.dtype)
    if nf:
        outs["df"] = f(nf, Kp)
        if ne:
            outs.update(dvk=jax.ShapeDtypeStruct((nf, Vp), Vk.dtype), dqf=f((progs - nk) * Cq, nf),
                        dpf=f((progs - nk) * ne, nf))
    if decay is not None:
        outs["dg"] = f(C, Kp) if decay == "channel" else f(nk, C)
    kernel = functools.partial(_backward_kernel, names=names + tuple(cts) + tuple(outs), n=n,
                               own=own, decay=decay, precision=cfg.precision, exact=cfg.exact,
                               key_block=key_block)
    got = dict(zip(outs, _launch(kernel, ins + tuple(cts.values()), list(outs.values()),
                                 cfg.interpret, cfg.bwd, Kp, Vp, "dplr_factors_bwd",
                                 key_block)))

    def total(name, rows):
        return None if name not in got else got[name].reshape(-1, rows,
                                                              got[name].shape[1]).sum(axis=0)

    key = lambda name: got[name][:, :K] if name in got else None
    dg = None if decay is None else (got["dg"][:, :K] if decay == "channel"
                                     else jnp.sum(got["dg"], axis=0))
    dy = got["dy"][:, :y.shape[-1]] if "dy" in got else None
    dVk = None
    if nf:  # plain values without probed keys are X itself: dX reaches them directly
        dVk = got["dvk"][:, :Vk.shape[-1]] if ne else dX
    return (key("dq"), dg, key("de"), dy, key("dp"), total("dl", ne), total("dqe", Cq),
            key("df"), dVk, total("dqf", Cq), total("dpf", ne), None)


_tail.defvjp(_tail_fwd, _tail_bwd)

RANKS = (1, 2, 4)  # keys of each kind per token the kernels take (tile rows: powers of two)
MAX_ROWS = 128  # probed or plain rows per chunk beyond one key per token


def takes(E, F):
    """Whether the kernels take a chunk's form: E and F [C, rank, K] or None. One key per token
    at any chunk size (the delta family, GLA, rank-1 DPLR); 2 or 4 keys per token (DPLR's
    ranks) up to MAX_ROWS rows (C x C x rank^2 float32 products and inverse on chip: at C = 64
    that is rank 2)."""
    C = (E if E is not None else F).shape[0]
    ranks = [_rank(x) for x in (E, F) if x is not None]
    return all(r in RANKS and (r == 1 or C * r <= MAX_ROWS) for r in ranks)



def low_rank_factors(q, g, E, y, P, F, Vk, beta=None, *, decayed, own_decay=False, interpret,
                     precision, exact, launch):
    """chunked.chunk_factors for one chunk of a form the kernels take (`takes`): q [C / n, K]
    (the last of every n tokens' queries), E, y, P [C, m, ...] or None, F, Vk [C, rk, ...]
    or None, not both None (y, P, F, Vk of rank 1 may come without their rank axis: in place,
    chunked._summaries); own_decay: P holds p (chunked.chunked); beta: None, or [C] with
    probed keys of rank 1: the keys are E beta, formed on chip (the delta family's beta k from
    k as given: no float32 copy of its own); the intra-chunk products from `decayed`, the rest
    in the kernels above. launch: (forward, backward) Launch. Without E, X is Vk itself,
    which the kernels only pass through: Vk may be None (chunked.chunked hands the values
    to the state pass where they lie), X then None."""
    C = (E if E is not None else F).shape[0]
    n = C // q.shape[0]
    m, rk = (0 if x is None else _rank(x) for x in (E, F))

    # q and keys of rank 1 go to the products without a rank axis (decayed.decayed_products
    # takes [C, K]): added under the engine's vmaps, it would move an input read in place.
    def products(q, g, E, P, F, beta):  # [rows * a, K] and [C * b, K] -> [rows * a, C * b]
        rank = lambda x, r: x if x is None or r == 1 else x.reshape(C, r, x.shape[-1])
        d = decayed if beta is None else functools.partial(decayed, y_scale=beta)
        return tuple(None if D is None else D.reshape(D.shape[0] * D.shape[1], -1)
                     for D in intra_products(q, g, rank(E, m), rank(P, m), rank(F, rk),
                                             d, own_decay))

    # Rematerialized in the backward pass, not saved: XLA's products (per-token or no decay)
    # would keep their C x C intermediates (2.9x the residual bytes of XLA's checkpointed
    # phase 1 for gated_delta_rule at T=512, K=V=64: tests/test_pallas_factors.py), and its
    # per-channel ones [C, 16, K] pairwise decays; the kernels' (decayed.py) keep only their
    # inputs, which are saved anyway (as the [C * rank, K] arrays the tail keeps: products
    # of the [C, rank, K] ones would have XLA save both), and are not run again.
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])
    E, y, P, F, Vk = map(flat, (E, y, P, F, Vk))
    L, QE, QF, PF = jax.checkpoint(products, policy=jax.checkpoint_policies.nothing_saveable)(
        q, g, E, P, F, beta)
    # Without E, QF goes to the state pass (chunked.chunk_factors).
    probed = E is not None
    cfg = _Cfg(interpret, precision, exact, *launch)
    return _tail(q, g, E, y, P, L, QE, F, Vk, QF if probed else None, PF, beta, cfg, n,
                 own_decay and g is not None) + (None if probed else QF,)
