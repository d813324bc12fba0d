"""What storing phase 1's factored transitions in bfloat16 would cost in accuracy (CPU).

    JAX_PLATFORMS=cpu PYTHONPATH=src python benchmarks/factor_rounding.py [--T 300 1200] \
        [--ops delta_rule gated_delta_rule kda gla] [--out benchmarks/results/x.json]

The Pallas state pass reads, per chunk, the factors (gamma, Z, W, X, Qs, O0 or QF) of
chunked.chunk_factors in float32, and its backward writes their cotangents in float32: at
C=64, K=V=128 that interface is ~half of the state pass's bytes. Rounding it to bfloat16
halves them (the thirteenth session measured -6% for kda's forward+backward on the H100 with
all of them rounded, benchmarks/NOTES.md). This script measures the accuracy side without a
GPU: backend="xla" on bf16 inputs, with chunk_factors wrapped so that the chosen factors, and
their cotangents, are rounded to bfloat16 (what kernels storing them would do), against the
float64 reference on the same (bf16-valued) inputs and cotangents. Relative RMSE of o, the
final state and every gradient, B=2, H=2, K=V=64, chunk 64, per subset of rounded factors.
DESIGN.md's bf16 tolerances: o and final state 5e-3, dq/dk/dv/dh0 8e-3, gate gradients 2e-2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _ops_inputs import call_vjp, cast, make_inputs, make_state, rel_rmse  # noqa: E402

from dplr_jax.ops import api, chunked  # noqa: E402

FACTORS = ("gamma", "Z", "W", "X", "Qs", "O0", "QF")
SUBSETS = ((), ("Qs", "O0", "QF"), ("W",), ("X",), ("Z",), ("Z", "W", "X", "Qs", "O0", "QF"))


@jax.custom_vjp
def _round(x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


_round.defvjp(lambda x: (_round(x), None),
              lambda _, ct: (ct.astype(jnp.bfloat16).astype(ct.dtype),))


def rounded(which):
    """chunked.chunk_factors with the factors named in `which` (and their cotangents) rounded."""
    exact = chunked.chunk_factors

    def chunk_factors(*args, **kwargs):
        out = exact(*args, **kwargs)
        return tuple(x if x is None or n not in which else _round(x)
                     for n, x in zip(FACTORS, out))

    return chunk_factors


def errors(name, T, which, seed=0):
    rng = np.random.default_rng(seed)
    args = cast(make_inputs(name, rng, B=2, T=T, H=2, K=64, V=64), jnp.bfloat16)
    h0 = make_state(args, rng)
    o_shape = args[2].shape[:3] + (args[2].shape[-1],)
    do = np.asarray(cast(rng.standard_normal(o_shape), jnp.bfloat16), np.float64)
    dS = rng.standard_normal(h0.shape)
    ref = call_vjp(name, cast(args, jnp.float64), cast(h0, jnp.float64),
                   *cast((do, dS), jnp.float64), backend="reference")
    exact = chunked.chunk_factors
    chunked.chunk_factors = rounded(which)  # chunk_summary looks it up at call time
    try:
        got = call_vjp(name, args, cast(h0, jnp.float32), cast(do, jnp.bfloat16),
                       cast(dS, jnp.float32), backend="xla", chunk_size=64)
    finally:
        chunked.chunk_factors = exact
    res = {"o": rel_rmse(got[0], ref[0]), "S": rel_rmse(got[1], ref[1])}
    names = ("q", "k", "v") + api.SPECS[name].gates
    for n, d, r in zip(names, got[2], ref[2]):
        res["d" + n] = rel_rmse(d, r)
    res["dh0"] = rel_rmse(got[3], ref[3])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[300, 1200])
    p.add_argument("--ops", nargs="+", default=["delta_rule", "gated_delta_rule", "kda", "gla"])
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    print("| op | T | rounded | o | final state | worst gradient |")
    print("|---|---|---|---|---|---|")
    for name in a.ops:
        for T in a.T:
            for which in SUBSETS:
                e = errors(name, T, which)
                grads = {k: v for k, v in e.items() if k.startswith("d")}
                worst = max(grads, key=grads.get)
                rows.append({"op": name, "T": T, "rounded": list(which), "errors": e})
                print(f"| {name} | {T} | {', '.join(which) or 'none'} | {e['o']:.2e} | "
                      f"{e['S']:.2e} | {worst} {grads[worst]:.2e} |", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"jax": jax.__version__, "command": " ".join(sys.argv), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
