"""The CogVideoX training objective.

Per sample: draw a latent from the stored posterior, scale it by the VAE factor, pick a uniform timestep, add
noise with the scheduler, predict v with the transformer (rotary positions, ofs and first-frame conditioning
where the family uses them), and take the weighted x0 error with weight 1/(1 - alphas_cumprod[t]), which equals
the MSE on v. Everything after the transformer runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cogvx_dist.core.families import ModelFamily
from cogvx_dist.core.shard_format import (
    IMAGE_LOGVAR,
    IMAGE_MEAN,
    LATENT_LOGVAR,
    LATENT_MEAN,
    NOISED_IMAGE_LOGVAR,
    NOISED_IMAGE_MEAN,
    PROMPT_EMBEDS,
)


@dataclass(frozen=True)
class LossContext:
    """What the loss needs besides the batch: the family, the transformer config and the noise schedule."""

    family: ModelFamily
    transformer_config: dict[str, Any]
    scheduler: Any
    """The checkpoint's CogVideoXDPMScheduler (its noise schedule; no sampling state is used)."""


def draw_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of N(mean, exp(logvar)) (the VAE posterior), drawn on CPU from `generator` for reproducibility."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return mean.float() + torch.exp(0.5 * logvar.float()) * noise.to(mean.device)


def pad_for_temporal_patches(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """[B, F, C, H, W]: repeat the first frame in front until F is a multiple of patch_size_t (CogVideoX 1.5)."""
    if not patch_size_t or latents.shape[1] % patch_size_t == 0:
        return latents
    missing = patch_size_t - latents.shape[1] % patch_size_t
    return torch.cat([latents[:, :1].expand(-1, missing, -1, -1, -1), latents], dim=1)


def rotary_embeddings(
    transformer_config: dict[str, Any], latent_frames: int, latent_height: int, latent_width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3D rotary position embeddings diffusers' CogVideoX pipelines use, for a latent video of this size."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    patch = transformer_config["patch_size"]
    patch_t = transformer_config.get("patch_size_t")
    grid_height, grid_width = latent_height // patch, latent_width // patch
    base_height = transformer_config["sample_height"] // patch
    base_width = transformer_config["sample_width"] // patch
    head_dim = transformer_config["attention_head_dim"]
    if patch_t is None:
        crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
        return get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=crops, grid_size=(grid_height, grid_width),
            temporal_size=latent_frames, device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=head_dim, crops_coords=None, grid_size=(grid_height, grid_width),
        temporal_size=(latent_frames + patch_t - 1) // patch_t, grid_type="slice",
        max_size=(base_height, base_width), device=device,
    )


def image_moments(batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, 1, h, w] posterior (mean, logvar) of each sample's conditioning frame: one of its noised copies, drawn
    from the step's generator, where prep made them (the official I2V recipe), else the clean frame's."""
    if NOISED_IMAGE_MEAN not in batch:
        return batch[IMAGE_MEAN], batch[IMAGE_LOGVAR]
    means, logvars = batch[NOISED_IMAGE_MEAN], batch[NOISED_IMAGE_LOGVAR]
    rows = torch.arange(means.shape[0])
    chosen = torch.randint(0, means.shape[1], (means.shape[0],), generator=generator)
    return means[rows, chosen], logvars[rows, chosen]


def drop_captions(batch: dict[str, Any], empty_prompt: torch.Tensor, probability: float,
                  generator: torch.Generator) -> dict[str, Any]:
    """The batch with each sample's prompt embedding replaced by the empty prompt's with `probability`, drawn first
    from the step's generator (the posterior sample, noise and timesteps follow)."""
    embeds = batch[PROMPT_EMBEDS]
    dropped = torch.rand(embeds.shape[0], generator=generator) < probability
    empty = empty_prompt.to(embeds.dtype).expand_as(embeds)
    return {**batch, PROMPT_EMBEDS: torch.where(dropped.view(-1, 1, 1), empty, embeds)}


def diffusion_loss(
    transformer: torch.nn.Module,
    batch: dict[str, Any],
    context: LossContext,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch-mean CogVideoX v-prediction loss; all randomness comes from `generator` (CPU). `timesteps` (one
    per sample) replaces the uniform draw (the held-out loss evaluates at fixed ones)."""
    family = context.family
    scaling = family.vae_scaling_factor
    # [B, C, F, H, W] moments -> [B, F, C, H, W] latents, scaled once here (the shards store them unscaled).
    latents = draw_latent(batch[LATENT_MEAN], batch[LATENT_LOGVAR], generator).permute(0, 2, 1, 3, 4) * scaling
    latents = pad_for_temporal_patches(latents, family.patch_size_t).to(device)
    batch_size, frames, _, height, width = latents.shape

    scheduler = context.scheduler
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = timesteps.to(device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    model_input = noisy
    if family.image_to_video:
        image = draw_latent(*image_moments(batch, generator), generator).permute(0, 2, 1, 3, 4)
        image = (image / scaling if family.invert_scale_latents else image * scaling).to(device)
        padding = torch.zeros((batch_size, frames - image.shape[1], *image.shape[2:]), device=device)
        model_input = torch.cat([noisy, torch.cat([image, padding], dim=1)], dim=2)

    rotary = None
    if family.use_rotary_positional_embeddings:
        rotary = rotary_embeddings(context.transformer_config, frames, height, width, device)
    ofs = None
    if context.transformer_config.get("ofs_embed_dim") is not None:
        ofs = torch.full((batch_size,), family.ofs_value, device=device)

    prediction = transformer(
        hidden_states=model_input.to(dtype),
        encoder_hidden_states=batch[PROMPT_EMBEDS].to(device, dtype),
        timestep=timesteps,
        ofs=ofs,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0].float()

    # v-prediction -> x0 estimate (get_velocity computes sqrt(a)*x_t - sqrt(1-a)*v), weighted by 1/(1 - alpha_bar):
    # the same as the squared error on v.
    predicted_x0 = scheduler.get_velocity(prediction, noisy, timesteps)
    alphas = scheduler.alphas_cumprod.to(device)[timesteps].view(-1, 1, 1, 1, 1)
    weights = 1.0 / (1 - alphas)
    per_sample = (weights * (predicted_x0 - latents) ** 2).reshape(batch_size, -1).mean(dim=1)
    return per_sample.mean()
