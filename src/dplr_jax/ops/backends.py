"""Registry of accelerator kernels: (op, platform) -> implementation.

backend="auto" uses a registered kernel on GPU/TPU, else the chunked XLA path; on the CPU a
registered kernel runs only when asked for (backend="pallas"), in Pallas interpret mode.
A kernel takes the op's validated positional inputs and keywords (scale, initial_state,
cu_seqlens, chunk_size) and returns (o, final_state).
"""

from __future__ import annotations

import jax

_KERNELS: dict[tuple[str, str], object] = {}


def register(op: str, platform: str, fn) -> None:
    _KERNELS[(op, platform)] = fn


def lookup(op: str, platform: str | None = None):
    return _KERNELS.get((op, platform or jax.default_backend()))
