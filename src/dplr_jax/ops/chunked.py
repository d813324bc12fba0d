"""The chunk-wise algorithm in plain jnp (backend "xla").

Every op is lowered (see forms.py) to one engine recurrence per value head:

    S_t = D_t S_{t-1} + sum_j E_tj x_tj^T + sum_i F_ti V_ti^T,
    x_tj = y_tj - P_tj^T S_{t-1},          o_t = scale * S_t^T q_t,

D_t = Diag(exp g_t) (g: none, one scalar per token, or one per key channel). E are the
"probed" keys, whose values x depend on the state through the probes P (the low-rank part
of the transition, - sum_j E_tj P_tj^T, is DPLR's - A_t B_t^T); F are plain keys with known
values V. DPLR is (E, y, P) = (a, 0, b) with F = k (y = 0 passed as None); the delta-rule
family is (beta k, v, e^g k) with no F, so its values and low-rank part share one key and
need one C x C inverse (its forms pass k and `own_decay`, see `chunked`); GLA has no E at
all. This is seed 004's eqs. 12-18, written with x instead of U.

Inside a chunk with cumulative log decay G_t (G_0 = 0) and S_0 its initial state:

    x = (I + L)^-1 (y - (P * e^G_{t-1}) S_0 - L_F V),   L[t,s] = P_t^T e^{G_{t-1} - G_s} E_s (s < t)
    o = (q * e^G) S_0 + QE x + QF V,                     QE[t,s] = q_t^T e^{G_t - G_s} E_s (s <= t)
    S_C = e^{G_C} S_0 + sum_s e^{G_C - G_s} (E_s x_s + F_s V_s)

Writing x = X0 - W S_0 splits every chunk into an affine map S_C = M S_0 + Bc and outputs
o = Qs S_0 + O0 that need S_0 only through one matmul: phase 1 computes (M, Bc, Qs, O0) for
all chunks in parallel (here rematerialized in the backward pass, except what SAVED names;
the Pallas backend's kernels for the delta family keep their own residuals),
phase 2 scans S over chunks (O(T/C) states saved), phase 3 is a batched matmul.
M = Diag(e^{G_C}) - Z_E^T W and Bc = Z^T X need not be formed: the Pallas state pass takes
the factors (chunk_factors), which are C x K where M is K x K, and applies them to S inside
its scan (and, for forms without E, O0 = QF X from the X it reads).

Numerics: all of this runs in float32 (float64 if inputs are float64). No exponent is ever
positive, and no exponent is a difference of two cumulative sums: after a hard reset (log
decay -1000) the cumulative sums sit near -1000, where float32's spacing is 6e-5, and
G_t - G_s would lose the small exponents that matter. Every exponent is a sum over the tokens
it spans: pairwise decays on the diagonal 16-token sub-blocks come from a cumulative sum of
masked per-token decays, and off-diagonal sub-blocks factor through the sub-chunk boundary
as (prefix inside the query's sub-chunk) + (suffix inside the key's) + (whole sub-chunks
between), each factor <= 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dplr_jax.ops.layout import ChunkLayout
from dplr_jax.ops.triangular import unit_lower_inverse

SUB = 16  # sub-chunk length for decay factoring and for the triangular inverse


def _rowscale(X, e):
    """X [C, r, K] times a per-position decay e: None, [C] or [C, K]."""
    if e is None:
        return X
    return X * (e[:, None, None] if e.ndim == 1 else e[:, None, :])


def _sum_dot(dot, dtype):
    """dot(precision) at float32 accuracy, for the 0/1 matrix products that form sums of log
    decays and of gradients: HIGHEST, except float32 on CUDA GPUs, where three tf32 passes on
    the tensor cores are as accurate (each term rounded to 2^-22 relative; the 0/1 factor is
    exact in tf32) and faster than XLA's HIGHEST float32 dot on the CUDA cores (the pairwise
    segment sums of a scalar decay, [C*C, C] x [C, chunks]: 0.21 -> 0.11 ms in Gated
    DeltaNet's forward on the H100, 0.41 -> 0.23 in its backward; benchmarks/NOTES.md)."""
    if dtype != jnp.float32:
        return dot(jax.lax.Precision.HIGHEST)
    return jax.lax.platform_dependent(
        cuda=lambda: dot(jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3),
        default=lambda: dot(jax.lax.Precision.HIGHEST))


def masked_sums(g, axis, keep):
    """out_t = sum of g_u over the u with keep(t, u) (index arrays -> bool), along `axis`.

    A 0/1 matrix product at float32 accuracy (_sum_dot), so every output is a sum of the
    tokens it covers. Not jnp.cumsum: XLA lowers cumsum on GPUs as a reduce-window whose
    memory traffic grows with the window, and its transpose likewise (7.3 ms of kda's 39 ms
    forward+backward at B=4, T=4096, H=16, K=128 on the H100, benchmarks/NOTES.md).
    """
    t = jnp.arange(g.shape[axis])
    span = keep(t[:, None], t[None, :]).astype(g.dtype)
    out = _sum_dot(lambda p: jnp.tensordot(span, jnp.moveaxis(g, axis, 0), axes=1,
                                           precision=p), g.dtype)
    return jnp.moveaxis(out, 0, axis)


def prefix_suffix(g, axis=0):
    """Inclusive prefix sums, exclusive prefix sums and exclusive suffix sums of g along `axis`,
    each a sum of the tokens it covers."""
    return tuple(masked_sums(g, axis, keep) for keep in (jnp.greater_equal, jnp.greater,
                                                         jnp.less))


def segment_sums(g, between=False):
    """S[t, s] = sum of g_u over s < u <= t (between: s < u < t), for s < t; 0 elsewhere.
    g [c, ...]; returns [c, c, ...]. A 0/1 matrix product at float32 accuracy (_sum_dot):
    sums of the per-token decays, never differences of cumulative sums."""
    c = g.shape[0]
    t = jnp.arange(c)
    hi = t[:, None, None] - (1 if between else 0)  # [t, s, u]: s < u <= hi
    span = ((t[None, :, None] < t[None, None, :]) & (t[None, None, :] <= hi)).astype(g.dtype)
    return _sum_dot(lambda p: jnp.einsum("tsu,u...->ts...", span, g, precision=p), g.dtype)


def _diagonal_blocks(Xs, Ys, gs, bounded):
    """decayed_products on every diagonal sub-block at once, per-channel decays:
    Xs [n, c, a, K], Ys [n, c, b, K], gs [n, c, K] -> [n, c, a, c, b].

    Exact: materializes the pairwise decays [n, c, c, K] (the Pallas backend keeps them on
    chip: pallas/decayed.py). bounded: every log decay is >= a bound L >= MIN_BOUND, so the
    pair's decay factors through the sub-chunk's middle row m as e^{P_t - P_m} e^{P_m - P_s}
    (P: prefix sums inside the sub-chunk), one matmul with factors of at most e^{8|L|}."""
    c = gs.shape[1]
    t = jnp.arange(c)
    mask = t[:, None] >= t[None, :]
    if bounded:
        # The pairs without decay (s = t) as plain products: through the factors their
        # rounding would enter the log-decay gradient as a difference of large terms (up to
        # e^{|L|} times float32 rounding when every decay sits at L).
        near = jnp.eye(c, dtype=bool)
        direct = jnp.einsum("itak,itbk->itab", Xs, Ys)[:, :, :, None] * near[:, None, :, None]
        Xd, Yd = bounded_factors(Xs, Ys, gs, axis=1)
        far = mask & ~near
        # where, not a product with the mask: a masked pair may overflow (up to e^{16|L|}).
        return direct + jnp.where(far[:, None, :, None], jnp.einsum("itak,isbk->itasb", Xd, Yd),
                                  0.0)
    e = mask[:, :, None] * jnp.exp(jax.vmap(lambda x: segment_sums(x))(gs))
    return jnp.einsum("itak,isbk,itsk->itasb", Xs, Ys, e)


# With log decays >= L, a 16-token sub-chunk's prefix sums lie in [16 L, 0]; the bounded
# diagonal blocks multiply query and key factors of up to e^{8|L|} each (query rows before
# the middle, key rows after it). A masked pair reaches e^{16|L|} and may overflow: it is
# dropped by a select here and never formed by the Pallas kernel. L >= -5 (FLA's safe-gate
# range) keeps every kept factor <= e^40 and the float32 rounding of its exponent <= 40 eps.
MIN_BOUND = -5.0


def bounded_chunks(g):
    """g [B, NC, C, H, K] (per-channel log decays in chunks) -> [B, NC, H] bool: the chunks
    of a head whose every half sub-chunk (8 tokens) sums to >= 8 MIN_BOUND in every channel.

    The bounded diagonal blocks need only that much: the query factors of a sub-chunk's
    first half and the key factors of its second are e^{-(the half's decays past the middle
    row)} <= e^{8|MIN_BOUND|}, and every other exponent is <= 0 and a sum of at most 16
    tokens, as under log_decay_lower_bound. Decays >= MIN_BOUND pass; so do decays that dip
    below it now and then, while a hard reset (-1000) fails its chunk. NaN fails."""
    B, NC, C, H, K = g.shape
    halves = g.reshape(B, NC, C // (SUB // 2), SUB // 2, H, K).sum(axis=3)
    return jnp.all(halves >= SUB // 2 * MIN_BOUND, axis=(2, 4))


def bounded_factors(X, Y, g, axis=0):
    """Query and key factors of the bounded diagonal blocks: X e^{P - m} and Y e^{m - P}
    with P the inclusive prefix sums of g along `axis` (a sub-chunk) and m = P at the middle
    row. X [..., c, a, K] and Y [..., c, b, K] with the rank axis after `axis`; g [..., c, K]."""
    incl = masked_sums(g, axis, jnp.greater_equal)
    mid = jax.lax.slice_in_dim(incl, g.shape[axis] // 2 - 1, g.shape[axis] // 2, axis=axis)
    return (X * jnp.exp(incl - mid)[..., None, :], Y * jnp.exp(mid - incl)[..., None, :])


def at_last(q, n, axis=0):
    """Queries of the last of every n tokens (forms.py's multi-factor ops' real tokens) ->
    a query per token along `axis`, zeros at the others' (n - 1 rows before each)."""
    if n == 1:
        return q
    x = jnp.stack([jnp.zeros_like(q)] * (n - 1) + [q], axis=axis + 1)
    return x.reshape(q.shape[:axis] + (n * q.shape[axis],) + q.shape[axis + 1:])


def decayed_products(X, Y, g, bounded=False, strict=False):
    """Out[t,a,s,b] = sum_k X[t,a,k] Y[s,b,k] exp(sum_{s<u<=t} g[u,k]) for s <= t.

    strict=True keeps only s < t. (A probe that reads the state before token t's decay is
    a query of token t - 1: intra_products.) X [C, a, K], Y [C, b, K]; g per-token log
    decays: None, [C] or [C, K]. Masked entries are exactly zero.
    bounded: the caller guarantees g >= MIN_BOUND (the ops' log_decay_lower_bound), which
    allows the faster diagonal blocks. X may hold only the rows of the last of every n
    tokens, [C / n, a, K] (forms.py's multi-factor ops' queries); Out then has those rows.

    X may be a tuple of query sides against the same keys, strict a tuple of their flags:
    the result is the tuple of their products (the Pallas kernels form them in one pass).
    """
    if isinstance(X, tuple):
        return tuple(decayed_products(x, Y, g, bounded, s) for x, s in zip(X, strict))
    n = Y.shape[0] // X.shape[0]
    if n > 1:
        return decayed_products(at_last(X, n), Y, g, bounded, strict)[n - 1::n]
    if strict:
        return decayed_products(X, Y, g, bounded) * (
            1.0 - jnp.eye(X.shape[0], dtype=X.dtype))[:, None, :, None]
    C = X.shape[0]
    t = jnp.arange(C)
    mask = t[:, None] >= t[None, :]
    if g is None or g.ndim == 1:
        out = jnp.einsum("tak,sbk->tasb", X, Y)
        decay = mask.astype(X.dtype) if g is None else mask * jnp.exp(segment_sums(g))
        return out * decay[:, None, :, None]
    # Per-channel decay: exact pairwise decays on the diagonal sub-blocks...
    c = min(SUB, C)
    n = C // c
    a, b, K = X.shape[1], Y.shape[1], X.shape[2]
    Xs, Ys, gs = X.reshape(n, c, a, K), Y.reshape(n, c, b, K), g.reshape(n, c, K)
    diag = _diagonal_blocks(Xs, Ys, gs, bounded)  # [n, c, a, c, b]
    out = diag[:, :, :, None] * jnp.eye(n, dtype=X.dtype)[:, None, None, :, None, None]
    if n > 1:
        # ...and off-diagonal blocks (query sub-chunk i > key sub-chunk j) through the boundary.
        incl = masked_sums(gs, 1, jnp.greater_equal)  # inclusive, inside each sub-chunk
        suffix = masked_sums(gs, 1, jnp.less)  # exclusive suffix sums, likewise
        between = segment_sums(incl[:, -1], between=True)  # [i, j]: whole sub-chunks j < l < i
        Xh = Xs[1:] * jnp.exp(incl)[1:, :, None, :]
        # between[1:, t // c] as a repeat: the transpose of that gather is a colliding
        # scatter-add, 3.3 ms of kda's forward+backward on the H100.
        expo = suffix.reshape(C, K)[None] + jnp.repeat(between[1:], c, axis=1)  # [n-1, C, K]
        before = (t // c)[None, :] < jnp.arange(1, n)[:, None]  # [n-1, C]: key before sub-chunk i
        Yh = Y[None] * (before[:, :, None] * jnp.exp(jnp.where(before[:, :, None], expo, 0.0)))[
            :, :, None, :]
        off = jnp.einsum("itak,isbk->itasb", Xh, Yh).reshape(n - 1, c, a, n, c, b)
        out = out.at[1:].add(off)
    return out.reshape(C, a, C, b)


# What the backward pass keeps of phase 1 rather than recomputing it: the intra-chunk decayed
# products and the UT inverse, the parts most expensive to recompute (on the H100 the products
# were ~1.7 ms of kda's forward, run again in its backward) and small: C x C per chunk each,
# 16 KB in float32 at C=64, where each of phase 1's outputs is 32-64 KB per chunk.
SAVED = "phase1_products"


def _saved(x):
    return checkpoint_name(x, SAVED)


def _rows_up(x):
    """Row t of x [C, ...] moved to row t - 1 (row C - 1 zero)."""
    return jnp.concatenate([x[1:], jnp.zeros_like(x[:1])])


def _rows_down(x):
    """Row t of x [C, ...] moved to row t + 1 (row 0 zero)."""
    return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])


def intra_products(q1, g, E, P, F, decayed, own_decay):
    """Phase 1's intra-chunk products of one chunk, as decayed's [rows, a, C, b]: the probes'
    L = (P, E) and PF = (P, F), the queries' QE = (q, E) and QF = (q, F); None where the form
    lacks a part. q1 [C / n, 1, K] (or [C / n, K] where `decayed` takes that: the Pallas
    kernels'). P's products come with q's from one pass over each key kind (decayed's query
    sides):

    - with own_decay (P holds p; the probe p e^{g_t} reads the state after its token's
      decay, chunked.chunked) they are p's strict products;
    - otherwise a probe of token t reads the state before t's decay, as a query of token
      t - 1 would: its product with key s, decayed over s < u < t for s < t, is the plain
      product of row t - 1 once P moves up a row (_rows_up), moved back down after
      (_rows_down; the zero row moved in last stands for the next chunk's first token, whose
      products that drops). DPLR: one pass for QE and L and one for QF and PF, not four."""
    if E is None:  # plain keys only (GLA)
        return None, None, decayed(q1, F, g), None
    # Without decay a probe reads the same state before and after its token's (none): P's
    # strict products, with no move of P up a row and of L back down.
    own = own_decay or g is None
    sides, back = ((q1, P), lambda D: D) if own else ((q1, _rows_up(P)), _rows_down)
    QE, L = decayed(sides, E, g, strict=(False, own))
    QF = PF = None
    if F is not None:
        QF, PF = decayed(sides, F, g, strict=(False, own))
        PF = back(PF)
    return back(L), QE, QF, PF


def chunk_factors(q, g, E, y, P, F, Vk, decayed=decayed_products, own_decay=False):
    """One chunk of one head -> its transition in factored form, (gamma, Z, W, X, Qs, O0, QF):

        S_C = gamma * S_0 + Z^T (X - W' S_0),      o = Qs S_0 + O0,

    W' = [W; 0]: the probed rows (the first C*m of Z and X: E decayed to the chunk end, and
    their values X0) read the state through W; the plain rows (F decayed to the chunk end,
    and V) do not. q [C / n, K]: the queries of the last of every n tokens (n = 1: all; the
    multi-factor ops read only their real tokens' outputs, forms.py); g None, [C] or [C, K];
    E, P [C, m, K] and y [C, m, V] (or None; y None with E: zero values, which needs F);
    F [C, r, K] and Vk [C, r, V] (or None). gamma [K]; Z [C*(m+r), K]; W [C*m, K] or None
    (no E); X [C*(m+r), V]; Qs [C / n, K]; O0 [C / n, V] and QF None, or without E (X is
    then Vk itself) O0 None and QF [C / n, C*r], the queries' products with the plain keys:
    O0 = QF X. The Pallas state pass takes this form (its K x K transition matrix is never
    formed; O0 = QF X it forms from the X it reads, where phase 1 would have only that to
    do with the values); chunk_summary multiplies it out.
    decayed: the function for the intra-chunk products (the Pallas backend passes its kernels).
    own_decay: P holds p, the probes being P_t = p_t e^{g_t} (chunked.chunked).
    """
    C, K = (E if E is not None else F).shape[0], q.shape[1]
    n = C // q.shape[0]
    if g is None:
        e_q = e_prev = e_end = None
        gamma = jnp.ones((K,), q.dtype)
    else:
        incl, excl, suffix = prefix_suffix(g)
        e_q, e_prev, e_end = jnp.exp(incl), jnp.exp(excl), jnp.exp(suffix)
        gamma = jnp.broadcast_to(e_q[-1], (K,))
    own = own_decay and g is not None
    q1 = q[:, None, :]
    L, QE, QF, PF = (None if x is None else _saved(x)
                     for x in intra_products(q1, g, E, P, F, decayed, own_decay))
    Qs = _rowscale(q1, None if e_q is None else e_q[n - 1::n])[:, 0]
    O0 = None
    Z, X, W = [], [], None
    if E is not None:
        m = E.shape[1]
        QE, L = QE[:, 0].reshape(C // n, C * m), L.reshape(C * m, C * m)
        Tinv = _saved(unit_lower_inverse(L, block=SUB * m))
        rhs = y
        if F is not None:
            PFV = jnp.einsum("tjsi,siv->tjv", PF, Vk)  # PF [C, m, C, r]
            rhs = -PFV if y is None else y - PFV
        W = Tinv @ _rowscale(P, e_q if own else e_prev).reshape(C * m, K)
        X0 = Tinv @ rhs.reshape(C * m, -1)
        Qs = Qs - QE @ W
        O0 = QE @ X0
        Z.append(_rowscale(E, e_end).reshape(C * m, K))
        X.append(X0)
    if F is not None:
        Vf = Vk.reshape(-1, Vk.shape[-1])
        QF = QF[:, 0].reshape(C // n, -1)  # [C / n, 1, C, r]
        if O0 is not None:
            O0, QF = O0 + QF @ Vf, None
        Z.append(_rowscale(F, e_end).reshape(-1, K))
        X.append(Vf)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    return gamma, cat(Z), W, cat(X), Qs, O0, QF


def chunk_summary(q, g, E, y, P, F, Vk, decayed=decayed_products, own_decay=False):
    """One chunk of one head -> (M, Bc, Qs, O0): S_C = M S_0 + Bc and o = Qs S_0 + O0.
    M is [K, K], or [K] (diagonal) when there is no E. Arguments as chunk_factors."""
    gamma, Z, W, X, Qs, O0, QF = chunk_factors(q, g, E, y, P, F, Vk, decayed, own_decay)
    M = gamma if W is None else jnp.diag(gamma) - Z[:W.shape[0]].T @ W
    return M, Z.T @ X, Qs, QF @ X if O0 is None else O0


def _apply(M, S):
    return M[..., :, None] * S if M.ndim == S.ndim - 1 else jnp.einsum("...kl,...lv->...kv", M, S)


def checkpointed(summary, *, decayed, own_decay=False):
    """summary (chunk_summary or chunk_factors) for one chunk, rematerialized in the backward
    pass but for what SAVED names."""
    return jax.checkpoint(functools.partial(summary, decayed=decayed, own_decay=own_decay),
                          policy=jax.checkpoint_policies.save_only_these_names(SAVED))


def _summaries(layout, q_layout, summary, q, g, E, y, P, F, Vk, beta=None, in_place=(),
               flags=None):
    """Phase 1 over all (batch, head, chunk): inputs [B, T, H, ...] -> [B, H, NC, ...] (q in
    q_layout's chunks). summary: a function of one chunk's (q, g, E, y, P, F, Vk), or with
    flags [B, H, NC] of (its flag, q, g, ...).

    in_place: names of inputs ("q", "g", "E", "y", "P", "F", "Vk") that stay [B, NC, C, H,
    ...] (chunked.chunked's in_place), which a Pallas kernel under vmap reads where they lie;
    E, y, P, F and Vk then lose their rank axis (of size 1) here, where that is a reshape,
    and each chunk's is [C, V] or [C, K]. The other inputs are moved. beta (with E in place): the
    keys' row scale [B, T, H] (a row [C] per chunk), summary's last input."""
    names = ("q", "g", "E", "y", "P", "F", "Vk") + (() if beta is None else ("beta",))
    xs = dict(zip(names, (q, g, E, y, P, F, Vk, beta)))
    for name in ("E", "y", "P", "F", "Vk"):
        if name in in_place and xs[name] is not None:
            xs[name] = xs[name][..., 0, :]

    def chunks(name):
        if xs[name] is None:
            return None
        x = (q_layout if name == "q" else layout).to_chunks(xs[name])
        return x if name in in_place else jnp.moveaxis(x, 3, 1)

    flag = () if flags is None else (0,)
    fn = jax.vmap(jax.vmap(jax.vmap(summary), in_axes=flag + tuple(
        2 if name in in_place else 0 for name in names)))
    return fn(*(() if flags is None else (flags,)), *map(chunks, names))


def _scan_outputs(layout, M, Bc, Qs, O0, h0):
    """Phases 2 and 3: outputs o [B, H, NC, C, V] and the state entering every chunk S_in
    [B, H, NC, K, V], scanning S <- M S + Bc over chunks (reset to h0 at sequence starts)."""
    def body(S, inp):
        Mc, Bcc, reset, idx = inp
        S = jnp.where(reset, h0[idx], S)
        return _apply(Mc, S) + Bcc, S

    xs = (jnp.moveaxis(M, 2, 0), jnp.moveaxis(Bc, 2, 0), layout.reset, layout.init_idx.T)
    _, S_in = jax.lax.scan(body, jnp.zeros_like(Bc[:, :, 0]), xs)
    S_in = jnp.moveaxis(S_in, 0, 2)
    return jnp.einsum("bhnck,bhnkv->bhncv", Qs, S_in) + O0, S_in


def chunked(q, g, E, y, P, F, Vk, h0, *, chunk_size, cu_seqlens=None, own_decay=False,
            decayed=decayed_products, bounded=False, scan=None, factors=None, in_place=(),
            beta=None):
    """Runs the engine recurrence. All inputs [B, T, H, ...] in the accumulation dtype but q
    [B, T / n, H, K]: the queries of the last of every n tokens (n = 1: every token; n must
    divide chunk_size, so that a chunk holds whole groups); h0 [N, H, K, V]; cu_seqlens
    multiples of n. Returns o [B, T / n, H, V] (unscaled) and final states [N, H, K, V].

    own_decay: P holds p, the probes being P_t = p_t e^{g_t} (the delta family's: the probe
    reads the state after its token's decay). Then P_t e^{G_{t-1} - G_s} = p_t e^{G_t - G_s}:
    L is a product of p with the keys E under the same decays as QE, strictly below the
    diagonal, and both come from one pass over the keys (decayed_products' query sides).

    decayed (decayed_products' signature) replaces phase 1's intra-chunk products, which
    take `bounded`: True (the caller's promise, log_decay_lower_bound), False, or "check":
    per chunk and head, bounded_chunks of g's chunks as a traced flag (the Pallas kernels run
    their bounded or their exact version by it; False without per-channel decays). And
    scan(layout, factors, h0, values=) -> (o [B, NC, C, H, V], final states) phases 2+3 on
    the factored transitions (chunk_factors; the Pallas state pass plugs in here; values:
    None, or with `factors`, where X is Vk of rank 1 itself, Vk's [B, NC, C, H, V] chunks,
    phase 1 then getting Vk None and returning X None), and
    factors(q, g, E, y, P, F, Vk, decayed=...) replaces the checkpointed chunk_factors of
    one chunk (the Pallas kernels of the delta family). Without scan, phase 1 multiplies the
    transitions out (chunk_summary) for XLA's scan (_scan_outputs).

    in_place: names of the inputs that phase 1 reads in their [B, NC, C, H, ...] chunks
    rather than moved to [B, H, NC, C, ...] with the others, for Pallas phases and inputs
    that would be copied for the move alone (api.run_chunked): "q", "g", and "y", "P", "F",
    "Vk" of rank 1, which phase 1 then gets as [C, V] or [C, K] per chunk (`factors` must take
    that: the kernels of factors.py do), and "E" with `beta` [B, T, H] (and `factors`): the
    probed keys are E beta, which the kernels form (E then P itself, as given: the delta
    family's beta k without a float32 copy). On the H100 at B=4, T=4096, H=16, K=128 the copy
    of a float32 g took 0.09 ms; reading its rows 8 KB apart cost gla's bounded products
    backward 0.11 ms (the exact products kernels read no g; benchmarks/NOTES.md, nineteenth
    session).
    """
    B, T = (E if E is not None else F).shape[:2]
    n = T // q.shape[1]
    if n * q.shape[1] != T or chunk_size % n:
        raise ValueError(f"chunked: q has {q.shape[1]} tokens for {T}: one per n tokens, "
                         f"with n dividing chunk_size {chunk_size}")
    layout = ChunkLayout.make(B, T, chunk_size, cu_seqlens)
    q_layout = layout if n == 1 else ChunkLayout.make(
        B, T // n, chunk_size // n, None if cu_seqlens is None else cu_seqlens // n)
    # Without probed keys the plain values of rank 1 (GLA) are X itself, which phase 1's
    # kernels only pass through: the scan takes them in their chunks of the tokens' layout
    # (engine._scan: the state pass reads them where they lie) and phase 1 does without.
    values = None
    if scan is not None and factors is not None and E is None and Vk is not None and (
            Vk.shape[3] == 1):
        values, Vk = layout.to_chunks(Vk[..., 0, :]), None
    inputs = (q, g, E, y, P, F, Vk)
    flags = None  # per chunk and head: the products' bounded kernels are safe
    if bounded == "check":
        bounded = False
        if g is not None and g.ndim == 4:
            flags = jnp.moveaxis(bounded_chunks(layout.to_chunks(g)), 2, 1)  # [B, H, NC]

    def summary(bounded):  # phase 1 of one chunk, its products given `bounded`
        d = functools.partial(decayed, bounded=bounded)
        if scan is None or factors is None:
            return checkpointed(chunk_summary if scan is None else chunk_factors, decayed=d,
                                own_decay=own_decay)
        return functools.partial(factors, decayed=d, own_decay=own_decay)

    fn = summary(bounded) if flags is None else lambda flag, *xs: summary(flag)(*xs)
    out = _summaries(layout, q_layout, fn, *inputs, beta, in_place=in_place, flags=flags)
    if scan is None:
        M, Bc, Qs, O0 = out
        o, S_in = _scan_outputs(layout, M, Bc, Qs, O0, h0)
        o = jnp.moveaxis(o, 1, 3)
        r, c = layout.final_row, layout.final_chunk
        finals = _apply(M[r, :, c], S_in[r, :, c]) + Bc[r, :, c]
    else:
        o, finals = scan(layout, out, h0, values=values)
    return q_layout.from_chunks(o), finals
