"""`TrainConfig`: one training run's options, in sections (optimizer, schedule, checkpoints, cluster,
performance, memory), and what they mean for the model and the batches.

Plain data: parsing or validating it changes nothing. Each section checks its own fields; TrainConfig checks
the mixes of sections that cannot run together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app import storage
from app.config import ConfigError, check_choices, from_dict, to_dict
from app.data.loader import BatchPlan
from app.fast.config import PerfConfig
from app.model.gpt import PRESETS, ModelConfig
from app.train.memory_plan import MemoryConfig

Switch = Literal["auto", "true", "false"]


@dataclass
class OptimConfig:
    """The optimizer: AdamW or Muon, gradient clipping, bf16 weights over fp32 masters, a weight average."""

    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' matrices, AdamW on the rest at `lr`
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # decoupled decay of the matrices (not of norms)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    muon_lr: float = 0.02  # peak learning rate of the Muon matrices (same schedule as `lr`)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    grad_clip: float = 1.0  # max global grad norm; 0 = off (sync.mode=onebit: not applied, Adam's update is bounded)
    # bf16 weights and gradients, AdamW on fp32 master copies (app/train/master.py): auto = on CUDA with AdamW, unless
    # memory.fsdp / memory.offload_optimizer (their own mixed precision) or optim.ema_decay (it averages fp32 weights)
    bf16_weights: Switch = "auto"
    ema_decay: float = 0.0  # > 0: keep an average of the weights (app/train/ema.py); evaluation and export use it

    def validate(self) -> None:
        check_choices(self, "optim.")
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ConfigError(f"optim.lr and optim.muon_lr must be > 0, got {self.lr} and {self.muon_lr}")
        if not all(0.0 <= b < 1.0 for b in (self.beta1, self.beta2, self.muon_momentum)):
            raise ConfigError("optim.beta1, optim.beta2 and optim.muon_momentum must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")

    def masters_excluded(self, memory: MemoryConfig) -> bool:
        """Whether these options rule out bf16 weights with fp32 masters under `memory`: Muon, the weight
        average (it averages fp32 weights), FSDP and the CPU optimizer (their own mixed precision)."""
        return self.name != "adamw" or bool(self.ema_decay) or memory.fsdp or memory.offload_optimizer


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: linear warmup, then cosine decay over the run's max_steps."""

    warmup_steps: int = 20  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio

    def validate(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1]")


@dataclass
class CheckpointConfig:
    """Checkpoints: how often, how many are kept, how they are uploaded."""

    every: int = 100  # steps between checkpoints (and one at the end)
    keep: int = 3  # keep the newest K checkpoints
    async_upload: bool = True  # upload checkpoints in the background; training goes on meanwhile
    upload_retries: int = 5  # retries (exponential backoff) of a failed checkpoint upload

    def validate(self) -> None:
        if self.every < 1 or self.keep < 1 or self.upload_retries < 0:
            raise ConfigError(f"ckpt.every and ckpt.keep must be >= 1 and ckpt.upload_retries >= 0, got "
                              f"{self.every}, {self.keep} and {self.upload_retries}")


@dataclass
class ClusterConfig:
    """The Ray Train workers and fault tolerance: restarts on errors, preemption notices, elasticity."""

    num_workers: int = 1  # Ray Train workers (one per GPU on GPU nodes); the most, when elastic
    min_workers: int = 0  # > 0: elastic between min_workers and num_workers, same tokens per step
    resize_check_s: float = 60.0  # elastic: how often to look for room to grow back
    use_gpu: Switch = "auto"  # one GPU per worker: auto = if the Ray cluster has GPUs
    cpus_per_worker: float = 1.0  # CPU resources each worker reserves
    max_failures: int = 3  # worker-group restarts on errors before the run fails
    max_preemptions: int = 100  # restarts after preemption notices and node losses (not counted as failures)
    preemption_grace_s: float = 30.0  # how long Ray lets the other workers run on past a drained node's deadline
    spot_notice: str = "auto"  # poll the AWS spot interruption notice: auto (on EC2) | off | <metadata URL>
    catch_sigterm: bool = True  # SIGTERM means "checkpoint at the next step and stop", not "die now"

    def validate(self) -> None:
        check_choices(self, "cluster.")
        if self.num_workers < 1:
            raise ConfigError(f"cluster.num_workers must be >= 1, got {self.num_workers}")
        if self.min_workers > self.num_workers:
            raise ConfigError(f"cluster.min_workers={self.min_workers} is more than "
                              f"cluster.num_workers={self.num_workers}")
        if self.max_preemptions < 0 or self.preemption_grace_s < 0:
            raise ConfigError(f"cluster.max_preemptions and cluster.preemption_grace_s must be >= 0, got "
                              f"{self.max_preemptions} and {self.preemption_grace_s}")


@dataclass
class SyncConfig:
    """How the workers combine their work (app/train/sync.py): DDP's all-reduce of the gradients, 1-bit Adam,
    or DiLoCo rounds of local steps joined by an outer step (after an optional 1-bit Adam warm start)."""

    mode: Literal["ddp", "onebit", "diloco"] = "ddp"  # ddp: fp32 all-reduce; onebit: 1-bit Adam; diloco: rounds
    inner_steps: int = 50  # diloco: inner steps per round (H), when rounds are not timed
    round_s: float = 0.0  # diloco: > 0 = timed rounds, ending at the first step past this many seconds
    outer_lr: float = 0.7  # diloco: the outer SGD's learning rate
    outer_momentum: float = 0.9  # diloco: the outer SGD's Nesterov momentum
    compress: Literal["none", "int8", "onebit"] = "none"  # diloco: the deltas sent as int8 or 1 bit, error feedback
    refresh_every: int = 64  # onebit: steps between int8 refreshes of the second moment (after 0, 1, 2, 4, ...)
    warmup_steps: int = 0  # diloco: synchronous 1-bit Adam steps before the first round (a warm start)

    def validate(self) -> None:
        check_choices(self, "sync.")
        if (self.inner_steps < 1 or self.refresh_every < 1 or self.warmup_steps < 0 or self.round_s < 0
                or self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1):
            raise ConfigError("sync.inner_steps and sync.refresh_every must be >= 1, sync.warmup_steps and "
                              "sync.round_s >= 0, sync.outer_lr > 0 and sync.outer_momentum in [0, 1)")
        if (self.compress != "none" or self.warmup_steps) and self.mode != "diloco":
            raise ConfigError("sync.compress and sync.warmup_steps are DiLoCo's: only with sync.mode=diloco")


@dataclass
class TrainConfig:
    """A training run: its data, model, batches and length; the optimizer, schedule, checkpoints, workers,
    speed and memory options in sections."""

    data: str = "runs/shards"  # tokenized shards directory (with manifest.json), local or s3://
    index: bool = False  # feed the LMatch retrieval id of every token as an extra input (build_index first)
    storage: str = "runs"  # where runs live (checkpoints, export), local or s3://
    name: str = "spotlm-run"  # run name: the same name continues the same run
    preset: str = "tiny"  # model preset (app.model.gpt.ModelConfig.preset)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. --model.n_layer=4
    seq_len: int = 0  # tokens per sequence; 0 = the model's max_seq_len
    micro_batch: int = 8  # sequences per forward/backward on one worker
    batch_tokens: int = 0  # tokens per optimizer step over all workers; 0 = one micro-batch per worker
    max_steps: int = 200  # optimizer steps in total (a resumed run continues up to this)
    seed: int = 1337  # model init and data order
    resume: bool = False  # continue an existing run (its latest checkpoint)
    export: str = ""  # exported model directory; "" = <storage>/<name>/export; "none" = skip
    eval_every: int = 50  # steps between validation passes; 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per pass; 0 = the whole validation split
    target_val_loss: float = 0.0  # > 0: stop (checkpoint, export) once a validation pass reaches it
    log_every: int = 10  # steps between log lines
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the learning-rate schedule
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # workers and fault tolerance
    perf: PerfConfig = field(default_factory=PerfConfig)  # speed: kernels, FP8, compile, CUDA graph
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # memory: checkpointing, offload, FSDP
    sync: SyncConfig = field(default_factory=SyncConfig)  # how the workers combine their work

    def validate(self) -> None:
        """Each section's own checks, then the mixes of sections that cannot run together."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for k in ("max_steps", "micro_batch", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.eval_tokens < 0:
            raise ConfigError(f"eval_tokens must be >= 0 (0 = the whole split), got {self.eval_tokens}")
        for section in (self.optim, self.schedule, self.ckpt, self.cluster, self.perf, self.memory, self.sync):
            section.validate()
        optim, memory = self.optim, self.memory
        if optim.name == "muon" and (memory.offload_optimizer or memory.fsdp):
            raise ConfigError("optim.name=muon needs whole weight matrices on the GPU: not with "
                              "memory.offload_optimizer or memory.fsdp")
        if optim.ema_decay and (memory.fsdp or memory.offload_optimizer):
            raise ConfigError("optim.ema_decay averages whole fp32 weights on the GPU: not with memory.fsdp or "
                              "memory.offload_optimizer")
        if optim.bf16_weights == "true" and optim.masters_excluded(memory):
            raise ConfigError("optim.bf16_weights=true steps fp32 master weights with AdamW: not with "
                              "optim.name=muon, optim.ema_decay, memory.fsdp or memory.offload_optimizer")
        if self.sync.mode != "ddp" and (memory.fsdp or memory.offload_optimizer):
            raise ConfigError(f"sync.mode={self.sync.mode} needs whole weights and gradients on each worker: not "
                              "with memory.fsdp or memory.offload_optimizer")
        if self.sync.mode == "onebit" and (optim.name != "adamw" or optim.bf16_weights == "true"):
            raise ConfigError("sync.mode=onebit is 1-bit Adam on fp32 weights: only with optim.name=adamw and "
                              "optim.bf16_weights other than true")
        if self.sync.warmup_steps and optim.name != "adamw":
            raise ConfigError("sync.warmup_steps warms AdamW's state with 1-bit Adam: only with optim.name=adamw")
        if self.sync.mode == "diloco" and optim.bf16_weights == "true":
            raise ConfigError("sync.mode=diloco averages fp32 weights: not with optim.bf16_weights=true")

    @property
    def run_dir(self) -> str:
        return storage.join(storage.absolute(self.storage), self.name)

    @property
    def export_dir(self) -> str | None:
        if self.export == "none":
            return None
        return storage.absolute(self.export) if self.export else storage.join(self.run_dir, "export")


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig: the preset, the tokenizer's vocabulary (and its retrieval-match table
    with `index`: vocab_size + 1 rows, the last meaning "no match"), then the overrides."""
    data = to_dict(ModelConfig.preset(cfg.preset, vocab_size=vocab_size, lmatch_vocab=vocab_size + 1 if cfg.index else 0))
    # Derived widths follow an overridden shape (or MLP kind) unless they are overridden too.
    if "d_model" in cfg.model or "mlp" in cfg.model:
        data["ffn_hidden"] = 0
    if "n_head" in cfg.model:
        data["n_kv_head"] = 0
    return from_dict(ModelConfig, {**data, **cfg.model})


def batch_plan(cfg: TrainConfig, seq_len: int, world_size: int) -> BatchPlan:
    """Global batch in sequences from `batch_tokens` (constant whatever the worker count)."""
    global_batch = cfg.batch_tokens // seq_len if cfg.batch_tokens else cfg.micro_batch * world_size
    if cfg.batch_tokens and cfg.batch_tokens % seq_len:
        raise ConfigError(f"batch_tokens={cfg.batch_tokens} is not a multiple of seq_len={seq_len}")
    return BatchPlan(global_batch, cfg.micro_batch, world_size)
