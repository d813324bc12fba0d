"""Building blocks shared by the token mixers and the language model.

Every parameter is float32 and carries an `out_sharding` annotation naming mesh axes
"model" (tensor-parallel dims) or None, read with `nnx.get_partition_spec(nnx.state(m))`.
Parameters are placed at creation only when a mesh is in context (`jax.set_mesh`) and the
named axes divide their dimensions (see `param`), so the modules also build without one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

COLUMN = (None, "model")  # [d_in, d_out] split over outputs (heads)
ROW = ("model", None)  # [d_in, d_out] split over inputs (heads)


def param(rngs: nnx.Rngs, init, shape, sharding) -> nnx.Param:
    """A float32 parameter init(key, shape) annotated with `sharding` (one entry per dim).

    Placed by the annotation at creation when a mesh is in context and every named axis
    exists there and divides its dimension; otherwise only annotated (a training loop may
    then drop the axis that does not divide, e.g. 2 heads over a 4-way "model" axis).
    """
    shape, sharding = tuple(shape), tuple(sharding)
    value = init(rngs.params(), shape, jnp.float32)
    mesh = jax.sharding.get_abstract_mesh()
    eager = not mesh.empty and all(
        a is None or (a in mesh.shape and n % mesh.shape[a] == 0) for a, n in zip(sharding, shape))
    return nnx.Param(value, out_sharding=sharding, eager_sharding=eager)


def constant(value):
    """Initializer filling with `value` (scalar or array broadcastable to the shape)."""
    return lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(value, dtype), shape)


def dt_bias_init(dt_min, dt_max, dt_floor=1e-4):
    """Mamba/GDN dt_bias: dt log-uniform in [dt_min, dt_max] (at least min(dt_floor, dt_min)),
    bias = softplus^{-1}(dt)."""
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, dtype)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)),
                         min(dt_floor, dt_min))
        return dt + jnp.log(-jnp.expm1(-dt))
    return init


def a_log_init(low, high):
    """A_log = log(A), A uniform in [low, high] (GDN: [0, 16]; KDA: [1, 16])."""
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, dtype, minval=max(low, 1e-4), maxval=high))
    return init


class Dense(nnx.Module):
    """y = x W (+ b), computed in `dtype`; W [d_in, d_out] sharded as `sharding`."""

    def __init__(self, d_in, d_out, *, sharding, rngs, use_bias=False, init=None,
                 bias_init=nnx.initializers.zeros, dtype=jnp.float32):
        self.kernel = param(rngs, init or nnx.initializers.lecun_normal(), (d_in, d_out),
                            sharding)
        self.bias = param(rngs, bias_init, (d_out,), sharding[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def rms_normalize(x, eps):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def l2_normalize(x, eps=1e-6):
    """x / ||x|| over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale; computed in float32."""

    def __init__(self, dim, *, rngs, eps=1e-6):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (None,))
        self.eps = eps

    def __call__(self, x):
        return (rms_normalize(x, self.eps) * self.scale[...]).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Per-head output norm of the linear mixers: RMSNorm(o) * scale * act(gate).

    o, gate [..., heads, dim]; the scale [dim] is shared by the heads.
    """

    def __init__(self, dim, *, rngs, activation="silu", eps=1e-6):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (None,))
        self.activation = activation
        self.eps = eps

    def __call__(self, o, gate):
        act = jax.nn.sigmoid if self.activation == "sigmoid" else jax.nn.silu
        y = rms_normalize(o, self.eps) * self.scale[...] * act(gate.astype(jnp.float32))
        return y.astype(gate.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise convolution of width W over T, then SiLU.

    y_t = silu(sum_j w_j x_{t-W+1+j}). The state is the last W-1 inputs [B, W-1, C] (zeros
    before the sequence starts), so one call serves both a whole sequence and one token.
    """

    def __init__(self, channels, width, *, rngs, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(width)
        self.weight = param(rngs, lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
                            (width, channels), COLUMN)
        self.width, self.channels, self.dtype = width, channels, dtype

    def init_state(self, batch_size):
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)

    def __call__(self, x, state):
        """x [B, T, C], state [B, W-1, C] -> (y [B, T, C], new state [B, W-1, C])."""
        T = x.shape[1]
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
        w = self.weight[...].astype(x.dtype)
        y = sum(w[j] * xp[:, j:j + T] for j in range(self.width))
        return jax.nn.silu(y), xp[:, xp.shape[1] - (self.width - 1):]


class SwiGLU(nnx.Module):
    """MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model, hidden, *, rngs, dtype=jnp.float32):
        self.gate = Dense(d_model, hidden, sharding=COLUMN, rngs=rngs, dtype=dtype)
        self.up = Dense(d_model, hidden, sharding=COLUMN, rngs=rngs, dtype=dtype)
        self.down = Dense(hidden, d_model, sharding=ROW, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
