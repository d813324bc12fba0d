"""Public ops: validation, dtype policy and backend dispatch around the reference and chunk engine.

Layout [B, T, H, D]. Every op returns (o, final_state); final_state is None unless
output_final_state=True. o has q's dtype; states and all accumulation are float32 (float64
when the inputs are float64). The "reference" backend computes in float64 whenever
jax_enable_x64 is on, so it can serve as ground truth for any input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax.ops import backends, chunked, forms, reference
from dplr_jax.ops._checks import (Dims, check_float, check_lower_bound, check_nonpositive,
                                  check_options, default_scale)


@dataclasses.dataclass(frozen=True)
class Spec:
    """An op: its arguments after (q, k, v), their layouts, and its reference step."""

    name: str
    gates: tuple[str, ...]  # names of the arguments after v, in order
    layouts: dict  # argument -> dims, or (full dims, rank-1 shorthand dims, rank symbol)
    state_heads: str  # "HV" (grouped value heads allowed) or "H"
    step: Callable
    log_decays: tuple[str, ...] = ("log_decay",)
    optional: tuple[str, ...] = ()

    @property
    def bounded(self) -> bool:
        """Takes `log_decay_lower_bound`: its log decay is per key channel (the diagonal
        blocks of its intra-chunk products are what the bound makes faster)."""
        layout = self.layouts.get("log_decay")
        return layout is not None and (layout[0] if isinstance(layout[0], tuple)
                                       else layout)[-1] == "K"


_QK = {"q": ("B", "T", "H", "K"), "k": ("B", "T", "H", "K")}
SPECS = {
    s.name: s
    for s in [
        Spec("gla", ("log_decay",), {**_QK, "v": ("B", "T", "H", "V"),
                                     "log_decay": ("B", "T", "H", "K")}, "H", reference.gla_step),
        Spec("delta_rule", ("beta",), {**_QK, "v": ("B", "T", "HV", "V"), "beta": ("B", "T", "HV")},
             "HV", reference.delta_rule_step, log_decays=()),
        Spec("gated_delta_rule", ("log_decay", "beta"),
             {**_QK, "v": ("B", "T", "HV", "V"), "log_decay": ("B", "T", "HV"),
              "beta": ("B", "T", "HV")}, "HV", reference.gated_delta_rule_step),
        Spec("kda", ("log_decay", "beta"),
             {**_QK, "v": ("B", "T", "HV", "V"), "log_decay": ("B", "T", "HV", "K"),
              "beta": ("B", "T", "HV")}, "HV", reference.kda_step),
        Spec("dplr", ("log_decay", "a", "b"),
             {"q": ("B", "T", "H", "K"),
              "k": (("B", "T", "H", "Rkv", "K"), ("B", "T", "H", "K"), "Rkv"),
              "v": (("B", "T", "H", "Rkv", "V"), ("B", "T", "H", "V"), "Rkv"),
              "log_decay": ("B", "T", "H", "K"),
              "a": (("B", "T", "H", "R", "K"), ("B", "T", "H", "K"), "R"),
              "b": (("B", "T", "H", "R", "K"), ("B", "T", "H", "K"), "R")},
             "H", reference.dplr_step, optional=("log_decay",)),
        Spec("hdla", ("log_decay", "beta"),
             {**_QK, "v": ("B", "T", "H", "V"), "log_decay": ("B", "T", "H", "K"),
              "beta": ("B", "T", "H")}, "H", reference.hdla_step),
        Spec("gated_delta_product", ("log_decay", "beta"),
             {"q": ("B", "T", "H", "K"), "k": ("B", "T", "H", "n", "K"),
              "v": ("B", "T", "H", "n", "V"), "beta": ("B", "T", "H", "n"),
              "log_decay": ("B", "T", "H")}, "H", reference.gated_delta_product_step),
    ]
}


def _drop_t(layout):
    if isinstance(layout[0], tuple):
        return (_drop_t(layout[0]), _drop_t(layout[1]), layout[2])
    return tuple(d for d in layout if d != "T")


def validate(spec: Spec, args: dict, *, step=False):
    """Checks shapes/dtypes of q, k, v and the gates; returns (Dims, args with rank axes added)."""
    dims = Dims(spec.name + ("_step" if step else ""))
    out = {}
    for name in ("q", "k", "v") + spec.gates:
        x = args[name]
        if x is None and name in spec.optional:
            out[name] = None
            continue
        if x is not None and not hasattr(x, "shape"):
            x = jnp.asarray(x)
        layout = spec.layouts[name]
        if step:
            layout = _drop_t(layout)
        check_float(dims.op, name, x)
        if isinstance(layout[0], tuple):
            out[name] = dims.bind_either(name, x, *layout)
        else:
            out[name] = dims.bind(name, x, layout)
    if spec.state_heads == "HV":
        dims.heads()
    for name in spec.log_decays:
        check_nonpositive(dims.op, name, out.get(name))
    return dims, out


def acc_dtype(*xs):
    """float64 if any input is float64 (x64 mode), else float32."""
    return jnp.float64 if any(x is not None and x.dtype == jnp.float64 for x in xs) else jnp.float32


def _cast(xs, dtype):
    return [None if x is None else x.astype(dtype) for x in xs]


def run(spec: Spec, args: dict, *, scale, initial_state, output_final_state, cu_seqlens,
        chunk_size, backend, log_decay_lower_bound=None):
    dims, args = validate(spec, args)
    N = check_options(spec.name, dims, chunk_size=chunk_size, backend=backend,
                      cu_seqlens=cu_seqlens, initial_state=initial_state,
                      n_state_heads=dims.sizes[spec.state_heads], scale=scale)
    if log_decay_lower_bound is not None:
        check_lower_bound(spec.name, log_decay_lower_bound, args["log_decay"])
    bounded = log_decay_lower_bound is not None
    scale = default_scale(scale, dims.sizes["K"])
    inputs = [args[n] for n in ("q", "k", "v") + spec.gates]
    q = inputs[0]
    if cu_seqlens is not None:
        cu_seqlens = jnp.asarray(cu_seqlens, jnp.int32)
    if backend == "auto":  # on the CPU a registered kernel only interprets: use xla there
        backend = ("pallas" if jax.default_backend() != "cpu"
                   and backends.lookup(spec.name) is not None else "xla")
    if backend == "pallas":
        kernel = backends.lookup(spec.name)
        if kernel is None:
            raise ValueError(f"{spec.name}: argument 'backend' is 'pallas', but no Pallas kernel "
                             f"is registered for {spec.name} on platform "
                             f"'{jax.default_backend()}'; use 'xla' or 'auto'")
        o, S = kernel(*inputs, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                      chunk_size=chunk_size, bounded=bounded)
    elif backend == "reference":
        dtype = jnp.float64 if jax.config.read("jax_enable_x64") else acc_dtype(*inputs)
        h0 = _initial_state(initial_state, N, dims.sizes[spec.state_heads], dims.sizes["K"],
                            dims.sizes["V"], dtype)
        o, S = reference.scan(spec.step, _cast(inputs, dtype), h0, scale, cu_seqlens)
    else:
        o, S = run_chunked(spec.name, inputs, scale=scale, initial_state=initial_state,
                           cu_seqlens=cu_seqlens, chunk_size=chunk_size, bounded=bounded)
    S = S.astype(acc_dtype(*inputs, initial_state)) if output_final_state else None
    return o.astype(q.dtype), S


def _initial_state(initial_state, N, HV, K, V, dtype):
    if initial_state is None:
        return jnp.zeros((N, HV, K, V), dtype)
    return jnp.asarray(initial_state, dtype)


def static_scale(scale):
    """Whether scale is a Python or NumPy number (not traced): a static argument of kernels."""
    return isinstance(scale, (int, float, np.number))


def run_chunked(name, inputs, *, scale, initial_state, cu_seqlens, chunk_size, bounded=False,
                decayed=None, scan=None, factors=None, forward_only=False):
    """The chunk engine for op `name` on validated inputs (backend "xla"; the Pallas kernels
    pass their phases as `decayed` / `scan` / `factors`, see chunked.chunked): cast to the
    accumulation dtype (but v, which `factors` takes as given), scale q (with `scan`, the
    Pallas state pass, scale o there instead), build the op's form,
    run it (n virtual tokens per token for multi-factor ops, in chunks of chunk_size virtual
    tokens: phase 1 costs O(C) per virtual token, and the state pass's dots grow past C = 64;
    a chunk may split a token's virtual group) and read each token's output at its last
    virtual token. bounded: the log decays are >= chunked.MIN_BOUND (checked by the caller);
    without it, the Pallas products (`decayed`) check per chunk and head whether their bounded
    version is safe for these decays (chunked.chunked, "check").
    forward_only (with `factors` and `scan`; not differentiable: pallas.engine.op's primal):
    q and the keys stay as given too, and q goes to phase 1 in place (chunked.chunked).
    Returns o (accumulation dtype) and the final states."""
    dtype = acc_dtype(*inputs, initial_state)
    # With phase 1's kernels the values v stay as given (16-bit: half the bytes, and no
    # float32 copy): the kernels cast them on chip. So do q and the keys in a forward-only
    # call, where no cotangent would be rounded to their dtype once per kernel that reads
    # them (engine.op); the log decays and beta (which XLA multiplies into keys) are cast.
    as_given = (2,) if factors is not None else ()
    if forward_only:
        spec = SPECS[name]
        as_given = tuple(i for i, arg in enumerate(("q", "k", "v") + spec.gates)
                         if arg not in spec.log_decays + ("beta",))
    xs = [x if i in as_given or x is None else x.astype(dtype) for i, x in enumerate(inputs)]
    # The Pallas state pass applies a static scale to o (and to o's cotangent) in its kernels:
    # q reaches phase 1 unscaled, with no multiply of its own.
    if scan is not None and static_scale(scale):
        scan = functools.partial(scan, scale=scale)
    else:
        xs[0] = xs[0] * scale
    q, v = xs[0], xs[2]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = _initial_state(initial_state, N, v.shape[2], q.shape[-1], v.shape[-1], dtype)
    form = forms.FORMS[name](*xs)
    n = form.n_virtual
    # Where n divides the chunk, a chunk holds whole tokens and the engine forms only the
    # outputs read (one per token; at least 16 rows per chunk, the kernels' smallest tiles);
    # otherwise every virtual token's, and keeps the last.
    whole = chunk_size % n == 0 and chunk_size // n >= 16
    # In a call without gradients, for scalar decays or none, the delta family's probed keys
    # beta k go as k (as given) and beta, which the kernels multiply: no float32 copy of
    # beta k (the per-channel products take it formed, and kda's keys are cast below).
    on_chip = forward_only and form.beta is not None and (form.g is None or form.g.ndim == 3)
    q, *rest = form.engine_inputs(keys_on_chip=on_chip)
    keys_as_given = forward_only
    if forward_only and rest[0] is not None and rest[0].ndim == 4 and rest[1] is not None:
        # Per-channel decays with probed keys (kda, dplr, hdla): their products kernels, with
        # two query sides (q and the probes), ran slower on 16-bit sides than the copies
        # saved on the H100 (kda's 0.39 -> 0.46 ms, dplr's two 0.84 -> 1.22, hdla's 0.76 ->
        # 0.89; gla's one side 0.267 -> 0.273; benchmarks/NOTES.md, twenty-sixth session):
        # q and the keys go cast, as with gradients.
        up = lambda x: None if x is None else x.astype(dtype)
        q, rest = up(q), [up(x) if i in (1, 3, 4) else x for i, x in enumerate(rest)]
        keys_as_given = False
    # Inputs as given go to the Pallas kernels in their chunks, where the move to the
    # chunk-major layout would be a copy of its own (chunked.chunked's in_place): log decays
    # in the accumulation dtype (not cast, not formed by the op; a cast or formed g is
    # written by XLA anyway and moves on the way), and the values of rank 1 (v itself with a
    # rank axis: the delta family's y, DPLR's Vk; GLA's go to the state pass where they lie,
    # chunked.chunked) where phase 1's kernels take them (with the state-pass kernel: without
    # it chunked.chunked runs XLA's chunk_summary).
    in_place = ("q",) if forward_only else ()
    if (decayed is not None or factors is not None) and any(
            rest[0] is x and x0.dtype == dtype for x, x0 in zip(xs, inputs) if x is not None):
        in_place += ("g",)
    y = rest[2]
    rank1 = lambda x: factors is not None and scan is not None and n == 1 and (
        x is not None and x.shape[3] == 1)
    in_place += tuple(name for name, x in (("y", y), ("Vk", rest[5])) if rank1(x))
    # ... and in a call without gradients the keys as given of rank 1 (the probes of the
    # delta family: k itself; GLA's plain keys)
    in_place += tuple(name for name, x in (("P", rest[3]), ("F", rest[4]))
                      if keys_as_given and rank1(x))
    # ... and E where it is P (on_chip)
    in_place += ("E",) if on_chip and "P" in in_place else ()
    o, S = chunked.chunked(q if whole else chunked.at_last(q, n, axis=1), *rest, h0,
                           chunk_size=chunk_size, in_place=in_place,
                           cu_seqlens=None if cu_seqlens is None else cu_seqlens * n,
                           own_decay=form.own_decay,
                           decayed=decayed or chunked.decayed_products,
                           bounded=bounded or ("check" if decayed is not None else False),
                           scan=scan, factors=factors, beta=form.beta if on_chip else None)
    if not whole:
        o = o.reshape(o.shape[0], -1, n, *o.shape[2:])[:, :, -1]
    return o, S


def run_step(spec: Spec, args: dict, state, *, scale):
    dims, args = validate(spec, args, step=True)
    want = (dims.sizes["B"], dims.sizes[spec.state_heads], dims.sizes["K"], dims.sizes["V"])
    if state is None or tuple(state.shape) != want:
        raise ValueError(f"{dims.op}: argument 'state' has shape "
                         f"{None if state is None else tuple(state.shape)}; expected "
                         f"[B, {spec.state_heads}, K, V] = {want}")
    check_float(dims.op, "state", state)
    inputs = [args[n] for n in ("q", "k", "v") + spec.gates]
    dtype = acc_dtype(*inputs, state)
    o, S = spec.step(*_cast(inputs, dtype), state.astype(dtype),
                     default_scale(scale, dims.sizes["K"]))
    return o.astype(inputs[0].dtype), S
