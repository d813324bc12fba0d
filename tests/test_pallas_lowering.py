"""The Pallas kernels lower for CUDA (Triton) and TPU (Mosaic) on a CPU-only jaxlib.

Forward and backward (jax.grad) of each op at the production head dims, lowered with
`jax.jit(f).trace(...).lower(lowering_platforms=...)` inside an abstract mesh of the target
device, so CI catches Triton/Mosaic lowering failures (block shapes, unsupported primitives,
dot layouts) without an accelerator. Lowering only: nothing is compiled or run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh

from _ops_inputs import cast, make_inputs
from dplr_jax.ops.pallas import PLATFORM_CONFIGS, engine

TARGETS = {
    "cuda": ("gpu", AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="gpu")),
    "tpu": ("tpu", AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")),
}

CASES = [  # (op, head dim, dtype, T)
    ("kda", 128, jnp.bfloat16, 200),
    ("gated_delta_rule", 128, jnp.bfloat16, 128),
    ("delta_rule", 64, jnp.float32, 100),
    ("gla", 128, jnp.bfloat16, 128),
    ("gla", 64, jnp.float32, 100),
    ("kda", 128, jnp.float32, 130, "bounded"),  # log_decay_lower_bound: the bounded backward
    ("dplr", 64, jnp.bfloat16, 100),  # state pass: probed and plain row blocks
    ("gated_delta_product", 64, jnp.bfloat16, 100),  # virtual tokens
]


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    [c[0], str(c[1]), jnp.dtype(c[2]).name] + list(c[4:])))
def test_forward_and_backward_lower(target, case):
    name, D, dtype, T = case[:4]
    bounded = case[4:] == ("bounded",)
    platform, device = TARGETS[target]
    args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=T, H=2, K=D, V=D), dtype)
    fn = engine.kernel(name, PLATFORM_CONFIGS[platform])

    def loss(*a):
        o, S = fn(*a, scale=D ** -0.5, initial_state=None, cu_seqlens=None, chunk_size=64,
                  bounded=bounded)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    f = jax.grad(loss, argnums=tuple(range(len(args))))
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=(target,)).as_text()
    # The forward and both backward state-pass kernels are in the module, and on the GPU
    # the decayed-product kernels of the per-channel-decay ops (scalar ones for per-token
    # decays)...
    assert all(text.count(f"dplr_state_pass_{k}") >= 1 for k in ("fwd", "bwd", "grads"))
    per_channel = target == "cuda" and name in ("kda", "gla", "dplr")
    assert ("dplr_decayed_fwd" in text and "dplr_decayed_bwd" in text) == per_channel
    # ... and of scalar decays, which also form the products without decay (delta_rule)
    scalar = target == "cuda" and name in ("gated_delta_rule", "gated_delta_product",
                                           "delta_rule")
    assert ("dplr_decayed_scalar_fwd" in text and "dplr_decayed_scalar_bwd" in text) == scalar
    # ... and the factors kernels of rank-1 forms (every op here: make_inputs' dplr is rank 1)
    assert ("dplr_factors_fwd" in text and "dplr_factors_bwd" in text) == (target == "cuda")
    # exp in the kernels is exp2 (state_pass._exp: one MUFU.EX2), never libdevice's expf, whose
    # nine instructions per element cost kda's products 0.15 ms on the H100 (benchmarks/NOTES.md)
    assert "__nv_expf" not in text
    assert ("__nv_exp2f" in text) == (target == "cuda" and name != "delta_rule")  # decays


@pytest.mark.parametrize("name", ["kda", "gated_delta_rule", "gla", "dplr", "hdla"])
def test_forward_only_lowers_for_cuda(name):
    """A call without gradients (engine._forward_only: the kernels load q and the keys as
    given, bf16, and cast them) lowers through Triton, with every forward kernel."""
    platform, device = TARGETS["cuda"]
    args = cast(make_inputs(name, np.random.default_rng(0), B=1, T=200, H=2, K=128, V=128),
                jnp.bfloat16)
    fn = engine.kernel(name, PLATFORM_CONFIGS[platform])
    f = lambda *a: fn(*a, scale=128 ** -0.5, initial_state=None, cu_seqlens=None,
                      chunk_size=64)
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    products = "dplr_decayed_scalar_fwd" if name == "gated_delta_rule" else "dplr_decayed_fwd"
    for kernel in (products, "dplr_factors_fwd", "dplr_state_pass_fwd"):
        assert kernel in text, kernel
    assert "dplr_state_pass_bwd" not in text and "dplr_factors_bwd" not in text
