"""Encoding in the CogVideoX order: tokenizer and T5 for the prompts, free T5, then the VAE for the clips.

Outputs are the raw T5 last hidden state of the padded prompt and the VAE posterior moments (mean, logvar) exactly
as the VAE returns them: no scaling factor is applied here (the trainer applies it once, after drawing a latent).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cogvx_dist.core.shard_format import IMAGE_NOISE_LOG_SIGMA
from data_prep.decode import to_model_input


class Encoders:
    """The prep encoders over one ComponentStore, used in the CogVideoX order and released between phases."""

    def __init__(self, model: str, device: str, dtype: torch.dtype, slicing: bool = True, tiling: bool = False,
                 channels_last: bool = False, compile: bool = False):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from cogvx_dist.core.loading import ComponentStore

        # Weight-loading bars would interleave with the per-rank prep bars.
        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
        self.store = ComponentStore(model, dtype=dtype, device=device)
        self.device = device
        self.dtype = dtype
        self.slicing = slicing
        self.tiling = tiling
        self.channels_last = channels_last
        self.compile = compile
        self._vae_switched = False  # the switches are applied once to each VAE the store holds

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], max_length: int, batch_size: int,
                       out_dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
        """[max_length, dim] T5 embeddings (on CPU, in out_dtype) for each prompt, padded and cut at max_length as
        the pipeline does, and each prompt's token count before the cut (above max_length: T5 never saw the rest)."""
        tokenizer = self.store.get("tokenizer")
        encoder = self.store.get("text_encoder")
        out: list[torch.Tensor] = []
        tokens: list[int] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            # Same call as CogVideoXPipeline._get_t5_prompt_embeds: pad to max_length, truncate, no attention mask.
            ids = tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            tokens += [len(full) for full in tokenizer(batch, add_special_tokens=True, verbose=False).input_ids]
            hidden = encoder(ids.to(self.device))[0]
            out.extend(h.to("cpu", out_dtype) for h in hidden)
        return out, tokens

    def release_text_encoder(self) -> None:
        """Free T5 (host or GPU memory) before the VAE loads."""
        self.store.unload("text_encoder", "tokenizer")

    def vae(self) -> Any:
        """The VAE, loaded on first use, with the slicing, tiling, channels-last and compile switches applied once."""
        vae = self.store.get("vae")
        if not self._vae_switched:
            if self.slicing:
                vae.enable_slicing()
            if self.tiling:
                vae.enable_tiling()
            if self.channels_last:
                to_channels_last(vae)
            if self.compile:
                vae.encoder.compile(dynamic=False)  # one clip size per bucket: static shapes
            if self.device.startswith("cuda"):
                torch.backends.cudnn.benchmark = True
            self._vae_switched = True
        return vae

    def release_vae(self) -> None:
        """Free the VAE (before T5 loads for the next chunk)."""
        self.store.unload("vae")
        self._vae_switched = False

    @torch.inference_mode()
    def encode_noised_images(self, images: list[np.ndarray], keys: list[str],
                             count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) [B, K, C, 1, h, w] of K noised copies of each uint8 conditioning frame [1, H, W, 3]
        (`noised_copies`, seeded by the sample's key) and their sigmas [B, K], in fp32 on CPU."""
        means, logvars, sigmas = [], [], []
        for image, key in zip(images, keys):
            levels, copies = noised_copies(to_model_input(image, "cpu", torch.float32)[0], key, count)
            dist = self.vae().encode(copies.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            logvars.append(dist.logvar.float().cpu())
            sigmas.append(levels)
        return torch.stack(means), torch.stack(logvars), torch.stack(sigmas)

    @torch.inference_mode()
    def encode_clips(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) [B, C, F_latent, h, w] of uint8 clips [F, H, W, 3] of one size, in fp32 on CPU."""
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        x = to_model_input(np.stack(clips), self.device, self.dtype, layout)
        dist = self.vae().encode(x).latent_dist
        return dist.mean.float().cpu(), dist.logvar.float().cpu()


def noised_copies(image: torch.Tensor, key: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` noised copies of an image [3, 1, H, W] in [-1, 1]: (sigmas [K], copies [K, 3, 1, H, W]), in float32 on
    CPU, the same for a sample key on every run and every rank."""
    import hashlib

    seed = int(hashlib.sha256(f"image-noise/{key}".encode()).hexdigest()[:15], 16)
    generator = torch.Generator().manual_seed(seed)
    mean, std = IMAGE_NOISE_LOG_SIGMA
    sigmas = torch.exp(torch.normal(mean, std, (count,), generator=generator))
    noise = torch.randn((count, *image.shape), generator=generator)
    return sigmas, image.float().cpu()[None] + sigmas.view(-1, 1, 1, 1, 1) * noise


def to_channels_last(module: torch.nn.Module) -> None:
    """Convolution weights in channels-last order: 5-D (Conv3d) as NDHWC, 4-D (the VAE's Conv2d down-samplers) as NHWC.

    `module.to(memory_format=torch.channels_last_3d)` refuses a model that also holds 4-D weights.
    """
    formats = {5: torch.channels_last_3d, 4: torch.channels_last}
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() in formats:
                parameter.data = parameter.data.contiguous(memory_format=formats[parameter.dim()])
