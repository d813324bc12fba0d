"""Prototype for the shared-keys lead (benchmarks/NOTES.md, fourteenth session): the diagonal
forward kernel of decayed.py with two query sides that share the keys' loads, the exponents
and their exp2 (kda's L as a plain product of k, and QE), against two calls of the committed
decayed._diagonal_kernel, at kda's shape (4096 chunks of 64, K = 128, float32). Not used by
the ops; it measures what the fused kernel's diagonal forward would save.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=src python benchmarks/shared_keys_diagonal.py \
        [--out DIR]

Prints the largest difference between the two versions' outputs and wall-clock medians of
30 jitted calls; writes DIR/shared_keys_diagonal.json. On a CPU it checks the outputs only
(interpret mode, 2 chunks).
"""
import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dplr_jax.ops.pallas import decayed as D
from dplr_jax.ops.pallas.state_pass import Launch

SUB = D.SUB


def fused_diag(x1_ref, x2_ref, y_ref, g_ref, d1_ref, d2_ref, xq1_ref, xq2_ref, key_ref, *,
               rows):
    """decayed._diagonal_kernel (plain, not probe) for two query sides X1, X2 at once."""
    C = x1_ref.shape[0]
    t0, base, end = D._row_group(rows)
    X1, X2 = x1_ref[pl.ds(t0, rows), :], x2_ref[pl.ds(t0, rows), :]
    f = X1.dtype
    r = D._iota((rows, 1), 0)
    last = t0 + r
    top = t0 + rows - 1
    tail = (t0 + rows == base + SUB) & (end < C - 1)

    def step(k, d):
        s = top - k
        g_next = D._log2_decay(g_ref, jnp.minimum(s + 1, C - 1), f)
        d = D._advance(d, last > s, last == s, g_next)
        y = y_ref[pl.ds(s, 1), :]
        ye = y * jnp.exp2(d)
        for X, ref in ((X1, d1_ref), (X2, d2_ref)):
            ref[pl.ds(t0, rows), pl.ds(s - base, 1)] = jnp.sum(
                X * ye, axis=1, keepdims=True).astype(ref.dtype)

        @pl.when(tail)
        def _key():
            d_end = jnp.sum(jnp.where(r == rows - 1, d, 0.0), axis=0, keepdims=True)
            key_ref[pl.ds(s, 1), :] = (y * jnp.exp2(d_end)).astype(key_ref.dtype)
        return d

    d = jax.lax.fori_loop(0, top - base + 1, step, jnp.full(X1.shape, -jnp.inf, f))

    @pl.when(base > 0)
    def _query():
        e = jnp.exp2(D._prefix(d, last, base, D._log2_decay(g_ref, base, f)))
        xq1_ref[pl.ds(t0, rows), :] = (X1 * e).astype(xq1_ref.dtype)
        xq2_ref[pl.ds(t0, rows), :] = (X2 * e).astype(xq2_ref.dtype)


def run(interpret, N):
    rows = D.INTERPRET_ROWS if interpret else D.DIAGONAL_ROWS
    C, K = 64, 128
    rng = np.random.default_rng(0)
    X1, X2, Y = (jnp.asarray(rng.standard_normal((N, C, K)), jnp.float32) for _ in range(3))
    g = jnp.asarray(-np.logaddexp(0, -(1.5 * rng.standard_normal((N, C, K)) + 3)), jnp.float32)
    f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    launch = Launch(num_warps=D.DIAGONAL_WARPS, num_stages=1)

    def one(X, Y, g):
        return D._call(functools.partial(D._diagonal_kernel, probe=False, rows=rows), (X, Y, g),
                       [f(C, SUB), f(C, K), f(C, K)], interpret, launch, "dplr_decayed_diag",
                       grid=(C // rows,))

    def fused(X1, X2, Y, g):
        return D._call(functools.partial(fused_diag, rows=rows), (X1, X2, Y, g),
                       [f(C, SUB), f(C, SUB), f(C, K), f(C, K), f(C, K)], interpret, launch,
                       "dplr_decayed_diag2", grid=(C // rows,))

    two = jax.jit(lambda X1, X2, Y, g: (jax.vmap(one)(X1, Y, g), jax.vmap(one)(X2, Y, g)))
    both = jax.jit(jax.vmap(fused))
    a1, a2 = two(X1, X2, Y, g)
    b = both(X1, X2, Y, g)
    # compare where defined: diag entries up to t (lower triangle of each 16 block)
    t = np.arange(C)[:, None]; s = np.arange(SUB)[None, :]
    valid = (s <= t % SUB)
    err = max(float(np.max(np.abs(np.where(valid, np.asarray(a1[0]) - np.asarray(b[0]), 0)))),
              float(np.max(np.abs(np.where(valid, np.asarray(a2[0]) - np.asarray(b[1]), 0)))),
              float(np.max(np.abs(np.asarray(a1[1])[:, SUB:] - np.asarray(b[2])[:, SUB:]))),
              float(np.max(np.abs(np.asarray(a2[1])[:, SUB:] - np.asarray(b[3])[:, SUB:]))),
              float(np.max(np.abs(np.asarray(a1[2])[:, :C - SUB] - np.asarray(b[4])[:, :C - SUB]))))
    print("max abs difference fused vs two calls:", err)
    result = {"chunks": N, "max_abs_difference": err}
    if interpret:
        return result
    for name, fn in (("two_calls_ms", two), ("fused_ms", both)):
        for _ in range(3):
            jax.block_until_ready(fn(X1, X2, Y, g))
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(X1, X2, Y, g))
            ts.append(time.perf_counter() - t0)
        result[name] = 1e3 * float(np.median(ts))
        print(f"{name}: median {result[name]:.3f} ms over {N} chunks")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    interpret = jax.default_backend() == "cpu"
    result = run(interpret, 2 if interpret else 4096)
    result.update(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  command="benchmarks/shared_keys_diagonal.py " + " ".join(sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shared_keys_diagonal.json"), "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
