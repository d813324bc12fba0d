"""Registers, spills and shared memory of the Pallas GPU kernels, and the occupancy they allow,
measured without a GPU.

    pip install triton==3.6.0     # not a dependency of the project: this script only
    PYTHONPATH=src python benchmarks/kernel_registers.py [--ops kda gated_delta_rule] \
        [--warps 1 2 4 8] [--chunk 64] [--bounded] \
        [--out benchmarks/results/kernel_registers.json] [--ttgir DIR] [--sass DIR]

Lowers each op's forward+backward for "cuda" on the CPU (abstract H100 mesh, as the lowering
tests do, at K = V = 128, chunk 64 or --chunk, bf16; --bounded: with log_decay_lower_bound's
kernels) and keeps the Triton IR of every Pallas
kernel (by wrapping Pallas' private `lower_jaxpr_to_triton_module`, so this may need updating with JAX).
Each kernel is then compiled by the `triton` package to PTX for sm_90 at several warp counts,
and ptxas -v (shipped in the triton wheel) reports registers per thread, spill bytes and the
stack frame. From registers and shared memory follow the programs (CTAs) an H100 SM holds: 64K
registers (allocated per warp in units of 256), 228 KB of shared memory, at most 32 programs
and 64 warps. The committed launch of each kernel (PLATFORM_CONFIGS["gpu"]) is marked.

XLA compiles the kernels with the Triton it bundles, not this one: the numbers are those of
the same IR through Triton 3.6, close but not necessarily equal to what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.mesh import AbstractDevice
from jax._src.pallas.triton import pallas_call_registration
from jax.sharding import AbstractMesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _ops_inputs import cast, make_inputs  # noqa: E402
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, decayed, engine, factors  # noqa: E402
from dplr_jax.ops.pallas.state_pass import Launch  # noqa: E402

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


class Kernel(NamedTuple):
    """One Pallas kernel as lowered: its Triton IR, the 3-D launch grid and the (shape, dtype)
    of every operand in call order (inputs, then outputs)."""

    ir: str
    grid: tuple
    operands: list


def kernel_irs(op, B=1, T=256, H=2, chunk=64, bounded=False):
    """{kernel name: Kernel} of op's forward+backward at K = V = 128 (one entry per distinct
    name; a repeated name, e.g. kda's two decayed products, gets a suffix). The IR holds the
    operands' strides, so it launches only on arrays of the shapes recorded with it. bounded:
    the kernels of log_decay_lower_bound's path."""
    lowering = pallas_call_registration.lowering
    original, irs = lowering.lower_jaxpr_to_triton_module, {}

    def capture(jaxpr, grid_mapping, *args, **kwargs):
        result = original(jaxpr, grid_mapping, *args, **kwargs)
        name = jaxpr.debug_info.func_name
        key = name if name not in irs else f"{name}#{sum(k.startswith(name) for k in irs) + 1}"
        operands = [(tuple(bm.array_aval.shape), str(bm.array_aval.dtype))
                    for bm in grid_mapping.block_mappings]
        irs[key] = Kernel(result.module.operation.get_asm(), tuple(result.grid), operands)
        return result

    args = cast(make_inputs(op, np.random.default_rng(0), B=B, T=T, H=H, K=128, V=128),
                jnp.bfloat16)
    fn = engine.kernel(op, PLATFORM_CONFIGS["gpu"])

    def loss(*a):
        o, S = fn(*a, scale=128 ** -0.5, initial_state=None, cu_seqlens=None, chunk_size=chunk,
                  bounded=bounded)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
            jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower(
                lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return irs


def launch_of(name):
    """The committed Launch of kernel `name` (PLATFORM_CONFIGS["gpu"])."""
    cfg = PLATFORM_CONFIGS["gpu"]
    launches = {"dplr_decayed_fwd": cfg.products[0], "dplr_decayed_bwd": cfg.products[1],
                "dplr_decayed_scalar_fwd": cfg.scalar_products[0],
                "dplr_decayed_scalar_bwd": cfg.scalar_products[1],
                "dplr_factors_fwd": cfg.factors[0], "dplr_factors_bwd": cfg.factors[1],
                "dplr_ut_inverse": Launch(num_warps=factors.INVERSE_WARPS, num_stages=1),
                "dplr_decayed_diag": Launch(num_warps=decayed.DIAGONAL_WARPS, num_stages=1),
                "dplr_decayed_diag_bwd": Launch(num_warps=decayed.DIAGONAL_WARPS, num_stages=1),
                "dplr_state_pass_fwd": cfg.fwd, "dplr_state_pass_bwd": cfg.bwd,
                "dplr_state_pass_grads": cfg.grads}
    return launches[name.split("#")[0]]


def resident(regs, smem, warps):
    """(programs, warps) one H100 SM holds at these registers per thread and shared bytes."""
    per_warp = -(-regs * 32 // 256) * 256
    programs = min(65536 // (per_warp * warps), 32, 64 // warps,
                   233472 // smem if smem else 32)
    return programs, programs * warps


_SASS_LINE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def loop_bodies(sass):
    """The loops of nvdisasm's SASS (a backward branch to a label): per loop, its static
    instruction count and opcode mix (opcodes without modifiers). A fori_loop of a kernel is
    one such body per unrolled copy, so the count is the SASS one step executes per warp."""
    ins, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ins)
        m = _SASS_LINE.match(line)
        if m:
            ins.append((m.group(1).split(".")[0], m.group(2)))
    for i, (op, rest) in enumerate(ins):
        target = re.search(r"\.(L_x_\d+)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) < i:
            body = [o for o, _ in ins[labels[target.group(1)]:i + 1]]
            mix = sorted(((body.count(o), o) for o in set(body)), reverse=True)
            loops.append({"instructions": len(body), "opcodes": {o: n for n, o in mix}})
    return loops


def compile_stats(ir_text, warps, ttgir_path=None, sass_path=None):
    """ptxas -v's numbers for one kernel at `warps`; ttgir_path: also write Triton's GPU IR
    (the layouts, reductions and relayouts the kernel compiles to) there; sass_path: also
    write the SASS (nvdisasm, shipped in the triton wheel) there and add its loops' opcode
    mix (loop_bodies)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 1})
        if ttgir_path:
            with open(ttgir_path, "w") as f:
                f.write(k.asm["ttgir"])
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "ptxas")
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        extra = {}
        if sass_path:
            cubin = os.path.join(d, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c",
                                   cubin], capture_output=True, text=True, check=True).stdout
            with open(sass_path, "w") as f:
                f.write(sass)
            extra["loops"] = loop_bodies(sass)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                log).groups())
    smem = int(k.metadata.shared)
    programs, resident_warps = resident(regs, smem, warps)
    return {"registers": regs, "spill_store_bytes": st, "spill_load_bytes": ld,
            "shared_bytes": smem, "programs_per_sm": programs, "warps_per_sm": resident_warps,
            **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", nargs="+", default=["kda", "gated_delta_rule", "gla"])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--bounded", action="store_true",
                    help="the kernels of the bounded path (log_decay_lower_bound)")
    ap.add_argument("--out", default="benchmarks/results/kernel_registers.json")
    ap.add_argument("--ttgir", metavar="DIR",
                    help="also write each kernel's Triton GPU IR to DIR/<op>_<kernel>_w<warps>")
    ap.add_argument("--sass", metavar="DIR",
                    help="also write each kernel's SASS to DIR/<op>_<kernel>_w<warps>.sass and "
                         "print its loops' instruction counts and opcode mix")
    a = ap.parse_args()
    import triton

    for d in (a.ttgir, a.sass):
        if d:
            os.makedirs(d, exist_ok=True)
    rows = []
    print("| op | kernel | warps | registers | spill st/ld B | shared KB | programs/SM | "
          "warps/SM |")
    print("|---|---|---|---|---|---|---|---|")
    for op in a.ops:
        for name, kernel in kernel_irs(op, chunk=a.chunk, bounded=a.bounded).items():
            for w in a.warps:
                tag = f"{op}_{name.replace('#', '_')}_w{w}"
                s = compile_stats(kernel.ir, w, a.ttgir and os.path.join(a.ttgir, tag + ".ttgir"),
                                  a.sass and os.path.join(a.sass, tag + ".sass"))
                mark = " (committed)" if w == launch_of(name).num_warps else ""
                rows.append({"op": op, "kernel": name, "num_warps": w,
                             "committed": bool(mark), **s})
                print(f"| {op} | {name} | {w}{mark} | {s['registers']} | "
                      f"{s['spill_store_bytes']}/{s['spill_load_bytes']} | "
                      f"{s['shared_bytes'] / 1024:.0f} | {s['programs_per_sm']} | "
                      f"{s['warps_per_sm']} |", flush=True)
                for loop in s.get("loops", []):
                    mix = ", ".join(f"{o} {n}" for o, n in list(loop["opcodes"].items())[:8])
                    print(f"| | loop of {loop['instructions']} SASS instructions: {mix} "
                          "| | | | | | |")
    meta = {"jax": jax.__version__, "triton": triton.__version__, "target": "sm_90a",
            "chunk": a.chunk, "bounded": a.bounded,
            "command": "python " + " ".join(sys.argv)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
