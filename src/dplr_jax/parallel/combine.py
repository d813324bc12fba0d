"""Combining per-shard affine summaries into each shard's incoming state, over a mesh axis.

Shard p of P (in order along the sequence) has summarized its tokens as the affine map
S_out = M_p S_in + B_p (ops/affine.py). Shard 0, and any shard where the sequence that
reaches its end starts inside it, has M_p = 0 and the true B_p (its initial state folded
in), so the state entering shard p is the B part of the composition T_{p-1} o ... o T_0.
Both functions below run inside `shard_map` over `axis` and return that state, with zeros
on shard 0. M [..., K, K] and B [..., K, V] are float32 (float64 under x64).

- `carry_allgather`: one all-gather of every shard's (M, B), then a local fold of p steps
  S <- M_j S + B_j (run as P - 1 masked steps, the same on every shard).
- `carry_ppermute`: a Hillis-Steele inclusive scan, ceil(log2 P) rounds in which shard p
  receives the composition of the 2^r shards before its window and composes it in; then
  one shift of the B part (the state at each shard's end) to the next shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dplr_jax.ops import affine

STRATEGIES = ("allgather", "ppermute")


def carry_allgather(M, B, axis):
    """State entering this shard, from an all-gather of all summaries and a local fold."""
    P = jax.lax.axis_size(axis)
    p = jax.lax.axis_index(axis)
    Ms = jax.lax.all_gather(M, axis)  # [P, ..., K, K]
    Bs = jax.lax.all_gather(B, axis)

    def step(S, inp):
        Mj, Bj, j = inp
        return jnp.where(j < p, affine.apply((Mj, Bj), S), S), None

    S, _ = jax.lax.scan(step, jnp.zeros_like(B), (Ms[:-1], Bs[:-1], jnp.arange(P - 1)))
    return S


def carry_ppermute(M, B, axis):
    """State entering this shard, from a log-depth scan over neighbour exchanges."""
    P = jax.lax.axis_size(axis)
    p = jax.lax.axis_index(axis)
    d = 1
    while d < P:
        perm = [(j, j + d) for j in range(P - d)]
        last = 2 * d >= P
        B_in = jax.lax.ppermute(B, axis, perm)
        has = p >= d
        if last:  # the last round needs only the B part: M B_in + B
            B = jnp.where(has, affine.apply((M, B), B_in), B)
        else:
            M_in = jax.lax.ppermute(M, axis, perm)
            M2, B2 = affine.compose((M, B), (M_in, B_in))
            M, B = jnp.where(has, M2, M), jnp.where(has, B2, B)
        d *= 2
    return jax.lax.ppermute(B, axis, [(j, j + 1) for j in range(P - 1)])


CARRY = {"allgather": carry_allgather, "ppermute": carry_ppermute}
