"""The CogVideoX model family table: the one place that says how the released checkpoints differ.

A family is recognised from the structure of a checkpoint's transformer config (rotary or sin-cos or learned
position embeddings, temporal patching, image-conditioning channels, ofs embedding), never from its size, so the
tiny random-weight checkpoints made by `cogvx make-tiny-model` are recognised exactly like the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cogvx_dist.core.errors import CogvxError

VAE_SPATIAL_COMPRESSION = 8
"""Pixels per latent along height and width, in every CogVideoX VAE."""
VAE_TEMPORAL_COMPRESSION = 4
"""Every CogVideoX VAE maps F = 4k + 1 frames to k + 1 latent frames."""
PATCH_SIZE = 2
"""Latents per transformer token along height and width, in every CogVideoX transformer."""
SIZE_MULTIPLE = VAE_SPATIAL_COMPRESSION * PATCH_SIZE
"""Pixel heights and widths must be multiples of this (8x VAE compression times the 2x2 patch)."""
TEXT_MAX_LENGTH = 226
"""T5 tokens per prompt in every CogVideoX family."""

# Scheduler settings shared by every released CogVideoX checkpoint; only snr_shift_scale differs per family.
_COMMON_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class ModelFamily:
    """What distinguishes one released CogVideoX checkpoint family from another."""

    name: str
    """Family name as users write it, e.g. "CogVideoX-2b"."""
    hub_id: str
    """The official Hugging Face repository of the full-size checkpoint."""
    pipeline_class: str
    """The diffusers pipeline class recorded in model_index.json."""
    image_to_video: bool
    """True when the transformer is conditioned on the first frame's latents (input channels doubled)."""
    use_rotary_positional_embeddings: bool
    """3D rotary position embeddings (the 5b and 1.5 models) instead of added sin-cos/learned ones (2b)."""
    use_learned_positional_embeddings: bool
    """Learned absolute position embeddings, which pin the resolution (CogVideoX-5b-I2V)."""
    patch_size_t: int | None
    """Temporal patch size (CogVideoX 1.5 patches 2 latent frames at once); None means no temporal patching."""
    ofs_embed_dim: int | None
    """Dimension of the ofs (optical-flow-scale) embedding that CogVideoX1.5-5b-I2V adds; None where absent."""
    vae_scaling_factor: float
    """Latent scaling factor of the family's VAE."""
    invert_scale_latents: bool
    """CogVideoX 1.5 I2V divides image latents by the scaling factor instead of multiplying (diffusers flag)."""
    snr_shift_scale: float
    """CogVideoXDPMScheduler SNR shift used in training and sampling."""
    default_frames: int
    """Frame count the family was trained on."""
    default_height: int
    """Pixel height the family was trained on."""
    default_width: int
    """Pixel width the family was trained on."""
    fps: int
    """Frame rate of the family's training videos (and of exported samples)."""
    frame_multiple: int
    """Valid frame counts are frame_multiple * N + 1 (8N+1 for 1.0, 16N+1 for 1.5)."""
    max_frames: int
    """Largest frame count the family supports."""
    full_size_transformer: dict[str, Any] = field(default_factory=dict)
    """The released transformer config (used to build the full-size model on the meta device)."""
    text_max_length: int = TEXT_MAX_LENGTH
    """Number of T5 tokens per prompt."""
    ofs_value: float = 2.0
    """ofs value passed to the transformer by the I2V 1.5 pipeline (ignored where ofs_embed_dim is None)."""

    def pipeline_type(self) -> type:
        """The diffusers pipeline class of this family (CogVideoXPipeline or CogVideoXImageToVideoPipeline)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def scheduler_config(self) -> dict[str, Any]:
        """The family's CogVideoXDPMScheduler config."""
        return {**_COMMON_SCHEDULER_CONFIG, "snr_shift_scale": self.snr_shift_scale}

    def valid_frame_counts(self) -> list[int]:
        """All frame counts this family accepts, smallest first."""
        return list(range(self.frame_multiple + 1, self.max_frames + 1, self.frame_multiple))

    def is_valid_frame_count(self, frames: int) -> bool:
        """True when `frames` has the family's 8N+1 / 16N+1 form (tiny models use the small ones)."""
        return (1 + self.frame_multiple <= frames <= self.max_frames
                and (frames - 1) % self.frame_multiple == 0)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` pixel frames (F = 4k + 1 -> k + 1)."""
        return (frames - 1) // VAE_TEMPORAL_COMPRESSION + 1

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent height and width of a clip of this pixel size."""
        return height // VAE_SPATIAL_COMPRESSION, width // VAE_SPATIAL_COMPRESSION

    def latent_shape(self, channels: int, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[C, F_latent, H/8, W/8]: the shape of a clip's latents (and of their posterior moments)."""
        return (channels, self.latent_frames(frames), *self.latent_size(height, width))

    def clip_of_latents(self, latent_frames: int, latent_height: int, latent_width: int) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of a clip whose latents have this shape (inverse of latent_shape)."""
        return ((latent_frames - 1) * VAE_TEMPORAL_COMPRESSION + 1, latent_height * VAE_SPATIAL_COMPRESSION,
                latent_width * VAE_SPATIAL_COMPRESSION)

    def tokens_per_sample(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of one sample: video patches (2x2 latents, and 2 latent frames in CogVideoX 1.5, whose
        first frame is repeated to an even count) plus the text tokens."""
        latent_height, latent_width = self.latent_size(height, width)
        patch_frames = -(-self.latent_frames(frames) // (self.patch_size_t or 1))
        return patch_frames * (latent_height // PATCH_SIZE) * (latent_width // PATCH_SIZE) + self.text_max_length

    def native_pixel_size(self, transformer_config: dict[str, Any]) -> tuple[int, int]:
        """The pixel height and width a transformer's position embeddings were made for."""
        return (transformer_config["sample_height"] * VAE_SPATIAL_COMPRESSION,
                transformer_config["sample_width"] * VAE_SPATIAL_COMPRESSION)

    def position_grid_limit(self, transformer_config: dict[str, Any]) -> tuple[int, int] | None:
        """The largest pixel (height, width) the transformer has rotary positions for, or None where any size works.

        CogVideoX 1.5 (rotary with temporal patches) builds its 3D rotary embeddings with diffusers'
        get_3d_rotary_pos_embed(grid_type="slice", max_size=(sample_height // patch_size, sample_width // patch_size)):
        it makes frequencies for that many patch rows and columns and slices the clip's grid from them, so a clip of
        more rows or columns fails there ("Sizes of tensors must match"). CogVideoX 1.0 has no such bound: 5b
        interpolates its rotary grid over the base grid (linspace crop), 2b recomputes its sin-cos table for any size,
        and 5b-I2V's learned positions fix one size exactly (checked in resolution_problem)."""
        if not (self.use_rotary_positional_embeddings and self.patch_size_t is not None):
            return None
        patch = transformer_config.get("patch_size", PATCH_SIZE)
        pixels_per_patch = patch * VAE_SPATIAL_COMPRESSION
        return (transformer_config["sample_height"] // patch * pixels_per_patch,
                transformer_config["sample_width"] // patch * pixels_per_patch)

    def resolution_problem(self, height: int, width: int, transformer_config: dict[str, Any]) -> str | None:
        """Why the transformer of `transformer_config` cannot take clips of this pixel size, in one line, or None."""
        if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            return (f"resolution {height}x{width} is not a positive multiple of {SIZE_MULTIPLE} in both sides "
                    "(8x VAE compression times the 2x2 patch)")
        if self.use_learned_positional_embeddings and (height, width) != self.native_pixel_size(transformer_config):
            native = self.native_pixel_size(transformer_config)
            return f"{self.name} learns its positions for {native[0]}x{native[1]} only, not {height}x{width}"
        return self.position_grid_problem(height, width, transformer_config)

    def position_grid_problem(self, height: int, width: int, transformer_config: dict[str, Any]) -> str | None:
        """The line saying a clip is taller or wider than position_grid_limit allows, or None where it fits."""
        limit = self.position_grid_limit(transformer_config)
        if limit is None or (height <= limit[0] and width <= limit[1]):
            return None
        patch = transformer_config.get("patch_size", PATCH_SIZE)
        rows, columns = (transformer_config[key] // patch for key in ("sample_height", "sample_width"))
        return (f"resolution {height}x{width} is past the {limit[0]}x{limit[1]} pixels (largest height, largest "
                f"width) {self.name} has rotary positions for: the transformer config's sample_height "
                f"{transformer_config['sample_height']} and sample_width {transformer_config['sample_width']} "
                f"latents make {rows}x{columns} patches of patch_size {patch} "
                f"({patch * VAE_SPATIAL_COMPRESSION} pixels each); use a smaller resolution")

    def check_geometry(self, frames: int, height: int, width: int, transformer_config: dict[str, Any]) -> None:
        """Refuse a clip geometry the family cannot train on or draw, naming what is wrong."""
        if not self.is_valid_frame_count(frames):
            valid = self.valid_frame_counts()
            raise CogvxError(f"{frames} frames is not valid for {self.name} (valid: {valid[0]}, {valid[1]}, ..., "
                             f"{valid[-1]}; {self.frame_multiple}N+1)")
        problem = self.resolution_problem(height, width, transformer_config)
        if problem:
            raise CogvxError(problem)

    def single_image_problem(self) -> str | None:
        """Why this family cannot train on single images (one-frame clips), or None when it can."""
        if self.use_learned_positional_embeddings:
            return (f"{self.name} learned its position embeddings for one frame count (diffusers swaps in computed "
                    "ones for any other, which the weights never saw)")
        if self.image_to_video:
            return (f"{self.name} is image-to-video: it is conditioned on the first frame, which for a single image "
                    "is the whole target")
        return None

    def structure(self) -> tuple[bool, bool, int | None, bool, bool]:
        """The transformer-config signature that identifies the family."""
        return (
            self.use_rotary_positional_embeddings,
            self.use_learned_positional_embeddings,
            self.patch_size_t,
            self.image_to_video,
            self.ofs_embed_dim is not None,
        )


def _transformer(heads: int, layers: int, **extra: Any) -> dict[str, Any]:
    config = {
        "num_attention_heads": heads,
        "attention_head_dim": 64,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": layers,
        "text_embed_dim": 4096,
        "time_embed_dim": 512,
        "sample_frames": 49,
        "sample_height": 60,
        "sample_width": 90,
        "patch_size": PATCH_SIZE,
        "max_text_seq_length": TEXT_MAX_LENGTH,
        "temporal_compression_ratio": 4,
    }
    config.update(extra)
    return config


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="CogVideoX-2b",
            hub_id="THUDM/CogVideoX-2b",
            pipeline_class="CogVideoXPipeline",
            image_to_video=False,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
            patch_size_t=None,
            ofs_embed_dim=None,
            vae_scaling_factor=1.15258426,
            invert_scale_latents=False,
            snr_shift_scale=3.0,
            default_frames=49,
            default_height=480,
            default_width=720,
            fps=8,
            frame_multiple=8,
            max_frames=49,
            full_size_transformer=_transformer(30, 30),
        ),
        ModelFamily(
            name="CogVideoX-5b",
            hub_id="THUDM/CogVideoX-5b",
            pipeline_class="CogVideoXPipeline",
            image_to_video=False,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            patch_size_t=None,
            ofs_embed_dim=None,
            vae_scaling_factor=0.7,
            invert_scale_latents=False,
            snr_shift_scale=1.0,
            default_frames=49,
            default_height=480,
            default_width=720,
            fps=8,
            frame_multiple=8,
            max_frames=49,
            full_size_transformer=_transformer(48, 42, use_rotary_positional_embeddings=True),
        ),
        ModelFamily(
            name="CogVideoX-5b-I2V",
            hub_id="THUDM/CogVideoX-5b-I2V",
            pipeline_class="CogVideoXImageToVideoPipeline",
            image_to_video=True,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
            patch_size_t=None,
            ofs_embed_dim=None,
            vae_scaling_factor=0.7,
            invert_scale_latents=False,
            snr_shift_scale=1.0,
            default_frames=49,
            default_height=480,
            default_width=720,
            fps=8,
            frame_multiple=8,
            max_frames=49,
            full_size_transformer=_transformer(
                48, 42, in_channels=32, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
            ),
        ),
        ModelFamily(
            name="CogVideoX1.5-5b",
            hub_id="THUDM/CogVideoX1.5-5B",
            pipeline_class="CogVideoXPipeline",
            image_to_video=False,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            patch_size_t=2,
            ofs_embed_dim=None,
            vae_scaling_factor=0.7,
            invert_scale_latents=True,
            snr_shift_scale=1.0,
            default_frames=81,
            default_height=768,
            default_width=1360,
            fps=16,
            frame_multiple=16,
            max_frames=161,
            full_size_transformer=_transformer(
                48,
                42,
                patch_size_t=2,
                patch_bias=False,
                sample_frames=81,
                sample_height=300,
                sample_width=300,
                use_rotary_positional_embeddings=True,
            ),
        ),
        ModelFamily(
            name="CogVideoX1.5-5b-I2V",
            hub_id="THUDM/CogVideoX1.5-5B-I2V",
            pipeline_class="CogVideoXImageToVideoPipeline",
            image_to_video=True,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            patch_size_t=2,
            ofs_embed_dim=512,
            vae_scaling_factor=0.7,
            invert_scale_latents=True,
            snr_shift_scale=1.0,
            default_frames=81,
            default_height=768,
            default_width=1360,
            fps=16,
            frame_multiple=16,
            max_frames=161,
            full_size_transformer=_transformer(
                48,
                42,
                in_channels=32,
                patch_size_t=2,
                patch_bias=False,
                ofs_embed_dim=512,
                sample_frames=81,
                sample_height=300,
                sample_width=300,
                use_rotary_positional_embeddings=True,
            ),
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    """Look a family up as users write it: its name in any case ("cogvideox1.5-5b-i2v") or its hub id with or
    without the organisation ("THUDM/CogVideoX1.5-5B"); the error lists the known ones."""
    wanted = name.strip().lower()
    for family in FAMILIES.values():
        spellings = {family.name.lower(), family.hub_id.lower(), family.hub_id.split("/", 1)[1].lower()}
        if wanted in spellings or wanted.split("/", 1)[-1] in spellings:
            return family
    raise CogvxError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)} (or their hub ids, "
                     "e.g. THUDM/CogVideoX1.5-5B)")


def detect_family(transformer_config: dict[str, Any], where: str = "transformer/config.json") -> ModelFamily:
    """Identify the family from a CogVideoXTransformer3DModel config dict."""
    class_name = transformer_config.get("_class_name", "CogVideoXTransformer3DModel")
    if class_name != "CogVideoXTransformer3DModel":
        raise CogvxError(f"{where}: _class_name is {class_name!r}, not CogVideoXTransformer3DModel")
    in_channels = transformer_config.get("in_channels", 16)
    out_channels = transformer_config.get("out_channels") or in_channels
    signature = (
        bool(transformer_config.get("use_rotary_positional_embeddings", False)),
        bool(transformer_config.get("use_learned_positional_embeddings", False)),
        transformer_config.get("patch_size_t"),
        in_channels == 2 * out_channels,
        transformer_config.get("ofs_embed_dim") is not None,
    )
    for family in FAMILIES.values():
        if family.structure() == signature:
            return family
    rotary, learned, patch_t, i2v, ofs = signature
    raise CogvxError(
        f"{where}: no known CogVideoX family matches this config (rotary={rotary}, learned_positions={learned}, "
        f"patch_size_t={patch_t}, image_conditioned={i2v}, ofs_embedding={ofs}); known: {', '.join(FAMILIES)}"
    )
