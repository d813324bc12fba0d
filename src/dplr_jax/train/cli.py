"""`dplr-train`: run a named experiment config with key=value overrides.

    dplr-train                                   # the small default: MQAR + KDA, CPU minutes
    dplr-train --config mqar_kda_T256 steps=2000 model.d_model=256 output_dir=runs/x
    dplr-train --list                            # the named configs
    dplr-train --config parity_beta2 --resume    # must continue from a checkpoint

Named configs are `default` plus the CONFIGS of every experiments/*.py (--experiments DIR;
default ./experiments, else the repository's). Re-running the same command after an
interruption continues from the latest checkpoint in output_dir. Multi-process runs: start
one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set
(or --distributed to let JAX detect the cluster).
"""

from __future__ import annotations

import argparse
import json
import sys

from dplr_jax.train.checkpoint import CheckpointError
from dplr_jax.train.config import apply_overrides, load_experiments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dplr-train", description="Train a dplr_jax language model on an experiment config.",
        epilog="Overrides: dotted keys, e.g. model.d_model=64 task.num_kv_pairs=8 "
               "optimizer.lr=3e-4 steps=500 mesh=2,1,1 output_dir=runs/x")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", default="default", help="named config (see --list)")
    parser.add_argument("--experiments", default=None, help="directory of experiment files")
    parser.add_argument("--list", action="store_true", help="list the named configs and exit")
    parser.add_argument("--show", action="store_true",
                        help="print the resolved config as JSON and exit")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in output_dir to continue from")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run; cluster auto-detected if JAX_* vars are unset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = load_experiments(args.experiments)
        if args.list:
            for name, cfg in configs.items():
                print(f"{name:32s} task={cfg.task.name} mixer={cfg.model.get('mixer')} "
                      f"seq_len={cfg.seq_len} steps={cfg.steps}")
            return 0
        if args.config not in configs:
            raise ValueError(f"unknown config {args.config!r}; named configs: "
                             f"{', '.join(configs)}")
        config = apply_overrides(configs[args.config], args.overrides)
        if args.show:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        from dplr_jax.parallel import initialize_distributed
        initialize_distributed(auto_detect=args.distributed)
        from dplr_jax.train.loop import train
        result = train(config, resume="require" if args.resume else "auto",
                       progress=not args.no_progress)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"dplr-train: error: {e}", file=sys.stderr)
        return 2
    summary = {"config": config.name, "step": result.step, "eval_loss": result.eval_loss,
               "eval_accuracy": result.eval_accuracy, "output_dir": config.output_dir}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
