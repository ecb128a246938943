"""Pipeline-parallel steps through Megatron-Core's 1F1B schedule, around a DeepSpeed ZeRO-1 engine.

The schedule owns micro-batching: one call runs every micro-batch of the global batch through the
stages (warm-up forwards, one-forward-one-backward, cool-down backwards), sending activations and
their gradients between neighbouring stages, and leaves the accumulated gradients in `param.grad`.
Then one `engine.step()` reduces them over the data-parallel group and updates the weights.

That split is the only one DeepSpeed 0.19.8 supports under a foreign schedule (platform notes):
ZeRO stage 0 or 1, `gradient_accumulation_steps=1` and `managed_gradient_accumulation: false`
(what `config.to_deepspeed` emits for pp > 1). The schedule divides each micro-batch loss by the
number of micro-batches, so the gradients equal those of the pp=1 path, where DeepSpeed divides
by its accumulation steps.

The schedule sees the model itself (`engine.module`), not the engine: Megatron finds the
TransformerConfig through the first `.config` attribute, and a DeepSpeed engine's `.config` is the
DeepSpeed dict. Our models expose `config`, `model_type` and `set_input_tensor` as Megatron expects.

Every stage of one data-parallel replica reads the same micro-batches (the first stage embeds the
tokens, the last one needs them for the targets); the loss lives on the last stage and is
broadcast to the others for logging.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from calm_megatron import distributed

log = logging.getLogger("calm_megatron")

MicroBatch = Tuple[torch.Tensor, Dict[str, Any]]  # tokens [B, T] and extra forward kwargs


def backbone_seq_length(module: torch.nn.Module, seq_len_tokens: int) -> int:
    """Backbone positions one micro-batch sends between stages (before the sequence-parallel split).

    CALM runs the backbone over chunks 0..L-2 (L = T / K), the baseline over all T tokens; under
    sequence parallelism the backbone pads them to a multiple of TP.
    """
    from calm_megatron.models.calm import CALM

    positions = seq_len_tokens // module.chunk_size - 1 if isinstance(module, CALM) else seq_len_tokens
    return module.backbone.padded_length(positions)


def check_pipeline_engine(engine) -> None:
    """Refuse an engine that the schedule would train silently wrong (see the module doc)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    module = engine.module
    problems = []
    if engine.zero_optimization_stage() > 1:
        problems.append(f"ZeRO stage {engine.zero_optimization_stage()} (only 0 or 1 work under a pipeline schedule)")
    if engine.zero_optimization_stage() == 0 and engine.bfloat16_enabled():
        problems.append("bf16 at ZeRO stage 0 (DeepSpeed's bf16 optimizer mis-accumulates; use ZeRO stage 1)")
    if engine.gradient_accumulation_steps() != 1:
        problems.append(f"gradient_accumulation_steps={engine.gradient_accumulation_steps()} (must be 1)")
    if engine.managed_gradient_accumulation():
        problems.append("managed_gradient_accumulation is on (must be false)")
    if not isinstance(getattr(module, "config", None), TransformerConfig) or not hasattr(module, "model_type"):
        problems.append(f"{type(module).__name__} does not expose a TransformerConfig `config` and a `model_type`")
    if not hasattr(module, "set_input_tensor"):
        problems.append(f"{type(module).__name__} has no set_input_tensor")
    if problems:
        raise ValueError("cannot run a pipeline schedule: " + "; ".join(problems))


class PipelineRunner:
    """Runs global batches of one data-parallel replica through Megatron-Core's pipeline schedule."""

    def __init__(self, engine, micro_batch_size: int, num_microbatches: int, seq_len_tokens: int):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        check_pipeline_engine(engine)
        self.engine, self.module = engine, engine.module
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.seq_length = backbone_seq_length(self.module, seq_len_tokens)
        self.schedule = get_forward_backward_func()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        config = self.module.config
        # DeepSpeed, not Megatron, reduces gradients over data parallel (in engine.step()).
        config.no_sync_func = config.grad_sync_func = config.finalize_model_grads_func = None
        config.grad_scale_func = None
        log.info("pipeline: %s, %d micro-batches of %d, %d backbone positions per micro-batch",
                 self.schedule.__name__, num_microbatches, micro_batch_size, self.seq_length)

    # ----------------------------------------------------------------- schedule plumbing

    def _step_func(self, metrics_fn: Optional[Callable], keep_output: Optional[Callable]):
        def forward_step(data_iterator, model):
            tokens, kwargs = next(data_iterator)
            output = model(tokens, **kwargs)
            if not self.is_last_stage:
                return output, None

            def loss_func(loss: torch.Tensor):
                # The schedule divides `loss` in place: report a copy.
                reduced = {"loss": loss.detach().float().clone()}
                if metrics_fn is not None:
                    reduced.update(metrics_fn(output, tokens))
                if keep_output is not None:
                    reduced["output"] = keep_output(output)
                return loss, reduced
            return output.loss, loss_func
        return forward_step

    def run(self, micro_batches: Iterator[MicroBatch], forward_only: bool = False,
            metrics_fn: Optional[Callable] = None, keep_output: Optional[Callable] = None) -> List[dict]:
        """One pass of the schedule over `num_microbatches` micro-batches; the last stage's records."""
        return self.schedule(forward_step_func=self._step_func(metrics_fn, keep_output), data_iterator=micro_batches,
                             model=[self.module], num_microbatches=self.num_microbatches,
                             seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
                             forward_only=forward_only)

    def _from_last_stage(self, value):
        """`value` of the last stage on every stage of this pipeline."""
        box = [value if self.is_last_stage else None]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.pp_group)
        return box[0]

    # ----------------------------------------------------------------- training

    def train_step(self, micro_batches: Iterator[MicroBatch], metrics_fn: Optional[Callable] = None):
        """Forward and backward of every micro-batch, then one optimizer step; a `StepResult`."""
        from calm_megatron.training.engine import StepResult, grad_norm_unsharded

        engine = self.engine
        lr = engine.get_lr()[0]
        records = self.run(micro_batches, metrics_fn=metrics_fn)
        summary = None
        if self.is_last_stage:
            keys = sorted({k for r in records for k in r})
            summary = {k: sum(float(r[k]) for r in records) / len(records) for k in keys}
        summary = self._from_last_stage(summary)
        if engine.zero_optimization_stage() == 0:
            grad_norm = self._step_zero0(grad_norm_unsharded)
        else:
            engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        loss = distributed.all_reduce_mean(summary.pop("loss"))
        metrics = {k: distributed.all_reduce_mean(v) for k, v in summary.items()}
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, metrics=metrics)

    def _step_zero0(self, grad_norm_unsharded) -> float:
        """ZeRO stage 0: reduce over data parallel ourselves so that the norm is measured on reduced grads."""
        engine = self.engine
        engine._running_engine_step = True  # what step() sets: the accumulation boundary, for the reduction
        try:
            engine.allreduce_gradients()
        finally:
            engine._running_engine_step = False
        grad_norm = grad_norm_unsharded(engine)
        allreduce, engine.enable_backward_allreduce = engine.enable_backward_allreduce, False
        try:
            engine.step()
        finally:
            engine.enable_backward_allreduce = allreduce
        return grad_norm

    @torch.no_grad()
    def forward_outputs(self, micro_batches: Iterator[MicroBatch], keep_output: Callable) -> Optional[List[Any]]:
        """Forward only; `keep_output(model_output)` of each micro-batch on the last stage (None elsewhere)."""
        records = self.run(micro_batches, forward_only=True, keep_output=keep_output)
        return [r["output"] for r in records] if self.is_last_stage else None
