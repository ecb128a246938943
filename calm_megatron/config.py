"""One typed configuration tree for every stage of calm-megatron.

A run is described by a YAML file plus ``section.key=value`` overrides. Both are merged onto the
dataclass schema below with OmegaConf in struct mode, so an unknown key or a wrong type is an error
that names the section and lists its valid keys. :func:`validate` then checks the cross-field rules
(world size, divisibility, tokenizer and shard agreement) before any process group exists.

Secrets (S3 keys, the W&B API key) never live here: they come from the environment only, so the
saved config cannot leak them.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

STAGES = ("ae", "calm", "ar")


class ConfigError(ValueError):
    """A configuration problem found before any heavy work starts."""


RANDOM_AUTOENCODER = "random"  # model.autoencoder_checkpoint value: a random frozen AE (benchmarks)


@dataclass
class RunConfig:
    """What is trained and where its outputs go."""
    stage: str = "ae"  # ae (chunk autoencoder) | calm (energy Transformer) | ar (baseline)
    name: str = "run"  # run name: outputs go to <out_dir>, logs and W&B use it
    out_dir: str = ""  # defaults to runs/<name>
    seed: int = 1234


@dataclass
class AutoencoderConfig:
    """The chunk autoencoder of calm-spec section 1."""
    vocab_size: int = 128257
    chunk_size: int = 4  # K tokens per chunk
    hidden_size: int = 512
    intermediate_size: int = 1280
    latent_size: int = 128  # l
    num_encoder_layers: int = 2  # AELayers: half before the squeeze, half after
    num_decoder_layers: int = 2
    kl_weight: float = 1e-3  # beta of the KL term
    kl_clamp: float = 0.5  # lambda_KL of the free-bits clip
    dropout: float = 0.15  # DropToken and DropLatent rate (one knob, as in the reference code)
    mask_token_id: int = 0  # DropToken replaces a masked id with this id (reference: 0)
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    variational: bool = True  # False: deterministic AE (z = mu)


@dataclass
class ModelConfig:
    """The Transformer backbone of CALM and of the autoregressive baseline."""
    vocab_size: int = 128257
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_attention_heads: int = 16
    num_query_groups: int = 0  # GQA groups; 0 means full MHA (= heads)
    max_position_embeddings: int = 2048  # in backbone positions (chunks for CALM)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    # CALM only
    chunk_size: int = 4
    latent_size: int = 128
    head_blocks: int = 4  # residual MLP blocks of the energy head
    noise_size: int = 64
    num_samples: int = 8  # N model samples per position
    num_targets: int = 100  # M posterior targets per position
    energy_alpha: float = 1.0  # exponent of the energy score, in (0, 2)
    # Stage-1 checkpoint (directory) whose AE is frozen inside CALM; RANDOM_AUTOENCODER builds a random
    # one of the `autoencoder` section instead (benchmarks: same cost, nothing worth learning).
    autoencoder_checkpoint: str = ""


@dataclass
class ParallelConfig:
    """Parallel layout. world size must equal tp * pp * dp."""
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: whatever the world size leaves
    zero_stage: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full


@dataclass
class TrainConfig:
    """The training loop."""
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per rank per micro-batch
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    seq_len: int = 2048  # tokens per sequence
    precision: str = "fp32"  # fp32 | bf16
    log_interval: int = 10
    eval_interval: int = 0  # 0: only at the end
    eval_batches: int = 8  # held-out batches per rank at each eval; 0: the whole held-out set
    eval_at_start: bool = False  # also evaluate the initial model (e.g. BrierLM at init)
    progress_bar: bool = True
    exit_after_minutes: float = 0.0  # wall-time budget: save and exit with the requeue code; 0: none
    peak_tflops: float = 0.0  # per-device peak for the logged MFU; 0: known GPUs from their name, else no MFU


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    min_lr: float = 0.0  # floor of the cosine schedule
    schedule: str = "constant"  # constant | cosine (both after a linear warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.1  # not applied to biases and norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class DataConfig:
    """Tokenizer and token shards (local folders or s3://bucket/prefix; S3 endpoint and credentials come from
    S3_ENDPOINT_URL and the AWS_* environment variables only, never from this file)."""
    tokenizer: str = ""  # sentencepiece .model or HF tokenizer.json
    train: str = ""  # MDS shard folder(s) written by tools/prepare_data.py; a comma-separated list is a mixture
    train_weights: List[float] = field(default_factory=list)  # relative weight per train folder; []: natural sizes
    valid: str = ""  # held-out MDS shard folder
    cache_dir: str = ""  # node-local cache of streamed shards, reused across restarts; "": a private temp folder
    cache_limit: str = ""  # e.g. "200gb": evict least recently used shards beyond it; "": no limit
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    download_retry: int = 8  # attempts per shard file (backoff 0.5-4 s: rides out a store down for ~20 s)
    timeout_s: float = 120.0  # a batch that takes longer is an error (resumable), never a hang
    shuffle: bool = True


@dataclass
class CheckpointConfig:
    """Where checkpoints go and which one is loaded."""
    save: str = ""  # defaults to <out_dir>/checkpoints
    interval: int = 0  # steps between checkpoints; 0: only the final one
    load: str = ""  # a specific step (or run) to load instead of <save>/latest
    finetune: bool = False  # with load: weights only, start at step 0 with fresh optimizer and data
    keep_last: int = 3  # complete steps kept on disk (older ones pruned after a new one is complete)


@dataclass
class LoggingConfig:
    """Console and Weights & Biases logging. WANDB_MODE / WANDB_API_KEY come from the environment."""
    wandb_project: str = "calm-megatron"
    wandb_mode: str = "offline"  # offline | online | disabled; the WANDB_MODE env var wins
    log_memory: bool = True


@dataclass
class Config:
    """The whole configuration of one run."""
    run: RunConfig = field(default_factory=RunConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def out_dir(self) -> str:
        return self.run.out_dir or os.path.join("runs", self.run.name)

    @property
    def save_dir(self) -> str:
        return self.checkpoint.save or os.path.join(self.out_dir, "checkpoints")


# --------------------------------------------------------------------------- loading

def _section_class(path: List[str]):
    cls: Any = Config
    for name in path:
        spec = {f.name: f for f in fields(cls)}.get(name)
        if spec is None or spec.default_factory is MISSING:
            return None
        cls = spec.default_factory
    return cls


def _valid_keys(path: List[str]) -> List[str]:
    cls = _section_class(path)
    return [f.name for f in fields(cls)] if cls is not None else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = str(getattr(err, "full_key", "") or "")
    parts = key.split(".") if key else []
    if isinstance(err, ConfigKeyError):
        section = parts[:-1]
        where = ".".join(section) or "top level"
        return ConfigError(f"{source}: unknown config key '{key}'; valid keys of {where}: "
                           f"{', '.join(_valid_keys(section))}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]}")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML file; a top-level ``base: other.yaml`` (relative to the file) is merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml(path.parent / base, seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(parent, data))  # type: ignore[return-value]


def load(config_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Build a :class:`Config` from a YAML file and ``section.key=value`` overrides (strict keys)."""
    merged: DictConfig = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    if config_path:
        try:
            merged = OmegaConf.merge(merged, _read_yaml(Path(config_path)))
        except OmegaConfBaseException as err:
            raise _explain(err, str(config_path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what is printed and saved with a run; holds no secrets)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Rebuild a config saved with :func:`to_dict` (strict keys, as :func:`load`)."""
    merged = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    try:
        merged = OmegaConf.merge(merged, data)
    except OmegaConfBaseException as err:
        raise _explain(err, "saved config") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(value: str, allowed: tuple, key: str) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}")


def resolve_dp(cfg: Config, world_size: int) -> int:
    """The data-parallel size for a world size; errors when tp * pp * dp != world size."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp
    _check(p.tp >= 1 and p.pp >= 1, f"parallel.tp={p.tp} and parallel.pp={p.pp} must be >= 1")
    _check(world_size % model_parallel == 0,
           f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {p.tp}*{p.pp}")
    dp = p.dp or world_size // model_parallel
    _check(p.tp * p.pp * dp == world_size,
           f"world size {world_size} != parallel.tp * parallel.pp * parallel.dp = {p.tp}*{p.pp}*{dp}")
    return dp


def _validate_sections(cfg: Config) -> None:
    _one_of(cfg.run.stage, STAGES, "run.stage")
    _one_of(cfg.train.precision, ("fp32", "bf16"), "train.precision")
    _one_of(cfg.optim.optimizer, ("adamw", "sgd"), "optim.optimizer")
    _one_of(cfg.optim.schedule, ("constant", "cosine"), "optim.schedule")
    _one_of(cfg.parallel.recompute, ("none", "selective", "full"), "parallel.recompute")
    _one_of(cfg.logging.wandb_mode, ("offline", "online", "disabled"), "logging.wandb_mode")
    _check(cfg.parallel.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={cfg.parallel.zero_stage} not in 0..3")
    _check(not (cfg.parallel.pp > 1 and cfg.parallel.zero_stage > 1),
           f"parallel.zero_stage={cfg.parallel.zero_stage} with parallel.pp={cfg.parallel.pp}: DeepSpeed "
           "supports only ZeRO stage 0 or 1 under pipeline parallelism")
    _check(not (cfg.parallel.pp > 1 and cfg.parallel.zero_stage == 0 and cfg.train.precision == "bf16"),
           f"parallel.zero_stage=0 with train.precision=bf16 and parallel.pp={cfg.parallel.pp}: DeepSpeed's bf16 "
           "optimizer does not accumulate the gradients of a pipeline schedule correctly; use parallel.zero_stage=1")
    _check(cfg.train.steps >= 1, f"train.steps={cfg.train.steps} must be >= 1")
    _check(cfg.train.micro_batch_size >= 1, f"train.micro_batch_size={cfg.train.micro_batch_size} must be >= 1")
    _check(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    _check(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0")
    ae = cfg.autoencoder
    _check(ae.chunk_size >= 1, f"autoencoder.chunk_size={ae.chunk_size} must be >= 1")
    _check(0.0 <= ae.dropout < 1.0, f"autoencoder.dropout={ae.dropout} must be in [0, 1)")
    _check(ae.num_encoder_layers % 2 == 0 and ae.num_decoder_layers % 2 == 0,
           f"autoencoder.num_encoder_layers={ae.num_encoder_layers} and num_decoder_layers="
           f"{ae.num_decoder_layers} must be even (half before, half after the squeeze/expand)")
    K = chunk_size(cfg)
    _check(cfg.train.seq_len % K == 0,
           f"train.seq_len={cfg.train.seq_len} is not a multiple of the chunk size K={K}")
    if cfg.run.stage != "ae":
        m = cfg.model
        groups = m.num_query_groups or m.num_attention_heads
        _check(m.hidden_size % m.num_attention_heads == 0,
               f"model.hidden_size={m.hidden_size} not divisible by model.num_attention_heads={m.num_attention_heads}")
        _check(m.num_attention_heads % groups == 0,
               f"model.num_attention_heads={m.num_attention_heads} not divisible by model.num_query_groups={groups}")
        _check(0 < m.energy_alpha < 2, f"model.energy_alpha={m.energy_alpha} must be in (0, 2)")


def _validate_parallel(cfg: Config) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if cfg.run.stage == "ae":
        ae = cfg.autoencoder
        _check(ae.intermediate_size % tp == 0,
               f"autoencoder.intermediate_size={ae.intermediate_size} not divisible by parallel.tp={tp}")
        _check(pp == 1, f"parallel.pp={pp}: the autoencoder has no attention and is not pipelined; use pp=1")
        return
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    _check(m.num_attention_heads % tp == 0,
           f"model.num_attention_heads={m.num_attention_heads} not divisible by parallel.tp={tp}")
    _check(groups % tp == 0, f"model.num_query_groups={groups} not divisible by parallel.tp={tp}")
    _check(m.intermediate_size % tp == 0,
           f"model.intermediate_size={m.intermediate_size} not divisible by parallel.tp={tp}")
    _check(m.num_layers % pp == 0, f"model.num_layers={m.num_layers} not divisible by parallel.pp={pp}")


def _validate_batch(cfg: Config, dp: int) -> None:
    t = cfg.train
    per_step = t.micro_batch_size * dp
    _check(t.global_batch_size % per_step == 0,
           f"train.global_batch_size={t.global_batch_size} is not a multiple of "
           f"train.micro_batch_size * dp = {t.micro_batch_size}*{dp}")


def chunk_size(cfg: Config) -> int:
    """K of this run: the autoencoder's for stage ae, the model's otherwise."""
    return cfg.autoencoder.chunk_size if cfg.run.stage == "ae" else cfg.model.chunk_size


def model_vocab_size(cfg: Config) -> int:
    return cfg.autoencoder.vocab_size if cfg.run.stage == "ae" else cfg.model.vocab_size


def _validate_data(cfg: Config) -> None:
    from calm_megatron.data.tokenizer import tokenizer_vocab_size  # lazy: keeps config import light
    from calm_megatron.data.shards import check_shard_index

    vocab = model_vocab_size(cfg)
    section = "autoencoder" if cfg.run.stage == "ae" else "model"
    if cfg.data.tokenizer:
        _check(os.path.exists(cfg.data.tokenizer), f"data.tokenizer: file not found: {cfg.data.tokenizer}")
        tok_vocab = tokenizer_vocab_size(cfg.data.tokenizer)
        _check(tok_vocab == vocab, f"tokenizer {cfg.data.tokenizer} has vocab size {tok_vocab} but "
                                   f"{section}.vocab_size={vocab}")
    for key in ("train", "valid"):
        path = getattr(cfg.data, key)
        if path:
            try:
                check_shard_index(path, stage=cfg.run.stage, chunk_size=chunk_size(cfg), vocab_size=vocab,
                                  seq_len=cfg.train.seq_len, tokenizer=cfg.data.tokenizer or None)
            except ValueError as err:
                raise ConfigError(f"data.{key}: {err}") from None


def autoencoder_mismatches(model: ModelConfig, autoencoder: Dict[str, Any], where: str) -> List[str]:
    """What keeps a frozen autoencoder (its config as a dict) from fitting a CALM: K, latent size, vocab."""
    return [f"model.{key}={getattr(model, key)} but {where}{key}={autoencoder.get(key)}"
            for key in ("chunk_size", "latent_size", "vocab_size") if getattr(model, key) != autoencoder.get(key)]


def _validate_autoencoder_checkpoint(cfg: Config) -> None:
    """Stage 2 needs a stage-1 checkpoint whose K, latent size and vocab match the model section."""
    from calm_megatron.training.checkpoint import AE_CONFIG, CheckpointError, resolve_step

    path = cfg.model.autoencoder_checkpoint
    _check(bool(path), "model.autoencoder_checkpoint is empty: CALM needs a stage-1 (autoencoder) run or step")
    if path == RANDOM_AUTOENCODER:
        problems = autoencoder_mismatches(cfg.model, vars(cfg.autoencoder), "autoencoder.")
        _check(not problems, "; ".join(problems) +
               f" (model.autoencoder_checkpoint={RANDOM_AUTOENCODER} builds the autoencoder section)")
        return
    try:
        step = resolve_step(path)
    except CheckpointError as err:
        raise ConfigError(f"model.autoencoder_checkpoint: {err}") from None
    meta = step / AE_CONFIG
    _check(meta.is_file(), f"model.autoencoder_checkpoint={path}: {step} holds no {AE_CONFIG} (not a stage-1 run)")
    problems = autoencoder_mismatches(cfg.model, json.loads(meta.read_text()), f"the autoencoder at {step} has ")
    _check(not problems, "; ".join(problems))


def validate(cfg: Config, world_size: int, check_files: bool = True) -> int:
    """Check every cross-field rule; returns the data-parallel size. Runs before any process group."""
    _validate_sections(cfg)
    dp = resolve_dp(cfg, world_size)
    _validate_parallel(cfg)
    _validate_batch(cfg, dp)
    if check_files:
        _validate_data(cfg)
        if cfg.run.stage == "calm":
            _validate_autoencoder_checkpoint(cfg)
    return dp


def grad_accum_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def to_deepspeed(cfg: Config, dp: int) -> dict:
    """The DeepSpeed config dict, derived from this config (never a second hand-kept file)."""
    pipelined = cfg.parallel.pp > 1
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        # Under a Megatron pipeline schedule the schedule owns micro-batching: one step per global batch.
        "gradient_accumulation_steps": 1 if pipelined else grad_accum_steps(cfg, dp),
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "dump_state": False,
        # torch SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it works (tests compare it).
        "zero_allow_untested_optimizer": cfg.optim.optimizer == "sgd",
    }
    if pipelined:
        ds["train_batch_size"] = cfg.train.micro_batch_size * dp
        # A top-level key in DeepSpeed 0.19.8 (under zero_optimization it is silently ignored).
        ds["managed_gradient_accumulation"] = False
    else:
        ds["train_batch_size"] = cfg.train.global_batch_size
    return ds


def save(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (no secrets are in it by construction)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=1)
