"""The six MAD synthetic tasks (Poli et al. 2024) at MAD's default sizes, for any mixer:
mad_<task>_<mixer>, 2 layers, d_model 128."""

from dplr_jax.train.config import ExperimentConfig, OptimizerConfig, TaskConfig

TASKS = {   # name: (params, seq_len)
    "in_context_recall": ({}, 128),
    "fuzzy_in_context_recall": ({}, 128),
    "noisy_in_context_recall": ({}, 128),
    "selective_copying": ({}, 256),
    "compression": ({"max_len": 32}, 32),
    "memorization": ({}, 32),
}
MIXERS = ("kda", "gated_deltanet", "gla", "hdla", "attention")

CONFIGS = {
    f"mad_{task}_{mixer}": ExperimentConfig(
        name=f"mad_{task}_{mixer}",
        model=dict(mixer=mixer, d_model=128, n_layers=2, n_heads=2),
        task=TaskConfig(task, params),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=200, weight_decay=0.1),
        steps=2000, batch_size=64, seq_len=seq_len, eval_interval=250, eval_batches=8,
        checkpoint_interval=1000, log_interval=25, output_dir=f"runs/mad_{task}_{mixer}")
    for task, (params, seq_len) in TASKS.items() for mixer in MIXERS
}
