"""(I + N)^-1 for strictly lower-triangular N, without triangular_solve.

The UT/WY transform needs this per chunk. Forward substitution on diagonal blocks of
`block` rows, then pairwise block merges

    [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]],

so the sequential part is `block` steps long and the rest is matmuls. We do not use the
matmul-only product (I - N)(I + N^2)(I + N^4)...: it is exact in exact arithmetic, but when
the inverse is small and the powers of N are large (e.g. repeated keys with beta near 1,
where N^32 has entries ~1e18) it cancels catastrophically in float32. Forward substitution
and block merges never form powers of N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _forward_substitution(N):
    """Inverse of I + N for a batch [..., n, n] of small strictly lower-triangular N."""
    n = N.shape[-1]
    X = jnp.eye(n, dtype=N.dtype) + jnp.zeros_like(N)  # zeros_like keeps N's shard_map type

    def row(i, X):
        # Row i of X = e_i - N[i] @ X; N[i, j >= i] = 0, so only finished rows are read.
        xi = jax.nn.one_hot(i, n, dtype=N.dtype) - jnp.einsum("...j,...jk->...k", N[..., i, :], X)
        return X.at[..., i, :].set(xi)

    return jax.lax.fori_loop(1, n, row, X)


def unit_lower_inverse(N, block=16):
    """(I + N)^-1 for strictly lower-triangular N [..., n, n]; n / block must be a power of 2."""
    n = N.shape[-1]
    b = min(block, n)
    lead = N.shape[:-2]
    nb = n // b
    assert nb * b == n and nb & (nb - 1) == 0, (n, b)
    # Diagonal blocks [..., nb, b, b].
    blocks = N.reshape(*lead, nb, b, nb, b)
    idx = jnp.arange(nb)
    X = _forward_substitution(jnp.moveaxis(blocks[..., idx, :, idx, :], 0, -3))
    s = b
    while s < n:
        # Merge pairs of inverted blocks of size s into blocks of size 2s.
        m = n // (2 * s)
        Xp = X.reshape(*lead, m, 2, s, s)
        A_inv, B_inv = Xp[..., 0, :, :], Xp[..., 1, :, :]
        Np = N.reshape(*lead, m, 2 * s, m, 2 * s)
        jdx = jnp.arange(m)
        C = jnp.moveaxis(Np[..., jdx, s:, jdx, :s], 0, -3)  # rows of block b, cols of block a
        lower = -jnp.einsum("...ij,...jk,...kl->...il", B_inv, C, A_inv)
        top = jnp.concatenate([A_inv, jnp.zeros_like(A_inv)], axis=-1)
        bottom = jnp.concatenate([lower, B_inv], axis=-1)
        X = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return X.reshape(*lead, n, n)
