"""MQAR (Zoology) at T = 256, 512, 1024, 2048 for KDA, Gated DeltaNet, HDLA, DPLR, GLA and
softmax attention: 2 layers, d_model 128, vocab 8192, 16 key-value pairs at T=256 and T/8
beyond (Zoology uses 64 at T=512). Names: mqar_<mixer>_T<len>, e.g. mqar_kda_T256.

lr 3e-3: at 1e-3 no model (attention included) passed MQAR's learning transition at T=256
within the 3000 steps (H100 runs, README results); at 3e-3 KDA, attention and HDLA reach
>= 0.996 and DPLR 0.964 in the same steps.

Gated DeltaNet uses dt_range (1e-4, 1e-3) for its decay init: with the papers' (1e-3, 1e-1)
and 2 heads its heads forget within ~10-20 tokens at init, and it stayed at chance at T=256
(lr 1e-3, 3e-3, 1e-2; seed 1; 4 and 8 heads), while (1e-4, 1e-3) reached 0.999 (README)."""

from dplr_jax.train.config import ExperimentConfig, OptimizerConfig, TaskConfig

MIXERS = ("kda", "gated_deltanet", "hdla", "dplr", "gla", "attention")
LENGTHS = {256: 16, 512: 64, 1024: 128, 2048: 256}   # seq_len: num_kv_pairs

CONFIGS = {
    f"mqar_{mixer}_T{T}": ExperimentConfig(
        name=f"mqar_{mixer}_T{T}",
        model=dict(mixer=mixer, d_model=128, n_layers=2, n_heads=2,
                   **({"dt_range": (1e-4, 1e-3)} if mixer == "gated_deltanet" else {})),
        task=TaskConfig("mqar", dict(vocab=8192, num_kv_pairs=n)),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=200, weight_decay=0.1),
        steps=3000, batch_size=64, seq_len=T, eval_interval=250, eval_batches=8,
        checkpoint_interval=1000, log_interval=25, output_dir=f"runs/mqar_{mixer}_T{T}")
    for mixer in MIXERS for T, n in LENGTHS.items()
}
