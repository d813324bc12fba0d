"""The training loop on the CPU: loss goes down, checkpoints round-trip exactly, an interrupted
and resumed run equals an uninterrupted one, and bad inputs fail clearly without side effects."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from dplr_jax.train.checkpoint import Checkpointer, CheckpointError
from dplr_jax.train.cli import main as cli_main
from dplr_jax.train.config import apply_overrides, default_config
from dplr_jax.train.loop import make_optimizer, train
from dplr_jax.train.summary import markdown_table

# A tiny model and task so that compiling dominates; softmax attention compiles fastest.
TINY = ["model.mixer=attention", "model.d_model=16", "model.n_layers=1", "model.n_heads=1",
        "task.vocab=32", "task.num_kv_pairs=2", "seq_len=16", "batch_size=8", "eval_batches=1",
        "log_interval=1", "optimizer.lr=1e-2", "optimizer.warmup_steps=2"]


def tiny(out, *extra):
    return apply_overrides(default_config(), TINY + [f"output_dir={out}", *extra])


def tree_hash(directory):
    """sha256 over the relative paths and contents of every file under `directory`."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and leaves_a
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 12-step run with checkpoints at steps 5, 10 and 12."""
    out = tmp_path_factory.mktemp("full")
    cfg = tiny(out, "steps=12", "checkpoint_interval=5", "eval_interval=6", "keep_checkpoints=3")
    return cfg, train(cfg, progress=False)


def test_twenty_steps_lower_the_loss(tmp_path):
    cfg = tiny(tmp_path, "steps=20", "model.mixer=deltanet", "eval_interval=20",
               "checkpoint_interval=20")
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
    assert result.step == 20 and 0.0 <= result.eval_accuracy <= 1.0
    for name in ("metrics.jsonl", "metrics.png", "config.json", "checkpoints/20"):
        assert os.path.exists(tmp_path / name), name


def test_checkpoint_round_trip_is_exact(full_run):
    cfg, result = full_run
    assert result.step == 12
    assert sorted(int(d) for d in os.listdir(os.path.join(cfg.output_dir, "checkpoints"))
                  if d.isdigit()) == [5, 10, 12]
    abstract = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep=3)
    params, opt_state, meta = ckpt.restore(12, abstract(result.params), abstract(result.opt_state))
    ckpt.close()
    assert meta["step"] == 12 and meta["data_position"] == 12
    assert_trees_equal(params, result.params)
    assert_trees_equal(opt_state, result.opt_state)
    tx, _ = make_optimizer(cfg)
    assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(params))


def test_interrupted_and_resumed_equals_uninterrupted(full_run, tmp_path):
    cfg, reference = full_run
    cfg = cfg.replace(output_dir=str(tmp_path))
    killed = train(cfg, progress=False, stop_at=8)     # dies after step 8: last checkpoint is 5
    assert killed.step == 8
    resumed = train(cfg, progress=False, resume="require")
    assert resumed.step == 12
    assert_trees_equal(resumed.params, reference.params)
    assert_trees_equal(resumed.opt_state, reference.opt_state)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}  # noqa
                          for r in recs]
    assert strip(resumed.records) == strip(reference.records)   # steps 6-8 logged once


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="not writable"):
        train(tiny(blocker / "run", "steps=2"), progress=False)
    assert cli_main(TINY + [f"output_dir={blocker / 'run'}", "--no-progress"]) == 2


def test_missing_checkpoint_on_resume(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(tiny(tmp_path, "steps=2"), progress=False, resume="require")
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    assert cli_main(TINY + [f"output_dir={tmp_path / 'cli'}", "--resume", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_corrupt_checkpoint_is_an_error_and_overwrites_nothing(full_run, tmp_path):
    cfg, _ = full_run
    shutil.copytree(cfg.output_dir, tmp_path, dirs_exist_ok=True)
    state_dir = tmp_path / "checkpoints" / "12" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            if "manifest" in name or os.path.basename(root) == "d":
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"\x00garbage" * 8)
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match="could not be restored"):
        train(cfg.replace(output_dir=str(tmp_path)), progress=False)
    assert tree_hash(tmp_path) == before


def test_checkpoint_of_another_config_is_refused(full_run, tmp_path):
    cfg, _ = full_run
    shutil.copytree(cfg.output_dir, tmp_path, dirs_exist_ok=True)
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match="different seed"):
        train(cfg.replace(output_dir=str(tmp_path), seed=1), progress=False)
    assert tree_hash(tmp_path) == before


def test_data_seq_model_sharding_matches_data_parallel(full_run, tmp_path):
    cfg, reference = full_run                       # mesh (8, 1, 1): pure data parallelism
    sharded = train(cfg.replace(output_dir=str(tmp_path), mesh=(2, 2, 2), steps=12), progress=False)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded.params)}
    assert any("model" in s for s in specs)         # the model's tensor-parallel annotations
    loss = lambda recs: [r["loss"] for r in recs if "loss" in r]  # noqa: E731
    np.testing.assert_allclose(loss(sharded.records), loss(reference.records), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_summary_table_of_a_run(full_run, tmp_path):
    cfg, result = full_run
    table = markdown_table([cfg.output_dir, str(tmp_path)])      # tmp_path: not a run, skipped
    lines = table.splitlines()
    assert len(lines) == 3 and "| default | mqar | attention | 16 (16) |" in lines[2]
    assert f"| {cfg.optimizer.lr:g} | 12/12 |" in lines[2]
    assert f"{result.eval_accuracy:.3f} |" in lines[2]
