"""The training run's configuration (YAML/TOML file plus `section.key=value` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.lora import LoraSettings


@dataclass
class ModelConfig:
    """Which transformer to adapt and how to run it."""

    path: str = ""
    """Checkpoint: a diffusers-format CogVideoX folder or a hub id (only transformer/ and scheduler/ are read)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype of the frozen weights; bfloat16 on GPUs, float32 allowed on CPU (tests)."""
    gradient_checkpointing: int = 1
    """Recompute activations of every k-th transformer block in backward (1 = every block, 0 = off)."""


@dataclass
class DataConfig:
    """Where the prep shards are and how they are read."""

    shards: str = ""
    """Dataset folder holding manifest.json (exact order and resume), or with `streaming` an http(s) URL of such a
    folder or a `pipe:` command template with {name} (e.g. "pipe:aws s3 cp s3://bucket/set/{name} -")."""
    streaming: bool = False
    """Stream remote shards with WebDataset (shards drawn per rank with replacement); resume is approximate."""
    num_workers: int = 0
    """Background processes reading and decoding samples (0 reads in the training process)."""


@dataclass
class OptimConfig:
    """AdamW with warm-up and a constant or cosine schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor as a fraction of `lr`."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables clipping)."""


@dataclass
class TrainConfig:
    """Batching and length of the run."""

    seed: int = 42
    """Seed for the adapter init, the sample order, noise and timesteps."""
    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 derives it. If set, it must equal
    micro_batch_size * grad_accum_steps * data-parallel ranks."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed side of the run."""

    config: str = "zero2"
    """A name in ds_configs/ (zero1, zero2, zero3, zero2_offload, zero3_offload) or a path to a DeepSpeed JSON."""


@dataclass
class CheckpointConfig:
    """Checkpointing and resuming."""

    every_steps: int = 50
    """Save every this many optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted once a newer one is committed)."""
    resume: str = "auto"
    """"auto" (newest complete checkpoint in output_dir, if any), "none", or a checkpoint folder."""


@dataclass
class LogConfig:
    """Metrics and progress."""

    every_steps: int = 1
    """Log metrics every this many optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under output_dir/tensorboard."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    sample_trace: bool = False
    """Write each rank's sample keys per step to output_dir/trace/ (used to verify ordering and resume)."""


@dataclass
class RunConfig:
    """A whole training run."""

    output_dir: str = "runs/cogvx"
    """Where checkpoints, exported adapters, metrics and the resolved config go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer."""
    data: DataConfig = field(default_factory=DataConfig)
    """The shards."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching and length."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed configuration."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics."""

    def validate(self) -> None:
        """Checks that need no other process and no files beyond the config."""
        if not self.model.path:
            raise CogvxError("model.path is required (a CogVideoX checkpoint folder or hub id)")
        if not self.data.shards:
            raise CogvxError("data.shards is required (the folder `cogvx prep` wrote)")
        self.lora.validate()
        positive = {
            "train.max_steps": self.train.max_steps,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.grad_accum_steps": self.train.grad_accum_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "log.every_steps": self.log.every_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise CogvxError(f"{key} must be at least 1, got {value}")
        if self.model.gradient_checkpointing < 0:
            raise CogvxError("model.gradient_checkpointing must be 0 (off) or k >= 1 (every k-th block)")
        if self.optim.lr <= 0 or self.optim.warmup_steps < 0 or self.optim.max_grad_norm < 0:
            raise CogvxError("optim.lr must be positive; optim.warmup_steps and optim.max_grad_norm non-negative")
        if len(self.optim.betas) != 2:
            raise CogvxError(f"optim.betas must have two values, got {self.optim.betas}")
        if self.data.num_workers < 0:
            raise CogvxError("data.num_workers must be non-negative")

    def check_world(self, data_parallel_size: int) -> int:
        """The global batch size for `data_parallel_size` ranks; rejects an indivisible global_batch_size."""
        derived = self.train.micro_batch_size * self.train.grad_accum_steps * data_parallel_size
        if self.train.global_batch_size and self.train.global_batch_size != derived:
            raise CogvxError(
                f"train.global_batch_size={self.train.global_batch_size} is not micro_batch_size "
                f"({self.train.micro_batch_size}) x grad_accum_steps ({self.train.grad_accum_steps}) x "
                f"{data_parallel_size} ranks = {derived}"
            )
        return derived
