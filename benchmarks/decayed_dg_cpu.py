"""Float32 accuracy of the decayed products' log-decay gradient when every decay is strong (CPU).

    python benchmarks/decayed_dg_cpu.py [--out FILE.json]

One chunk (C=64, K=32, X, Y standard normal, every log decay g, a random cotangent):
relative RMSE of D, dX, dY and dg in float32 against the XLA exact path in
float64, for the Pallas kernel (interpret mode; exact and bounded backward) and the XLA
bounded path. Prints a table and writes JSON (benchmarks/NOTES.md quotes it).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax.ops import chunked
from dplr_jax.ops.pallas import decayed
from dplr_jax.ops.pallas.state_pass import Launch

KERNEL = functools.partial(decayed.decayed_products, interpret=True,
                           precision=jax.lax.Precision.HIGHEST,
                           exact=jax.lax.Precision.HIGHEST, launch=(Launch(), Launch()))
IMPLS = {"pallas": (KERNEL, False), "pallas bounded": (KERNEL, True),
         "xla bounded": (chunked.decayed_products, True)}


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.sum((x - ref) ** 2) / np.sum(ref ** 2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    C, K = 64, 32
    rows = []
    print(f"{'g':>5} {'impl':>15} {'D':>9} {'dX':>9} {'dY':>9} {'dg':>9}")
    for g_value in (-1.0, -3.0, -5.0):
        X, Y = rng.standard_normal((C, 1, K)), rng.standard_normal((C, 1, K))
        g = np.full((C, K), g_value)
        ct = rng.standard_normal((C, 1, C, 1))

        def value_and_grads(fn, dtype):
            xs = [jnp.asarray(x, dtype) for x in (X, Y, g)]
            out, pull = jax.vjp(fn, *xs)
            return (out,) + pull(jnp.asarray(ct, dtype))

        ref = value_and_grads(chunked.decayed_products, jnp.float64)
        for impl, (fn, bounded) in IMPLS.items():
            got = value_and_grads(lambda *x: fn(*x, bounded), jnp.float32)
            errs = dict(zip(("D", "dX", "dY", "dg"), (rel(u, v) for u, v in zip(got, ref))))
            rows.append(dict(g=g_value, impl=impl, **errs))
            print(f"{g_value:5.1f} {impl:>15} " + " ".join(
                f"{errs[n]:9.1e}" for n in ("D", "dX", "dY", "dg")))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=dict(jax=jax.__version__, device=platform.processor() or "cpu",
                                     command="python benchmarks/decayed_dg_cpu.py"),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
