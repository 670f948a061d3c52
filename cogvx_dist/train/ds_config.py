"""DeepSpeed JSON configs: the shipped ones by name (ds_configs/), and the run's values filled in.

The shipped configs say "auto" where cogvx always fills the value from the run config (batch, accumulation,
clipping, bf16, the AdamW hyper-parameters), so they show no number that is never used. Pure data: no deepspeed
import, so the pre-flight resolves a config before any rank starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import read_json_object

DS_CONFIG_DIR = Path(__file__).parents[1] / "ds_configs"
"""The shipped configs: cogvx_dist/ds_configs, a link to the repository's ds_configs/ in a checkout and a copy of
it in a built wheel."""
AUTO = "auto"
ADAM_TYPES = ("adam", "adamw")
"""DeepSpeed optimizer types (lower-cased) that keep Adam's moments: their state carries from one to the other."""


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config by ds_configs/ name (zero1, zero2, zero3, zero2_offload, zero3_offload) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise CogvxError(f"deepspeed.config {name_or_path!r}: no such file (named configs: {', '.join(names)})")
    config = read_json_object(path, "deepspeed.config")
    _check_sections(config, f"deepspeed.config {path}")
    return config


def _check_sections(config: dict[str, Any], where: str) -> None:
    """The parts cogvx reads and fills must have DeepSpeed's shape, or the pre-flight would fail with a traceback."""
    sections = {name: config[name] for name in ("zero_optimization", "optimizer", "bf16", "fp16") if name in config}
    if isinstance(config.get("optimizer"), dict) and "params" in config["optimizer"]:
        sections["optimizer.params"] = config["optimizer"]["params"]
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise CogvxError(f"{where}: \"{name}\" must be an object, got {value!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise CogvxError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def run_values(*, micro_batch_size: int, grad_accum_steps: int, max_grad_norm: float, lr: float,
               betas: list[float], eps: float, weight_decay: float, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed keys (dotted paths) cogvx fills from the run config, whatever the JSON says."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max_grad_norm,
        "bf16.enabled": bf16,
        "optimizer.params.lr": lr,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
    }


def resolve_ds_config(base: dict[str, Any], values: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """`base` with `values` (see run_values) filled in, so that every value is concrete; any other "auto" is an
    error naming the key."""
    config = copy.deepcopy(base)
    config.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch, accumulation and world size
    config.pop("fp16", None)
    config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    _choose_adam(config, on_gpu)
    auto = _find_auto(config)
    if auto:
        raise CogvxError(f"DeepSpeed config value {auto} is \"auto\"; cogvx fills only "
                         f"{', '.join(values)} from the run config")
    return config


def _choose_adam(config: dict[str, Any], on_gpu: bool) -> None:
    """AdamW that needs no JIT build unless the config asks otherwise: torch's fused AdamW as DeepSpeed's optimizer
    on GPUs (DeepSpeed's FusedAdam compiles on first use, about a minute, and fails on images without nvcc), torch's
    foreach AdamW on CPUs (FusedAdam needs CUDA). `"torch_adam": false` keeps FusedAdam on GPUs; with optimizer
    offload DeepSpeed runs its CPU Adam whatever this says."""
    params = config["optimizer"]["params"]
    if optimizer_type(config) not in ADAM_TYPES or offloads_optimizer(config):
        if params.get("torch_adam") == AUTO:
            del params["torch_adam"]  # DeepSpeed takes torch's AdamW over its CPU Adam whenever this is true
        return
    if not on_gpu:
        params["torch_adam"] = True
        return
    if params.get("torch_adam", AUTO) == AUTO:
        params["torch_adam"] = True
        params.setdefault("fused", True)


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Whether the config moves the optimizer to the CPU (DeepSpeedCPUAdam, with its own state layout)."""
    return "offload_optimizer" in config.get("zero_optimization", {})


def optimizer_in_use(config: dict[str, Any]) -> str:
    """Which optimizer a resolved config makes DeepSpeed run, for the pre-flight and the run's first log line."""
    optimizer = config.get("optimizer", {})
    params = optimizer.get("params", {})
    if optimizer_type(config) not in ADAM_TYPES:
        return f"DeepSpeed's {optimizer.get('type')}"
    if offloads_optimizer(config):
        return "DeepSpeedCPUAdam (optimizer offload; its CPU op builds on first use unless prebuilt)"
    if params.get("torch_adam"):
        return "torch.optim.AdamW (" + ("fused" if params.get("fused") else "foreach") + ", no build)"
    return "DeepSpeed FusedAdam (compiled on first use unless DeepSpeed was installed with it prebuilt)"


def optimizer_type(config: dict[str, Any]) -> str:
    """The optimizer type a DeepSpeed config names, lower-cased ("" for none)."""
    return str(config.get("optimizer", {}).get("type", "")).lower()


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    elif node == AUTO:
        return path
    return None
