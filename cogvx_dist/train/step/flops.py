"""Model FLOPs of a training step, counted from the family and the clip geometry, and MFU against a GPU's peak.

Per sample, with N tokens (video patches + text), width d, L blocks, feed-forward width f and LoRA rank r on k of
the attention projections:
- forward: L x (2N(4d^2 + 2df) linear + 4N^2 d attention + 4Nkdr LoRA), plus the patch embedding, the text
  projection and the output projection;
- backward: the frozen linear layers only pass gradients to their inputs (1x their forward), attention twice its
  forward, LoRA twice (inputs and its own weights); the first block's q, k and v pass none (its input needs none).
No recomputation is counted (that is what MFU means); tests/unit/test_flops.py checks the count against
torch's FlopCounterMode on every family.
"""

from __future__ import annotations

from typing import Any

from cogvx_dist.core.families import PATCH_SIZE, ModelFamily
from cogvx_dist.core.lora import LoraSettings

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10": 125.0,
}
"""Dense bf16 tensor-core peak of one GPU (NVIDIA datasheets, SXM parts; no sparsity), by a name in
torch.cuda.get_device_name; log.peak_tflops overrides it."""

_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def training_flops_per_sample(family: ModelFamily, transformer_config: dict[str, Any], frames: int, height: int,
                              width: int, lora: LoraSettings) -> int:
    """Forward and backward FLOPs of one sample (no recomputation)."""
    config = transformer_config
    width_d = config["num_attention_heads"] * config["attention_head_dim"]
    feed_forward = config.get("ff_inner_dim") or 4 * width_d
    text = config.get("max_text_seq_length", family.text_max_length)
    video = family.tokens_per_sample(frames, height, width) - family.text_max_length
    tokens = video + text
    adapted = [name for name in _ATTENTION_PROJECTIONS if name in lora.target_modules]
    linear = 2 * tokens * (4 * width_d * width_d + 2 * width_d * feed_forward)
    attention = 4 * tokens * tokens * width_d
    adapter = 4 * tokens * len(adapted) * width_d * lora.rank
    per_block = 2 * linear + 3 * attention + 3 * adapter
    # The first block's input needs no gradient: no input gradients for its q, k, v projections (nor their LoRA A).
    first_block_inputs = 2 * tokens * width_d * (3 * width_d + lora.rank * sum(1 for n in adapted if n != "to_out.0"))
    patch = PATCH_SIZE * PATCH_SIZE * (family.patch_size_t or 1)
    embed = 2 * video * config["in_channels"] * patch * width_d + 2 * text * config["text_embed_dim"] * width_d
    project_out = 2 * video * width_d * patch * config["out_channels"]
    return config["num_layers"] * per_block - first_block_inputs + embed + 2 * project_out


class SampleCosts:
    """Tokens and model FLOPs of a sample from its latent shape, so throughput counts each micro-batch at its own
    bucket's size (mixed resolutions and frame counts), remembered per shape."""

    def __init__(self, family: ModelFamily, transformer_config: dict[str, Any], lora: LoraSettings) -> None:
        self.family = family
        self.transformer_config = transformer_config
        self.lora = lora
        self._known: dict[tuple[int, ...], tuple[int, int]] = {}

    def of(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        """(tokens, forward + backward FLOPs) of one sample whose latent_mean is [C, F, H, W]."""
        shape = tuple(latent_shape[-3:])
        if shape not in self._known:
            clip = self.family.clip_of_latents(*shape)
            self._known[shape] = (self.family.tokens_per_sample(*clip),
                                  training_flops_per_sample(self.family, self.transformer_config, *clip, self.lora))
        return self._known[shape]


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one GPU: the override, else the table's entry for the first name it contains; None if
    unknown (no MFU is reported then)."""
    if override_tflops:
        return override_tflops * 1e12
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None
