"""How large a clip CogVideoX 1.5 can take: diffusers slices its 3D rotary embeddings from a grid of
(sample_height // patch_size) x (sample_width // patch_size) patches (grid_type="slice", max_size=...), so a latent
grid past it fails deep inside diffusers. The family's geometry check refuses such a size with one line, and the
tiny 1.5 checkpoints keep the real configs' room above their clips, so portrait and larger buckets take the real
code path in tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import FAMILIES, get_family
from cogvx_dist.core.loading import describe_checkpoint, load_scheduler
from cogvx_dist.core.lora import LoraSettings
from cogvx_dist.core.shard_format import IMAGE_LOGVAR, IMAGE_MEAN, LATENT_LOGVAR, LATENT_MEAN, PROMPT_EMBEDS
from tests.helpers import assert_one_line_error, cli

V15 = ["CogVideoX1.5-5b", "CogVideoX1.5-5b-I2V"]
PORTRAIT = (48, 32)
"""A portrait bucket of the tiny 1.5 checkpoints (whose clips are 32x48): 3x2 patches."""
TOO_TALL = (96, 32)
"""Past the tiny 1.5 checkpoints' rotary grid (80x80 pixels: sample_height = sample_width = 10 latents)."""


def _one_line_refusal(family: str, frames: int, height: int, width: int, config: dict) -> str:
    with pytest.raises(CogvxError) as refused:
        get_family(family).check_geometry(frames, height, width, config)
    message = str(refused.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("family", V15)
def test_the_released_15_configs_take_up_to_2400_pixels_a_side(family):
    table = get_family(family)
    config = table.full_size_transformer  # sample_height = sample_width = 300 latents, 2x2 patches
    assert table.position_grid_limit(config) == (2400, 2400)
    for height, width in ((768, 1360), (1360, 768), (2400, 2400), (2400, 16)):
        table.check_geometry(81, height, width, config)
    message = _one_line_refusal(family, 81, 2416, 768, config)
    for fragment in ("resolution 2416x768", "2400x2400", "sample_height 300", "sample_width 300", "patch_size 2"):
        assert fragment in message, message
    assert "resolution 768x2416" in _one_line_refusal(family, 81, 768, 2416, config)


@pytest.mark.parametrize("family", ["CogVideoX-2b", "CogVideoX-5b"])
def test_cogvideox_1_0_has_no_upper_bound(family):
    """2b recomputes its sin-cos table for any size; 5b interpolates its rotary grid (get_resize_crop_region_for_grid,
    linspace): neither fails past sample_height/sample_width."""
    table = get_family(family)
    assert table.position_grid_limit(table.full_size_transformer) is None
    table.check_geometry(49, 4096, 4096, table.full_size_transformer)


@pytest.mark.parametrize("sample", [(4, 6), (5, 7), (10, 10)])
def test_the_limit_is_exactly_where_the_projects_rotary_embeddings_fail(sample):
    """Against diffusers itself: the training loss's rotary_embeddings (diffusers' get_3d_rotary_pos_embed, slice
    grid) builds for exactly the latent grids check_geometry accepts (odd sample sizes round down to whole
    patches), and the transformer runs a forward at the largest one."""
    from diffusers import CogVideoXTransformer3DModel

    from cogvx_dist.core.tiny import _tiny_transformer_config
    from cogvx_dist.train.step.loss import rotary_embeddings

    family = get_family("CogVideoX1.5-5b")
    config = {**_tiny_transformer_config(family, 17), "sample_height": sample[0], "sample_width": sample[1]}
    largest = None
    for latent_height, latent_width in itertools.product(range(2, 17, 2), repeat=2):
        try:
            family.check_geometry(17, 8 * latent_height, 8 * latent_width, config)
            accepted = True
        except CogvxError:
            accepted = False
        try:
            rotary_embeddings(config, 6, latent_height, latent_width, torch.device("cpu"))
            built = True
        except RuntimeError:  # "Sizes of tensors must match ... Expected size 3 but got size 2"
            built = False
        assert accepted == built, (latent_height, latent_width)
        if accepted:
            largest = (latent_height, latent_width)
    assert largest == (2 * (sample[0] // 2), 2 * (sample[1] // 2))
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**config).eval()
    rotary = rotary_embeddings(config, 6, *largest, torch.device("cpu"))
    with torch.no_grad():
        out = model(hidden_states=torch.randn(1, 6, 16, *largest), encoder_hidden_states=torch.randn(1, 226, 32),
                    timestep=torch.tensor([10]), image_rotary_emb=rotary, return_dict=False)[0]
    assert out.shape == (1, 6, 16, *largest)


@pytest.mark.parametrize("family", V15)
def test_tiny_15_checkpoints_keep_room_above_their_clips(tiny_checkpoint, family):
    """Like the released configs (2400 pixels a side for 768x1360 clips), the tiny ones take their clips in either
    orientation and some larger: the sample size is square and above the clips' long side."""
    info = describe_checkpoint(tiny_checkpoint(family))
    limit = info.family.position_grid_limit(info.transformer_config)
    assert limit is not None and limit[0] == limit[1] > max(info.height, info.width)
    for height, width in ((info.height, info.width), (info.width, info.height), PORTRAIT, limit):
        info.family.check_geometry(info.frames, height, width, info.transformer_config)


def _batch(family_name: str, frames: int, height: int, width: int, text_dim: int) -> dict[str, torch.Tensor]:
    """A one-sample micro-batch of the shards' tensors for a clip of this size (moments as prep stores them)."""
    family = get_family(family_name)
    generator = torch.Generator().manual_seed(0)
    shape = (1, *family.latent_shape(16, frames, height, width))
    batch = {LATENT_MEAN: torch.randn(shape, generator=generator), LATENT_LOGVAR: torch.full(shape, -6.0),
             PROMPT_EMBEDS: torch.randn(1, family.text_max_length, text_dim, generator=generator)}
    if family.image_to_video:
        first = (*shape[:2], 1, *shape[3:])
        batch[IMAGE_MEAN] = torch.randn(first, generator=generator)
        batch[IMAGE_LOGVAR] = torch.full(first, -6.0)
    return batch


@pytest.mark.parametrize("family", V15)
def test_a_portrait_bucket_trains_on_the_tiny_15_model(tiny_checkpoint, family):
    """One training forward and backward through the project's loss (its rotary embeddings, temporal padding and
    LoRA model) on a 48x32 clip: a 3x2 patch grid, taller than the 2x3 of the tiny clips."""
    from cogvx_dist.train.step.loss import LossContext, diffusion_loss
    from cogvx_dist.train.step.model import build_model

    model = tiny_checkpoint(family)
    info = describe_checkpoint(model)
    info.family.check_geometry(info.frames, *PORTRAIT, info.transformer_config)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    transformer = build_model(str(model), "float32", LoraSettings(rank=4, alpha=4.0), seed=0, checkpoint_every=0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)  # so gradients reach lora_A too
    batch = _batch(family, info.frames, *PORTRAIT, info.transformer_config["text_embed_dim"])
    loss = diffusion_loss(transformer, batch, context, torch.Generator().manual_seed(0), torch.device("cpu"),
                          torch.float32)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    trained = [param for param in transformer.parameters() if param.requires_grad]
    assert trained and all(param.grad is not None and param.grad.abs().sum() > 0 for param in trained)


def test_cogvx_sample_draws_a_portrait_clip_on_the_tiny_15_model(tiny_checkpoint, tmp_path, capsys):
    """The diffusers pipeline's own rotary embeddings (_prepare_rotary_positional_embeddings) at 48x32."""
    import json

    out = tmp_path / "portrait.mp4"
    code, printed, err = cli(capsys, "sample", "--model", str(tiny_checkpoint("CogVideoX1.5-5b")), "--prompt",
                             "a red square moves left", "--out", str(out), "--inference-steps", "1",
                             "--guidance-scale", "1", "--height", str(PORTRAIT[0]), "--width", str(PORTRAIT[1]))
    assert code == 0, err
    assert out.is_file() and "17 frames 48x32" in printed
    written = json.loads(out.with_suffix(".json").read_text())
    assert (written["height"], written["width"]) == PORTRAIT


def test_cogvx_sample_refuses_a_clip_past_the_grid_before_loading_the_model(tiny_checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    from cogvx_dist.results import sample

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline was loaded before the geometry was checked")

    monkeypatch.setattr(sample.Sampler, "__init__", no_loading)
    out = tmp_path / "tall.mp4"
    code, _, err = cli(capsys, "sample", "--model", str(tiny_checkpoint("CogVideoX1.5-5b")), "--prompt", "x",
                       "--out", str(out), "--inference-steps", "1", "--height", str(TOO_TALL[0]),
                       "--width", str(TOO_TALL[1]))
    assert_one_line_error(code, err, "cogvx sample: error:", "resolution 96x32", "80x80", "sample_height 10",
                          "sample_width 10")
    assert not out.exists()


@pytest.mark.parametrize("family", V15)
def test_the_prep_config_check_refuses_a_bucket_past_the_grid(tiny_checkpoint, family):
    from data_prep.config import PrepConfig

    info = describe_checkpoint(tiny_checkpoint(family))
    config = PrepConfig(model=str(tiny_checkpoint(family)), data="unused", out="unused",
                        buckets=[(32, 48), PORTRAIT, TOO_TALL])
    with pytest.raises(CogvxError) as refused:
        config.check_family(info.family, info.frames, info.transformer_config)
    message = str(refused.value)
    assert message.startswith("buckets: resolution 96x32") and "80x80" in message and "\n" not in message
    # The buckets that fit pass; without the transformer config only the size-free checks run (as before).
    assert config.replace(buckets=[(32, 48), PORTRAIT]).check_family(info.family, info.frames,
                                                                    info.transformer_config) == info.frames
    assert config.check_family(info.family, info.frames) == info.frames


def test_cogvx_prep_refuses_a_bucket_past_the_grid(tiny_checkpoint, tmp_path, capsys):
    """Refused before any input is read (the data folder does not even exist)."""
    code, _, err = cli(capsys, "prep", "--model", str(tiny_checkpoint("CogVideoX1.5-5b")), "--data",
                       str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--resolution", "96x32")
    assert_one_line_error(code, err, "buckets: resolution 96x32", "80x80")


def test_the_training_preflight_refuses_shards_past_the_grid(tiny_checkpoint):
    from cogvx_dist.core.shard_format import Manifest, manifest_header
    from cogvx_dist.train.preflight import check_manifest

    model = tiny_checkpoint("CogVideoX1.5-5b")
    info = describe_checkpoint(model)
    manifest = Manifest(**manifest_header(
        info.family, str(model), vae_scaling_factor=info.family.vae_scaling_factor, latent_channels=16,
        text_embed_dim=info.transformer_config["text_embed_dim"], frames=info.frames,
        buckets=[(32, 48), TOO_TALL], fps=info.family.fps, storage_dtype="float32"))
    with pytest.raises(CogvxError, match=r"resolution 96x32 .*80x80"):
        check_manifest(manifest, info, where="data.shards")


def test_every_family_accepts_its_tiny_and_released_geometry(tiny_checkpoint):
    for name, family in FAMILIES.items():
        family.check_geometry(family.default_frames, family.default_height, family.default_width,
                              family.full_size_transformer)
        info = describe_checkpoint(Path(tiny_checkpoint(name)))
        family.check_geometry(info.frames, info.height, info.width, info.transformer_config)
