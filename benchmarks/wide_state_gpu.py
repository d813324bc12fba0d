"""kda at head dim K = V = 256 on a GPU: the Pallas state pass (Config max_k=None) against the
XLA-scan fallback (max_k=128, the GPU config's limit before the fourth session; phase 1 and
its Pallas products are the same in both). Prints forward and forward+backward times
(ops_gpu.time_jax) and the relative RMSE between the two.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=src python benchmarks/wide_state_gpu.py
"""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from ops_gpu import inputs, time_jax  # noqa: E402

from dplr_jax.ops.pallas import PLATFORM_CONFIGS, engine  # noqa: E402


def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))


def main(Ts=(1024, 4096), D=256):
    gpu = PLATFORM_CONFIGS["gpu"]
    for T in Ts:
        args = inputs("kda", 4, T, 16, D, D, jax.random.PRNGKey(0), jnp.bfloat16)
        do = jax.random.normal(jax.random.PRNGKey(1), (4, T, 16, D), jnp.bfloat16)
        res = {}
        for tag, cfg in (("kernel", dataclasses.replace(gpu, max_k=None)),
                         ("xla-scan", dataclasses.replace(gpu, max_k=128))):
            fn = engine.kernel("kda", cfg)

            def f(*a, fn=fn):
                return fn(*a, scale=D ** -0.5, initial_state=None, cu_seqlens=None,
                          chunk_size=64)[0].astype(jnp.bfloat16)

            def fb(do, *a, f=f):
                o, pull = jax.vjp(f, *a)
                return pull(do)

            try:
                res[tag] = (jax.jit(f)(*args), jax.jit(fb)(do, *args))
                print(tag, T, "fwd %.3f ms" % time_jax(f, args)[0],
                      "fwd+bwd %.3f ms" % time_jax(fb, (do,) + args)[0], flush=True)
            except Exception as e:  # noqa: BLE001 - report a compile failure and go on
                print(tag, "FAILED", type(e).__name__, str(e)[:400], flush=True)
        if len(res) == 2:
            print("T", T, "o rel", rel(res["kernel"][0], res["xla-scan"][0]), "grads rel",
                  [round(rel(a, b), 6) for a, b in zip(res["kernel"][1], res["xla-scan"][1])],
                  flush=True)


if __name__ == "__main__":
    main()
