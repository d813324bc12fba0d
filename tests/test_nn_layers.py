"""Token mixers of dplr_jax.nn: whole-sequence forward == recurrent decoding, gradients, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dplr_jax.nn import (DPLR, GLA, KDA, Attention, GatedDeltaProduct, LMConfig, count_params,
                         make_mixer)

B, T, SPLIT, D_MODEL = 2, 37, 21, 32

# (mixer, LMConfig overrides): every family, plus grouped value heads, beta in (0, 2),
# the lower-bounded KDA gate, DPLR rank 2, DeltaProduct with 3 Householders and GQA.
CASES = [
    ("kda", dict(num_value_groups=2, gate_lower_bound=-5.0, beta_range=2.0)),
    ("gated_deltanet", dict(num_value_groups=2, beta_range=2.0)),
    ("deltanet", dict(conv_size=2)),
    ("gla", {}),
    ("dplr", dict(dplr_rank=2)),
    ("hdla", dict(beta_range=2.0)),
    ("gated_deltaproduct", dict(n_householder=3, beta_range=2.0)),
    ("attention", dict(n_kv_heads=1)),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in CASES]


def make_layer(mixer, seed=0, **overrides):
    cfg = LMConfig(vocab_size=16, d_model=D_MODEL, n_layers=1, n_heads=2, mixer=mixer,
                   chunk_size=16, backend="xla", **overrides)
    return make_mixer(cfg, mixer, rngs=nnx.Rngs(seed))


def rel_rmse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward_decode_grad(graphdef, state, x, split, w):
    """(whole-sequence y, y decoded token by token from an empty cache, y from prefill of
    x[:, :split] followed by token-by-token decoding of the rest, d sum(y * w) / d params):
    one jit per layer, to compile once."""
    layer = nnx.merge(graphdef, state)

    def loss(st):
        y = nnx.merge(graphdef, st)(x)
        return jnp.sum(y * w), y

    def decode(cache, xs):
        def body(c, xt):
            y, c = layer.step(xt, c)
            return c, y
        return jnp.swapaxes(jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))[1], 0, 1)

    stepped = decode(layer.init_cache(x.shape[0], x.shape[1]), x)
    y_prompt, cache = layer.prefill(x[:, :split], x.shape[1])
    resumed = jnp.concatenate([y_prompt, decode(cache, x[:, split:])], axis=1)
    (_, full), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return full, stepped, resumed, grads


@pytest.mark.parametrize("mixer,overrides", CASES, ids=IDS)
def test_decoding_matches_sequence_and_gradients_reach_every_parameter(mixer, overrides, rng):
    layer = make_layer(mixer, **overrides)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    full, stepped, resumed, grads = forward_decode_grad(*nnx.split(layer), x, SPLIT, w)
    assert full.shape == (B, T, D_MODEL) and full.dtype == jnp.float32
    assert float(jnp.std(full)) > 1e-3
    assert rel_rmse(stepped, full) < 1e-5
    assert rel_rmse(resumed, full) < 1e-5

    grads = nnx.to_flat_state(grads)
    assert sum(g[...].size for _, g in grads) == count_params(layer)
    for path, g in grads:
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"zero gradient for {'.'.join(map(str, path))}"


def test_linear_cache_has_constant_size():
    """The cache does not grow with max_len (prefill caches match it: lax.scan in
    forward_decode_grad carries them through step)."""
    layer = make_layer("kda", num_value_groups=2)
    cache = layer.init_cache(B, 10_000)
    assert cache["state"].shape == (B, 4, 16, 16)  # [B, HV, K, V]
    assert cache["conv"].shape == (B, 3, 32 + 32 + 4 * 16)  # W-1 rows of q|k|v


def test_gate_ranges():
    """Log decays are <= 0 and respect the lower bound; beta lies in (0, beta_range)."""
    x = jax.random.normal(jax.random.key(0), (B, 9, D_MODEL)) * 3
    kda = make_layer("kda", gate_lower_bound=-2.0, beta_range=2.0)
    q, k, v = (jnp.zeros((B, 9, 2, 16)),) * 3
    _, _, _, g, beta = kda._op_args(x, q, k, v)
    assert g.shape == (B, 9, 2, 16) and bool(jnp.all((g <= 0) & (g >= -2.0)))
    # the bound reaches the op (its faster path) where the op allows it (>= -5)
    assert kda._op_options() == {"log_decay_lower_bound": -2.0}
    assert make_layer("kda", gate_lower_bound=-8.0)._op_options() == {}
    assert bool(jnp.all((beta > 0) & (beta < 2))) and float(beta.max()) > 1
    dplr = make_layer("dplr", dplr_rank=2)
    _, _, _, log_w, a, b = dplr._op_args(x, q, k + 1, v)
    assert bool(jnp.all((log_w <= 0) & (log_w >= -np.exp(-0.5))))
    assert a.shape == b.shape == (B, 9, 2, 2, 16)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)


def test_dplr_transition_eigenvalues_bounded(rng):
    """The RWKV-7-style transition Diag(w) - sum_r a_r b_r^T has real eigenvalues in (-1, 1)."""
    layer = make_layer("dplr", dplr_rank=3)
    x = jnp.asarray(rng.standard_normal((1, 6, D_MODEL)) * 4, jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 6, 2, 16)), jnp.float32)
    _, _, _, log_w, a, b = layer._op_args(x, k, k, k)
    M = (jax.vmap(jnp.diag)(jnp.exp(log_w).reshape(-1, 16))
         - jnp.einsum("nrk,nrj->nkj", a.reshape(-1, 3, 16), b.reshape(-1, 3, 16)))
    eig = np.linalg.eigvals(np.asarray(M, np.float64))
    assert np.abs(eig.imag).max() < 1e-6
    assert np.all(np.abs(eig.real) < 1)


def test_initializations():
    gdn = make_layer("gated_deltanet")
    A = np.exp(np.asarray(gdn.decay.A_log[...]))
    dt = np.log1p(np.exp(np.asarray(gdn.decay.dt_bias[...])))  # softplus(dt_bias)
    assert np.all((A > 0) & (A <= 16)) and np.all((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7))
    kda = make_layer("kda")
    assert np.all(np.exp(np.asarray(kda.A_log[...])) >= 1 - 1e-6)
    dt = np.log1p(np.exp(np.asarray(kda.dt_bias[...])))
    assert kda.dt_bias[...].shape == (2 * 16,) and np.all((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7))


def test_sharding_annotations_use_model_axis_only():
    for mixer, overrides in CASES:
        layer = make_layer(mixer, **overrides)
        for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            spec = v.get_metadata()["out_sharding"]
            assert len(spec) == v[...].ndim, path
            assert set(spec) <= {None, "model"}, path


@pytest.mark.parametrize("build,match", [
    (lambda: GLA(32, 2, rngs=nnx.Rngs(0), num_value_groups=2), "num_value_groups"),
    (lambda: DPLR(32, 2, rngs=nnx.Rngs(0), dplr_rank=0), "dplr_rank"),
    (lambda: GatedDeltaProduct(32, 2, rngs=nnx.Rngs(0), n_householder=0), "n_householder"),
    (lambda: KDA(32, 2, rngs=nnx.Rngs(0), gate_lower_bound=1.0), "gate_lower_bound"),
    (lambda: KDA(32, 2, rngs=nnx.Rngs(0), dt_range=(0.0, 1e-2)), "KDA: argument 'dt_range'"),
    (lambda: GatedDeltaProduct(32, 2, rngs=nnx.Rngs(0), dt_range=(1e-2, 1e-3)), "'dt_range'"),
    (lambda: KDA(30, 4, rngs=nnx.Rngs(0)), "n_heads"),
    (lambda: KDA(32, 2, rngs=nnx.Rngs(0), beta_range=2.5), "beta_range"),
    (lambda: GLA(32, 2, rngs=nnx.Rngs(0), conv_size=0), "conv_size"),
    (lambda: Attention(32, 4, 6, rngs=nnx.Rngs(0), n_kv_heads=3), "n_kv_heads"),
    (lambda: Attention(30, 2, rngs=nnx.Rngs(0)), "head_dim"),
])
def test_bad_layer_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
