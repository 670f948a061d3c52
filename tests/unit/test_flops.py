"""Model FLOPs from the family and geometry (train/step/flops.py) against torch's FlopCounterMode, and MFU."""

from __future__ import annotations

import pytest
import torch

from cogvx_dist.core.families import FAMILIES, get_family
from cogvx_dist.core.lora import LoraSettings
from cogvx_dist.train.memory.trace import StepShape, trace_step
from cogvx_dist.train.metrics import StepMeter
from cogvx_dist.train.step.flops import SampleCosts, peak_flops, training_flops_per_sample


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_counted_flops_equal_what_torch_counts_in_a_real_step(family_name):
    """Two full-width blocks at the family's clip size, LoRA r=128 on the attention projections: the analytic count
    matches FlopCounterMode over the project's own loss, forward and backward (attention included)."""
    family = get_family(family_name)
    config = {**family.full_size_transformer, "num_layers": 2}
    geometry = (family.default_frames, family.default_height, family.default_width)
    traced = trace_step(StepShape(family, config, *geometry, 1, LoraSettings(), 0)).model_flops
    counted = training_flops_per_sample(family, config, *geometry, LoraSettings())
    assert counted == pytest.approx(traced, rel=1e-4)
    attention_share = 12 * 2 * family.tokens_per_sample(*geometry) ** 2 * config["num_attention_heads"] * config[
        "attention_head_dim"] / counted
    assert attention_share > 0.4  # at 49 frames and more, attention is most of the work: it must be counted


def test_mfu_is_model_flops_per_gpu_over_the_peak():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None and peak_flops("Some Future GPU", 1500) == 1.5e15
    meter = StepMeter(global_batch=8, device=torch.device("cpu"), world_size=4, peak_flops=2e12)
    meter.step_done(torch.tensor(1.0), tokens=800, flops=8 * 10**12)
    values = meter.values(lr=1e-4, grad_norm=None, samples_seen=8)
    assert values["tflops_per_gpu"] == pytest.approx(values["samples_per_s"] / 4)
    assert values["tokens_per_s"] == pytest.approx(values["samples_per_s"] * 100)
    assert values["mfu"] == pytest.approx(values["tflops_per_gpu"] / 2)
    unknown = StepMeter(8, torch.device("cpu"))
    unknown.step_done(torch.tensor(1.0), tokens=800, flops=8 * 10**12)
    assert unknown.values(1e-4, None, 8)["mfu"] is None  # no peak (a CPU, an unknown GPU): no MFU


def test_each_sample_is_counted_at_its_own_bucket_size():
    """Mixed data: tokens and FLOPs follow each micro-batch's latent shape, so a step of small clips is not counted
    at the first bucket's size (as every sample once was)."""
    family = get_family("CogVideoX-2b")
    config, lora = family.full_size_transformer, LoraSettings()
    costs = SampleCosts(family, config, lora)
    for frames, height, width in ((49, 480, 720), (25, 720, 480), (9, 256, 256)):
        latent = family.latent_shape(16, frames, height, width)
        assert family.clip_of_latents(*latent[1:]) == (frames, height, width)
        tokens, flops = costs.of((2, *latent))  # a micro-batch's shape: the sample's is its last four
        assert tokens == family.tokens_per_sample(frames, height, width)
        assert flops == training_flops_per_sample(family, config, frames, height, width, lora)
    large, small = costs.of(family.latent_shape(16, 49, 480, 720)), costs.of(family.latent_shape(16, 9, 256, 256))
    assert large[0] > 10 * (small[0] - family.text_max_length)
