"""Experiment configuration: one frozen dataclass per run, dotted `key=value` overrides, and the
named configs of experiments/*.py.

An experiment file is a Python module that defines `CONFIGS: dict[str, ExperimentConfig]`;
`load_experiments(directory)` collects the CONFIGS of every *.py file in it (names must be
unique). `default_config()` is the small MQAR + KDA run that `dplr-train` starts with no
arguments.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field

from dplr_jax.train.tasks import TASKS, task_params


@dataclass(frozen=True)
class TaskConfig:
    """Which task (a name in dplr_jax.train.tasks.TASKS) and its parameters."""

    name: str = "mqar"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to lr * final_lr_ratio, and global-norm
    gradient clipping. Weight decay applies to parameters with two or more dimensions.
    warmup_steps is capped at the run's number of steps."""

    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95

    def __post_init__(self):
        checks = {"lr": self.lr > 0, "warmup_steps": isinstance(self.warmup_steps, int)
                  and self.warmup_steps >= 0, "final_lr_ratio": 0 <= self.final_lr_ratio <= 1,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip > 0,
                  "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"OptimizerConfig: '{name}' = {getattr(self, name)!r} is out "
                                 f"of range (lr, grad_clip > 0; warmup_steps, weight_decay >= 0; "
                                 f"final_lr_ratio in [0, 1]; b1, b2 in [0, 1))")


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run.

    model: keyword arguments of dplr_jax.nn.LMConfig; vocab_size defaults to the task's.
    task, optimizer: see TaskConfig, OptimizerConfig.
    steps: optimizer steps (the schedule's length). batch_size: global sequences per step.
    seq_len: tokens per sequence. eval_seq_len: evaluation length (default seq_len).
    eval_interval / eval_batches: evaluate every N steps on a fixed set of that many batches.
    checkpoint_interval / keep_checkpoints: save every N steps (and at the end), keep the last K.
    log_interval: steps between metric records (and progress-bar updates).
    output_dir: where checkpoints/, metrics.jsonl, config.json and metrics.png go.
    seed: model initialization and data. mesh: sizes of the ("data", "seq", "model") axes;
        one entry may be -1 (all remaining devices).
    """

    name: str = "default"
    model: dict = field(default_factory=dict)
    task: TaskConfig = field(default_factory=TaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    eval_seq_len: int | None = None
    eval_interval: int = 100
    eval_batches: int = 4
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 10
    output_dir: str = "runs/default"
    seed: int = 0
    mesh: tuple = (-1, 1, 1)

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches",
                  "checkpoint_interval", "keep_checkpoints", "log_interval"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ExperimentConfig: '{f}' = {v!r} must be a positive integer")
        if self.eval_seq_len is not None and (not isinstance(self.eval_seq_len, int)
                                              or self.eval_seq_len < 1):
            raise ValueError(f"ExperimentConfig: 'eval_seq_len' = {self.eval_seq_len!r} must be "
                             f"a positive integer or None")
        mesh = tuple(self.mesh)
        if (len(mesh) != 3 or any(not isinstance(m, int) or (m < 1 and m != -1) for m in mesh)
                or mesh.count(-1) > 1):
            raise ValueError(f"ExperimentConfig: 'mesh' = {self.mesh!r} must be three sizes for "
                             f"the (data, seq, model) axes, positive or one -1")
        object.__setattr__(self, "mesh", mesh)
        if self.task.name not in TASKS:
            raise ValueError(f"ExperimentConfig: unknown task {self.task.name!r}; valid tasks: "
                             f"{', '.join(sorted(TASKS))}")
        unknown = sorted(set(self.task.params) - set(task_params(self.task.name)))
        if unknown:
            raise ValueError(f"ExperimentConfig: unknown task parameter(s) {unknown} for task "
                             f"{self.task.name!r}; valid keys: "
                             f"{', '.join(task_params(self.task.name)) or '(none)'}")
        unknown = sorted(set(self.model) - set(model_keys()))
        if unknown:
            raise ValueError(f"ExperimentConfig: unknown model key(s) {unknown}; valid keys: "
                             f"{', '.join(model_keys())}")

    def to_dict(self) -> dict:
        """A JSON-able dict (from_dict inverts it)."""
        d = dataclasses.asdict(self)
        d["mesh"] = list(self.mesh)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """Builds a config from a (nested) dict; unknown keys raise a ValueError listing the
        valid ones."""
        d = dict(d)
        _check_keys(d, [f.name for f in dataclasses.fields(cls)], "")
        if "task" in d:
            _check_keys(d["task"], ["name", "params"], "task.")
            d["task"] = TaskConfig(**d["task"])
        if "optimizer" in d:
            _check_keys(d["optimizer"], [f.name for f in dataclasses.fields(OptimizerConfig)],
                        "optimizer.")
            d["optimizer"] = OptimizerConfig(**d["optimizer"])
        if "mesh" in d:
            d["mesh"] = tuple(d["mesh"])
        return cls(**d)

    def replace(self, **changes) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


def model_keys() -> list[str]:
    """The field names of dplr_jax.nn.LMConfig (the valid keys of ExperimentConfig.model)."""
    from dplr_jax.nn import LMConfig
    return [f.name for f in dataclasses.fields(LMConfig)]


def _check_keys(d, valid, prefix):
    if not isinstance(d, dict):
        raise ValueError(f"config: '{prefix.rstrip('.')}' must be a mapping, got {d!r}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"config: unknown key(s) {[prefix + k for k in unknown]}; valid keys: "
                         f"{', '.join(prefix + k for k in valid)}")


def valid_override_keys(config: ExperimentConfig) -> list[str]:
    """Every dotted key that `apply_overrides` accepts for this config."""
    top = [f.name for f in dataclasses.fields(ExperimentConfig)
           if f.name not in ("model", "task", "optimizer")]
    return (top + [f"model.{k}" for k in model_keys()] + ["task.name"]
            + [f"task.{k}" for k in task_params(config.task.name)]
            + [f"optimizer.{f.name}" for f in dataclasses.fields(OptimizerConfig)])


def parse_value(text: str):
    """An override value: JSON or a Python literal (numbers, true/false/True/False/null/None,
    lists, tuples like 2,1,1), else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Applies `key=value` overrides (dotted keys: model.d_model=64, task.num_kv_pairs=8,
    optimizer.lr=3e-4, task.name=parity; values as `parse_value`, name and output_dir taken
    verbatim). Unknown keys raise a ValueError listing the valid keys."""
    d = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        value = text if key in ("name", "output_dir") else parse_value(text)
        if key == "task.name":
            if value not in TASKS:
                raise ValueError(f"unknown task {value!r}; valid tasks: "
                                 f"{', '.join(sorted(TASKS))}")
            if value != d["task"]["name"]:
                d["task"] = {"name": value, "params": {}}
            continue
        valid = valid_override_keys(ExperimentConfig.from_dict(d))
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        head, _, rest = key.partition(".")
        if head == "task":
            d["task"]["params"][rest] = value
        elif rest:
            d[head][rest] = value
        else:
            d[head] = value
    return ExperimentConfig.from_dict(d)


def default_config() -> ExperimentConfig:
    """The small run of `dplr-train` with no arguments: MQAR (T=64, 4 pairs, vocabulary 64)
    with a 2-layer KDA model, d_model 64; a few minutes on a laptop CPU (about 90% eval
    accuracy at the end)."""
    return ExperimentConfig(
        name="default",
        model=dict(mixer="kda", d_model=64, n_layers=2, n_heads=2),
        task=TaskConfig("mqar", dict(vocab=64, num_kv_pairs=4)),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1),
        steps=600, batch_size=32, seq_len=64, eval_interval=100, eval_batches=4,
        checkpoint_interval=200, log_interval=10, output_dir="runs/default")


def default_experiments_dir() -> str | None:
    """./experiments if it exists, else the repository's experiments/ (editable installs)."""
    for d in ("experiments", os.path.join(os.path.dirname(__file__), "..", "..", "..",
                                          "experiments")):
        if os.path.isdir(d):
            return os.path.normpath(d)
    return None


def load_experiments(directory: str | None = None) -> dict[str, ExperimentConfig]:
    """All named configs: `default` plus the CONFIGS of every experiments/*.py."""
    configs = {"default": default_config()}
    directory = directory or default_experiments_dir()
    if directory is None:
        return configs
    if not os.path.isdir(directory):
        raise ValueError(f"experiments directory {directory!r} does not exist")
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".py") or fname.startswith("_"):
            continue
        path = os.path.join(directory, fname)
        spec = importlib.util.spec_from_file_location(f"dplr_experiments_{fname[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found = getattr(module, "CONFIGS", None)
        if not isinstance(found, dict):
            raise ValueError(f"{path} must define CONFIGS: dict[str, ExperimentConfig]")
        for name, cfg in found.items():
            if name in configs:
                raise ValueError(f"experiment {name!r} in {path} is defined twice")
            configs[name] = cfg
    return configs
