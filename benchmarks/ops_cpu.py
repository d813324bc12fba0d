"""Reference (token scan) vs chunked XLA on the CPU: forward and forward+backward wall time.

    python benchmarks/ops_cpu.py [--T 256 1024 4096] [--ops kda gla ...] [--out results/ops_cpu.json]

Times are medians of host-timed jitted calls (block_until_ready) after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax import ops


def make_inputs(op, B, T, H, K, V, key):
    ks = iter(jax.random.split(key, 8))
    nrm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = jax.random.normal(next(ks), (B, T, H, K))
    k = nrm(jax.random.normal(next(ks), (B, T, H, K)))
    v = jax.random.normal(next(ks), (B, T, H, V))
    g_ch = jax.nn.log_sigmoid(jax.random.normal(next(ks), (B, T, H, K)) + 3.0)
    g_sc = jax.nn.log_sigmoid(jax.random.normal(next(ks), (B, T, H)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(next(ks), (B, T, H)))
    if op == "gla":
        return (q, k, v, g_ch)
    if op == "delta_rule":
        return (q, k, v, beta)
    if op == "gated_delta_rule":
        return (q, k, v, g_sc, beta)
    if op in ("kda", "hdla"):
        return (q, k, v, g_ch, beta)
    if op == "dplr":  # rank 2, RWKV-7 style a = -kappa, b = kappa * gate
        kap = nrm(jax.random.normal(next(ks), (B, T, H, 2, K)))
        return (q, k, v, g_ch, 0.5 * kap, -0.5 * kap)
    if op == "gated_delta_product":  # n = 2
        k2 = nrm(jax.random.normal(next(ks), (B, T, H, 2, K)))
        v2 = jax.random.normal(next(ks), (B, T, H, 2, V))
        return (q, k2, v2, g_sc, jnp.stack([beta, beta], -1))
    raise ValueError(op)


def timed(fn, args, reps):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--ops", nargs="+", default=["kda", "gated_delta_rule", "gla", "dplr", "hdla",
                                                 "gated_delta_product"])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--D", type=int, default=64, help="K = V (unless --V)")
    p.add_argument("--V", type=int, default=None, help="value width (default: D)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory", action="store_true",
                   help="print XLA's compiled temp size of forward+backward instead of times")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    rows = []
    if a.memory:
        print(f"{'op':<22}{'T':>6}{'backend':>11}{'fwd+bwd temp MB':>17}")
    else:
        print(f"{'op':<22}{'T':>6}{'backend':>11}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for op in a.ops:
        fn = getattr(ops, op)
        for T in a.T:
            args = make_inputs(op, a.B, T, a.H, a.D, a.V or a.D, jax.random.key(T))
            for backend in ("reference", "xla"):
                fwd = jax.jit(lambda *x, b=backend: fn(*x, backend=b, chunk_size=a.chunk)[0])
                loss = lambda *x, b=backend: jnp.sum(fn(*x, backend=b, chunk_size=a.chunk)[0] ** 2)
                bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
                if a.memory:
                    mb = bwd.lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6
                    rows.append(dict(op=op, T=T, backend=backend, fwd_bwd_temp_mb=mb))
                    print(f"{op:<22}{T:>6}{backend:>11}{mb:>17.1f}", flush=True)
                    continue
                r = dict(op=op, T=T, backend=backend, fwd_ms=timed(fwd, args, a.reps),
                         fwd_bwd_ms=timed(bwd, args, a.reps))
                rows.append(r)
                print(f"{op:<22}{T:>6}{backend:>11}{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>12.1f}",
                      flush=True)
    meta = dict(device=str(jax.devices()[0].device_kind), cpu=platform.processor() or platform.machine(),
                cores=jax.local_device_count(), jax=jax.__version__, B=a.B, H=a.H, K=a.D, V=a.V or a.D,
                chunk=a.chunk, command="python benchmarks/ops_cpu.py " + " ".join(
                    f"--{k}" if v is True else
                    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(a).items() if k != "out" and v is not None and v is not False))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
