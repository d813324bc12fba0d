"""The chunk engine with its state pass in Pallas, and the ops built on it (backend "pallas").

Phase 1 (per-chunk summaries M, Bc, Qs, O0) is still the XLA `chunk_summary` of chunked.py,
differentiated by JAX (rematerialized in the backward pass); phases 2 and 3 (the state scan
and the output matmul o = Qs S + O0) are one Pallas kernel forward and one backward
(state_pass.py). Every op of forms.py therefore runs here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from dplr_jax.ops import chunked as xla_chunked
from dplr_jax.ops import forms
from dplr_jax.ops.api import acc_dtype
from dplr_jax.ops.layout import ChunkLayout
from dplr_jax.ops.pallas.state_pass import Config, state_pass


def chunked(q, g, E, y, P, F, Vk, h0, *, chunk_size, cu_seqlens, cfg: Config):
    """chunked.chunked with the state pass in Pallas: same inputs and outputs."""
    B, T, H = q.shape[:3]
    layout = ChunkLayout.make(B, T, chunk_size, cu_seqlens)
    M, Bc, Qs, O0 = xla_chunked._summaries(layout, q, g, E, y, P, F, Vk)
    N = h0.shape[0]
    Nb = N // B  # initial states a batch row can load: 1, or N packed sequences when B == 1
    src = jnp.where(layout.reset[None, :], layout.init_idx % Nb, -1).astype(jnp.int32)
    h0 = h0.reshape((B, Nb) + h0.shape[1:])
    # The kernels hold states in float32 (float64 inputs under x64 run them in float32 too).
    o, S_in = state_pass(*(x.astype(jnp.float32) for x in (M, Bc, Qs, O0)), h0, src, cfg)
    r, c = layout.final_row, layout.final_chunk
    finals = xla_chunked._apply(M[r, :, c], S_in[r, :, c]) + Bc[r, :, c]
    return layout.from_chunks(jnp.moveaxis(o, 1, 3)), finals


def op(name, *inputs, scale, initial_state, cu_seqlens, chunk_size, cfg: Config):
    """Op `name` (a key of forms.FORMS) on validated inputs; returns (o float32, final state).

    Mirrors the "xla" branch of api.run: cast to the accumulation dtype, scale q, build the
    engine form, run the engine (virtual tokens for multi-factor ops) and keep the outputs at
    each token's last virtual step.
    """
    dtype = acc_dtype(*inputs, initial_state)
    xs = [None if x is None else x.astype(dtype) for x in inputs]
    xs[0] = xs[0] * scale
    form = forms.FORMS[name](*xs)
    n = form.n_virtual
    B, HV, K, V = xs[0].shape[0], xs[2].shape[2], xs[0].shape[-1], xs[2].shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = (jnp.zeros((N, HV, K, V), dtype) if initial_state is None
          else initial_state.astype(dtype))
    vchunk = chunk_size if n == 1 else 1 << (chunk_size * n - 1).bit_length()
    if any(x.dtype not in (jnp.float32, jnp.float64) for x in inputs if x is not None):
        cfg = dataclasses.replace(cfg, precision=cfg.precision_16bit)
    o, S = chunked(*form.engine_inputs(), h0, chunk_size=vchunk,
                   cu_seqlens=None if cu_seqlens is None else cu_seqlens * n, cfg=cfg)
    if n > 1:
        o = o.reshape(o.shape[0], -1, n, *o.shape[2:])[:, :, -1]
    return o, S.astype(dtype)


def kernel(name, cfg: Config):
    """The backends.register implementation of op `name` for launch configuration cfg."""
    return functools.partial(op, name, cfg=cfg)
