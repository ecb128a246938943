"""Hugging Face conversion both ways in the reference CALM format (calm-hf-format doc), numerically checked.

One real 2-rank TP=2 CALM run (started from an imported reference-format folder) gives the checkpoint
that everything else converts; a real 4-rank TP=2 x PP=2 run resumed from it gives the pipeline
checkpoint of the round trip, and a hand-made PP=2 split of the TP=2 step (same weights) shows that
the export does not depend on the layout. Models use the reference doc's tiny size: hidden 64,
intermediate 128, latent 16, K=4, 2 layers, 4 heads, 2 head blocks, noise 8 (vocab: the tiny corpus').
"""
from __future__ import annotations

import filecmp
import inspect
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, data_overrides, free_port
from tests.test_resume import ok, train

D, FFN, LATENT, K, LAYERS, HEADS, BLOCKS, NOISE = 64, 128, 16, 4, 2, 4, 2, 8
CALM_SIZES = [f"model.hidden_size={D}", f"model.intermediate_size={FFN}", f"model.latent_size={LATENT}",
              f"model.chunk_size={K}", f"model.num_layers={LAYERS}", f"model.num_attention_heads={HEADS}",
              "model.num_query_groups=0", f"model.head_blocks={BLOCKS}", f"model.noise_size={NOISE}",
              f"autoencoder.hidden_size={D}", f"autoencoder.intermediate_size={FFN}",
              f"autoencoder.latent_size={LATENT}"]
QUICK = ["train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_batches=1",
         "train.log_interval=1", "train.progress_bar=false", "logging.wandb_mode=disabled", "checkpoint.interval=0"]
PROVENANCE = "calm_megatron.json"


# --------------------------------------------------------------------------- helpers

def _hf():
    import calm_megatron.hf as hf

    return hf


def _tool(name: str, *argv: str) -> int:
    """Run tools/<name>.py's main() in this process (no interpreter start, no re-import)."""
    module = runpy.run_path(str(REPO / "tools" / f"{name}.py"), run_name="tool")
    return module["main"](list(argv))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from any init pattern (the head's zero-init last layer included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
            else:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))


def _safetensors_index(folder: Path) -> dict:
    """name -> (shape, dtype code) of every tensor of an HF folder's weights."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def _hf_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_files(a: Path, b: Path, ignore=(PROVENANCE,)) -> None:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in ignore)
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in ignore)
    assert files_a == files_b
    different = [f for f in files_a if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not different, f"files differ: {different}"


def split_pipeline(src: Path, dst: Path, pp: int) -> None:
    """A PP=pp copy of a PP=1 step, made by hand in the trainer's file format (independent of hf/).

    Each stage's files hold its parameters under their global names (layer i stays layers.i); the
    embedding and input compression live on the first stage, the final norm, head and frozen
    autoencoder on the last, the layers split evenly.
    """
    from safetensors.torch import load_file, save_file

    from calm_megatron.training.checkpoint import write_manifest

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model", "manifest.json"))
    (dst / "model").mkdir()
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    per_stage = cfg["model"]["num_layers"] // pp
    cfg["parallel"]["pp"] = pp
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def stage_of(name):
        match = re.match(r"backbone\.decoder\.layers\.(\d+)\.", name)
        if match:
            return int(match.group(1)) // per_stage
        return 0 if name.startswith(("embedding.", "input_compression.")) else pp - 1

    for meta_file in sorted((src / "model").glob("tp*_pp00.json")):
        meta, tensors = json.loads(meta_file.read_text()), load_file(str(meta_file.with_suffix(".safetensors")))
        rank = meta_file.name[:4]
        stages = [({}, dict(meta, params={})) for _ in range(pp)]
        for name, info in meta["params"].items():
            stages[stage_of(name)][1]["params"][name] = info
        for key, value in tensors.items():
            stages[stage_of(key.split("/", 1)[1])][0][key] = value
        for stage, (stage_tensors, stage_meta) in enumerate(stages):
            save_file(stage_tensors, str(dst / "model" / f"{rank}_pp{stage:02d}.safetensors"))
            (dst / "model" / f"{rank}_pp{stage:02d}.json").write_text(json.dumps(stage_meta))
    write_manifest(dst)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """Reference-format folders with random weights: a CALM (+ its autoencoder) and a stock Llama (GQA)."""
    hf = _hf()
    from calm_megatron.data.tokenizer import load_tokenizer
    from calm_megatron.hf.configuration_autoencoder import AutoencoderConfig
    from calm_megatron.hf.configuration_calm import CALMConfig
    from calm_megatron.hf.modeling_calm import EnergyTransformer
    from calm_megatron.hf.tokenizer_files import token_ids, write_tokenizer_files

    root = tmp_path_factory.mktemp("reference")
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    V, ids = tiny_data["vocab_size"], token_ids(tokenizer)
    ae_config = AutoencoderConfig(vocab_size=V, hidden_size=D, intermediate_size=FFN, latent_size=LATENT,
                                  patch_size=K, **ids)
    calm_config = CALMConfig(ae_path="autoencoder", vocab_size=V, hidden_size=D, intermediate_size=FFN,
                             latent_size=LATENT, patch_size=K, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_mlp_layers=BLOCKS, noise_size=NOISE, max_position_embeddings=32, **ids)
    calm = EnergyTransformer(calm_config, ae_config=ae_config)
    _randomise(calm, seed=1)
    calm.save_pretrained(root / "calm")  # HF drops the tied/aliased duplicates from safetensors
    calm.ae_model.save_pretrained(root / "calm" / "autoencoder")
    for folder in (root / "calm", root / "calm" / "autoencoder"):
        write_tokenizer_files(tokenizer, folder, 128)
    transformers = hf.import_transformers()
    llama_config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FFN,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            num_key_value_heads=2, max_position_embeddings=128,
                                            rms_norm_eps=1e-6, tie_word_embeddings=False, **ids)
    llama = transformers.LlamaForCausalLM(llama_config)
    _randomise(llama, seed=2)
    llama.save_pretrained(root / "llama")
    write_tokenizer_files(tokenizer, root / "llama", 128)
    return {"root": root, "calm": root / "calm", "llama": root / "llama", "calm_model": calm.eval(),
            "llama_model": llama.eval(), "vocab": V}


TRAIN_THEN_FORWARD = r'''
"""Under torchrun: the trainer's entry point (calm_megatron.train.main), then, on the same ranks and
process groups, the trained TP=2 model read back from its final step and run on fixed inputs."""
import os, sys
import torch, yaml
from megatron.core import tensor_parallel
from safetensors.torch import load_file, save_file
from calm_megatron import config as C, distributed, train
from calm_megatron.models.autoencoder import build_autoencoder
from calm_megatron.models.calm import build_calm
from calm_megatron.training.checkpoint import load_autoencoder_weights, resolve_step

outputs, run_dir, train_args = sys.argv[1], sys.argv[2], sys.argv[3:]
teardown, distributed.teardown = distributed.teardown, lambda: None  # keep the groups for the forward
code = train.main(train_args)
if code != 0:
    sys.exit(code)
step = resolve_step(run_dir)
layout = distributed.current_layout()
cfg = C.from_dict(yaml.safe_load(open(os.path.join(step, "config.yaml"))))
ae_cfg = load_autoencoder_weights(cfg.model.autoencoder_checkpoint)[0]
model = build_calm(cfg.model, build_autoencoder(ae_cfg, perform_initialization=False),
                   perform_initialization=False).eval()
shard = load_file(os.path.join(step, "model", f"tp{layout.tp_rank:02d}_pp00.safetensors"))
with torch.no_grad():
    for name, param in model.named_parameters():
        param.copy_(shard["model/" + name])
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8 * cfg.model.chunk_size), generator=g)
    noise = torch.rand(4, 2, 8, cfg.model.noise_size, generator=g) - 0.5
    hidden = model.hidden_states(ids, include_last_chunk=True)
    latents = model.sample_latents(hidden, 4, noise)
    mu, _ = model.autoencoder.encode(ids.view(2, 8, -1))
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(model.autoencoder.decode(mu))
if layout.rank == 0:
    save_file({"ids": ids, "noise": noise, "hidden": hidden.contiguous(), "latents": latents.contiguous(),
               "ae_logits": logits.contiguous()}, outputs)
teardown()
'''


@pytest.fixture(scope="module")
def tp2_run(tiny_data, reference, tmp_path_factory):
    """A real 2-rank TP=2 CALM run, fine-tuned from the reference folder imported at TP=2 (2 steps).

    The trainer's own entry point runs under torchrun; afterwards the same two ranks rebuild the
    TP=2 model from the final step and record its outputs on fixed inputs (one launch for both).
    """
    root = tmp_path_factory.mktemp("tp2_run")
    imported = _hf().import_hf(str(reference["calm"]), str(root / "imported"), tp=2)
    run, script, outputs = root / "run", root / "train_then_forward.py", root / "tp2_outputs.safetensors"
    script.write_text(TRAIN_THEN_FORWARD)
    args = ["configs/calm/tiny.yaml", *data_overrides(tiny_data, "lm"), f"model.vocab_size={reference['vocab']}",
            f"autoencoder.vocab_size={reference['vocab']}", *CALM_SIZES, *QUICK, "parallel.tp=2",
            f"model.autoencoder_checkpoint={root / 'imported' / 'autoencoder'}",
            f"checkpoint.load={imported.parent}", "checkpoint.finetune=true", f"run.out_dir={run}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                             str(outputs), str(run), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    assert "fine-tuning from the weights of" in result.stderr
    step = run / "checkpoints" / "step_00000002"
    assert json.loads((step / "trainer_state.json").read_text())["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    return {"root": root, "step": step, "imported": imported, "outputs": outputs}


@pytest.fixture(scope="module")
def tp2pp2_run(tiny_data, reference, tp2_run):
    """A real 4-rank TP=2 x PP=2 run of the trainer, resumed from the TP=2 run's step 2 (at another
    layout) for one more step: the pipeline checkpoint that the round trip starts from."""
    root = tp2_run["root"]
    run = root / "tp2pp2_run"
    args = ["configs/calm/tiny.yaml", *data_overrides(tiny_data, "lm"), f"model.vocab_size={reference['vocab']}",
            f"autoencoder.vocab_size={reference['vocab']}", *CALM_SIZES, *QUICK, "train.steps=3",
            "parallel.tp=2", "parallel.pp=2", f"model.autoencoder_checkpoint={root / 'imported' / 'autoencoder'}",
            f"checkpoint.load={tp2_run['step']}", f"run.out_dir={run}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
                             "calm_megatron.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    assert "resuming at another layout" in result.stderr
    step = run / "checkpoints" / "step_00000003"
    assert json.loads((step / "trainer_state.json").read_text())["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    return step


@pytest.fixture(scope="module")
def exported(tp2_run):
    """The TP=2 run exported (fp32), and its synthetic PP=2 twin."""
    hf = _hf()
    root = tp2_run["root"]
    pp2 = root / "pp2" / "step_00000002"
    split_pipeline(tp2_run["step"], pp2, pp=2)
    return {"tp2": hf.export_checkpoint(str(tp2_run["step"]), str(root / "hf_tp2")),
            "tp2pp2": hf.export_checkpoint(str(pp2), str(root / "hf_tp2pp2")), "pp2_step": pp2}


# --------------------------------------------------------------------------- the reference format

# Transcribed from the calm-hf-format doc for its tiny config (l = latent, d = hidden, V = vocab).
REFERENCE_AE_FIELDS = {"ae_dropout", "kl_clamp", "kl_weight", "patch_size", "vocab_size", "hidden_size",
                       "intermediate_size", "num_encoder_layers", "num_decoder_layers", "latent_size", "hidden_act",
                       "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id",
                       "bos_token_id", "eos_token_id", "tie_word_embeddings", "mlp_bias"}
REFERENCE_CALM_FIELDS = {"ae_path", "patch_size", "num_mlp_layers", "num_samples", "beta", "noise_size",
                         "latent_size", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                         "initializer_range", "rms_norm_eps", "use_cache", "rope_theta", "rope_scaling",
                         "attention_bias", "attention_dropout", "mlp_bias", "tie_word_embeddings", "pad_token_id",
                         "bos_token_id", "eos_token_id"}
HF_COMMON = {"architectures", "model_type", "auto_map", "torch_dtype", "transformers_version"}


def reference_ae_shapes(V, d=D, f=FFN, l=LATENT, k=K):
    shapes = {"encoder.embed_tokens.weight": (V, d), "encoder.squeeze_layer.weight": (d, k * d),
              "encoder.squeeze_layer.bias": (d,), "encoder.norm.weight": (d,),
              "encoder.hidden_to_latent.weight": (2 * l, d), "encoder.hidden_to_latent.bias": (2 * l,),
              "decoder.latent_to_hidden.weight": (d, l), "decoder.latent_to_hidden.bias": (d,),
              "decoder.expand_layer.weight": (k * d, d), "decoder.expand_layer.bias": (k * d,),
              "decoder.norm.weight": (d,), "decoder.lm_head_weight": (V, d)}
    for stack in ("encoder.encoder_layers", "decoder.decoder_layers"):
        for i in range(2):
            shapes.update({f"{stack}.{i}.layernorm.weight": (d,), f"{stack}.{i}.mlp.gate_proj.weight": (f, d),
                           f"{stack}.{i}.mlp.up_proj.weight": (f, d), f"{stack}.{i}.mlp.down_proj.weight": (d, f)})
    return shapes


def reference_calm_shapes(V, d=D, f=FFN, l=LATENT, k=K, heads=HEADS, noise=NOISE):
    hd = d // heads
    shapes = {"transformer.embed_tokens.weight": (V, d), "transformer.norm.weight": (d,),
              "embed_proj.0.weight": (2 * d, k * d), "embed_proj.0.bias": (2 * d,),
              "embed_proj.2.weight": (d, 2 * d), "embed_proj.2.bias": (d,),
              "embed_proj.3.weight": (d,), "embed_proj.3.bias": (d,)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.self_attn.q_proj.weight": (heads * hd, d),
                       f"{p}.self_attn.k_proj.weight": (heads * hd, d), f"{p}.self_attn.v_proj.weight": (heads * hd, d),
                       f"{p}.self_attn.o_proj.weight": (d, heads * hd), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d),
                       f"{p}.mlp.down_proj.weight": (d, f)})
    head = {"noise_embd.weight": (d, noise), "noise_embd.bias": (d,), "hidden_embd.weight": (d, d),
            "hidden_embd.bias": (d,), "norm_noise.weight": (d,), "norm_noise.bias": (d,),
            "norm_hidden.weight": (d,), "norm_hidden.bias": (d,), "final_layer.in_ln.weight": (d,),
            "final_layer.in_ln.bias": (d,), "final_layer.linears.0.weight": (d, d),
            "final_layer.linears.0.bias": (d,), "final_layer.linears.2.weight": (l, d),
            "final_layer.linears.2.bias": (l,)}
    for j in range(BLOCKS):
        b = f"mlp_blocks.{j}"
        head.update({f"{b}.in_ln.weight": (d,), f"{b}.in_ln.bias": (d,), f"{b}.linears.0.weight": (d, 2 * d),
                     f"{b}.linears.0.bias": (d,), f"{b}.linears.2.weight": (d, d), f"{b}.linears.2.bias": (d,),
                     f"{b}.linears.4.weight": (2 * d, d), f"{b}.linears.4.bias": (2 * d,),
                     f"{b}.down_proj.weight": (d, d), f"{b}.down_proj.bias": (d,)})
    for prefix in ("mlp_generator.", "generative_head."):
        shapes.update({prefix + name: shape for name, shape in head.items()})
    shapes.update({"ae_model." + name: shape for name, shape in reference_ae_shapes(V, d, f, l, k).items()})
    return shapes


def test_exported_names_shapes_and_config_fields_are_the_reference_ones(exported, reference):
    V = reference["vocab"]
    calm, ae = exported["tp2"], exported["tp2"] / "autoencoder"
    calm_index, ae_index = _safetensors_index(calm), _safetensors_index(ae)
    assert {n: s for n, (s, _) in calm_index.items()} == reference_calm_shapes(V)
    assert {n: s for n, (s, _) in ae_index.items()} == reference_ae_shapes(V)
    assert {dtype for _, dtype in list(calm_index.values()) + list(ae_index.values())} == {"F32"}
    calm_config, ae_config = (json.loads((f / "config.json").read_text()) for f in (calm, ae))
    assert set(calm_config) == REFERENCE_CALM_FIELDS | HF_COMMON
    assert set(ae_config) == REFERENCE_AE_FIELDS | HF_COMMON
    assert calm_config["architectures"] == ["EnergyTransformer"] and calm_config["model_type"] == "energy"
    assert ae_config["architectures"] == ["Autoencoder"] and calm_config["ae_path"] == "autoencoder"
    assert (calm_config["patch_size"], calm_config["num_mlp_layers"], calm_config["noise_size"],
            calm_config["beta"], calm_config["rope_theta"], calm_config["tie_word_embeddings"]) == (K, BLOCKS, NOISE,
                                                                                             1.0, 10000.0, False)
    assert (ae_config["ae_dropout"], ae_config["kl_clamp"], ae_config["kl_weight"], ae_config["rms_norm_eps"],
            ae_config["tie_word_embeddings"], ae_config["mlp_bias"]) == (0.15, 0.5, 0.001, 1e-6, False, False)
    for folder, files in ((calm, ("configuration_calm.py", "modeling_calm.py", "configuration_autoencoder.py",
                                  "modeling_autoencoder.py")), (ae, ("configuration_autoencoder.py",
                                                                     "modeling_autoencoder.py"))):
        for name in files + ("generation_config.json", "tokenizer.model", "tokenizer_config.json"):
            assert (folder / name).is_file(), name
        source = "\n".join((folder / f).read_text() for f in files)
        imports = set(re.findall(r"^(?:from|import) ([\w.]+)", source, re.M))
        assert {i.split(".")[0] for i in imports} <= {"torch", "transformers", "", "__future__", "math", "os",
                                                      "warnings", "dataclasses", "typing"}, imports


# --------------------------------------------------------------------------- round trip

def test_round_trip_tp2_pp2_to_hf_to_tp1_is_bitwise_and_reexport_identical(tp2pp2_run, tmp_path):
    """The acceptance: a real TP=2 x PP=2 checkpoint -> HF -> ours at TP=1 (bitwise) -> HF (same files);
    and HF -> ours at TP=2 x PP=2 reproduces the trainer's own shards."""
    hf = _hf()
    from safetensors.torch import load_file

    from calm_megatron.hf.shards import CheckpointReader

    source = CheckpointReader(tp2pp2_run)
    assert (source.tp, source.pp) == (2, 2)
    exported = hf.export_checkpoint(str(tp2pp2_run), str(tmp_path / "hf"))
    step1 = hf.import_hf(str(exported), str(tmp_path / "tp1"), tp=1)
    tp1 = CheckpointReader(step1)
    assert (tp1.tp, tp1.pp) == (1, 1) and list(tp1.params) == list(source.params)
    for name in source.params:
        assert torch.equal(tp1.tensor(name), source.tensor(name)), name
    _same_files(exported, hf.export_checkpoint(str(step1), str(tmp_path / "hf_again")))
    step22 = hf.import_hf(str(exported), str(tmp_path / "tp2pp2"), tp=2, pp=2)
    for stage in range(2):
        for rank in range(2):
            name = f"tp{rank:02d}_pp{stage:02d}"
            ours, trained = load_file(str(step22 / "model" / f"{name}.safetensors")), \
                load_file(str(tp2pp2_run / "model" / f"{name}.safetensors"))
            assert set(ours) == {k for k in trained if k.startswith("model/")}, name
            assert all(torch.equal(ours[k], trained[k]) for k in ours), name
            meta_ours = json.loads((step22 / "model" / f"{name}.json").read_text())["params"]
            meta_trained = json.loads((tp2pp2_run / "model" / f"{name}.json").read_text())["params"]
            assert meta_ours == meta_trained, name


def test_export_does_not_depend_on_the_layout(exported, tp2_run):
    """The TP=2 step and a PP=2 split of it (same weights, made by hand) export to the same bytes."""
    from calm_megatron.hf.shards import CheckpointReader

    _same_files(exported["tp2"], exported["tp2pp2"])
    source, pp2 = CheckpointReader(tp2_run["step"]), CheckpointReader(exported["pp2_step"])
    assert (source.tp, source.pp, pp2.tp, pp2.pp) == (2, 1, 2, 2)
    for state in source.state_keys():
        for name, param in source.params.items():
            if state == "model" or param.trainable:  # the frozen autoencoder has no optimizer state
                assert torch.equal(source.tensor(name, state), pp2.tensor(name, state)), (state, name)


@pytest.mark.distributed
def test_exported_calm_matches_the_tp2_model_it_came_from(exported, tp2_run):
    """The TP=2 model on its 2 ranks (recorded by the tp2_run launch) against the HF folder via remote code."""
    hf = _hf()
    from safetensors.torch import load_file

    ref = load_file(str(tp2_run["outputs"]))
    model = hf.import_transformers().AutoModel.from_pretrained(str(exported["tp2"]), trust_remote_code=True).eval()
    with torch.no_grad():
        output = model(ref["ids"], noise=ref["noise"])
        mean, _ = model.ae_model.encode(ref["ids"])
        logits = model.ae_model.decode(mean)
    measured = {"hidden_states": (output.last_hidden_state - ref["hidden"]).abs().max().item(),
                "latents": (output.latents - ref["latents"]).abs().max().item(),
                "ae_logits": (logits - ref["ae_logits"].flatten(1, 2)).abs().max().item()}
    print("measured max |ours at TP=2 - hf| (CALM fp32):", measured)
    assert max(measured.values()) < 1e-5, measured


# --------------------------------------------------------------------------- validation

def test_convert_to_hf_cli_validates_and_reports_differences(tp2_run, tmp_path, capsys):
    code = _tool("convert_to_hf", "--checkpoint", str(tp2_run["step"].parent.parent), "--out",
                 str(tmp_path / "hf"), "--validate", "--no-progress")
    printed = capsys.readouterr().out
    assert code == 0, printed
    measured = json.loads(printed[printed.index("{"):])
    assert set(measured) >= {"hidden_states", "latents", "ae_model.logits", "autoencoder_folder.logits"}
    assert max(measured.values()) < 1e-5
    print("measured max |ours - hf| (CALM fp32):", measured)


def test_validate_catches_a_wrong_qkv_regrouping(tp2_run, tmp_path, monkeypatch):
    hf = _hf()
    from calm_megatron.hf import mapping

    def heads_not_grouped(weight, heads, groups):  # the classic bug: [all q; all k; all v]
        q, k, v = weight.split([weight.shape[0] // 3] * 3)
        return q.contiguous(), k.contiguous(), v.contiguous()

    monkeypatch.setattr(mapping, "split_qkv", heads_not_grouped)
    broken = hf.export_checkpoint(str(tp2_run["step"]), str(tmp_path / "broken"))
    with pytest.raises(hf.ValidationError, match="hidden_states"):
        hf.validate_export(str(tp2_run["step"]), str(broken))


def test_bf16_and_sharded_exports_load_and_validate(tp2_run, tmp_path):
    hf = _hf()
    folder = hf.export_checkpoint(str(tp2_run["step"]), str(tmp_path / "bf16"), "bf16", max_shard_bytes=200_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    assert {dtype for _, dtype in _safetensors_index(folder).values()} == {"BF16"}
    measured = hf.validate_export(str(tp2_run["step"]), str(folder))
    print("measured max |ours - hf| (CALM bf16 weights, fp32 math):", measured)
    assert max(measured.values()) < 1e-5
    step = hf.import_hf(str(folder), str(tmp_path / "back"))  # the importer reads sharded bf16 folders too
    from calm_megatron.hf.shards import CheckpointReader

    source, back = CheckpointReader(tp2_run["step"]), CheckpointReader(step)
    for name in source.params:
        assert torch.equal(back.tensor(name), source.tensor(name).bfloat16().float()), name


# --------------------------------------------------------------------------- the shipped code

def test_exported_calm_loads_with_remote_code_and_generates(exported, reference):
    hf = _hf()
    transformers = hf.import_transformers()
    model = transformers.AutoModel.from_pretrained(str(exported["tp2"]), trust_remote_code=True).eval()
    assert type(model).__name__ == "EnergyTransformer" and model.generative_head is model.mlp_generator
    assert model.ae_model.decoder.lm_head_weight is model.ae_model.encoder.embed_tokens.weight
    ae = transformers.AutoModel.from_pretrained(str(exported["tp2"] / "autoencoder"), trust_remote_code=True)
    assert type(ae).__name__ == "Autoencoder"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported["tp2"]))
    from calm_megatron.data.tokenizer import load_tokenizer

    ours = load_tokenizer(exported["tp2"])
    text = "The king and  the queen.\tThou art night"
    assert tokenizer(text, add_special_tokens=False).input_ids == ours.encode(text)
    prompt = torch.tensor([ours.encode("the king shall speak of love and death in the night")[:6]] * 2)
    assert prompt.shape == (2, 6)
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.5, "sampler": "exact"},
                   {"temperature": 0.4, "sampler": "exact", "max_calls": 50}, {"temperature": 0.5, "sampler": "batch",
                                                                                "num_candidates": 16}):
        first = model.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(3), **kwargs)
        again = model.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(first, again) and first.shape[1] in (8 + 4, 8 + 8), (kwargs, first.shape)
        assert torch.equal(first[:, :6], prompt) and (first[:, 6:8] == ours.pad_id).all()  # reference padding quirk


def test_shipped_samplers_are_verbatim_copies_of_ours():
    _hf()
    from calm_megatron import sampling
    from calm_megatron.hf import modeling_calm

    copied = ["check_temperature", "split_inverse_temperature", "inverse_temperature_integer", "ExactSample",
              "_ExactState", "sample_exact", "_apply_call_cap", "_group_identical_chunks",
              "batch_approx_distribution", "sample_batch_approx"]
    for name in copied:
        assert inspect.getsource(getattr(modeling_calm, name)) == inspect.getsource(getattr(sampling, name)), name
    assert modeling_calm._INTEGER_TOLERANCE == sampling._INTEGER_TOLERANCE


# --------------------------------------------------------------------------- import

def test_reference_folder_imports_with_or_without_duplicated_entries(reference, tmp_path):
    hf = _hf()
    from calm_megatron.hf.source import HFSource

    original = _hf_tensors(reference["calm"])  # save_pretrained kept one name per tied tensor
    assert not any(n.startswith("generative_head.") for n in original)
    exported = hf.export_checkpoint(str(hf.import_hf(str(reference["calm"]), str(tmp_path / "a"))),
                                    str(tmp_path / "hf"))
    again = _hf_tensors(exported)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    for name, tensor in again.items():  # the duplicates the reference state dict lists
        if name.startswith("generative_head."):
            assert torch.equal(tensor, original["mlp_generator." + name[len("generative_head."):]])
    assert torch.equal(again["ae_model.decoder.lm_head_weight"], original["ae_model.encoder.embed_tokens.weight"])
    # The reference's own pickled dump: both names of every tied tensor, read with weights_only.
    pickled = tmp_path / "pickled"
    shutil.copytree(reference["calm"], pickled, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(reference["calm_model"].state_dict(), pickled / "pytorch_model.bin")
    source = HFSource(pickled)
    assert dict(source.tensors()).keys() == dict(HFSource(reference["calm"]).tensors()).keys()
    for name, tensor in HFSource(reference["calm"]).tensors():
        assert torch.equal(dict(source.tensors())[name], tensor) if name.startswith("head.blocks.0") else True
    # Only the alias names (no mlp_generator.*, no encoder embedding) are accepted as well.
    only_alias = tmp_path / "only_alias"
    shutil.copytree(reference["calm"], only_alias)
    renamed = {("generative_head." + n[len("mlp_generator."):] if n.startswith("mlp_generator.") else n): t
               for n, t in original.items()}
    renamed["ae_model.decoder.lm_head_weight"] = renamed.pop("ae_model.encoder.embed_tokens.weight")
    from safetensors.torch import save_file

    save_file(renamed, str(only_alias / "model.safetensors"))
    step = hf.import_hf(str(only_alias), str(tmp_path / "b"))
    exported_b = hf.export_checkpoint(str(step), str(tmp_path / "hf_b"))
    assert all(torch.equal(_hf_tensors(exported_b)[n], t) for n, t in again.items())
    # Duplicates that disagree are refused, naming both.
    state = reference["calm_model"].state_dict()
    state = {n: t.clone() for n, t in state.items()}
    state["generative_head.noise_embd.bias"] += 1.0
    disagree = tmp_path / "disagree"
    shutil.copytree(pickled, disagree)
    torch.save(state, disagree / "pytorch_model.bin")
    with pytest.raises(hf.HFFormatError, match="mlp_generator.noise_embd.bias.*generative_head.noise_embd.bias"):
        dict(HFSource(disagree).tensors())


def test_imported_baseline_fine_tunes_and_exports_as_stock_llama(reference, tiny_data, tmp_path):
    """Llama (GQA) -> ours -> a real training step (weights-only load) -> stock LlamaForCausalLM again."""
    hf = _hf()
    step = Path(_tool_ok("convert_from_hf", "--hf", str(reference["llama"]), "--out", str(tmp_path / "ckpt"),
                         "--no-progress"))
    assert step == tmp_path / "ckpt" / "step_00000000"
    data = [f"data.train={tiny_data['lm_train']}", f"data.valid={tiny_data['lm_valid']}"]
    ok(train([str(step / "config.yaml"), *data, "train.seq_len=128", "train.steps=1", "train.micro_batch_size=2",
              "train.global_batch_size=2", "train.eval_batches=1", "train.progress_bar=false", "optim.lr=1e-9",
              "optim.warmup_steps=0", "logging.wandb_mode=disabled", f"checkpoint.load={tmp_path / 'ckpt'}",
              "checkpoint.finetune=true", f"run.out_dir={tmp_path / 'run'}"],
             env={"MASTER_PORT": str(free_port())}))  # not the port of this process's own group
    folder = hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(folder.glob("*.py"))
    measured = hf.validate_export(str(tmp_path / "run"), str(folder))
    print("measured max |ours - hf| (baseline fp32):", measured)
    assert measured["logits"] < 1e-5 and abs(measured["kl"]) < 1e-6
    llama = hf.import_transformers().LlamaForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, reference["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one step at lr 1e-9 moved the weights by ~1e-9: same logits as the original
        assert (llama(ids).logits - reference["llama_model"](ids).logits).abs().max() < 1e-5
    names = {n: s for n, (s, _) in _safetensors_index(folder).items()}
    assert names == {n: tuple(t.shape) for n, t in reference["llama_model"].state_dict().items()}


def _tool_ok(name: str, *argv: str) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = _tool(name, *argv)
    assert code == 0, buffer.getvalue()
    return buffer.getvalue().strip().rsplit(" ", 1)[-1]


def test_autoencoder_folder_round_trip_and_layout_options(reference, tmp_path):
    """Reference Autoencoder -> ours (TP=2) -> HF; Transformer Engine names; a tied-embedding Llama."""
    hf = _hf()
    from safetensors.torch import load_file, save_file

    from calm_megatron.hf.shards import CheckpointReader

    source = reference["calm"] / "autoencoder"
    step = hf.import_hf(str(source), str(tmp_path / "ae"), tp=2)
    assert (step / "autoencoder.safetensors").is_file() and (step / "autoencoder.json").is_file()
    folder = hf.export_checkpoint(str(step), str(tmp_path / "hf"))
    assert max(hf.validate_export(str(step), str(folder)).values()) < 1e-5
    original, again = _hf_tensors(source), _hf_tensors(folder)
    assert {n: tuple(t.shape) for n, t in again.items()} == reference_ae_shapes(reference["vocab"])
    assert all(torch.equal(again[n], t) for n, t in original.items())
    model = hf.import_transformers().AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    ids = torch.randint(0, reference["vocab"], (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference["calm_model"].ae_model(ids).logits)
    # Steps written for Transformer Engine's layer spec read back as the same tensors.
    te = hf.import_hf(str(reference["calm"]), str(tmp_path / "te"), tp=2, pp=2, te_names=True)
    plain = hf.import_hf(str(reference["calm"]), str(tmp_path / "plain"), tp=1)
    names = set(json.loads((te / "model" / "tp00_pp00.json").read_text())["params"])
    assert "backbone.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "backbone.decoder.layers.0.input_layernorm.weight" not in names
    te_reader, plain_reader = CheckpointReader(te), CheckpointReader(plain)
    assert all(torch.equal(te_reader.tensor(n), plain_reader.tensor(n)) for n in plain_reader.params)
    # A Llama with tied embeddings and no lm_head.weight: the embedding becomes the LM head.
    tied = tmp_path / "tied"
    shutil.copytree(reference["llama"], tied)
    tensors = load_file(str(tied / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / "model.safetensors"))
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    reader = CheckpointReader(hf.import_hf(str(tied), str(tmp_path / "tied_ckpt")))
    assert torch.equal(reader.tensor("output_layer.weight"), tensors["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_with_errors_naming_the_tensor(reference, tmp_path):
    hf = _hf()
    from safetensors.torch import load_file, save_file

    llama = reference["llama"]

    def variant(name, change=None, config=None):
        folder = tmp_path / name
        shutil.copytree(llama, folder)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        if change is not None:
            tensors = load_file(str(folder / "model.safetensors"))
            change(tensors)
            save_file(tensors, str(folder / "model.safetensors"))
        return folder

    def refused(folder, pattern):
        with pytest.raises(hf.HFFormatError, match=pattern):
            hf.import_hf(str(folder), str(tmp_path / "out" / folder.name))

    config = json.loads((llama / "config.json").read_text())
    refused(variant("bert", config=dict(config, architectures=["BertForMaskedLM"], model_type="bert")),
            r"BertForMaskedLM.*not one this converter reads")
    refused(variant("gelu", config=dict(config, hidden_act="gelu")), "hidden_act='gelu'")
    refused(variant("wide", change=lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(FFN + 1, D)})),
            r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(129, 64\)")
    refused(variant("ints", change=lambda t: t.update({"model.norm.weight": torch.ones(D, dtype=torch.int64)})),
            r"model\.norm\.weight has dtype torch\.int64")
    refused(variant("missing", change=lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")),
            r"model\.layers\.0\.self_attn\.k_proj\.weight is missing")
    refused(variant("extra", change=lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(FFN, D)})),
            r"model\.layers\.2\.mlp\.up_proj\.weight .* is not part of")
    no_weights = variant("no_weights")
    (no_weights / "model.safetensors").unlink()
    refused(no_weights, "no weights found")
    sharded = variant("sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    names = list(load_file(str(sharded / "model-00001-of-00002.safetensors")))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + (n == 'lm_head.weight')}-of-00002.safetensors" for n in names}}))
    refused(sharded, r"model-00002-of-00002\.safetensors: listed in .* \(for lm_head\.weight")
    no_config = variant("no_config")
    (no_config / "config.json").unlink()
    refused(no_config, "no config.json")
    # A pickle that runs code when unpickled: refused by weights_only, and nothing ran.
    evil = variant("evil")
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.norm.weight": Payload()}, evil / "pytorch_model.bin")
    refused(evil, r"refused to unpickle .*weights_only=True")
    assert not marker.exists()
    # A plain pickled state dict is fine (read with weights_only=True).
    plain = variant("plain")
    tensors = load_file(str(plain / "model.safetensors"))
    (plain / "model.safetensors").unlink()
    torch.save(tensors, plain / "pytorch_model.bin")
    hf.import_hf(str(plain), str(tmp_path / "out" / "plain"))
    code = _tool("convert_from_hf", "--hf", str(tmp_path / "bert"), "--out", str(tmp_path / "cli"))
    assert code == 2


# --------------------------------------------------------------------------- names, stages, BrierLM

def test_rule_tables_name_every_parameter_of_our_models_and_pipeline_stages(megatron_single):
    from calm_megatron import config as C
    from calm_megatron.hf import mapping
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.backbone import transformer_config
    from calm_megatron.models.calm import CALM, build_calm
    from calm_megatron.models.ar import build_ar

    cfg = C.load("configs/calm/tiny.yaml", [*CALM_SIZES, "model.num_query_groups=2", "model.num_layers=4"])
    ae = build_autoencoder(cfg.autoencoder)
    calm, ar = build_calm(cfg.model, ae), build_ar(cfg.model)
    for kind, model in (("ae", ae), ("calm", calm), ("ar", ar)):
        rules = mapping.rules_for(kind, cfg.model, cfg.autoencoder)
        shapes = mapping.canonical_shapes(rules, mapping.hf_shapes(kind, cfg.model, cfg.autoencoder))
        assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}, kind
        for name, param in mapping.params_of(rules).items():
            assert param.trainable == (not name.startswith("autoencoder.")), name
    # Each pipeline stage's own names, from a CALM built as stage 0 and as the last stage of PP=2.
    config = transformer_config(cfg.model, pp=2)
    first = CALM(cfg.model, None, config, pre_process=True, post_process=False)
    last = CALM(cfg.model, build_autoencoder(cfg.autoencoder), config, pre_process=False, post_process=True)
    rules = mapping.rules_for("calm", cfg.model, cfg.autoencoder)
    placed = {}
    for name in mapping.params_of(rules):
        stage, local = mapping.pipeline_stage(name, cfg.model.num_layers, 2)
        placed.setdefault(stage, set()).add(local)
    assert placed == {0: {n for n, _ in first.named_parameters()}, 1: {n for n, _ in last.named_parameters()}}


def test_eval_brier_scores_a_checkpoint_and_its_export_alike(tp2_run, exported, reference, tiny_data, tmp_path,
                                                             capsys):
    hf = _hf()
    from calm_megatron.hf.brier import evaluate_brier

    valid = str(tiny_data["lm_valid"])
    ours = evaluate_brier(str(tp2_run["step"]), max_batches=2, seed=5)  # the run's own data.valid
    theirs = evaluate_brier(str(exported["tp2"]), valid, max_batches=2, seed=5)
    keys = [k for k in ours if k.startswith("brier")]
    assert len(keys) == 6 and all(ours[k] == theirs[k] for k in keys), (ours, theirs)
    # The baseline's estimator uses exact probabilities: a non-trivial score, equal for both forms.
    step = hf.import_hf(str(reference["llama"]), str(tmp_path / "llama"))
    ours, theirs = (evaluate_brier(str(path), valid, max_batches=2, seed=5) for path in (step, reference["llama"]))
    assert all(ours[k] == theirs[k] for k in keys) and 0 < ours["brier_1"] < 1, (ours, theirs)
    assert _tool("eval_brier", "--model", str(exported["tp2"]), "--data", valid, "--batches", "1") == 0
    assert '"brierlm"' in capsys.readouterr().out
    assert hf.is_hf_folder(exported["tp2"]) and not hf.is_hf_folder(tp2_run["step"])


def test_energy_gap_tool_takes_a_calm_checkpoint_and_an_hf_baseline(tp2_run, reference, tiny_data, tmp_path, capsys):
    calm, llama, valid = str(tp2_run["step"]), str(reference["llama"]), str(tiny_data["lm_valid"])
    common = ["--data", valid, "--batches", "1", "--batch-size", "2", "--samples", "2"]
    assert _tool("energy_gap", "--autoencoder", calm, "--baseline", llama, *common) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["positions"] > 0 and result["reference_loss"] > 0 and result["marginal_loss"] > 0, result
    assert result["gap"] == pytest.approx(1 - result["reference_loss"] / result["marginal_loss"])
    refusals = {("--autoencoder", llama, "--baseline", llama): f"--autoencoder {llama} is a ar run",
                ("--autoencoder", calm, "--baseline", calm): f"--baseline {calm} is a calm run",
                ("--autoencoder", str(tmp_path / "nope"), "--baseline", llama): "nope"}
    for argv, message in refusals.items():
        assert _tool("energy_gap", *argv, *common) == 2, argv
        assert message in capsys.readouterr().err, argv
