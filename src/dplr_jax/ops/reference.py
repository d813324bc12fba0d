"""The ground truth: each op's recurrence, one token at a time, written as its formula.

Step functions take one token (no T axis; heads on axis 1) and the state S [B, HV, K, V]
and return (o, S_new) with o = scale * S_new^T q. `scan` rolls any step over T with
lax.scan, resetting the state at packed-sequence boundaries. Nothing here is chunked,
factored or clever: every faster path is tested against this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _groups(x, hv):
    """Repeats query/key heads so value head h reads head h // G."""
    return jnp.repeat(x, hv // x.shape[1], axis=1) if x.shape[1] != hv else x


def _read(S, q, scale):
    return scale * jnp.einsum("bhkv,bhk->bhv", S, _groups(q, S.shape[1]))


def _householder(S, k, beta):
    """(I - beta k k^T) S."""
    return S - beta[..., None, None] * k[..., :, None] * jnp.einsum("bhk,bhkv->bhv", k, S)[..., None, :]


def gla_step(q, k, v, g, S, scale):
    S = jnp.exp(g)[..., :, None] * S + k[..., :, None] * v[..., None, :]
    return _read(S, q, scale), S


def delta_rule_step(q, k, v, beta, S, scale):
    k = _groups(k, S.shape[1])
    S = _householder(S, k, beta) + beta[..., None, None] * k[..., :, None] * v[..., None, :]
    return _read(S, q, scale), S


def gated_delta_rule_step(q, k, v, g, beta, S, scale):
    return delta_rule_step(q, k, v, beta, jnp.exp(g)[..., None, None] * S, scale)


def kda_step(q, k, v, g, beta, S, scale):
    return delta_rule_step(q, k, v, beta, jnp.exp(g)[..., :, None] * S, scale)


def dplr_step(q, k, v, g, a, b, S, scale):
    """k [B,H,Rkv,K], v [B,H,Rkv,V], a/b [B,H,R,K], g [B,H,K] or None (identity diagonal)."""
    DS = S if g is None else jnp.exp(g)[..., :, None] * S
    S = (DS - jnp.einsum("bhrk,bhrj,bhjv->bhkv", a, b, S)
         + jnp.einsum("bhrk,bhrv->bhkv", k, v))
    return _read(S, q, scale), S


def hdla_step(q, k, v, g, beta, S, scale):
    """S <- (I - b k k^T) Diag(exp g) (I - b k k^T) S + k v^T."""
    S = _householder(jnp.exp(g)[..., :, None] * _householder(S, k, beta), k, beta)
    S = S + k[..., :, None] * v[..., None, :]
    return _read(S, q, scale), S


def gated_delta_product_step(q, k, v, g, beta, S, scale):
    """k [B,H,n,K], v [B,H,n,V], beta [B,H,n], g [B,H]: decay, then n delta-rule steps."""
    S = jnp.exp(g)[..., None, None] * S
    for j in range(k.shape[2]):
        S = _householder(S, k[:, :, j], beta[:, :, j])
        S = S + beta[:, :, j, None, None] * k[:, :, j, :, None] * v[:, :, j, None, :]
    return _read(S, q, scale), S


def scan(step, xs, S0, scale, cu_seqlens=None):
    """Rolls `step` over axis 1 (T) of every array in `xs` (None entries pass through).

    S0 is [N, HV, K, V]: per batch row, or per packed sequence when cu_seqlens is given
    (then B == 1 and the state resets to S0[n] at each sequence start).
    Returns o [B, T, HV, V] and the final states [N, HV, K, V].
    """
    T = next(x for x in xs if x is not None).shape[1]
    # Inside shard_map the carry must vary over the same mesh axes as the inputs: adding the
    # (exactly zero) sum of an empty slice of each input gives S0 their type without a copy.
    S0 = S0 + sum(jnp.sum(x[..., :0]).astype(S0.dtype) for x in xs if x is not None)
    seq_xs = [None if x is None else jnp.moveaxis(x, 1, 0) for x in xs]
    if cu_seqlens is None:
        def body(S, x):
            o, S = step(*x, S, scale)
            return S, o

        S, o = jax.lax.scan(body, S0, seq_xs)
        return jnp.moveaxis(o, 0, 1), S

    t = jnp.arange(T)
    seq = jnp.searchsorted(cu_seqlens, t, side="right") - 1
    start = t == cu_seqlens[seq]

    def body(carry, inp):
        S, finals = carry
        x, n, is_start = inp
        S = jnp.where(is_start, S0[n][None], S)
        o, S = step(*x, S, scale)
        return (S, finals.at[n].set(S[0])), o

    (_, finals), o = jax.lax.scan(body, (S0[:1], S0), (seq_xs, seq, start))
    return jnp.moveaxis(o, 0, 1), finals
