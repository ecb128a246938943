"""A stand-in for `python -m calm_megatron.train` that follows the trainer's exit-code contract.

Used by tests/test_slurm.py through `CALM_TRAIN_CMD="python tests/slurm_fakes/trainer.py"`; it is run
by train.sbatch exactly as the trainer would be: `trainer.py CONFIG [section.key=value ...]`, one
process per rank under srun. It reads only these overrides (the others are recorded and ignored):

  run.out_dir=DIR      where it records what happened (events-rank<R>.jsonl, ready-* markers)
  fake.plan=A,B,...    what to do on run number i = SLURM_RESTART_COUNT (the last entry repeats):
                         an integer  exit with that code at once (75 = "requeue me", 2 = config error)
                         signal      install USR1/TERM handlers, write ready-r<i>-rank<R>, wait for a
                                     signal (at most fake.timeout seconds, then exit 1), record it
                                     and exit 75, as the trainer does after its checkpoint
                         nohandler   like signal, but with the default handlers: a signal kills it, as
                                     it kills a trainer that is still starting up
  fake.timeout=S       default 120
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

CONTRACT_ENV = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID",
                "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "PYTHONFAULTHANDLER", "DS_ACCELERATOR",
                "RANK", "WORLD_SIZE")


def main(argv) -> int:
    received = []
    signal.signal(signal.SIGUSR1, lambda num, frame: received.append("USR1"))
    signal.signal(signal.SIGTERM, lambda num, frame: received.append("TERM"))
    config, overrides = argv[0], dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg)
    out = Path(overrides.get("run.out_dir", "runs/fake"))
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    plan = overrides.get("fake.plan", "0").split(",")
    action = plan[min(restart, len(plan) - 1)]
    timeout = float(overrides.get("fake.timeout", "120"))

    def record(event: str, **extra) -> None:
        entry = {"event": event, "rank": rank, "restart": restart, "time": time.time(), **extra}
        with open(out / f"events-rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(f"fake trainer rank {rank} restart {restart}: {event} {extra or ''}", flush=True)

    record("start", config=config, argv=argv, cwd=os.getcwd(),
           env={key: os.environ.get(key) for key in CONTRACT_ENV})
    if action == "nohandler":
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if action in ("signal", "nohandler"):
        (out / f"ready-r{restart}-rank{rank}").write_text(str(os.getpid()))
        deadline = time.time() + timeout
        while not received and time.time() < deadline:
            time.sleep(0.05)
        if not received:
            record("timeout")
            return 1
        record("signal", signal=received[0])
        return 75
    code = int(action)
    record("exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
