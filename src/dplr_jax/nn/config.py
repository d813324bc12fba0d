"""LMConfig: the hyperparameters of a LanguageModel, validated when constructed."""

from __future__ import annotations

import dataclasses
import math
import numbers

MIXERS = ("kda", "gated_deltanet", "deltanet", "gla", "dplr", "hdla", "gated_deltaproduct",
          "attention")
GROUPED_VALUE_MIXERS = ("kda", "gated_deltanet", "deltanet")
BACKENDS = ("auto", "pallas", "xla", "reference")
DTYPES = ("float32", "bfloat16", "float16")


FLOAT32_MAX = 3.4028234663852886e38
DT_RANGE = (1e-3, 1e-1)  # the papers' (Mamba-2 / GDN / KDA) dt init range


def check_dt_range(where, dt_range):
    """dt_range as a (dt_min, dt_max) float pair, or a ValueError that starts with `where`:
    two real numbers (not bools), 0 < dt_min <= dt_max, finite in float32."""
    ok = (isinstance(dt_range, (tuple, list)) and len(dt_range) == 2
          and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                  and math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in dt_range)
          and 0 < dt_range[0] <= dt_range[1])
    if not ok:
        raise ValueError(f"{where} 'dt_range' = {dt_range!r} must be two numbers (dt_min, "
                         f"dt_max) with 0 < dt_min <= dt_max, finite in float32")
    return tuple(float(x) for x in dt_range)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A language model: embedding, n_layers pre-norm blocks (token mixer + SwiGLU MLP), head.

    mixer: the token mixer of every block, one of MIXERS; with attention_every = k > 0 the
        blocks k-1, 2k-1, ... use causal softmax attention instead (Kimi Linear: k = 4).
    head_dim: per-head key/value width; default d_model // n_heads.
    num_value_groups: G value heads per query/key head (HV = G * n_heads); only for the mixers
        whose op shares q/k across value heads (kda, gated_deltanet, deltanet).
    n_kv_heads: key/value heads of the softmax attention layers (GQA); default n_heads.
    beta_range: beta = beta_range * sigmoid(.); 2.0 allows negative transition eigenvalues.
    mlp_ratio: SwiGLU hidden width = mlp_ratio * d_model * 2/3 rounded up to a multiple of 8.
    gate_lower_bound: KDA only; if set (< 0), log decay = gate_lower_bound * sigmoid(.).
    dt_range: (dt_min, dt_max) of the Mamba-2-style decay init of kda, gated_deltanet and
        gated_deltaproduct (dt log-uniform in it; per-token log decay about -A dt at init).
        The default (1e-3, 1e-1) is the papers'; with 2 heads it forgets within ~10-20
        tokens at init, and Gated DeltaNet then fails MQAR at T=256 where (1e-4, 1e-3)
        solves it (README results).
    n_householder: Householder steps per token of gated_deltaproduct.
    dplr_rank: rank of the removal term of the RWKV-7-style dplr mixer.
    max_len: longest sequence the KV caches of the softmax layers are built for by generate().
    dtype: compute dtype of activations (parameters, norms, states and logits stay float32).
    seq_axis: mesh axis the sequence is sharded over (context parallelism): when set, the
        linear mixers run through `dplr_jax.parallel.context_parallel` on the mesh given by
        `jax.set_mesh`, with the batch over `batch_axis` (None: batch not sharded there).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    mixer: str
    attention_every: int = 0
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    head_dim: int | None = None
    num_value_groups: int = 1
    n_kv_heads: int | None = None
    beta_range: float = 1.0
    conv_size: int = 4
    n_householder: int = 2
    dplr_rank: int = 1
    gate_lower_bound: float | None = None
    dt_range: tuple[float, float] = DT_RANGE
    chunk_size: int = 64
    backend: str = "auto"
    max_len: int = 4096
    rope_theta: float = 10000.0
    dtype: str = "float32"
    seq_axis: str | None = None
    batch_axis: str | None = "data"

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        """Builds a config from a dict; unknown keys raise a ValueError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"LMConfig: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return -(-int(round(self.mlp_ratio * self.d_model * 2 / 3)) // 8) * 8

    def layer_mixer(self, i: int) -> str:
        """The token mixer of block i."""
        if self.attention_every and (i + 1) % self.attention_every == 0:
            return "attention"
        return self.mixer

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"LMConfig: field '{field}' = {getattr(self, field)!r} {why}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "conv_size", "n_householder",
                  "dplr_rank", "max_len", "num_value_groups"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f, "must be a positive integer")
        for f in ("seq_axis", "batch_axis"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), str):
                fail(f, "must be a mesh axis name or None")
        if self.mixer not in MIXERS:
            fail("mixer", f"is not a known token mixer; expected one of {MIXERS}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                fail("n_heads", f"does not divide d_model = {self.d_model} (head_dim = "
                                f"d_model // n_heads); set head_dim explicitly or change n_heads")
        elif not isinstance(self.head_dim, int) or self.head_dim < 1:
            fail("head_dim", "must be a positive integer or None")
        if (not isinstance(self.attention_every, int) or self.attention_every < 0
                or self.attention_every > self.n_layers):
            fail("attention_every", f"is out of range; expected 0 (no softmax layers) to "
                                    f"n_layers = {self.n_layers}")
        if self.num_value_groups > 1 and self.mixer not in GROUPED_VALUE_MIXERS:
            fail("num_value_groups", f"> 1 needs a mixer with grouped value heads "
                                     f"{GROUPED_VALUE_MIXERS}, not {self.mixer!r}")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int)
                                            or self.n_kv_heads < 1
                                            or self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", f"must be a positive divisor of n_heads = {self.n_heads}")
        uses_attention = self.mixer == "attention" or self.attention_every > 0
        if uses_attention and self.resolved_head_dim % 2:
            fail("head_dim", f"(resolved {self.resolved_head_dim}) must be even for RoPE in "
                             f"the softmax attention layers")
        if not 0 < self.beta_range <= 2:
            fail("beta_range", "must be in (0, 2] (1.0: sigmoid, 2.0: 2*sigmoid)")
        if self.gate_lower_bound is not None and not self.gate_lower_bound < 0:
            fail("gate_lower_bound", "must be negative or None")
        object.__setattr__(self, "dt_range", check_dt_range("LMConfig: field", self.dt_range))
        if not self.mlp_ratio > 0:
            fail("mlp_ratio", "must be positive")
        if (not isinstance(self.chunk_size, int) or self.chunk_size < 16
                or self.chunk_size & (self.chunk_size - 1)):
            fail("chunk_size", "must be a power of two >= 16")
        if self.backend not in BACKENDS:
            fail("backend", f"must be one of {BACKENDS}")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {DTYPES}")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be positive")
