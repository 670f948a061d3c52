"""The training run's configuration (YAML/TOML file plus `section.key=value` overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.lora import LoraSettings
from cogvx_dist.core.storage import check_storage_options
from cogvx_dist.core.units import parse_bytes

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP")
"""Signals a run may take as a request to checkpoint and stop."""


@dataclass
class ModelConfig:
    """Which transformer to adapt and how to run it."""

    path: str = ""
    """Checkpoint: a diffusers-format CogVideoX folder or a hub id (only transformer/ and scheduler/ are read)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype of the frozen weights; bfloat16 on GPUs, float32 allowed on CPU (tests)."""
    gradient_checkpointing: int | Literal["auto"] = 1
    """Recompute activations of every k-th transformer block in backward (1 = every block, 0 = off); "auto": the
    least recomputation the memory planner predicts to fit the GPU (every block where the GPU's memory is unknown)."""
    compile: Literal["off", "blocks"] = "off"
    """"blocks" compiles each transformer block with torch.compile (regional: one compilation per clip size, shared
    by all blocks; recompilations are logged); the first step of each resolution bucket takes the compile time."""
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    """Attention kernel: "auto" is cuDNN on Hopper and newer GPUs, flash on older ones, torch's choice on CPU; a
    named one runs alone (the run stops with one line where it cannot run)."""


@dataclass
class SourceConfig:
    """One dataset of a mixture."""

    shards: str = ""
    """Its folder or URL (as data.shards)."""
    weight: float = 1.0
    """Its share of the samples, relative to the other sources' weights."""
    name: str = ""
    """Name in metrics (samples_seen/NAME); default: the folder's last path part."""


@dataclass
class DataConfig:
    """Where the prep shards are and how they are read."""

    shards: str = ""
    """Dataset folder holding manifest.json, or the URL of one (s3://, gs://, http(s)://: read with ranged reads,
    in the same exact order, with exact resume); with `streaming` an http(s) URL or a `pipe:` command template with
    {name} (e.g. "pipe:aws s3 cp s3://bucket/set/{name} -")."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture instead of data.shards: datasets of the same family and geometry, each drawn with its weight in
    exact quotas per round of 1000 samples, deterministic from the seed and resumed exactly."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Options for the object store's fsspec filesystem (e.g. {"client_kwargs": {"endpoint_url": ...}} for an
    S3-compatible server); credentials are refused here, they come from the environment or the store's profile."""
    streaming: bool = False
    """Stream remote shards with WebDataset (shards drawn per rank with replacement); resume is approximate."""
    num_workers: int | None = None
    """Background processes reading samples and drawing their random numbers (0: the training process does it);
    default: one on a GPU, none on the CPU."""
    verify: Literal["size", "sha256", "none"] = "sha256"
    """How much of the shards to check against the manifest: "size" compares every shard's size at start-up,
    "sha256" also checks each sample's digest as it is read, so shards swapped or replaced by others of the same
    size are caught (about 4 ms per full-size 2b sample on this project's CPU, 0.3% of an H200 step:
    benchmarks/bench_verify.py), "none" neither."""
    on_bad_sample: Literal["fail", "skip"] = "fail"
    """A sample that cannot be read or decoded, fails its digest or holds non-finite values: "fail" stops the run
    naming shard, key and rank; "skip" takes the next readable sample of the dataset in its place (the same on every
    run, so resume stays exact), counts it and records it in bad_samples.jsonl."""
    max_bad_fraction: float = 0.01
    """With on_bad_sample: skip, stop once more than this fraction of the samples read (at least one dataset's
    worth) were bad."""
    eval_shards: str = ""
    """A held-out dataset (a `cogvx prep` folder or its URL, as data.shards) whose loss is logged every
    log.eval_every_steps; the same family and model as the training data."""


@dataclass
class OptimConfig:
    """The optimizer's settings and the learning-rate schedule (warm-up, then constant or cosine). The optimizer is
    the DeepSpeed config's (`deepspeed.config`): AdamW by default, Adam, or another DeepSpeed optimizer such as Muon;
    the run fills the params it takes from here."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam/AdamW betas (optimizer.params.betas)."""
    eps: float = 1e-8
    """Adam/AdamW epsilon (optimizer.params.eps)."""
    weight_decay: float = 1e-4
    """Weight decay (optimizer.params.weight_decay; decoupled under AdamW)."""
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
    """Seed for the adapter init, the sample order, noise and timesteps (0 <= seed < 2**32)."""
    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 derives it (micro_batch_size x grad_accum_steps x data-parallel
    ranks). If set, grad_accum_steps follows the world size: global_batch_size / (micro_batch_size x data-parallel
    ranks), which must be whole; so a restart on more or fewer nodes (elastic training) trains the same batch."""
    micro_batch_tokens: int = 0
    """A token budget per micro-batch; 0: off (every micro-batch holds micro_batch_size samples). When set, a
    micro-batch of a bucket (resolution x frame count) holds max(1, micro_batch_tokens // tokens of one of its
    samples) samples, so short or small clips are batched more per step; micro_batch_size then only counts the run's
    position (samples_seen: micro-batches x micro_batch_size). Each micro-batch's loss is its samples' mean. Needs
    a dataset read in exact order (not data.streaming, not data.sources)."""
    on_nonfinite: Literal["fail", "skip_step"] = "fail"
    """A step whose loss is not finite on any rank: "fail" stops naming the samples and rank; "skip_step" applies no
    update on any rank (DeepSpeed skips it), counts it and goes on."""
    max_nonfinite_steps: int = 3
    """With on_nonfinite: skip_step, stop after this many non-finite steps in a row."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the adapter with this decay per optimizer step (e.g. 0.999), exported
    beside it as lora_ema/ in every checkpoint and at the end; 0: none."""
    caption_dropout: float = 0.0
    """Probability that a sample trains with the empty prompt's embedding instead of its own (what classifier-free
    guidance needs at sampling); drawn from the step's generator, so runs repeat and resume exactly."""


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
    """"auto" (newest complete checkpoint in output_dir whose files match its commit marker, if any), "none", or a
    checkpoint folder (checked before any rank starts)."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that ask the run to checkpoint and stop: agreed by all ranks at the next step boundary, then the
    job exits with code 75 (EX_TEMPFAIL: resume with the same command)."""
    preempt_grace_s: float = 20.0
    """Seconds from the signal within which the checkpoint must commit; past it the rank exits anyway (code 77).
    Keep it below the scheduler's notice (Kubernetes terminationGracePeriodSeconds, Slurm --signal lead time)."""
    every_minutes: float = 0.0
    """Also save once this many minutes have passed since the last save (or the launch), whatever every_steps says:
    bounds the work a lost node costs an elastic run. Rank 0's clock decides, carried in the step's one all-reduce,
    so all ranks save at the same step. 0: off."""

    def validate(self) -> None:
        """every_minutes is a duration or 0."""
        if not self.every_minutes >= 0:
            raise CogvxError(f"checkpoint.every_minutes must be 0 (off) or positive, got {self.every_minutes}")


@dataclass
class DistributedConfig:
    """Process group and progress watching."""

    timeout_s: float = 1800.0
    """Timeout of the process group's collectives (torch.distributed / DeepSpeed)."""
    stall_timeout_s: float = 1800.0
    """End the job when no rank completes a step (or a checkpoint) for this long: every rank that can dumps its
    Python stacks to output_dir/stacks, and the ranks that did not reach the step are named. 0 disables."""
    network_stall_floor_s: float = 180.0
    """The network check: a rank that has completed no step (or checkpoint) for longer than
    max(network_stall_floor_s, network_stall_factor x the slowest step measured in this launch) tries a TCP
    connection to every other host of the job (the address each rank records in output_dir/heartbeats/); if one
    cannot be reached, the job ends with exit 76 naming it, on every host. The slowest step is the longest time
    between two completed steps or checkpoints after the launch's first step (a checkpoint save, with the evaluation
    before it, counts as one), so slow steps and saves widen the bound; before the first step ends the bound is
    this floor. Without a host out of reach only stall_timeout_s ends a wait. 0 disables the check."""
    network_stall_factor: float = 10.0
    """How many of the slowest measured steps a rank waits before the network check (see network_stall_floor_s)."""

    def validate(self) -> None:
        """Each bound is positive, or 0 where 0 means off."""
        if self.timeout_s <= 0 or self.stall_timeout_s < 0:
            raise CogvxError("distributed.timeout_s must be positive and distributed.stall_timeout_s non-negative")
        if self.network_stall_floor_s < 0 or self.network_stall_factor < 0:
            raise CogvxError("distributed.network_stall_floor_s and distributed.network_stall_factor must be "
                             "non-negative (a floor of 0 turns the network check off)")


@dataclass
class ParallelConfig:
    """How the ranks share the work besides data parallelism."""

    sequence_parallel: int = 1
    """Ranks that share each sample's tokens (Ulysses-style sequence parallelism: groups of this many consecutive
    ranks, best inside one node, run one sample together; data parallelism spans the groups). The world size must
    be a multiple of it; 1: off."""


@dataclass
class PlanConfig:
    """The memory check before any rank loads weights (see `cogvx plan`)."""

    check: bool = True
    """Refuse to start when the planner predicts that one rank needs more than its GPU's memory."""
    gpu_memory: str = ""
    """Memory of each rank's GPU, e.g. "40GiB" or "80GB"; empty: the visible GPU's total (no check without a GPU)."""


@dataclass
class LogConfig:
    """Metrics and progress."""

    every_steps: int = 1
    """Log metrics every this many optimizer steps."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 sends what metrics.jsonl records (under the TensorBoard tags, e.g. train/loss) and, except
    TensorBoard, the run config: tensorboard (output_dir/tensorboard), wandb (Weights & Biases, output_dir/wandb,
    see log.wandb_mode), mlflow (MLFLOW_TRACKING_URI, else a SQLite store in output_dir/mlflow). wandb and mlflow
    need `pip install 'cogvx-dist[trackers]'`."""
    tensorboard: bool | None = None
    """The older TensorBoard switch, kept so existing configs mean what they meant: false leaves tensorboard out of
    log.trackers, true adds it; unset (null): log.trackers alone decides."""
    project: str = "cogvx"
    """The wandb project and the MLflow experiment the run is filed under."""
    run_name: str = ""
    """The run's name in wandb and MLflow; empty: the output_dir folder's name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: wandb writes output_dir/wandb/ and nothing else (`wandb sync output_dir/wandb/offline-run-*`
    uploads it later); online: it also streams to the W&B server (rank 0's node needs `wandb login` and network)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    sample_trace: bool = False
    """Write each rank's sample keys per step to output_dir/trace/ (used to verify ordering and resume)."""
    peak_tflops: float = 0.0
    """One GPU's dense bf16 peak in TFLOP/s, for the mfu metric; 0: from the GPU's name (the table in
    train/step/flops.py)."""
    eval_every_steps: int = 0
    """Every this many optimizer steps (and before the first and after the last), all ranks compute the loss on
    the whole of data.eval_shards at fixed timesteps and fixed noise and log eval/loss; 0: never."""
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """The timesteps every held-out sample is evaluated at (eval/loss_tNNN logs each one's mean)."""

    def tracker_names(self) -> list[str]:
        """The trackers in use: log.trackers, each once, with log.tensorboard applied."""
        names = list(dict.fromkeys(self.trackers))
        if self.tensorboard is False and "tensorboard" in names:
            names.remove("tensorboard")
        if self.tensorboard and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        return names


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Collective timeout and the stall watchdog."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sequence parallelism."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """The pre-flight memory check."""

    def validate(self) -> None:
        """Checks that need no other process and no files beyond the config."""
        if not self.model.path:
            raise CogvxError("model.path is required (a CogVideoX checkpoint folder or hub id)")
        if not self.data.shards and not self.data.sources:
            raise CogvxError("data.shards is required (the folder `cogvx prep` wrote), or data.sources for a mixture")
        self.validate_settings()

    def validate_settings(self) -> None:
        """The checks of everything but the model and data locations (`cogvx plan --family` has neither)."""
        self.lora.validate()
        positive = {
            "train.max_steps": self.train.max_steps,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.grad_accum_steps": self.train.grad_accum_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "log.every_steps": self.log.every_steps,
            "parallel.sequence_parallel": self.parallel.sequence_parallel,
        }
        for key, value in positive.items():
            if value < 1:
                raise CogvxError(f"{key} must be at least 1, got {value}")
        if not 0 <= self.train.seed < 2**32:  # the sample order scales it by about 2**20 into a 64-bit seed
            raise CogvxError(f"train.seed must be within [0, 2**32), got {self.train.seed}")
        if self.model.gradient_checkpointing != "auto" and self.model.gradient_checkpointing < 0:
            raise CogvxError("model.gradient_checkpointing must be 0 (off) or k >= 1 (every k-th block)")
        if self.optim.lr <= 0 or self.optim.warmup_steps < 0 or self.optim.max_grad_norm < 0:
            raise CogvxError("optim.lr must be positive; optim.warmup_steps and optim.max_grad_norm non-negative")
        if len(self.optim.betas) != 2:
            raise CogvxError(f"optim.betas must have two values, got {self.optim.betas}")
        check_storage_options(self.data.storage_options, "data.storage_options")
        self._check_sources()
        if self.data.num_workers is not None and self.data.num_workers < 0:
            raise CogvxError("data.num_workers must be non-negative")
        if not 0.0 <= self.data.max_bad_fraction <= 1.0:
            raise CogvxError(f"data.max_bad_fraction must be within [0, 1], got {self.data.max_bad_fraction}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise CogvxError(f"train.ema_decay must be within [0, 1) (0: no average), got {self.train.ema_decay}")
        if not 0.0 <= self.train.caption_dropout <= 1.0:
            raise CogvxError(f"train.caption_dropout must be within [0, 1], got {self.train.caption_dropout}")
        self._check_token_budget()
        if self.train.caption_dropout and self.data.streaming:
            raise CogvxError("train.caption_dropout needs a dataset read in exact order, not data.streaming")
        self._check_evaluation()
        if self.train.max_nonfinite_steps < 1:
            raise CogvxError(f"train.max_nonfinite_steps must be at least 1, got {self.train.max_nonfinite_steps}")
        if self.checkpoint.preempt_grace_s <= 0:
            raise CogvxError(f"checkpoint.preempt_grace_s must be positive, got {self.checkpoint.preempt_grace_s}")
        for name in self.checkpoint.preempt_signals:
            if name not in PREEMPT_SIGNALS:
                raise CogvxError(f"checkpoint.preempt_signals: {name!r} is not one of {', '.join(PREEMPT_SIGNALS)}")
        if self.plan.gpu_memory:
            parse_bytes(self.plan.gpu_memory, "plan.gpu_memory")
        self.distributed.validate()
        self.checkpoint.validate()

    def _check_token_budget(self) -> None:
        budget = self.train.micro_batch_tokens
        if budget < 0:
            raise CogvxError(f"train.micro_batch_tokens must be 0 (off) or positive, got {budget}")
        if budget and (self.data.streaming or self.data.sources):  # their micro-batches are not made of bucket units
            raise CogvxError("train.micro_batch_tokens needs one dataset read in exact order, not "
                             + ("data.streaming" if self.data.streaming else "data.sources (a mixture)"))

    def _check_evaluation(self) -> None:
        if self.log.peak_tflops < 0:
            raise CogvxError(f"log.peak_tflops must be positive (0: from the GPU's name), got {self.log.peak_tflops}")
        if self.log.eval_every_steps < 0:
            raise CogvxError(f"log.eval_every_steps must be 0 (off) or positive, got {self.log.eval_every_steps}")
        if self.log.eval_every_steps and not self.data.eval_shards:
            raise CogvxError("log.eval_every_steps needs data.eval_shards (the held-out dataset)")
        if self.data.eval_shards and not self.log.eval_every_steps:
            raise CogvxError("data.eval_shards is set but log.eval_every_steps is 0: say how often to evaluate")
        if not self.log.eval_timesteps or any(t < 0 for t in self.log.eval_timesteps):
            raise CogvxError(f"log.eval_timesteps must list timesteps >= 0, got {self.log.eval_timesteps}")

    def _check_sources(self) -> None:
        if not self.data.sources:
            return
        if self.data.shards:
            raise CogvxError("data.shards and data.sources exclude each other: one dataset, or a mixture")
        if self.data.streaming:
            raise CogvxError("data.sources cannot be streamed (data.streaming): mixtures read in exact order")
        for number, source in enumerate(self.data.sources):
            if not source.shards:
                raise CogvxError(f"data.sources[{number}].shards is required")
            if not source.weight > 0:
                raise CogvxError(f"data.sources[{number}].weight must be positive, got {source.weight}")
        names = self.source_names()
        twice = sorted(name for name in names if names.count(name) > 1)
        if twice:
            raise CogvxError(f"data.sources: two sources are named {twice[0]!r}; give each a distinct name")

    def source_names(self) -> list[str]:
        """Each mixture source's name in metrics."""
        return [s.name or s.shards.rstrip("/").rsplit("/", 1)[-1] for s in self.data.sources]

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel ranks among `world_size`: one per sequence-parallel group."""
        parts = self.parallel.sequence_parallel
        if world_size % parts:
            raise CogvxError(f"parallel.sequence_parallel {parts} does not divide the {world_size} ranks: the world "
                             f"size must be a multiple of it (groups of {parts} consecutive ranks share a sample)")
        return world_size // parts

    def check_world(self, data_parallel_size: int) -> int:
        """The global batch size for `data_parallel_size` ranks; rejects a global_batch_size no whole number of
        accumulation steps gives."""
        micro = self.train.micro_batch_size
        if self.train.global_batch_size:
            if self.train.global_batch_size % (micro * data_parallel_size):
                raise CogvxError(
                    f"train.global_batch_size={self.train.global_batch_size} is not micro_batch_size ({micro}) x "
                    f"{data_parallel_size} data-parallel ranks x a whole number of grad_accum_steps")
            return self.train.global_batch_size
        return micro * self.train.grad_accum_steps * data_parallel_size

    def at_world(self, world_size: int) -> RunConfig:
        """This config as `world_size` ranks run it: with train.global_batch_size, grad_accum_steps follows."""
        data_ranks = self.data_parallel_size(world_size)
        global_batch = self.check_world(data_ranks)
        if not self.train.global_batch_size:
            return self
        accum = global_batch // (self.train.micro_batch_size * data_ranks)
        return dataclasses.replace(self, train=dataclasses.replace(self.train, grad_accum_steps=accum))
