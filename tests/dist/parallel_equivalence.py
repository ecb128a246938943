"""Run under torchrun: train the AE, CALM and the baseline in several parallel layouts from the same full
weights and data, and record losses, grad norms and forward outputs (used by tests/test_parallel.py).

One launch covers several layouts of the same world size: Megatron's parallel state is rebuilt
between them. The 1-rank reference run also writes the full weights every other layout starts from
(`weights_dir/<model>.safetensors`, stage-independent names, TP=1 layout), so "the same full
weights" holds whatever the TP/PP split of a layout (Megatron's CPU initialisation alone would not
give it: SwiGLU shards are [gates; ups] per rank, and pipeline stages seed differently).

spec: {"config_dir", "out", "outputs_dir", "weights_dir", "steps", "reference": bool,
       "layouts": [{"name", "tp", "pp", "scenarios": {name: {"model": ae|calm|ar, "overrides": [...]}}}],
       "extras": ["dropout_masks", "pp_resume"]}
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from calm_megatron import config as C
from calm_megatron import distributed
from calm_megatron.training import checkpoint, stages
from calm_megatron.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_equivalence import global_batches, rank_micro_batches  # noqa: E402  (same batches, one definition)

CONFIGS = {"ae": "ae/tiny.yaml", "calm": "calm/tiny.yaml", "ar": "ar/tiny.yaml"}
WEIGHTS = {}  # model name -> full tensors (global names)
AE_SEED = 4321


# --------------------------------------------------------------------------- same weights everywhere

def _fresh_autoencoder(self):
    """The frozen AE inside CALM: a fixed random AE (the same full weights at every layout)."""
    from calm_megatron.models.autoencoder import build_autoencoder

    with torch.random.fork_rng():
        torch.manual_seed(AE_SEED)
        return build_autoencoder(self.cfg.autoencoder, precision=self.cfg.train.precision)


def _install_weight_hooks(weights_dir: Path, reference: bool):
    originals = {cls: cls.build for cls in (stages.AutoencoderStage, stages.CALMStage, stages.ARStage)}

    def build(self):
        model = originals[type(self)](self)
        path = weights_dir / f"{self.name}.safetensors"
        if reference and self.name not in WEIGHTS:
            with torch.no_grad():  # zero-initialised layers would hide differences: perturb them
                gen = torch.Generator().manual_seed(5)
                for name, param in model.named_parameters():
                    if param.requires_grad and float(param.abs().max()) == 0.0 and param.ndim == 2:
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            WEIGHTS[self.name] = checkpoint.full_state_dict(model)
            if dist.get_rank() == 0:
                from safetensors.torch import save_file

                save_file(WEIGHTS[self.name], str(path))
        if self.name not in WEIGHTS:
            from safetensors.torch import load_file

            WEIGHTS[self.name] = load_file(str(path))
        checkpoint.load_full_state_dict(model, WEIGHTS[self.name], str(path), strict=False)
        return model

    for cls in originals:
        cls.build = build
    stages.CALMStage.load_autoencoder = _fresh_autoencoder


# --------------------------------------------------------------------------- data

# --------------------------------------------------------------------------- forward outputs

def _gather_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())[..., :vocab]


def _output_tensors(model_name: str, cfg: C.Config):
    def keep(output):
        if model_name == "calm":
            return {"per_position_loss": output.per_position_loss.float(), "samples": output.samples.float()}
        return {"logits": _gather_vocab(output.logits.float(), C.model_vocab_size(cfg)), "loss": output.loss.float()}
    return keep


@torch.no_grad()
def forward_outputs(trainer: Trainer, model_name: str, tokens: torch.Tensor):
    """The model's outputs on `tokens` (the whole global batch) on the last stage; None elsewhere."""
    kwargs = trainer.stage.forward_kwargs(list(range(tokens.size(0))))
    keep = _output_tensors(model_name, trainer.cfg)
    if trainer.layout.pp == 1:
        return keep(trainer.engine.module(tokens, **kwargs))
    from calm_megatron.training.pipeline import PipelineRunner

    runner = PipelineRunner(trainer.engine, tokens.size(0), 1, trainer.cfg.train.seq_len)
    outputs = runner.forward_outputs(iter([(tokens, kwargs)]), keep)
    return outputs[0] if outputs is not None else None


def _to_rank0(value, layout):
    """`value` of the (last stage, tp 0, dp 0) rank, on rank 0."""
    holder = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, holder)
    box = [value if holder else None]
    dist.broadcast_object_list(box, src=flags.index(True))
    return box[0]


def _save_outputs(path: Path, tensors: dict, layout) -> None:
    tensors = _to_rank0({k: v.cpu().contiguous() for k, v in tensors.items()} if tensors else None, layout)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file(tensors, str(path))


# --------------------------------------------------------------------------- one scenario

def load_cfg(spec: dict, model: str, overrides, layout) -> C.Config:
    cfg = C.load(os.path.join(spec["config_dir"], CONFIGS[model]),
                 list(overrides) + ["train.progress_bar=false", "logging.wandb_mode=disabled",
                                    f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}"])
    C.validate(cfg, layout.world_size, check_files=False)
    return cfg


def run_scenario(spec: dict, layout_name: str, name: str, scenario: dict, layout) -> dict:
    model = scenario["model"]
    cfg = load_cfg(spec, model, scenario["overrides"], layout)
    distributed.seed_everything(cfg.run.seed, layout)
    batches = global_batches(cfg, spec["steps"])
    trainer = Trainer(cfg, layout, batches=rank_micro_batches(batches, layout, cfg.train.micro_batch_size))
    outputs = Path(spec["outputs_dir"])
    _save_outputs(outputs / f"{layout_name}__{name}__init.safetensors",
                  forward_outputs(trainer, model, batches[0]), layout)
    losses, norms = [], []
    for _ in range(spec["steps"]):
        result = trainer.train_step()
        trainer.step += 1
        losses.append(result.loss)
        norms.append(result.grad_norm)
    _save_outputs(outputs / f"{layout_name}__{name}__final.safetensors",
                  forward_outputs(trainer, model, batches[0]), layout)
    return {"loss": losses, "grad_norm": norms}


# --------------------------------------------------------------------------- extras

def dropout_masks(layout) -> dict:
    """Dropout masks drawn inside and outside Megatron's TP-region RNG, from every rank."""
    from megatron.core import tensor_parallel

    distributed.seed_everything(1234, layout)
    x = torch.ones(64)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.nn.functional.dropout(x, 0.5).ne(0).int().tolist()
    outside = torch.nn.functional.dropout(x, 0.5).ne(0).int().tolist()
    mine = {"tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank, "pp_rank": layout.pp_rank,
            "tp_region": inside, "replicated": outside}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}


def pp_resume(spec: dict, extra: dict, layout) -> dict:
    """Train 2 steps at the current layout and save; rebuild at `extra["resume_tp"/"resume_pp"]`, load,
    train step 3. Returns the losses of both parts (compared with an uninterrupted run)."""
    cfg = load_cfg(spec, extra["model"], extra["overrides"] + [f"checkpoint.save={extra['save']}"], layout)
    distributed.seed_everything(cfg.run.seed, layout)
    batches = global_batches(cfg, 3)
    trainer = Trainer(cfg, layout, batches=rank_micro_batches(batches[:2], layout, cfg.train.micro_batch_size))
    before = []
    for _ in range(2):
        before.append(trainer.train_step().loss)
        trainer.step += 1
    trainer.save()
    saved = sorted(p.name for p in (Path(extra["save"]) / "step_00000002" / "model").glob("*.safetensors"))
    del trainer
    layout = reinit(extra["resume_tp"], extra["resume_pp"])
    cfg = load_cfg(spec, extra["model"], extra["overrides"] + [f"checkpoint.save={extra['save']}"], layout)
    trainer = Trainer(cfg, layout, batches=rank_micro_batches(batches[2:], layout, cfg.train.micro_batch_size))
    resumed_at = trainer.step
    after = trainer.train_step().loss
    return {"before": before, "after": after, "resumed_at": resumed_at, "files": saved,
            "layout": [layout.tp, layout.pp, layout.dp]}


def reinit(tp: int, pp: int):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = distributed.current_layout()
    distributed.seed_everything(1234, layout)
    return layout


def main() -> None:
    spec = json.loads(sys.argv[1])
    Path(spec["outputs_dir"]).mkdir(parents=True, exist_ok=True)
    Path(spec["weights_dir"]).mkdir(parents=True, exist_ok=True)
    _install_weight_hooks(Path(spec["weights_dir"]), spec.get("reference", False))
    first = spec["layouts"][0] if spec["layouts"] else {"tp": 1, "pp": 1}
    layout = distributed.init(first["tp"], first["pp"], seed=1234)
    out = {"layouts": {}, "extras": {}}
    for i, entry in enumerate(spec["layouts"]):
        if i:
            layout = reinit(entry["tp"], entry["pp"])
        out["layouts"][entry["name"]] = {
            name: run_scenario(spec, entry["name"], name, scenario, layout)
            for name, scenario in entry["scenarios"].items()}
    for extra in spec.get("extras", []):
        layout = reinit(extra.get("tp", 1), extra.get("pp", 1))
        if extra["kind"] == "dropout_masks":
            out["extras"]["dropout_masks"] = dropout_masks(layout)
        elif extra["kind"] == "pp_resume":
            out["extras"][extra["name"]] = pp_resume(spec, extra, layout)
    if layout.rank == 0:
        with open(spec["out"], "w") as fh:
            json.dump(out, fh)
    distributed.teardown()


if __name__ == "__main__":
    main()
