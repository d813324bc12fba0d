"""Where the GPU time of an op goes: device kernels of one jitted call, grouped and summed.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/profile_gpu.py \
        [--ops kda gated_delta_rule gla] [--backends pallas xla fla] [--T 4096] \
        [--chunk 64] [--bound -5 | --strong] [--out FILE.json]

For every (op, backend, mode in fwd / fwd+bwd) at B=4, H=16, K=V=128, bf16 (float32 log
decays; the inputs of ops_gpu.py; --bound: the per-channel-decay ops with decays clipped
to >= the bound, passed as log_decay_lower_bound; --strong: decays x10 with 2% hard resets,
which send the per-channel-decay ops' products to their exact kernels), runs the jitted call
`--calls` times under jax.profiler.trace, reads the trace back with jax.profiler.ProfileData
and sums the durations of the events on the GPU planes by kernel name (per call). Prints the
top kernels with their share and writes everything as JSON (after every case). The second
grouping, by the events' `hlo_op`, is coarse on GPUs: XLA launches most kernels from command
buffers, whose names it reports.

Backend "fla" profiles flash-linear-attention's op on the same inputs (fla-core on
PYTHONPATH, as for ops_gpu.py; kda, gla, dplr, and gated_delta_rule forward only: its
backward refuses Triton 3.6 on Hopper) under torch.profiler, after a warm-up call that runs
its autotuning (chunk_kda plain, also with --bound), and sums its CUDA kernels by name the
same way: FLA's phases beside ours. Its autotuning takes minutes per op and mode.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

sys.path.insert(0, os.path.dirname(__file__))
from ops_gpu import BOUNDED, B, H, K, V, inputs, jax_op_fns  # noqa: E402


def kernel_times(fn, args, calls, hlo_path=None):
    """({kernel name: ms per call}, {hlo op: ms per call}) of jit(fn)(*args) on the GPU, from a
    profiler trace; hlo_path: where to write the optimized HLO (to read fusions back)."""
    compiled = jax.jit(fn).lower(*args).compile()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    fn = compiled
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    totals, by_hlo = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                ms = ev.duration_ns / 1e6 / calls
                totals[ev.name] += ms
                by_hlo[str(dict(ev.stats).get("hlo_op", "?"))] += ms
    return dict(totals), dict(by_hlo)


def fla_kernel_times(op, args, do, mode, calls):
    """kernel_times for FLA's op (fla_call) in `mode` on the inputs `args` (jax arrays), by
    torch.profiler; the second dict is empty (no HLO ops). None where FLA has no such call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    call = fla_call(op, args, do, mode)
    if call is None:
        return None
    call()  # autotuning
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.time_range.elapsed_us() / 1e3 / calls
    return dict(totals), {}


def fla_call(op, args, do, mode):
    """A function running FLA's counterpart of op on args (converted to torch; its a and b
    mapped as in ops_gpu.fla_errors) forward, or forward and backward with the cotangent
    do; None where FLA has none."""
    import torch
    from fla.ops import chunk_dplr_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_kda

    if op not in ("kda", "gla", "dplr", "gated_delta_rule") or (
            op == "gated_delta_rule" and mode == "fwd+bwd"):
        return None

    def tensor(x):
        dt = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
        return torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=dt,
                            requires_grad=mode == "fwd+bwd")

    xs = [tensor(x) for x in args]
    if op == "dplr":  # FLA's Diag(e^g) + b a^T: its a is dplr_jax's b, its b minus a
        q, k, v, g, a, b = xs
        xs, fn = (q, k, v, b, (-a).detach().requires_grad_(mode == "fwd+bwd"), g), \
            chunk_dplr_delta_rule
    else:
        fn = {"kda": chunk_kda, "gla": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}[op]
    do = torch.tensor(np.asarray(do, np.float32), device="cuda", dtype=torch.bfloat16)

    def call():
        for x in xs:
            x.grad = None
        o = fn(*xs)[0]
        if mode == "fwd+bwd":
            o.backward(do)

    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=["kda", "gated_delta_rule", "gla"])
    p.add_argument("--backends", nargs="+", default=["pallas"])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--bound", type=float)
    p.add_argument("--strong", action="store_true", help="decays x10, 2%% of them -1000")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out")
    p.add_argument("--hlo-dir", help="write each case's optimized HLO here")
    a = p.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv), "cases": []}
    key = jax.random.PRNGKey(0)
    for op in a.ops:
        bound = a.bound if op in BOUNDED else None
        args = inputs(op, B, a.T, H, K, V, key, jnp.bfloat16, strong=a.strong, bound=bound)
        do = jax.random.normal(key, (B, a.T, H, V), jnp.bfloat16)
        for backend in a.backends:
            # (FLA's calls are built by fla_call; jax_op_fns is dplr_jax's backends only)
            fwd, fwd_bwd = (None, None) if backend == "fla" else jax_op_fns(op, backend, bound,
                                                                            a.chunk)
            for mode, fn, fargs in (("fwd", fwd, args), ("fwd+bwd", fwd_bwd, (do,) + args)):
                if backend == "fla":
                    got = fla_kernel_times(op, args, do, mode, a.calls)
                    if got is None:
                        continue
                    t, by_hlo = got
                else:
                    hlo = None
                    if a.hlo_dir:
                        os.makedirs(a.hlo_dir, exist_ok=True)
                        hlo = os.path.join(a.hlo_dir,
                                           f"{op}_{backend}_{mode.replace('+', '_')}.hlo.txt")
                    t, by_hlo = kernel_times(fn, fargs, a.calls, hlo)
                total = sum(t.values())
                print(f"\n== {op} {backend} {mode}: {total:.3f} ms of kernels per call "
                      f"({len(t)} distinct kernels)")
                for name, ms in sorted(t.items(), key=lambda kv: -kv[1])[:a.top]:
                    print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:110]}")
                if by_hlo:
                    print("  by HLO op:")
                for name, ms in sorted(by_hlo.items(), key=lambda kv: -kv[1])[:a.top]:
                    print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:110]}")
                res["cases"].append({"op": op, "backend": backend, "mode": mode, "T": a.T,
                                     "chunk": a.chunk, "bound": bound, "strong": a.strong,
                                     "total_ms": total, "kernels_ms": t, "hlo_ops_ms": by_hlo})
                if a.out:  # after every case: a call stopped by a time limit keeps what it had
                    with open(a.out, "w") as f:
                        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
