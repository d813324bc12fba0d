"""log_decay_lower_bound: the bounded path of the per-channel-decay ops (gla, kda, dplr, hdla).

With every log decay >= L (L in [-5, 0)), the diagonal 16 x 16 blocks of the intra-chunk
products become one product of factors around the sub-chunk's middle row (chunked.py; the
kernels of pallas/decayed.py). Checked against the float64 reference on decays
that use the whole allowed range (a third at the bound itself, so sub-chunk sums reach
16 L), for the XLA and the Pallas backend: outputs, final states and every gradient; bf16;
packed sequences; and the argument checks. Without the bound the Pallas backend takes the
bounded kernels on the chunks whose decays allow them (chunked.bounded_chunks) and the
exact ones on the rest: checked bitwise against forcing either, and against the reference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ops_inputs import cast, make_inputs, make_state
from dplr_jax import ops
from dplr_jax.ops import chunked
from dplr_jax.ops.layout import ChunkLayout
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


def test_bounded_chunks_sums_half_sub_chunks():
    """chunked.bounded_chunks: per chunk and head, every 8 tokens of the sub-chunk halves
    (aligned) sum to >= 8 MIN_BOUND = -40 in every channel; a window across two halves may
    sum to less."""
    g = jnp.zeros((1, 2, 32, 2, 3))  # [B, NC, C, H, K]: two chunks of 32, two heads
    check = lambda g: np.asarray(chunked.bounded_chunks(g))[0].tolist()  # [NC][H]
    assert check(g) == [[True, True], [True, True]]
    assert check(g.at[0, 1, 16:24, 0, 2].set(-39.5 / 8)) == [[True, True], [True, True]]
    assert check(g.at[0, 1, 16:24, 0, 2].set(-40.5 / 8)) == [[True, True], [False, True]]
    assert check(g.at[0, 0, 31, 1, 0].set(-40.5)) == [[True, False], [True, True]]
    assert check(g.at[0, 0, 4:12, 1, 0].set(-7.5)) == [[True, True], [True, True]]  # -60
    assert check(g.at[0, 1, 3, 1, 1].set(jnp.nan)) == [[True, True], [True, False]]


def _pullback(name, args, **kw):
    """jit: the Pallas op's output (chunks of 32) and its pullback of a fixed cotangent."""
    def run(*a):
        o, vjp = jax.vjp(lambda *x: ops.OPS[name](*x, backend="pallas", chunk_size=32,
                                                  **kw)[0], *a)
        return (o,) + vjp(jnp.cos(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape))

    return jax.jit(run)(*args)


def _force(monkeypatch, choice):
    """Every chunk's check answers `choice` (None: the real check)."""
    monkeypatch.undo()
    if choice is not None:
        monkeypatch.setattr(chunked, "bounded_chunks",
                            lambda g: jnp.full((g.shape[0], g.shape[1], g.shape[3]), choice))


def _same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["kda", "dplr"])
def test_unbounded_pallas_takes_the_bounded_kernels_where_safe(name, rng, monkeypatch):
    """Without the bound, decays >= -5 give bitwise what the bound gives, output and every
    gradient (and not what the exact kernels give)."""
    args = cast(bounded_inputs(name, rng, B=1, T=70, K=16, V=16), jnp.float32)
    got = _pullback(name, args)
    assert _same(got, _pullback(name, args, log_decay_lower_bound=BOUND))
    _force(monkeypatch, False)
    assert not _same(got, _pullback(name, args))


def test_unbounded_pallas_chooses_per_chunk_and_head(rng, monkeypatch):
    """One hard reset (head 1, the second of three chunks): head 0 and head 1's first chunk
    take the bounded kernels (bitwise what forcing them everywhere gives there), the
    reset's chunk the exact ones (finite, where the forced bounded kernels overflow)."""
    args = list(cast(bounded_inputs("kda", rng, B=1, T=96, H=2, K=16, V=16), jnp.float32))
    args[3] = args[3].at[0, 40, 1, 3].set(-1000.0)
    run = lambda: ops.kda(*args, backend="pallas", chunk_size=32)[0]
    o = run()
    _force(monkeypatch, True)
    forced = run()
    assert bool(jnp.array_equal(o[0, :, 0], forced[0, :, 0]))
    assert bool(jnp.array_equal(o[0, :32, 1], forced[0, :32, 1]))
    assert bool(jnp.all(jnp.isfinite(o))) and not bool(jnp.all(jnp.isfinite(forced[0, 32:, 1])))


@pytest.mark.parametrize("name", ["kda", "gla"])
def test_decays_below_the_bound_that_pass_the_check(name, rng, x64):
    """Decays of -36 at one token of every half sub-chunk (far below -5; each half still
    sums to >= -40) and one hard reset (head 1, the second chunk), no bound given: the
    chunks take the bounded kernels but that one, and the op matches the float64 reference
    to 1e-5 in float32 (outputs, final states, every gradient; T = 130 in chunks of 64)."""
    args = list(bounded_inputs(name, rng, B=1, T=130, K=32, V=32))
    g = 0.5 / BOUND * args[3]  # in [-0.5, 0]
    g[:, 5::8] = -36.0
    g[0, 70, 1, 3] = -1000.0
    args[3] = g
    args = cast(tuple(args), jnp.float32)
    flags = chunked.bounded_chunks(ChunkLayout.make(1, 130, 64).to_chunks(args[3]))
    assert np.asarray(flags)[0].tolist() == [[True, True], [True, False], [True, True]]
    h0 = cast(make_state(args, rng), jnp.float32)
    check_pallas_vjp(name, args, h0, rng, 1e-5, 1e-5, lambda _: 1e-5, chunk_size=64)


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
