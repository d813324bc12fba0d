"""The training loop: a jit-compiled, sharded AdamW step over a ("data", "seq", "model") mesh,
periodic evaluation and checkpoints, exact resume, metrics JSONL and a plot.

    result = train(config)                    # fresh run, or resumes from output_dir/checkpoints
    result = train(config, resume="require")  # error unless a checkpoint exists

Resume is exact: the restored step, parameters and optimizer state plus the stateless data
stream (batch i is a function of (seed, i)) make a run killed and restarted produce the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dplr_jax.train.checkpoint import Checkpointer, CheckpointError, check_writable
from dplr_jax.train.config import ExperimentConfig
from dplr_jax.train.metrics import MetricsLog, plot_metrics, read_metrics
from dplr_jax.train.sharding import (batch_sharding, make_mesh, opt_state_shardings,
                                     param_shardings, put_global)
from dplr_jax.train.tasks import Task, make_batch, make_task

# Config fields that must match between a checkpoint and the run resuming from it.
RESUME_KEYS = ("model", "task", "optimizer", "steps", "batch_size", "seq_len", "seed")


@dataclass
class Program:
    """The jitted pieces of a run and the sharded shapes of its state.

    init() -> (params, rest) creates the parameters (pure dicts) already sharded;
    train_step(params, opt_state, rest, batch) -> (params, opt_state, stats);
    eval_step(params, rest, batch) -> (summed loss, correct, count) over the answer positions.
    """

    opt_sharding: object
    abstract_params: dict
    abstract_opt_state: object
    init: object
    train_step: object
    eval_step: object


@dataclass
class TrainResult:
    """What a run ends with: the step reached, final parameters and optimizer state (pure
    dicts of jax.Arrays), all metric records, and the last evaluation."""

    step: int
    params: dict
    opt_state: object
    records: list
    eval_loss: float | None
    eval_accuracy: float | None


def model_config(config: ExperimentConfig, task: Task):
    """The LMConfig of a run: config.model with vocab_size defaulting to the task's."""
    from dplr_jax.nn import LMConfig
    d = dict(config.model)
    d.setdefault("vocab_size", task.vocab_size)
    if d["vocab_size"] < task.vocab_size:
        raise ValueError(f"model.vocab_size = {d['vocab_size']} is smaller than the "
                         f"{task.vocab_size} tokens of task {task.name!r}")
    return LMConfig.from_dict(d)


def make_optimizer(config: ExperimentConfig):
    """(optax transformation, learning-rate schedule) of config.optimizer."""
    o = config.optimizer
    warmup = min(o.warmup_steps, config.steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1), end_value=o.lr * o.final_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


def masked_stats(logits, targets, mask):
    """(mean cross-entropy over the mask, number of correct argmax predictions, mask count)."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, targets[..., None], axis=-1)[..., 0]
    count = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(count, 1.0)
    correct = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum()
    return loss, correct, count


def _resume_mismatch(saved: dict, current: dict) -> list[str]:
    return [k for k in RESUME_KEYS if json.dumps(saved.get(k), sort_keys=True)
            != json.dumps(current.get(k), sort_keys=True)]


def build_program(config: ExperimentConfig, lm_config, mesh, tx, train_sh, eval_sh) -> Program:
    """Derives parameter/optimizer shardings from the model's sharding metadata and jits the
    init, train and eval functions with explicit in/out shardings (call under the mesh)."""
    from dplr_jax.nn import LanguageModel

    replicated = NamedSharding(mesh, P())

    def init():
        model = LanguageModel(lm_config, rngs=nnx.Rngs(config.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    abstract = nnx.eval_shape(lambda: LanguageModel(lm_config, rngs=nnx.Rngs(config.seed)))
    graphdef, abs_param_state, _ = nnx.split(abstract, nnx.Param, ...)
    abs_params, abs_rest = jax.eval_shape(init)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abs_param_state))
    p_sh = param_shardings(abs_params, specs, mesh)
    r_sh = jax.tree.map(lambda _: replicated, abs_rest)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    o_sh = opt_state_shardings(tx, abs_opt, p_sh, mesh)
    b_sh = {"inputs": train_sh, "targets": train_sh, "mask": train_sh}
    e_sh = {"inputs": eval_sh, "targets": eval_sh, "mask": eval_sh}

    def stats_of(params, rest, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
        loss, correct, count = masked_stats(logits, batch["targets"], batch["mask"])
        return loss, (correct, count)

    def train_step(params, opt_state, rest, batch):
        (loss, (correct, count)), grads = jax.value_and_grad(stats_of, has_aux=True)(
            params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {"loss": loss, "accuracy": correct / jnp.maximum(count, 1.0),
                 "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, stats

    def eval_step(params, rest, batch):
        loss, (correct, count) = stats_of(params, rest, batch)
        return loss * count, correct, count

    with_sharding = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return Program(
        opt_sharding=o_sh,
        abstract_params=with_sharding(abs_params, p_sh),
        abstract_opt_state=with_sharding(abs_opt, o_sh),
        init=jax.jit(init, out_shardings=(p_sh, r_sh)),
        train_step=jax.jit(train_step, in_shardings=(p_sh, o_sh, r_sh, b_sh),
                           out_shardings=(p_sh, o_sh, replicated), donate_argnums=(0, 1)),
        eval_step=jax.jit(eval_step, in_shardings=(p_sh, r_sh, e_sh),
                          out_shardings=replicated))


def restore_state(checkpointer: Checkpointer, step: int, program: Program,
                  config: ExperimentConfig):
    """(params, opt_state) of checkpoint `step`, after checking it belongs to this config."""
    params, opt_state, meta = checkpointer.restore(step, program.abstract_params,
                                                   program.abstract_opt_state)
    where = os.path.join(checkpointer.directory, str(step))
    mismatch = _resume_mismatch(meta["config"], config.to_dict())
    if mismatch:
        raise CheckpointError(f"checkpoint {where} was made with a different "
                              f"{', '.join(mismatch)}; resume with the same config or choose "
                              f"another output_dir. Nothing was overwritten.")
    if meta["data_position"] != step:
        raise CheckpointError(f"checkpoint {where} has data position {meta['data_position']}; "
                              f"expected {step}. Nothing was overwritten.")
    return params, opt_state


def train(config: ExperimentConfig, *, resume: str = "auto", progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Runs (or resumes) the experiment `config` and returns a TrainResult.

    resume: "auto" continues from the latest checkpoint in output_dir/checkpoints when there
        is one; "require" raises CheckpointError when there is none.
    progress: show a tqdm bar (process 0 only).
    stop_at: return after this many steps without a final checkpoint, as if the process had
        been killed there (to test resumption).
    The output directory is checked for writability before anything else; a missing or
    unreadable checkpoint raises CheckpointError before any file is written.
    """
    if resume not in ("auto", "require"):
        raise ValueError(f"resume must be 'auto' or 'require', got {resume!r}")
    out_dir = config.output_dir
    check_writable(out_dir)
    check_writable(os.path.join(out_dir, "checkpoints"))
    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), config.keep_checkpoints)
    try:
        return _run(config, checkpointer, resume, progress, stop_at)
    finally:
        checkpointer.close()


def _run(config, checkpointer, resume, progress, stop_at) -> TrainResult:
    saved_steps = checkpointer.steps()
    if not saved_steps and resume == "require":
        raise CheckpointError(f"no checkpoint to resume from in {checkpointer.directory}")
    task = make_task(config.task.name, config.task.params)
    eval_len = config.eval_seq_len or config.seq_len
    task.check_seq_len(config.seq_len)
    task.check_seq_len(eval_len)
    lm_config = model_config(config, task)
    mesh = make_mesh(config.mesh)
    train_sh = batch_sharding(mesh, config.batch_size, config.seq_len)
    eval_sh = batch_sharding(mesh, config.batch_size, eval_len)
    tx, schedule = make_optimizer(config)
    is_main = jax.process_index() == 0

    with jax.set_mesh(mesh):
        program = build_program(config, lm_config, mesh, tx, train_sh, eval_sh)
        params, rest = program.init()
        start = saved_steps[-1] if saved_steps else 0
        if saved_steps:
            params, opt_state = restore_state(checkpointer, start, program, config)
        else:
            opt_state = jax.jit(tx.init, out_shardings=program.opt_sharding)(params)

        metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
        log = MetricsLog(metrics_path, resume_step=start if saved_steps else None) \
            if is_main else None
        if is_main:
            with open(os.path.join(config.output_dir, "config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2)

        def batch_at(step, split, seq_len, sharding):
            b = make_batch(task, config.seed, step, split, config.batch_size, seq_len)
            return {k: put_global(v, sharding) for k, v in dataclasses.asdict(b).items()}

        eval_set = [batch_at(i, "eval", eval_len, eval_sh) for i in range(config.eval_batches)]

        def evaluate():
            sums = np.zeros(3)
            for b in eval_set:
                sums += np.array(jax.device_get(program.eval_step(params, rest, b)), np.float64)
            return sums[0] / max(sums[2], 1.0), sums[1] / max(sums[2], 1.0)

        bar = tqdm(total=config.steps, initial=start, disable=not (progress and is_main),
                   desc=config.name, dynamic_ncols=True)
        pending, t_last, n_last = [], time.perf_counter(), start
        eval_loss = eval_acc = None
        step = start
        while step < config.steps and (stop_at is None or step < stop_at):
            batch = batch_at(step, "train", config.seq_len, train_sh)
            params, opt_state, stats = program.train_step(params, opt_state, rest, batch)
            pending.append(stats)
            step += 1
            bar.update(1)
            if step % config.log_interval == 0 or step == config.steps:
                values = jax.device_get(pending)
                now = time.perf_counter()
                tok_s = (step - n_last) * config.batch_size * config.seq_len / (now - t_last)
                record = {"step": step, **{k: float(np.mean([v[k] for v in values]))
                                           for k in values[0]},
                          "lr": float(schedule(step - 1)), "tokens_per_s": tok_s,
                          "time": time.time()}
                pending, t_last, n_last = [], now, step
                if log:
                    log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
            if step % config.eval_interval == 0 or step == config.steps:
                eval_loss, eval_acc = evaluate()
                if log:
                    log.write({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_acc})
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, accuracy {eval_acc:.4f}")
            if step % config.checkpoint_interval == 0 or step == config.steps:
                checkpointer.save(step, params, opt_state, {"step": step, "data_position": step,
                                                            "config": config.to_dict()})
        bar.close()
        checkpointer.wait()
        records = read_metrics(metrics_path)
        if step == config.steps:
            if eval_loss is None:                  # resumed from the final checkpoint
                eval_loss, eval_acc = evaluate()
            if is_main:
                plot_metrics(records, os.path.join(config.output_dir, "metrics.png"),
                             title=config.name)
        return TrainResult(step, params, opt_state, records, eval_loss, eval_acc)
