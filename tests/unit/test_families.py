"""The family table: detection from configs, geometry, full-size LoRA parameter counts, frame rules."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import FAMILIES, detect_family, get_family
from cogvx_dist.core.loading import describe_checkpoint
from cogvx_dist.core.lora import LoraSettings, inject_lora, is_lora_key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_checkpoint_is_detected_as_its_family(tiny_checkpoint, family):
    info = describe_checkpoint(tiny_checkpoint(family))
    assert info.family.name == family
    assert info.family.is_valid_frame_count(info.frames)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_config_is_detected_as_its_family(family):
    config = {"_class_name": "CogVideoXTransformer3DModel", **get_family(family).full_size_transformer}
    assert detect_family(config).name == family


@pytest.mark.parametrize("family, frames, height, width, latent, tokens", [
    # 13x60x90 latents, 2x2 patches: 17,550 video tokens + 226 text tokens (docs/BENCHMARKS.md's 17,776).
    ("CogVideoX-2b", 49, 480, 720, (16, 13, 60, 90), 17_776),
    ("CogVideoX-5b-I2V", 49, 480, 720, (16, 13, 60, 90), 17_776),
    # 21 latent frames padded to 22 for 2-frame temporal patches: 11 x 48 x 85 + 226 = 45,106.
    ("CogVideoX1.5-5b", 81, 768, 1360, (16, 21, 96, 170), 45_106),
])
def test_geometry_from_the_family(family, frames, height, width, latent, tokens):
    table = get_family(family)
    assert table.latent_shape(16, frames, height, width) == latent
    assert table.tokens_per_sample(frames, height, width) == tokens


def test_frame_rules_differ_between_generations():
    two_b, v15 = get_family("CogVideoX-2b"), get_family("CogVideoX1.5-5b")
    assert two_b.valid_frame_counts()[-1] == 49 and 49 in two_b.valid_frame_counts()
    assert 81 in v15.valid_frame_counts() and not v15.is_valid_frame_count(41) and two_b.is_valid_frame_count(41)


@pytest.mark.parametrize(
    "family, expected", [("CogVideoX-2b", 58_982_400), ("CogVideoX-5b", 132_120_576)]
)
def test_default_lora_trainable_count_on_full_size_meta_model(family, expected):
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**get_family(family).full_size_transformer)
    inject_lora(transformer, LoraSettings(), seed=0)
    assert sum(p.numel() for p in transformer.parameters() if p.requires_grad) == expected
    for name, param in transformer.named_parameters():
        assert param.requires_grad == is_lora_key(name), name


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


@pytest.mark.parametrize("typed, canonical", [
    ("CogVideoX1.5-5B", "CogVideoX1.5-5b"),
    ("cogvideox-5b-i2v", "CogVideoX-5b-I2V"),
    ("THUDM/CogVideoX1.5-5B-I2V", "CogVideoX1.5-5b-I2V"),
    ("zai-org/CogVideoX-2b", "CogVideoX-2b"),
    (" CogVideoX-5B ", "CogVideoX-5b"),
])
def test_family_names_as_users_type_them(typed, canonical):
    assert get_family(typed).name == canonical


def test_make_tiny_model_takes_the_hub_spelling_and_says_the_canonical_name(tmp_path, capsys):
    from tests.helpers import cli

    code, out, err = cli(capsys, "make-tiny-model", str(tmp_path / "m"), "--family", "THUDM/CogVideoX1.5-5B")
    assert code == 0, err
    assert "wrote tiny CogVideoX1.5-5b checkpoint" in out
    assert describe_checkpoint(tmp_path / "m").family.name == "CogVideoX1.5-5b"
