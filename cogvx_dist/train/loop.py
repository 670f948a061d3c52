"""The training run: set up the rank, then for each step: batch, loss, backward, step, log, maybe save."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.train import checkpoints as ckpt
from cogvx_dist.train import engine as distributed
from cogvx_dist.core.config_files import to_dict
from cogvx_dist.train.reader import BatchPlan, MicroBatches, ShardIndex, check_manifest, make_loader
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.train.streaming import StreamingMicroBatches, is_remote, read_remote_manifest
from cogvx_dist.core.errors import CogvxError, RankError
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.lora import (
    adapter_checksum,
    export_lora,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    state_dict_names,
)
from cogvx_dist.train.metrics import MetricsWriter
from cogvx_dist.core.loading import CheckpointInfo, describe_checkpoint, load_scheduler, load_transformer
from cogvx_dist.core.families import VAE_SPATIAL_COMPRESSION
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.loss import LossContext, diffusion_loss

SUMMARY_FILE = "train_summary.json"
CRASH_AFTER_STEP_ENV = "COGVX_TEST_CRASH_AFTER_STEP"
"""Fault injection for tests: every rank exits hard right after committing the checkpoint of this step."""


@dataclass
class Preflight:
    """Everything checked before any process group exists (so bad input fails fast, with one line)."""

    checkpoint: CheckpointInfo
    manifest: Manifest
    index: ShardIndex | None
    """Random access to local shards; None in streaming mode."""
    ds_config: dict[str, Any]
    """The DeepSpeed config with the run's values filled in."""


def preflight(config: RunConfig) -> Preflight:
    """Check model, shards and their match; no deepspeed, no weights loaded."""
    checkpoint = describe_checkpoint(config.model.path)
    if config.data.streaming != is_remote(config.data.shards):
        raise CogvxError(f"data.streaming={config.data.streaming} does not fit data.shards {config.data.shards!r}: "
                         "streaming reads http(s):// or pipe: locations, a local folder is read with exact order")
    try:
        manifest = read_remote_manifest(config.data.shards) if config.data.streaming else Manifest.read(
            config.data.shards)
    except CogvxError as err:
        raise CogvxError(f"data.shards: {err}") from None
    check_manifest(manifest, checkpoint, where=f"data.shards {config.data.shards}")
    index = None if config.data.streaming else ShardIndex(config.data.shards, manifest)
    if config.train.micro_batch_size > 1 and len(manifest.sizes()) > 1:
        raise CogvxError(f"train.micro_batch_size {config.train.micro_batch_size} needs samples of one size, but the "
                         f"shards hold {len(manifest.sizes())} resolution buckets; use micro_batch_size 1 with "
                         "grad_accum_steps for a larger batch, or prep one bucket per dataset")
    if config.train.micro_batch_size > manifest.num_samples:
        raise CogvxError(f"train.micro_batch_size {config.train.micro_batch_size} exceeds the "
                         f"{manifest.num_samples} samples")
    ds_config = distributed.resolve_ds_config(
        distributed.load_ds_config(config.deepspeed.config),
        micro_batch_size=config.train.micro_batch_size, grad_accum_steps=config.train.grad_accum_steps,
        max_grad_norm=config.optim.max_grad_norm, lr=config.optim.lr, betas=config.optim.betas,
        eps=config.optim.eps, weight_decay=config.optim.weight_decay, bf16=config.model.dtype == "bfloat16",
        on_gpu=torch.cuda.is_available(),
    )
    return Preflight(checkpoint, manifest, index, ds_config)


def _logger(rank: int) -> logging.Logger:
    """Rank 0 logs progress; other ranks log only warnings, each line carrying the rank."""
    logger = logging.getLogger("cogvx.train")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s cogvx {prefix}%(message)s", "%H:%M:%S"))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def forbid_encoders() -> None:
    """Make building a T5 encoder or a CogVideoX VAE in this process an error: they belong to the prep tier."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel

    for cls in (T5EncoderModel, AutoencoderKLCogVideoX):
        if getattr(cls.__init__, "_cogvx_forbidden", False):
            continue
        original = cls.__init__

        @functools.wraps(original)
        def refuse(self: Any, *args: Any, __name: str = cls.__name__, **kwargs: Any) -> None:
            raise RuntimeError(f"a training rank tried to build {__name}; encoders run in the prep tier only")

        refuse._cogvx_forbidden = True  # type: ignore[attr-defined]
        cls.__init__ = refuse


def lr_lambda(config: RunConfig) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step k (warm-up, then constant or cosine)."""
    warmup, total, floor = config.optim.warmup_steps, config.train.max_steps, config.optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _enable_gradient_checkpointing(transformer: torch.nn.Module, every: int) -> None:
    if every == 0:
        return
    transformer.enable_gradient_checkpointing()
    if every == 1:
        return
    blocks = {id(block): i for i, block in enumerate(transformer.transformer_blocks)}
    checkpointed = transformer._gradient_checkpointing_func

    def every_kth(block: torch.nn.Module, *args: Any) -> Any:
        if blocks.get(id(block), 0) % every == 0:
            return checkpointed(block, *args)
        return block(*args)

    transformer._gradient_checkpointing_func = every_kth


def _step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro_step * 101 + rank) % (2**63 - 1)


def _tokens_per_sample(manifest: Manifest, transformer_config: dict[str, Any]) -> int:
    patch, patch_t = transformer_config["patch_size"], transformer_config.get("patch_size_t") or 1
    frames = -(-manifest.latent_frames // patch_t)
    latent_height, latent_width = manifest.height // VAE_SPATIAL_COMPRESSION, manifest.width // VAE_SPATIAL_COMPRESSION
    spatial = (latent_height // patch) * (latent_width // patch)
    return frames * spatial + manifest.text_max_length


def _save(engine: Any, config: RunConfig, ranks: distributed.RankInfo, step: int, position: int,
          names: list[str], family: str) -> None:
    folder = ckpt.checkpoint_folder(config.output_dir, step)
    state = {"step": step, "position": position, "seed": config.train.seed, "world_size": ranks.world_size,
             "rng": "noise, timesteps and order derive from (seed, step, micro-step, rank); no RNG state to restore"}
    distributed.save_checkpoint(engine, folder, state)
    masters = distributed.gather_master_weights(engine, names)
    adapter = state_dict_names(masters)
    checksum = adapter_checksum(adapter)
    if ranks.is_main:
        export_lora(adapter, config.lora, folder / ckpt.LORA_SUBDIR, family)
        ckpt.write_master_weights(folder, masters, {"step": step, "position": position})
    distributed.barrier()
    if ranks.is_main:
        ckpt.commit(folder, {**state, "adapter_checksum": checksum})
        ckpt.prune(config.output_dir, config.checkpoint.keep_last)
    distributed.barrier()


def train(config: RunConfig) -> dict[str, Any]:
    """Run training on this rank (called on every rank by the launcher); returns the run summary."""
    checks = preflight(config)
    forbid_encoders()
    ranks = distributed.init_distributed()
    log = _logger(ranks.rank)
    try:
        return _train(config, ranks, checks, log)
    finally:
        distributed.shutdown()


def _train(config: RunConfig, ranks: distributed.RankInfo, checks: Preflight, log: logging.Logger) -> dict[str, Any]:
    from tqdm import tqdm

    global_batch = config.check_world(ranks.world_size)
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    ds_config = checks.ds_config
    output = Path(config.output_dir)
    if ranks.is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_atomic(output / "run_config.json", json.dumps(to_dict(config), indent=2) + "\n")
        write_atomic(output / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    log.info("%d ranks on %s, %s, ZeRO-%d, global batch %d, %d samples (%s)", ranks.world_size, ranks.device.type,
             config.model.dtype, distributed.zero_stage(ds_config), global_batch, checks.manifest.num_samples,
             checks.checkpoint.family.name)

    transformer = load_transformer(config.model.path, dtype=dtype)
    inject_lora(transformer, config.lora, seed=config.train.seed)
    _enable_gradient_checkpointing(transformer, config.model.gradient_checkpointing)
    lora_names = sorted(lora_parameters(transformer))
    checksums = distributed.all_gather_object(adapter_checksum(lora_state_dict(transformer)))
    if len(set(checksums)) != 1:
        raise RankError(f"LoRA adapters differ across ranks at start-up (checksums {checksums}); "
                         "check that every node runs the same cogvx, torch and peft versions")
    context = LossContext(checks.checkpoint.family, checks.checkpoint.transformer_config,
                          load_scheduler(config.model.path))
    engine = distributed.build_engine(transformer, ds_config, lr_lambda(config))

    start_step, position = 0, 0
    resume_from = ckpt.find_resume_point(config.output_dir, config.checkpoint.resume)
    if resume_from is not None:
        committed = ckpt.read_commit(resume_from)
        start_step, position = int(committed["step"]), int(committed["position"])
        if committed["world_size"] == ranks.world_size:
            distributed.load_checkpoint(engine, resume_from)
        else:
            # DeepSpeed's ZeRO partitions are bound to the world size; our whole-tensor copy of the weights is not.
            log.warning("world size changed (%d -> %d): restoring weights, LR schedule and sample position; "
                        "Adam moments restart from zero", committed["world_size"], ranks.world_size)
            weights, _ = ckpt.read_master_weights(resume_from)
            distributed.restore_master_weights(engine, weights, start_step)
        log.info("resumed from %s: step %d, sample position %d (saved with %d ranks, now %d)", resume_from,
                 start_step, position, committed["world_size"], ranks.world_size)
    if start_step >= config.train.max_steps:
        log.info("nothing to do: step %d >= train.max_steps %d", start_step, config.train.max_steps)

    plan = BatchPlan(config.train.micro_batch_size, config.train.grad_accum_steps, ranks.rank, ranks.world_size)
    steps_left = max(0, config.train.max_steps - start_step)
    if checks.index is not None:
        batches = MicroBatches(checks.index, plan, config.train.seed, position, steps_left)
    else:
        batches = StreamingMicroBatches(config.data.shards, checks.manifest, config.train.micro_batch_size,
                                        config.train.seed, ranks.rank, start_step)
    loader = iter(make_loader(batches, config.data.num_workers))
    metrics = MetricsWriter(output, enabled=ranks.is_main, tensorboard=config.log.tensorboard)
    trace = None
    if config.log.sample_trace:
        (output / "trace").mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        trace = open(output / "trace" / f"rank-{ranks.rank:05d}.jsonl", "a", buffering=1)  # lines survive a crash
    tokens_per_sample = _tokens_per_sample(checks.manifest, checks.checkpoint.transformer_config)
    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))
    progress = tqdm(total=config.train.max_steps, initial=start_step, desc="train", unit="step",
                    disable=not (ranks.is_main and config.log.progress_bar), dynamic_ncols=True)
    window_start, window_wait, window_steps, window_loss = time.perf_counter(), 0.0, 0, 0.0
    engine.train()
    for step in range(start_step + 1, config.train.max_steps + 1):
        step_loss = 0.0
        step_lr = engine.get_lr()[0]  # the rate this step's update uses
        for micro_step in range(config.train.grad_accum_steps):
            wait_start = time.perf_counter()
            batch = next(loader)
            window_wait += time.perf_counter() - wait_start
            if trace is not None:
                trace.write(json.dumps({"step": step, "micro_step": micro_step, "keys": batch["keys"]}) + "\n")
            generator = torch.Generator().manual_seed(_step_seed(config.train.seed, step, micro_step, ranks.rank))
            loss = diffusion_loss(engine, batch, context, generator, ranks.device, dtype)
            mean_loss = distributed.all_reduce_mean(loss.detach()).item()
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise CogvxError(f"non-finite loss at step {step}; the last complete checkpoint is intact")
            engine.backward(loss)
            engine.step()
            step_loss += mean_loss / config.train.grad_accum_steps
        position += global_batch
        window_steps += 1
        window_loss += step_loss
        progress.update(1)
        if step % config.log.every_steps == 0 or step == config.train.max_steps:
            elapsed = time.perf_counter() - window_start
            samples_per_s = window_steps * global_batch / elapsed
            grad_norm = engine.get_global_grad_norm()
            values = {
                "loss": window_loss / window_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "lr": step_lr,
                "samples_per_s": samples_per_s,
                "tokens_per_s": samples_per_s * tokens_per_sample,
                "step_time_s": elapsed / window_steps,
                "data_wait_s": window_wait / window_steps,
                "peak_memory_gib": distributed.peak_memory_bytes(ranks.device) / 2**30,
                "samples_seen": position,
            }
            metrics.log(step, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{samples_per_s:.2f}")
            window_start, window_wait, window_steps, window_loss = time.perf_counter(), 0.0, 0, 0.0
        if step % config.checkpoint.every_steps == 0 or step == config.train.max_steps:
            _save(engine, config, ranks, step, position, lora_names, checks.checkpoint.family.name)
            if crash_after and step == crash_after:
                os._exit(75)
    progress.close()
    metrics.close()
    if trace is not None:
        trace.close()

    final = state_dict_names(distributed.gather_master_weights(engine, lora_names))
    final_checksums = distributed.all_gather_object(adapter_checksum(final))
    if len(set(final_checksums)) != 1:
        raise RankError(f"adapters differ across ranks after training: {final_checksums}")
    summary = {
        "steps": config.train.max_steps,
        "resumed_from_step": start_step,
        "samples_seen": position,
        "world_size": ranks.world_size,
        "zero_stage": distributed.zero_stage(ds_config),
        "adapter_checksums": final_checksums,
        "family": checks.checkpoint.family.name,
    }
    if ranks.is_main:
        export_lora(final, config.lora, output / ckpt.LORA_SUBDIR, checks.checkpoint.family.name)
        write_atomic(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        log.info("done: %d steps, adapter %s, exported to %s", config.train.max_steps, final_checksums[0][:12],
                 output / ckpt.LORA_SUBDIR)
    return summary
