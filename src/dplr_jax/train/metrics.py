"""Metrics of a run: a JSONL file (one record per line) and a PNG plot of loss and accuracy.

Training records: {"step", "loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "time"};
evaluation records: {"step", "eval_loss", "eval_accuracy"}.
"""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics JSONL file ([] if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends records to `path`. On a resumed run (`resume_step` given) the records after that
    step, written by the interrupted run, are dropped first so the file matches an
    uninterrupted run; on a fresh run the file starts empty."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] \
            if resume_step is not None else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_metrics(records: list[dict], path: str, title: str = "") -> None:
    """Saves a PNG: training loss (and evaluation loss) per step, and evaluation accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                     label="eval")
        ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-",
                    color="C1")
    ax_loss.set(xlabel="step", ylabel="loss (answer positions)", yscale="log")
    ax_loss.legend()
    ax_acc.set(xlabel="step", ylabel="eval accuracy (answer positions)", ylim=(0, 1.02))
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
