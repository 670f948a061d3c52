"""Tiny random-weight CogVideoX checkpoints in the full diffusers folder layout.

No model hub is needed: a sentencepiece tokenizer is trained on the fly, and a small T5 encoder, transformer and
VAE are built from configs that keep each family's structure (position embeddings, temporal patching, I2V
channels, ofs embedding, latent scaling, scheduler). Every code path that loads a real checkpoint loads these.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import PATCH_SIZE, TEXT_MAX_LENGTH, VAE_SPATIAL_COMPRESSION, ModelFamily, get_family
from cogvx_dist.core.files import make_temporary_folder
from cogvx_dist.core.loading import TINY_INFO_FILE

TINY_HEIGHT = 32
TINY_WIDTH = 48
TINY_TEXT_DIM = 32

_CAPTION_WORDS = (
    "a the red green blue yellow white black orange purple square circle triangle ball box shape moves slides "
    "left right up down across slowly quickly on background dark bright video of cat dog person walking running "
    "car street city tree forest river ocean sky cloud sun night day camera pans zooms in out close view scene"
).split()


def tiny_frames(family: ModelFamily) -> int:
    """Smallest valid frame count of the family (9 for CogVideoX 1.0, 17 for 1.5)."""
    return family.valid_frame_counts()[0]


def _caption_corpus(seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(400):
        picks = torch.randint(len(_CAPTION_WORDS), (8,), generator=generator).tolist()
        lines.append(" ".join(_CAPTION_WORDS[i] for i in picks))
    return lines


def _make_tokenizer(seed: int) -> Any:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_caption_corpus(seed)),
        model_writer=model,
        vocab_size=200,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model.getvalue())
        (Path(folder) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": TEXT_MAX_LENGTH})
        )
        return AutoTokenizer.from_pretrained(folder), model.getvalue()


def tiny_sample_size(family: ModelFamily) -> tuple[int, int]:
    """The tiny transformer's (sample_height, sample_width) in latents.

    CogVideoX 1.5 slices its rotary positions from a grid of sample_height x sample_width latents, which caps the clip
    size (ModelFamily.position_grid_limit). The released 1.5 configs give 300x300 latents (2400x2400 pixels) to
    768x1360 clips: square, so either orientation fits, and about 1.76x their long side. The tiny 1.5 checkpoints
    keep that ratio to their 32x48 clips (6 latents on the long side -> 10x10), so portrait and larger buckets take
    the path a real checkpoint takes instead of failing inside diffusers. Other families keep the clip's own size:
    their position embeddings take any size (or, with learned ones, exactly this one), and their checkpoints are
    pinned by checksums elsewhere."""
    clip = (TINY_HEIGHT // VAE_SPATIAL_COMPRESSION, TINY_WIDTH // VAE_SPATIAL_COMPRESSION)
    if family.position_grid_limit(family.full_size_transformer) is None:
        return clip
    released = family.full_size_transformer
    long_side = max(family.default_height, family.default_width) // VAE_SPATIAL_COMPRESSION
    # Each side's room over the released clips' long side, on the tiny clips' long side, in whole patches (the
    # rotary grid counts patches).
    height, width = (PATCH_SIZE * max(1, round(released[key] / long_side * max(clip) / PATCH_SIZE))
                     for key in ("sample_height", "sample_width"))
    return height, width


def _tiny_transformer_config(family: ModelFamily, frames: int) -> dict[str, Any]:
    channels = 16
    sample_height, sample_width = tiny_sample_size(family)
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 16,  # rotary embeddings need a multiple of 16
        "in_channels": 2 * channels if family.image_to_video else channels,
        "out_channels": channels,
        "num_layers": 2,
        "text_embed_dim": TINY_TEXT_DIM,
        "time_embed_dim": 32,
        "ofs_embed_dim": 32 if family.ofs_embed_dim is not None else None,  # added to the time embedding
        "sample_frames": frames,
        "sample_height": sample_height,
        "sample_width": sample_width,
        "patch_size": PATCH_SIZE,
        "patch_size_t": family.patch_size_t,
        "patch_bias": family.full_size_transformer.get("patch_bias", True),
        "max_text_seq_length": family.text_max_length,
        "use_rotary_positional_embeddings": family.use_rotary_positional_embeddings,
        "use_learned_positional_embeddings": family.use_learned_positional_embeddings,
    }


def build_tiny_pipeline(family_name: str, seed: int = 0) -> tuple[Any, bytes]:
    """A diffusers CogVideoX pipeline of tiny random-weight components, and its sentencepiece model."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    family = get_family(family_name)
    tokenizer, spiece_model = _make_tokenizer(seed)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = CogVideoXTransformer3DModel(**_tiny_transformer_config(family, tiny_frames(family)))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=TINY_HEIGHT,
        sample_width=TINY_WIDTH,
        scaling_factor=family.vae_scaling_factor,
        invert_scale_latents=family.invert_scale_latents,
    )
    scheduler = CogVideoXDPMScheduler(**family.scheduler_config())
    pipeline = family.pipeline_type()(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipeline, spiece_model


def make_tiny_checkpoint(out_dir: str | Path, family_name: str, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a complete tiny diffusers-format checkpoint of `family_name` to `out_dir`; deterministic for a seed."""
    family = get_family(family_name)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CogvxError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    pipeline, spiece_model = build_tiny_pipeline(family.name, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination (same filesystem, so the final rename is atomic); an old checkpoint is only
    # moved away once the new one is complete.
    staging = make_temporary_folder(out.parent, f".{out.name}-")
    retired = out.parent / f".{out.name}-old-{staging.name}"
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        # The released checkpoints ship the sentencepiece model itself; keep that file for tools that read it.
        (staging / "tokenizer" / "spiece.model").write_bytes(spiece_model)
        info = {
            "family": family.name,
            "seed": seed,
            "frames": tiny_frames(family),
            "height": TINY_HEIGHT,
            "width": TINY_WIDTH,
            "fps": family.fps,
            "note": "random weights made by `cogvx make-tiny-model`; for tests and demos only",
        }
        (staging / TINY_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return out
