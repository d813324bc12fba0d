"""Ops run inside a user's own shard_map with the default type checks (check_vma=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dplr_jax import ops


@pytest.mark.parametrize("backend", ["xla", "reference"])
@pytest.mark.parametrize("name", ["kda", "gla", "hdla", "dplr"])
def test_op_inside_shard_map_over_batch(name, backend, rng):
    """Batch rows sharded over 2 devices: each device runs the op on its rows."""
    mesh = jax.make_mesh((2,), ("data",))
    B, T, H, K, V = 2, 24, 1, 16, 8
    n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    k = n(B, T, H, K)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jax.nn.softplus(n(B, T, H, K))
    args = {"kda": (n(B, T, H, K), k, n(B, T, H, V), g, jax.nn.sigmoid(n(B, T, H))),
            "gla": (n(B, T, H, K), k, n(B, T, H, V), g),
            "hdla": (n(B, T, H, K), k, n(B, T, H, V), g, jax.nn.sigmoid(n(B, T, H))),
            "dplr": (n(B, T, H, K), k, n(B, T, H, V), g, 0.5 * k, -0.5 * k)}[name]
    h0 = n(B, H, K, V)
    op = ops.OPS[name]
    want, want_S = op(*args, initial_state=h0, output_final_state=True, backend=backend)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    f = jax.shard_map(lambda h, *a: op(*a, initial_state=h, output_final_state=True,
                                       backend=backend, chunk_size=16),
                      mesh=mesh, in_specs=(P("data"),) * (len(args) + 1),
                      out_specs=(P("data"), P("data")))
    got, got_S = jax.jit(f)(put(h0), *map(put, args))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_S, want_S, rtol=1e-5, atol=1e-5)
