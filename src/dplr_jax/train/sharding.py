"""The training mesh and the shardings of parameters, optimizer state and batches.

The mesh has axes ("data", "seq", "model") over all global devices (one CPU up to a pod).
Parameters are placed by the PartitionSpecs of the model's sharding metadata
(`nnx.get_partition_spec`); a mesh axis that does not divide the dimension it names is dropped
for that parameter (it is replicated along that axis instead). Optimizer moments follow their
parameters; scalars are replicated. Batches are split over "data" (batch) and "seq" (tokens).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "seq", "model")


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes AXES of sizes `shape` (one entry may be -1: all remaining devices).
    A single-process run may use only the first prod(shape) devices."""
    devices = jax.devices() if devices is None else list(devices)
    n, shape = len(devices), list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(f"mesh {tuple(shape)}: the {n} devices are not a multiple of "
                             f"{known}")
        shape[shape.index(-1)] = n // known
    size = math.prod(shape)
    if size > n or (size < n and jax.process_count() > 1):
        raise ValueError(f"mesh {tuple(shape)} (data, seq, model) needs {size} devices; {n} "
                         f"are available" + (" (a multi-process run must use all of them)"
                                             if size < n else ""))
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:size])


def fit_spec(spec: P, shape, mesh) -> P:
    """`spec` with every mesh axis removed from a dimension it does not divide."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        names = tuple(a for a in names if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(None if not names or dim % size else (names if len(names) > 1 else names[0]))
    return P(*out)


def param_shardings(abstract_params, specs, mesh):
    """NamedShardings for a pure-dict parameter tree from its PartitionSpec tree."""
    return jax.tree.map(lambda x, s: NamedSharding(mesh, fit_spec(s, x.shape, mesh)),
                        abstract_params, specs, is_leaf=lambda s: isinstance(s, P))


def opt_state_shardings(tx, abstract_opt_state, params_sharding, mesh):
    """Optimizer-state shardings: moments like their parameters, everything else replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, params_sharding,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh, batch_size: int, seq_len: int) -> NamedSharding:
    """[B, T] arrays split over ("data", "seq"); ValueError when the sizes do not divide."""
    if batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size = {batch_size} is not divisible by the mesh's data axis "
                         f"({mesh.shape['data']} devices)")
    if seq_len % mesh.shape["seq"]:
        raise ValueError(f"seq_len = {seq_len} is not divisible by the mesh's seq axis "
                         f"({mesh.shape['seq']} devices)")
    return NamedSharding(mesh, P("data", "seq"))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full (each process
    transfers only its addressable shards)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])
