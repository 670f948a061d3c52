"""Tiny checkpoints: every family loads in its diffusers pipeline and generates; deterministic per seed."""

from __future__ import annotations

import hashlib

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from cogvx_dist.core.families import FAMILIES
from cogvx_dist.core.loading import describe_checkpoint
from tests.helpers import assert_one_line_error, cli


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_checkpoint_generates_in_its_pipeline(tiny_checkpoint, family):
    info = describe_checkpoint(tiny_checkpoint(family))
    pipeline_class = info.family.pipeline_type()
    expected = diffusers.CogVideoXImageToVideoPipeline if info.family.image_to_video else diffusers.CogVideoXPipeline
    assert pipeline_class is expected
    pipe = pipeline_class.from_pretrained(str(info.source))
    kwargs = {}
    if info.family.image_to_video:
        kwargs["image"] = Image.new("RGB", (info.width, info.height), (200, 30, 30))
    frames = pipe(
        prompt="a red square moves left",
        num_frames=info.frames,
        height=info.height,
        width=info.width,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames
    frames = np.asarray(frames)
    assert frames.shape == (1, info.frames, info.height, info.width, 3)
    assert np.isfinite(frames).all() and frames.std() > 0


def _tree_digest(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_make_tiny_model_cli_is_deterministic_per_seed(tmp_path, capsys):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _, err = cli(capsys, "make-tiny-model", str(tmp_path / name), "--family", "CogVideoX-5b", "--seed", seed)
        assert code == 0, err
    first, again, other = (_tree_digest(tmp_path / n) for n in "abc")
    assert first == again
    assert first.keys() == other.keys()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert first[weights] != other[weights]
    for required in ("model_index.json", "tokenizer/spiece.model", "text_encoder/config.json", "vae/config.json",
                     "scheduler/scheduler_config.json"):
        assert required in first


def test_make_tiny_model_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "make-tiny-model", str(tmp_path / "x"))
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_an_output_path_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """An OSError from the user's path (here: a folder asked for below a file) is a one-line error naming it."""
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "model"
    assert_one_line_error(*cli(capsys, "make-tiny-model", str(target))[::2], "cogvx make-tiny-model: error:",
                          str(tmp_path / "a-file"))


def test_only_the_15_tiny_transformers_get_room_above_their_clips():
    """CogVideoX 1.5's rotary grid caps the clip size, so its tiny transformers keep the released configs' room
    (300x300 latents for 768x1360 clips -> 10x10 for 32x48); the others keep the clip's size, so their tiny
    checkpoints stay byte for byte what they were."""
    from cogvx_dist.core.tiny import TINY_HEIGHT, TINY_WIDTH, tiny_sample_size

    for name, family in FAMILIES.items():
        expected = (10, 10) if family.patch_size_t else (TINY_HEIGHT // 8, TINY_WIDTH // 8)
        assert tiny_sample_size(family) == expected, name
