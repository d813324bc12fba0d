"""Multi-host set-up: JAX's multi-controller runtime and a ("data", "seq") mesh over all devices.

Every process runs the same program; `initialize_distributed` connects it to the others
(call it before anything touches a device), after which `jax.devices()` lists the devices of
all processes and a mesh built from them spans the whole job.
"""

from __future__ import annotations

import os

import jax

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
       "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, *,
                           local_device_ids=None, auto_detect=False, **kwargs):
    """Starts JAX's multi-controller runtime (`jax.distributed.initialize`) for this process.

    Each argument left None is read from its environment variable: JAX_COORDINATOR_ADDRESS
    ("host:port" of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID. When none of the three is
    set anywhere: with auto_detect=True, JAX detects the cluster (SLURM, Open MPI, TPU pods,
    ...); otherwise this is a single-process run and nothing is started. kwargs go to
    `jax.distributed.initialize` (e.g. initialization_timeout). Calling it again after a
    successful start does nothing. Returns True if this process runs distributed.
    """
    if jax.distributed.is_initialized():
        return True
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, var in ENV.items():
        if given[name] is None and os.environ.get(var):
            given[name] = os.environ[var]
    missing = [ENV[n] for n, val in given.items() if val is None]
    if len(missing) == len(ENV) and not auto_detect:
        return False
    if missing and not auto_detect:
        raise ValueError(f"initialize_distributed: {', '.join(missing)} not set (argument or "
                         f"environment variable); a multi-process run needs all of "
                         f"{', '.join(ENV.values())}, or auto_detect=True")
    for name in ("num_processes", "process_id"):
        if given[name] is not None:
            try:
                given[name] = int(given[name])
            except ValueError:
                raise ValueError(f"initialize_distributed: argument '{name}' "
                                 f"({ENV[name]}) is {given[name]!r}; expected an integer")
    if given["num_processes"] is not None and given["process_id"] is not None and not (
            0 <= given["process_id"] < given["num_processes"]):
        raise ValueError(f"initialize_distributed: process_id {given['process_id']} is not in "
                         f"[0, num_processes = {given['num_processes']})")
    jax.distributed.initialize(**given, local_device_ids=local_device_ids, **kwargs)
    return True


def make_mesh(data=1, seq=None, *, devices=None, axis_types=None):
    """A `jax.sharding.Mesh` with axes ("data", "seq") over all global devices.

    seq defaults to (number of devices) // data. Devices are ordered by `jax.make_mesh`, so
    "seq" (the last axis, the one context parallelism talks over most) runs along the
    fastest links, and across processes the "data" axis varies slowest.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if not isinstance(data, int) or data < 1 or n % data:
        raise ValueError(f"make_mesh: argument 'data' is {data!r}; expected a positive divisor "
                         f"of the {n} devices")
    seq = n // data if seq is None else seq
    if not isinstance(seq, int) or seq < 1 or data * seq != n:
        raise ValueError(f"make_mesh: data x seq = {data} x {seq!r} does not match the {n} "
                         f"devices")
    return jax.make_mesh((data, seq), ("data", "seq"), axis_types, devices=devices)
