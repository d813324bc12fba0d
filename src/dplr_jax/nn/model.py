"""The language model: embedding, pre-norm blocks (token mixer + SwiGLU MLP), norm, head."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from dplr_jax.nn.attention import Attention
from dplr_jax.nn.basic import ROW, Dense, RMSNorm, SwiGLU, param
from dplr_jax.nn.config import LMConfig
from dplr_jax.nn.linear_mixers import (DPLR, GLA, HDLA, KDA, DeltaNet, GatedDeltaNet,
                                       GatedDeltaProduct)

MIXER_CLASSES = {"kda": KDA, "gated_deltanet": GatedDeltaNet, "deltanet": DeltaNet, "gla": GLA,
                 "dplr": DPLR, "hdla": HDLA, "gated_deltaproduct": GatedDeltaProduct,
                 "attention": Attention}


def make_mixer(config: LMConfig, kind: str, *, rngs: nnx.Rngs) -> nnx.Module:
    """The token mixer `kind` (a key of MIXER_CLASSES) with the sizes and options of config."""
    args = (config.d_model, config.n_heads, config.head_dim)
    if kind == "attention":
        return Attention(*args, rngs=rngs, n_kv_heads=config.n_kv_heads,
                         rope_theta=config.rope_theta, dtype=config.dtype)
    kw = dict(num_value_groups=config.num_value_groups, beta_range=config.beta_range,
              conv_size=config.conv_size, chunk_size=config.chunk_size, backend=config.backend,
              dtype=config.dtype, seq_axis=config.seq_axis, batch_axis=config.batch_axis)
    if kind in ("kda", "gated_deltanet", "gated_deltaproduct"):
        kw["dt_range"] = config.dt_range
    if kind == "kda":
        kw["gate_lower_bound"] = config.gate_lower_bound
    elif kind == "gated_deltaproduct":
        kw["n_householder"] = config.n_householder
    elif kind == "dplr":
        kw["dplr_rank"] = config.dplr_rank
    return MIXER_CLASSES[kind](*args, rngs=rngs, **kw)


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig, kind: str, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.kind = kind
        self.mixer_norm = RMSNorm(config.d_model, rngs=rngs)
        self.mixer = make_mixer(config, kind, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, rngs=rngs)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, max_len):
        y, cache = self.mixer.prefill(self.mixer_norm(x), max_len)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache

    def step(self, x, cache):
        y, cache = self.mixer.step(self.mixer_norm(x), cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class LanguageModel(nnx.Module):
    """Decoder-only language model; see LMConfig. Logits are float32.

    Decoding: `init_cache(B, max_len)` or `prefill(prompt, max_len)` then `decode_step`; the
    cache is a pytree {"layers": [per-block cache]} (conv + recurrent state for linear mixers,
    KV cache for softmax layers), so it passes through jax.jit / lax.scan.
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, LMConfig):
            raise ValueError(f"LanguageModel: argument 'config' must be an LMConfig, got "
                             f"{type(config).__name__}")
        self.config = config
        d = config.d_model
        # d_model (not vocab_size, often indivisible) carries the "model" axis
        self.embed = param(rngs, nnx.initializers.normal(d ** -0.5), (config.vocab_size, d),
                           (None, "model"))
        self.blocks = nnx.List([Block(config, config.layer_mixer(i), rngs=rngs)
                                for i in range(config.n_layers)])
        self.norm = RMSNorm(d, rngs=rngs)
        self.head = None if config.tie_embeddings else Dense(
            d, config.vocab_size, sharding=ROW, rngs=rngs, dtype=jnp.float32)

    def _embed(self, tokens, ndim):
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            want = "[B, T]" if ndim == 2 else "[B]"
            raise ValueError(f"LanguageModel: argument 'tokens' has shape {tokens.shape} and "
                             f"dtype {tokens.dtype}; expected integer tokens {want}")
        return self.embed[...][tokens].astype(jnp.dtype(self.config.dtype))

    def _logits(self, x):
        x = self.norm(x).astype(jnp.float32)
        if self.head is None:
            return x @ self.embed[...].T
        return self.head(x)

    def __call__(self, tokens):
        """tokens int [B, T] -> logits float32 [B, T, vocab_size]."""
        x = self._embed(tokens, 2)
        for block in self.blocks:
            x = block(x)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_len: int):
        """An empty decoding cache for batch_size sequences of up to max_len tokens."""
        return {"layers": [b.mixer.init_cache(batch_size, max_len) for b in self.blocks]}

    def prefill(self, tokens, max_len: int):
        """Full-sequence forward of a prompt [B, T]; returns (logits [B, T, V], cache)."""
        x = self._embed(tokens, 2)
        caches = []
        for block in self.blocks:
            x, c = block.prefill(x, max_len)
            caches.append(c)
        return self._logits(x), {"layers": caches}

    def decode_step(self, tokens, cache):
        """One token per sequence, tokens int [B] -> (logits float32 [B, vocab], cache)."""
        x = self._embed(tokens, 1)
        caches = []
        for block, c in zip(self.blocks, cache["layers"]):
            x, c = block.step(x, c)
            caches.append(c)
        return self._logits(x), {"layers": caches}

    def summary(self) -> str:
        """A table of parameter counts per module (embedding, each block's parts, ...)."""
        return summary(self)


def _param_sizes(model):
    """(path, number of entries) of every parameter; works on nnx.eval_shape'd models too."""
    return [(path, math.prod(v.get_value().shape))
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def count_params(model: nnx.Module) -> int:
    """Total number of parameter entries of a module (concrete or from nnx.eval_shape)."""
    return sum(n for _, n in _param_sizes(model))


def summary(model: nnx.Module) -> str:
    """Parameter counts per submodule (two path levels, three inside `blocks`) and the total."""
    rows: dict[str, int] = {}
    for path, n in _param_sizes(model):
        depth = 3 if path[0] == "blocks" else 2
        key = ".".join(str(p) for p in path[:min(depth, len(path) - 1)]) or str(path[0])
        rows[key] = rows.get(key, 0) + n
    kinds = {}
    if isinstance(model, LanguageModel):
        kinds = {f"blocks.{i}.mixer": type(b.mixer).__name__ for i, b in enumerate(model.blocks)}
    names = [k + (f" ({kinds[k]})" if k in kinds else "") for k in rows]
    total = sum(rows.values())
    width = max(len("total"), *map(len, names))
    lines = [f"{'module':<{width}}  {'params':>12}", "-" * (width + 14)]
    lines += [f"{n:<{width}}  {c:>12,}" for n, c in zip(names, rows.values())]
    lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}"]
    return "\n".join(lines)
