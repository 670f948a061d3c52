"""The model a training rank trains: the transformer alone, with identical LoRA adapters and gradient
checkpointing; building the prep tier's encoders in this process is an error."""

from __future__ import annotations

import functools
from typing import Any

import torch

from cogvx_dist.core.devices import torch_dtype
from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import ExportedLora, LoraSettings, inject_lora, start_from_adapter


def build_model(path: str, dtype: str, lora: LoraSettings, seed: int, checkpoint_every: int,
                initial: ExportedLora | None = None) -> torch.nn.Module:
    """The checkpoint's transformer in `dtype`, frozen, with LoRA adapters initialised from `seed` or set to the
    `initial` adapter's weights (bit-identical on every rank either way) and gradient checkpointing of every
    `checkpoint_every`-th block (0: none)."""
    transformer = load_transformer(path, dtype=torch_dtype(dtype))
    inject_lora(transformer, lora, seed=seed)
    if initial is not None:
        start_from_adapter(transformer, initial, lora)
    enable_gradient_checkpointing(transformer, checkpoint_every)
    return transformer


def enable_gradient_checkpointing(transformer: torch.nn.Module, every: int) -> None:
    """Recompute the activations of every `every`-th transformer block in backward (1: all, 0: none)."""
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
