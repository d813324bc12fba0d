"""Training: synthetic tasks, experiment configs, the sharded loop, checkpoints, metrics, CLI.

    from dplr_jax.train import default_config, apply_overrides, train
    result = train(apply_overrides(default_config(), ["steps=100", "output_dir=runs/x"]))

The `dplr-train` command (dplr_jax.train.cli) runs the named configs of experiments/*.py.
"""

from dplr_jax.train.checkpoint import CheckpointError
from dplr_jax.train.config import (ExperimentConfig, OptimizerConfig, TaskConfig,
                                   apply_overrides, default_config, load_experiments)
from dplr_jax.train.loop import TrainResult, train
from dplr_jax.train.tasks import TASKS, Batch, make_batch, make_task

__all__ = ["CheckpointError", "ExperimentConfig", "OptimizerConfig", "TaskConfig",
           "apply_overrides", "default_config", "load_experiments", "TrainResult", "train",
           "TASKS", "Batch", "make_batch", "make_task"]
