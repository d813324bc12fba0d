"""Linear-attention token mixers, one per model family, on top of `dplr_jax.ops`.

Every mixer maps x [B, T, d_model] to y [B, T, d_model] the same way:

    q, k, v = silu(causal depthwise conv_W(x W_q | x W_k | x W_v))   (one conv over all three)
    q, k    = l2_normalize(q), l2_normalize(k)                         (the delta family)
    gates   = family-specific functions of x (below)
    o       = <op>(q, k, v, *gates)             whole sequence: chunked op, `backend` selectable
    y       = (RMSNorm_head(o) * act(x W_g)) W_o                        (gated per-head RMSNorm)

and offers O(1)-memory decoding: `init_cache(B)` / `prefill(x)` give a cache
{"conv": last W-1 projected inputs [B, W-1, C], "state": S [B, HV, K, V] float32}, and
`step(x_t [B, d_model], cache)` runs one token through the conv and `<op>_step`.

Heads: n_heads query/key heads of width head_dim (K = V = head_dim); the mixers whose op allows
it (DeltaNet, Gated DeltaNet, KDA) take num_value_groups G: HV = G * n_heads value heads,
value head h reading query/key head h // G. beta = beta_range * sigmoid(x W_b): beta_range = 2
gives transition eigenvalues in (-1, 1) instead of [0, 1) (state tracking).

Gates (x is the block input, all gate math in float32):
- DeltaNet:          beta per value head; no decay.
- Gated DeltaNet:    g = -exp(A_log) * softplus(x w_a + dt_bias) per value head
                     (A ~ U[0, 16], dt ~ logU[dt_range] = logU[1e-3, 1e-1] by default,
                     dt_bias = softplus^-1(dt): Mamba-2/GDN; KDA and GatedDeltaProduct too).
- KDA:               g = -exp(A_log[h]) * softplus(x W_f1 W_f2 + dt_bias) per value head and key
                     channel (W_f1: d_model -> head_dim low rank, A ~ U[1, 16]); with
                     gate_lower_bound = L < 0:
                     g = L * sigmoid(exp(A_log) * (x W_f1 W_f2 + dt_bias)), in [L, 0].
                     Output gate activation sigmoid (the others use silu).
- GLA:               g = logsigmoid(x W_1 W_2 + b) / 16 per key channel (rank 16); q, k not
                     normalized.
- HDLA:              log lambda = logsigmoid(x W_lam + b_lam) per key channel, beta per head;
                     b_lam = logit(lambda_0), 1 - lambda_0 ~ logU[1e-3, 1e-1].
- GatedDeltaProduct: n keys/values/betas per token (n = n_householder), GDN decay per head.
- DPLR (RWKV-7 style), see `DPLR`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dplr_jax import ops, parallel
from dplr_jax.ops.chunked import MIN_BOUND
from dplr_jax.nn.basic import (COLUMN, ROW, Dense, GatedRMSNorm, ShortConv, a_log_init,
                               constant, dt_bias_init, l2_normalize, param)
from dplr_jax.nn.config import DT_RANGE, check_dt_range


def resolve_head_dim(d_model, n_heads, head_dim):
    if head_dim is not None:
        return head_dim
    if d_model % n_heads:
        raise ValueError(f"argument 'n_heads' = {n_heads} does not divide d_model = {d_model}; "
                         f"pass head_dim explicitly")
    return d_model // n_heads


class LinearMixer(nnx.Module):
    """Base of the linear-attention mixers: projections, conv, op dispatch, output, cache.

    Subclasses set `op_name` and implement `_op_args(x, q, k, v)` -> the op's arguments.
    """

    op_name = ""
    grouped_values = False  # the op accepts HV = G * H value heads
    normalize_qk = True
    gate_activation = "silu"
    multi_key = False  # the op takes n keys/values per token: k [.., H, n, K], v [.., H, n, V]

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, num_value_groups=1,
                 beta_range=1.0, conv_size=4, chunk_size=64, backend="auto", dtype="float32",
                 n_keys=1, seq_axis=None, batch_axis=None):
        if num_value_groups != 1 and not self.grouped_values:
            raise ValueError(f"{type(self).__name__}: argument 'num_value_groups' = "
                             f"{num_value_groups}, but its op has no grouped value heads (use 1)")
        if not 0 < beta_range <= 2:
            raise ValueError(f"{type(self).__name__}: argument 'beta_range' = {beta_range} must "
                             f"be in (0, 2]")
        if conv_size < 1:
            raise ValueError(f"{type(self).__name__}: argument 'conv_size' = {conv_size} must "
                             f"be >= 1")
        K = resolve_head_dim(d_model, n_heads, head_dim)
        self.H, self.K, self.V, self.n = n_heads, K, K, n_keys
        self.HV = n_heads * num_value_groups
        self.beta_range, self.chunk_size, self.backend = beta_range, chunk_size, backend
        self.seq_axis, self.batch_axis = seq_axis, batch_axis
        self.dtype = jnp.dtype(dtype)
        kw = dict(rngs=rngs, dtype=self.dtype)
        self.q_proj = Dense(d_model, self.H * K, sharding=COLUMN, **kw)
        self.k_proj = Dense(d_model, self.H * self.n * K, sharding=COLUMN, **kw)
        self.v_proj = Dense(d_model, self.HV * self.n * self.V, sharding=COLUMN, **kw)
        self.conv = ShortConv(self.H * K * (1 + self.n) + self.HV * self.n * self.V, conv_size,
                              **kw)
        self.g_proj = Dense(d_model, self.HV * self.V, sharding=COLUMN, **kw)
        self.o_norm = GatedRMSNorm(self.V, rngs=rngs, activation=self.gate_activation)
        self.o_proj = Dense(self.HV * self.V, d_model, sharding=ROW, **kw)

    def _beta(self, proj, x, heads):
        return self.beta_range * jax.nn.sigmoid(proj(x).astype(jnp.float32)).reshape(
            *x.shape[:2], *heads)

    def _op_args(self, x, q, k, v):
        raise NotImplementedError

    def _inputs(self, x, conv_state):
        """The op's arguments (with a T axis) and the new conv state."""
        B, T = x.shape[:2]
        H, K, HV, V, n = self.H, self.K, self.HV, self.V, self.n
        qkv, conv_state = self.conv(
            jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), conv_state)
        q, k, v = jnp.split(qkv, [H * K, H * K * (1 + n)], axis=-1)
        q = q.reshape(B, T, H, K)
        k = k.reshape(B, T, H, n, K) if self.multi_key else k.reshape(B, T, H, K)
        v = v.reshape(B, T, HV, n, V) if self.multi_key else v.reshape(B, T, HV, V)
        if self.normalize_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        return self._op_args(x, q, k, v), conv_state

    def _output(self, x, o):
        B, T = o.shape[:2]
        gate = self.g_proj(x).reshape(B, T, self.HV, self.V)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, self.HV * self.V))

    def _op_options(self):
        """Keyword options of the whole-sequence op beyond the shared ones."""
        return {}

    def _sequence(self, x, output_final_state):
        args, conv_state = self._inputs(x, self.conv.init_state(x.shape[0]))
        kw = dict(output_final_state=output_final_state, chunk_size=self.chunk_size,
                  backend=self.backend, **self._op_options())
        if self.seq_axis is None:
            o, S = ops.OPS[self.op_name](*args, **kw)
        else:  # T sharded over seq_axis of the mesh in context (jax.set_mesh)
            o, S = parallel.context_parallel(self.op_name, *args, axis=self.seq_axis,
                                             batch_axis=self.batch_axis, **kw)
        return self._output(x, o), conv_state, S

    def __call__(self, x):
        """x [B, T, d_model] -> y [B, T, d_model] (whole sequence, chunked op)."""
        return self._sequence(x, False)[0]

    def init_cache(self, batch_size, max_len=None):
        """Empty decoding cache (max_len is unused: the state has a fixed size)."""
        return {"conv": self.conv.init_state(batch_size),
                "state": jnp.zeros((batch_size, self.HV, self.K, self.V), jnp.float32)}

    def prefill(self, x, max_len=None):
        """Whole-sequence forward of a prompt; returns (y, cache after the prompt)."""
        y, conv_state, S = self._sequence(x, True)
        return y, {"conv": conv_state, "state": S}

    def step(self, x, cache):
        """One token x [B, d_model] -> (y [B, d_model], cache)."""
        x = x[:, None]
        args, conv_state = self._inputs(x, cache["conv"])
        o, S = getattr(ops, self.op_name + "_step")(*[a[:, 0] for a in args], cache["state"])
        return self._output(x, o[:, None])[:, 0], {"conv": conv_state, "state": S}


class _GDNDecay(nnx.Module):
    """g = -exp(A_log) * softplus(x w_a + dt_bias), one scalar per head (GDN / Mamba-2)."""

    def __init__(self, d_model, heads, *, rngs, dtype, dt_range):
        self.proj = Dense(d_model, heads, sharding=COLUMN, rngs=rngs, dtype=dtype)
        self.A_log = param(rngs, a_log_init(0.0, 16.0), (heads,), (None,))
        dt_range = check_dt_range("gated delta decay: argument", dt_range)
        self.dt_bias = param(rngs, dt_bias_init(*dt_range), (heads,), (None,))

    def __call__(self, x):
        z = self.proj(x).astype(jnp.float32) + self.dt_bias[...]
        return -jnp.exp(self.A_log[...]) * jax.nn.softplus(z)


class DeltaNet(LinearMixer):
    """DeltaNet: S_t = (I - beta k k^T) S_{t-1} + beta k v^T (op `delta_rule`)."""

    op_name = "delta_rule"
    grouped_values = True

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, **kw):
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        self.b_proj = Dense(d_model, self.HV, sharding=COLUMN, rngs=rngs, dtype=self.dtype)

    def _op_args(self, x, q, k, v):
        return q, k, v, self._beta(self.b_proj, x, (self.HV,))


class GatedDeltaNet(LinearMixer):
    """Gated DeltaNet: S_t = (I - beta k k^T) exp(g_t) S_{t-1} + beta k v^T (`gated_delta_rule`)."""

    op_name = "gated_delta_rule"
    grouped_values = True

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, dt_range=DT_RANGE, **kw):
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        self.b_proj = Dense(d_model, self.HV, sharding=COLUMN, rngs=rngs, dtype=self.dtype)
        self.decay = _GDNDecay(d_model, self.HV, rngs=rngs, dtype=self.dtype, dt_range=dt_range)

    def _op_args(self, x, q, k, v):
        return q, k, v, self.decay(x), self._beta(self.b_proj, x, (self.HV,))


class KDA(LinearMixer):
    """Kimi Delta Attention: S_t = (I - beta k k^T) Diag(exp g_t) S_{t-1} + beta k v^T (`kda`).

    gate_lower_bound: None for g = -exp(A_log) softplus(f + dt_bias), or L < 0 for the
    lower-bounded g = L * sigmoid(exp(A_log) (f + dt_bias)) in (L, 0). With L >= -5 the op
    gets it as log_decay_lower_bound (the faster bounded chunk path); otherwise the Pallas
    backend checks each chunk and takes the bounded kernels where the decays allow (at
    initialization, T = 1024 in chunks of 64: every chunk with L = -10, 3 of 4 heads' and 78%
    of the fourth's without L).
    """

    op_name = "kda"
    grouped_values = True
    gate_activation = "sigmoid"

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, gate_lower_bound=None,
                 dt_range=DT_RANGE, **kw):
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        if gate_lower_bound is not None and not gate_lower_bound < 0:
            raise ValueError(f"KDA: argument 'gate_lower_bound' = {gate_lower_bound} must be "
                             f"negative or None")
        d = dict(rngs=rngs, dtype=self.dtype)
        self.b_proj = Dense(d_model, self.HV, sharding=COLUMN, **d)
        self.f_down = Dense(d_model, self.V, sharding=(None, None), **d)
        self.f_up = Dense(self.V, self.HV * self.K, sharding=COLUMN, **d)
        self.A_log = param(rngs, a_log_init(1.0, 16.0), (self.HV,), (None,))
        dt_range = check_dt_range("KDA: argument", dt_range)
        self.dt_bias = param(rngs, dt_bias_init(*dt_range), (self.HV * self.K,), (None,))
        self.gate_lower_bound = gate_lower_bound

    def _op_options(self):
        L = self.gate_lower_bound
        return {} if L is None or L < MIN_BOUND else {"log_decay_lower_bound": L}

    def _op_args(self, x, q, k, v):
        z = self.f_up(self.f_down(x)).astype(jnp.float32) + self.dt_bias[...]
        z = z.reshape(*x.shape[:2], self.HV, self.K)
        A = jnp.exp(self.A_log[...])[:, None]
        if self.gate_lower_bound is None:
            g = -A * jax.nn.softplus(z)
        else:
            g = self.gate_lower_bound * jax.nn.sigmoid(A * z)
        return q, k, v, g, self._beta(self.b_proj, x, (self.HV,))


class GLA(LinearMixer):
    """Gated Linear Attention: S_t = Diag(exp g_t) S_{t-1} + k v^T (op `gla`).

    g = logsigmoid(x W_1 W_2 + b) / 16 with a rank-16 gate projection (GLA paper).
    """

    op_name = "gla"
    normalize_qk = False
    gate_rank = 16
    gate_normalizer = 16.0

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, **kw):
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        d = dict(rngs=rngs, dtype=self.dtype)
        self.gk_down = Dense(d_model, self.gate_rank, sharding=(None, None), **d)
        self.gk_up = Dense(self.gate_rank, self.H * self.K, sharding=COLUMN, use_bias=True, **d)

    def _op_args(self, x, q, k, v):
        z = self.gk_up(self.gk_down(x)).astype(jnp.float32)
        g = jax.nn.log_sigmoid(z).reshape(*x.shape[:2], self.H, self.K) / self.gate_normalizer
        return q, k, v, g


def _decay_logit_init(key, shape, dtype):
    """logit(lambda_0) with 1 - lambda_0 log-uniform in [1e-3, 1e-1] (slow to fast forgetting)."""
    u = jax.random.uniform(key, shape, dtype)
    forget = jnp.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    return jnp.log1p(-forget) - jnp.log(forget)


class HDLA(LinearMixer):
    """HDLA: S_t = (I - beta k k^T) Diag(lambda_t) (I - beta k k^T) S_{t-1} + k v^T (op `hdla`).

    lambda = sigmoid(x W_lam + b_lam) per key channel; beta per head (use beta_range=2 for the
    paper's beta in (0, 2)).
    """

    op_name = "hdla"

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, **kw):
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        d = dict(rngs=rngs, dtype=self.dtype)
        self.b_proj = Dense(d_model, self.H, sharding=COLUMN, **d)
        self.lam_proj = Dense(d_model, self.H * self.K, sharding=COLUMN, use_bias=True,
                              bias_init=_decay_logit_init, **d)

    def _op_args(self, x, q, k, v):
        g = jax.nn.log_sigmoid(self.lam_proj(x).astype(jnp.float32))
        return (q, k, v, g.reshape(*x.shape[:2], self.H, self.K),
                self._beta(self.b_proj, x, (self.H,)))


class GatedDeltaProduct(LinearMixer):
    """Gated DeltaProduct: per token S <- exp(g) S, then n_householder delta-rule steps with
    their own key, value and beta (op `gated_delta_product`); GDN decay per head."""

    op_name = "gated_delta_product"
    multi_key = True

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, n_householder=2,
                 dt_range=DT_RANGE, **kw):
        if n_householder < 1:
            raise ValueError(f"GatedDeltaProduct: argument 'n_householder' = {n_householder} "
                             f"must be >= 1")
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, n_keys=n_householder, **kw)
        self.b_proj = Dense(d_model, self.H * self.n, sharding=COLUMN, rngs=rngs,
                            dtype=self.dtype)
        self.decay = _GDNDecay(d_model, self.H, rngs=rngs, dtype=self.dtype, dt_range=dt_range)

    def _op_args(self, x, q, k, v):
        return q, k, v, self.decay(x), self._beta(self.b_proj, x, (self.H, self.n))


class DPLR(LinearMixer):
    """RWKV-7-style DPLR: S_t = (Diag(w_t) - sum_r kh_r (alpha * kh_r)^T / R) S_{t-1} + k~ v^T.

    Per head, from the conv'd key k and the input x (op `dplr`, rank R = dplr_rank):
      log w  = -exp(-1/2) * sigmoid(tanh(x W_w1) W_w2 + w_0)     per channel, w in (0.54, 1)
      alpha  = sigmoid(x W_a1 W_a2 + a_0)                         "in-context learning rate"
      kh_r   = l2_normalize(k * xi_r)                             removal keys (xi_0 = 0.85)
      k~     = k * (1 + (alpha - 1) * k_a)                        replacement key (k_a = 1)
      op args: a_r = kh_r, b_r = alpha * kh_r / R, q = receptance (not normalized).
    Eigenvalues: with A = Diag(alpha), the transition T = Diag(w) - Kh Kh^T A / R is similar
    (by A^{1/2}) to the symmetric Diag(w) - A^{1/2} Kh Kh^T A^{1/2} / R, whose eigenvalues lie
    in [min w - 1, max w] subset (-1, 1) since ||A^{1/2} Kh / sqrt(R)||^2 <= 1: the state stays
    bounded. w_0 spans linspace(-6, 2) over the channels (slow to fast decay); a_0 = 0.
    Differences from RWKV-7: the token shift is the shared short conv, no bonus term.
    """

    op_name = "dplr"
    normalize_qk = False
    lora_rank = 16

    def __init__(self, d_model, n_heads, head_dim=None, *, rngs, dplr_rank=1, **kw):
        if dplr_rank < 1:
            raise ValueError(f"DPLR: argument 'dplr_rank' = {dplr_rank} must be >= 1")
        super().__init__(d_model, n_heads, head_dim, rngs=rngs, **kw)
        H, K, R = self.H, self.K, dplr_rank
        d = dict(rngs=rngs, dtype=self.dtype)
        w0 = jnp.tile(jnp.linspace(-6.0, 2.0, K), H)
        self.w_down = Dense(d_model, self.lora_rank, sharding=(None, None), **d)
        self.w_up = Dense(self.lora_rank, H * K, sharding=COLUMN, use_bias=True,
                          bias_init=constant(w0), **d)
        self.a_down = Dense(d_model, self.lora_rank, sharding=(None, None), **d)
        self.a_up = Dense(self.lora_rank, H * K, sharding=COLUMN, use_bias=True, **d)
        xi = jnp.full((H, R, K), 0.85).at[:, 1:].set(
            jax.random.uniform(rngs.params(), (H, R - 1, K), minval=0.5, maxval=1.5))
        self.xi = param(rngs, constant(xi), (H, R, K), (None, None, None))
        self.k_a = param(rngs, nnx.initializers.ones, (H, K), (None, None))
        self.rank = R

    def _op_args(self, x, q, k, v):
        heads = (*x.shape[:2], self.H, self.K)
        z = self.w_up(jnp.tanh(self.w_down(x))).astype(jnp.float32)
        log_w = -math.exp(-0.5) * jax.nn.sigmoid(z).reshape(heads)
        alpha = jax.nn.sigmoid(self.a_up(self.a_down(x)).astype(jnp.float32)).reshape(heads)
        k32 = k.astype(jnp.float32)
        kh = l2_normalize(k32[..., None, :] * self.xi[...])  # [B, T, H, R, K]
        k_write = (k32 * (1 + (alpha - 1) * self.k_a[...])).astype(k.dtype)
        return q, k_write, v, log_w, kh, alpha[..., None, :] * kh / self.rank
