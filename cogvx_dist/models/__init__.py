"""CogVideoX models: the family table, component loading, and tiny checkpoints.

Names are resolved lazily so that importing the family table (e.g. for `cogvx --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": "families",
    "ModelFamily": "families",
    "detect_family": "families",
    "get_family": "families",
    "COMPONENT_ORDER": "loading",
    "CheckpointInfo": "loading",
    "ComponentStore": "loading",
    "describe_checkpoint": "loading",
    "read_component_config": "loading",
    "load_scheduler": "loading",
    "load_text_encoder": "loading",
    "load_tokenizer": "loading",
    "load_transformer": "loading",
    "load_vae": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
