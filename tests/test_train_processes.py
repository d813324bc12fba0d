"""dplr-train in real processes: a run killed with SIGKILL and restarted ends with the same
parameters as an uninterrupted run; a 2-process distributed run through the CLI matches a
single-process run on the same mesh shape."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from conftest import xla_flags

from dplr_jax.train.config import apply_overrides, default_config
from dplr_jax.train.loop import train
from dplr_jax.train.metrics import read_metrics

CLI = [sys.executable, "-m", "dplr_jax.train.cli", "--no-progress"]
SMALL = ["model.mixer=attention", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
         "task.vocab=64", "task.num_kv_pairs=4", "eval_batches=1", "optimizer.warmup_steps=5"]


def env(devices, **extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(var, None)
    e.update(extra)
    return e


def leaves_equal(a, b):
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_then_restart_equals_uninterrupted(tmp_path):
    # 200 steps, checkpoints every 25: the kill at checkpoint 50 leaves 150 steps to resume
    overrides = SMALL + ["seq_len=64", "batch_size=16", "steps=200", "checkpoint_interval=25",
                         "eval_interval=200", "log_interval=5", "mesh=1,1,1"]
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    # the killed process gets this process's 8 CPU devices: the same XLA flags, the same code
    proc = subprocess.Popen(CLI + overrides + [f"output_dir={killed_dir}"], env=env(8),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "50").is_dir():       # kill at once, possibly in the middle of a save
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 50 <= done < 200

    cfg = apply_overrides(default_config(), overrides + [f"output_dir={killed_dir}"])
    resumed = train(cfg, progress=False, resume="require")
    reference = train(cfg.replace(output_dir=str(reference_dir)), progress=False)
    assert resumed.step == reference.step == 200
    leaves_equal(resumed.params, reference.params)
    leaves_equal(resumed.opt_state, reference.opt_state)
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa
    assert losses(killed_dir) == losses(reference_dir)


def test_two_process_distributed_run_through_the_cli(tmp_path):
    overrides = SMALL + ["seq_len=16", "batch_size=8", "steps=6", "checkpoint_interval=3",
                         "eval_interval=3", "log_interval=1", "mesh=2,1,2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "distributed"
    procs = [subprocess.Popen(
        CLI + overrides + [f"output_dir={out}"],
        env=env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert summaries[0] == summaries[1] and summaries[0]["step"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["3", "6"]
    distributed = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    single = train(apply_overrides(default_config(), overrides + [
        f"output_dir={tmp_path / 'single'}"]), progress=False)
    expected = [r["loss"] for r in single.records if "loss" in r]
    np.testing.assert_allclose(distributed, expected, rtol=1e-5)
    assert abs(summaries[0]["eval_accuracy"] - single.eval_accuracy) < 1e-6
