"""LoRA adapters on the CogVideoX transformer: injection, identity across ranks, and diffusers-format files.

This module is the one place that knows the adapter's key naming:
- in memory (PEFT via diffusers' `add_adapter`): `transformer_blocks.0.attn1.to_q.lora_A.default.weight`;
- adapter state dicts (`lora_state_dict`): `transformer_blocks.0.attn1.to_q.lora_A.weight`;
- the exported file `pytorch_lora_weights.safetensors`: the same with a `transformer.` prefix, plus the PEFT
  config in the safetensors metadata so that diffusers reloads it with lora_alpha (scale alpha/r), not scale 1.
  Beside diffusers' metadata, `cogvx_family` records the model family it was trained on (e.g. CogVideoX-5b):
  5b, 5b-I2V and 1.5-5b share every adapted shape, so only this record tells their adapters apart. (Not in the PEFT
  config's base_model_name_or_path: PEFT takes that for a hub repository and looks it up when the adapter is saved.)
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import sorted_safetensors_header

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
EXPORT_PREFIX = "transformer."
FAMILY_METADATA_KEY = "cogvx_family"
_DOWN, _UP = ".lora_A.", ".lora_B."
"""The two matrices of an adapted layer: A projects the input down to the rank, B back up."""


def is_lora_key(name: str) -> bool:
    """True for a LoRA matrix under any of the three namings."""
    return _DOWN in name or _UP in name


def adapted_layer(name: str) -> str:
    """The layer a LoRA matrix adapts: `transformer_blocks.0.attn1.to_q.lora_A.weight` -> `...attn1.to_q`."""
    return name.split(_DOWN)[0].split(_UP)[0]


def lora_matrix_shape(name: str, rank: int, in_features: int, out_features: int) -> tuple[int, int]:
    """The shape a LoRA matrix of rank `rank` must have on a linear layer of the given size."""
    return (rank, in_features) if _DOWN in name else (out_features, rank)


@dataclass
class LoraSettings:
    """Shape and placement of the LoRA adapter."""

    rank: int = 128
    """LoRA rank r (columns of A, rows of B)."""
    alpha: float = 64.0
    """lora_alpha; the update is scaled by alpha / rank (0.5 with the defaults)."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Names (suffixes) of the transformer's linear layers that get an adapter; everything else stays frozen."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input during training."""

    @property
    def scale(self) -> float:
        """The factor alpha / rank applied to B·A·x."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """Reject impossible settings with a message naming the field."""
        if self.rank < 1:
            raise CogvxError(f"lora.rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise CogvxError(f"lora.alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise CogvxError("lora.target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise CogvxError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self) -> Any:
        """The equivalent `peft.LoraConfig`."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=True,
        )


def inject_lora(transformer: torch.nn.Module, settings: LoraSettings, seed: int) -> torch.nn.Module:
    """Freeze every weight of `transformer` and add LoRA adapters, initialised identically for a seed.

    A is drawn from a CPU generator (PEFT's default kaiming-uniform bound, 1/sqrt(fan_in)) in sorted module order,
    B is zero, so every process, on any device, gets bit-identical adapters without communicating.
    """
    settings.validate()
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(settings.peft_config(), adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise CogvxError(f"lora.target_modules {settings.target_modules} do not fit the transformer: {err}") from err
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(lora_parameters(transformer).items()):
        if param.is_meta:
            continue
        with torch.no_grad():
            if _DOWN in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                values = torch.rand(param.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
                param.copy_(values.to(param.dtype))
            else:
                param.zero_()
    for param in lora_parameters(transformer).values():
        param.requires_grad_(True)
    return transformer


def lora_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters, by their in-memory names."""
    return {name: p for name, p in transformer.named_parameters() if is_lora_key(name)}


def state_dict_names(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory adapter names (`...lora_A.default.weight`) to state-dict names (`...lora_A.weight`), detached."""
    suffix = f".{ADAPTER_NAME}."
    return {name.replace(suffix, "."): t.detach() for name, t in named.items()}


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under their state-dict names (no adapter name, no prefix), detached."""
    return state_dict_names(lora_parameters(transformer))


def adapter_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter state dict (names and float32 values), equal exactly when the adapters are."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def export_lora(state_dict: dict[str, torch.Tensor], settings: LoraSettings, out_dir: str | Path,
                family: str | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers CogVideoX LoRA format, alpha and family kept."""
    from diffusers import CogVideoXPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    CogVideoXPipeline.save_lora_weights(
        save_directory=str(out),
        transformer_lora_layers=tensors,
        transformer_lora_adapter_metadata=adapter_metadata(settings),
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    file = out / LORA_WEIGHTS_NAME
    _rewrite_header(file, {FAMILY_METADATA_KEY: family} if family else {})
    return file


def adapter_metadata(settings: LoraSettings) -> dict[str, Any]:
    """The PEFT config as the file records it. PEFT keeps target_modules as a set, whose order follows the hash
    seed: sorted, so that the same adapter gives the same bytes in every process."""
    metadata = settings.peft_config().to_dict()
    if isinstance(metadata.get("target_modules"), (set, list, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata


def _rewrite_header(file: Path, extra: dict[str, str]) -> None:
    """Add metadata entries to a safetensors file, its header sorted so that the same adapter gives the same
    bytes."""
    temporary = file.with_name(f".{file.name}.tmp")
    temporary.write_bytes(sorted_safetensors_header(file.read_bytes(), extra))
    os.replace(temporary, file)


@dataclass
class ExportedLora:
    """An adapter file read back."""

    state: dict[str, torch.Tensor]
    """Adapter state dict with state-dict names (`...to_q.lora_A.weight`)."""
    settings: LoraSettings
    """Rank, alpha, targets and dropout it was trained with."""
    family: str | None
    """Model family it was trained on; None for files written by other tools (or before this was recorded)."""


def load_exported_lora(path: str | Path) -> ExportedLora:
    """Read an exported adapter (its folder or the file) with its settings and the family it was trained on."""
    from diffusers import CogVideoXPipeline
    from safetensors import safe_open

    path = Path(path)
    file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise CogvxError(f"no LoRA weights at {file}")
    state, metadata = CogVideoXPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    if not metadata:
        raise CogvxError(f"{file} has no adapter metadata (lora_alpha unknown); export it with cogvx")
    config = {k[len(EXPORT_PREFIX) :]: v for k, v in metadata.items() if k.startswith(EXPORT_PREFIX)} or metadata
    settings = LoraSettings(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]),
        dropout=float(config.get("lora_dropout", 0.0)),
    )
    stripped = {k[len(EXPORT_PREFIX) :] if k.startswith(EXPORT_PREFIX) else k: v for k, v in state.items()}
    with safe_open(str(file), framework="pt") as handle:  # the header only
        family = (handle.metadata() or {}).get(FAMILY_METADATA_KEY) or None
    return ExportedLora(stripped, settings, family)

