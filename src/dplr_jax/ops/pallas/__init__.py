"""Pallas kernels for the chunk engine, registered with ops.backends for backend="pallas".

GPU: Triton lowering (explicit triton.CompilerParams). TPU: Mosaic (chunk axis on the grid,
state in VMEM). CPU: the GPU kernels in Pallas interpret mode, so tests and checks exercise
the same kernel code without an accelerator.
"""

from __future__ import annotations

import jax

from dplr_jax.ops import backends
from dplr_jax.ops.forms import FORMS
from dplr_jax.ops.pallas.engine import kernel
from dplr_jax.ops.pallas.state_pass import Config, Launch

PLATFORM_CONFIGS = {
    "gpu": Config(form="loop", precision=jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                  # 2 stages where they fit in shared memory (state_pass.fit_launches)
                  fwd=Launch(block_v=64, num_warps=8, num_stages=2),
                  bwd=Launch(block_v=64, num_warps=8, num_stages=2),
                  grads=Launch(num_warps=4, num_stages=2),
                  products=(Launch(num_warps=2, num_stages=1),
                            Launch(num_warps=4, num_stages=1)),
                  scalar_products=(Launch(num_warps=4, num_stages=1),
                                   Launch(num_warps=4, num_stages=1)),
                  factors=(Launch(num_warps=4, num_stages=1), Launch(num_warps=4, num_stages=1)),
                  # K = 256 overflowed shared memory when the state pass took M (K x K);
                  # with factors it fits (S is K x 64, the factors go in 64-row blocks).
                  max_k=256),
    "tpu": Config(form="grid"),
    "cpu": Config(form="loop", interpret=True, products=(Launch(), Launch()),
                  scalar_products=(Launch(), Launch()), factors=(Launch(), Launch())),
}
"""Launch configuration of the registered kernels per platform."""

for _name in FORMS:
    for _platform, _cfg in PLATFORM_CONFIGS.items():
        backends.register(_name, _platform, kernel(_name, _cfg))
