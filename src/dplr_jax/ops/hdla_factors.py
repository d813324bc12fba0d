"""HDLA's transition as diagonal-plus-rank-2 (seed 004, eqs. 31-36).

(I - b k k^T) Diag(l) (I - b k k^T) = (D1 - a1 b1^T)(D2 - a2 b2^T) with D1 = D2 = Diag(sqrt l),
a1 = b k, b1 = sqrt(l) k, a2 = b sqrt(l) k, b2 = k, which multiplies out to Diag(l) - A B^T with

    A = [a1, (D1 - a1 b1^T) a2] = [b k, b l k - b^2 (k . l k) k],    B = [D2 b1, b2] = [l k, k].
"""

from __future__ import annotations

import jax.numpy as jnp


def hdla_factors(k, log_decay, beta):
    """k [..., K], log_decay [..., K] (log lambda), beta [...] -> (log_decay, a, b), a/b [..., 2, K],
    so that hdla(q, k, v, log_decay, beta) == dplr(q, k, v, log_decay, a, b)."""
    lam = jnp.exp(log_decay)
    bk = beta[..., None] * k
    lk = lam * k
    a2 = beta[..., None] * lk - (beta * jnp.sum(k * lk, axis=-1))[..., None] * bk
    return log_decay, jnp.stack([bk, a2], axis=-2), jnp.stack([lk, k], axis=-2)
