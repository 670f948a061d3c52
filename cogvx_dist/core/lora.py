"""LoRA adapters on the CogVideoX transformer: injection, identity across ranks, and diffusers-format files.

This module is the one place that knows the adapter's key naming:
- in memory (PEFT via diffusers' `add_adapter`): `transformer_blocks.0.attn1.to_q.lora_A.default.weight`;
- adapter state dicts (`lora_state_dict`): `transformer_blocks.0.attn1.to_q.lora_A.weight`;
- the exported file `pytorch_lora_weights.safetensors`: the same with a `transformer.` prefix, plus the PEFT
  config in the safetensors metadata so that diffusers reloads it with lora_alpha (scale alpha/r), not scale 1.
  Beside diffusers' metadata, `cogvx_family` records the model family it was trained on (e.g. CogVideoX-5b):
  5b, 5b-I2V and 1.5-5b share every adapted shape, so only this record tells their adapters apart. (Not in the PEFT
  config's base_model_name_or_path: PEFT takes that for a hub repository and looks it up when the adapter is saved.)
- the ComfyUI file (`export_comfyui_lora`): core ComfyUI's own module names under `diffusion_model.`
  (`diffusion_model.blocks.0.q.lora_A.weight`), with lora_alpha as a per-layer `.alpha` tensor.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError, first_line
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
    init_from: str = ""
    """Start from this adapter instead of a fresh one (its folder or safetensors file: a cogvx export, diffusers'
    `save_lora_weights`, PEFT's `save_pretrained`); the optimizer and the step count start fresh (not a resume)."""
    init_alpha: float = 0.0
    """The lora_alpha `init_from` was trained with, for files that do not record it (the official CogVideo and
    diffusers-example exports); 0: read it from the file."""

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
        if self.init_alpha < 0 or (self.init_alpha and not self.init_from):
            raise CogvxError(f"lora.init_alpha ({self.init_alpha:g}) must be positive, and only goes with "
                             "lora.init_from")

    def initial_adapter(self) -> ExportedLora | None:
        """The adapter named by init_from, read and checked on its own (None for a fresh start)."""
        if not self.init_from:
            return None
        try:
            adapter = read_adapter(self.init_from, self.init_alpha or None,
                                   no_alpha_hint="give it as lora.init_alpha (the alpha it was trained with)")
        except CogvxError as err:
            raise CogvxError(f"lora.init_from: {err}") from err
        if adapter.settings.rank != self.rank:
            raise CogvxError(f"lora.init_from {adapter.file} has rank {adapter.settings.rank}, but lora.rank is "
                             f"{self.rank}; set lora.rank: {adapter.settings.rank}")
        return adapter

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


def state_dict_name(name: str) -> str:
    """An in-memory adapter name (`...lora_A.default.weight`) as a state dict names it (`...lora_A.weight`)."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


def state_dict_names(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory adapter names to state-dict names (`state_dict_name`), detached."""
    return {state_dict_name(name): t.detach() for name, t in named.items()}


def memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict names (`...lora_A.weight`) back to in-memory adapter names (`...lora_A.default.weight`)."""
    return {name.replace(_DOWN, f"{_DOWN}{ADAPTER_NAME}.").replace(_UP, f"{_UP}{ADAPTER_NAME}."): t
            for name, t in state.items()}


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


# ComfyUI's native CogVideoX (comfy/ldm/cogvideo/model.py) names the transformer's modules its own way, and its LoRA
# loader (comfy/lora.py, model_lora_keys_unet) has no CogVideoX entry for diffusers names: for this model it takes only
# `diffusion_model.<its module>` and `lora_unet_<its module with _>`. A diffusers-named file loads nothing there.
COMFYUI_FORMAT = "comfyui"
COMFYUI_WEIGHTS_NAME = "lora_comfyui.safetensors"
"""The ComfyUI file's default name, beside the diffusers file it was converted from."""
COMFYUI_PREFIX = "diffusion_model."
FORMAT_METADATA_KEY = "cogvx_format"
_COMFYUI_BLOCK_MODULES = {
    "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
    "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k", "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out",
    "norm1.linear": "norm1.linear", "norm1.norm": "norm1.norm", "norm2.linear": "norm2.linear",
    "norm2.norm": "norm2.norm",
}
"""Inside `transformer_blocks.N.` (diffusers) -> inside `blocks.N.` (ComfyUI)."""
_COMFYUI_TOP_MODULES = {
    "patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1", "ofs_embedding.linear_2": "ofs_embedding_linear_2",
    "norm_final": "norm_final", "norm_out.linear": "norm_out.linear", "norm_out.norm": "norm_out.norm",
    "proj_out": "proj_out",
}
"""The modules outside the blocks, diffusers -> ComfyUI."""


def comfyui_module_name(module: str) -> str | None:
    """ComfyUI's name for a diffusers CogVideoX transformer module (`transformer_blocks.3.attn1.to_out.0` ->
    `blocks.3.attn_out`), or None for a module ComfyUI's model does not have under any name this table knows."""
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[1].isdigit():
        inner = _COMFYUI_BLOCK_MODULES.get(parts[2])
        return f"blocks.{parts[1]}.{inner}" if inner else None
    return _COMFYUI_TOP_MODULES.get(module)


def comfyui_weight_name(name: str) -> str | None:
    """ComfyUI's name for a diffusers CogVideoX transformer weight (`...attn1.to_q.weight` -> `blocks.N.q.weight`;
    also the learned position embedding), or None when `comfyui_module_name` knows no such module."""
    if name == "patch_embed.pos_embedding":
        return name
    module, _, leaf = name.rpartition(".")
    renamed = comfyui_module_name(module) if leaf in ("weight", "bias") else None
    return f"{renamed}.{leaf}" if renamed else None


def comfyui_state_dict(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """An adapter state dict (`...attn1.to_q.lora_A.weight`) as ComfyUI's loader reads it: each adapted layer's
    `lora_A.weight` and `lora_B.weight` under `diffusion_model.<ComfyUI module>`, and its lora_alpha as the scalar
    tensor `<...>.alpha`, from which ComfyUI takes the scale alpha / r (r from lora_A). Without the `.alpha` tensor
    it would apply B·A at scale 1, not alpha / r."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sorted(state.items()):
        layer = adapted_layer(name)
        renamed = comfyui_module_name(layer)
        if renamed is None:
            raise CogvxError(f"the adapter adapts {layer}, which ComfyUI's CogVideoX model has no known name for; "
                             "export it in the diffusers format")
        matrix = "lora_A" if _DOWN in name else "lora_B"
        out[f"{COMFYUI_PREFIX}{renamed}.{matrix}.weight"] = tensor.detach().to("cpu").contiguous()
        out[f"{COMFYUI_PREFIX}{renamed}.alpha"] = torch.tensor(float(settings.alpha), dtype=torch.float32)
    return out


def export_comfyui_lora(adapter: ExportedLora, out_file: str | Path) -> Path:
    """Write `adapter` as one safetensors file for core ComfyUI's LoRA loaders (`comfyui_state_dict`), with its
    family, rank and alpha in the header for people and tools that read it; written whole, then renamed into
    place."""
    from safetensors.torch import save_file

    file = Path(out_file)
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {FORMAT_METADATA_KEY: COMFYUI_FORMAT, "lora_rank": str(adapter.settings.rank),
                "lora_alpha": f"{adapter.settings.alpha:g}"}
    if adapter.family:
        metadata[FAMILY_METADATA_KEY] = adapter.family
    temporary = file.with_name(f".{file.name}.tmp")
    save_file(comfyui_state_dict(adapter.state, adapter.settings), str(temporary), metadata=metadata)
    temporary.write_bytes(sorted_safetensors_header(temporary.read_bytes()))
    os.replace(temporary, file)
    return file


@dataclass
class ExportedLora:
    """An adapter file read back."""

    state: dict[str, torch.Tensor]
    """Adapter state dict with state-dict names (`...to_q.lora_A.weight`)."""
    settings: LoraSettings
    """Rank, alpha, targets and dropout it was trained with."""
    family: str | None
    """Model family it was trained on; None for files written by other tools (or before this was recorded)."""
    file: Path = field(default_factory=Path)
    """The safetensors file it was read from."""


PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_FOREIGN_PREFIXES = ("base_model.model.", EXPORT_PREFIX)
"""Key prefixes of PEFT's `save_pretrained` and of diffusers' pipeline-level files, stripped on reading."""


def load_exported_lora(path: str | Path) -> ExportedLora:
    """Read an adapter this project exported (its folder or the file), with its settings and family."""
    return read_adapter(path, alpha=None, no_alpha_hint="export it with cogvx")


def read_adapter(path: str | Path, alpha: float | None, no_alpha_hint: str) -> ExportedLora:
    """Read a LoRA adapter written by cogvx, diffusers' `save_lora_weights` (with or without its PEFT metadata) or
    PEFT's `save_pretrained`: the folder or the safetensors file. `alpha` stands in for a file that records no
    lora_alpha (the official CogVideo and diffusers-example exports); without either the error ends with
    `no_alpha_hint`."""
    from safetensors.torch import load_file

    file = _adapter_file(Path(path))
    header = _header(file)
    try:
        raw = load_file(str(file))
    except Exception as err:  # a damaged or foreign file: one line, not a traceback
        raise CogvxError(f"cannot read LoRA {file}: {first_line(err)}") from err
    state = {state_dict_name(_strip_prefix(name)): tensor for name, tensor in raw.items()}
    others = sorted(name for name in state if not is_lora_key(name))
    if others or not state:
        raise CogvxError(f"{file} is not a LoRA adapter: " + (f"{others[0]} is no lora_A/lora_B matrix" if others
                                                               else "it holds no tensors"))
    ranks = sorted({tensor.shape[0] for name, tensor in state.items() if _DOWN in name})
    if len(ranks) != 1:
        raise CogvxError(f"{file} mixes LoRA ranks {ranks}; only one rank for every layer is supported")
    config = _peft_config(file, header)
    recorded = _recorded_alpha(file, config)
    if recorded is None and alpha is None:
        raise CogvxError(f"{file} records no lora_alpha, so the scale its weights were trained at is unknown; "
                         f"{no_alpha_hint}")
    if recorded is not None and alpha is not None and recorded != alpha:
        raise CogvxError(f"{file} records lora_alpha {recorded:g}, not the {alpha:g} given for it")
    targets = config.get("target_modules") or sorted({_module_suffix(adapted_layer(name)) for name in state})
    settings = LoraSettings(rank=ranks[0], alpha=float(recorded if recorded is not None else alpha),
                            target_modules=sorted(targets), dropout=float(config.get("lora_dropout") or 0.0))
    return ExportedLora(state, settings, header.get(FAMILY_METADATA_KEY) or None, file)


def recorded_settings(path: str | Path) -> tuple[dict[str, Any], str | None]:
    """The PEFT config (r, lora_alpha, target_modules, ...) and the family an adapter records, from the file's
    header alone: no tensor is read."""
    file = _adapter_file(Path(path))
    header = _header(file)
    return _peft_config(file, header), header.get(FAMILY_METADATA_KEY) or None


def _header(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # a damaged or foreign file: one line, not a traceback
        raise CogvxError(f"cannot read LoRA {file}: {first_line(err)}") from err


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (LORA_WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    raise CogvxError(f"no LoRA weights at {path} (looked for the file, {LORA_WEIGHTS_NAME} and {PEFT_WEIGHTS_NAME})")


def _strip_prefix(name: str) -> str:
    for prefix in _FOREIGN_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _module_suffix(layer: str) -> str:
    """`transformer_blocks.3.attn1.to_out.0` -> `to_out.0`: the target_modules entry naming this layer."""
    parts = layer.split(".")
    return ".".join(parts[3:]) if len(parts) > 3 and parts[0] == "transformer_blocks" else layer


def _peft_config(file: Path, header: dict[str, str]) -> dict[str, Any]:
    """The PEFT config a file records: diffusers keeps it in the safetensors header (keys prefixed with the
    component), PEFT in adapter_config.json beside it; {} when neither exists."""
    import json

    if "lora_adapter_metadata" in header:
        stored = json.loads(header["lora_adapter_metadata"])
        return {_strip_prefix(key): value for key, value in stored.items()}
    beside = file.with_name(PEFT_CONFIG_NAME)
    if beside.is_file():
        try:
            return json.loads(beside.read_text())
        except ValueError as err:
            raise CogvxError(f"{beside} is not JSON: {err}") from err
    return {}


def _recorded_alpha(file: Path, config: dict[str, Any]) -> float | None:
    """The file's lora_alpha; refuses the PEFT variants whose scale is not alpha / r of one rank."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CogvxError(f"{file} sets per-layer ranks or alphas (rank_pattern/alpha_pattern); not supported")
    if config.get("use_rslora") or config.get("use_dora"):
        raise CogvxError(f"{file} is a {'DoRA' if config.get('use_dora') else 'rsLoRA'} adapter; only plain LoRA "
                         "(scale alpha / r) is supported")
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def adapter_misfit(state: dict[str, torch.Tensor], rank: int, transformer: torch.nn.Module) -> str | None:
    """Why the adapter does not fit the transformer's linear layers (a layer it lacks, a shape that differs), or
    None when every matrix fits."""
    modules = dict(transformer.named_modules())
    for name, tensor in sorted(state.items()):
        layer = modules.get(adapted_layer(name))
        layer = getattr(layer, "base_layer", layer)  # already adapted: the wrapped linear
        if layer is None or not hasattr(layer, "weight"):
            return f"targets {adapted_layer(name)}, which this transformer does not have"
        out_features, in_features = layer.weight.shape[:2]
        expected = lora_matrix_shape(name, rank, in_features, out_features)
        if tuple(tensor.shape) != expected:
            return f"{name} has shape {tuple(tensor.shape)}, this transformer needs {expected}"
    return None


def start_from_adapter(transformer: torch.nn.Module, adapter: ExportedLora, settings: LoraSettings) -> None:
    """Set an injected adapter to `adapter`'s weights (`lora.init_from`). The same layers must be adapted at the
    same rank (`LoraSettings.initial_adapter` checked the rank); a different alpha rescales B so that the adapted
    model computes what the file's adapter did."""
    where = f"lora.init_from {adapter.file}"
    misfit = adapter_misfit(adapter.state, settings.rank, transformer)
    if misfit:
        raise CogvxError(f"{where} does not fit this model: it {misfit}")
    params = {state_dict_name(name): param for name, param in lora_parameters(transformer).items()}
    extra = sorted(set(adapter.state) - set(params))
    missing = sorted(set(params) - set(adapter.state))
    if extra or missing:
        file_targets = ", ".join(adapter.settings.target_modules)
        what = (f"adapts {adapted_layer(extra[0])}, which lora.target_modules leaves out" if extra
                else f"has no {missing[0]}, which lora.target_modules adapts")
        raise CogvxError(f"{where} {what}; set lora.target_modules to the adapter's: [{file_targets}]")
    rescale = adapter.settings.alpha / settings.alpha
    with torch.no_grad():
        for name, param in params.items():
            values = adapter.state[name].to(torch.float32)
            if _UP in name and rescale != 1.0:
                values = values * rescale
            param.copy_(values.to(param.dtype))
