"""A Markdown results table from run directories (their config.json and metrics.jsonl).

    python -m dplr_jax.train.summary runs/*

One row per run: name, task, mixer, seq_len (and eval length), peak learning rate, steps
reached, the last training loss and accuracy, and the last evaluation accuracy.
"""

from __future__ import annotations

import json
import os
import sys

from dplr_jax.train.metrics import read_metrics

COLUMNS = ("run", "task", "mixer", "T (eval T)", "lr", "steps", "train loss", "train acc",
           "eval acc")


def summarize(run_dir: str) -> dict | None:
    """The table row of one run directory, or None if it has no config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    eval_len = cfg.get("eval_seq_len") or cfg["seq_len"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return {"run": cfg["name"], "task": cfg["task"]["name"],
            "mixer": cfg["model"].get("mixer", "-"),
            "T (eval T)": f"{cfg['seq_len']} ({eval_len})",
            "lr": format(cfg["optimizer"]["lr"], "g"),
            "steps": f"{train[-1]['step'] if train else 0}/{cfg['steps']}",
            "train loss": fmt(train[-1]["loss"] if train else None, ".4f"),
            "train acc": fmt(train[-1]["accuracy"] if train else None, ".3f"),
            "eval acc": fmt(evals[-1]["eval_accuracy"] if evals else None, ".3f")}


def markdown_table(run_dirs: list[str]) -> str:
    rows = [r for r in map(summarize, run_dirs) if r is not None]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1:]))
