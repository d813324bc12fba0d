"""The language model with its sequence sharded (LMConfig.seq_axis): same logits and gradients
as the unsharded model, on a (data=2, seq=4) mesh of the 8 virtual CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dplr_jax import parallel
from dplr_jax.nn import LanguageModel, LMConfig


def test_sequence_sharded_model_matches_unsharded(rng):
    cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mixer="kda",
                   attention_every=2, chunk_size=16, backend="xla")
    tokens = jnp.asarray(rng.integers(0, 64, size=(2, 64)), jnp.int32)
    plain = LanguageModel(cfg, rngs=nnx.Rngs(0))
    sharded = LanguageModel(dataclasses.replace(cfg, seq_axis="seq"), rngs=nnx.Rngs(0))

    def loss(model, tokens):
        return jnp.mean(model(tokens) ** 2)

    want, want_g = nnx.jit(nnx.value_and_grad(loss))(plain, tokens)   # no mesh: unsharded
    # The model (like the training loop) uses Auto mesh axes: sharding by propagation.
    mesh = parallel.make_mesh(data=2, seq=4, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        x = jax.device_put(tokens, NamedSharding(mesh, P("data", "seq")))
        got, got_g = nnx.jit(nnx.value_and_grad(loss))(sharded, x)
        # The linear layers really ran context-parallel (one shard_map per KDA layer).
        graphdef, state = nnx.split(sharded)
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, x)
        assert str(jaxpr).count("shard_map") == 1
    np.testing.assert_allclose(got, want, rtol=1e-5)
    want_leaves = jax.tree.leaves(nnx.state(want_g))
    got_leaves = jax.tree.leaves(nnx.state(got_g))
    assert len(want_leaves) == len(got_leaves)
    for w, g in zip(want_leaves, got_leaves):
        err = float(jnp.linalg.norm(g - w) / (jnp.linalg.norm(w) + 1e-30))
        assert err < 1e-4, err
