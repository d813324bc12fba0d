"""Input validation shared by every op: shapes bound to named dimensions, dtypes, options.

Every failure is a ValueError that names the op, the argument, the shape it got and the
shape it expected, e.g.::

    kda: argument 'v' has shape (2, 64, 3, 32); expected [B, T, HV, V] = (2, 64, 4·G, *)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dplr_jax.ops.chunked import MIN_BOUND

FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)
BACKENDS = ("auto", "pallas", "xla", "reference")


class Dims:
    """Binds symbolic dimension names (B, T, H, K, ...) to sizes across an op's arguments."""

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, int] = {}

    def fail(self, name, x, dims, why=""):
        got = tuple(np.shape(x))
        want = ", ".join(str(self.sizes.get(d, "*")) for d in dims)
        raise ValueError(
            f"{self.op}: argument '{name}' has shape {got}; expected [{', '.join(dims)}]"
            f" = ({want}){why}")

    def bind(self, name, x, dims):
        """Checks x has rank len(dims); binds unseen names, checks seen ones."""
        if x is None:
            raise ValueError(f"{self.op}: argument '{name}' is None; expected an array of "
                             f"shape [{', '.join(dims)}]")
        shape = np.shape(x)
        if len(shape) != len(dims):
            self.fail(name, x, dims, f": rank {len(shape)} instead of {len(dims)}")
        for d, n in zip(dims, shape):
            if d in self.sizes and self.sizes[d] != n:
                self.fail(name, x, dims, f": dimension {d} is {n}, but {self.sizes[d]} elsewhere")
        for d, n in zip(dims, shape):
            self.sizes.setdefault(d, n)
        return x

    def bind_either(self, name, x, full_dims, rank1_dims, rank_name):
        """Accepts the full layout (with a rank axis) or the rank-1 shorthand without it."""
        if x is not None and np.ndim(x) == len(rank1_dims) and len(rank1_dims) < len(full_dims):
            self.bind(name, x, rank1_dims)
            if rank_name in self.sizes and self.sizes[rank_name] != 1:
                self.fail(name, x, full_dims, f": {rank_name} is {self.sizes[rank_name]} elsewhere")
            self.sizes[rank_name] = 1
            return jnp.expand_dims(x, -2)
        return self.bind(name, x, full_dims)

    def heads(self, h="H", hv="HV", name="v"):
        """Grouped value heads: HV must be a positive multiple of H."""
        H, HV = self.sizes[h], self.sizes[hv]
        if HV % H:
            raise ValueError(f"{self.op}: argument '{name}' has {HV} value heads, not a multiple "
                             f"of the {H} query/key heads (grouped value heads need HV = G*H)")
        return HV // H


def check_float(op, name, x):
    if x is not None and jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise ValueError(f"{op}: argument '{name}' has dtype {x.dtype}; expected a floating "
                         f"dtype (bfloat16, float16, float32 or float64)")


def _concrete(x):
    return x is not None and not isinstance(x, jax.core.Tracer)


def check_nonpositive(op, name, x):
    """Log decays must be <= 0. Checked when the value is concrete (not under jit)."""
    if _concrete(x) and bool(np.any(np.asarray(x) > 0)):  # NumPy: also fine inside a jit trace
        raise ValueError(f"{op}: argument '{name}' must be a log decay <= 0, but has "
                         f"positive entries (max {float(np.max(np.asarray(x))):.4g})")


def check_lower_bound(op, bound, g):
    """log_decay_lower_bound: a number in [chunked.MIN_BOUND, 0) that the log decays respect
    (checked when they are concrete, not under jit, in the decays' own dtype)."""
    if (isinstance(bound, bool) or not isinstance(bound, (int, float, np.integer, np.floating))
            or not MIN_BOUND <= bound < 0):
        raise ValueError(f"{op}: argument 'log_decay_lower_bound' is {bound!r}; expected a "
                         f"number in [{MIN_BOUND:g}, 0), or None (the exact path, any decays)")
    if g is None:
        raise ValueError(f"{op}: argument 'log_decay_lower_bound' is {bound:g}, but "
                         f"'log_decay' is None (no decay to bound)")
    if _concrete(g) and bool(np.any(np.asarray(g) < np.asarray(bound, np.asarray(g).dtype))):
        raise ValueError(f"{op}: argument 'log_decay' has entries below "
                         f"log_decay_lower_bound = {bound:g} (min "
                         f"{float(np.min(np.asarray(g))):.4g})")


def check_options(op, dims: Dims, *, chunk_size, backend, cu_seqlens, initial_state, n_state_heads,
                  scale):
    """Validates the keyword options shared by every op. Returns N, the number of sequences."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: argument 'backend' is {backend!r}; expected one of {BACKENDS}")
    if (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{op}: argument 'chunk_size' is {chunk_size!r}; expected a power of "
                         f"two >= 16")
    if scale is not None and not isinstance(scale, (int, float, np.floating)) and np.ndim(scale):
        raise ValueError(f"{op}: argument 'scale' must be a scalar, got shape {np.shape(scale)}")
    B, T = dims.sizes["B"], dims.sizes["T"]
    if cu_seqlens is None:
        N = B
    else:
        if np.ndim(cu_seqlens) != 1 or np.shape(cu_seqlens)[0] < 2:
            raise ValueError(f"{op}: argument 'cu_seqlens' has shape {np.shape(cu_seqlens)}; "
                             f"expected [N+1] with N >= 1")
        if not jnp.issubdtype(jnp.asarray(cu_seqlens).dtype, jnp.integer):
            raise ValueError(f"{op}: argument 'cu_seqlens' has dtype "
                             f"{jnp.asarray(cu_seqlens).dtype}; expected int32")
        if B != 1:
            raise ValueError(f"{op}: argument 'cu_seqlens' needs batch size B == 1 (sequences "
                             f"packed along T), but q has B = {B}")
        N = int(np.shape(cu_seqlens)[0]) - 1
        if _concrete(cu_seqlens):
            c = np.asarray(cu_seqlens)
            if c[0] != 0 or c[-1] != T or np.any(np.diff(c) < 0):
                raise ValueError(f"{op}: argument 'cu_seqlens' = {c.tolist()} must start at 0, "
                                 f"be non-decreasing and end at T = {T}")
    if initial_state is not None:
        want = (N, n_state_heads, dims.sizes["K"], dims.sizes["V"])
        if tuple(np.shape(initial_state)) != want:
            raise ValueError(f"{op}: argument 'initial_state' has shape "
                             f"{tuple(np.shape(initial_state))}; expected [N, HV, K, V] = {want}")
        check_float(op, "initial_state", initial_state)
    return N


def default_scale(scale, K):
    return 1.0 / math.sqrt(K) if scale is None else scale
