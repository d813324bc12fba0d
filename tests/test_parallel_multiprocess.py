"""Context parallelism across processes: 2 processes x 4 CPU devices through jax.distributed.

The test writes random inputs to a file, starts this file as a worker script twice (process
ids 0 and 1, a free localhost port, hard timeouts), and compares what process 0 saves with
the single-device op computed here. The sequence axis spans both processes, so the
all-gather and ppermute of the combine cross the process boundary.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time

import numpy as np

N_PROCESSES, LOCAL_DEVICES = 2, 4
STRATEGIES = ("allgather", "ppermute")
TIMEOUT_S = 240


def _problem(rng):
    """kda inputs [B=2, T=128], initial state and cotangents, float32 NumPy."""
    from _ops_inputs import make_inputs

    args = [np.asarray(a, np.float32) for a in make_inputs("kda", rng, B=2, T=128, H=2, K=16,
                                                           V=16)]
    h0 = (0.5 * rng.standard_normal((2, 2, 16, 16))).astype(np.float32)
    do = rng.standard_normal((2, 128, 2, 16)).astype(np.float32)
    dS = rng.standard_normal(h0.shape).astype(np.float32)
    return args, h0, do, dS


def _vjp(fn, args, h0, do, dS):
    import jax

    def run(args, h0, do, dS):
        (o, S), pull = jax.vjp(lambda a, h: fn(*a, initial_state=h, output_final_state=True,
                                               backend="xla"), args, h0)
        d_args, d_h0 = pull((do, dS))
        return [o, S, *d_args, d_h0]

    return jax.jit(run)(args, h0, do, dS)


def _worker(problem_path, out_path):
    """One process of the job: global arrays from the saved problem, CP over all 8 devices."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from dplr_jax import ops, parallel

    assert parallel.initialize_distributed(initialization_timeout=60)
    assert jax.process_count() == N_PROCESSES
    mesh = parallel.make_mesh(data=1, seq=N_PROCESSES * LOCAL_DEVICES)
    data = np.load(problem_path)
    args, h0, do, dS = [data[f"arg{i}"] for i in range(5)], data["h0"], data["do"], data["dS"]

    def put(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    seq, rep = PartitionSpec(None, "seq"), PartitionSpec()
    g_args = [put(a, seq) for a in args]
    results = {}
    for strategy in STRATEGIES:
        fn = functools.partial(parallel.context_parallel, ops.kda, mesh=mesh, strategy=strategy)
        out = _vjp(fn, g_args, put(h0, rep), put(do, seq), put(dS, rep))
        for i, x in enumerate(out):
            results[f"{strategy}{i}"] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if jax.process_index() == 0:
        np.savez(out_path, **results)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_device(rng, tmp_path):
    import jax
    from _ops_inputs import assert_close
    from conftest import xla_flags

    from dplr_jax import ops

    args, h0, do, dS = _problem(rng)
    problem, out = tmp_path / "problem.npz", tmp_path / "out.npz"
    np.savez(problem, **{f"arg{i}": a for i, a in enumerate(args)}, h0=h0, do=do, dS=dS)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(LOCAL_DEVICES),
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               JAX_NUM_PROCESSES=str(N_PROCESSES))
    logs = [tmp_path / f"process{i}.log" for i in range(N_PROCESSES)]
    procs = []
    try:
        for i in range(N_PROCESSES):
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, str(problem), str(out)],
                    env=dict(env, JAX_PROCESS_ID=str(i)), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i].read_text()[-3000:]}"

    ref = _vjp(ops.kda, [jax.numpy.asarray(a) for a in args], h0, do, dS)
    got = np.load(out)
    names = ["o", "final state", "dq", "dk", "dv", "d log_decay", "d beta", "d initial_state"]
    for strategy in STRATEGIES:
        for i, (name, r) in enumerate(zip(names, ref)):
            assert_close(got[f"{strategy}{i}"], r, 1e-5, f"2 processes, {strategy}: {name}")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
