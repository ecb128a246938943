"""Strict config: unknown keys, types, cross-field rules and the DeepSpeed dict, before any process group."""
import subprocess
import sys

import pytest

from calm_megatron import config as C
from tests.conftest import REPO

AE_TINY = str(REPO / "configs/ae/tiny.yaml")


def test_defaults_and_overrides():
    cfg = C.load(AE_TINY, ["train.steps=7", "optim.lr=0.01", "parallel.zero_stage=2"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.parallel.zero_stage) == (7, 0.01, 2)
    assert cfg.out_dir.endswith(cfg.run.name)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(C.ConfigError) as err:
        C.load(AE_TINY, ["train.stpes=3"])
    msg = str(err.value)
    assert "train.stpes" in msg and "steps" in msg and "micro_batch_size" in msg


def test_unknown_section():
    with pytest.raises(C.ConfigError, match="unknown config key 'trian'"):
        C.load(AE_TINY, ["trian.steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(C.ConfigError, match="train.steps"):
        C.load(AE_TINY, ["train.steps=many"])


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("autoencoder:\n  hiden_size: 3\n")
    with pytest.raises(C.ConfigError, match="autoencoder.hiden_size.*hidden_size"):
        C.load(str(bad))


def test_yaml_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {AE_TINY}\ntrain:\n  steps: 3\n")
    cfg, base = C.load(str(child)), C.load(AE_TINY)
    assert cfg.train.steps == 3 and cfg.autoencoder == base.autoencoder


def test_seq_len_must_be_multiple_of_k():
    cfg = C.load(AE_TINY, ["train.seq_len=130", "autoencoder.chunk_size=4"])
    with pytest.raises(C.ConfigError, match="seq_len=130 is not a multiple of the chunk size K=4"):
        C.validate(cfg, world_size=1, check_files=False)


def test_world_size_must_be_tp_pp_dp():
    cfg = C.load(AE_TINY, ["parallel.tp=2", "parallel.dp=2"])
    with pytest.raises(C.ConfigError, match="world size 3"):
        C.validate(cfg, world_size=3, check_files=False)
    with pytest.raises(C.ConfigError, match=r"world size 2 != .*2\*1\*2"):
        C.validate(cfg, world_size=2, check_files=False)


def test_heads_divisible_by_tp():
    cfg = C.load(AE_TINY, ["run.stage=calm", "model.num_attention_heads=6", "model.hidden_size=192",
                           "parallel.tp=4", "train.global_batch_size=8", "train.micro_batch_size=8"])
    with pytest.raises(C.ConfigError, match="num_attention_heads=6 not divisible by parallel.tp=4"):
        C.validate(cfg, world_size=4, check_files=False)


def test_zero2_with_pipeline_rejected():
    cfg = C.load(AE_TINY, ["run.stage=ar", "parallel.pp=2", "parallel.zero_stage=2",
                           "model.num_layers=4", "model.num_attention_heads=4", "model.hidden_size=64"])
    with pytest.raises(C.ConfigError, match="zero_stage=2 with parallel.pp=2"):
        C.validate(cfg, world_size=2, check_files=False)


def test_global_batch_divisibility():
    cfg = C.load(AE_TINY, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(C.ConfigError, match="global_batch_size=6"):
        C.validate(cfg, world_size=1, check_files=False)


def test_deepspeed_dict_is_derived():
    cfg = C.load(AE_TINY, ["train.global_batch_size=16", "train.micro_batch_size=2", "parallel.zero_stage=2",
                           "train.precision=bf16", "optim.grad_clip=0.5"])
    dp = C.validate(cfg, world_size=2, check_files=False)
    ds = C.to_deepspeed(cfg, dp)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5


def test_saved_config_round_trips_and_has_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-s3cr3t")
    cfg = C.load(AE_TINY, ["train.steps=5"])
    C.save(cfg, str(tmp_path / "c.yaml"))
    text = (tmp_path / "c.yaml").read_text()
    assert "s3cr3t" not in text
    assert C.from_dict(C.to_dict(cfg)) == cfg


def _train_cli(*args):
    return subprocess.run([sys.executable, "-m", "calm_megatron.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    ([AE_TINY, "train.bogus=1"], "unknown config key 'train.bogus'"),
    ([AE_TINY, "train.steps=abc"], "train.steps"),
    ([AE_TINY, "train.seq_len=130"], "not a multiple of the chunk size"),
    (["configs/none.yaml"], "config file not found"),
    ([AE_TINY, "data.tokenizer=/nonexistent/spm.model"], "data.tokenizer: file not found"),
])
def test_cli_fails_fast_with_one_line(args, expected):
    result = _train_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_cli_refuses_tokenizer_vocab_mismatch(tiny_data):
    from tests.conftest import data_overrides

    result = _train_cli(AE_TINY, *data_overrides(tiny_data), "autoencoder.vocab_size=4096", "train.seq_len=64")
    assert result.returncode == 2
    assert f"vocab size {tiny_data['vocab_size']}" in result.stderr and "autoencoder.vocab_size=4096" in result.stderr


def test_cli_refuses_shards_of_another_k(tiny_data):
    from tests.conftest import data_overrides

    result = _train_cli(AE_TINY, *data_overrides(tiny_data), f"autoencoder.vocab_size={tiny_data['vocab_size']}",
                        "train.seq_len=64", "autoencoder.chunk_size=8")
    assert result.returncode == 2 and "8" in result.stderr and "4" in result.stderr, result.stderr


def _fake_ae_step(tmp_path, **ae):
    import json

    step = tmp_path / "ae_run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text('{"files": {}}')
    (step / "autoencoder.json").write_text(json.dumps({"chunk_size": 4, "latent_size": 16, "vocab_size": 512, **ae}))
    (step.parent / "latest").write_text(step.name)
    return tmp_path / "ae_run"


@pytest.mark.parametrize("field, value", [("chunk_size", 8), ("latent_size", 32), ("vocab_size", 1000)])
def test_calm_refuses_autoencoder_that_disagrees(tmp_path, field, value):
    run = _fake_ae_step(tmp_path, **{field: value})
    cfg = C.load(str(REPO / "configs/calm/tiny.yaml"), [f"model.autoencoder_checkpoint={run}", "model.vocab_size=512",
                                                        "model.latent_size=16", "model.chunk_size=4"])
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg, world_size=1)
    expected = {"chunk_size": 4, "latent_size": 16, "vocab_size": 512}[field]
    assert f"model.{field}={expected}" in str(err.value) and f"{field}={value}" in str(err.value)


def test_calm_refuses_missing_autoencoder(tmp_path):
    result = _train_cli(str(REPO / "configs/calm/tiny.yaml"), f"model.autoencoder_checkpoint={tmp_path / 'nope'}")
    assert result.returncode == 2 and "model.autoencoder_checkpoint" in result.stderr and "nope" in result.stderr


def test_random_autoencoder_is_built_from_the_autoencoder_section(megatron_single):
    """`model.autoencoder_checkpoint=random` (benchmarks): validated against the autoencoder section, then built."""
    from calm_megatron.training.stages import CALMStage

    cfg = C.load(str(REPO / "configs/calm/tiny.yaml"), [f"model.autoencoder_checkpoint={C.RANDOM_AUTOENCODER}"])
    C._validate_autoencoder_checkpoint(cfg)
    autoencoder = CALMStage(cfg).load_autoencoder()
    assert autoencoder.ae_config == cfg.autoencoder
    bad = C.load(str(REPO / "configs/calm/tiny.yaml"), [f"model.autoencoder_checkpoint={C.RANDOM_AUTOENCODER}",
                                                        "autoencoder.latent_size=16"])
    with pytest.raises(C.ConfigError, match="model.latent_size=32 but autoencoder.latent_size=16"):
        C._validate_autoencoder_checkpoint(bad)
