"""log_decay_lower_bound: the bounded path of the per-channel-decay ops (gla, kda, dplr, hdla).

With every log decay >= L (L in [-5, 0)), the diagonal 16 x 16 blocks of the intra-chunk
products become one product of factors around the sub-chunk's middle row (chunked.py; the
kernels of pallas/decayed.py). Checked against the float64 reference on decays
that use the whole allowed range (a third at the bound itself, so sub-chunk sums reach
16 L), for the XLA and the Pallas backend: outputs, final states and every gradient; bf16;
packed sequences; and the argument checks.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import cast, make_inputs, make_state
from dplr_jax import ops
from test_pallas_ops import BF16_TOL, check_pallas_vjp

BOUND = -5.0


def bounded_inputs(name, rng, **kw):
    """make_inputs with log decays in [BOUND, 0]: a third exactly at the bound."""
    args = list(make_inputs(name, rng, **kw))
    g = BOUND * rng.random(args[3].shape) ** 0.5
    args[3] = np.where(rng.random(g.shape) < 1 / 3, BOUND, g)
    return tuple(args)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("name", ["kda", "gla", "dplr", "hdla"])
def test_float32_against_reference(name, backend, rng, x64):
    """T = 130 in chunks of 64 (four sub-chunks, a partial last chunk), an initial state,
    grouped value heads for kda, every gradient to 1e-5."""
    args = cast(bounded_inputs(name, rng, B=1, T=130, K=32, V=32, G=2 if name == "kda" else 1),
                jnp.float32)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=64,
                     backend=backend, log_decay_lower_bound=BOUND)


def test_bfloat16_pallas(rng, x64):
    args = cast(bounded_inputs("kda", rng, T=100, K=16, V=32), jnp.bfloat16)
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp("kda", args, h0, rng, 5e-3, 5e-3, BF16_TOL.__getitem__, chunk_size=32,
                     log_decay_lower_bound=BOUND)


def test_varlen_pallas(rng, x64):
    args = cast(bounded_inputs("gla", rng, B=1, T=70, K=16, V=16), jnp.float32)
    cu = jnp.array([0, 9, 9, 70], jnp.int32)
    h0 = cast(make_state(args, rng, N=3), jnp.float32)
    check_pallas_vjp("gla", args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, cu_seqlens=cu,
                     log_decay_lower_bound=BOUND)


def test_bound_is_taken_under_jit(rng):
    """Under jit nothing checks the decays, and the bound changes the computation: hard
    resets (-1000, far below it) overflow the bounded factors (non-finite outputs, as the
    ops' docstring says), while the exact path stays finite. Both XLA and Pallas."""
    args = list(make_inputs("kda", rng, B=1, T=64, K=16, V=16))
    args[3] = np.where(rng.random(args[3].shape) < 0.05, -1000.0, args[3])
    args = cast(tuple(args), jnp.float32)
    for backend in ("xla", "pallas"):
        run = lambda bound, b=backend: jax.jit(jax.grad(lambda *a: ops.kda(
            *a, backend=b, chunk_size=32, log_decay_lower_bound=bound)[0].sum(),
            argnums=(0, 3)))(*args)
        assert all(bool(jnp.all(jnp.isfinite(d))) for d in run(None)), backend
        assert not all(bool(jnp.all(jnp.isfinite(d))) for d in run(BOUND)), backend


def test_kda_layer_passes_its_bound_to_the_op(monkeypatch):
    """nn.KDA with gate_lower_bound >= -5 calls ops.kda with log_decay_lower_bound."""
    from flax import nnx
    from dplr_jax.nn import KDA
    seen = {}
    real = ops.OPS["kda"]

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setitem(ops.OPS, "kda", spy)
    layer = KDA(32, 2, rngs=nnx.Rngs(0), gate_lower_bound=-3.0, backend="xla")
    layer(jnp.ones((1, 20, 32)))
    assert seen.get("log_decay_lower_bound") == -3.0


def _kernels(name, bound):
    """The names of the Pallas kernels the op's forward and backward launch."""
    args = cast(bounded_inputs(name, np.random.default_rng(0), B=1, T=32, K=16, V=16),
                jnp.float32)
    fn = lambda *a: ops.OPS[name](*a, backend="pallas", chunk_size=32,
                                  log_decay_lower_bound=bound)[0].sum()
    text = str(jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args))
    return set(re.findall(r"name=(dplr_\w+)", text))


def test_bound_drops_the_diagonal_kernels():
    """Under the bound the per-channel products form their diagonal blocks by dots in the
    kernels of their sub-chunks, forward and backward: the row-loop diagonal kernels of the
    unbounded path are not launched, and nothing else changes."""
    exact, bounded = _kernels("kda", None), _kernels("kda", BOUND)
    assert exact - bounded == {"dplr_decayed_diag", "dplr_decayed_diag_bwd"}
    assert bounded <= exact


@pytest.mark.parametrize("bound", [-6.0, 0.0, 0.5, True, "-1", np.array([-1.0, -2.0])])
def test_bound_out_of_range_is_refused(bound, rng):
    args = make_inputs("kda", rng, T=20)
    with pytest.raises(ValueError, match=r"kda: argument 'log_decay_lower_bound' .*\[-5, 0\)"):
        ops.kda(*args, log_decay_lower_bound=bound)


def test_decays_below_the_bound_are_refused(rng):
    args = list(make_inputs("gla", rng, T=20))
    args[3][0, 5, 0, 0] = -3.5
    with pytest.raises(ValueError, match=r"gla: argument 'log_decay' has entries below "
                                         r"log_decay_lower_bound = -3 \(min -3.5\)"):
        ops.gla(*args, log_decay_lower_bound=-3.0)


def test_only_per_channel_ops_take_it(rng):
    with pytest.raises(TypeError, match="gated_delta_rule.*log_decay_lower_bound.*gla, kda"):
        ops.gated_delta_rule(*make_inputs("gated_delta_rule", rng, T=20),
                             log_decay_lower_bound=-1.0)
    with pytest.raises(ValueError, match="dplr: argument 'log_decay_lower_bound' is -1, but "
                                         "'log_decay' is None"):
        ops.dplr(*make_inputs("dplr", rng, T=20, decay=False), log_decay_lower_bound=-1.0)
    import inspect
    assert "log_decay_lower_bound" in inspect.signature(ops.kda).parameters
    assert "log_decay_lower_bound" not in inspect.signature(ops.delta_rule).parameters
