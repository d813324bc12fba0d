"""LanguageModel: forward == prefill/recurrent decoding, generate, parameter counts, config."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dplr_jax.nn import LanguageModel, LMConfig, count_params, generate, make_mixer, sample

HYBRID = LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=2, mixer="kda",
                  attention_every=2, chunk_size=16, backend="xla", tie_embeddings=False,
                  n_kv_heads=1, max_len=48)


def rel_rmse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@functools.lru_cache(maxsize=None)
def hybrid_model():
    return LanguageModel(HYBRID, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward_and_decode(graphdef, state, tokens, split):
    """(logits of the whole sequence, logits decoded token by token from an empty cache,
    logits from prefill of tokens[:, :split] then token-by-token decoding of the rest)."""
    model = nnx.merge(graphdef, state)

    def decode(cache, toks):
        def body(c, tok):
            logits, c = model.decode_step(tok, c)
            return c, logits
        return jnp.swapaxes(jax.lax.scan(body, cache, toks.T)[1], 0, 1)

    T = tokens.shape[1]
    stepped = decode(model.init_cache(tokens.shape[0], T), tokens)
    prompt_logits, cache = model.prefill(tokens[:, :split], T)
    resumed = jnp.concatenate([prompt_logits, decode(cache, tokens[:, split:])], axis=1)
    return model(tokens), stepped, resumed


def test_hybrid_forward_matches_recurrent_decoding(rng):
    model = hybrid_model()
    assert [b.kind for b in model.blocks] == ["kda", "attention", "kda"]
    tokens = jnp.asarray(rng.integers(0, HYBRID.vocab_size, (2, 35)), jnp.int32)
    full, stepped, resumed = forward_and_decode(*nnx.split(model), tokens, 19)
    assert full.shape == (2, 35, HYBRID.vocab_size) and full.dtype == jnp.float32
    assert rel_rmse(stepped, full) < 1e-5
    assert rel_rmse(resumed, full) < 1e-5


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def test_generate_greedy_is_deterministic_and_follows_the_forward_argmax(rng):
    model = hybrid_model()
    prompt = jnp.asarray(rng.integers(0, HYBRID.vocab_size, (2, 5)), jnp.int32)
    out = generate(model, prompt, 6, rng=jax.random.key(0), greedy=True)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    again = generate(model, prompt, 6, rng=jax.random.key(1), greedy=True)
    np.testing.assert_array_equal(out, again)
    # Re-run the full forward on the growing sequence (zero-padded to one shape: the model is
    # causal, so padding after position t cannot change the logits at t).
    graphdef, state = nnx.split(model)
    for t in range(5, 11):
        grown = jnp.zeros_like(out).at[:, :t].set(out[:, :t])
        logits = forward(graphdef, state, grown)[:, t - 1]
        np.testing.assert_array_equal(jnp.argmax(logits, -1), out[:, t])
    # top_k = 1 sampling leaves only the argmax: the same tokens as greedy decoding.
    top1 = generate(model, prompt, 6, rng=jax.random.key(3), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(top1, out)


def test_generate_rejects_bad_arguments():
    model = hybrid_model()
    prompt = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, prompt, HYBRID.max_len, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, rng=jax.random.key(0), top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt[0], 2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, rng=jax.random.key(0), temperature=0.0)


def test_sample_top_k_and_temperature():
    logits = jnp.tile(jnp.array([[0.0, 3.0, 1.0, 2.5, -1.0, 2.0]]), (4000, 1))
    draws = np.asarray(sample(logits, jax.random.key(0), top_k=3))
    assert set(np.unique(draws)) == {1, 3, 5}
    np.testing.assert_array_equal(sample(logits, jax.random.key(1), top_k=3),
                                  sample(logits, jax.random.key(1), top_k=3))
    freq = np.bincount(draws, minlength=6)[[1, 3, 5]] / len(draws)
    p = np.exp([3.0, 2.5, 2.0]) / np.exp([3.0, 2.5, 2.0]).sum()
    np.testing.assert_allclose(freq, p, atol=0.03)
    cold = np.asarray(sample(logits, jax.random.key(2), temperature=0.05))
    assert np.mean(cold == 1) > 0.99
    np.testing.assert_array_equal(sample(logits[:3], None, greedy=True), [1, 1, 1])


def expected_deltanet_lm_params(c: LMConfig):
    d, H, K, V = c.d_model, c.n_heads, c.resolved_head_dim, c.resolved_head_dim
    mixer = (d * H * K * 2 + d * H * V  # q, k, v
             + c.conv_size * (2 * H * K + H * V)  # depthwise conv
             + d * H  # beta
             + d * H * V + V + H * V * d)  # output gate, gated norm, output projection
    block = 2 * d + mixer + 3 * d * c.mlp_hidden
    head = 0 if c.tie_embeddings else d * c.vocab_size
    return c.vocab_size * d + c.n_layers * block + d + head


def test_parameter_counts_and_summary():
    cfg = LMConfig(vocab_size=100, d_model=48, n_layers=2, n_heads=3, mixer="deltanet")
    assert cfg.mlp_hidden == 128  # 4 * 48 * 2/3 = 128
    tied = LanguageModel(cfg, rngs=nnx.Rngs(0))
    n = count_params(tied)
    assert n == sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    assert n == expected_deltanet_lm_params(cfg)
    untied = nnx.eval_shape(lambda: LanguageModel(dataclasses.replace(cfg, tie_embeddings=False),
                                                  rngs=nnx.Rngs(0)))
    assert count_params(untied) == n + 100 * 48
    table = untied.summary()
    assert table.splitlines()[-1].split() == ["total", f"{count_params(untied):,}"]
    assert "blocks.1.mixer (DeltaNet)" in table and "head" in table
    rows = [line.split()[-1] for line in table.splitlines()[2:-2]]
    assert sum(int(r.replace(",", "")) for r in rows) == count_params(untied)


def test_attention_every_places_softmax_layers():
    cfg = LMConfig(vocab_size=10, d_model=16, n_layers=8, n_heads=2, mixer="gla",
                   attention_every=4)
    assert [i for i in range(8) if cfg.layer_mixer(i) == "attention"] == [3, 7]
    none = dataclasses.replace(cfg, attention_every=0)
    assert all(none.layer_mixer(i) == "gla" for i in range(8))


def test_parameters_shard_over_a_mesh(rng):
    """Built under a ("data", "seq", "model") mesh the parameters follow their annotations,
    and the sharded forward equals the unsharded one."""
    cfg = LMConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, mixer="deltanet",
                   attention_every=2, chunk_size=16, backend="xla", tie_embeddings=False)
    tokens = jnp.asarray(rng.integers(0, 61, (2, 8)), jnp.int32)
    ref = forward(*nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0))), tokens)
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 1, 2), ("data", "seq", "model"), axis_types=auto,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        model = LanguageModel(cfg, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        specs = nnx.get_partition_spec(state)
        for (path, v), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
            assert set(spec.get_value()) <= {None, "model"}, path
            assert v[...].sharding.spec == spec.get_value(), path
        assert model.blocks[0].mixer.q_proj.kernel[...].sharding.spec == jax.P(None, "model")
        sharded = forward(*nnx.split(model), tokens)
    assert rel_rmse(sharded, ref) < 1e-5
    # A "model" axis that does not divide a dimension (2 heads, 4 devices): that parameter is
    # annotated but left unplaced; the others are still placed.
    wide = jax.make_mesh((1, 1, 4), ("data", "seq", "model"), axis_types=auto,
                         devices=jax.devices()[:4])
    with jax.set_mesh(wide):
        mixer = make_mixer(cfg, "deltanet", rngs=nnx.Rngs(0))
    assert mixer.b_proj.kernel.get_metadata()["out_sharding"] == (None, "model")
    assert mixer.b_proj.kernel[...].sharding.spec == jax.P()
    assert mixer.q_proj.kernel[...].sharding.spec == jax.P(None, "model")


BAD = [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(mixer="mamba"), "mixer"),
    (dict(attention_every=-1), "attention_every"),
    (dict(attention_every=5), "attention_every"),
    (dict(num_value_groups=2, mixer="gla"), "num_value_groups"),
    (dict(head_dim=0), "head_dim"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(head_dim=7, attention_every=2), "head_dim"),
    (dict(beta_range=3.0), "beta_range"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(backend="cuda"), "backend"),
    (dict(dtype="int8"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=0), "n_layers"),
    (dict(gate_lower_bound=0.5), "gate_lower_bound"),
    (dict(dt_range=(1e-3, 1e-4)), "dt_range"),
    (dict(dt_range=(0.0, 1e-1)), "dt_range"),
    (dict(dt_range=1e-3), "dt_range"),
    (dict(dt_range=(1e-3, float("inf"))), "dt_range"),
    (dict(dt_range=(1e-3, 1e300)), "dt_range"),
    (dict(dt_range=(True, True)), "dt_range"),
    (dict(conv_size=0), "conv_size"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(overrides, field):
    base = dict(vocab_size=10, d_model=32, n_layers=4, n_heads=4, mixer="kda")
    with pytest.raises(ValueError, match=f"'{field}'"):
        LMConfig(**{**base, **overrides})


def test_from_dict():
    d = dict(vocab_size=10, d_model=32, n_layers=2, n_heads=4, mixer="hdla", beta_range=2.0)
    assert LMConfig.from_dict(d) == LMConfig(**d)
    assert LMConfig.from_dict(LMConfig(**d).to_dict()) == LMConfig(**d)
    with pytest.raises(ValueError, match="unknown key.*'n_head'.*valid keys.*'n_heads'"):
        LMConfig.from_dict({**d, "n_head": 4})
    with pytest.raises(ValueError, match="config"):
        LanguageModel(d, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mixer", ["gated_deltanet", "kda", "gated_deltaproduct"])
def test_dt_range_sets_the_decay_init(mixer):
    """dt = softplus(dt_bias) of the decay lies in dt_range, and the JSON round trip (lists)
    gives back the same config."""
    cfg = LMConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=2, mixer=mixer,
                   dt_range=[2e-4, 5e-4])
    assert cfg.dt_range == (2e-4, 5e-4)
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    mix = LanguageModel(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer
    dt = jax.nn.softplus((mix.dt_bias if mixer == "kda" else mix.decay.dt_bias)[...])
    assert float(dt.min()) >= 2e-4 * (1 - 1e-5) and float(dt.max()) <= 5e-4 * (1 + 1e-5)


def test_bad_tokens():
    model = hybrid_model()
    with pytest.raises(ValueError, match="'tokens'.*integer tokens \\[B, T\\]"):
        model(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="'tokens'.*\\[B\\]"):
        model.decode_step(jnp.zeros((2, 1), jnp.int32), model.init_cache(2, 4))
