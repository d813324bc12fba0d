"""Context parallelism: any op with its sequence axis T sharded over a device-mesh axis.

Shard p of P holds tokens [p L, (p+1) L), L = T / P, of q, k, v and the gates. Each shard
runs the op ONCE on its tokens with the value width widened from V to V + K: values
[v | 0] and, for the sequence that continues into the shard from the previous one, the
initial state [0 | I] (every other sequence starts from [h0 | 0]). The recurrence is linear
in (state, values) jointly, so this one pass gives, per shard,

    o' = [o0 | q~]     o0: the outputs from a zero incoming state; q~_t = scale Phi_t^T q_t
    S' = [B | M]       the shard's affine map S_end = M S_in + B (ops/affine.py)

(Phi_t: the transition from the shard start to token t). The summaries (M, B) of all shards
are combined over the mesh axis into the state S_in entering each shard (combine.py), and
the shard finishes with one matmul per token, o = o0 + q~ S_in, and S_end = B + M S_in.
The summary pass IS the op (its Pallas kernel where one exists), not a second engine run.

Cost per layer, per batch row and per state head (K x K for M, K x V for B, float32):

    local compute        the op at value width V + K instead of V (K = V: the V-dependent
                         half of the chunk work doubles; the C x C inverse and the
                         decayed key products do not), plus 2 L K V FLOPs for o0 + q~ S_in
    "allgather"          one all-gather: each device receives (P-1)(K^2 + K V) 4 bytes;
                         local fold 2 (P-1) K^2 V FLOPs; memory P (K^2 + K V) 4 bytes;
                         1 collective (latency ~ one ring pass)
    "ppermute"           ceil(log2 P) neighbour exchanges of (M, B) (the last one of B only)
                         and one of B: each device sends at most
                         (ceil(log2 P) (K^2 + K V) - K^2 + K V) 4 bytes; compose
                         2 (K^3 + K^2 V) FLOPs per round; ceil(log2 P) + 1 dependent
                         collectives
    output_final_state   one all-reduce (psum) of the final states, N K V 4 bytes

E.g. KDA, H = 16 heads, K = V = 128, B = 1, P = 8: (M, B) of one shard is 2 MiB; allgather
moves 14 MiB into every device, ppermute 3 x 2 MiB - 1 MiB + 1 MiB = 6 MiB over 4 dependent
steps. Both are microseconds of compute next to the shard's chunk work.

Default "ppermute", by measurement on 8 virtual CPU devices (no GPU measurement yet; run
benchmarks/cp_gpu.py): the combine alone, H = 16, K = V = 128, forward+backward, median of
30: P = 2: 3.9 ms vs 4.3 ms (allgather), P = 4: 20.9 vs 21.2, P = 8: 72 vs 77; forward only
1.05 vs 1.58, 5.9 vs 8.7, 24 vs 37 ms. The CPU devices share 2 cores, so this mostly counts
total FLOPs (allgather's fold is redundant on every shard); on GPUs both are microseconds
next to the shard's chunk work, and "allgather" has fewer dependent collectives (1 instead
of ceil(log2 P) + 1), which may favour it at small P. "ppermute" also keeps memory
O(K^2 + K V) per device instead of O(P (K^2 + K V)).

Packed sequences (cu_seqlens [N+1], B == 1) may cross shard boundaries. Each shard uses the
global offsets clipped to its tokens (N+1 local offsets, static shape; sequences outside it
are empty). A sequence that starts inside a shard starts from its own initial state there,
so the shard's map (that of its last sequence) has M = 0; sequence n's final state comes
from the shard holding its last token.

Gradients are JAX autodiff through `shard_map` and the collectives (the transpose of an
all-gather is a reduce-scatter, of a ppermute the reverse ppermute), on every shard, for
every input including initial_state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dplr_jax import ops
from dplr_jax.ops._checks import check_lower_bound, check_options
from dplr_jax.ops.api import SPECS, acc_dtype, validate
from dplr_jax.parallel.combine import CARRY, STRATEGIES


def _resolve(op, where):
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    if name not in ops.OPS:
        raise ValueError(f"{where}: argument 'op' is {op!r}; expected one of the ops "
                         f"{list(ops.OPS)} (the function or its name)")
    return name, ops.OPS[name]


def _check_strategy(strategy, where):
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: argument 'strategy' is {strategy!r}; expected one of "
                         f"{STRATEGIES}")


def context_parallel_local(op, *args, axis, strategy="ppermute", initial_state=None,
                           output_final_state=False, cu_seqlens=None, **op_kwargs):
    """One shard's part of a sequence-parallel op; call it inside `shard_map` over `axis`.

    args: this shard's slices [B, T/P, ...] of the op's positional inputs (shard p holds
    tokens [p T/P, (p+1) T/P) along mesh axis `axis`). initial_state [N, HV, K, V] and
    cu_seqlens [N+1] (global token offsets, B == 1) are the full, unsharded arrays.
    op_kwargs go to the op (scale, chunk_size, backend, log_decay_lower_bound). Returns
    (o, final_state): this shard's outputs [B, T/P, HV, V] and, if output_final_state, the
    final states [N, HV, K, V], identical on every shard of `axis` (else None). Tested in
    shard_map with check_vma True and False (backend "xla"; Pallas kernels not yet). With
    bf16 inputs o0 and q~ are rounded to bf16 before o = o0 + q~ S_in (the op returns q's
    dtype): KDA, 8 shards, T = 512: 2.2e-3 relative RMSE vs 1.7e-3 for the single-device op.
    """
    _, fn = _resolve(op, "context_parallel_local")
    _check_strategy(strategy, "context_parallel_local")
    P = jax.lax.axis_size(axis)
    if P == 1:
        return fn(*args, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, **op_kwargs)
    p = jax.lax.axis_index(axis)
    q, v = args[0], args[2]
    L, HV, K, V = q.shape[1], v.shape[2], q.shape[-1], v.shape[-1]
    dtype = acc_dtype(*args, initial_state)
    if cu_seqlens is None:
        N = q.shape[0]
        carried = jnp.broadcast_to(p > 0, (N,))  # every row continues from the previous shard
        local_cu = None
    else:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        N = cu.shape[0] - 1
        start = p * L
        carried = (cu[:-1] < start) & (cu[1:] > start)  # the sequence holding token p L
        local_cu = jnp.clip(cu - start, 0, L)
    h0 = (jnp.zeros((N, HV, K, V), dtype) if initial_state is None
          else initial_state.astype(dtype))
    c = carried[:, None, None, None]
    eye = jnp.broadcast_to(jnp.eye(K, dtype=dtype), (N, HV, K, K))
    h_wide = jnp.concatenate([jnp.where(c, 0, h0), jnp.where(c, eye, 0)], axis=-1)
    v_wide = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)
    o_wide, S_wide = fn(q, args[1], v_wide, *args[3:], initial_state=h_wide,
                        output_final_state=True, cu_seqlens=local_cu, **op_kwargs)
    B_n, M_n = S_wide[..., :V], S_wide[..., V:]  # per (local) sequence
    if local_cu is None:
        B_s, M_s = B_n, M_n
    else:  # the shard's map is that of the sequence holding its last token
        last = jnp.searchsorted(local_cu, L - 1, side="right") - 1
        B_s, M_s = B_n[last][None], M_n[last][None]
    S_in = CARRY[strategy](M_s, B_s, axis)  # [B or 1, HV, K, V]
    o0, q_t = o_wide[..., :V].astype(dtype), o_wide[..., V:].astype(dtype)
    o = (o0 + jnp.einsum("btgk,bgkv->btgv", q_t, S_in)).astype(q.dtype)
    if not output_final_state:
        return o, None
    finals = B_n + jnp.matmul(M_n, S_in)
    if local_cu is None:
        owner = jnp.full((N,), P - 1)
    else:  # the shard holding sequence n's last token (any shard for an empty sequence)
        owner = jnp.maximum(cu[1:] - 1, 0) // L
    finals = jax.lax.psum(jnp.where((owner == p)[:, None, None, None], finals, 0), axis)
    return o, finals


def context_parallel(op, *args, mesh=None, axis="seq", batch_axis=None, strategy="ppermute",
                     initial_state=None, output_final_state=False, cu_seqlens=None,
                     **op_kwargs):
    """Runs `op` with the sequence axis T of its inputs sharded over mesh axis `axis`.

    op: a `dplr_jax.ops` function (kda, gated_delta_rule, delta_rule, gla, dplr, hdla,
    gated_delta_product) or its name; args: its positional inputs [B, T, ...] (global
    arrays; T divisible by the size P of `axis`). mesh: a `jax.sharding.Mesh` (default: the
    mesh set with `jax.set_mesh`). batch_axis: mesh axis name (or tuple of names) that shards
    the batch dimension B (data parallelism); None replicates B over the manual axes, and
    mesh axes other than `axis` and `batch_axis` stay under the compiler's automatic
    sharding. strategy: how shard summaries are combined, "ppermute" (default) or
    "allgather" (see the module docstring for their costs). initial_state [N, HV, K, V]
    belongs to the first shard; cu_seqlens [N+1] (B == 1) are global offsets, and packed
    sequences may cross shard boundaries. op_kwargs go to the op (scale, chunk_size, backend,
    log_decay_lower_bound).

    Returns (o, final_state) like the op: o [B, T, HV, V] sharded like q, final_state
    [N, HV, K, V] (replicated over `axis`) or None. Works under jax.jit and jax.grad.
    """
    where = "context_parallel"
    name, _ = _resolve(op, where)
    _check_strategy(strategy, where)
    spec = SPECS[name]
    if len(args) != 3 + len(spec.gates):
        raise TypeError(f"{where}: {name} takes {3 + len(spec.gates)} positional inputs "
                        f"(q, k, v, {', '.join(spec.gates)}), got {len(args)}")
    dims, checked = validate(spec, dict(zip(("q", "k", "v") + spec.gates, args)))
    check_options(name, dims, chunk_size=op_kwargs.get("chunk_size", 64),
                  backend=op_kwargs.get("backend", "auto"), cu_seqlens=cu_seqlens,
                  initial_state=initial_state, n_state_heads=dims.sizes[spec.state_heads],
                  scale=op_kwargs.get("scale"))
    if op_kwargs.get("log_decay_lower_bound") is not None and spec.bounded:
        # here, while the decays may be concrete: inside shard_map they are traced
        check_lower_bound(name, op_kwargs["log_decay_lower_bound"], checked["log_decay"])
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(f"{where}: argument 'mesh' is None and no mesh is set; pass "
                             f"mesh= or call inside `with jax.set_mesh(mesh):`")
    batch_axes = () if batch_axis is None else (
        tuple(batch_axis) if isinstance(batch_axis, (tuple, list)) else (batch_axis,))
    for arg, names in (("axis", (axis,)), ("batch_axis", batch_axes)):
        for a in names:
            if a not in mesh.axis_names:
                raise ValueError(f"{where}: argument '{arg}' is {a!r}, not an axis of the mesh "
                                 f"{dict(mesh.shape)}")
    if axis in batch_axes:
        raise ValueError(f"{where}: argument 'batch_axis' {batch_axis!r} includes the "
                         f"sequence axis {axis!r}")
    if cu_seqlens is not None and batch_axes:
        raise ValueError(f"{where}: argument 'cu_seqlens' packs sequences into B == 1, which "
                         f"cannot be sharded over batch_axis {batch_axis!r}; pass batch_axis=None")
    P, T, B = mesh.shape[axis], dims.sizes["T"], dims.sizes["B"]
    if T % P:
        raise ValueError(f"{where}: argument 'q' has T = {T} tokens; expected a multiple of "
                         f"the {P} shards of mesh axis {axis!r}")
    n_data = 1
    for a in batch_axes:
        n_data *= mesh.shape[a]
    if B % n_data:
        raise ValueError(f"{where}: argument 'q' has batch B = {B}; expected a multiple of "
                         f"{n_data}, the size of batch_axis {batch_axis!r}")

    bspec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    seq_spec = PartitionSpec(bspec, axis)
    state_spec = PartitionSpec(bspec)

    def local(args, h0, cu):
        return context_parallel_local(name, *args, axis=axis, strategy=strategy,
                                      initial_state=h0, output_final_state=output_final_state,
                                      cu_seqlens=cu, **op_kwargs)

    # Manual axes: the sequence and batch axes, and every Explicit axis (JAX 0.11.2 fails to
    # transpose all_gather in a shard_map that leaves an Explicit axis free); other axes stay
    # Auto, to the compiler. check_vma=False asks no varying-axis typing of the ops' internals
    # (Pallas kernels included); gradients through the collectives are tested on every shard.
    explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types)
                if t == jax.sharding.AxisType.Explicit}
    arg_specs = tuple(None if a is None else seq_spec for a in args)
    args = _reshard_explicit(mesh, explicit, tuple(args), arg_specs)
    if initial_state is not None:
        initial_state = _reshard_explicit(mesh, explicit, initial_state, state_spec)
    run = jax.shard_map(local, mesh=mesh, axis_names={axis, *batch_axes, *explicit},
                        check_vma=False, in_specs=(arg_specs, state_spec, PartitionSpec()),
                        out_specs=(seq_spec, state_spec if output_final_state else None))
    return run(args, initial_state, cu_seqlens)


def _reshard_explicit(mesh, explicit, xs, specs):
    """Moves arrays to shard_map's in_specs over the mesh's Explicit axes `explicit` (shard_map
    reshards Auto axes itself, but requires Explicit ones to match already)."""
    if not explicit:
        return xs

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(n for n in names if n in explicit)
        return names if len(names) > 1 else (names[0] if names else None)

    def place(x, spec):
        spec = PartitionSpec(*(keep(e) for e in spec))
        target = spec if isinstance(mesh, jax.sharding.AbstractMesh) else \
            jax.sharding.NamedSharding(mesh, spec)
        return jax.reshard(x, target)

    return jax.tree.map(place, xs, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
