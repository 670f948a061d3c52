"""Latent shards with synthetic moments, for the train tier without videos: unit tests and the training benchmark.

They follow the real shard format and manifest (the end-to-end tests use shards made by `cogvx prep` instead). The
latents share one spatial pattern plus a small per-sample offset, so a LoRA visibly learns them in a few steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from cogvx_dist.core import shard_format
from cogvx_dist.core.loading import describe_checkpoint
from cogvx_dist.core.shard_format import Manifest, ShardEntry


def write_synthetic_shards(folder: Path, model: Path, shard_sizes: list[int], seed: int = 0,
                           image_noise_samples: int = 0,
                           geometries: list[tuple[int, int, int]] | None = None) -> Manifest:
    """Shards of samples whose latents share one spatial pattern (what a LoRA can learn quickly) plus a small
    per-sample offset, with a narrow posterior (image-to-video families: with `image_noise_samples` noised copies
    of the first frame's moments). Sample i has the checkpoint's geometry, or the (frames, height, width) of
    `geometries[i % len(geometries)]` (frame and resolution buckets, as prep lists them)."""
    info = describe_checkpoint(model)
    family, config = info.family, info.transformer_config
    geometries = geometries or [(info.frames, info.height, info.width)]
    sizes = list(dict.fromkeys((height, width) for _, height, width in geometries))
    frame_counts = sorted({frames for frames, _, _ in geometries}, reverse=True)
    header = shard_format.manifest_header(
        family, str(model), vae_scaling_factor=family.vae_scaling_factor, latent_channels=config["out_channels"],
        text_embed_dim=config["text_embed_dim"], frames=frame_counts[0], buckets=sizes,
        fps=family.fps, storage_dtype="float32", image_noise_samples=image_noise_samples, frame_counts=frame_counts)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    patterns = {size: torch.randn(config["out_channels"], 1, *family.latent_size(*size), generator=generator)
                for size in sizes}
    shards, counter = [], 0
    for shard_number, size in enumerate(shard_sizes):
        path = folder / shard_format.shard_name(0, shard_number)
        keys, digests = [], []
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                key = f"sample{counter:06d}"
                frames, height, width = geometries[counter % len(geometries)]
                counter += 1
                pattern = patterns[height, width]
                offset = 0.2 * torch.randn(pattern.shape[0], 1, 1, 1, generator=generator)
                mean = (pattern + offset).expand(-1, family.latent_frames(frames), -1, -1).clone()
                tensors = {
                    shard_format.LATENT_MEAN: mean,
                    shard_format.LATENT_LOGVAR: torch.full_like(mean, -6.0),
                    shard_format.PROMPT_EMBEDS: torch.randn(header["text_max_length"], header["text_embed_dim"],
                                                            generator=generator),
                }
                if family.image_to_video:
                    tensors[shard_format.IMAGE_MEAN] = mean[:, :1].clone()
                    tensors[shard_format.IMAGE_LOGVAR] = torch.full_like(mean[:, :1], -6.0)
                if family.image_to_video and image_noise_samples:
                    sigmas = torch.exp(torch.normal(*shard_format.IMAGE_NOISE_LOG_SIGMA, (image_noise_samples,),
                                                    generator=generator))
                    tensors[shard_format.NOISED_IMAGE_MEAN] = mean[None, :, :1] + sigmas.view(-1, 1, 1, 1, 1) * \
                        torch.randn(image_noise_samples, *mean[:, :1].shape, generator=generator)
                    tensors[shard_format.NOISED_IMAGE_LOGVAR] = torch.full_like(
                        tensors[shard_format.NOISED_IMAGE_MEAN], -6.0)
                    tensors[shard_format.IMAGE_NOISE_SIGMAS] = sigmas
                sample = shard_format.encode_sample(key, tensors, {"prompt": key, "source": f"{key}.mp4"})
                sink.write(sample)
                keys.append(key)
                digests.append(shard_format.sample_digest(sample))
        shards.append(ShardEntry(path.name, size, path.stat().st_size, shard_format.file_sha256(path), keys,
                                 digests, shard_format.member_rows(path, keys)))
    shard_format.write_empty_prompt(folder, torch.zeros(header["text_max_length"], header["text_embed_dim"]))
    manifest = Manifest(**header, shards=shards)
    manifest.write(folder)
    return manifest
