"""GPU benchmark and correctness check: dplr_jax (pallas, xla) vs flash-linear-attention.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/ops_gpu.py \
        [--T 2048 4096 8192 16384] [--out DIR] [--budget SECONDS]

One call does, on one GPU:
1. correctness of backend="pallas" against the reference (float64 token scan) for kda,
   gated_delta_rule, delta_rule and gla: outputs, final states and every gradient, at float32
   (<= 1e-5) and bf16 (DESIGN.md tolerances), with T % C != 0, an initial state, packed
   sequences (cu_seqlens), and log decays down to -1000 with beta in (0, 2) (finite check);
2. timings at B=4, H=16, K=V=128, bf16 (log decays float32): forward and forward+backward,
   median device time after warm-up, and peak memory beyond the inputs, for dplr_jax pallas
   and xla, FLA (fla-core 0.6.0 on PYTHONPATH: chunk_kda, chunk_gla, chunk_gated_delta_rule),
   causal softmax attention (torch SDPA, jax.nn.dot_product_attention), the Pallas state pass
   alone, and with --products phase 1's decayed-product kernels alone (decayed.py vs XLA);
   every --ops op at the first T (4096 when given), kda pallas at the others (--every-T: every
   op and backend at every T);
3. a table with ratios to FLA and to the memory/compute floor (benchmarks/NOTES.md), and JSON;
4. with --fla-checks, FLA's own errors on the bf16 checks' inputs (plain and hard resets)
   against the same float64 reference (chunk_kda, chunk_gla, chunk_dplr_delta_rule:
   outputs, final states, every gradient; chunk_gated_delta_rule: forward only), beside
   dplr_jax's, so that the speed comparison says at what accuracy each side runs.

JAX timing: 10 back-to-back calls of the jitted function then block_until_ready, per call;
median of 7 such groups after 2 warm-up calls. torch timing: triton.testing.do_bench median
(CUDA events). JAX memory: XLA's compiled temp + output bytes; torch: max_memory_allocated
during the call minus what was allocated before.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax import ops
from dplr_jax.ops import chunked as xla_chunked
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, decayed
from dplr_jax.ops.pallas.state_pass import Launch, state_pass

B, H, K, V, C = 4, 16, 128, 128, 64
BW, FLOPS = 3.0e12, 750e12  # H100: measured copy bandwidth, dense bf16 rate (NOTES.md)
OPS4 = ("kda", "gated_delta_rule", "delta_rule", "gla")
RANK_R = ("dplr", "hdla", "gated_delta_product")  # issue 4's ops: timed (and checked) on request
TOL_BF16 = {"o": 5e-3, "S": 5e-3, "o fwd": 5e-3, "S fwd": 5e-3, "q": 8e-3, "k": 8e-3,
            "v": 8e-3, "h0": 8e-3, "a": 8e-3, "b": 8e-3, "log_decay": 2e-2, "beta": 2e-2}
T0 = time.time()
RESULTS = {"checks": [], "timings": []}
OUT_DIR = None  # set by main(): where record() saves the JSON after every measurement
FLA_CHECKS = False  # set by main(): also run FLA on the bf16 checks' inputs (fla_errors)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---- inputs ---------------------------------------------------------------------------------

def inputs(op, B_, T, H_, K_, V_, key, dtype, strong=False, bound=None, n=2):
    """Positional inputs of op (q, k, v, gates): keys L2-normalized, beta in (0, 2), log decays
    float32 (strong: 10x, 2% of them -1000, hard resets; bound: clipped to >= bound). dplr:
    rank 1 with a = beta k, b = k (a delta rule with per-channel decay); gated_delta_product:
    n keys, values and betas per token."""
    ks = jax.random.split(key, 8)
    nrm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = jax.random.normal(ks[0], (B_, T, H_, K_))
    k = nrm(jax.random.normal(ks[1], (B_, T, H_, K_)))
    v = jax.random.normal(ks[2], (B_, T, H_, V_))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B_, T, H_)))

    def log_decay(shape):
        g = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[4], shape) + 3.0)
        if strong:
            g = jnp.where(jax.random.uniform(ks[5], shape) < 0.02, -1000.0, 10 * g)
        return g if bound is None else jnp.maximum(g, bound)

    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if op == "dplr":
        return (q, k, v, log_decay((B_, T, H_, K_)), (beta[..., None] * k).astype(dtype), k)
    if op == "hdla":
        return (q, k, v, log_decay((B_, T, H_, K_)), beta.astype(dtype))
    if op == "gated_delta_product":
        kn = nrm(jax.random.normal(ks[6], (B_, T, H_, n, K_))).astype(dtype)
        vn = jax.random.normal(ks[7], (B_, T, H_, n, V_)).astype(dtype)
        bn = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B_, T, H_, n)))
        return (q, kn, vn, log_decay((B_, T, H_)), bn.astype(dtype))
    if op == "gla":
        return (q, k, v, log_decay((B_, T, H_, K_)))
    if op == "delta_rule":
        return (q, k, v, beta.astype(dtype))
    if op == "gated_delta_rule":
        return (q, k, v, log_decay((B_, T, H_)), beta.astype(dtype))
    return (q, k, v, log_decay((B_, T, H_, K_)), beta.astype(dtype))


GATE_NAMES = {name: spec.gates for name, spec in ops.api.SPECS.items()}


def _bound(bound):
    return {} if bound is None else {"log_decay_lower_bound": bound}


def _call(op, backend, cu, chunk_size, bound):
    def f(args, h0):
        return ops.OPS[op](*args, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                           backend=backend, chunk_size=chunk_size, **_bound(bound))
    return f


def loss_and_grads(op, backend, args, h0, do, dS, cu=None, chunk_size=C, bound=None):
    f = _call(op, backend, cu, chunk_size, bound)

    def run(args, h0):
        (o, S), pull = jax.vjp(f, args, h0)
        da, dh0 = pull((do.astype(o.dtype), dS))
        return o, S, da, dh0

    return jax.jit(run)(args, h0)


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.sum((x - ref) ** 2) / np.sum(ref ** 2)))


# ---- 1. correctness -------------------------------------------------------------------------

def check(op, dtype, case, key, bound=None, K_=64, chunk=C, n=2):
    """backend="pallas" vs the float64 reference at T=300, B=2 H=2 (varlen: B=1, sequences
    77 + 223), K=V=K_, chunk_size chunk; strong: hard resets; mixed (per-channel decays):
    hard resets in two chunks of one head each, which take the exact products kernels while
    the others take the bounded ones; bound: decays clipped to >= bound and passed as
    log_decay_lower_bound; n: gated_delta_product's keys per token. "o fwd", "S fwd": o and
    the final state of a call without gradients (the kernels read q and the keys as given:
    pallas.engine._forward_only)."""
    T, N = 300, 2
    cu = None
    Bc = 2
    if case == "varlen":
        Bc, cu = 1, jnp.array([0, 77, 300], jnp.int32)
    args = inputs(op, Bc, T, 2, K_, K_, key, dtype, strong=(case == "strong"), bound=bound, n=n)
    if case == "mixed":
        g = args[3].at[0, 70, 1].set(-1000.0).at[1, 200, 0, :5].set(-1000.0)
        args = args[:3] + (g,) + args[4:]
    h0 = 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (N, 2, K_, K_))
    do = jax.random.normal(jax.random.fold_in(key, 2), (Bc, T, 2, K_))
    dS = jax.random.normal(jax.random.fold_in(key, 3), (N, 2, K_, K_))
    got = loss_and_grads(op, "pallas", args, h0, do, dS, cu, chunk_size=chunk, bound=bound)
    forward = jax.jit(_call(op, "pallas", cu, chunk, bound))(args, h0)
    with jax.enable_x64(True):
        a64 = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in args)
        ref = loss_and_grads(op, "reference", a64, jnp.asarray(np.asarray(h0, np.float64)),
                             jnp.asarray(np.asarray(do, np.float64)),
                             jnp.asarray(np.asarray(dS, np.float64)), cu)
        ref = jax.tree.map(np.asarray, ref)
    names = ("q", "k", "v") + GATE_NAMES[op]
    pairs = [("o", got[0], ref[0]), ("S", got[1], ref[1]), ("h0", got[3], ref[3]),
             ("o fwd", forward[0], ref[0]), ("S fwd", forward[1], ref[1])]
    pairs += [(n, a, b) for n, a, b in zip(names, got[2], ref[2])]
    out = {}
    ok = True
    for name, a, b in pairs:
        a = np.asarray(a.astype(jnp.float32) if hasattr(a, "astype") else a)
        finite = bool(np.all(np.isfinite(a)))
        err = rel(a, b)
        tol = 1e-5 if dtype == jnp.float32 else TOL_BF16[name]
        good = finite and err < tol
        ok &= good
        out[name] = {"rel_rmse": err, "tol": tol, "finite": finite, "pass": good}
    if bound is not None or K_ != 64 or chunk != C or n != 2:
        case = (f"{case} K={K_} C={chunk}" + ("" if bound is None else f" bound={bound:g}")
                + ("" if n == 2 else f" n={n}"))
    entry = {"op": op, "dtype": jnp.dtype(dtype).name, "case": case, "pass": ok, "errors": out}
    # Not varlen: FLA's varlen kernels autotune anew (~4 minutes for chunk_kda on the H100).
    if (FLA_CHECKS and dtype == jnp.bfloat16 and op in FLA_OPS and case != "varlen"
            and bound is None and K_ == 64 and chunk == C):
        entry["fla_errors"] = guarded(f"fla check {op} {case}",
                                      lambda: fla_errors(op, args, h0, do, dS, cu, ref, names))
    RESULTS["checks"].append(entry)
    worst = max(out, key=lambda m: out[m]["rel_rmse"] / out[m]["tol"])
    log(f"check {op:17s} {jnp.dtype(dtype).name:8s} {case:7s} {'PASS' if ok else 'FAIL'} "
        f"worst {worst} {out[worst]['rel_rmse']:.2e} (tol {out[worst]['tol']:.0e})")


FLA_OPS = ("kda", "gla", "gated_delta_rule", "dplr")
BOUNDED = tuple(name for name, spec in ops.api.SPECS.items() if spec.bounded)  # take --bound


def fla_errors(op, args, h0, do, dS, cu, ref, names):
    """FLA's relative RMSE against the float64 reference `ref` (check's: o, S, the inputs'
    gradients, dh0) on the same inputs (bf16 q, k, v, beta, a, b; float32 log decays, h0).
    chunk_gated_delta_rule: o and S only (its backward refuses Triton 3.6 on Hopper)."""
    import torch
    from fla.ops import chunk_dplr_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_kda

    def tensor(x):
        dt = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
        return torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=dt)

    backward = op != "gated_delta_rule"
    xs = [tensor(x).requires_grad_(backward) for x in args]
    h0_t = tensor(h0).requires_grad_(backward)
    kw = dict(initial_state=h0_t, output_final_state=True,
              cu_seqlens=None if cu is None else torch.tensor(np.asarray(cu), device="cuda",
                                                                dtype=torch.long))
    if op == "dplr":
        # FLA's transition is Diag(e^g) + b a^T (its naive.py: a reads the state, b is
        # written), dplr_jax's Diag(e^g) - a b^T: FLA's a is dplr_jax's b, its b minus a.
        q, k, v, g, a, b = xs
        b_fla = (-a).detach().requires_grad_(True)
        o, S = chunk_dplr_delta_rule(q, k, v, b, b_fla, g, **kw)
    else:
        fn = {"kda": chunk_kda, "gla": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}[op]
        o, S = fn(*xs, **kw)
    got = {"o": o, "S": S}
    if backward:
        torch.autograd.backward([o, S], [tensor(do).to(o.dtype), tensor(dS)])
        got.update({n: x.grad for n, x in zip(names, xs)}, h0=h0_t.grad)
        if op == "dplr":
            got["a"] = -b_fla.grad
    refs = {"o": ref[0], "S": ref[1], "h0": ref[3], **dict(zip(names, ref[2]))}
    errs = {n: rel(x.detach().float().cpu().numpy(), refs[n]) for n, x in got.items()}
    log(f"fla   {op:17s} " + " ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    return errs


# ---- 2. timing ------------------------------------------------------------------------------

def time_jax(fn, args, groups=7, per=10):
    jf = jax.jit(fn)
    compiled = jf.lower(*args).compile()
    mem = None
    try:
        ma = compiled.memory_analysis()
        mem = int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional on some backends
        pass
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(groups):
        t = time.perf_counter()
        for _ in range(per):
            out = compiled(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / per * 1e3)
    return statistics.median(ts), mem


def jax_op_fns(op, backend, bound=None, chunk=C):
    def fwd(*args):
        return ops.OPS[op](*args, backend=backend, chunk_size=chunk, **_bound(bound))[0]

    def fwd_bwd(do, *args):
        o, pull = jax.vjp(fwd, *args)
        return pull(do)

    return fwd, fwd_bwd


def record(name, T, mode, ms, mem, extra=None):
    row = {"name": name, "T": T, "mode": mode, "ms": ms, "mem_bytes": mem}
    row.update(extra or {})
    RESULTS["timings"].append(row)
    if OUT_DIR:
        save(OUT_DIR)  # keep what was measured if the device call is cut off
    log(f"time {name:28s} T={T:6d} {mode:8s} {ms:9.3f} ms  mem "
        f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB'}")


def guarded(what, fn):
    """fn()'s value; None, logged and recorded, if it raises."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing variant must not stop the benchmark
        log(f"FAILED {what}: {type(e).__name__}: {str(e)[:300]}")
        RESULTS.setdefault("failures", []).append({"what": what, "error": repr(e)[:2000]})


def bench_jax(T, jops, backends_, bound=None, chunk=C):
    """Times the ops; with bound, the per-channel ones (BOUNDED) with decays clipped to
    >= bound and passed as log_decay_lower_bound (the row name says "bound"); chunk: the
    chunk_size (named in the row when it is not 64)."""
    key = jax.random.PRNGKey(T)
    variants = [(op, n) for op in jops for n in ((2, 3) if op == "gated_delta_product" else (2,))]
    for op, n in variants:
        b = bound if op in BOUNDED else None
        args = inputs(op, B, T, H, K, V, key, jnp.bfloat16, bound=b, n=n)
        do = jax.random.normal(key, (B, T, H, V), jnp.bfloat16)
        for be in backends_:
            fwd, fwd_bwd = jax_op_fns(op, be, b, chunk)
            name = (f"jax {op}" + (f" n{n}" if op == "gated_delta_product" else "") + f" {be}"
                    + ("" if b is None else f" bound{b:g}") + ("" if chunk == C else f" C{chunk}"))
            guarded(f"{name} fwd T={T}",
                    lambda: record(name, T, "fwd", *time_jax(fwd, args)))
            guarded(f"{name} fwd+bwd T={T}",
                    lambda: record(name, T, "fwd+bwd", *time_jax(fwd_bwd, (do,) + args)))


def bench_state_pass(T, configs):
    """The Pallas state pass alone (forward, and forward+backward), random float32 factored
    transitions of the delta family's shape (Z, W: [C, K], X: [C, V] per chunk)."""
    NC = T // C
    ks = jax.random.split(jax.random.PRNGKey(7), 6)
    gamma = jnp.full((B, H, NC, K), 0.9)
    Z = 0.02 * jax.random.normal(ks[0], (B, H, NC, C, K))
    W = 0.02 * jax.random.normal(ks[1], (B, H, NC, C, K))
    X = jax.random.normal(ks[2], (B, H, NC, C, V))
    Qs = jax.random.normal(ks[3], (B, H, NC, C, K))
    O0 = jax.random.normal(ks[4], (B, H, NC, C, V))
    h0 = jnp.zeros((B, 1, H, K, V))
    at = lambda c: jnp.broadcast_to(jnp.where(jnp.arange(NC) == c, 0, -1).astype(jnp.int32),
                                    (B, NC))
    src, dst = at(0), at(NC - 1)  # one sequence per row
    args = (gamma, Z, W, X, Qs, O0, None)
    for cfg in configs:
        launch = lambda x: f"{x.block_v}/{x.num_warps}/{x.num_stages}"
        tag = (f"state_pass {getattr(cfg.precision, 'name', cfg.precision)} fwd "
               f"{launch(cfg.fwd)} bwd {launch(cfg.bwd)} "
               f"grads {cfg.grads.num_warps}/{cfg.grads.num_stages}")
        f = lambda *a: state_pass(*a, h0, src, dst, cfg)[0]

        def fb(*a):
            o, pull = jax.vjp(f, *a)
            return pull(o)

        guarded(tag + " fwd", lambda: record(tag, T, "fwd", *time_jax(f, args)))
        guarded(tag + " fwd+bwd", lambda: record(tag, T, "fwd+bwd", *time_jax(fb, args)))


def _products_setup(T):
    """Inputs of kda's QE and L per chunk (the query sides q and p against the keys E, p's
    strict: chunked.chunked's own_decay), float32 as the engine passes them, vmapped over
    B*H*T/C chunks, and (forward, forward+backward) functions of XLA's products and of the
    kernels at (forward, backward) warps: (X, Y, g, xla, pallas(wf, wb, bounded)), X the
    pair of sides."""
    N = B * H * T // C
    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    X = tuple(jax.random.normal(k, (N, C, 1, K)) for k in ks[:2])
    Y = jax.random.normal(ks[2], (N, C, 1, K))
    g = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[3], (N, C, K)) + 3.0)
    ct = tuple(jax.random.normal(k, (N, C, 1, C, 1)) for k in jax.random.split(ks[4]))

    def fns(products):
        fwd = jax.vmap(lambda X, Y, g: products(X, Y, g, strict=(False, True)))

        def fwd_bwd(X, Y, g):  # returns D too: else XLA drops the forward kernel (sixth session)
            D, pull = jax.vjp(fwd, X, Y, g)
            return (D,) + pull(ct)

        return fwd, fwd_bwd

    xla = fns(xla_chunked.decayed_products)
    gpu = PLATFORM_CONFIGS["gpu"]
    launches = lambda wf, wb: (Launch(num_warps=wf, num_stages=1),
                               Launch(num_warps=wb, num_stages=1))
    pallas = lambda wf, wb, bounded=False: fns(functools.partial(
        decayed.decayed_products, bounded=bounded, interpret=False,
        precision=gpu.precision_16bit, exact=gpu.precision,  # the bf16-input path
        launch=launches(wf, wb), scalar_launch=launches(wf, wb)))
    return X, Y, g, xla, pallas


def _product_errors(got, ref):
    """Relative errors of (QE, L), their cotangents (dq, dp), dY and dg against ref's."""
    names = ("QE", "L", "dq", "dp", "dY", "dg")
    return {n: rel(a, b) for n, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(ref))}


def bench_products(T):
    """Phase 1's decayed products of per-channel decays alone (kda's QE and L,
    _products_setup): the Pallas kernels (decayed.py) at several warp counts of the per-chunk
    kernels (forward / backward) and rows per program of the diagonal kernels vs XLA's
    chunked.decayed_products, forward and forward+backward; plus a check of one against the
    other on the GPU, plain and with hard resets, and the bounded path against the exact
    kernel."""
    X, Y, g, xla, pallas = _products_setup(T)
    ks = jax.random.split(jax.random.PRNGKey(11), 4)  # ks[0]: the hard resets' positions
    for strong in (False, True):
        gs = jnp.where(jax.random.uniform(ks[0], g.shape) < 0.02, -1000.0, 10 * g) if strong else g
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(xla[1])(X, Y, gs)  # (D, dX, dY, dg)
        got = jax.jit(pallas(2, 4)[1])(X, Y, gs)
        errs = _product_errors(got, ref)
        finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))
        RESULTS["checks"].append({"op": "decayed products (tf32 dots)",
                                  "case": "strong" if strong else "plain",
                                  "errors_vs_xla_highest": errs, "finite": finite})
        log(f"products kernel vs xla ({'strong' if strong else 'plain'}): finite {finite} {errs}")
    committed = decayed.DIAGONAL_ROWS
    variants = [(committed, wf, wb) for wf, wb in ((1, 4), (2, 4), (2, 8), (4, 4))]
    variants += [(rows, 2, 4) for rows in (1, 4, 8) if rows != committed]
    for rows, wf, wb in variants:  # rows: the diagonal kernels' rows per program
        decayed.DIAGONAL_ROWS = rows
        fwd, fb = pallas(wf, wb)
        name = f"products pallas rows{rows} w{wf}/{wb}"
        guarded("products pallas", lambda: record(name, T, "fwd", *time_jax(fwd, (X, Y, g))))
        guarded("products pallas", lambda: record(name, T, "fwd+bwd", *time_jax(fb, (X, Y, g))))
    decayed.DIAGONAL_ROWS = committed
    guarded("products xla", lambda: record("products xla", T, "fwd", *time_jax(xla[0], (X, Y, g))))
    guarded("products xla", lambda: record("products xla", T, "fwd+bwd",
                                           *time_jax(xla[1], (X, Y, g))))
    # The bounded path (log decays >= -5): against the exact kernel on the same inputs.
    gb = jnp.maximum(g, xla_chunked.MIN_BOUND)
    exact = jax.jit(pallas(2, 4)[1])(X, Y, gb)
    for wf, wb in ((2, 4), (4, 4), (4, 8), (8, 8)):
        fwd, fb = pallas(wf, wb, bounded=True)
        if (wf, wb) == (2, 4):
            got = jax.jit(fb)(X, Y, gb)
            errs = _product_errors(got, exact)
            RESULTS["checks"].append({"op": "decayed products bounded vs exact kernel",
                                      "case": "decays >= -5", "errors": errs})
            log(f"products bounded vs exact kernel: {errs}")
        guarded("products bounded", lambda: record(f"products pallas bounded w{wf}/{wb}", T,
                                                   "fwd", *time_jax(fwd, (X, Y, gb))))
        guarded("products bounded", lambda: record(f"products pallas bounded w{wf}/{wb}", T,
                                                   "fwd+bwd", *time_jax(fb, (X, Y, gb))))


def bench_scalar_products(T):
    """bench_products for one log decay per token (gated_delta_rule's products): the scalar
    kernels (decayed.py) at several warp counts vs XLA's, with the same check."""
    X, Y, g, xla, pallas = _products_setup(T)
    gpu = PLATFORM_CONFIGS["gpu"]
    gs = g[..., 0]
    ks = jax.random.split(jax.random.PRNGKey(12), 2)
    for strong in (False, True):
        gt = jnp.where(jax.random.uniform(ks[1], gs.shape) < 0.02, -1000.0, 10 * gs) if strong \
            else gs
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(xla[1])(X, Y, gt)
        got = jax.jit(pallas(*(x.num_warps for x in gpu.scalar_products))[1])(X, Y, gt)
        errs = _product_errors(got, ref)
        finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))
        RESULTS["checks"].append({"op": "decayed products, scalar decays (tf32 dots)",
                                  "case": "strong" if strong else "plain",
                                  "errors_vs_xla_highest": errs, "finite": finite})
        log(f"scalar products kernel vs xla ({'strong' if strong else 'plain'}): finite "
            f"{finite} {errs}")
    for wf, wb in ((2, 4), (4, 4), (4, 8), (8, 8)):
        fwd, fb = pallas(wf, wb)
        tag = f"scalar products pallas w{wf}/{wb}"
        guarded(tag, lambda: record(tag, T, "fwd", *time_jax(fwd, (X, Y, gs))))
        guarded(tag, lambda: record(tag, T, "fwd+bwd", *time_jax(fb, (X, Y, gs))))
    guarded("scalar products xla", lambda: record("scalar products xla", T, "fwd",
                                                  *time_jax(xla[0], (X, Y, gs))))
    guarded("scalar products xla", lambda: record("scalar products xla", T, "fwd+bwd",
                                                  *time_jax(xla[1], (X, Y, gs))))


def bench_jax_attention(T):
    key = jax.random.PRNGKey(1)
    q, k, v = (jax.random.normal(kk, (B, T, H, K), jnp.bfloat16) for kk in jax.random.split(key, 3))
    do = jax.random.normal(key, (B, T, H, V), jnp.bfloat16)
    fwd = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")

    def fb(do, q, k, v):
        return jax.vjp(fwd, q, k, v)[1](do)

    guarded(f"jax attention fwd T={T}",
            lambda: record("jax attention cudnn", T, "fwd", *time_jax(fwd, (q, k, v))))
    guarded(f"jax attention fwd+bwd T={T}",
            lambda: record("jax attention cudnn", T, "fwd+bwd", *time_jax(fb, (do, q, k, v))))


def bench_torch(T, which, bound=-5.0):
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(T)
    rn = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=dev, generator=g, dtype=dt)
    nrm = lambda x: x / x.float().norm(dim=-1, keepdim=True).to(x.dtype)
    q, k, v = rn(B, T, H, K), nrm(rn(B, T, H, K)), rn(B, T, H, V)
    g_ch = F.logsigmoid(1.5 * rn(B, T, H, K, dt=torch.float32) + 3.0)
    g_sc = F.logsigmoid(1.5 * rn(B, T, H, dt=torch.float32) + 3.0)
    beta = (2 * torch.sigmoid(rn(B, T, H, dt=torch.float32))).to(torch.bfloat16)
    do = rn(B, T, H, V)

    def time_call(name, mode, call):
        """Peak memory of one call, then its median time over do_bench's repetitions."""
        def go():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated() - base
            record(name, T, mode, do_bench(call, warmup=50, rep=300, return_mode="median"), mem)

        guarded(f"{name} {mode} T={T}", go)

    def measure(name, fwd, grads_of, modes, cotangent=do):
        for mode in modes:
            def call():
                for x in grads_of:
                    x.grad = None
                o = fwd()
                if mode == "fwd+bwd":
                    o.backward(cotangent)

            time_call(name, mode, call)

    leaves = [q, k, v, g_ch, g_sc, beta]
    for x in leaves:
        x.requires_grad_(True)
    if set(which) - {"sdpa"}:  # FLA is needed for all but torch's attention
        from fla.ops import chunk_dplr_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_kda
        from fla.ops.gated_delta_product import chunk_gated_delta_product
    if "dplr" in which:  # FLA's Diag(e^gk) + b a^T with a = -beta k, b = k: -beta k k^T
        a_ = (-beta.detach().float()[..., None] * k.detach().float()).to(k.dtype)
        a_.requires_grad_(True)
        measure("fla chunk_dplr_delta_rule", lambda: chunk_dplr_delta_rule(
            q, k, v, a_, k, g_ch)[0], leaves + [a_], ("fwd", "fwd+bwd"))
    for n in (2, 3):  # FLA takes the n keys of a token as n consecutive rows: [B, T*n, H, K]
        if f"gdp{n}" not in which:
            continue
        kn = nrm(rn(B, T * n, H, K)).requires_grad_(True)
        vn = rn(B, T * n, H, V).requires_grad_(True)
        bn = (2 * torch.sigmoid(rn(B, T * n, H, dt=torch.float32))).to(torch.bfloat16)
        bn.requires_grad_(True)
        measure(f"fla chunk_gated_delta_product n{n}", lambda: chunk_gated_delta_product(
            q, kn, vn, g_sc, bn, num_householder=n)[0], leaves + [kn, vn, bn],
            ("fwd", "fwd+bwd"))
    if "kda" in which:
        measure("fla chunk_kda", lambda: chunk_kda(q, k, v, g_ch, beta)[0], leaves,
                ("fwd", "fwd+bwd"))
    if "kda_safe" in which:  # FLA's bounded-gate path (M=16 tensor cores), decays >= bound
        g_b = g_ch.detach().clamp(min=bound).requires_grad_(True)
        measure(f"fla chunk_kda safe_gate bound{bound:g}",
                lambda: chunk_kda(q, k, v, g_b, beta, safe_gate=True, lower_bound=bound)[0],
                leaves + [g_b], ("fwd", "fwd+bwd"))
    if "gla" in which:
        measure("fla chunk_gla", lambda: chunk_gla(q, k, v, g_ch)[0], leaves,
                ("fwd", "fwd+bwd"))
    if "gdn" in which:
        measure("fla chunk_gated_delta_rule",
                lambda: chunk_gated_delta_rule(q, k, v, g_sc, beta)[0], leaves, ("fwd",))
    if "sdpa" not in which:
        return
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    dot_ = do.transpose(1, 2).contiguous()
    # SDPA with the cotangent in its [B, H, T, V] layout.
    measure("torch sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
            [qt, kt, vt], ("fwd", "fwd+bwd"), cotangent=dot_)


# ---- 3. floors and table --------------------------------------------------------------------

def floor_ms(op, T, mode):
    """max(bytes / BW, flops / FLOPS) of a fused layer (NOTES.md "GPU kernels")."""
    n = B * T * H
    e = n * K * 2  # one bf16 [B, T, H, 128] tensor
    gate = {"kda": n * K * 4 + n * 2, "gla": n * K * 4, "gated_delta_rule": n * 4 + n * 2,
            "delta_rule": n * 2, "attention": 0}[op]
    fwd_bytes = 4 * e + gate  # q, k, v, gates in; o out
    bwd_bytes = fwd_bytes + e + 3 * e + gate  # again + do in; dq, dk, dv, dgates out
    chunks = n // C
    if op == "attention":
        fwd_fl = 2 * 2 * B * H * T * T * K / 2
    else:
        fwd_fl = chunks * (6 * C * C * K + 4 * C * C * V + 6 * C * K * V)
    flops = fwd_fl if mode == "fwd" else 3.5 * fwd_fl
    byts = fwd_bytes if mode == "fwd" else fwd_bytes + bwd_bytes
    return max(byts / BW, flops / FLOPS) * 1e3


def opname(name):
    """The op a timing row's name times (FLA's and dplr_jax's alike), "attention", or None."""
    name = name.replace("chunk_", "").replace("dplr_delta_rule", "dplr")
    return next((o for o in OPS4 + RANK_R if name.endswith(" " + o) or f" {o} " in name),
                "attention" if "attention" in name or "sdpa" in name else None)


def table():
    """Markdown table of the timings; "vs FLA" compares with FLA's op at the same T and mode
    (rows with a bound with FLA's safe_gate row, the others with its plain one)."""
    rows = RESULTS["timings"]

    def key(r):  # gated_delta_product rows carry n2 / n3
        n = [w for w in r["name"].split() if w in ("n2", "n3")]
        return r["T"], r["mode"], opname(r["name"]), "bound" in r["name"], tuple(n)

    fla = {key(r): r["ms"] for r in rows if r["name"].startswith("fla")}
    print("\n| variant | T | mode | ms | peak mem GiB | vs FLA | vs floor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        op = opname(r["name"])
        f = fla.get(key(r))
        vs_fla = f"{r['ms'] / f:.2f}x" if f else "-"
        vs_floor = (f"{r['ms'] / floor_ms(op, r['T'], r['mode']):.1f}x"
                    if op in OPS4 + ("attention",) else "-")
        mem = "-" if r["mem_bytes"] is None else f"{r['mem_bytes'] / 2**30:.2f}"
        print(f"| {r['name']} | {r['T']} | {r['mode']} | {r['ms']:.3f} | {mem} | {vs_fla} | "
              f"{vs_floor} |")
    fla_checks = [c for c in RESULTS["checks"] if c.get("fla_errors")]
    if fla_checks:
        print("\n| op (bf16) | case | relative RMSE vs float64: dplr_jax / FLA (tolerance) |")
        print("|---|---|---|")
        for c in fla_checks:
            errs = ", ".join(f"{n} {c['errors'][n]['rel_rmse']:.1e} / {e:.1e} "
                             f"({c['errors'][n]['tol']:.0e})" for n, e in c["fla_errors"].items())
            print(f"| {c['op']} | {c['case']} | {errs} |")


def plot(path):
    """ms against T, forward and forward+backward side by side, for every variant timed at two
    T or more (log-log: linear cost is a slope of 1, softmax attention's T^2 a slope of 2).
    A color per op, a line style per implementation: dplr_jax pallas solid, xla dash-dot, FLA
    dashed, attention dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in RESULTS["timings"]:
        series.setdefault(r["name"], {}).setdefault(r["mode"], []).append((r["T"], r["ms"]))
    names = sorted(n for n, modes in series.items()
                   if any(len(pts) > 1 for pts in modes.values()))
    op_of = lambda n: opname(n) or "other"
    ops = sorted({op_of(n) for n in names})
    color = {o: f"C{i}" for i, o in enumerate(ops)}
    style = lambda n: ("--" if n.startswith("fla") else ":" if op_of(n) == "attention"
                       else "-." if " xla" in n else "-")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in names:
            pts = series[name].get(mode, [])
            if len(pts) > 1:
                T, ms = zip(*sorted(pts))
                ax.plot(T, ms, style(name), color=color[op_of(name)],
                        marker="s" if "sdpa" in name else "o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per sequence)")
        ax.set_title(f"{mode}, B={B} H={H} K=V={K} bf16")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (median)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
               loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(RESULTS.get("meta", {}).get("device", ""))
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def save(out_dir):
    RESULTS["meta"] = {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "command": " ".join(sys.argv), "python": platform.python_version(),
        "shape": {"B": B, "H": H, "K": K, "V": V, "chunk": C, "dtype": "bfloat16"},
        "pallas_gpu_config": repr(PLATFORM_CONFIGS["gpu"]),
    }
    try:
        import torch
        import triton
        RESULTS["meta"].update(torch=torch.__version__, triton=triton.__version__)
    except ImportError:
        pass
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ops_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds after which no further sequence length is started")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--only", choices=("all", "jax", "torch"), default="all",
                    help="time only the JAX variants or only the torch ones (FLA's first calls "
                         "autotune for minutes, so a device call may hold one part)")
    ap.add_argument("--ops", nargs="+", default=list(OPS4), choices=OPS4 + RANK_R,
                    help="dplr_jax ops to check, and to time at the first T (later: kda; "
                         "--every-T: all)")
    ap.add_argument("--backends", nargs="+", default=["pallas", "xla"],
                    choices=("pallas", "xla"), help="dplr_jax backends to time at the first T")
    ap.add_argument("--torch", nargs="+", default=["kda", "gla", "gdn", "sdpa"],
                    choices=("kda", "kda_safe", "gla", "gdn", "sdpa", "dplr", "gdp2", "gdp3"),
                    help="torch variants to time (kda_safe: FLA's safe_gate at --bound)")
    ap.add_argument("--bound", type=float, default=None,
                    help="also check and time the ops with per-channel decays (kda, gla, dplr, "
                         "hdla) with log_decay_lower_bound=BOUND (decays clipped to >= BOUND), "
                         "at the first T")
    ap.add_argument("--wide-checks", action="store_true",
                    help="also check kda at head dim 256 (bf16, fp32) and at chunk 128 (bf16)")
    ap.add_argument("--products", nargs="*", choices=("channel", "scalar"),
                    help="at the first T, also time phase 1's decayed products alone (Pallas vs "
                         "XLA): of per-channel decays, of scalar ones, or (no value) both")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the state-pass-alone and jax attention timings (as --extras "
                         "with no value)")
    ap.add_argument("--extras", nargs="*", choices=("state_pass", "attention"),
                    default=["state_pass", "attention"],
                    help="the state pass alone (first T) and jax attention (every T)")
    ap.add_argument("--every-T", action="store_true",
                    help="time --ops with --backends at every T (without it, kda pallas "
                         "after the first: the sweep of the headline op)")
    ap.add_argument("--chunk", type=int, nargs="+", default=[C],
                    help="chunk sizes for the dplr_jax op timings (first T only beyond 64)")
    ap.add_argument("--fla-checks", action="store_true",
                    help="also run FLA on the bf16 checks' inputs of kda, gla, gated_delta_rule "
                         "and dplr and record its errors (fla-core on PYTHONPATH)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="print the table of earlier runs' JSON files and write their union "
                         "to --out; measures nothing")
    ap.add_argument("--plot", metavar="PNG",
                    help="also plot ms against T of every variant timed at two T or more")
    a = ap.parse_args()
    global OUT_DIR, FLA_CHECKS
    FLA_CHECKS = a.fla_checks
    if a.combine:
        for path in a.combine:
            with open(path) as f:
                part = json.load(f)
            RESULTS["checks"] += part["checks"]
            RESULTS["timings"] += part["timings"]
            RESULTS.setdefault("failures", []).extend(part.get("failures", []))
            RESULTS.setdefault("runs", []).append(part["meta"])
        RESULTS["meta"] = RESULTS["runs"][0]
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "ops_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        table()
        if a.plot:
            plot(a.plot)
        return
    OUT_DIR = a.out
    log("devices", jax.devices())
    if not a.skip_checks:
        key = jax.random.PRNGKey(0)
        for i, op in enumerate(OPS4 + RANK_R):
            if op not in a.ops:
                continue
            for dtype in (jnp.float32, jnp.bfloat16):
                with jax.default_matmul_precision("highest"):
                    guarded(f"check {op}", lambda: check(op, dtype, "plain",
                                                         jax.random.fold_in(key, i)))
            guarded(f"check {op} varlen", lambda: check(op, jnp.bfloat16, "varlen",
                                                        jax.random.fold_in(key, 10 + i)))
            if op != "delta_rule":
                guarded(f"check {op} strong", lambda: check(op, jnp.bfloat16, "strong",
                                                            jax.random.fold_in(key, 20 + i)))
            if op in BOUNDED:
                for dtype in (jnp.float32, jnp.bfloat16):
                    with jax.default_matmul_precision("highest"):
                        guarded(f"check {op} mixed", lambda: check(
                            op, dtype, "mixed", jax.random.fold_in(key, 50 + i)))
            if a.bound is not None and op in BOUNDED:
                for dtype, case in ((jnp.float32, "plain"), (jnp.bfloat16, "plain"),
                                    (jnp.bfloat16, "varlen")):
                    with jax.default_matmul_precision("highest"):
                        guarded(f"check {op} bound", lambda: check(
                            op, dtype, case, jax.random.fold_in(key, 30 + i), bound=a.bound))
            if a.wide_checks and op == "kda":
                for dtype, kw in ((jnp.bfloat16, dict(K_=256)), (jnp.float32, dict(K_=256)),
                                  (jnp.bfloat16, dict(chunk=128)),
                                  (jnp.bfloat16, dict(K_=256, chunk=128, bound=-5.0))):
                    with jax.default_matmul_precision("highest"):
                        guarded(f"check kda {kw}", lambda: check(
                            op, dtype, "plain", jax.random.fold_in(key, 40), **kw))
        save(a.out)
    gpu = PLATFORM_CONFIGS["gpu"]
    fast = dataclasses.replace(gpu, precision=gpu.precision_16bit)
    sp_configs = ([gpu, fast]
                  + [dataclasses.replace(fast, fwd=Launch(*f), bwd=Launch(*b), grads=Launch(*g))
                     for f, b, g in (((64, 8, 2), (64, 8, 1), (None, 4, 2)),
                                     ((64, 8, 2), (64, 8, 2), (None, 8, 2)),
                                     ((64, 4, 2), (64, 4, 2), (None, 4, 1)),
                                     ((32, 4, 2), (32, 4, 1), (None, 2, 2)))])
    Ts = sorted(a.T, key=lambda T: (T != 4096, T))  # the headline shape first
    for i, T in enumerate(Ts):
        if i > 0 and time.time() - T0 > a.budget:
            log(f"budget reached: skipping T={T}")
            continue
        first = i == 0
        if a.only in ("all", "torch"):
            bench_torch(T, a.torch, -5.0 if a.bound is None else a.bound)
        if a.only in ("all", "jax"):
            every = first or a.every_T
            bench_jax(T, a.ops if every else ("kda",), a.backends if every else ("pallas",))
            for chunk in (a.chunk if first else ()):
                if chunk != C:
                    bench_jax(T, a.ops, a.backends, chunk=chunk)
            if a.bound is not None:
                bench_jax(T, [o for o in a.ops if o in BOUNDED] if first else ("kda",),
                          a.backends if first else ("pallas",), bound=a.bound)
            products = ("channel", "scalar") if a.products == [] else (a.products or ())
            if first and "channel" in products:
                guarded("products", lambda: bench_products(T))
            if first and "scalar" in products:
                guarded("scalar products", lambda: bench_scalar_products(T))
            extras = () if a.no_extras else a.extras
            if first and "state_pass" in extras:
                bench_state_pass(T, sp_configs)
            if "attention" in extras:
                bench_jax_attention(T)
        save(a.out)
    save(a.out)
    table()
    if a.plot:
        plot(a.plot)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - print, then still save what was measured
        traceback.print_exc()
        save(OUT_DIR or os.environ.get("OUT", "benchmarks/results"))
        table()
