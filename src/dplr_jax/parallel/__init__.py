"""Parallelism across devices: context (sequence) parallelism for every op, multi-host set-up.

    context_parallel(op, *args, mesh=..., axis="seq", strategy="ppermute", ...)
        runs an op with T sharded over a mesh axis (jit- and grad-compatible);
    context_parallel_local(op, *local_args, axis=..., ...)
        the same from inside a user's own `shard_map`;
    initialize_distributed(), make_mesh(data, seq)
        multi-host start-up and a ("data", "seq") mesh over all global devices.
"""

from dplr_jax.parallel.combine import STRATEGIES
from dplr_jax.parallel.context import context_parallel, context_parallel_local
from dplr_jax.parallel.distributed import initialize_distributed, make_mesh

__all__ = ["STRATEGIES", "context_parallel", "context_parallel_local", "initialize_distributed",
           "make_mesh"]
