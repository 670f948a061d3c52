"""Latent shards with synthetic moments, for the train tier without videos: unit tests and the training benchmark.

They follow the real schema and manifest (the end-to-end tests use shards made by `cogvx prep` instead). The
latents share one spatial pattern plus a small per-sample offset, so a LoRA visibly learns them in a few steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from cogvx_dist.core.shard_format import (
    IMAGE_LOGVAR, IMAGE_MEAN, LATENT_LOGVAR, LATENT_MEAN, PROMPT_EMBEDS, Manifest, ShardEntry, encode_sample,
    file_sha256,
)
from cogvx_dist.core.loading import describe_checkpoint
from cogvx_dist.core.families import VAE_SPATIAL_COMPRESSION, VAE_TEMPORAL_COMPRESSION


def write_synthetic_shards(folder: Path, model: Path, shard_sizes: list[int], seed: int = 0) -> Manifest:
    """Shards of samples whose latents share one spatial pattern (what a LoRA can learn quickly) plus a small
    per-sample offset, with a narrow posterior."""
    info = describe_checkpoint(model)
    config = info.transformer_config
    channels, text_dim = config["out_channels"], config["text_embed_dim"]
    latent_frames = (info.frames - 1) // VAE_TEMPORAL_COMPRESSION + 1
    h, w = info.height // VAE_SPATIAL_COMPRESSION, info.width // VAE_SPATIAL_COMPRESSION
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randn(channels, 1, h, w, generator=generator)
    shards, counter = [], 0
    for shard_number, size in enumerate(shard_sizes):
        name = f"shard-r00000-{shard_number:06d}.tar"
        keys = []
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(size):
                key = f"sample{counter:06d}"
                counter += 1
                offset = 0.2 * torch.randn(channels, 1, 1, 1, generator=generator)
                mean = (pattern + offset).expand(channels, latent_frames, h, w).clone()
                tensors = {
                    LATENT_MEAN: mean,
                    LATENT_LOGVAR: torch.full_like(mean, -6.0),
                    PROMPT_EMBEDS: torch.randn(config["max_text_seq_length"], text_dim, generator=generator),
                }
                if info.family.image_to_video:
                    tensors[IMAGE_MEAN] = mean[:, :1].clone()
                    tensors[IMAGE_LOGVAR] = torch.full_like(mean[:, :1], -6.0)
                sink.write(encode_sample(key, tensors, {"prompt": key, "source": f"{key}.mp4"}))
                keys.append(key)
        path = folder / name
        shards.append(ShardEntry(name, size, path.stat().st_size, file_sha256(path), keys))
    manifest = Manifest(
        family=info.family.name, model=str(model), vae_scaling_factor=info.family.vae_scaling_factor,
        invert_scale_latents=info.family.invert_scale_latents, latent_channels=channels, frames=info.frames,
        height=info.height, width=info.width, latent_frames=latent_frames, fps=info.family.fps,
        text_max_length=config["max_text_seq_length"], text_embed_dim=text_dim,
        dtypes={LATENT_MEAN: "float32", LATENT_LOGVAR: "float32", PROMPT_EMBEDS: "float32"},
        shards=shards, image_to_video=info.family.image_to_video,
    )
    manifest.write(folder)
    return manifest
