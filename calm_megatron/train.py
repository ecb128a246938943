"""Entry point: `python -m calm_megatron.train CONFIG [section.key=value ...]`, under torchrun or srun.

The config is loaded and validated on every rank before any process group exists, so a bad key,
value or layout fails at once with a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from calm_megatron import config as C

EXIT_CONFIG_ERROR = 2
from calm_megatron.training.preemption import EXIT_REQUEUE  # noqa: E402  (75: saved, requeue me)

EPILOG = """examples:
  python -m calm_megatron.train configs/ae/tiny.yaml train.steps=100
  torchrun --nproc_per_node 2 -m calm_megatron.train configs/ae/tiny.yaml parallel.zero_stage=2
  launchers/local/run.sh 2 configs/ae/tiny.yaml run.name=my_ae

Every key of the config can be overridden as section.key=value; unknown keys are errors that list
the valid ones. The resolved config is printed and saved to <out_dir>/config.yaml.
Exit codes: 0 finished, 2 bad config (nothing started), 75 stopped by SIGTERM/SIGUSR1 or
train.exit_after_minutes after saving a checkpoint (run the same command again to resume).
A run resumes automatically from <checkpoint.save>/latest (default runs/<name>/checkpoints).
W&B: offline by default (runs/<name>/wandb); set WANDB_MODE=online and WANDB_API_KEY to upload,
WANDB_MODE=disabled to turn it off."""


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m calm_megatron.train", epilog=EPILOG,
                                     description="Train one stage of CALM (autoencoder, CALM or baseline).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")
    return parser.parse_args(argv)


def load_and_validate(args: argparse.Namespace, world_size: int) -> C.Config:
    cfg = C.load(args.config, args.overrides)
    C.validate(cfg, world_size)
    return cfg


def _data_error_exit(err, prefix: str) -> int:
    """Report a data error; storage down or too slow is resumable (requeue), corrupt or missing data is not."""
    print(f"{prefix}: {err}", file=sys.stderr)
    return EXIT_REQUEUE if err.resumable else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Validate, initialise the parallel runtime, train, tear down. Returns the process exit code."""
    args = parse_args(argv)
    from calm_megatron import distributed
    from calm_megatron.training import preemption

    preemption.install_handlers()  # before any slow start-up work: a signal then is not lost

    from calm_megatron.data.errors import DataLoaderError

    env = distributed.launch_env()
    try:
        cfg = load_and_validate(args, env.world_size)
    except DataLoaderError as err:  # e.g. the object store is down while the shard index is read
        return _data_error_exit(err, "error")
    except (C.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from calm_megatron.training import monitor

    monitor.setup_logging(env.rank)
    log = logging.getLogger("calm_megatron")
    if env.rank == 0:
        log.info("resolved config:\n%s", C.to_yaml(cfg))
        C.save(cfg, f"{cfg.out_dir}/config.yaml")
    if args.check:
        return 0
    layout = distributed.init(cfg.parallel.tp, cfg.parallel.pp, cfg.run.seed)
    from calm_megatron.training.checkpoint import CheckpointError
    from calm_megatron.training.trainer import Trainer

    try:
        summary = Trainer(cfg, layout).fit()
    except CheckpointError as err:
        print(f"error (rank {layout.rank}): {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except DataLoaderError as err:
        return _data_error_exit(err, f"error (rank {layout.rank})")
    finally:
        distributed.teardown()
    return EXIT_REQUEUE if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
