"""Causal softmax attention with RoPE and grouped key/value heads, for hybrid models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dplr_jax.nn.basic import COLUMN, ROW, Dense
from dplr_jax.nn.linear_mixers import resolve_head_dim


def rope(x, pos, theta):
    """Rotary position embedding (rotate-half form): x [B, T, h, D], pos int [T]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = pos.astype(jnp.float32)[:, None] * freq
    cos, sin = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
    """Causal softmax attention: n_heads query heads, n_kv_heads key/value heads (GQA), RoPE.

    Decoding cache: {"k", "v": [B, max_len, n_kv_heads, head_dim], "pos": int32 scalar} (the
    number of tokens seen); memory grows with max_len, unlike the linear mixers.
    """

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, n_kv_heads=None,
                 rope_theta=10000.0, dtype="float32"):
        D = resolve_head_dim(d_model, n_heads, head_dim)
        n_kv_heads = n_kv_heads or n_heads
        if D % 2:
            raise ValueError(f"Attention: argument 'head_dim' = {D} must be even (RoPE)")
        if n_heads % n_kv_heads:
            raise ValueError(f"Attention: argument 'n_kv_heads' = {n_kv_heads} must divide "
                             f"n_heads = {n_heads}")
        self.H, self.Hkv, self.D, self.theta = n_heads, n_kv_heads, D, rope_theta
        self.dtype = jnp.dtype(dtype)
        kw = dict(rngs=rngs, dtype=self.dtype)
        self.q_proj = Dense(d_model, n_heads * D, sharding=COLUMN, **kw)
        self.k_proj = Dense(d_model, n_kv_heads * D, sharding=COLUMN, **kw)
        self.v_proj = Dense(d_model, n_kv_heads * D, sharding=COLUMN, **kw)
        self.o_proj = Dense(n_heads * D, d_model, sharding=ROW, **kw)

    def _qkv(self, x, pos):
        B, T = x.shape[:2]
        q = rope(self.q_proj(x).reshape(B, T, self.H, self.D), pos, self.theta)
        k = rope(self.k_proj(x).reshape(B, T, self.Hkv, self.D), pos, self.theta)
        return q, k, self.v_proj(x).reshape(B, T, self.Hkv, self.D)

    def _attend(self, q, k, v, mask):
        """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], mask [Tq, Tk] -> [B, Tq, d_model]."""
        B, Tq = q.shape[:2]
        q = q.reshape(B, Tq, self.Hkv, self.H // self.Hkv, self.D)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32), k.astype(jnp.float32))
        s = jnp.where(mask, s * self.D ** -0.5, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
        return self.o_proj(o.reshape(B, Tq, self.H * self.D).astype(self.dtype))

    def __call__(self, x):
        T = x.shape[1]
        q, k, v = self._qkv(x, jnp.arange(T))
        return self._attend(q, k, v, jnp.tril(jnp.ones((T, T), bool)))

    def init_cache(self, batch_size, max_len):
        shape = (batch_size, max_len, self.Hkv, self.D)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, max_len):
        """Attention over the prompt x [B, T, d]; returns (y, cache holding its keys/values)."""
        B, T = x.shape[:2]
        if max_len < T:
            raise ValueError(f"Attention.prefill: argument 'max_len' = {max_len} is shorter than "
                             f"the prompt (T = {T})")
        q, k, v = self._qkv(x, jnp.arange(T))
        y = self._attend(q, k, v, jnp.tril(jnp.ones((T, T), bool)))
        cache = self.init_cache(B, max_len)
        cache = {"k": cache["k"].at[:, :T].set(k.astype(self.dtype)),
                 "v": cache["v"].at[:, :T].set(v.astype(self.dtype)),
                 "pos": jnp.asarray(T, jnp.int32)}
        return y, cache

    def step(self, x, cache):
        """One token x [B, d] at position cache["pos"] -> (y [B, d], cache)."""
        pos = cache["pos"]
        q, k, v = self._qkv(x[:, None], pos[None])
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(self.dtype), pos, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(self.dtype), pos, axis=1)
        mask = (jnp.arange(kc.shape[1]) <= pos)[None]
        y = self._attend(q, kc, vc, mask)[:, 0]
        return y, {"k": kc, "v": vc, "pos": pos + 1}
