"""The CogVideoX training objective.

Per sample: draw a latent from the stored posterior, scale it by the VAE factor, pick a uniform timestep, add
noise with the scheduler (every random number is drawn on the CPU beforehand, by `draw_randomness`, in the loader
where there is one), predict v with the transformer (rotary positions, ofs and first-frame conditioning where the
family uses them), and take the weighted x0 error with weight 1/(1 - alphas_cumprod[t]), which equals the MSE on v.
Everything after the transformer runs in float32.
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
from cogvx_dist.train.step.sequence_parallel import SequenceParallel, video_tokens


@dataclass(frozen=True)
class LossContext:
    """What the loss needs besides the batch: the family, the transformer config and the noise schedule."""

    family: ModelFamily
    transformer_config: dict[str, Any]
    scheduler: Any
    """The checkpoint's CogVideoXDPMScheduler (its noise schedule; no sampling state is used)."""
    sequence: SequenceParallel | None = None
    """This rank's sequence-parallel group when the transformer runs on a share of each sample's tokens (its output
    is then this rank's prediction tokens, and the loss this rank's part of the sum)."""


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


def step_seed(seed: int, step: int, unit: int) -> int:
    """The seed of the generator that draws a micro-batch's caption dropout, posterior sample, noise and
    timesteps: keyed by the micro-batch's unit number within its step (micro_step * data-parallel size + data rank,
    the unit it reads; train/data/reader.py), not by rank, so a unit gets the same draws at any world size with the
    global batch fixed (elastic restarts, resumes on another node count)."""
    return ((seed * 1_000_003 + step) * 1_000_033 + unit) % (2**63 - 1)


CAPTION_DROPPED = "caption_dropped"
POSTERIOR_NOISE = "posterior_noise"
TIMESTEPS = "timesteps"
NOISE = "noise"
IMAGE_CHOICE = "image_choice"
IMAGE_POSTERIOR_NOISE = "image_posterior_noise"


def draw_randomness(batch: dict[str, Any], context: LossContext, generator: torch.Generator,
                    caption_dropout: float = 0.0, timesteps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every random number a micro-batch's loss uses, on the CPU from `generator`, always in this order: caption
    dropout (only when `caption_dropout` > 0), the video posterior's noise, the timesteps (unless given), the
    diffusion noise, then for image-to-video the noised copy of the conditioning frame (where prep made copies)
    and its posterior's noise. The loader draws them (train/data/reader.py), so the training process only computes."""
    family = context.family
    mean = batch[LATENT_MEAN]
    batch_size, channels, frames, height, width = mean.shape
    drawn: dict[str, torch.Tensor] = {}
    if caption_dropout > 0:
        drawn[CAPTION_DROPPED] = torch.rand(batch_size, generator=generator) < caption_dropout
    drawn[POSTERIOR_NOISE] = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    if timesteps is None:
        timesteps = torch.randint(0, context.scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    drawn[TIMESTEPS] = timesteps
    padded = frames
    if family.patch_size_t and frames % family.patch_size_t:
        padded += family.patch_size_t - frames % family.patch_size_t
    drawn[NOISE] = torch.randn((batch_size, padded, channels, height, width), generator=generator,
                               dtype=torch.float32)
    if family.image_to_video:
        if NOISED_IMAGE_MEAN in batch:
            copies = batch[NOISED_IMAGE_MEAN].shape[1]
            drawn[IMAGE_CHOICE] = torch.randint(0, copies, (batch_size,), generator=generator)
        drawn[IMAGE_POSTERIOR_NOISE] = torch.randn(batch[IMAGE_MEAN].shape, generator=generator,
                                                   dtype=torch.float32)
    return drawn


@dataclass(frozen=True)
class StepDraws:
    """Draws a rank's micro-batch randomness by micro-batch number, exactly as the training step would with the
    step's generator: what a loader (and its worker processes) needs to take the draws off the training process."""

    context: LossContext
    seed: int
    rank: int
    """The data-parallel rank (a sequence-parallel group's number)."""
    grad_accum_steps: int
    first_step: int
    """The optimizer step the loader's micro-batch 0 belongs to."""
    caption_dropout: float = 0.0
    dp_size: int = 1
    """Data-parallel ranks: with the rank, which of the step's units a micro-step reads."""

    def for_step(self, batch: dict[str, Any], step: int, micro_step: int) -> dict[str, torch.Tensor]:
        unit = micro_step * self.dp_size + self.rank
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, unit))
        return draw_randomness(batch, self.context, generator, self.caption_dropout)

    def __call__(self, batch: dict[str, Any], micro_index: int) -> dict[str, torch.Tensor]:
        step, micro_step = divmod(micro_index, self.grad_accum_steps)
        return self.for_step(batch, self.first_step + step, micro_step)


def image_moments(batch: dict[str, Any], drawn: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, 1, h, w] posterior (mean, logvar) of each sample's conditioning frame: the noised copy `drawn` chose
    where prep made them (the official I2V recipe), else the clean frame's."""
    if IMAGE_CHOICE not in drawn:
        return batch[IMAGE_MEAN], batch[IMAGE_LOGVAR]
    means, logvars = batch[NOISED_IMAGE_MEAN], batch[NOISED_IMAGE_LOGVAR]
    rows, chosen = torch.arange(means.shape[0]), drawn[IMAGE_CHOICE]
    return means[rows, chosen], logvars[rows, chosen]


def drop_captions(batch: dict[str, Any], empty_prompt: torch.Tensor, dropped: torch.Tensor) -> dict[str, Any]:
    """The batch with the prompt embedding of each sample marked in `dropped` replaced by the empty prompt's."""
    embeds = batch[PROMPT_EMBEDS]
    empty = empty_prompt.to(embeds.dtype).expand_as(embeds)
    return {**batch, PROMPT_EMBEDS: torch.where(dropped.view(-1, 1, 1), empty, embeds)}


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the device without blocking the host (the loader pins its batches on GPU runs)."""
    return tensor.to(device, non_blocking=True)


def _posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
    """mean + exp(logvar / 2) * noise in float32 on the device: a sample of the VAE posterior."""
    return _on(mean, device).float() + torch.exp(0.5 * _on(logvar, device).float()) * _on(noise, device)


def diffusion_loss(
    transformer: torch.nn.Module,
    batch: dict[str, Any],
    context: LossContext,
    drawn: dict[str, torch.Tensor] | torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch-mean CogVideoX v-prediction loss with the random numbers `drawn` (or drawn here from a generator;
    `timesteps` then replaces the uniform draw, as the held-out loss does)."""
    if isinstance(drawn, torch.Generator):
        drawn = draw_randomness(batch, context, drawn, timesteps=timesteps)
    family = context.family
    scaling = family.vae_scaling_factor
    # [B, C, F, H, W] moments -> [B, F, C, H, W] latents, scaled once here (the shards store them unscaled).
    latents = _posterior_sample(batch[LATENT_MEAN], batch[LATENT_LOGVAR], drawn[POSTERIOR_NOISE], device)
    latents = pad_for_temporal_patches(latents.permute(0, 2, 1, 3, 4) * scaling, family.patch_size_t)
    batch_size, frames, _, height, width = latents.shape

    scheduler = context.scheduler
    timesteps = _on(drawn[TIMESTEPS], device)
    noisy = scheduler.add_noise(latents, _on(drawn[NOISE], device), timesteps)

    model_input = noisy
    if family.image_to_video:
        mean, logvar = image_moments(batch, drawn)
        image = _posterior_sample(mean, logvar, drawn[IMAGE_POSTERIOR_NOISE], device).permute(0, 2, 1, 3, 4)
        image = image / scaling if family.invert_scale_latents else image * scaling
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

    return _v_loss(prediction, noisy, latents, timesteps, context)


def _v_loss(prediction: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
            context: LossContext) -> torch.Tensor:
    """The batch mean of each sample's mean squared v error, written as the x0 error weighted by 1/(1 - alpha_bar)
    (get_velocity computes sqrt(a)*x_t - sqrt(1-a)*v from v). With sequence parallelism the prediction holds this
    rank's video tokens only: the error is taken on the same tokens of the patchified latents (unpatchify is a
    permutation) and returned as this rank's part of the mean, which the ranks' parts add up to."""
    target = latents
    if context.sequence is not None:
        patch, patch_t = context.transformer_config["patch_size"], context.transformer_config.get("patch_size_t")
        target, noisy = (video_tokens(x, patch, patch_t) for x in (latents, noisy))
        rows = context.sequence.local_rows(prediction.shape[1], target.shape[1])
        target, noisy = target[:, rows], noisy[:, rows]
    scheduler = context.scheduler
    predicted_x0 = scheduler.get_velocity(prediction, noisy, timesteps)
    alphas = scheduler.alphas_cumprod.to(prediction.device)[timesteps].view(-1, *[1] * (target.dim() - 1))
    weights = 1.0 / (1 - alphas)
    squared = (weights * (predicted_x0 - target) ** 2).reshape(target.shape[0], -1)
    if context.sequence is not None:
        return (squared.sum(dim=1) / latents[0].numel()).mean()
    return squared.mean(dim=1).mean()
