"""Tensor, pipeline and ZeRO data parallelism equal one rank (gloo on CPU), for the AE, CALM and the baseline.

Three torchrun launches (1, 2 and 4 ranks; Megatron's parallel state is rebuilt between the layouts
of one launch) train every model from the same full weights on the same global batches:
- forward outputs (AE and baseline logits gathered over TP, CALM per-position losses and head
  samples) agree with the 1-rank run within 1e-5, before training; after 3 steps too (SGD, and a
  looser bound for AdamW, whose update amplifies float-rounding noise on near-zero gradients);
- losses and global grad norms of 3 optimizer steps agree within 1e-5 with SGD and with AdamW.
CALM's head noise and posterior draws are functions of the global sample index, so they are the
same at every layout. Plus: dropout masks across TP/DP ranks, a PP=2 -> PP=1 resume, the config
errors of bad layouts, and the checkpoint helpers that make the resume layout-independent.
"""
import json
import re
import subprocess
import sys

import pytest

import torch

from calm_megatron import config as C
from tests.conftest import REPO
from tests.dist_helpers import torchrun_json

TOL = 1e-5
STEPS = 3
TIMEOUT_S = 1800  # per torchrun job
COMMON = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=0",
          # 4095 is not divisible by TP=2: the vocab-parallel tables are padded (and the padding is exact)
          "autoencoder.vocab_size=4095", "model.vocab_size=4095", "autoencoder.dropout=0.0",
          # pinned sizes: independent of edits to the tiny configs (CALM's frozen AE must match the model)
          "autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
          "model.latent_size=16",
          # Adam's normalised update turns float-rounding noise on a few near-zero gradients into lr-sized
          # weight differences; at init_std 0.06 six AE weights differ by up to 7.5e-4 after one step
          # (all others <= 1e-6) and the next grad norm by 6e-5. At 0.02 no gradient sits at that edge.
          "autoencoder.init_std=0.02", "model.init_std=0.02"]
MODEL = {"ae": ["autoencoder.variational=false"], "calm": [], "ar": []}
OPTIMS = {"sgd": ["optim.optimizer=sgd", "optim.lr=0.05", "optim.grad_clip=0.0"],
          "adamw": ["optim.optimizer=adamw", "optim.lr=0.003", "optim.grad_clip=0.0"]}


def scenarios(models, optims=("sgd", "adamw"), extra=(), suffix=""):
    return {f"{m}_{o}{suffix}": {"model": m, "overrides": COMMON + MODEL[m] + OPTIMS[o] + list(extra)}
            for m in models for o in optims}


ALL, BACKBONES = ("ae", "calm", "ar"), ("calm", "ar")
LAYOUTS = {
    1: [{"name": "ref", "tp": 1, "pp": 1, "scenarios": scenarios(ALL)}],
    2: [{"name": "tp2", "tp": 2, "pp": 1,
         "scenarios": {**scenarios(ALL),
                       **scenarios(BACKBONES, ["sgd"], ["parallel.sequence_parallel=true"], "_sp"),
                       **scenarios(["calm"], ["sgd"], ["parallel.recompute=selective"], "_selective"),
                       **scenarios(["ar"], ["sgd"], ["parallel.recompute=full"], "_full")}},
        {"name": "pp2", "tp": 1, "pp": 2,
         "scenarios": {**scenarios(BACKBONES), **scenarios(BACKBONES, ["sgd"], ["parallel.zero_stage=0"], "_zero0")}},
        {"name": "dp2_zero1", "tp": 1, "pp": 1, "scenarios": scenarios(ALL, extra=["parallel.zero_stage=1"])},
        {"name": "dp2_zero2", "tp": 1, "pp": 1, "scenarios": scenarios(ALL, extra=["parallel.zero_stage=2"])}],
    4: [{"name": "tp2pp2", "tp": 2, "pp": 2, "scenarios": scenarios(BACKBONES)},
        {"name": "tp2pp2_sp", "tp": 2, "pp": 2,
         "scenarios": scenarios(BACKBONES, ["sgd"], ["parallel.sequence_parallel=true"], "_sp")},
        {"name": "pp2dp2", "tp": 1, "pp": 2,
         "scenarios": {**scenarios(BACKBONES, ["sgd"]), **scenarios(["calm"], ["sgd"], ["parallel.zero_stage=0"],
                                                                   "_zero0")}},
        {"name": "tp2dp2", "tp": 2, "pp": 1, "scenarios": scenarios(["ae"])}],
}
# Which reference scenario each multi-rank scenario must equal (same math, another layout).
REFERENCE_OF = {"_sp": "", "_selective": "", "_full": "", "_zero0": ""}


def _reference_name(name: str) -> str:
    for suffix, ref_suffix in REFERENCE_OF.items():
        if name.endswith(suffix):
            return name[:-len(suffix)] + ref_suffix
    return name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    base = {"config_dir": str(REPO / "configs"), "outputs_dir": str(tmp / "outputs"),
            "weights_dir": str(tmp / "weights"), "steps": STEPS}
    out = {"outputs": tmp / "outputs"}
    # ~3 min in all on a quiet 2-core machine; the generous limit covers a heavily shared one.
    out[1] = torchrun_json("parallel_equivalence.py", 1, dict(base, reference=True, layouts=LAYOUTS[1]), tmp,
                           timeout=TIMEOUT_S)
    resume = {"kind": "pp_resume", "name": "pp2_to_pp1", "model": "calm", "tp": 1, "pp": 2,
              "overrides": COMMON + OPTIMS["sgd"], "save": str(tmp / "resume_ckpt"), "resume_tp": 1, "resume_pp": 1}
    out[2] = torchrun_json("parallel_equivalence.py", 2, dict(base, layouts=LAYOUTS[2], extras=[resume]), tmp,
                           timeout=TIMEOUT_S)
    masks = {"kind": "dropout_masks", "tp": 2, "pp": 1}
    out[4] = torchrun_json("parallel_equivalence.py", 4, dict(base, layouts=LAYOUTS[4], extras=[masks]), tmp,
                           timeout=TIMEOUT_S)
    return out


def _cases():
    for world in (2, 4):
        for layout in LAYOUTS[world]:
            for name in layout["scenarios"]:
                yield pytest.param(world, layout["name"], name, id=f"{layout['name']}-{name}")


def _close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.distributed
@pytest.mark.parametrize("world, layout, name", list(_cases()))
def test_layout_equals_one_rank(runs, world, layout, name):
    from safetensors.torch import load_file

    ref_name = _reference_name(name)
    ref, got = runs[1]["layouts"]["ref"][ref_name], runs[world]["layouts"][layout][name]
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == STEPS
        for step, (a, b) in enumerate(zip(got[key], ref[key])):
            assert _close(a, b), f"{layout}/{name}: {key} at step {step}: {a} vs {b} (1 rank)"
    outputs = runs["outputs"]
    for when, tol in (("init", TOL), ("final", TOL if "sgd" in name else 1e-3)):
        ref_out = load_file(str(outputs / f"ref__{ref_name}__{when}.safetensors"))
        got_out = load_file(str(outputs / f"{layout}__{name}__{when}.safetensors"))
        assert ref_out.keys() == got_out.keys()
        for key in ref_out:
            assert ref_out[key].shape == got_out[key].shape, (when, key)
            diff = float((ref_out[key] - got_out[key]).abs().max())
            assert diff <= tol, f"{layout}/{name}: forward {key} ({when}) differs by {diff}"


@pytest.mark.distributed
def test_compared_runs_really_train(runs):
    """Equal numbers from frozen models or identical losses would prove nothing."""
    ref = runs[1]["layouts"]["ref"]
    for name, run in ref.items():
        assert all(g > 0 for g in run["grad_norm"]), name
        assert len(set(run["loss"])) == STEPS, name
    assert ref["calm_adamw"]["loss"][-1] < ref["calm_adamw"]["loss"][0] - 0.1


@pytest.mark.distributed
def test_dropout_masks_differ_across_tp_and_agree_across_dp(runs):
    ranks = runs[4]["extras"]["dropout_masks"]["ranks"]
    by = {(r["tp_rank"], r["dp_rank"]): r for r in ranks}
    assert set(by) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    for dp in (0, 1):  # inside the TP region (Megatron's RNG tracker): TP peers draw differently
        assert by[(0, dp)]["tp_region"] != by[(1, dp)]["tp_region"]
    for tp in (0, 1):  # ... and DP replicas draw alike
        assert by[(tp, 0)]["tp_region"] == by[(tp, 1)]["tp_region"]
    replicated = {tuple(r["replicated"]) for r in ranks}  # outside it: every rank alike
    assert len(replicated) == 1


@pytest.mark.distributed
def test_pipeline_checkpoint_resumes_at_pp1(runs):
    """PP=2 saves one shard file per stage with global layer names; PP=1 (DP=2) resumes it exactly."""
    resume = runs[2]["extras"]["pp2_to_pp1"]
    ref = runs[1]["layouts"]["ref"]["calm_sgd"]["loss"]
    assert resume["files"] == ["tp00_pp00.safetensors", "tp00_pp01.safetensors"]
    assert resume["resumed_at"] == 2 and resume["layout"] == [1, 1, 2]
    for a, b in zip(resume["before"] + [resume["after"]], ref):
        assert _close(a, b), (resume, ref)


# --------------------------------------------------------------------------- configuration errors

TINY_AR, TINY_AE = str(REPO / "configs/ar/tiny.yaml"), str(REPO / "configs/ae/tiny.yaml")


@pytest.mark.parametrize("config, overrides, world, message", [
    (TINY_AR, ["parallel.tp=3", "train.global_batch_size=3", "train.micro_batch_size=1"], 3,
     "num_attention_heads=4 not divisible by parallel.tp=3"),
    (TINY_AR, ["parallel.tp=2", "model.num_query_groups=1"], 2, "num_query_groups=1 not divisible by parallel.tp=2"),
    (TINY_AR, ["parallel.pp=4", "train.global_batch_size=4", "train.micro_batch_size=1"], 4,
     "num_layers=2 not divisible by parallel.pp=4"),
    (TINY_AR, ["parallel.pp=2", "parallel.zero_stage=2"], 2, "zero_stage=2 with parallel.pp=2"),
    (TINY_AR, ["parallel.pp=2", "parallel.zero_stage=3"], 2, "zero_stage=3 with parallel.pp=2"),
    (TINY_AR, ["parallel.pp=2", "parallel.zero_stage=0", "train.precision=bf16"], 2,
     "zero_stage=0 with train.precision=bf16 and parallel.pp=2"),
    (TINY_AE, ["parallel.pp=2"], 2, "autoencoder has no attention and is not pipelined"),
    (TINY_AE, ["parallel.tp=3", "autoencoder.intermediate_size=128"], 3, "intermediate_size=128 not divisible"),
    (TINY_AR, ["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp = 2*1"),
    (TINY_AR, ["parallel.tp=2", "parallel.dp=2"], 2, "world size 2 != parallel.tp * parallel.pp * parallel.dp"),
])
def test_bad_layouts_are_clear_errors(config, overrides, world, message):
    cfg = C.load(config, overrides)
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.validate(cfg, world, check_files=False)


def test_vocab_not_divisible_by_tp_is_padded_not_rejected():
    cfg = C.load(TINY_AR, ["parallel.tp=2", "model.vocab_size=4095"])
    assert C.validate(cfg, 2, check_files=False) == 1


def test_world_size_mismatch_fails_before_any_process_group():
    result = subprocess.run([sys.executable, "-m", "calm_megatron.train", TINY_AR, "parallel.tp=2"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"})
    assert result.returncode == 2
    assert "world size 1 is not divisible by parallel.tp * parallel.pp = 2*1" in result.stderr
    assert "parallel runtime" not in result.stderr and "Traceback" not in result.stderr


def test_deepspeed_dict_under_pipeline_parallelism():
    """The schedule owns micro-batching: GAS=1, one step per global batch, unmanaged accumulation."""
    cfg = C.load(TINY_AR, ["parallel.pp=2", "train.global_batch_size=8", "train.micro_batch_size=2"])
    ds = C.to_deepspeed(cfg, dp=2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 4
    assert ds["managed_gradient_accumulation"] is False  # top level: DeepSpeed ignores it elsewhere
    assert "managed_gradient_accumulation" not in ds["zero_optimization"]


# --------------------------------------------------------------------------- checkpoint helpers

def test_glu_shards_regroup_and_vocab_padding_fits(monkeypatch):
    from calm_megatron.training import checkpoint as ck

    gates, ups = torch.arange(8.).view(4, 2), 100 + torch.arange(8.).view(4, 2)
    full = torch.cat([gates, ups])  # TP=1 layout: [all gates; all ups]
    monkeypatch.setattr(ck, "_tp_info", lambda: (2, 0))
    shards = ck._split_tp(full, 0, glu=True)
    assert torch.equal(shards[0], torch.cat([gates[:2], ups[:2]]))  # each shard: [its gates; its ups]
    assert torch.equal(ck._join_tp(shards, 0, glu=True), full)
    assert not torch.equal(ck._join_tp(shards, 0, glu=False), full)  # plain concatenation would be wrong

    table = torch.randn(5, 3)  # vocab 5 at TP=1 -> 6 rows at TP=2 (one zero padding row)
    param = torch.nn.Parameter(torch.empty(3, 3))
    param.tensor_model_parallel, param.partition_dim = True, 0
    padded = ck._fit_vocab_padding(table, param)
    assert padded.shape == (6, 3) and torch.equal(padded[:5], table) and not padded[5].any()
    monkeypatch.setattr(ck, "_tp_info", lambda: (1, 0))
    one = torch.nn.Parameter(torch.empty(5, 3))
    one.tensor_model_parallel, one.partition_dim = True, 0
    assert torch.equal(ck._fit_vocab_padding(padded, one), table)  # TP=2 -> TP=1 drops the padding
    padded[5] = 1.0  # a non-zero "padding" row is real data: left alone for the shape check to report
    assert ck._fit_vocab_padding(padded, one).shape == (6, 3)


def test_global_layer_names_follow_layer_numbers(megatron_single):
    from calm_megatron.models.ar import build_ar
    from calm_megatron.training import checkpoint as ck

    cfg = C.load(TINY_AR, ["model.num_layers=4"])
    model = build_ar(cfg.model)
    names = ck.global_names(model)
    assert names["backbone.decoder.layers.3.mlp.linear_fc1.weight"] == "backbone.decoder.layers.3.mlp.linear_fc1.weight"
    for layer in model.backbone.decoder.layers:  # what a second pipeline stage of 2 would hold
        layer.layer_number += 2
    names = ck.global_names(model)
    assert names["backbone.decoder.layers.0.self_attention.linear_qkv.weight"] == \
        "backbone.decoder.layers.2.self_attention.linear_qkv.weight"
    assert names["embedding.weight"] == "embedding.weight"
    assert "backbone.decoder.layers.0.mlp.linear_fc1.weight" in ck.glu_parameter_names(model)


# --------------------------------------------------------------------------- end to end

@pytest.mark.distributed
def test_pipeline_run_end_to_end_on_streaming_data(tiny_data, tmp_path):
    """The real entry point at PP=2 on tokenized shards: trains, logs the layout and per-rank memory,
    saves one model file per stage, and resumes at PP=1."""
    import os

    from tests.conftest import data_overrides, free_port

    args = [str(REPO / "configs/ar/tiny.yaml"), *data_overrides(tiny_data, "lm"),
            f"model.vocab_size={tiny_data['vocab_size']}", "train.seq_len=128", "train.micro_batch_size=1",
            "train.global_batch_size=2", "train.log_interval=1", "train.progress_bar=false",
            "logging.wandb_mode=disabled", f"run.out_dir={tmp_path}", "checkpoint.interval=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}

    def run(nproc, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "calm_megatron.train", *args, *extra]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-5000:]
        return result

    first = run(2, "parallel.pp=2", "train.steps=2")
    assert "pp=2" in first.stderr and "memory after engine init, per rank" in first.stderr
    assert "rank 1 (tp 0 pp 1 dp 0)" in first.stderr
    assert "evaluation is skipped under pipeline parallelism" in first.stderr
    step = tmp_path / "checkpoints" / "step_00000002" / "model"
    assert sorted(p.name for p in step.glob("*.safetensors")) == ["tp00_pp00.safetensors", "tp00_pp01.safetensors"]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 2 and all(v == v for v in losses.values())
    second = run(1, "train.steps=3")
    assert "resumed from" in second.stderr and "resuming at another layout" in second.stderr
    assert len(json.loads((tmp_path / "losses.json").read_text())) == 3


# --------------------------------------------------------------------------- bf16 (slow)

BF16 = ["train.precision=bf16"]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_bf16")
    base = {"config_dir": str(REPO / "configs"), "outputs_dir": str(tmp / "outputs"),
            "weights_dir": str(tmp / "weights"), "steps": STEPS}
    ref = torchrun_json("parallel_equivalence.py", 1, dict(base, reference=True, layouts=[
        {"name": "ref", "tp": 1, "pp": 1, "scenarios": scenarios(BACKBONES, ["adamw"], BF16)}]), tmp)
    two = torchrun_json("parallel_equivalence.py", 2, dict(base, layouts=[
        {"name": "tp2", "tp": 2, "pp": 1, "scenarios": scenarios(BACKBONES, ["adamw"], BF16)},
        {"name": "pp2", "tp": 1, "pp": 2, "scenarios": scenarios(BACKBONES, ["adamw"], BF16)}]), tmp)
    return ref["layouts"]["ref"], two["layouts"]


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_layouts_equal_one_rank(bf16_runs):
    """bf16: the pipeline split is exact; a TP split reorders bf16 sums, so it agrees to bf16 rounding."""
    ref, layouts = bf16_runs
    for layout, tol in (("pp2", TOL), ("tp2", 5e-3)):
        for name, run in layouts[layout].items():
            for key in ("loss", "grad_norm"):
                for a, b in zip(run[key], ref[name][key]):
                    assert _close(a, b, tol), f"bf16 {layout}/{name}: {key} {run[key]} vs {ref[name][key]}"
