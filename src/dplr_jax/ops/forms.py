"""Each op as an instance of the chunk engine (chunked.py): (q, g, E, y, P, F, V) per value head.

Inputs arrive validated, in the accumulation dtype, q already scaled; q and k are repeated
to the value heads. An op whose token applies several factors (HDLA's two Householders,
Gated DeltaProduct's n) becomes n virtual tokens per token, each a delta-rule step; its
output is read at the last one, so q keeps one row per token (the query of its last virtual
token: api.run_chunked forms only those outputs where each chunk holds whole tokens).
`Form.n_virtual` says how many.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass
class Form:
    q: jnp.ndarray
    g: jnp.ndarray | None
    E: jnp.ndarray | None
    y: jnp.ndarray | None
    P: jnp.ndarray | None
    F: jnp.ndarray | None = None
    V: jnp.ndarray | None = None
    n_virtual: int = 1
    own_decay: bool = False  # the probes are P_t = p_t e^{g_t}; P holds p (chunked.chunked)
    beta: jnp.ndarray | None = None  # [B, T, H]: with E None, E = beta P (P of rank 1)

    def engine_inputs(self, keys_on_chip=False):
        """(q, g, E, y, P, F, V), E formed as beta P where the form gives beta; keys_on_chip:
        P in E's place, for kernels that multiply by beta themselves (api.run_chunked)."""
        E = self.E
        if self.beta is not None:
            E = self.P if keys_on_chip else self.beta[..., None, None] * self.P
        return self.q, self.g, E, self.y, self.P, self.F, self.V


def to_heads(x, hv):
    """[B, T, H, ...] -> [B, T, HV, ...]: value head h reads head h // G."""
    return x if x is None or x.shape[2] == hv else jnp.repeat(x, hv // x.shape[2], axis=2)


def _one(x):
    return x[..., None, :]


def gla(q, k, v, g):
    return Form(q, g, None, None, None, _one(k), _one(v))


def delta_rule(q, k, v, beta, g=None):
    """The probe reads the state after the token's decay: P_t = k_t e^{g_t} (own_decay)."""
    hv = v.shape[2]
    q, k = to_heads(q, hv), to_heads(k, hv)
    return Form(q, g, None, _one(v), _one(k), own_decay=g is not None, beta=beta)


def gated_delta_rule(q, k, v, g, beta):
    return delta_rule(q, k, v, beta, g)


def kda(q, k, v, g, beta):
    return delta_rule(q, k, v, beta, g)


def dplr(q, k, v, g, a, b):
    return Form(q, g, a, None, b, k, v)  # y None: the probed keys a carry zero values


def _interleave(*steps):
    """[B, T, H, ...] per substep -> [B, n*T, H, ...], substeps of a token adjacent."""
    x = jnp.stack(steps, axis=2)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def hdla(q, k, v, g, beta):
    """(I - b k k^T) Diag(l) (I - b k k^T) S + k v^T as two virtual delta-rule tokens:
    S <- S + (b k)(0 - k^T S)^T, then S <- Diag(l) S + k (v - (b l k)^T S)^T."""
    zero = jnp.zeros_like
    bk = beta[..., None] * k
    return Form(q=q, g=_interleave(zero(g), g),
                E=_one(_interleave(bk, k)), y=_one(_interleave(zero(v), v)),
                P=_one(_interleave(k, bk)), n_virtual=2, own_decay=True)


def gated_delta_product(q, k, v, g, beta):
    """Per token: decay, then n delta-rule steps (k_j, v_j, beta_j): n virtual tokens."""
    n = k.shape[3]
    gs = [g] + [jnp.zeros_like(g)] * (n - 1)
    return Form(q=q, g=_interleave(*gs), E=None,
                y=_one(_interleave(*[v[..., j, :] for j in range(n)])),
                P=_one(_interleave(*[k[..., j, :] for j in range(n)])), n_virtual=n,
                own_decay=True, beta=_interleave(*[beta[..., j] for j in range(n)]))


FORMS = {
    "gla": gla,
    "delta_rule": delta_rule,
    "gated_delta_rule": gated_delta_rule,
    "kda": kda,
    "dplr": dplr,
    "hdla": hdla,
    "gated_delta_product": gated_delta_product,
}
