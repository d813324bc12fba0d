"""The chunk engine with Pallas phases, and the ops built on it (backend "pallas").

Phases 2 and 3 (the state scan and the output matmul o = Qs S + O0) are one Pallas kernel
forward and two backward (state_pass.py: a sequential one and a parallel one per chunk), for
every op of forms.py, up to the key width `Config.max_k` (GPU: 256; wider states run XLA's
scan, and XLA's phase 1 around the decayed-product kernels). Phase 1 (per-chunk factored
transitions and Qs, O0): its intra-chunk decayed products of per-channel decays (kda, gla,
dplr, hdla), of scalar ones (gated_delta_rule, gated_delta_product) and of none (delta_rule)
run in the Pallas kernels of decayed.py where the configuration names their launch
(`Config.products`, `Config.scalar_products`); for rank-1 forms (at most one probed and
one plain key per token: every op but DPLR of a higher rank) the rest runs in the kernels
of factors.py (`Config.factors`); otherwise it is the XLA `chunk_factors` of chunked.py,
differentiated by JAX and rematerialized in the backward pass but for the decayed products
and the UT inverse, which it keeps (chunked.SAVED).

A call without gradients (the primal of _forward_only's custom_vjp) reads q and the keys as
given: no float32 copies of 16-bit inputs, q in place, the kernels casting as they load.
With gradients they are cast first, so that each input's float32 cotangents from the kernels
that read it are summed before one rounding. On the H100 at B=4, T=4096, H=16, K=V=128 bf16
the forward went from 1.34 to 1.23 ms for gla, 1.59 to 1.46 for gated_delta_rule, 3.15 to
2.67 for gated_delta_product n=2, and with the keys of rank 1 in place too gla to 1.18 and
gated_delta_rule to 1.39 (benchmarks/NOTES.md, twenty-sixth session); kda, dplr and hdla
keep the copies (api.run_chunked says why). For scalar decays or none the delta family's
keys beta k are formed by the kernels from k as given (Form.beta): gated_delta_rule 1.42 ->
1.31 ms, delta_rule 1.36 -> 1.21 (twenty-seventh session).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dplr_jax.ops import chunked
from dplr_jax.ops.api import run_chunked, static_scale
from dplr_jax.ops.pallas import decayed, factors
from dplr_jax.ops.pallas.decayed import _acc
from dplr_jax.ops.pallas.state_pass import Config, _pow2, state_pass


def _scan(layout, factors, h0, *, cfg, o_dtype, scale=1.0, values=None):
    """Phases 2 and 3 in the state-pass kernel: (o [B, NC, C, H, V] in o_dtype, times scale,
    final states) from phase 1's factored transitions (chunked.chunk_factors) and the initial
    states h0 [N, H, K, V]. values: None, or X in the values' [B, NC, C, H, V] chunks of the
    tokens' layout (forms without probed keys, values of rank 1: GLA; chunked.chunked), which
    the "loop" form's kernels read where they lie (state_pass's x_tokens): no move of them to
    the chunk-major layout, nor of their cotangent back. On the H100 at B=4, T=4096, H=16,
    K=V=128 those moves took 0.048 ms of gla's forward and 0.045 of its backward."""
    N = h0.shape[0]
    x_tokens = values is not None and cfg.form == "loop"
    if values is not None:
        factors = factors[:3] + (values if x_tokens else jnp.moveaxis(values, 3, 1),) + \
            factors[4:]
    B, NC = factors[4].shape[0], layout.NC
    Nb = N // B  # states per batch row: 1, or the N packed sequences
    src = jnp.where(layout.reset[None, :], layout.init_idx % Nb, -1).astype(jnp.int32)
    dst = jnp.full((B, NC), -1, jnp.int32).at[layout.final_row, layout.final_chunk].set(
        jnp.arange(N, dtype=jnp.int32) % Nb)
    h0 = h0.reshape((B, Nb) + h0.shape[1:])
    # The kernels hold states in float32 (float64 inputs under x64 run them in float32 too);
    # X stays 16-bit where it is the values as given (forms without probed keys: GLA).
    keep = lambda i, x: i == 3 and factors[2] is None and x.dtype.itemsize == 2
    o, finals = state_pass(*(x if x is None or keep(i, x) else x.astype(jnp.float32)
                             for i, x in enumerate(factors)), h0, src, dst, cfg, o_dtype,
                          scale, x_tokens)
    return o, finals.reshape((N,) + finals.shape[2:])


def _phase1(q, g, E, y, P, F, Vk, beta=None, *, decayed, own_decay, **kernel):
    """Phase 1 of one chunk: in the kernels of factors.py where they take the form (one key
    of each kind per token, or DPLR of rank 2 or 4 in chunks of at most 128 rows:
    factors.takes), otherwise in XLA (chunked.chunk_factors). beta: E's row scale, formed
    on chip (factors.low_rank_factors; rank-1 probed keys only, which the kernels take)."""
    if factors.takes(E, F):
        return factors.low_rank_factors(q, g, E, y, P, F, Vk, beta, decayed=decayed,
                                        own_decay=own_decay, **kernel)
    up = lambda x: None if x is None else x.astype(_acc(x))  # 16-bit as given
    ranked = lambda x: x if x is None or x.ndim == 3 else x[:, None]  # read in place
    return chunked.checkpointed(chunked.chunk_factors, decayed=decayed, own_decay=own_decay)(
        up(q), up(g), *(up(ranked(x)) for x in (E, y, P, F, Vk)))


def op(name, *inputs, scale, initial_state, cu_seqlens, chunk_size, cfg: Config, bounded=False):
    """Op `name` (a key of forms.FORMS) on validated inputs; returns (o, final state)."""
    exact = cfg.precision  # the float32 precision, for in-kernel sums of log decays
    sixteen_bit = any(x.dtype not in (jnp.float32, jnp.float64) for x in inputs if x is not None)
    if sixteen_bit:
        cfg = dataclasses.replace(cfg, precision=cfg.precision_16bit)
    products = phase1 = None
    if cfg.products is not None and cfg.form == "loop":  # Triton / interpret kernels only
        products = functools.partial(decayed.decayed_products, interpret=cfg.interpret,
                                     precision=cfg.precision, exact=exact, launch=cfg.products,
                                     scalar_launch=cfg.scalar_products)
    if cfg.factors is not None and cfg.form == "loop":
        phase1 = functools.partial(_phase1, interpret=cfg.interpret, precision=cfg.precision,
                                   exact=exact, launch=cfg.factors)
    # o leaves the state pass in the op's output dtype (q's) where that is 16-bit: rounded
    # there once. Otherwise float32, the kernels' accumulation dtype.
    q_dtype = jnp.dtype(inputs[0].dtype)
    o_dtype = q_dtype if q_dtype.itemsize == 2 else jnp.float32
    scan = functools.partial(_scan, cfg=cfg, o_dtype=o_dtype)
    if cfg.max_k is not None and _pow2(inputs[0].shape[-1]) > cfg.max_k:
        scan = None  # the state is too wide for the kernel: XLA's scan (chunked.py)
    run = functools.partial(run_chunked, name, scale=scale, chunk_size=chunk_size,
                            bounded=bounded, decayed=products, scan=scan, factors=phase1)
    if phase1 is None or scan is None or not static_scale(scale):
        return run(inputs, initial_state=initial_state, cu_seqlens=cu_seqlens)
    return _forward_only(run)(inputs, initial_state, cu_seqlens)


def _forward_only(run):
    """run (run_chunked with the Pallas phases) as a function of (inputs, initial state,
    cu_seqlens) whose primal, a call without gradients, reads q and the keys as given
    (run_chunked's forward_only: for 16-bit inputs no float32 copies and half the kernels'
    reads of them, q in place), and whose gradients are those of the path that casts them.
    There each kernel's custom_vjp returns float32 cotangents, which XLA sums before one
    rounding to the input's dtype; with q and the keys as given, q's (read by the products
    and the factors kernels) would be rounded once per kernel."""
    @jax.custom_vjp
    def forward(inputs, h0, cu_seqlens):
        return run(inputs, initial_state=h0, cu_seqlens=cu_seqlens, forward_only=True)

    def forward_fwd(inputs, h0, cu_seqlens):
        return jax.vjp(lambda x, h: run(x, initial_state=h, cu_seqlens=cu_seqlens), inputs, h0)

    def forward_bwd(pullback, cts):
        return (*pullback(cts), None)  # no cotangent for cu_seqlens

    forward.defvjp(forward_fwd, forward_bwd)
    return forward


def kernel(name, cfg: Config):
    """The backends.register implementation of op `name` for launch configuration cfg."""
    return functools.partial(op, name, cfg=cfg)
