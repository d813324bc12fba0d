"""One Pallas kernel of an op, lowered by JAX and launched alone through the `triton` package on
torch tensors, so that Nsight Compute can profile it (ncu ends JAX processes with a
segmentation fault here: benchmarks/NOTES.md, sixth and ninth sessions).

    PYTHONPATH=src python benchmarks/ncu_kernel.py --op kda --kernel dplr_decayed_fwd
    JAX_PLATFORMS=cpu ncu --clock-control none -k regex:dplr_decayed_fwd -c 1 --set full \\
        -o OUT/dec python benchmarks/ncu_kernel.py --op kda --kernel dplr_decayed_fwd --calls 1
    ncu -i OUT/dec.ncu-rep --page details; ncu -i OUT/dec.ncu-rep --page source --csv \\
        --print-source sass     # per-instruction counts and stall reasons

JAX_PLATFORMS=cpu keeps JAX off the GPU, so the profiled process is torch and Triton alone
(how the tenth session profiled the decayed products on the H100: benchmarks/NOTES.md).

Lowers the op's forward+backward for "cuda" at B=4, T=4096, H=16, K=V=128, bf16 (the shape of
ops_gpu.py; on the CPU as kernel_registers.py does), keeps the named kernel's Triton IR, its
grid and its operands' shapes, compiles the IR for the GPU at its configured launch (or
--warps / --stages; for the state pass, state_pass.fit_launches may lower the stages of the
configured one for a shape) and launches it on random operands. Prints its median time
(triton.testing.do_bench): compare with the same kernel's time in profile_gpu.py, since the
`triton` package here is not the Triton that XLA bundles. The values are random (log decays
drawn <= 0), so only the timing and the profile mean anything. Without a GPU it stops after
compiling. The pip Triton pipelines differently: the state pass's forward at its committed 2
stages asks it for 304 KB of shared memory (XLA's Triton runs it), so time that one with
--stages 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import kernel_registers as kr  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="kda")
    ap.add_argument("--kernel", default="dplr_decayed_fwd",
                    help="name as in profile_gpu.py; a repeated one takes #2, #3, ...")
    ap.add_argument("--warps", type=int, help="default: the committed launch")
    ap.add_argument("--stages", type=int, help="default: the committed launch")
    ap.add_argument("--calls", type=int, default=3, help="launches after the timing")
    ap.add_argument("--bounded", action="store_true",
                    help="the op with log_decay_lower_bound: the products' bounded kernels "
                         "ungated (without it a gated kernel's int32 flags are 0: the exact "
                         "kernels run, the bounded ones return at once)")
    a = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    kernels = kr.kernel_irs(a.op, B=4, T=4096, H=16, bounded=a.bounded)
    if a.kernel not in kernels:
        sys.exit(f"{a.op} has no kernel {a.kernel!r}; it has {sorted(kernels)}")
    k = kernels[a.kernel]
    launch = kr.launch_of(a.kernel)
    warps = a.warps or launch.num_warps
    stages = a.stages or launch.num_stages
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(k.ir)
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    print(f"{a.op} {a.kernel}: grid {k.grid}, {warps} warps, {stages} stages, "
          f"{compiled.metadata.shared / 1024:.0f} KB shared; operands "
          + ", ".join(f"{dt}{list(s)}" for s, dt in k.operands), flush=True)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("no GPU: compiled only")
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int32": torch.int32}
    operands = []
    for shape, dt in k.operands:
        if dt == "int32":  # the state pass's src and dst: chunk 0 of each row uses state 0
            # (and the products' gate flags [..., 1]: 0, the exact kernels)
            x = torch.full(shape, -1, dtype=torch.int32, device="cuda")
            x[..., 0] = 0
        else:  # every operand <= 0: log decays stay decays (the timing ignores the values)
            x = -0.1 * torch.rand(shape, generator=gen, device="cuda", dtype=torch.float32)
        operands.append(x.to(dtypes[dt]))
    grid = tuple(k.grid) + (1,) * (3 - len(k.grid))
    run = lambda: compiled[grid](*operands)
    ms = triton.testing.do_bench(run, warmup=25, rep=200)
    print(f"median {ms:.3f} ms per launch", flush=True)
    for _ in range(a.calls):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
