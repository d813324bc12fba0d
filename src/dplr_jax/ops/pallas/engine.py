"""The chunk engine with Pallas phases, and the ops built on it (backend "pallas").

Phases 2 and 3 (the state scan and the output matmul o = Qs S + O0) are one Pallas kernel
forward and one backward (state_pass.py), for every op of forms.py. Phase 1 (per-chunk
summaries M, Bc, Qs, O0) is the XLA `chunk_summary` of chunked.py, differentiated by JAX and
rematerialized in the backward pass, except for its intra-chunk decayed products of
per-channel decays (kda, gla, dplr, hdla), which run in the Pallas kernels of decayed.py
where the configuration names their launch (`Config.products`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from dplr_jax.ops import chunked as xla_chunked
from dplr_jax.ops.api import run_chunked
from dplr_jax.ops.pallas import decayed
from dplr_jax.ops.pallas.state_pass import Config, state_pass


def _scan(layout, M, Bc, Qs, O0, h0, *, cfg):
    """Phases 2 and 3 in the state-pass kernel: (o, S_in) as chunked._scan_outputs."""
    B = Qs.shape[0]
    Nb = h0.shape[0] // B  # initial states a batch row can load: 1, or N packed sequences
    src = jnp.where(layout.reset[None, :], layout.init_idx % Nb, -1).astype(jnp.int32)
    h0 = h0.reshape((B, Nb) + h0.shape[1:])
    # The kernels hold states in float32 (float64 inputs under x64 run them in float32 too).
    return state_pass(*(x.astype(jnp.float32) for x in (M, Bc, Qs, O0)), h0, src, cfg)


def op(name, *inputs, scale, initial_state, cu_seqlens, chunk_size, cfg: Config):
    """Op `name` (a key of forms.FORMS) on validated inputs; returns (o, final state)."""
    sixteen_bit = any(x.dtype not in (jnp.float32, jnp.float64) for x in inputs if x is not None)
    if sixteen_bit:
        cfg = dataclasses.replace(cfg, precision=cfg.precision_16bit)
    summaries = None
    if cfg.products is not None and cfg.form == "loop":  # Triton / interpret kernels only
        summaries = functools.partial(xla_chunked._summaries, decayed=functools.partial(
            decayed.decayed_products, interpret=cfg.interpret, precision=cfg.precision,
            launch=cfg.products))
    return run_chunked(name, inputs, scale=scale, initial_state=initial_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                       summaries=summaries,
                       scan=functools.partial(_scan, cfg=cfg))


def kernel(name, cfg: Config):
    """The backends.register implementation of op `name` for launch configuration cfg."""
    return functools.partial(op, name, cfg=cfg)
