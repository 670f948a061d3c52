"""CogVideoX models: the family table, component loading, and tiny checkpoints."""

from cogvx_dist.models.families import FAMILIES, ModelFamily, detect_family, get_family
from cogvx_dist.models.loading import (
    COMPONENT_ORDER,
    CheckpointInfo,
    ComponentStore,
    describe_checkpoint,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)

__all__ = [
    "COMPONENT_ORDER",
    "FAMILIES",
    "CheckpointInfo",
    "ComponentStore",
    "ModelFamily",
    "describe_checkpoint",
    "detect_family",
    "get_family",
    "load_scheduler",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_vae",
]
