"""Flax NNX layers for every linear-attention family and a hybrid language model.

Token mixers (x [B, T, d_model] -> [B, T, d_model], with `init_cache` / `prefill` / `step` for
O(1)-memory decoding): KDA, GatedDeltaNet, DeltaNet, GLA, DPLR (RWKV-7 style), HDLA,
GatedDeltaProduct, and causal softmax Attention (RoPE, GQA) for hybrids.
The language model: LMConfig, LanguageModel, generate, count_params, summary.
"""

from dplr_jax.nn.attention import Attention
from dplr_jax.nn.basic import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU
from dplr_jax.nn.config import MIXERS, LMConfig
from dplr_jax.nn.generate import generate, sample
from dplr_jax.nn.linear_mixers import (DPLR, GLA, HDLA, KDA, DeltaNet, GatedDeltaNet,
                                       GatedDeltaProduct, LinearMixer)
from dplr_jax.nn.model import (MIXER_CLASSES, Block, LanguageModel, count_params, make_mixer,
                               summary)

__all__ = ["Attention", "GatedRMSNorm", "RMSNorm", "ShortConv", "SwiGLU", "MIXERS", "LMConfig",
           "generate", "sample", "DPLR", "GLA", "HDLA", "KDA", "DeltaNet", "GatedDeltaNet",
           "GatedDeltaProduct", "LinearMixer", "MIXER_CLASSES", "Block", "LanguageModel",
           "count_params", "make_mixer", "summary"]
