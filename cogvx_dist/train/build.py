"""What a rank trains with, built once before the first step: the transformer with identical adapters on every rank
(checked), the loss context, the attention kernels, the DeepSpeed engine, the adapter average and the held-out loss."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from cogvx_dist.core.errors import RankError
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.loading import load_scheduler
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.lora import adapter_checksum, lora_parameters, lora_state_dict
from cogvx_dist.train import engine
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.ema import AdapterEMA
from cogvx_dist.train.evaluation import HeldOutLoss
from cogvx_dist.train.preflight import Preflight
from cogvx_dist.train.schedule import lr_lambda
from cogvx_dist.train.step.loss import LossContext
from cogvx_dist.train.step.model import attention_kernels, build_model, check_attention, choose_attention
from cogvx_dist.train.step.sequence_parallel import enable_sequence_parallel


@dataclass
class TrainingParts:
    """One rank's model and everything the step computes with."""

    engine: engine.Engine
    """The transformer with its adapter, wrapped by DeepSpeed."""
    lora_names: list[str]
    """The adapter's parameter names, sorted: the order of every gather and of the average's chunks."""
    initial_checksum: str
    """The adapter's checksum before the first update (the same on every rank)."""
    context: LossContext
    """What the loss needs besides the batch: family, transformer config, scheduler, sequence parallelism."""
    attention_name: str
    """The attention kernels in use, as the log and the metrics name them."""
    attention: Callable[[], AbstractContextManager]
    """Enters the chosen attention kernels (forward and backward)."""
    ema: AdapterEMA | None
    """This rank's chunk of the adapter average (train.ema_decay), or None."""
    held_out: HeldOutLoss | None
    """The held-out loss (data.eval_shards), or None."""


@dataclass
class DataRank:
    """Which share of the data a rank reads and draws randomness for."""

    rank: int
    """The reader's and the random draws' rank: ranks sharing a sample's tokens read and draw alike."""
    size: int
    """The number of such ranks."""
    reports_samples: bool
    """This rank speaks for its sequence-parallel group about the samples it read (bad ones, held-out counts)."""


def build_parts(config: RunConfig, checks: Preflight, ranks: RankInfo, data: DataRank,
                sequence_groups: engine.SequenceGroups | None, device: torch.device,
                dtype: torch.dtype) -> TrainingParts:
    """Collective: the model with identical adapters on every rank (checked), the loss context, the engine."""
    log = rank_logger("cogvx.train", ranks.rank)
    transformer = build_model(config.model.path, config.model.dtype, config.lora, config.train.seed,
                              config.model.gradient_checkpointing, checks.initial_adapter,
                              compile_blocks=config.model.compile == "blocks")
    sequence = None
    if sequence_groups is not None:
        sequence = enable_sequence_parallel(transformer, sequence_groups.group, sequence_groups.parts,
                                            sequence_groups.index)
    adapter = lora_parameters(transformer)
    ema = None
    if config.train.ema_decay:  # the shapes now: ZeRO-3 leaves empty placeholders once it partitions
        ema = AdapterEMA(config.train.ema_decay, {name: p.shape for name, p in adapter.items()}, ranks.rank,
                         ranks.world_size)
    checksums = engine.all_gather_object(adapter_checksum(lora_state_dict(transformer)))
    if len(set(checksums)) != 1:
        raise RankError(f"LoRA adapters differ across ranks at start-up (checksums {checksums}); "
                        "check that every node runs the same cogvx, torch and peft versions")
    initial = checks.initial_adapter
    if initial is not None:
        rescaled = (f", B scaled by {initial.settings.alpha / config.lora.alpha:g} from its lora_alpha "
                    f"{initial.settings.alpha:g}" if initial.settings.alpha != config.lora.alpha else "")
        log.info("adapter starts from %s (rank %d%s)", initial.file, initial.settings.rank, rescaled)
    context = LossContext(checks.checkpoint.family, checks.checkpoint.transformer_config,
                          load_scheduler(config.model.path), sequence)
    on_gpu = device.type == "cuda"
    attention_name, kernels = choose_attention(
        config.model.attention_backend, device.type, torch.cuda.get_device_capability(device) if on_gpu else None,
        on_gpu and torch.backends.cudnn.is_available())
    check_attention(config.model.attention_backend, kernels, device, dtype,
                    checks.checkpoint.transformer_config["attention_head_dim"])
    log.info("attention: %s", attention_name)
    wrapped = engine.Engine(transformer, checks.ds_config, lr_lambda(config.optim, config.train.max_steps),
                            sequence_groups)
    held_out = None
    if checks.eval_index is not None:
        held_out = HeldOutLoss(checks.eval_index, config.log.eval_timesteps, config.train.seed, data.rank, data.size,
                               counts_samples=data.reports_samples)
    return TrainingParts(wrapped, sorted(adapter), checksums[0], context, attention_name,
                         lambda: attention_kernels(kernels), ema, held_out)
