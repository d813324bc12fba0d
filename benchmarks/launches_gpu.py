"""Launch variants of the Pallas kernels, timed through whole ops: the phase-1 factors kernels
(columns per program, warps; against XLA's phase 1), the state pass (Triton pipelining
stages of the sequential forward and backward kernels), its parallel gradient kernel (value
columns per pass, warps, stages) or the decayed products of per-channel decays (warps of the
forward and backward kernels), or of scalar decays and none (warps and stages of both).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=src python benchmarks/launches_gpu.py \
        [--kernels factors state_pass grads products scalar_products] \
        [--ops kda gated_delta_rule] [--out DIR]

For each op at B=4, T=4096, H=16, K=V=128, bf16 (the inputs of ops_gpu.py), times forward and
forward+backward of the GPU configuration with each variant swapped in. Prints a table and
writes launches_gpu.json. A variant that does not compile (shared memory) prints its error
and is recorded with it. The state pass lowers the stages where they would not fit
(state_pass.fit_launches), so its variants differ only where they fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import ops_gpu as og  # noqa: E402
from dplr_jax.ops import backends  # noqa: E402
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, engine, factors  # noqa: E402
from dplr_jax.ops.pallas.state_pass import Launch  # noqa: E402

# factors: name -> (columns per program, forward (warps, stages), backward (warps, stages))
FACTORS = {"64 columns, 4 warps / 4 warps": (64, (4, 1), (4, 1)),
           "64 columns, 8 / 8": (64, (8, 1), (8, 1)), "64 columns, 2 / 2": (64, (2, 1), (2, 1)),
           "32 columns, 4 / 4": (32, (4, 1), (4, 1)), "32 columns, 2 / 2": (32, (2, 1), (2, 1)),
           "128 columns, 8 / 8": (128, (8, 1), (8, 1))}
# state_pass: name -> (forward stages, backward stages, value columns per program)
STATE_PASS = {"stages 1 / 1": (1, 1, 64), "stages 2 / 1": (2, 1, 64),
              "stages 2 / 2": (2, 2, 64), "stages 2 / 2, 32 columns": (2, 2, 32),
              "stages 3 / 3, 32 columns": (3, 3, 32)}
# grads: name -> (value columns per pass, warps, stages)
GRADS = {"grads 64 columns, 4 warps, 2 stages": (64, 4, 2), "grads 64, 8, 2": (64, 8, 2),
         "grads 64, 4, 1": (64, 4, 1), "grads 64, 4, 3": (64, 4, 3), "grads 32, 4, 2": (32, 4, 2),
         "grads 32, 2, 2": (32, 2, 2), "grads 128, 4, 2": (128, 4, 2),
         "grads 128, 8, 2": (128, 8, 2)}
# products (per-channel decays): name -> (forward warps, backward warps)
PRODUCTS = {"warps 2 / 4": (2, 4), "warps 4 / 4": (4, 4), "warps 2 / 8": (2, 8),
            "warps 4 / 8": (4, 8)}
# scalar_products: name -> (forward (warps, stages), backward (warps, stages))
SCALAR_PRODUCTS = {"warps 4 / 4": ((4, 1), (4, 1)), "warps 8 / 8": ((8, 1), (8, 1)),
                   "warps 2 / 2": ((2, 1), (2, 1)), "warps 8 / 4": ((8, 1), (4, 1)),
                   "warps 4 / 8": ((4, 1), (8, 1)), "warps 4 / 4, stages 2 / 2": ((4, 2), (4, 2))}


BLOCK = factors.BLOCK  # the committed columns per factors program (the variants set their own)


def variants(kernels):
    """name -> (factors.BLOCK, Config) for the families asked for."""
    gpu = PLATFORM_CONFIGS["gpu"]
    out = {}
    if "factors" in kernels:
        out["XLA phase 1 (factors=None)"] = BLOCK, dataclasses.replace(gpu, factors=None)
        for name, (block, f, b) in FACTORS.items():
            out[name] = block, dataclasses.replace(gpu, factors=(Launch(None, *f),
                                                                  Launch(None, *b)))
    if "state_pass" in kernels:
        for name, (f, b, bv) in STATE_PASS.items():
            out["state pass " + name] = BLOCK, dataclasses.replace(
                gpu, fwd=dataclasses.replace(gpu.fwd, num_stages=f, block_v=bv),
                bwd=dataclasses.replace(gpu.bwd, num_stages=b, block_v=bv))
    if "grads" in kernels:
        for name, launch in GRADS.items():
            out[name] = BLOCK, dataclasses.replace(gpu, grads=Launch(*launch))
    if "products" in kernels:
        for name, (f, b) in PRODUCTS.items():
            out["products " + name] = BLOCK, dataclasses.replace(
                gpu, products=(Launch(None, f, 1), Launch(None, b, 1)))
    if "scalar_products" in kernels:
        for name, (f, b) in SCALAR_PRODUCTS.items():
            out["scalar products " + name] = BLOCK, dataclasses.replace(
                gpu, scalar_products=(Launch(None, *f), Launch(None, *b)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+",
                    choices=("factors", "state_pass", "grads", "products", "scalar_products"),
                    default=["factors"])
    ap.add_argument("--ops", nargs="+", default=["kda", "gated_delta_rule"])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv), "rows": []}
    key = jax.random.PRNGKey(a.T)
    print("| op | variant | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for op in a.ops:
        args = og.inputs(op, og.B, a.T, og.H, og.K, og.V, key, jnp.bfloat16)
        do = jax.random.normal(key, (og.B, a.T, og.H, og.V), jnp.bfloat16)
        for name, (block, cfg) in variants(a.kernels).items():
            factors.BLOCK = block  # read when the kernels are traced
            # the variant stands in for the GPU kernel, so the public op maps its inputs
            backends.register(op, "gpu", engine.kernel(op, cfg))
            fwd, fwd_bwd = og.jax_op_fns(op, "pallas")
            row = dict(op=op, variant=name)
            try:
                row.update(fwd_ms=og.time_jax(fwd, args)[0],
                           fwd_bwd_ms=og.time_jax(fwd_bwd, (do,) + args)[0])
            except Exception as e:  # noqa: BLE001 - a launch that does not fit is a result
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            res["rows"].append(row)
            times = (f"{row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f}" if "error" not in row
                     else f"{row['error'][:120]} | -")
            print(f"| {op} | {name} | {times} |", flush=True)
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "launches_gpu.json"), "w") as f:
                json.dump(res, f, indent=1)
        factors.BLOCK = BLOCK
        backends.register(op, "gpu", engine.kernel(op, PLATFORM_CONFIGS["gpu"]))


if __name__ == "__main__":
    main()
