"""The family table: detection from configs, full-size LoRA parameter counts, frame rules."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.lora import LoraSettings, inject_lora, trainable_parameter_count
from cogvx_dist.core.families import FAMILIES, detect_family, get_family
from cogvx_dist.core.loading import describe_checkpoint


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_checkpoint_is_detected_as_its_family(tiny_checkpoint, family):
    info = describe_checkpoint(tiny_checkpoint(family))
    assert info.family.name == family
    assert info.family.is_valid_frame_count(info.frames)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_config_is_detected_as_its_family(family):
    config = {"_class_name": "CogVideoXTransformer3DModel", **get_family(family).full_size_transformer}
    assert detect_family(config).name == family


def test_families_record_what_differs():
    two_b, five_b, i2v, v15, v15_i2v = (FAMILIES[n] for n in FAMILIES)
    assert not two_b.use_rotary_positional_embeddings and five_b.use_rotary_positional_embeddings
    assert (two_b.vae_scaling_factor, five_b.vae_scaling_factor) == (1.15258426, 0.7)
    assert (two_b.snr_shift_scale, five_b.snr_shift_scale) == (3.0, 1.0)
    assert i2v.use_learned_positional_embeddings and i2v.full_size_transformer["in_channels"] == 32
    assert v15.patch_size_t == 2 and v15.invert_scale_latents and v15.ofs_embed_dim is None
    assert v15_i2v.ofs_embed_dim == 512 and v15_i2v.image_to_video
    assert two_b.valid_frame_counts()[-1] == 49 and 49 in two_b.valid_frame_counts()
    assert 81 in v15.valid_frame_counts() and not v15.is_valid_frame_count(41) and two_b.is_valid_frame_count(41)


@pytest.mark.parametrize(
    "family, expected", [("CogVideoX-2b", 58_982_400), ("CogVideoX-5b", 132_120_576)]
)
def test_default_lora_trainable_count_on_full_size_meta_model(family, expected):
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**get_family(family).full_size_transformer)
    inject_lora(transformer, LoraSettings(), seed=0)
    assert trainable_parameter_count(transformer) == expected
    for name, param in transformer.named_parameters():
        assert param.requires_grad == (".lora_A." in name or ".lora_B." in name), name


def test_unknown_structure_is_rejected_naming_the_file():
    config = {"_class_name": "CogVideoXTransformer3DModel", "use_learned_positional_embeddings": True}
    with pytest.raises(CogvxError, match="no known CogVideoX family"):
        detect_family(config, where="x/transformer/config.json")


def test_other_transformer_class_is_rejected():
    with pytest.raises(CogvxError, match="not CogVideoXTransformer3DModel"):
        detect_family({"_class_name": "FluxTransformer2DModel"})


def test_unknown_family_name_lists_known_ones():
    with pytest.raises(CogvxError, match="CogVideoX-2b"):
        get_family("CogVideoX-9b")
