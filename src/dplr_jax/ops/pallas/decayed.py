"""Pallas kernels for phase 1's decayed products with per-channel log decays (kda, gla, dplr,
hdla) and with scalar ones: the [C, C] intra-chunk matrix of every chunk.

chunked.decayed_products needs, per chunk of C tokens and one head,

    D[t, s] = sum_k X[t, k] Y[s, k] exp(sum_{s < u <= t} g[u, k])      (s <= t),

or only s < t (strict). No exponent may be a difference of cumulative sums (chunked.py
says why). In XLA that costs [16, 16, K] pairwise tensors for the diagonal 16 x 16 blocks
and [n-1, C, K] decayed key factors for the off-diagonal ones, all written to HBM and read
back, in the forward and again in the backward. Sub-chunks i = 0..n-1 (16 tokens); two
kernels each way:

- the diagonal blocks (_diagonal_kernel), a few query rows of one sub-chunk per program (2
  on the GPU): the keys s of the sub-chunk run down from the rows' last, each row carrying
  its exponent d = sum_{s<u<=t} g_u (one add of g_{s+1} per key, one exp2 and one reduction
  over K per key). The rows' exponents after the sub-chunk's first key give the query side
  X_i e^{prefix_i}; the program holding the sub-chunk's last row writes the key side
  Y_j e^{suffix_j} from that row's exponents on the way: each a sum of the tokens it covers;
- the rest of D per chunk (_forward_kernel): the blocks (i, j < i) as one [16, K] x [K, 16]
  dot of the query side, times e^{(whole sub-chunks between j and i)}, against the key side:
  every factor <= 1, and the exponents add up exactly to the pair's decay sum. Pairs in
  different 32-row blocks (C >= 64) take the same factors, times sub-chunk totals, as one
  [32, K] x [K, 32] dot per pair of blocks (_cross_forward).

Query sides: several X against the same Y and g run in one pass (a probe's ranks; phase
1's q with the probes, as chunked.intra_products forms them). Each step's exp2 and key row
serve every side, the key side Y e^{suffix} is formed once, and the backward sums the sides'
shares of dY and R; the scalar forward kernel likewise forms the pairs' decay factors once
for all sides (its backward runs per side). A strict side drops its pairs s = t as well
(the delta family's L). On the H100 this took kda from 9.19 to 8.06 ms forward+backward and
hdla from 16.90 to 14.61 (benchmarks/NOTES.md, fifteenth session), and dplr, whose probes
became query sides too, from 13.72 to 12.53 (seventeenth session).

Backward (custom_vjp): _diagonal_backward_kernel, by the same row groups, runs the keys down
for its rows' dX (as queries) and the queries up for their dY (as keys), and writes the
factors e^{prefix}, e^{suffix} its loops end with; _backward_kernel, per 32-row block of a
chunk (_block_backward), adds the off-diagonal blocks' dX and dY by dots (those of pairs in
different 32-row blocks as [32, 32] blocks) and forms the log decays' gradient, the sums
over later blocks added by the wrapper. That needs no
exponent: with R = X * dX and Q = Y * dY per channel, the pairs (t, s) whose decay contains
g_u are those with s < u <= t, so dg_u = sum_{t >= u} R_t - sum_{s >= u} Q_s, per
sub-chunk from the last: the sum over its rows t >= u (its total less a cumulative sum:
Triton has no reverse one) plus the totals of the sub-chunks after it. R goes to dg's rows
as each sub-chunk's dX is done and comes back after a barrier. R and Q leave out the pairs
whose decay is empty (s = t): they cancel in dg, but their float32 rounding would not (with
every g at -5, dg was off by 5e-5 to 1.4e-4 relative, benchmarks/decayed_dg_cpu.py); the
wrapper adds their dX, dY. Nothing is saved but the inputs.

With the ops' log_decay_lower_bound (every g >= L >= -5, `bounded`), the backward's diagonal
blocks are dots in _backward_kernel, with no diagonal kernel: the sub-chunk's prefix sums P
(one 0/1 dot at float32 precision) give factors X e^{P - m} and Y e^{m - P} around the
middle row m, at most e^{8|L|} each, and dX, dY of the block are two [16, 16] x [16, K]
dots (the off-diagonal blocks are unchanged; their suffix sums and totals are then
differences of sums of <= 16 tokens; the factors of pairs across 32-row blocks are 0/1 dots
of g per sub-chunk, _bounded_factors), in 32 key columns per program where there are
several query sides (_key_columns). The forward under the bound is one kernel,
_bounded_forward_kernel, one program per sub-chunk of rows: its diagonal block one [16, K] x
[K, 16] dot of those factors (the prefix sums by a scan there), its blocks before the
diagonal one dot each, with the key sides of the earlier sub-chunks formed again by every
program that reads them. With one query side it reads X, Y and g and writes D, 112 KB per
chunk (0.15 ms at B=4, T=4096, H=16 at 3 TB/s), where the exact forward's two kernels below
move 280 KB. On the H100 it took kda's products forward from 0.60 to 0.39 ms and dplr's two
from 1.18 to 0.83 (benchmarks/NOTES.md, eighteenth session); one program per chunk, the key
sides held, took 0.53 at 4 warps and 0.99 at 2.

Without the bound the choice is made per chunk and head (chunked.bounded_chunks: every 8
tokens of a sub-chunk's halves sum to >= 8 MIN_BOUND, all the factors above need): both
versions are launched over every chunk, the programs of each returning at once where their
chunk belongs to the other, the bounded kernels writing into the exact ones' outputs
(_call's gate). On the H100 at B=4, T=4096, H=16 the programs that return cost the exact
diagonal kernels 0.08 ms each way (131k programs), the bounded ones 0.02 forward and 0.04
backward, and the check 0.055: kda 7.13 -> 6.98 ms of kernels forward+backward where every
chunk passes, 7.22 where none does (timed, all passing: 7.15 -> 6.94, and 6.72 with the
bound; NOTES, twenty-fourth session).

Cost per chunk (C = 64, K = 128, float32). Forward: the diagonal kernel reads X, Y, g (96
KB, its programs' rows again from L2) and writes 2 C K factors, C x 16 and the sub-chunks'
e^{total} (70 KB); the other reads those and writes C^2 (16 KB); C 8.5 K exps on average on
the diagonal blocks, off-diagonal dots n(n-1)/2 x 2 * 16^2 K = 0.4 MFLOP. At B=4, T=4096,
H=16 (4096 chunks) ~1 GB in all (0.33 ms at 3 TB/s). Backward: the diagonal kernel reads 112
KB and writes 128 (dX, dY and the two factors), the other reads 240 and writes 96: 2.4 GB,
0.8 ms at 3 TB/s, so the split pays for its parallel loops in bytes. Both diagonal kernels
run at their bytes' time (113-121 SASS instructions per key step forward for the [2, 128]
float32 tiles of one warp, 63-75 backward: `kernel_registers.py --ops kda --warps 1 --sass
DIR`; 49-56 registers, 32 programs per SM): Nsight Compute finds kda's forward one at 79% of
the DRAM bandwidth with issue slots half idle, the row groups' re-reads of their sub-chunk's
Y and g rows served by L2 (63% hits) because a sub-chunk's row groups run at the same time
as programs of their own; looping over them in one program cut the hits to 26% and took 0.34
to 0.61 ms (benchmarks/NOTES.md, twenty-fifth session). Measured on the H100 for kda's two
products (benchmarks/NOTES.md, twelfth session): forward 0.25 + 0.15 ms each, backward 0.36
+ 0.69, where one program per chunk with 16-row loops took 0.72-0.77 forward and 1.17
backward (255 registers, 2 warps per scheduler: latency-bound at low occupancy, tenth
session). With both of kda's products in one pass as query sides (fifteenth session):
forward 0.34 + 0.27, backward 0.47 + 1.17, the last against ~0.65 ms of bytes (480 KB per
chunk). A program per 32-row block and 64 key columns (165 registers at 4 warps, 3 programs
per SM, where the program per chunk held 255) took the latter to 0.79 (twenty-second
session).

Scalar decays (one per token: gated_delta_rule, gated_delta_product) need no sub-chunks: the
chunk's pairwise decay sums S [C, C] are one scan over t of the masked per-token decays
(sums of the tokens each covers), D = (X Y^T) e^S is one dot, and the backward is three
dots with the log decays' gradient formed in the kernel (a 0/1 dot over s, a masked sum
over t; one program per 64 key columns, XLA adds their shares). Where X holds only the
rows of every n-th token (the multi-factor ops' queries, chunked.decayed_products), the
scalar kernels take those rows as they are, the decay factors' rows picked out of the
chunk's scan by a one-hot 0/1 dot; the per-channel kernels take a query per token
(zeros between) and keep every n-th row. On the H100 (kda's L shape,
4 warps): 0.15 ms forward against XLA's 0.27, 0.59 forward+backward against 0.68; Gated
DeltaNet 2.43 -> 2.21 ms forward, 7.60 -> 6.95 forward+backward in one device call
(benchmarks/NOTES.md). Without decay (delta_rule) the scalar kernels run with factors of 1
(forward and backward, no log decays' gradient), and its probes' products are
their strict ones (chunked.intra_products: no move of P up a row): on the H100 at B=4,
T=4096, H=16, K=V=128 delta_rule went from 1.63 to 1.35 ms forward and 5.46 to 5.04
forward+backward, where XLA had formed the products (twenty-seventh session).

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
from dplr_jax.ops.pallas.state_pass import (LOG2E, Launch, _dot, _exp, _mask_dot, _pad_to, _pow2,
                                           _rem)

SUB = chunked.SUB


class _Cfg(NamedTuple):
    """Static configuration of one kernel pair (hashable: a custom_vjp nondiff argument)."""

    interpret: object
    precision: object  # of the products
    exact: object  # float32-accurate: of the in-kernel prefix sums of the log decays
    bounded: bool  # log decays >= chunked.MIN_BOUND: the diagonal blocks as dots
    fwd: Launch
    bwd: Launch


_GATED_IDS = []  # the program ids of the gated kernel being traced (_call)


def _program_id(axis):
    """pl.program_id(axis), read before the gate's branch in a gated kernel (_call): in
    interpret mode a program id inside a branch does not lower."""
    return _GATED_IDS[-1][axis] if _GATED_IDS else pl.program_id(axis)


def _acc(x):
    """The kernels' dtype for an input (a ref or an array) of x's: float32 (float64 under x64
    in interpret mode). Inputs may be 16-bit (a forward-only call reads q and the keys as
    given, api.run_chunked); the kernels cast them as they load them."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _rank(x):
    """Rows of a token in x: [C, rank, K], or [C, K] for one row read in place (a rank axis
    added under the engine's vmaps would move it: chunked._summaries)."""
    return 1 if x.ndim == 2 else x.shape[1]


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _tokens(shape, every):
    """The token of each row of a [rows, ...] tile whose rows are the last of every `every`
    tokens (1: every token)."""
    return _iota(shape, 0) * every + every - 1


def _decayed_pairs():
    """[s, t] mask of the pairs whose decay spans at least one token in a diagonal block,
    s < t. The backward leaves the pairs without decay (s = t) to the wrapper."""
    return _iota((SUB, SUB), 0) < _iota((SUB, SUB), 1)


def _bounded_block(g, incl):
    """Under the bound (g [16, K] >= MIN_BOUND, incl its inclusive prefix sums): the diagonal
    block's query and key factors e^{P - m} and e^{m - P} (chunked.bounded_factors: P = incl,
    m its middle row), and the sub-chunk's query-side prefix sums, exclusive suffix sums and
    total, which _diagonal_backward_kernel's loops yield as sums of the tokens each covers,
    here as differences of sums of <= 16 tokens."""
    total = jnp.sum(g, axis=0, keepdims=True)
    mid = jnp.sum(jnp.where(_iota(g.shape, 0) == SUB // 2 - 1, incl, 0.0), axis=0,
                  keepdims=True)
    return _exp(incl - mid), _exp(mid - incl), incl, total - incl, total


def _row_group(rows):
    """This program's rows of a diagonal kernel: (t0, base, end), its first row and its
    sub-chunk's first and last rows."""
    t0 = _program_id(0) * rows
    base = t0 - _rem(t0, SUB)
    return t0, base, base + SUB - 1


def _log2_decay(g_ref, u, dtype):
    """Row u of the log decays, in base 2 ([1, K]: the diagonal kernels' exponents are)."""
    return g_ref[pl.ds(u, 1), :].astype(dtype) * LOG2E


def _advance(d, on, start, g):
    """Running exponents of a row group at its next pair: plus g where the rows' pairs are
    under way, 0 where they start, -inf before (exp2 gives 0 there)."""
    return jnp.where(on, d + g, jnp.where(start, 0.0, -jnp.inf))


def _diagonal_kernel(*refs, rows, a):
    """A chunk's diagonal 16 x 16 blocks of D, and the factors of its off-diagonal ones, for
    `a` query sides X against the same keys Y: `rows` query rows t0 .. t0 + rows - 1 of one
    sub-chunk per program. refs: the sides' x_refs, y_ref, g_ref, then per side d_ref and
    xq_ref, key_ref and tot_ref. d_ref [C, 16] gets, in row t, D[t, s] for the keys s of t's
    sub-chunk up to t (the entries past them are left unwritten); xq_ref row t the query
    side X_t e^{prefix_t}, prefix_t the sum of g over the sub-chunk's tokens up to t; key_ref
    row s the key side Y_s e^{suffix_s}, suffix_s the sum over the tokens after s in its
    sub-chunk; tot_ref [C / 16, K] row i e^{total_i}, the prefix of sub-chunk i's last row
    (rows 1 .. n - 1; _forward_kernel's factors between sub-chunks).

    The keys run from the group's last down to the sub-chunk's first, each row carrying its
    exponent sum_{s < u <= t} g_u (one add of g_{s+1} per key; -inf until the row's own last
    key, where it starts at 0), so each step is one [rows, K] exp2, shared by the sides, and
    one reduction over K per side. After the last key (the sub-chunk's first) a row's
    exponent plus that token's g is its prefix; the group that holds the sub-chunk's last
    row takes the suffixes from that row's exponents on the way. Every exponent is a sum of
    the tokens it covers, in base 2 (state_pass._exp)."""
    x_refs, (y_ref, g_ref), d_refs = refs[:a], refs[a:a + 2], refs[a + 2:2 * a + 2]
    xq_refs, (key_ref, tot_ref) = refs[2 * a + 2:3 * a + 2], refs[3 * a + 2:]
    C = y_ref.shape[0]
    t0, base, end = _row_group(rows)
    f = _acc(y_ref)
    X = [x_ref[pl.ds(t0, rows), :].astype(f) for x_ref in x_refs]
    r = _iota((rows, 1), 0)
    last = t0 + r  # each row's last key: its own token
    top = t0 + rows - 1  # the group's last key
    tail = (t0 + rows == base + SUB) & (end < C - 1)  # keys wanted: not the chunk's last

    def step(k, d):
        s = top - k
        d = _advance(d, last > s, last == s, _log2_decay(g_ref, jnp.minimum(s + 1, C - 1), f))
        y = y_ref[pl.ds(s, 1), :].astype(f)
        ye = y * jnp.exp2(d)
        for Xi, d_ref in zip(X, d_refs):
            row = jnp.sum(Xi * ye, axis=1, keepdims=True)
            d_ref[pl.ds(t0, rows), pl.ds(s - base, 1)] = row.astype(d_ref.dtype)

        @pl.when(tail)
        def _key():  # the sub-chunk's last row's exponent: the suffix
            d_end = jnp.sum(jnp.where(r == rows - 1, d, 0.0), axis=0, keepdims=True)
            key_ref[pl.ds(s, 1), :] = (y * jnp.exp2(d_end)).astype(key_ref.dtype)

        return d

    d = jax.lax.fori_loop(0, top - base + 1, step, jnp.full(X[0].shape, -jnp.inf, f))

    @pl.when(base > 0)  # the first sub-chunk's rows have no earlier keys
    def _query():  # the prefix: the exponent after the sub-chunk's first key, plus its g
        e = jnp.exp2(d + _log2_decay(g_ref, base, f))
        for Xi, xq_ref in zip(X, xq_refs):
            xq_ref[pl.ds(t0, rows), :] = (Xi * e).astype(xq_ref.dtype)

        @pl.when(t0 + rows == base + SUB)
        def _total():
            e_end = jnp.sum(jnp.where(r == rows - 1, e, 0.0), axis=0, keepdims=True)
            tot_ref[pl.ds(base // SUB, 1), :] = e_end.astype(tot_ref.dtype)


def _forward_kernel(tot_ref, *refs, precision, strict):
    """The whole [C, C] D of one chunk per query side from _diagonal_kernel's outputs (tot_ref,
    then refs: the sides' diagonal blocks, their query sides, the key side, then the sides'
    D): the diagonal blocks, and the blocks (i, j < i) as one [16, K] x [K, 16] dot of the
    query side X_i e^{prefix_i}, times e^{(whole sub-chunks between j and i)}, against the
    key side Y_j e^{suffix_j}, loaded once for all sides; every factor <= 1, and the
    exponents add up exactly to the pair's decay sum. strict: per side, whether its diagonal
    (s = t) is dropped as well."""
    a = len(strict)
    diag_refs, xq_refs, key_ref, d_refs = refs[:a], refs[a:2 * a], refs[2 * a], refs[2 * a + 1:]
    C = d_refs[0].shape[0]
    n = C // SUB
    cross = n > HALF // SUB  # the pairs across 32-row blocks: _cross_forward's
    t, u = _iota((SUB, SUB), 0), _iota((SUB, SUB), 1)
    for i in range(n):
        rows = pl.ds(i * SUB, SUB)
        for diag_ref, d_ref, s in zip(diag_refs, d_refs, strict):
            d_ref[rows, rows] = jnp.where(u <= t - int(s), diag_ref[rows, :],
                                          0.0).astype(d_ref.dtype)
            for j in range(i + 1, n):
                d_ref[rows, pl.ds(j * SUB, SUB)] = jnp.zeros((SUB, SUB), d_ref.dtype)
        if i:
            Xq = [xq_ref[rows, :] for xq_ref in xq_refs]
            # between = totals of the sub-chunks j+1 .. i-1
            for j in reversed(range(i - i % (HALF // SUB) if cross else 0, i)):
                key = key_ref[pl.ds(j * SUB, SUB), :]
                for Xs, d_ref in zip(Xq, d_refs):
                    d_ref[rows, pl.ds(j * SUB, SUB)] = _dot(Xs, key, precision,
                                                            trans_b=True).astype(d_ref.dtype)
                if j:  # e^{total_j}: g is not read (loading and summing it cost kda's two
                    # forward kernels 0.05 ms on the H100; NOTES, nineteenth session)
                    e = tot_ref[pl.ds(j, 1), :]
                    Xq = [Xs * e for Xs in Xq]
    if cross:
        _cross_forward(tot_ref, xq_refs, key_ref, d_refs, precision)


def _cross_forward(tot_ref, xq_refs, key_ref, d_refs, precision):
    """_forward_kernel's blocks (i, j) of sub-chunks in different 32-row blocks B > A: one
    [32, K] x [K, 32] dot per pair of blocks of the query side from B's first token (X_i
    e^{prefix_i}, times the total of B's first sub-chunk on its second's rows, and the totals
    of the blocks between) against the key side to A's last token (Y_j e^{suffix_j}, times
    the total of A's second sub-chunk on its first's rows): the 16-row loop's factors, every
    one <= 1, each dot covering four of its pairs."""
    C, Kp = key_ref.shape
    first = _iota((HALF, 1), 0) < SUB  # a block's rows in its first sub-chunk
    for b in range(1, C // HALF):
        rb = pl.ds(b * HALF, HALF)
        for a_ in reversed(range(b)):
            ra = pl.ds(a_ * HALF, HALF)
            D = [0.0] * len(d_refs)
            for c in range(0, Kp, min(Kp, BLOCK)):  # key columns in blocks of 64
                cols = pl.ds(c, min(Kp, BLOCK))
                total = lambda i, cols=cols: tot_ref[pl.ds(i, 1), cols]
                e = jnp.where(first, 1.0, total(2 * b))
                for h in range(a_ + 1, b):
                    e = e * total(2 * h) * total(2 * h + 1)
                key = key_ref[ra, cols] * jnp.where(first, total(2 * a_ + 1), 1.0)
                D = [Ds + _dot(xq_ref[rb, cols] * e, key, precision, trans_b=True)
                     for Ds, xq_ref in zip(D, xq_refs)]
            for Ds, d_ref in zip(D, d_refs):
                d_ref[rb, ra] = Ds.astype(d_ref.dtype)


def _bounded_forward_kernel(*refs, precision, strict):
    """Under the bound (`bounded`): the rows of one sub-chunk i of every side's [C, C] D per
    program, from X, Y and g, with no diagonal kernel (refs: the sides' x_refs, y_ref, g_ref,
    the sides' D). The diagonal block is one [16, K] x [K, 16] dot of _bounded_block's
    factors for the pairs s < t, and the plain products X_t Y_t for s = t, as
    chunked._diagonal_blocks has them; the blocks (i, j < i) one dot each of the query side
    X_i e^{prefix_i} against the key side Y_j e^{suffix_j}, formed here (differences of sums
    of <= 16 tokens, the bound's contract), the query side taking e^{total_j} on its way past
    sub-chunk j."""
    a = len(strict)
    x_refs, (y_ref, g_ref), d_refs = refs[:a], refs[a:a + 2], refs[a + 2:]
    C = y_ref.shape[0]
    i = _program_id(0)
    rows = pl.ds(i * SUB, SUB)
    t, u = _iota((SUB, SUB), 0), _iota((SUB, SUB), 1)
    f = _acc(y_ref)
    X = [x_ref[rows, :].astype(f) for x_ref in x_refs]
    Y = y_ref[rows, :].astype(f)
    g = g_ref[rows, :].astype(f)
    # The prefix sums by a scan: as a 0/1 dot (the backward's) this kernel, in an earlier
    # form of one program per chunk, spilled 2.4-6.0 KB at 2 or 4 warps, with the scan none
    # (kernel_registers.py --bounded).
    eq, ek, prefix, _, _ = _bounded_block(g, jnp.cumsum(g, axis=0))
    Yk = Y * ek
    for Xs, d_ref, s in zip(X, d_refs, strict):
        D = jnp.where(u < t, _dot(Xs * eq, Yk, precision, trans_b=True), 0.0)
        if not s:
            D = D + jnp.where(u == t, jnp.sum(Xs * Y, axis=1, keepdims=True), 0.0)
        d_ref[rows, rows] = D.astype(d_ref.dtype)

    def later(j, carry):  # the blocks (i, j > i): zero
        for d_ref in d_refs:
            d_ref[rows, pl.ds(j * SUB, SUB)] = jnp.zeros((SUB, SUB), d_ref.dtype)
        return carry

    def earlier(k, Xq):  # the block (i, j = i - 1 - k)
        j = i - 1 - k
        keys = pl.ds(j * SUB, SUB)
        gj = g_ref[keys, :].astype(f)
        total = jnp.sum(gj, axis=0, keepdims=True)
        key = y_ref[keys, :].astype(f) * _exp(total - jnp.cumsum(gj, axis=0))
        for Xs, d_ref in zip(Xq, d_refs):
            d_ref[rows, keys] = _dot(Xs, key, precision, trans_b=True).astype(d_ref.dtype)
        e = _exp(total)
        return [Xs * e for Xs in Xq]

    jax.lax.fori_loop(i + 1, C // SUB, later, 0)
    e = _exp(prefix)
    jax.lax.fori_loop(0, i, earlier, [Xs * e for Xs in X])


def _diagonal_backward_kernel(*refs, rows, a):
    """The diagonal blocks' part of the backward for `a` query sides, `rows` rows t0 .. t0 +
    rows - 1 of one sub-chunk per program, as _diagonal_kernel runs the forward. refs: the
    sides' x_refs, y_ref, g_ref, the sides' dD^T (ddt_refs), then the sides' dx_refs, dy_ref,
    eq_ref, ek_ref. dx_ref gets the rows' dX = sum_s dD[t, s] e^{decay(s, t)} Y_s over the
    keys s of their sub-chunk, and dy_ref their dY = sum_t dD[t, s] e^{decay(s, t)} X_t over
    its queries and the sides, both without the pairs whose decay is empty (s = t: the
    wrapper's); eq_ref and ek_ref the factors e^{prefix} and e^{suffix} of the off-diagonal
    blocks (_diagonal_kernel's exponents), for _backward_kernel. The queries' loop runs the
    keys down from the group's last, as the forward does; the keys' loop runs the queries up
    to the sub-chunk's last, each key row carrying sum_{s < u <= t} g_u, which after the
    last query is the row's suffix. One exp2 per step serves every side."""
    x_refs, (y_ref, g_ref), ddt_refs = refs[:a], refs[a:a + 2], refs[a + 2:2 * a + 2]
    dx_refs, (dy_ref, eq_ref, ek_ref) = refs[2 * a + 2:3 * a + 2], refs[3 * a + 2:]
    C = y_ref.shape[0]
    t0, base, end = _row_group(rows)
    f = y_ref.dtype
    here = pl.ds(t0, rows)
    shape = (rows, y_ref.shape[1])
    r = t0 + _iota((rows, 1), 0)  # the group's rows: as queries, each its own last key
    top = t0 + rows - 1
    log2 = functools.partial(_log2_decay, g_ref, dtype=f)

    def queries(k, carry):  # key s = top - k, for the group's rows as queries
        d, accs = carry
        s = top - k
        d = _advance(d, r > s, r == s, log2(jnp.minimum(s + 1, C - 1)))
        ye = jnp.exp2(d) * y_ref[pl.ds(s, 1), :]
        on = r > s
        return d, tuple(acc + jnp.where(on, ddt_ref[s, here][:, None].astype(f), 0.0) * ye
                        for acc, ddt_ref in zip(accs, ddt_refs))  # dD[rows, s]

    def keys(k, carry):  # query t = t0 + k, for the rows as keys
        d, acc = carry
        t = t0 + k
        d = _advance(d, r < t, r == t, log2(t))
        wx = sum(ddt_ref[here, pl.ds(t, 1)].astype(f) * x_ref[pl.ds(t, 1), :]
                 for ddt_ref, x_ref in zip(ddt_refs, x_refs))
        return d, acc + jnp.where(r < t, jnp.exp2(d) * wx, 0.0)

    start = jnp.full(shape, -jnp.inf, f)
    d, dX = jax.lax.fori_loop(0, top - base + 1, queries,
                              (start, tuple(jnp.zeros(shape, f) for _ in range(a))))
    for dx_ref, dXi in zip(dx_refs, dX):
        dx_ref[here, :] = dXi.astype(dx_ref.dtype)

    @pl.when(base > 0)  # the first sub-chunk's rows have no earlier keys
    def _query_factors():  # the prefix: the exponent after the first key, plus its g
        eq_ref[here, :] = jnp.exp2(d + log2(base)).astype(eq_ref.dtype)

    d, dY = jax.lax.fori_loop(0, end - t0 + 1, keys, (start, jnp.zeros(shape, f)))
    dy_ref[here, :] = dY.astype(dy_ref.dtype)

    @pl.when(end < C - 1)  # the last sub-chunk's keys have no later queries
    def _key_factors():  # the suffix: the exponent after the last query
        ek_ref[here, :] = jnp.exp2(d).astype(ek_ref.dtype)


def _backward_kernel(*refs, a, precision, exact, bounded, sync, kb):
    """dX (per query side), dY and dg of one chunk, one program per block of kb key columns
    (every step is per key channel: the dots contract over tokens) and 32-row block of the
    chunk (_block_backward): the diagonal blocks' dX, dY and the off-diagonal factors from
    _diagonal_backward_kernel (bounded: formed here from g, _bounded_block and
    _bounded_factors), the blocks (i, j < i) by dots, the key side loaded once for all
    sides, dg after them (see the module docstring; R sums over the sides).
    Without the bound g is not read: a sub-chunk's e^{total} is the e^{prefix} of its last
    row (with g's rows 8 KB apart, chunked.chunked's decays_in_place, reading g for the
    totals took kda's kernel from 1.17 to 1.44 ms on the H100; benchmarks/NOTES.md,
    nineteenth session)."""
    x_refs, (y_ref, g_ref), ddt_refs = refs[:a], refs[a:a + 2], refs[a + 2:2 * a + 2]
    rest = refs[2 * a + 2:]
    cols = pl.ds(_program_id(0) * kb, kb)
    if bounded:
        diagonal = dict(g_ref=g_ref, exact=exact)
        factors = _bounded_factors(g_ref, cols, exact, y_ref.dtype)
    else:
        dxd_refs, (dyd_ref, eq_ref, ek_ref), rest = rest[:a], rest[a:a + 3], rest[a + 3:]
        diagonal = dict(dxd_refs=dxd_refs, dyd_ref=dyd_ref, eq_ref=eq_ref, ek_ref=ek_ref)
        factors = (lambda r: eq_ref[r, cols], lambda r: ek_ref[r, cols],
                   lambda i: eq_ref[pl.ds(i * SUB + SUB - 1, 1), cols])
    dx_refs, (dy_ref, dg_ref, rq_ref) = rest[:a], rest[a:]
    for b in range(_row_blocks(y_ref.shape[0])):
        pl.when(_program_id(1) == b)(functools.partial(
            _block_backward, b, x_refs, y_ref, ddt_refs, factors, dx_refs, dy_ref, dg_ref,
            rq_ref, cols, precision, sync, diagonal))


def _row_blocks(C):
    """The 32-row blocks of a chunk of C rows (one if C <= 32)."""
    return max(C // HALF, 1)


def _bounded_factors(g_ref, cols, exact, dtype):
    """Under the bound, _block_backward's factors from g (columns cols): of the rows r (a
    32-row block) e^{prefix} and e^{suffix} within each row's sub-chunk (one 0/1 dot at
    float32 accuracy each, block-diagonal by sub-chunk), and of sub-chunk i e^{total}: sums
    of <= 16 tokens, as the exact path's diagonal kernel forms them, so that every factor is
    <= 1 and none is a difference of sums."""
    t, u = _iota((HALF, HALF), 0), _iota((HALF, HALF), 1)
    same = t // SUB == u // SUB
    g = lambda r: g_ref[r, cols].astype(dtype)
    prefix = lambda r: _exp(_mask_dot(same & (u <= t), g(r), exact))
    suffix = lambda r: _exp(_mask_dot(same & (u > t), g(r), exact))
    total = lambda i: _exp(jnp.sum(g(pl.ds(i * SUB, SUB)), axis=0, keepdims=True))
    return prefix, suffix, total


def _block_backward(b, x_refs, y_ref, ddt_refs, factors, dx_refs, dy_ref, dg_ref, rq_ref, cols,
                    precision, sync, diagonal):
    """_backward_kernel for 32-row block b of the chunk: its rows' dX from the keys of the
    blocks before it and its keys' dY from the queries of the blocks after it, as one [32, 32]
    block of dD^T per pair of blocks and side (written to dx and dy, read back after a
    barrier by the rows' loop as their starting values), then the pairs within the block by
    the 16-row loop (`diagonal`: its diagonal blocks' sources, _rows_backward), and dg of its rows
    with the sums of R - Q over the block's rows to its own end; rq_ref[b] gets the block's
    whole sum, which the wrapper adds to the rows of the blocks before it. factors: functions
    of a block's rows giving e^{prefix} and e^{suffix} within each row's sub-chunk, and of a
    sub-chunk i >= 1 giving e^{total_i}. The block-pair factors are those of the 16-row loop
    times sub-chunk totals: the query factor e_B = e^{sum from B's first token to the row}
    (times the totals of the blocks between), the key one e'_A = e^{sum after the key to A's
    last token}; every one <= 1 and the exponents adding up to each pair's decay sum."""
    prefix, suffix, total = factors
    C = y_ref.shape[0]
    nb = _row_blocks(C)
    size = min(C, HALF)
    per = size // SUB  # sub-chunks per block
    first = _iota((size, 1), 0) < SUB  # a block's rows in its first sub-chunk
    rb = pl.ds(b * size, size)

    def block_total(h):
        return total(per * h) * total(per * h + 1)

    if b > 0:  # queries: the keys of the blocks before
        eq = prefix(rb) * jnp.where(first, 1.0, total(per * b))
        dX = [0.0] * len(x_refs)
        for a_ in reversed(range(b)):
            ra = pl.ds(a_ * size, size)
            key = y_ref[ra, cols] * suffix(ra) * jnp.where(first, total(per * a_ + 1), 1.0)
            for side, ddt_ref in enumerate(ddt_refs):
                dX[side] = dX[side] + _dot(ddt_ref[ra, rb], key, precision, trans_a=True) * eq
            if a_:
                eq = eq * block_total(a_)
        for dx_ref, dXs in zip(dx_refs, dX):
            dx_ref[rb, cols] = dXs.astype(dx_ref.dtype)
    if b < nb - 1:  # keys: the queries of the blocks after
        between = 1.0
        dkey = 0.0
        for c in range(b + 1, nb):
            rc = pl.ds(c * size, size)
            eq = prefix(rc) * jnp.where(first, 1.0, total(per * c)) * between
            for x_ref, ddt_ref in zip(x_refs, ddt_refs):
                dkey = dkey + _dot(ddt_ref[rb, rc], x_ref[rc, cols] * eq, precision)
            between = between * block_total(c)
        ek = suffix(rb) * jnp.where(first, total(per * b + 1), 1.0)
        dy_ref[rb, cols] = (dkey * ek).astype(dy_ref.dtype)
    if sync and nb > 1:  # the block sums come back to other threads than wrote them
        pl_triton.debug_barrier()
    later = _rows_backward(x_refs, y_ref, ddt_refs, dx_refs, dy_ref, dg_ref, cols, b * per,
                           per, precision, sync, cross_x=b > 0, cross_y=b < nb - 1, **diagonal)
    rq_ref[pl.ds(b, 1), cols] = later.astype(rq_ref.dtype)


def _rows_backward(x_refs, y_ref, ddt_refs, dx_refs, dy_ref, dg_ref, cols, lo, n, precision,
                   sync, *, g_ref=None, exact=None, dxd_refs=None, dyd_ref=None, eq_ref=None,
                   ek_ref=None, cross_x=False, cross_y=False):
    """The 16-row loop over sub-chunks lo .. lo + n - 1 (bounded: their diagonal blocks formed
    here from g_ref; else the diagonal kernel's dxd, dyd and factors eq, ek; and, where
    cross_x / cross_y, the sums the rows' dX / dY already hold in dx / dy): the pairs (i, j <
    i) among them, dX, dY and dg of their rows. Returns the sum of R - Q over the rows, by
    key column."""
    bounded = g_ref is not None
    decays, totals, dkeys = {}, {}, {}  # per key sub-chunk j: e^{suffix_j}, e^{total_j}, dY_j
    for i in range(lo, lo + n):
        rows = pl.ds(i * SUB, SUB)
        Xq = [x_ref[rows, cols] for x_ref in x_refs]
        if bounded:
            g = g_ref[rows, cols].astype(Xq[0].dtype)
            # The prefix sums by a 0/1 dot at float32 precision: by a scan (the forward's)
            # this kernel spilled more (kda 84 -> 152 B, gla 700 -> 1088).
            eq, ek, pre, suffix, total = _bounded_block(
                g, _mask_dot(_iota((SUB, SUB), 1) <= _iota((SUB, SUB), 0), g, exact))
            key = y_ref[rows, cols] * ek
            dX, dY = [], 0.0
            for Xs, ddt_ref in zip(Xq, ddt_refs):
                ddt = jnp.where(_decayed_pairs(), ddt_ref[rows, rows], 0.0)
                dX.append(_dot(ddt, key, precision, trans_a=True) * eq)
                dY = dY + _dot(ddt, Xs * eq, precision)
            dY = dY * ek
            eq, decay, total = _exp(pre), _exp(suffix), _exp(total)
        else:
            dX, dY = [dxd_ref[rows, cols] for dxd_ref in dxd_refs], dyd_ref[rows, cols]
            eq = eq_ref[rows, cols] if i else None
            decay = None  # ek_ref's rows, loaded where used
            # e^{total}: the e^{prefix} of the sub-chunk's last row (the diagonal kernel's sum
            # of the tokens it covers); the first sub-chunk's, which that kernel does not
            # write, is never used
            total = eq_ref[pl.ds(i * SUB + SUB - 1, 1), cols] if i else None
        if cross_x:
            dX = [dXs + dx_ref[rows, cols] for dXs, dx_ref in zip(dX, dx_refs)]
        if cross_y:
            dY = dY + dy_ref[rows, cols]
        for j in reversed(range(lo, i)):
            # (ek_ref's rows reloaded: kept, they spilled)
            ek = decays[j] if bounded else ek_ref[pl.ds(j * SUB, SUB), cols]
            key = y_ref[pl.ds(j * SUB, SUB), cols] * ek
            dkey = 0.0
            for side, (Xs, ddt_ref) in enumerate(zip(Xq, ddt_refs)):
                ddt_ji = ddt_ref[pl.ds(j * SUB, SUB), rows]  # (dD_ij)^T: [s in j, t in i]
                dX[side] = dX[side] + _dot(ddt_ji, key, precision, trans_a=True) * eq
                dkey = dkey + _dot(ddt_ji, Xs * eq, precision)
            dkeys[j] = dkeys[j] + dkey * ek
            if j > lo:
                eq = eq * totals[j]
        dg_ref[rows, cols] = sum(Xs * dXs for Xs, dXs in zip(Xq, dX)).astype(dg_ref.dtype)  # R
        if sync and cross_x:  # the rows' block sums are read before they are overwritten,
            pl_triton.debug_barrier()  # by every thread
        for dx_ref, dXs in zip(dx_refs, dX):
            dx_ref[rows, cols] = dXs.astype(dx_ref.dtype)
        decays[i], totals[i], dkeys[i] = decay, total, dY
    # The log decays: dg_u = sum_{t >= u} R_t - sum_{s >= u} Q_s, by sub-chunks from the last:
    # the sum over the sub-chunk's rows t >= u, as its total less the rows before u, plus the
    # sub-chunks after it.
    if sync:  # the R rows come back to other threads than wrote them
        pl_triton.debug_barrier()
    later = 0.0
    for j in reversed(range(lo, lo + n)):
        rows = pl.ds(j * SUB, SUB)
        dy_ref[rows, cols] = dkeys[j].astype(dy_ref.dtype)
        R = dg_ref[rows, cols]
        rq = R - y_ref[rows, cols] * dkeys[j]
        total = jnp.sum(rq, axis=0, keepdims=True)
        dg = (later + total) - (jnp.cumsum(rq, axis=0) - rq)
        dg_ref[rows, cols] = dg.astype(dg_ref.dtype)
        later = later + total
    return later


def _scalar_factors(g_row):
    """[t, s] e^{S[t, s]} for scalar log decays g_row [1, C], S the sum of g_u over
    s < u <= t by a scan over t (sums of the tokens each covers) on the pairs s < t; 1
    elsewhere, for _scalar_decays to mask."""
    C = g_row.shape[1]
    t, s = _iota((C, C), 0), _iota((C, C), 1)
    g_t = jnp.sum(jnp.where(s == t, g_row, 0.0), axis=1, keepdims=True)  # g[t]
    return _exp(jnp.cumsum(jnp.where(t > s, g_t, 0.0), axis=0))


def _scalar_decays(factors, strict, every, exact):
    """One query side's [t, s] decay factors from _scalar_factors: 0 off its pairs (s <= t;
    strict s < t). every > 1: only the rows of the last of every `every` tokens,
    [C / every, C], picked by a one-hot 0/1 dot at float32 accuracy (`exact`; Triton has no
    strided slice of a value)."""
    C = factors.shape[0]
    t, s = _iota((C, C), 0), _iota((C, C), 1)
    W = jnp.where(t >= s + (1 if strict else 0), factors, 0.0)
    if every == 1:
        return W
    shape = (C // every, C)
    return _mask_dot(_iota(shape, 1) == _tokens(shape, every), W, exact)


def _scalar_forward_kernel(*refs, strict, precision, exact, decay, scaled):
    """Scalar decays: per query side (refs: the sides' x_refs, y_ref, g_ref, s_ref, the sides'
    d_refs) the whole chunk as one dot X Y^T times the pairs' decay factors, formed once for
    all sides (a side may hold only the rows of every n-th token: chunked.decayed_products).
    Without decay (no g_ref) the factors are 1: the products masked. With a row scale of
    the keys (s_ref [1, C]: beta, the delta family's keys beta k formed here) the factors
    carry it."""
    a = len(strict)
    x_refs, y_ref = refs[:a], refs[a]
    rest = list(refs[a + 1:])
    g_ref = rest.pop(0) if decay else None
    s_ref = rest.pop(0) if scaled else None
    d_refs = rest
    C = y_ref.shape[0]
    f = _acc(y_ref)
    factors = (_scalar_factors(g_ref[...].astype(f)) if decay
               else jnp.ones((C, C), f))
    if scaled:
        factors = factors * s_ref[...].astype(f)
    Y = y_ref[...].astype(f)
    for x_ref, d_ref, s in zip(x_refs, d_refs, strict):
        W = _scalar_decays(factors, s, C // x_ref.shape[0], exact)
        d_ref[...] = (_dot(x_ref[...].astype(f), Y, precision, trans_b=True)
                      * W).astype(d_ref.dtype)


def _scalar_backward_kernel(*refs, strict, precision, exact, decay):
    """One query side, one program per block of BLOCK key columns: its columns of
    dX = (dD e^S) Y and dY = (dD e^S)^T X, and its share [1, C] of the log decays' gradient,
    dg_u = the sum of dD D over the pairs whose decay spans u (s < u <= t; D = X Y^T e^S
    is a sum over the key columns), as a 0/1 dot over s and a masked sum over t; XLA adds
    the shares. The pairs without decay stay out of that sum (they span no
    token; their float32 rounding would enter it as a difference of large terms). Without
    decay (no g_ref, no dg_ref) the factors are 1."""
    if decay:
        x_ref, y_ref, g_ref, dd_ref, dx_ref, dy_ref, dg_ref = refs
    else:
        x_ref, y_ref, dd_ref, dx_ref, dy_ref = refs
    f = _acc(x_ref)
    (rows, K), C = x_ref.shape, y_ref.shape[0]
    every = C // rows
    kb = min(BLOCK, K)
    j = _program_id(0)
    cols = pl.ds(j * kb, kb)
    X, Y = x_ref[:, cols], y_ref[:, cols]
    factors = _scalar_factors(g_ref[...].astype(f)) if decay else jnp.ones((C, C), f)
    A = dd_ref[...].astype(f) * _scalar_decays(factors, strict, every, exact)
    dx_ref[:, cols] = _dot(A, Y, precision).astype(dx_ref.dtype)
    dy_ref[:, cols] = _dot(A, X, precision, trans_a=True).astype(dy_ref.dtype)
    if not decay:
        return
    t, u = _tokens((rows, C), every), _iota((rows, C), 1)
    dS = jnp.where(t > u, A * _dot(X, Y, precision, trans_b=True), 0.0)  # [t, s]
    later = (_iota((C, C), 0) < _iota((C, C), 1)).astype(f)  # [s, u]: s < u
    before = _dot(dS, later, precision)  # [t, u]: the sum over s < u
    dg_ref[pl.ds(j, 1), :] = jnp.sum(jnp.where(t >= u, before, 0.0), axis=0,
                                     keepdims=True).astype(dg_ref.dtype)


BLOCK = 64  # key columns per program of the backward kernels
HALF = 2 * SUB  # rows of the backward's blocks (_block_backward)
# Rows per program of the diagonal kernels: on the GPU 2 (H100, benchmarks/NOTES.md), in the
# CPU interpreter a whole sub-chunk (fewer, larger steps).
DIAGONAL_ROWS, DIAGONAL_WARPS, INTERPRET_ROWS = 2, 1, SUB


def _key_columns(bounded, sides):
    """Key columns per program of _backward_kernel (each takes a 32-row block of a chunk,
    _block_backward): BLOCK, or half of it on the bounded path with several query sides.
    On the H100 (B=4, T=4096, H=16, C=64; benchmarks/NOTES.md): a program per chunk -> per
    32-row block, exact, kda's kernel 1.033 -> 0.785 ms at 64 columns (0.847 at 128, 0.875
    at 32; 0.928 at 8 warps, 0.793 at 2), gla's 0.652 -> 0.516 (twenty-second and
    twenty-third sessions); bounded, gla's 0.775 -> 0.657 at 64 (0.661 at 32), kda's 1.082
    -> 1.019 at 32 (1.139 at 64), dplr's two 1.08 -> 1.01, hdla's 2.101 -> 1.992."""
    return BLOCK // 2 if bounded and sides > 1 else BLOCK


def _call(kernel, args, outs, interpret, launch, name, grid=(), gate=None):
    """pallas_call of kernel on args. gate: None, or (flag, when, over): the kernel runs only
    where flag (int32 [1] per chunk) equals `when`, its outputs taking the buffers of the
    arrays `over` (one per output, input_output_aliases), which stay as they are where it
    does not run: the kernels chosen per chunk (_products)."""
    params = None if interpret else pl_triton.CompilerParams(
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    aliases = {}
    if gate is not None:
        flag, when, over = gate
        n = len(args)
        body = kernel

        def kernel(flag_ref, *refs):
            _GATED_IDS.append([pl.program_id(i) for i in range(len(grid))])
            try:
                pl.when(flag_ref[0] == when)(lambda: body(*refs[:n], *refs[n + len(over):]))
            finally:
                _GATED_IDS.pop()

        aliases = {1 + n + i: i for i in range(len(over))}
        args = (flag, *args, *over)
    return pl.pallas_call(kernel, out_shape=outs, grid=grid, interpret=interpret,
                          compiler_params=params, input_output_aliases=aliases,
                          name=name)(*args)


def _pad_k(*xs):
    """Zero-pads the key axis (last) to a power of two >= 16."""
    return tuple(_pad_to(x, x.ndim - 1, _pow2(x.shape[-1])) for x in xs)


def _kernel_inputs(X, Y, g):
    """K padded (_pad_k); a scalar decay per token as a row [1, C]; no decay: the kernels' g
    operand left out (None). X: a tuple of sides."""
    gp = None if g is None else (g[None, :] if g.ndim == 1 else _pad_k(g)[0])
    return _pad_k(*X), *_pad_k(Y), gp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _products(X, Y, g, ys, flag, strict, cfg):
    """The products of the query sides X (a tuple of [rows, K]; rows C, or for scalar decays
    C / n: every n-th token's) with the keys Y [C, K], one [rows, C] per side; strict: per
    side (chunked.decayed_products). flag: None, or int32 [1], 1 where the chunk's log decays
    allow the bounded kernels (chunked.bounded_chunks): then the exact kernels run where it is
    0 and the bounded ones where it is 1, over the exact ones' outputs (_call's gate), each
    program reading its chunk's flag. ys: None, or [C] (scalar decays or none only): the
    products of the keys Y ys (the scalar kernel scales its factors). Not lax.cond: under
    the engine's vmaps its predicate would be batched (a select of both branches), and a
    per-call one still moves every operand's batch axes to the front (a copy of g, which the
    kernels read in place) with no fusion across its branches: kda's XLA work went from 1.2
    to 1.7 ms on the H100 (benchmarks/NOTES.md, twenty-fourth session)."""
    C = Y.shape[0]
    a = len(X)
    Xp, Yp, gp = _kernel_inputs(X, Y, g)
    if g is None or g.ndim == 1:
        kernel = functools.partial(_scalar_forward_kernel, strict=strict,
                                   precision=cfg.precision, exact=cfg.exact,
                                   decay=g is not None, scaled=ys is not None)
        outs = [jax.ShapeDtypeStruct((x.shape[0], C), _acc(Y)) for x in X]
        rows = tuple(x[None, :] for x in (g, ys) if x is not None)
        return tuple(_call(kernel, Xp + (Yp,) + rows, outs, cfg.interpret, cfg.fwd,
                           "dplr_decayed_scalar_fwd"))
    f = lambda *shape: jax.ShapeDtypeStruct(shape, _acc(Y))
    bounded = lambda gate=None: tuple(_call(
        functools.partial(_bounded_forward_kernel, precision=cfg.precision, strict=strict),
        Xp + (Yp, gp), [f(C, C)] * a, cfg.interpret, cfg.fwd, "dplr_decayed_fwd",
        grid=(C // SUB,), gate=gate))
    if cfg.bounded:
        return bounded()
    exact = None if flag is None else (flag, 0, ())
    rows = INTERPRET_ROWS if cfg.interpret else DIAGONAL_ROWS
    Kp = Yp.shape[1]
    *parts, tot = _call(functools.partial(_diagonal_kernel, rows=rows, a=a),
                        Xp + (Yp, gp), [f(C, SUB)] * a + [f(C, Kp)] * (a + 1) + [f(C // SUB, Kp)],
                        cfg.interpret, Launch(num_warps=DIAGONAL_WARPS, num_stages=1),
                        "dplr_decayed_diag", grid=(C // rows,), gate=exact)
    kernel = functools.partial(_forward_kernel, precision=cfg.precision, strict=strict)
    D = tuple(_call(kernel, (tot,) + tuple(parts), [f(C, C)] * a, cfg.interpret, cfg.fwd,
                    "dplr_decayed_fwd", gate=exact))
    return D if flag is None else bounded((flag, 1, D))


def _products_fwd(X, Y, g, ys, flag, strict, cfg):
    return _products(X, Y, g, ys, flag, strict, cfg), (X, Y, g, ys, flag)


def _products_bwd(strict, cfg, res, dD):
    X, Y, g, ys, flag = res
    if ys is not None:  # through the keys Y ys, formed here
        Ys = Y.astype(_acc(Y)) * ys[:, None]
        dX, dYs, dg, _, _ = _products_bwd(strict, cfg, (X, Ys, g, None, flag), dD)
        return (dX, (dYs * ys[:, None]).astype(Y.dtype), dg,
                jnp.sum(dYs * Y.astype(dYs.dtype), axis=1).astype(ys.dtype), None)
    a = len(X)
    Xp, Yp, gp = _kernel_inputs(X, Y, g)
    f = lambda x: jax.ShapeDtypeStruct(x.shape, Y.dtype)
    K = Y.shape[-1]
    if g is None or g.ndim == 1:
        # One call per side: both of gated_delta_rule's sides in one program hold 255
        # registers and spill; on the H100 that backward took 9.6 ms at chunk 32, two calls
        # 1.05 (at chunk 64 it was faster: gdn 0.09 ms, gdp n=2 0.34 in all; NOTES, fifteenth
        # session). With a dY output per side it spilled 0-68 B and was still no faster
        # (gdn 6.15 -> 6.19 ms, gdp n=2 11.67 -> 11.95; NOTES, sixteenth session).
        n = max(Yp.shape[1] // BLOCK, 1)
        dX, dY, dg = [], 0.0, 0.0
        for x, d, s in zip(Xp, dD, strict):
            kernel = functools.partial(_scalar_backward_kernel, strict=s,
                                       precision=cfg.precision, exact=cfg.exact,
                                       decay=g is not None)
            ins, outs = (x, Yp, d.astype(Y.dtype)), [f(x), f(Yp)]
            if g is not None:
                ins = (x, Yp, gp, d.astype(Y.dtype))
                outs.append(jax.ShapeDtypeStruct((n, gp.shape[1]), g.dtype))
            dx, dy, *dgs = _call(kernel, ins, outs, cfg.interpret, cfg.bwd,
                                 "dplr_decayed_scalar_bwd", grid=(n,))
            dX.append(dx[:, :K])
            dY = dY + dy[:, :K]
            if g is not None:
                dg = dg + dgs[0].sum(axis=0)
        return tuple(dX), dY, None if g is None else dg, None, None
    ddt = tuple(d.T.astype(Y.dtype) for d in dD)
    args = Xp + (Yp, gp) + ddt
    Kp = Yp.shape[1]
    nb = _row_blocks(Y.shape[0])
    # dg's rows hold R first (the kernel reads it back): Y's dtype, cast to g's at the end;
    # then each block's sum of R - Q.
    outs = [f(Yp)] * (a + 2) + [jax.ShapeDtypeStruct((nb, Kp), Y.dtype)]

    def blocks(bounded, args, gate=None):
        kb = min(_key_columns(bounded, a), Kp)
        kernel = functools.partial(_backward_kernel, a=a, precision=cfg.precision,
                                   exact=cfg.exact, bounded=bounded, sync=not cfg.interpret,
                                   kb=kb)
        return _call(kernel, args, outs, cfg.interpret, cfg.bwd, "dplr_decayed_bwd",
                     grid=(Kp // kb, nb), gate=gate)

    if cfg.bounded:
        got = blocks(True, args)
    else:  # the diagonal blocks and the off-diagonal factors first
        exact = None if flag is None else (flag, 0, ())
        rows = INTERPRET_ROWS if cfg.interpret else DIAGONAL_ROWS
        diagonal = _call(functools.partial(_diagonal_backward_kernel, rows=rows, a=a),
                         args, [f(Yp)] * (a + 3), cfg.interpret,
                         Launch(num_warps=DIAGONAL_WARPS, num_stages=1),
                         "dplr_decayed_diag_bwd", grid=(Y.shape[0] // rows,), gate=exact)
        got = blocks(False, args + tuple(diagonal), exact)
        if flag is not None:
            got = blocks(True, args, (flag, 1, got))
    dX, dY, dg, rq = got[:a], got[a], got[a + 1], got[a + 2]
    if nb > 1:  # each block's rows take the sums of R - Q of the blocks after it
        later = jnp.cumsum(rq[::-1], axis=0)[::-1] - rq
        dg = dg + jnp.repeat(later, Y.shape[0] // nb, axis=0)
    # The pairs (t, t) without decay depend on no g: added here, after dg (see above); a
    # strict side drops them.
    dX = [x[:, :K] for x in dX]
    dY = dY[:, :K]
    for i, (Xi, dDi) in enumerate(zip(X, dD)):
        if strict[i]:
            continue
        d = jnp.diagonal(dDi).astype(Y.dtype)[:, None]  # dD[t, t]
        dX[i] = dX[i] + d * Y
        dY = dY + d * Xi
    return tuple(dX), dY, dg[:, :K].astype(g.dtype), None, None  # none for the flag


_products.defvjp(_products_fwd, _products_bwd)


def decayed_products(X, Y, g, bounded=False, strict=False, *, interpret, precision, exact,
                     launch, scalar_launch=None, y_scale=None):
    """Drop-in for chunked.decayed_products (one chunk): the kernels for per-channel and
    scalar decays, and without decay the scalar kernels with factors of 1. precision: of the
    products; exact: a float32-accurate one for the bounded path's prefix sums; launch,
    scalar_launch: (forward, backward) Launch of the per-channel and the scalar kernels
    (scalar_launch None: XLA's version for scalar decays and none).

    The kernels take every query rank of every side (X a tuple, or X's rank axis) against
    one key rank in one pass: the sides share the keys' loads and the decay factors (per
    channel: the exponents and their exp2, the key side; scalar: the pairs' C x C factors,
    forward only). A side may be [rows, K] and Y [C, K], one rank without its axis: inputs
    read in place, which moved to add the axis under the engine's vmaps would be copied (a
    forward-only call's q and keys, api.run_chunked); the products are [rows, a, C, b] all
    the same.
    16-bit X and Y are computed in float32 (the kernels cast them as they load them).
    y_scale: None, or [C] for keys of rank 1: the products of the keys Y y_scale (the delta
    family's beta k), which the scalar kernel forms on chip (elsewhere XLA multiplies)."""
    sides, flags = (X, strict) if isinstance(X, tuple) else ((X,), (strict,))
    scalar = g is None or g.ndim == 1  # the scalar kernels' (no decay: factors of 1)
    if y_scale is not None and _rank(Y) != 1:
        raise ValueError(f"decayed_products: y_scale takes keys of rank 1, not {Y.shape}")
    if y_scale is not None and (not scalar or scalar_launch is None):
        Y = (Y if Y.ndim == 2 else Y[:, 0]).astype(_acc(Y)) * y_scale[:, None]
        y_scale = None
    if scalar and scalar_launch is None:
        up = lambda x: (x if x.ndim == 3 else x[:, None]).astype(_acc(x))
        out = chunked.decayed_products(tuple(map(up, sides)), up(Y), g, bounded, flags)
        return out if isinstance(X, tuple) else out[0]
    # bounded: True or False, or a traced bool of the chunk (chunked.chunked's "check"), the
    # kernels' flag; scalar decays have no bounded kernels.
    flag = (None if isinstance(bounded, bool) or scalar
            else jnp.asarray(bounded, jnp.int32).reshape(1))
    cfg = _Cfg(interpret, precision, exact, bounded is True,
               *(scalar_launch if scalar else launch))
    C, b = Y.shape[0], _rank(Y)
    keys = [Y] if Y.ndim == 2 else [Y[:, j] for j in range(b)]
    # The per-channel kernels take a query per token: a side of every n-th token's rows is
    # spread (zeros between) and its rows kept after; the scalar ones take such rows as they are.
    every = [1 if scalar else C // x.shape[0] for x in sides]
    ranks = [_rank(x) for x in sides]
    cols = [c for x, n in zip(sides, every)
            for c in ([chunked.at_last(x, n)] if x.ndim == 2
                      else jnp.unstack(chunked.at_last(x, n), axis=1))]
    col_flags = tuple(s for a, s in zip(ranks, flags) for _ in range(a))
    per_key = [_products(tuple(cols), y, g, y_scale, flag, col_flags, cfg) for y in keys]
    outs, start = [], 0
    for a, n in zip(ranks, every):
        outs.append(jnp.stack([jnp.stack([per_key[j][c][n - 1::n] for j in range(b)], axis=-1)
                               for c in range(start, start + a)], axis=1))  # [rows, a, C, b]
        start += a
    return tuple(outs) if isinstance(X, tuple) else outs[0]
