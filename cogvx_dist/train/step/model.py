"""The model a training rank trains: the transformer alone, with identical LoRA adapters, gradient checkpointing
and a chosen attention kernel; building the prep tier's encoders in this process is an error."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from cogvx_dist.core.devices import torch_dtype
from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import ExportedLora, LoraSettings, inject_lora, start_from_adapter


def build_model(path: str, dtype: str, lora: LoraSettings, seed: int, checkpoint_every: int,
                initial: ExportedLora | None = None, compile_blocks: bool = False) -> torch.nn.Module:
    """The checkpoint's transformer in `dtype`, frozen, with LoRA adapters initialised from `seed` or set to the
    `initial` adapter's weights (bit-identical on every rank either way), gradient checkpointing of every
    `checkpoint_every`-th block (0: none) and, with `compile_blocks`, each block compiled."""
    transformer = load_transformer(path, dtype=torch_dtype(dtype))
    inject_lora(transformer, lora, seed=seed)
    if initial is not None:
        start_from_adapter(transformer, initial, lora)
    enable_gradient_checkpointing(transformer, checkpoint_every)
    if compile_blocks:
        compile_each_block(transformer)
    return transformer


def compile_each_block(transformer: torch.nn.Module) -> None:
    """Regional compilation: every transformer block compiled with static shapes. The blocks share one code
    object, so a clip size compiles twice (the first block, whose input needs no gradient, and the one graph every
    other block reuses); a new clip size compiles again, and torch logs each recompilation with its reason."""
    torch._logging.set_logs(recompiles=True)
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False)


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


def choose_attention(name: str, device_type: str, capability: tuple[int, int] | None,
                     cudnn_available: bool) -> tuple[str, list[str]]:
    """(what runs, kernel names in priority order; empty: torch's own choice) for model.attention_backend `name`.
    "auto" takes cuDNN attention on Hopper and newer (417 TFLOP/s against flash's 283 on an H200 at CogVideoX's
    size), flash before it, and leaves the CPU to torch; a named kernel runs alone."""
    if name != "auto":
        return name, [name]
    if device_type != "cuda":
        return "torch's choice (CPU)", []
    if capability is not None and capability >= (9, 0) and cudnn_available:
        return "cudnn (auto: compute capability 9.0 or newer)", ["cudnn", "flash", "efficient", "math"]
    return "flash (auto)", ["flash", "efficient", "math"]


def attention_kernels(names: list[str]) -> contextlib.AbstractContextManager:
    """A context in which scaled-dot-product attention uses these kernels, in this priority (none: torch's own)."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kernels[name] for name in names], set_priority=True)


def check_attention(name: str, kernels: list[str], device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Refuse, with one line, a named kernel that cannot run here (one tiny attention call with it, at start-up)."""
    from cogvx_dist.core.errors import CogvxError, first_line

    probe = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    try:
        with attention_kernels(kernels):
            torch.nn.functional.scaled_dot_product_attention(probe, probe, probe)
    except RuntimeError as err:
        raise CogvxError(f"model.attention_backend {name} cannot run on {device.type} in {dtype}: "
                         f"{first_line(err)}") from err
