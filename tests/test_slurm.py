"""The Slurm launchers on a real single-host cluster (munged + slurmctld + slurmd, tests/services/slurm.py).

Default tests use a fake trainer (tests/slurm_fakes/trainer.py, through train.sbatch's CALM_TRAIN_CMD)
that follows the trainer's exit-code contract, except the config-error test, which runs the real entry
point. The slow tests train for real: the AE -> CALM pipeline through submit.py, and a preempted
training job that must end bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from tests.conftest import REPO
from tests.services.slurm import slurm_cluster  # noqa: F401  (session fixture: the cluster)

SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
SUBMIT = REPO / "launchers" / "slurm" / "submit.py"
FAKE_CMD = f"{sys.executable} {REPO / 'tests' / 'slurm_fakes' / 'trainer.py'}"


# ---- helpers ------------------------------------------------------------------------------------
def write_config(tmp_path: Path, stage: str = "ae") -> Path:
    """A minimal YAML that the real config loader accepts (the fake trainer only records its path)."""
    path = tmp_path / f"{stage}.yaml"
    path.write_text(f"run:\n  stage: {stage}\n  name: slurm-{stage}\n")
    return path


def submit_train(cluster, tmp_path: Path, name: str, args: List[str], ntasks: int = 2,
                 fake: bool = True, sbatch_args: Sequence[str] = ()) -> tuple:
    """sbatch train.sbatch ARGS with the log in tmp_path; returns (job id, log path)."""
    log = tmp_path / f"{name}.out"
    env = {"CALM_TRAIN_CMD": FAKE_CMD} if fake else {}
    job = cluster.sbatch([f"--job-name={name}", f"--ntasks={ntasks}", f"--output={log}", *sbatch_args,
                          str(SBATCH), *args], env_extra=env, cwd=tmp_path)
    return job, log


def events(out_dir: Path) -> List[Dict]:
    found = []
    for path in sorted(out_dir.glob("events-rank*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(found, key=lambda e: (e["restart"], e["rank"], e["time"]))


def wait_files(paths: List[Path], timeout: float, what: str, cluster=None, job=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.2)
    state = cluster.job(job) if cluster and job else {}
    raise AssertionError(f"{what}: {[str(p) for p in paths if not p.exists()]} missing after {timeout} s; {state}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def load_submit_module():
    spec = importlib.util.spec_from_file_location("calm_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_submit(args: List[str], env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def submitted_ids(stdout: str) -> Dict[str, int]:
    return {stage: int(job) for stage, job in re.findall(r"^(prepare|ae|calm|ar): job (\d+)", stdout, re.M)}


# ---- (a) bring-up -------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    result = slurm_cluster.run(["sbatch", "--wait", "--parsable", f"--output={out}",
                                "--wrap", "echo hello from job $SLURM_JOB_ID on $(hostname -s)"])
    job = int(result.stdout.strip().split(";")[0])
    assert f"hello from job {job} on {slurm_cluster.host}" in read(out)
    info = slurm_cluster.job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    queued = slurm_cluster.run(["squeue", "-h", "-t", "PENDING,RUNNING", "-j", str(job), "-o", "%T"], check=False)
    assert queued.stdout.strip() == ""


# ---- (b) config errors fail fast and are never requeued -------------------------------------------
@pytest.mark.timeout(120)
def test_config_errors_fail_fast_and_are_not_requeued(slurm_cluster, tmp_path):
    config = write_config(tmp_path)
    start = time.time()
    missing, missing_log = submit_train(slurm_cluster, tmp_path, "missing-config",
                                        [str(tmp_path / "no_such.yaml")], ntasks=1, fake=False)
    bad, bad_log = submit_train(slurm_cluster, tmp_path, "bad-override",
                                [str(config), "nosuchsection.key=1", f"run.out_dir={tmp_path / 'bad'}"],
                                ntasks=2, fake=False)
    for job, log, message in ((missing, missing_log, "config file not found"),
                              (bad, bad_log, "unknown config key 'nosuchsection'")):
        info = slurm_cluster.wait_state(job, {"FAILED", "COMPLETED", "CANCELLED"}, timeout=90)
        text = read(log)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
        assert info["Restarts"] == "0", info
        assert message in text, text
        assert "not requeued" in text and "scontrol requeue" not in text, text
        assert "SLURM_RESTART_COUNT=unset" in text, text
    assert time.time() - start < 90
    time.sleep(2)  # still failed, not pending again
    assert slurm_cluster.job(bad)["JobState"] == "FAILED"


# ---- (c) exit 75 -> requeue -> completes ----------------------------------------------------------
@pytest.mark.timeout(120)
def test_exit_75_requeues_once_then_completes(slurm_cluster, tmp_path):
    config, out = write_config(tmp_path), tmp_path / "out"
    job, log = submit_train(slurm_cluster, tmp_path, "requeue", [str(config), f"run.out_dir={out}", "fake.plan=75,0"])
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=100)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, text)
    assert "restart 0 (SLURM_RESTART_COUNT=unset)" in text and "restart 1 (SLURM_RESTART_COUNT=1)" in text, text
    assert text.count(f"scontrol requeue {job}") == 1 and "training finished (exit 0)" in text, text
    seen = events(out)
    assert [(e["restart"], e["rank"], e.get("code")) for e in seen if e["event"] == "exit"] == \
        [(0, 0, 75), (0, 1, 75), (1, 0, 0), (1, 1, 0)]
    starts = [e for e in seen if e["event"] == "start"]
    assert {e["env"]["SLURM_PROCID"] for e in starts} == {"0", "1"}
    for e in starts:  # the environment the trainer relies on
        env = e["env"]
        assert env["SLURM_NTASKS"] == "2" and env["SLURM_STEP_ID"] is not None
        assert env["RANK"] is None and env["WORLD_SIZE"] is None
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(15000 + job % 40000)
        assert env["PYTHONFAULTHANDLER"] == "1" and env["DS_ACCELERATOR"] == "cpu"
        assert e["argv"] == [str(config), f"run.out_dir={out}", "fake.plan=75,0"]


# ---- (d) USR1 / TERM to the batch shell -> every rank -> 75 -> requeue ----------------------------
@pytest.mark.timeout(180)
def test_usr1_and_term_reach_every_rank_and_requeue(slurm_cluster, tmp_path):
    """Run 0 stops on USR1, run 1 on TERM (both caught: save, exit 75); run 2 is killed by USR1 before it
    could catch it (a trainer still starting up) and is requeued as well; run 3 completes."""
    config, out = write_config(tmp_path), tmp_path / "out"
    job, log = submit_train(slurm_cluster, tmp_path, "signals",
                            [str(config), f"run.out_dir={out}", "fake.plan=signal,signal,nohandler,0"])
    for restart, sig in ((0, "USR1"), (1, "TERM"), (2, "USR1")):
        wait_files([out / f"ready-r{restart}-rank{r}" for r in (0, 1)], 60, f"run {restart} ready",
                   slurm_cluster, job)
        slurm_cluster.run(["scancel", "--signal", sig, "--batch", str(job)])
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=100)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "3", (info, text)
    got = [(e["restart"], e["rank"], e["signal"]) for e in events(out) if e["event"] == "signal"]
    assert got == [(0, 0, "USR1"), (0, 1, "USR1"), (1, 0, "TERM"), (1, 1, "TERM")], got
    assert "got SIGUSR1: forwarding" in text and "got SIGTERM: forwarding" in text, text
    assert "killed by the forwarded SIGUSR1 before they could catch it (exit 138)" in text, text
    assert text.count(f"scontrol requeue {job}") == 3 and "restart 3 (SLURM_RESTART_COUNT=3)" in text, text


@pytest.mark.timeout(90)
def test_scancel_stays_cancelled_although_the_trainer_exits_75(slurm_cluster, tmp_path):
    config, out = write_config(tmp_path), tmp_path / "out"
    job, log = submit_train(slurm_cluster, tmp_path, "cancel", [str(config), f"run.out_dir={out}", "fake.plan=signal,0"])
    wait_files([out / f"ready-r0-rank{r}" for r in (0, 1)], 60, "ready", slurm_cluster, job)
    slurm_cluster.run(["scancel", str(job)])
    info = slurm_cluster.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED", "PENDING"}, timeout=30)
    deadline = time.time() + 20  # the batch shell logs its decision within KillWait (5 s here)
    while "not requeued" not in read(log) and time.time() < deadline:
        time.sleep(0.2)
    text = read(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, text)
    assert [e["signal"] for e in events(out) if e["event"] == "signal"] == ["TERM", "TERM"]  # saved, exit 75
    assert "not requeued" in text and "scontrol requeue" not in text, text
    time.sleep(3)
    assert slurm_cluster.job(job)["JobState"] == "CANCELLED"


# ---- (e) submit.py, without Slurm -----------------------------------------------------------------
def test_submit_dry_run_chains_the_stages(tmp_path):
    configs = {stage: write_config(tmp_path, stage) for stage in ("ae", "calm", "ar")}
    ae_dir = tmp_path / "ae_run"
    result = run_submit(["--ae-config", str(configs["ae"]), "--ae-override", f"run.out_dir={ae_dir}",
                         "--calm-config", str(configs["calm"]), "--calm-override", "train.steps=7",
                         "--ar-config", str(configs["ar"]), "--prepare-args", "--input a.jsonl --out data/x",
                         "--sbatch-args", "--partition=debug --time=00:30:00",
                         "--calm-sbatch-args", "--ntasks-per-node=4", "--dry-run"], dict(os.environ), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 4, result.stdout
    prepare, ae, calm, ar = lines
    assert "--job-name=calm-prepare" in prepare and "tools/prepare_data.py --input a.jsonl" in prepare
    assert "--dependency" not in prepare
    for line in (ae, ar):
        assert "--dependency=afterok:<prepare-job-id>" in line and "--kill-on-invalid-dep=yes" in line
    assert "--dependency=afterok:<ae-job-id>" in calm and "--kill-on-invalid-dep=yes" in calm
    assert f"model.autoencoder_checkpoint={ae_dir}" in calm and "train.steps=7" in calm
    assert "--ntasks-per-node=4" in calm and "--ntasks-per-node=4" not in ae
    for line in lines:
        assert "--partition=debug" in line and "--time=00:30:00" in line
    for line, stage in ((ae, "ae"), (calm, "calm"), (ar, "ar")):
        assert str(SBATCH) in line and str(configs[stage]) in line
    assert "model.autoencoder_checkpoint" not in ae + ar
    # the run folder of stage 1 from the config itself when no run.out_dir is given
    result = run_submit(["--ae-config", str(configs["ae"]), "--calm-config", str(configs["calm"]), "--dry-run"],
                        dict(os.environ), tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"model.autoencoder_checkpoint={tmp_path / 'runs' / 'slurm-ae'}" in result.stdout
    # an existing autoencoder instead of stage 1: no dependency at all
    result = run_submit(["--calm-config", str(configs["calm"]), "--ae-checkpoint", "runs/old_ae", "--dry-run"],
                        dict(os.environ), tmp_path)
    assert result.returncode == 0 and "--dependency" not in result.stdout, result.stdout + result.stderr
    assert f"model.autoencoder_checkpoint={tmp_path / 'runs' / 'old_ae'}" in result.stdout


def test_submit_refuses_incomplete_pipelines_and_explains(tmp_path):
    ae, calm = write_config(tmp_path, "ae"), write_config(tmp_path, "calm")
    help_text = run_submit(["--help"], dict(os.environ), tmp_path)
    assert help_text.returncode == 0 and "--kill-on-invalid-dep" in help_text.stdout
    for args, message in (([], "nothing to submit"),
                          (["--calm-config", str(calm)], "needs the stage-1 autoencoder"),
                          (["--ae-config", str(tmp_path / "missing.yaml")], "missing.yaml"),
                          (["--ae-config", str(calm)], "is a run.stage=calm config"),
                          (["--ae-config", str(ae), "--ae-override", "nosuch.key=1"], "nosuch"),
                          (["--ae-config", str(ae), "--calm-config", str(calm), "--no-check"], "run.out_dir=")):
        result = run_submit([*args, "--dry-run"], dict(os.environ), tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_submit_helpers():
    submit = load_submit_module()
    assert submit.parse_job_id("123\n") == "123" and submit.parse_job_id("456;cluster\n") == "456"
    with pytest.raises(submit.SubmitError):
        submit.parse_job_id("sbatch: error")
    assert submit.join_option_values(["--sbatch-args", "--time=1", "--dry-run"]) == ["--sbatch-args=--time=1",
                                                                                     "--dry-run"]
    assert submit.override_value(["a.b=1", "run.out_dir=x", "run.out_dir=y"], "run.out_dir") == "y"
    assert submit.override_value(["a.b=1"], "run.out_dir") is None
    job = submit.Job("calm", ["--job-name=x"], ["train.sbatch", "c.yaml"], after=["ae"])
    assert job.argv({"ae": "42"}) == ["sbatch", "--parsable", "--job-name=x", "--dependency=afterok:42",
                                     "--kill-on-invalid-dep=yes", "train.sbatch", "c.yaml"]


# ---- (f) a failed stage 1 cancels stage 2 ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_failed_stage_one_cancels_stage_two(slurm_cluster, tmp_path):
    logs = tmp_path / "logs"
    result = run_submit(["--name", "dep", "--logs-dir", str(logs), "--no-check",  # fake.* keys
                         "--ae-config", str(write_config(tmp_path, "ae")),
                         "--ae-override", f"run.out_dir={tmp_path / 'ae'}", "--ae-override", "fake.plan=1",
                         "--calm-config", str(write_config(tmp_path, "calm")),
                         "--calm-override", f"run.out_dir={tmp_path / 'calm'}",
                         "--train-sbatch-args", "--ntasks=1"],
                        slurm_cluster.env({"CALM_TRAIN_CMD": FAKE_CMD}), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = submitted_ids(result.stdout)
    assert set(ids) == {"ae", "calm"}, result.stdout
    assert f"squeue -j {ids['ae']},{ids['calm']}" in result.stdout
    assert f"tail -f {logs}/dep-ae-{ids['ae']}.out" in result.stdout
    ae = slurm_cluster.wait_state(ids["ae"], {"FAILED", "COMPLETED", "CANCELLED"}, timeout=60)
    assert ae["JobState"] == "FAILED" and ae["ExitCode"] == "1:0", ae
    failed_at = time.time()
    calm = slurm_cluster.wait_state(ids["calm"], {"CANCELLED", "COMPLETED", "FAILED", "RUNNING"}, timeout=30)
    assert calm["JobState"] == "CANCELLED", calm
    assert time.time() - failed_at < 30
    assert "training failed (exit 1): not requeued" in read(logs / f"dep-ae-{ids['ae']}.out")
    assert not (tmp_path / "calm").exists()  # stage 2 never ran


# ---- slow: the time limit ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_time_limit_signal_requeues_and_the_next_run_completes(slurm_cluster, tmp_path):
    """--time=1 with --signal=B:USR1@20: Slurm's own lead-time signal (it may come up to a minute early,
    even before the trainer catches signals: requeued either way) -> requeue -> the next run completes."""
    config, out = write_config(tmp_path), tmp_path / "out"
    job, log = submit_train(slurm_cluster, tmp_path, "timelimit", [str(config), f"run.out_dir={out}",
                            "fake.plan=signal,0", "fake.timeout=100"], sbatch_args=["--time=1", "--signal=B:USR1@20"])
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=200, poll=1)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert "got SIGUSR1: forwarding" in text and f"scontrol requeue {job}" in text, text


# ---- slow: real training --------------------------------------------------------------------------
AE_TINY = REPO / "configs" / "ae" / "tiny.yaml"
CALM_TINY = REPO / "configs" / "calm" / "tiny.yaml"
# The autoencoder of configs/calm/tiny.yaml, trained by stage 1 on the session's tiny corpus.
TINY_AE = ["autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
           "autoencoder.chunk_size=4"]
QUIET = ["train.progress_bar=false", "train.log_interval=1", "train.eval_batches=2", "logging.wandb_mode=disabled"]


def _data(tiny_data, packing: str) -> List[str]:
    from tests.conftest import data_overrides

    return data_overrides(tiny_data, packing)


def _tensors(run: Path) -> Dict:
    from safetensors.torch import load_file

    ckpt = run / "checkpoints"
    step = ckpt / (ckpt / "latest").read_text().strip()
    tensors = {}
    for shard in sorted((step / "model").glob("*.safetensors")):
        tensors.update({f"{shard.stem}/{k}": v for k, v in load_file(str(shard)).items()})
    return {"step": step.name, "tensors": tensors}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pipeline_autoencoder_then_calm_on_two_ranks(slurm_cluster, tiny_data, tmp_path):
    vocab = tiny_data["vocab_size"]
    ae_dir, calm_dir, logs = tmp_path / "ae", tmp_path / "calm", tmp_path / "logs"
    ae_over = [*_data(tiny_data, "ae"), *TINY_AE, f"autoencoder.vocab_size={vocab}", "train.seq_len=64",
               "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=6", *QUIET,
               f"run.out_dir={ae_dir}"]
    calm_over = [*_data(tiny_data, "lm"), f"autoencoder.vocab_size={vocab}", f"model.vocab_size={vocab}",
                 "train.steps=4", "train.global_batch_size=4", *QUIET, f"run.out_dir={calm_dir}"]
    args = ["--name", "pipe", "--logs-dir", str(logs), "--ae-config", str(AE_TINY), "--calm-config", str(CALM_TINY),
            "--train-sbatch-args", "--ntasks=2"]
    args += [f"--ae-override={o}" for o in ae_over] + [f"--calm-override={o}" for o in calm_over]
    result = run_submit(args, slurm_cluster.env(), REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = submitted_ids(result.stdout)
    ae = slurm_cluster.wait_state(ids["ae"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600, poll=2)
    ae_log = read(logs / f"pipe-ae-{ids['ae']}.out")
    assert ae["JobState"] == "COMPLETED", (ae, ae_log[-5000:])
    calm = slurm_cluster.wait_state(ids["calm"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=800, poll=2)
    calm_log = read(logs / f"pipe-calm-{ids['calm']}.out")
    assert calm["JobState"] == "COMPLETED", (calm, calm_log[-5000:])
    assert calm["StartTime"] >= ae["EndTime"], (ae, calm)  # stage 2 ran after stage 1
    assert f"model.autoencoder_checkpoint={ae_dir}" in calm_log
    import yaml

    resolved = yaml.safe_load((calm_dir / "config.yaml").read_text())
    assert resolved["model"]["autoencoder_checkpoint"] == str(ae_dir)
    assert (ae_dir / "checkpoints" / "latest").exists() and (calm_dir / "checkpoints" / "latest").exists()
    assert "tasks 2" in ae_log and "tasks 2" in calm_log


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_preempted_training_job_resumes_bitwise_equal(slurm_cluster, tiny_data, tmp_path):
    vocab = tiny_data["vocab_size"]
    steps = 60  # ~0.1 s each here; the signal lands within a second of step 1
    common = [*_data(tiny_data, "ae"), *TINY_AE, f"autoencoder.vocab_size={vocab}", "train.seq_len=64",
              "train.micro_batch_size=2", "train.global_batch_size=4", f"train.steps={steps}", *QUIET,
              "checkpoint.interval=1000"]
    def wait_step(log: Path, step: int) -> None:  # the trainer logs "step N/40 ..." every step
        deadline = time.time() + 600
        while max(map(int, re.findall(r"\bstep (\d+)/\d+", read(log))), default=0) < step:
            assert time.time() < deadline and "training failed" not in read(log), read(log)[-5000:]
            time.sleep(0.5)

    straight, straight_log = submit_train(slurm_cluster, tmp_path, "straight",
                                          [str(AE_TINY), *common, f"run.out_dir={tmp_path / 'straight'}"], fake=False)
    # The second job starts once the first one has built its data loader: two jobs that create Streaming's
    # shared memory on one host at the same instant can race for the same name.
    wait_step(straight_log, 1)
    preempted_dir = tmp_path / "preempted"
    job, log = submit_train(slurm_cluster, tmp_path, "preempted",
                            [str(AE_TINY), *common, f"run.out_dir={preempted_dir}"], fake=False)
    wait_step(log, 1)  # preempt once training is under way
    slurm_cluster.run(["scancel", "--signal", "USR1", "--batch", str(job)])
    for j, path in ((straight, straight_log), (job, log)):
        info = slurm_cluster.wait_state(j, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900, poll=2)
        assert info["JobState"] == "COMPLETED", (info, read(path)[-5000:])
    text = read(log)
    assert slurm_cluster.job(job)["Restarts"] == "1", text[-5000:]
    assert "got SIGUSR1: forwarding" in text and f"scontrol requeue {job}" in text
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed and 1 <= int(resumed.group(1)) < steps, text[-5000:]
    a, b = _tensors(tmp_path / "straight"), _tensors(preempted_dir)
    assert a["step"] == b["step"] and a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert (a["tensors"][key] == b["tensors"][key]).all(), f"{key} differs after preemption"
