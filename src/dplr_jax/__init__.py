"""dplr_jax: linear attention with Diagonal-Plus-Low-Rank state transitions in JAX."""

from dplr_jax import ops

__version__ = "0.1.0"
__all__ = ["ops"]
