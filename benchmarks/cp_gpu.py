"""Context-parallel scaling of KDA forward+backward on several GPUs, for both combine strategies.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/cp_gpu.py --out results/cp_gpu.json
    python benchmarks/cp_gpu.py --smoke --out /tmp/cp_smoke.json      # CPU, 8 virtual devices

Weak scaling: --tokens-per-device tokens (default 32K) on each of n GPUs, T = n x that;
efficiency = time(1 GPU) / time(n GPUs). Strong scaling: --strong-tokens (default 128K) split
over n GPUs; efficiency = time(1) / (n time(n)). n runs over --devices (default 1 2 4, those
that exist). One GPU runs the op itself (no context parallelism), so efficiency includes
the whole cost of sequence sharding. Also times the combine step alone (all-gather vs
ppermute) on summaries of the benchmark's size.

Shape: B = 1, H = 16, K = V = 128, q/k/v bf16, log decays and beta float32 (--H, --K, --dtype
change it). Time: median over --reps calls (each ended with block_until_ready) after
--warmup calls. Prints a table and writes JSON (command, devices, rows) to --out.
--smoke: tiny sizes on the CPU with 8 virtual devices, to check the script runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run on 8 virtual devices")
    p.add_argument("--devices", type=int, nargs="+", default=None)
    p.add_argument("--strategies", nargs="+", default=["allgather", "ppermute"])
    p.add_argument("--tokens-per-device", type=int, default=32768)
    p.add_argument("--strong-tokens", type=int, default=131072)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    if a.smoke:
        a.devices = a.devices or [1, 2, 4, 8]
        a.tokens_per_device, a.strong_tokens = 256, 1024
        a.H, a.K, a.dtype, a.chunk_size, a.backend, a.warmup, a.reps = 2, 16, "float32", 16, \
            "xla", 1, 3
    return a


def main():
    a = parse()
    if a.smoke:  # must precede JAX's initialization
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from dplr_jax import ops, parallel
    from dplr_jax.parallel.combine import CARRY

    devices = jax.devices()
    counts = [n for n in (a.devices or [1, 2, 4]) if n <= len(devices)]
    dtype = jnp.dtype(a.dtype)
    H, K = a.H, a.K

    def inputs(T, mesh):
        ks = jax.random.split(jax.random.key(T), 6)
        seq = NamedSharding(mesh, PartitionSpec(None, "seq"))

        def make(i, shape, fn, dt):
            return jax.jit(lambda: fn(jax.random.normal(ks[i], shape)).astype(dt),
                           out_shardings=seq)()

        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        q = make(0, (1, T, H, K), lambda x: x, dtype)
        k = make(1, (1, T, H, K), unit, dtype)
        v = make(2, (1, T, H, K), lambda x: x, dtype)
        g = make(3, (1, T, H, K), lambda x: jax.nn.log_sigmoid(1.5 * x + 3.0), jnp.float32)
        beta = make(4, (1, T, H), jax.nn.sigmoid, jnp.float32)
        do = make(5, (1, T, H, K), lambda x: x, dtype)
        return (q, k, v, g, beta), do

    def fwd_bwd(mesh, strategy):
        def loss(args, do):
            o, _ = parallel.context_parallel(ops.kda, *args, mesh=mesh, strategy=strategy,
                                             chunk_size=a.chunk_size, backend=a.backend)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
        return jax.jit(jax.grad(loss))

    def timed(fn, *args):
        for _ in range(a.warmup):
            jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    def mesh_of(n):
        return jax.make_mesh((n,), ("seq",), devices=devices[:n])

    rows = []

    def record(row):
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)

    for mode, tokens in (("weak", a.tokens_per_device), ("strong", a.strong_tokens)):
        for n in counts:
            T = tokens * n if mode == "weak" else tokens
            if T % n:
                continue
            mesh = mesh_of(n)
            args, do = inputs(T, mesh)
            for strategy in (a.strategies if n > 1 else ["none"]):
                try:
                    ms = timed(fwd_bwd(mesh, "allgather" if n == 1 else strategy), args, do)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one size
                    record({"mode": mode, "devices": n, "T": T, "strategy": strategy,
                            "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                record({"mode": mode, "devices": n, "T": T, "strategy": strategy, "ms": ms})

    # The combine step alone: summaries of one layer, forward + backward.
    for n in counts[1:]:
        mesh = mesh_of(n)
        spec = PartitionSpec("seq")
        shard = NamedSharding(mesh, spec)
        M = jax.device_put(jnp.zeros((n, H, K, K), jnp.float32) + 0.01 * jnp.eye(K), shard)
        B = jax.device_put(jnp.ones((n, H, K, K), jnp.float32), shard)
        for strategy in a.strategies:
            carry = jax.shard_map(functools.partial(CARRY[strategy], axis="seq"), mesh=mesh,
                                  in_specs=(spec, spec), out_specs=spec, check_vma=False)
            fn = jax.jit(jax.grad(lambda M, B, c=carry: jnp.sum(c(M, B) ** 2), argnums=(0, 1)))
            record({"mode": "combine", "devices": n, "T": 0, "strategy": strategy,
                    "ms": timed(fn, M, B)})

    one = {r["mode"]: r["ms"] for r in rows if r["devices"] == 1 and "ms" in r}
    print(f"\nKDA forward+backward, B=1 H={H} K=V={K} {a.dtype}, backend={a.backend}, "
          f"{devices[0].device_kind} x {len(devices)}")
    print(f"{'mode':7s} {'GPUs':>4s} {'T':>8s} {'strategy':10s} {'ms':>10s} {'efficiency':>10s}")
    for r in rows:
        eff = ""
        if "ms" in r and r["mode"] in one:  # weak: t1 / tn; strong: t1 / (n tn)
            r["efficiency"] = one[r["mode"]] / r["ms"] / (r["devices"] if r["mode"] == "strong"
                                                          else 1)
            eff = f"{100 * r['efficiency']:9.1f}%"
        ms = f"{r['ms']:10.3f}" if "ms" in r else f"{'error':>10s}"
        print(f"{r['mode']:7s} {r['devices']:4d} {r['T']:8d} {r['strategy']:10s} {ms} {eff}")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                   "jax": jax.__version__, "host": platform.node(),
                   "devices": [d.device_kind for d in devices], "args": vars(a), "rows": rows},
                  f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
