"""Checkpoints and resume (CPU, fp32, deterministic): a stopped or killed run ends bitwise equal to an
uninterrupted one; crashed saves and corrupt files are detected; the layout may change on resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, data_overrides, free_port

AE = "configs/ae/tiny.yaml"
SMALL_AE = ["autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
            "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=6",
            "train.log_interval=1", "train.progress_bar=false", "train.eval_batches=2", "optim.warmup_steps=2",
            "logging.wandb_mode=disabled", "checkpoint.interval=2", "checkpoint.keep_last=5"]


def _ae_args(tiny_data, out_dir, *extra):
    return [AE, *data_overrides(tiny_data, "ae"), f"autoencoder.vocab_size={tiny_data['vocab_size']}",
            *SMALL_AE, f"run.out_dir={out_dir}", *extra]


def train(args, nproc=1, env=None, max_restarts=0, timeout=300):
    env_extra = env
    """Run the real entry point (torchrun for several ranks); return the completed process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env = {**env, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env_extra or {})}
    if nproc == 1 and not max_restarts:
        cmd = [sys.executable, "-m", "calm_megatron.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--max-restarts", str(max_restarts), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "calm_megatron.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result, code=0):
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return result


def final_tensors(out_dir: Path):
    ckpt = out_dir / "checkpoints"
    step = ckpt / (ckpt / "latest").read_text().strip()
    tensors = {}
    for shard in sorted((step / "model").glob("*.safetensors")):
        tensors.update({f"{shard.stem}/{k}": v for k, v in load_file(str(shard)).items()})
    return step.name, tensors


def losses(out_dir: Path):
    return json.loads((out_dir / "losses.json").read_text())


def assert_bitwise_equal(a: Path, b: Path):
    (step_a, ta), (step_b, tb) = final_tensors(a), final_tensors(b)
    assert step_a == step_b and ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and (ta[key] == tb[key]).all(), f"{key} differs"
    assert losses(a) == losses(b)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    ok(train(_ae_args(tiny_data, out)))
    return out


def test_signal_stop_and_resume_is_bitwise_equal(tiny_data, straight, tmp_path):
    args = _ae_args(tiny_data, tmp_path)
    first = ok(train(args, env={"CALM_TEST_SIGNAL_AT_STEP": "3"}), code=75)
    assert "SIGUSR1" in first.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    second = ok(train(args))
    assert "resumed from" in second.stderr and "step 3" in second.stderr
    assert_bitwise_equal(tmp_path, straight)


def test_crash_during_save_keeps_previous_step(tiny_data, straight, tmp_path):
    args = _ae_args(tiny_data, tmp_path)
    crashed = train(args, env={"CALM_TEST_CRASH_IN_SAVE": "4"})
    assert crashed.returncode == 13
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert (ckpt / "step_00000004").is_dir() and not (ckpt / "step_00000004" / "manifest.json").exists()
    ok(train(args))
    assert_bitwise_equal(tmp_path, straight)


def test_corrupt_checkpoint_is_refused_and_resume_falls_back(tiny_data, tmp_path):
    args = _ae_args(tiny_data, tmp_path, "train.steps=4")
    ok(train(args))
    step4 = tmp_path / "checkpoints" / "step_00000004"
    shard = step4 / "model" / "tp00_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    inspect = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(step4)], cwd=REPO,
                             capture_output=True, text=True)
    assert inspect.returncode != 0 and "tp00_pp00.safetensors" in inspect.stdout + inspect.stderr
    explicit = train(args + ["train.steps=6", f"checkpoint.load={step4}"])
    assert explicit.returncode == 2 and "tp00_pp00.safetensors" in explicit.stderr
    fallback = ok(train(args + ["train.steps=6"]))
    assert "trying the previous complete step" in fallback.stderr and "resumed from" in fallback.stderr
    assert "step_00000002" in fallback.stderr
    (step4.parent / "step_00000002" / "rng" / "rank00000.json").unlink()
    missing = train(args + ["train.steps=6", f"checkpoint.load={step4.parent / 'step_00000002'}"])
    assert missing.returncode == 2 and "rank00000.json" in missing.stderr


@pytest.mark.distributed
def test_kill_9_under_torchrun_recovers_bitwise(tiny_data, tmp_path):
    straight2 = tmp_path / "straight2"
    ok(train(_ae_args(tiny_data, straight2), nproc=2))
    killed = tmp_path / "killed"
    result = ok(train(_ae_args(tiny_data, killed), nproc=2, max_restarts=1,
                      env={"CALM_TEST_KILL_AT_STEP": "3", "CALM_TEST_FAULT_RANK": "1"}))
    assert "resumed from" in result.stderr
    assert_bitwise_equal(killed, straight2)


NOISE_FREE = ["autoencoder.dropout=0.0", "autoencoder.variational=false"]


@pytest.mark.distributed
@pytest.mark.parametrize("before, after", [((2, {"parallel.tp": 1}), (1, {})),      # DP2 -> DP1
                                           ((1, {}), (2, {})),                      # DP1 -> DP2
                                           ((2, {"parallel.tp": 2}), (1, {}))])     # TP2 -> TP1
def test_resume_at_another_layout(tiny_data, tmp_path, before, after):
    (n_before, o_before), (n_after, o_after) = before, after
    fmt = lambda overrides: [f"{k}={v}" for k, v in overrides.items()]
    reference = tmp_path / "reference"
    ok(train(_ae_args(tiny_data, reference, *NOISE_FREE, *fmt(o_before), "train.steps=3"), nproc=n_before))
    resumed = tmp_path / "resumed"
    ok(train(_ae_args(tiny_data, resumed, *NOISE_FREE, *fmt(o_before), "train.steps=2"), nproc=n_before))
    result = ok(train(_ae_args(tiny_data, resumed, *NOISE_FREE, *fmt(o_after), "train.steps=3"), nproc=n_after))
    assert "resuming at another layout" in result.stderr
    ref, got = losses(reference)["3"], losses(resumed)["3"]
    assert abs(ref - got) <= 1e-6 * max(1.0, abs(ref)), (ref, got)


STAGE2 = ["train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=5",
          "train.log_interval=1", "train.progress_bar=false", "train.eval_batches=1", "checkpoint.interval=2",
          "logging.wandb_mode=disabled", "model.max_position_embeddings=64"]


@pytest.fixture(scope="module")
def stage2_args(tiny_data, straight):
    """CALM and baseline runs on the LM shards (64-token blocks), CALM over the `straight` AE."""
    lm = tiny_data["root"] / "lm64"
    if not (lm / "train" / "calm_index.json").is_file():
        from calm_megatron.data.shards import write_shards

        for split in ("train", "valid"):
            write_shards([str(tiny_data["root"] / f"{split}.jsonl")], str(tiny_data["tokenizer"]), str(lm / split),
                         packing="lm", seq_len=64, chunk_size=4, progress=False)
    data = [f"data.tokenizer={tiny_data['tokenizer']}", f"data.train={lm / 'train'}", f"data.valid={lm / 'valid'}",
            f"model.vocab_size={tiny_data['vocab_size']}"]
    return {"calm": ["configs/calm/tiny.yaml", *data, *STAGE2, f"model.autoencoder_checkpoint={straight}",
                     "model.latent_size=16"],
            "ar": ["configs/ar/tiny.yaml", *data, *STAGE2]}


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_stage2_signal_stop_and_resume_is_bitwise_equal(stage2_args, tmp_path, stage):
    args = stage2_args[stage]
    ok(train(args + [f"run.out_dir={tmp_path / 'straight'}"]))
    stopped = args + [f"run.out_dir={tmp_path / 'stopped'}"]
    ok(train(stopped, env={"CALM_TEST_SIGNAL_AT_STEP": "3"}), code=75)
    ok(train(stopped))
    assert_bitwise_equal(tmp_path / "stopped", tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_at_random_steps(tiny_data, tmp_path):
    """kill -9 of one rank at 5 random steps under torchrun --max-restarts: always bitwise recovered."""
    import random

    reference = tmp_path / "reference"
    ok(train(_ae_args(tiny_data, reference, "train.steps=8"), nproc=2))
    for trial, step in enumerate(random.Random(7).sample(range(1, 8), 5)):
        out = tmp_path / f"killed_{trial}"
        ok(train(_ae_args(tiny_data, out, "train.steps=8"), nproc=2, max_restarts=1,
                 env={"CALM_TEST_KILL_AT_STEP": str(step), "CALM_TEST_FAULT_RANK": str(trial % 2)}))
        assert_bitwise_equal(out, reference)
