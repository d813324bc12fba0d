"""DPLR linear-attention primitives.

    S_t = (Diag(exp g_t) - A_t B_t^T) S_{t-1} + K_t V_t^T,     o_t = scale * S_t^T q_t

Layout [B, T, H, D]; every op returns (o, final_state). Keyword options on every op:
scale (default K**-0.5), initial_state (float32 [N, HV, K, V]), output_final_state,
cu_seqlens (int32 [N+1], B == 1: packed sequences, state reset at each boundary),
chunk_size (power of two >= 16; hdla and gated_delta_product count their n virtual
steps per token: a chunk holds chunk_size steps, about chunk_size / n tokens, and may split a
token's steps), backend ("auto", "pallas", "xla", "reference"); the ops
with per-channel log decays (gla, kda, dplr, hdla) also take log_decay_lower_bound: None, or
a promise L in [-5, 0) that every log decay is >= L. It lets the chunk paths form the
diagonal 16 x 16 blocks of the intra-chunk decays as one product of factors of at most
e^{8|L|} instead of token-by-token sums (forward and backward, both backends), at float32
rounding of those exponents. It is checked against log_decay
when that is concrete, not under jit: decays below it are outside the contract (factors may
overflow to inf/NaN or lose precision).
`<op>_step` functions take one token (no T axis) and `state` [B, HV, K, V] and return
(o, state): O(1) recurrent decoding.
"""

from __future__ import annotations

import inspect

from dplr_jax.ops import affine
from dplr_jax.ops.api import SPECS, run, run_step
from dplr_jax.ops.hdla_factors import hdla_factors
from dplr_jax.ops import pallas  # noqa: F401  (registers the Pallas kernels with ops.backends)


def _op(name):
    spec = SPECS[name]
    params = ("q", "k", "v") + spec.gates

    def op(*args, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
           chunk_size=64, backend="auto", log_decay_lower_bound=None):
        if len(args) != len(params):
            raise TypeError(f"{name}() takes {len(params)} positional arguments "
                            f"({', '.join(params)}), got {len(args)}")
        if log_decay_lower_bound is not None and not spec.bounded:
            raise TypeError(f"{name}() got an unexpected keyword argument "
                            f"'log_decay_lower_bound' (it is for the ops with per-channel log "
                            f"decays: gla, kda, dplr, hdla)")
        return run(spec, dict(zip(params, args)), scale=scale, initial_state=initial_state,
                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                   chunk_size=chunk_size, backend=backend,
                   log_decay_lower_bound=log_decay_lower_bound)

    def step(*args, scale=None):
        if len(args) != len(params) + 1:
            raise TypeError(f"{name}_step() takes {len(params) + 1} positional arguments "
                            f"({', '.join(params)}, state), got {len(args)}")
        return run_step(spec, dict(zip(params, args[:-1])), args[-1], scale=scale)

    P = inspect.Parameter
    pos = [P(p, P.POSITIONAL_OR_KEYWORD) for p in params]
    kw = [P(n, P.KEYWORD_ONLY, default=d) for n, d in [
        ("scale", None), ("initial_state", None), ("output_final_state", False),
        ("cu_seqlens", None), ("chunk_size", 64), ("backend", "auto")]]
    bound = [P("log_decay_lower_bound", P.KEYWORD_ONLY, default=None)] if spec.bounded else []
    op.__signature__ = inspect.Signature(pos + kw + bound)
    step.__signature__ = inspect.Signature(pos + [P("state", P.POSITIONAL_OR_KEYWORD)] + kw[:1])
    op.__name__, step.__name__ = name, name + "_step"
    op.__qualname__, step.__qualname__ = op.__name__, step.__name__
    step.__doc__ = f"One token of {name}: the inputs of {name} without the T axis, and state " \
                   f"[B, HV, K, V]. Returns (o, state)."
    return op, step


gla, gla_step = _op("gla")
gla.__doc__ = """GLA: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T.

    q, k [B,T,H,K]; v [B,T,H,V]; log_decay [B,T,H,K] <= 0."""

delta_rule, delta_rule_step = _op("delta_rule")
delta_rule.__doc__ = """DeltaNet: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T.

    q, k [B,T,H,K]; v [B,T,HV,V]; beta [B,T,HV] (HV = G*H grouped value heads)."""

gated_delta_rule, gated_delta_rule_step = _op("gated_delta_rule")
gated_delta_rule.__doc__ = """Gated DeltaNet: S_t = (I - b k k^T) exp(g_t) S_{t-1} + b k v^T.

    q, k [B,T,H,K]; v [B,T,HV,V]; log_decay [B,T,HV] <= 0; beta [B,T,HV]."""

kda, kda_step = _op("kda")
kda.__doc__ = """Kimi Delta Attention: S_t = (I - b k k^T) Diag(exp(g_t)) S_{t-1} + b k v^T.

    q, k [B,T,H,K]; v [B,T,HV,V]; log_decay [B,T,HV,K] <= 0; beta [B,T,HV]."""

dplr, dplr_step = _op("dplr")
dplr.__doc__ = """General DPLR: S_t = (Diag(exp(g_t)) - sum_r a_r b_r^T) S_{t-1} + sum_j k_j v_j^T.

    q [B,T,H,K]; k [B,T,H,Rkv,K] (or [B,T,H,K]); v [B,T,H,Rkv,V] (or [B,T,H,V]);
    log_decay [B,T,H,K] <= 0 or None (identity diagonal); a, b [B,T,H,R,K] (or [B,T,H,K])."""

hdla, hdla_step = _op("hdla")
hdla.__doc__ = """HDLA: S_t = (I - b k k^T) Diag(exp(g_t)) (I - b k k^T) S_{t-1} + k v^T.

    q, k [B,T,H,K]; v [B,T,H,V]; log_decay [B,T,H,K] (log lambda) <= 0; beta [B,T,H] in (0,2)."""

gated_delta_product, gated_delta_product_step = _op("gated_delta_product")
gated_delta_product.__doc__ = """Gated DeltaProduct: per token S <- exp(g_t) S, then for j = 1..n
S <- (I - b_j k_j k_j^T) S + b_j k_j v_j^T; o_t reads S after step n.

    q [B,T,H,K]; k [B,T,H,n,K]; v [B,T,H,n,V]; beta [B,T,H,n]; log_decay [B,T,H] <= 0."""

OPS = {name: globals()[name] for name in SPECS}

__all__ = ["affine", "hdla_factors", "OPS"] + [n for name in SPECS for n in (name, name + "_step")]
