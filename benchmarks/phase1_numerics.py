"""Cost of exact decay exponents in XLA's phase 1 on a GPU: three versions of chunk_summary.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/phase1_numerics.py --out results/x.json

Versions: "differences" (commit 6b9e5c5: pairwise exponents as differences of cumulative
sums, inexact after hard resets), "masked_cumsum" (commit dfce8e5: a cumulative sum of masked
decays), "matmul_sums" (the working tree: a 0/1 matrix product at full precision). The two
older ones are read with `git show` (run from a git checkout; --sources DIR takes the two
files from DIR instead, as chunked_<version>.py, for a machine without git). Each is swapped
in for chunked.chunk_summary and timed through backend="xla" (phase 1 and XLA's scan over
chunks; the first run went through backend="pallas", whose phase 1 was chunk_summary then
but has been chunk_factors and the factors kernels since, so swapping chunk_summary would
not change it), kda and gated_delta_rule, B=4 T=4096 H=16 K=V=128 bf16: medians of
host-timed jitted calls (block_until_ready) after a warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp

from dplr_jax import ops
from dplr_jax.ops import chunked

OLD = {"differences": "6b9e5c5", "masked_cumsum": "dfce8e5"}


def load_version(name, commit, sources):
    path = os.path.join(sources, f"chunked_{name}.py") if sources else None
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), f"chunked_{name}.py")
        with open(path, "w") as f:
            f.write(subprocess.check_output(["git", "show", f"{commit}:src/dplr_jax/ops/chunked.py"],
                                            text=True))
    spec = importlib.util.spec_from_file_location(f"chunked_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chunk_summary


def timed(f, args, n):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sources", default=None)
    p.add_argument("--T", type=int, default=4096)
    a = p.parse_args()
    versions = {name: load_version(name, c, a.sources) for name, c in OLD.items()}
    versions["matmul_sums"] = chunked.chunk_summary
    B, H, K = 4, 16, 128
    ks = jax.random.split(jax.random.key(0), 6)
    bf = jnp.bfloat16
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = jax.random.normal(ks[0], (B, a.T, H, K), bf)
    k = unit(jax.random.normal(ks[1], (B, a.T, H, K))).astype(bf)
    v = jax.random.normal(ks[2], (B, a.T, H, K), bf)
    g_ch = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[3], (B, a.T, H, K)) + 3.0)
    g_sc = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[4], (B, a.T, H)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, a.T, H))).astype(bf)
    cases = {"kda": (q, k, v, g_ch, beta), "gated_delta_rule": (q, k, v, g_sc, beta)}
    rows = []
    print(f"{'version':<16}{'op':<18}{'fwd ms':>9}{'fwd+bwd ms':>12}")
    for version, fn in versions.items():
        # chunked.chunked looks it up at call time; every version keeps its decayed products in
        # XLA.
        chunked.chunk_summary = lambda *x, decayed=None, fn=fn: fn(*x)
        for op, args in cases.items():
            f = getattr(ops, op)
            fwd = jax.jit(lambda *x, f=f: f(*x, backend="xla")[0])
            loss = lambda *x, f=f: jnp.sum(f(*x, backend="xla")[0].astype(jnp.float32) ** 2)
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
            r = dict(version=version, op=op, fwd_ms=timed(fwd, args, 10),
                     fwd_bwd_ms=timed(fb, args, 5))
            rows.append(r)
            print(f"{version:<16}{op:<18}{r['fwd_ms']:>9.2f}{r['fwd_bwd_ms']:>12.2f}", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                command="python benchmarks/phase1_numerics.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(a).items() if v is not None))
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
