"""The affine form of the recurrence: a segment of tokens maps S_in to M S_in + B.

M [..., K, K] and B [..., K, V] per head. Segments compose associatively,
(M2, B2) o (M1, B1) = (M2 M1, M2 B1 + B2), which is what context parallelism is built on:
each shard summarizes its tokens from a zero state, the summaries are scanned, and each
shard finishes with its true initial state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dplr_jax.ops.api import SPECS, acc_dtype, run, validate
from dplr_jax.ops._checks import check_options


def transition(op, q, k, v, *gates, cu_seqlens=None, chunk_size=64, backend="auto"):
    """(M, B) of each segment for `op` (an op function or its name), taking the op's positional
    inputs (q is unused and may be None). Segments are batch rows, or packed sequences when
    cu_seqlens is given. Returns M [N, HV, K, K], B [N, HV, K, V] (float32, or float64).

    The recurrence is linear in (state, values) jointly, so one run of the op itself from the
    state [I | 0] with values [0 | v] ends in [M | B].
    """
    name = op if isinstance(op, str) else op.__name__
    if name not in SPECS:
        raise ValueError(f"transition: argument 'op' is {name!r}; expected one of {list(SPECS)}")
    spec = SPECS[name]
    if q is None:
        kk = jnp.asarray(k)
        q = jnp.zeros(kk.shape[:3] + kk.shape[-1:], kk.dtype)
    dims, args = validate(spec, dict(zip(("q", "k", "v") + spec.gates, (q, k, v) + gates)))
    N = check_options(name, dims, chunk_size=chunk_size, backend=backend, cu_seqlens=cu_seqlens,
                      initial_state=None, n_state_heads=dims.sizes[spec.state_heads], scale=None)
    inputs = [args[n] for n in ("q", "k", "v") + spec.gates]
    HV, K, V = dims.sizes[spec.state_heads], dims.sizes["K"], dims.sizes["V"]
    dtype = acc_dtype(*inputs)
    h = jnp.concatenate([jnp.broadcast_to(jnp.eye(K, dtype=dtype), (N, HV, K, K)),
                         jnp.zeros((N, HV, K, V), dtype)], axis=-1)
    v_wide = jnp.concatenate([jnp.zeros(v.shape[:-1] + (K,), v.dtype), jnp.asarray(v)], axis=-1)
    widened = dict(zip(("q", "k", "v") + spec.gates, (q, k, v_wide) + gates))
    _, S = run(spec, widened, scale=None, initial_state=h, output_final_state=True,
               cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)
    return S[..., :K], S[..., K:]


def compose(second, first):
    """second o first: apply `first`, then `second`."""
    M2, B2 = second
    M1, B1 = first
    return (jnp.einsum("...ij,...jk->...ik", M2, M1),
            jnp.einsum("...ij,...jv->...iv", M2, B1) + B2)


def apply(t, S):
    """M S + B."""
    M, B = t
    return jnp.einsum("...ij,...jv->...iv", M, S) + B


def scan(transitions, axis=0):
    """Inclusive prefix compositions along `axis`: out[i] = t[i] o ... o t[0], in log depth."""
    return jax.lax.associative_scan(lambda a, b: compose(b, a), transitions, axis=axis)
