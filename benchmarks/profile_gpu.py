"""Where the GPU time of an op goes: device kernels of one jitted call, grouped and summed.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/profile_gpu.py \
        [--ops kda gated_delta_rule gla] [--backends pallas] [--T 4096] [--chunk 64] \
        [--bound -5 | --strong] [--out FILE.json]

For every (op, backend, mode in fwd / fwd+bwd) at B=4, H=16, K=V=128, bf16 (float32 log
decays; the inputs of ops_gpu.py; --bound: the per-channel-decay ops with decays clipped
to >= the bound, passed as log_decay_lower_bound; --strong: decays x10 with 2% hard resets,
which send the per-channel-decay ops' products to their exact kernels), runs the jitted call
`--calls` times under jax.profiler.trace, reads the trace back with jax.profiler.ProfileData
and sums the durations of the events on the GPU planes by kernel name (per call). Prints the
top kernels with their share and writes everything as JSON. The second grouping, by the
events' `hlo_op`, is coarse on GPUs: XLA launches most kernels from command buffers, whose
names it reports.
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
            fwd, fwd_bwd = jax_op_fns(op, backend, bound, a.chunk)
            for mode, fn, fargs in (("fwd", fwd, args), ("fwd+bwd", fwd_bwd, (do,) + args)):
                hlo = None
                if a.hlo_dir:
                    os.makedirs(a.hlo_dir, exist_ok=True)
                    hlo = os.path.join(a.hlo_dir, f"{op}_{backend}_{mode.replace('+', '_')}.hlo.txt")
                t, by_hlo = kernel_times(fn, fargs, a.calls, hlo)
                total = sum(t.values())
                print(f"\n== {op} {backend} {mode}: {total:.3f} ms of kernels per call "
                      f"({len(t)} distinct kernels)")
                for name, ms in sorted(t.items(), key=lambda kv: -kv[1])[:a.top]:
                    print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:110]}")
                print("  by HLO op:")
                for name, ms in sorted(by_hlo.items(), key=lambda kv: -kv[1])[:a.top]:
                    print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:110]}")
                res["cases"].append({"op": op, "backend": backend, "mode": mode, "T": a.T,
                                     "chunk": a.chunk, "bound": bound, "strong": a.strong,
                                     "total_ms": total, "kernels_ms": t, "hlo_ops_ms": by_hlo})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
