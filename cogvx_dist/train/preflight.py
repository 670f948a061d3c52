"""Pre-flight: everything checked before any process group exists or any weight loads, so that a bad run fails on
one node with one line (`cogvx train` and `cogvx launch check` run it before starting ranks, and each rank again)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import SIZE_MULTIPLE
from cogvx_dist.core.loading import CheckpointInfo, describe_checkpoint
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.train import ds_config
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.reader import ShardIndex
from cogvx_dist.train.streaming import is_remote, read_remote_manifest


@dataclass
class Preflight:
    """What the checks found, for the ranks to use."""

    checkpoint: CheckpointInfo
    manifest: Manifest
    index: ShardIndex | None
    """Random access to local shards; None in streaming mode."""
    ds_config: dict[str, Any]
    """The DeepSpeed config with the run's values filled in."""


def preflight(config: RunConfig) -> Preflight:
    """Check model, shards and their match, and resolve the DeepSpeed config; no deepspeed, no weights loaded."""
    import torch

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
    values = ds_config.run_values(
        micro_batch_size=config.train.micro_batch_size, grad_accum_steps=config.train.grad_accum_steps,
        max_grad_norm=config.optim.max_grad_norm, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay, bf16=config.model.dtype == "bfloat16")
    resolved = ds_config.resolve_ds_config(ds_config.load_ds_config(config.deepspeed.config), values,
                                           on_gpu=torch.cuda.is_available())
    return Preflight(checkpoint, manifest, index, resolved)


def check_manifest(manifest: Manifest, checkpoint: CheckpointInfo, where: str) -> None:
    """Refuse shards made for another family, VAE, text encoder or resolution, saying what differs."""
    family = checkpoint.family
    config = checkpoint.transformer_config
    problems = []
    if manifest.family != family.name:
        problems.append(f"family {manifest.family} (model is {family.name})")
    if abs(manifest.vae_scaling_factor - family.vae_scaling_factor) > 1e-6:
        problems.append(f"VAE scaling factor {manifest.vae_scaling_factor} (model family uses "
                        f"{family.vae_scaling_factor})")
    if manifest.invert_scale_latents != family.invert_scale_latents:
        problems.append(f"invert_scale_latents {manifest.invert_scale_latents} (family: {family.invert_scale_latents})")
    if manifest.latent_channels != config.get("out_channels", 16):
        problems.append(f"{manifest.latent_channels} latent channels (transformer: {config.get('out_channels')})")
    if manifest.text_embed_dim != config.get("text_embed_dim"):
        problems.append(f"text embedding width {manifest.text_embed_dim} (transformer: {config.get('text_embed_dim')})")
    if manifest.text_max_length != config.get("max_text_seq_length", family.text_max_length):
        problems.append(f"text length {manifest.text_max_length} (transformer: {config.get('max_text_seq_length')})")
    for height, width in manifest.sizes():
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            problems.append(f"resolution {height}x{width} (must be a multiple of {SIZE_MULTIPLE})")
        if family.use_learned_positional_embeddings:
            expected = family.native_pixel_size(config)
            if (height, width) != expected:
                problems.append(f"resolution {height}x{width} (learned positions fix {expected[0]}x{expected[1]})")
    if manifest.image_to_video != family.image_to_video:
        problems.append("image conditioning " + ("present" if manifest.image_to_video else "absent")
                        + f" (family {family.name} " + ("needs it)" if family.image_to_video else "has none)"))
    if problems:
        raise CogvxError(f"{where}: shards do not match the model: " + "; ".join(problems))
