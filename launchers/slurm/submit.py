#!/usr/bin/env python3
"""Submit a whole CALM pipeline to Slurm as chained jobs.

    prepare data (optional) -> stage 1, the autoencoder -> stage 2, CALM
                            -> the autoregressive baseline (optional, needs no autoencoder)

Each training stage is one `sbatch launchers/slurm/train.sbatch CONFIG [overrides]` job (which
requeues itself on preemption). A stage waits for the one before it with
`--dependency=afterok:JOB --kill-on-invalid-dep=yes`: when stage 1 fails, Slurm cancels stage 2
instead of leaving it pending forever. Stage 2 (CALM) gets `model.autoencoder_checkpoint=<stage-1
run.out_dir>`.

Thin on purpose: argparse + subprocess; the helpers below are pure and tested without Slurm.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRAIN_SBATCH = HERE / "train.sbatch"
TRAIN_STAGES = ("ae", "calm", "ar")

EPILOG = """\
examples:
  # autoencoder, then CALM with it, and the baseline alongside, 8 GPUs per node
  launchers/slurm/submit.py --ae-config configs/ae/k4_paper.yaml --calm-config configs/calm/m.yaml \\
      --ar-config configs/ar/m.yaml --sbatch-args "--partition=gpu --account=proj" \\
      --train-sbatch-args "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --time=04:00:00"

  # CALM on top of an autoencoder that is already trained
  launchers/slurm/submit.py --calm-config configs/calm/tiny.yaml --ae-checkpoint runs/ae_tiny

  # tokenize first (tools/prepare_data.py arguments), print the commands only
  launchers/slurm/submit.py --prepare-args "--input a.jsonl --tokenizer tok.model --out data/x \\
      --packing ae --chunk-size 4 --seq-len 2048" --ae-config configs/ae/tiny.yaml --dry-run

Options of sbatch: --sbatch-args go to every job, --train-sbatch-args to the training stages,
--<stage>-sbatch-args to one stage; later ones win. Logs: <logs-dir>/<job name>-<job id>.out.
Resubmitting the same command resumes each stage from its <run.out_dir>/checkpoints/latest
(a finished stage resumes at its last step and ends at once)."""


class SubmitError(RuntimeError):
    """A problem with the pipeline request, found before anything is submitted."""


@dataclass
class Job:
    """One sbatch submission of the pipeline."""
    stage: str  # prepare | ae | calm | ar
    sbatch_options: List[str]  # options before the script (dependencies use <stage> placeholders)
    script: List[str]  # train.sbatch CONFIG OVERRIDES..., or [] for a --wrap job
    after: List[str] = field(default_factory=list)  # stages this one waits for (afterok)

    def argv(self, job_ids: Optional[Dict[str, str]] = None) -> List[str]:
        """The sbatch command line; dependencies name real job ids when given, placeholders otherwise."""
        ids = job_ids or {}
        options = list(self.sbatch_options)
        if self.after:
            deps = ":".join(ids.get(stage, f"<{stage}-job-id>") for stage in self.after)
            options += [f"--dependency=afterok:{deps}", "--kill-on-invalid-dep=yes"]
        return ["sbatch", "--parsable", *options, *self.script]


def split_args(text: Optional[str]) -> List[str]:
    return shlex.split(text) if text else []


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value of the last `key=value` among the overrides, None when absent."""
    value = None
    for item in overrides:
        name, sep, rest = item.partition("=")
        if sep and name.strip() == key:
            value = rest
    return value


def load_config(config: str, overrides: Sequence[str], stage: str):
    """The config as the trainer will see it (None when the package cannot be imported here).

    Catches a typo in a key or a wrong stage now, rather than after the job waited in the queue.
    """
    try:
        sys.path.insert(0, str(REPO))
        from calm_megatron import config as C  # the package's own rules (base: files, defaults)
    except ImportError as err:
        print(f"warning: cannot import calm_megatron ({err}): configs are checked when the jobs start; "
              f"run this with the repository's .venv/bin/python to check them now", file=sys.stderr)
        return None
    try:
        cfg = C.load(config, list(overrides))
    except Exception as err:  # ConfigError, FileNotFoundError, YAML errors: report before submitting
        raise SubmitError(f"--{stage}-config {config}: {err}") from err
    if cfg.run.stage != stage:
        raise SubmitError(f"--{stage}-config {config} is a run.stage={cfg.run.stage} config")
    return cfg


def resolve_out_dir(config: str, overrides: Sequence[str], cfg=None) -> str:
    """run.out_dir of a run: the override when given, else what the loaded config resolves to."""
    explicit = override_value(overrides, "run.out_dir")
    if explicit:
        return explicit
    if cfg is None:
        raise SubmitError(f"cannot tell where the run of {config} writes its checkpoints: pass "
                          f"run.out_dir=... as an override (or let this script check the configs)")
    return cfg.out_dir


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else "python3"


def plan(args: argparse.Namespace) -> List[Job]:
    """The jobs to submit, in order, from the parsed command line."""
    stages = [s for s in TRAIN_STAGES if getattr(args, f"{s}_config")]
    if not stages and not args.prepare_args:
        raise SubmitError("nothing to submit: give --ae-config, --calm-config and/or --ar-config "
                          "(and optionally --prepare-args)")
    calm_overrides = list(args.calm_override)
    if args.calm_config:
        if override_value(calm_overrides, "model.autoencoder_checkpoint") is not None:
            raise SubmitError("give the autoencoder with --ae-config (trained first) or --ae-checkpoint, "
                              "not as a --calm-override")
        if args.ae_config and args.ae_checkpoint:
            raise SubmitError("--ae-checkpoint and --ae-config both given: use one")
        if not args.ae_config and not args.ae_checkpoint:
            raise SubmitError("--calm-config needs the stage-1 autoencoder: --ae-config (submitted first) "
                              "or --ae-checkpoint DIR (an existing stage-1 run folder)")
    common = split_args(args.sbatch_args)
    train_common = split_args(args.train_sbatch_args)
    logs = str(Path(args.logs_dir) / "%x-%j.out")
    jobs: List[Job] = []

    if args.prepare_args:
        python = shlex.quote(default_python())
        wrap = " && ".join(f"{python} tools/prepare_data.py {one}" for one in args.prepare_args)
        jobs.append(Job("prepare", [f"--job-name={args.name}-prepare", f"--output={logs}", "--ntasks=1",
                                    *common, *split_args(args.prepare_sbatch_args), f"--wrap={wrap}"], []))
    prepared = ["prepare"] if args.prepare_args else []
    loaded = {stage: load_config(getattr(args, f"{stage}_config"), getattr(args, f"{stage}_override"), stage)
              if args.check else None for stage in stages}
    for stage in stages:
        config = getattr(args, f"{stage}_config")
        overrides = list(getattr(args, f"{stage}_override"))
        after = list(prepared)
        if stage == "calm":
            if args.ae_config:
                ae_dir = resolve_out_dir(args.ae_config, args.ae_override, loaded.get("ae"))
                after = ["ae"]  # the autoencoder job already waits for the data
            else:
                ae_dir = args.ae_checkpoint
            overrides.append(f"model.autoencoder_checkpoint={os.path.abspath(ae_dir)}")
        options = [f"--job-name={args.name}-{stage}", f"--output={logs}", *common, *train_common,
                   *split_args(getattr(args, f"{stage}_sbatch_args"))]
        jobs.append(Job(stage, options, [str(TRAIN_SBATCH), config, *overrides], after))
    return jobs


def parse_job_id(stdout: str) -> str:
    """The job id from `sbatch --parsable` output ("123" or "123;cluster")."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";")[0].strip()
    if not job_id.isdigit():
        raise SubmitError(f"unexpected sbatch output: {stdout!r}")
    return job_id


def log_path(logs_dir: str, name: str, stage: str, job_id: str) -> str:
    return str(Path(logs_dir) / f"{name}-{stage}-{job_id}.out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchers/slurm/submit.py", description="\n\n".join(__doc__.split("\n\n")[:3]),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-args", metavar="ARGS", action="append", default=[],
                        help="arguments of tools/prepare_data.py: submit a data job that the others wait for "
                             "(repeat it for several runs of the tool in that job, e.g. ae and lm packing)")
    for stage, what in (("ae", "stage 1, the autoencoder"), ("calm", "stage 2, CALM"),
                        ("ar", "the autoregressive baseline")):
        parser.add_argument(f"--{stage}-config", metavar="YAML", help=f"config of {what}")
        parser.add_argument(f"--{stage}-override", metavar="KEY=VALUE", action="append", default=[],
                            help=f"a section.key=value override for {what} (repeatable)")
    parser.add_argument("--ae-checkpoint", metavar="DIR",
                        help="an existing stage-1 run folder for CALM, instead of training one (--ae-config)")
    parser.add_argument("--sbatch-args", metavar="ARGS", help='sbatch options for every job, e.g. '
                        '"--partition=gpu --account=proj --qos=normal"')
    parser.add_argument("--train-sbatch-args", metavar="ARGS", help='sbatch options for the training jobs, '
                        'e.g. "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --time=04:00:00"')
    for stage in ("prepare",) + TRAIN_STAGES:
        parser.add_argument(f"--{stage}-sbatch-args", metavar="ARGS", help=f"sbatch options for the {stage} job only")
    parser.add_argument("--name", default="calm", help="job name prefix: <name>-<stage> (default: calm)")
    parser.add_argument("--logs-dir", default="runs/logs", help="where the job logs go (default: runs/logs)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not load the configs before submitting (by default a config that does not "
                             "load, or has the wrong run.stage, stops the submission; stage 1 then needs an "
                             "explicit run.out_dir override)")
    return parser


def submit(jobs: List[Job], sbatch: str = "sbatch") -> Dict[str, str]:
    ids: Dict[str, str] = {}
    for job in jobs:
        argv = job.argv(ids)
        argv[0] = sbatch
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            done = " ".join(ids.values())
            hint = f"; already submitted: {done} (scancel {done})" if done else ""
            raise SubmitError(f"sbatch failed for {job.stage} ({result.returncode}): "
                              f"{result.stderr.strip() or result.stdout.strip()}{hint}")
        ids[job.stage] = parse_job_id(result.stdout)
    return ids


ARGS_OPTIONS = ("--prepare-args", "--sbatch-args", "--train-sbatch-args", "--prepare-sbatch-args",
                "--ae-sbatch-args", "--calm-sbatch-args", "--ar-sbatch-args")


def join_option_values(argv: Sequence[str]) -> List[str]:
    """`--sbatch-args "--time=1:00:00"` -> `--sbatch-args=--time=1:00:00` (argparse would take the value
    for an option because it starts with a dash)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ARGS_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(join_option_values(argv))
    try:
        jobs = plan(args)
        if args.dry_run:
            print("# dry run: these commands would be submitted, in this order")
            for job in jobs:
                print(shlex.join(job.argv()))
            return 0
        Path(args.logs_dir).mkdir(parents=True, exist_ok=True)
        ids = submit(jobs)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    user_args = [a for name in ("sbatch", "train_sbatch", "prepare_sbatch", "ae_sbatch", "calm_sbatch", "ar_sbatch")
                 for a in split_args(getattr(args, f"{name}_args"))]
    custom_output = any(a.startswith(("--output", "-o")) for a in user_args)
    for job in jobs:
        after = f" (after {', '.join(f'{s} {ids[s]}' for s in job.after)})" if job.after else ""
        log = "" if custom_output else f"  log {log_path(args.logs_dir, args.name, job.stage, ids[job.stage])}"
        print(f"{job.stage}: job {ids[job.stage]}{after}{log}")
    all_ids = ",".join(ids.values())
    print("\nwatch:")
    print(f"  squeue -j {all_ids} -o '%.10i %.14j %.10T %.10M %.20R'")
    if not custom_output:
        for job in jobs:
            print(f"  tail -f {log_path(args.logs_dir, args.name, job.stage, ids[job.stage])}")
    print("  scontrol show job <id>   # JobState=, Restarts=, ExitCode=, Reason=")
    print(f"cancel all: scancel {' '.join(ids.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
